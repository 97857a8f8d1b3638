/** The server-wide payload budget: a unit test of the budget, and the invariant on a live server. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { PayloadBudget } from '../../src/nbd/budget.js';
import { openClient, startServer } from './helpers.js';
import { seededBytes } from '../helpers/prng.js';

const NBD_CMD_READ = 0;
const NBD_CMD_WRITE = 1;
const MiB = 1 << 20;

test('budget: one request always passes when idle; waiters are served in order once they fit', async () => {
  const b = new PayloadBudget(4 * MiB);
  assert.equal(b.acquire(10 * MiB), null, 'idle: even an oversized request goes through');
  const order: string[] = [];
  const w1 = b.acquire(MiB)?.then(() => order.push('a'));
  const w2 = b.acquire(3 * MiB)?.then(() => order.push('b'));
  assert.ok(w1 && w2);
  assert.equal(b.acquire(0), null);
  b.release(10 * MiB);
  await Promise.all([w1, w2]);
  assert.deepEqual(order, ['a', 'b']);
  assert.equal(b.usedBytes, 4 * MiB);
  const w3 = b.acquire(MiB);
  assert.ok(w3, 'full: a new request waits');
  b.release(MiB);
  await w3;
  assert.equal(b.usedBytes, 4 * MiB);
});

test('many clients starting large WRITEs: the server never holds more than its budget, and every write completes', async () => {
  const g = await startServer({ maxServerInflightBytes: MiB, maxPayloadBytes: 2 * MiB }, 16 * MiB);
  const clients = await Promise.all([0, 1, 2, 3, 4, 5].map(() => openClient(g)));
  try {
    const payloads = clients.map((_, i) => seededBytes(MiB, 100 + i));
    // Every client sends a WRITE header and only half of its payload.
    clients.forEach((c, i) => {
      c.sendRequest(NBD_CMD_WRITE, i * MiB, MiB, { cookie: BigInt(i) });
      c.send(payloads[i]!.subarray(0, MiB / 2));
    });
    // Wait (bounded) until the server has parsed a WRITE header and granted it, then check that the
    // grant stays the only one while every other client waits with its payload unread.
    for (let k = 0; k < 500 && g.server.payloadBytesInFlight === 0; k++) await new Promise((r) => setTimeout(r, 10));
    for (let k = 0; k < 20; k++) {
      await new Promise((r) => setTimeout(r, 10));
      assert.equal(g.server.payloadBytesInFlight, MiB, 'exactly one WRITE holds the budget; the others wait unread');
    }
    clients.forEach((c, i) => {
      c.send(payloads[i]!.subarray(MiB / 2));
    });
    for (const c of clients) assert.equal((await c.readSimpleReply()).error, 0);
    assert.equal(g.server.payloadBytesInFlight, 0);
    const c0 = clients[0]!;
    for (let i = 0; i < clients.length; i++) {
      c0.sendRequest(NBD_CMD_READ, i * MiB, MiB, { cookie: BigInt(50 + i) });
      assert.equal((await c0.readSimpleReply()).error, 0);
      assert.ok((await c0.read(MiB)).equals(payloads[i]!), `client ${i}'s data`);
    }
  } finally {
    for (const c of clients) c.close();
    await g.close();
  }
});
