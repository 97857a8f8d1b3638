/**
 * The receive queue's direct mode on a real socket (nbd-wire/recv.ts): while WRITE payloads stream,
 * one read takes a request header and the payload it is expected to announce. Whatever the stream
 * really holds (a payload of another size, a READ, a refused WRITE that is skipped, headers and
 * payloads split across many writes), the consumer must see exactly the bytes that were sent, in
 * order, and a payload read with its header must come from `alloc` (the pool).
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { createServer, connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { test } from 'node:test';
import { NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_WRITE, NBD_REQUEST_MAGIC } from '../../src/nbd-wire/constants.js';
import { adoptSocket, RecvQueue } from '../../src/nbd-wire/recv.js';
import { seededBytes } from '../helpers/prng.js';
import { testTempDir } from '../helpers/tmp.js';

const HDR = 28;
const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');

function header(type: number, cookie: number, length: number): Buffer {
  const h = Buffer.alloc(HDR);
  h.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
  h.writeUInt16BE(type, 6);
  h.writeUInt32BE(cookie, 12);
  h.writeUInt32BE(length, 24);
  return h;
}

const writePayload = (h: Buffer) =>
  h.readUInt32BE(0) === NBD_REQUEST_MAGIC && h.readUInt16BE(6) === NBD_CMD_WRITE ? h.readUInt32BE(24) : 0;

interface Msg {
  type: number;
  cookie: number;
  length: number;
  /** sha of the payload (WRITE), or 'skipped' for a WRITE the consumer refuses. */
  payload?: string;
}

test('headers read with their payloads: every stream shape reaches the consumer intact', async (t) => {
  const dir = testTempDir(t, 'cryptmap-recv-spec-');
  const path = join(dir, 's.sock');
  // The stream: runs of equal WRITEs (speculation hits), a size change (miss), READs and a FLUSH
  // between WRITEs, WRITEs the consumer refuses (cookie >= 1000: skipped, also right after hits),
  // and the last run sent in small pieces so headers and payloads split across reads.
  const plan: { type: number; length: number }[] = [];
  for (let i = 0; i < 12; i++) plan.push({ type: NBD_CMD_WRITE, length: 256 << 10 });
  plan.push({ type: NBD_CMD_WRITE, length: 64 << 10 });
  plan.push({ type: NBD_CMD_WRITE, length: 256 << 10 });
  plan.push({ type: NBD_CMD_READ, length: 256 << 10 }, { type: NBD_CMD_READ, length: 4096 });
  for (let i = 0; i < 6; i++) plan.push({ type: NBD_CMD_WRITE, length: 128 << 10 });
  plan.push({ type: NBD_CMD_FLUSH, length: 0 });
  for (let i = 0; i < 6; i++) plan.push({ type: NBD_CMD_WRITE, length: 128 << 10 });
  const splitFrom = plan.length;
  for (let i = 0; i < 8; i++) plan.push({ type: NBD_CMD_WRITE, length: 32 << 10 });
  plan.push({ type: NBD_CMD_FLUSH, length: 0 });
  const refused = new Set([5, 9, 20, splitFrom + 3]);

  const sent: Msg[] = [];
  const chunks: Buffer[] = [];
  plan.forEach((p, i) => {
    const cookie = refused.has(i) ? 1000 + i : i;
    chunks.push(header(p.type, cookie, p.length));
    const m: Msg = { type: p.type, cookie, length: p.length };
    if (p.type === NBD_CMD_WRITE) {
      const data = seededBytes(p.length, 7 + i);
      chunks.push(data);
      m.payload = refused.has(i) ? 'skipped' : sha(data);
    }
    sent.push(m);
  });
  const splitAt = chunks.slice(0, splitFrom + sent.slice(0, splitFrom).filter((m) => m.payload).length);
  const head = Buffer.concat(splitAt);
  const tail = Buffer.concat(chunks.slice(splitAt.length));

  const allocSizes: number[] = [];
  const got: Msg[] = [];
  const fromAlloc = new Set<ArrayBufferLike>();
  let client: Socket | undefined;
  let serverSide: Socket | undefined;
  const srv = createServer();
  t.after(() => {
    client?.destroy();
    serverSide?.destroy();
    srv.close();
  });
  const consumed = new Promise<void>((resolve, reject) => {
    srv.on('connection', (accepted) => {
      const s = adoptSocket(accepted);
      serverSide = s;
      const rx = new RecvQueue(2 << 20);
      rx.attach(s);
      const alloc = (n: number) => {
        allocSizes.push(n);
        const b = Buffer.allocUnsafeSlow(n);
        fromAlloc.add(b.buffer);
        return b;
      };
      assert.equal(rx.direct(s, HDR, { of: writePayload, alloc }), true);
      void (async () => {
        while (got.length < sent.length) {
          const h = rx.tryRead(HDR) ?? (await rx.read(HDR));
          const m: Msg = { type: h.readUInt16BE(6), cookie: h.readUInt32BE(12), length: h.readUInt32BE(24) };
          if (m.type === NBD_CMD_WRITE) {
            if (m.cookie >= 1000) {
              // Late, so that what follows the payload is queued by the time it is skipped.
              await new Promise((r) => setTimeout(r, 5));
              await rx.skip(m.length);
              m.payload = 'skipped';
            } else {
              const p = rx.tryRead(m.length, alloc) ?? (await rx.read(m.length, alloc));
              assert.ok(fromAlloc.has(p.buffer), `payload of request ${m.cookie} is not from alloc`);
              m.payload = sha(p);
              // The consumer may scribble on its payload (the crypt target encrypts in place).
              p.fill(0xee);
            }
          }
          got.push(m);
          // Now and then the consumer is slow, so reads queue up behind it.
          if (m.cookie % 4 === 0) await new Promise((r) => setImmediate(r));
        }
      })().then(resolve, reject);
    });
  });
  await new Promise<void>((resolve) => srv.listen(path, resolve));
  client = connect(path);
  await new Promise<void>((resolve, reject) => {
    client!.once('connect', resolve);
    client!.once('error', reject);
  });
  const send = async () => {
    client!.write(head);
    // The rest in pieces of 5000 bytes: headers split, payloads arrive in many reads.
    for (let at = 0; at < tail.length; at += 5000) {
      await new Promise<void>((resolve) => client!.write(tail.subarray(at, at + 5000), () => resolve()));
      await new Promise((r) => setImmediate(r));
    }
  };
  let timer: NodeJS.Timeout | undefined;
  try {
    // A consumer that loses its place stops taking bytes, and then the sender waits too: one deadline for both.
    await Promise.race([
      Promise.all([consumed, send()]),
      new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error(`consumer stuck after ${got.length} of ${sent.length}`)), 60_000);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
  assert.deepEqual(got, sent);
  // Header and payload in one buffer: the payload 64 bytes in (recv.ts SPEC_HEADROOM_BYTES).
  assert.ok(
    allocSizes.some((n) => n === (256 << 10) + 64),
    `no header was read together with its payload (alloc sizes ${[...new Set(allocSizes)].join(' ')})`,
  );
});
