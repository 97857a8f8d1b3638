// Fault injection through the whole data path: a DeviceRegistry with the test-only `fault` target,
// mapped devices exported by a real NbdServer, raw NBD clients on the wire. Checks: an I/O error
// reaches the client as EIO on that request only (the connection and the other exports keep
// serving); a full device answers ENOSPC and loses nothing acknowledged; a failed flush (and a FUA
// write that cannot be made durable) is reported to the client, never swallowed.
import assert from 'node:assert/strict';
import { makeTempDir } from '../helpers/tmp.js';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import type { BlockDevice } from '../../src/blockdev/types.js';
import { NbdServer } from '../../src/nbd/server.js';
import { setLogSink } from '../../src/util/log.js';
import { recordFaults } from '../fuzz/harness.js';
import { type Fixture, openClient, type RawClient } from '../nbd/helpers.js';
import { FAULT_TARGETS } from './fault-target.js';
import { memRegistry, pattern } from './helpers.js';

const NBD_EIO = 5;
const NBD_ENOSPC = 28;
const CMD = { READ: 0, WRITE: 1, FLUSH: 3, WRITE_ZEROES: 6 } as const;
const FUA = 1;
const SECTORS = 16384; // 8 MiB

const { registry } = memRegistry({ a: 8 << 20, b: 8 << 20, c: 8 << 20, d: 8 << 20 }, { targets: FAULT_TARGETS });
const server = new NbdServer({});
const handles: BlockDevice[] = [];
const { dir, cleanup } = makeTempDir('cryptmap-fault-nbd-');
let fx: Fixture;

before(async () => {
  setLogSink(() => {});
  await registry.create('faulty', { table: `0 ${SECTORS} fault /mem/a 0` });
  await registry.create('good', { table: `0 ${SECTORS} linear /mem/b 0` });
  await registry.create('thin', { table: `0 ${SECTORS} fault /mem/c 0 capacity=64` });
  await registry.create('flaky', { table: `0 ${SECTORS} fault /mem/d 0 rate=0.25,7,fail` });
  for (const n of ['faulty', 'good', 'thin', 'flaky']) {
    const h = registry.open(n);
    handles.push(h);
    server.addExport(n, { device: h });
  }
  const sock = join(dir, 'nbd.sock');
  await server.listenUnix(sock);
  fx = { sock } as Fixture;
});

after(async () => {
  await server.close();
  for (const h of handles) await h.close();
  for (const n of ['faulty', 'good', 'thin', 'flaky']) await registry.remove(n, { force: true });
  cleanup();
  setLogSink((l) => process.stderr.write(`${l}\n`));
});

/** Send requests pipelined, collect replies by cookie (simple replies; READ payload read). */
async function batch(
  c: RawClient,
  reqs: { type: number; offset: number; length: number; flags?: number; data?: Buffer }[],
): Promise<Map<bigint, { error: number; data?: Buffer }>> {
  for (const [i, r] of reqs.entries())
    c.sendRequest(r.type, r.offset, r.length, {
      cookie: BigInt(i + 1),
      ...(r.flags ? { flags: r.flags } : {}),
      ...(r.data ? { data: r.data } : {}),
    });
  const out = new Map<bigint, { error: number; data?: Buffer }>();
  for (let k = 0; k < reqs.length; k++) {
    const rep = await c.readSimpleReply();
    const req = reqs[Number(rep.cookie) - 1];
    assert.ok(req, `reply for an unknown cookie ${rep.cookie}`);
    if (req.type === CMD.READ && rep.error === 0)
      out.set(rep.cookie, { error: 0, data: Buffer.from(await c.read(req.length)) });
    else out.set(rep.cookie, { error: rep.error });
  }
  return out;
}

async function message(name: string, ...words: string[]): Promise<void> {
  await registry.get(name).message(0, words);
}

test('an I/O error reaches the client as EIO on that request only; the connection and other exports keep serving', async () => {
  const c = await openClient(fx, 'faulty');
  const g = await openClient(fx, 'good');
  const data = pattern(4096, 1);
  let r = await batch(c, [{ type: CMD.WRITE, offset: 0, length: 4096, data }]);
  assert.equal(r.get(1n)?.error, 0);
  await message('faulty', 'bad=8+8'); // bytes 4096..8191
  r = await batch(c, [
    { type: CMD.READ, offset: 0, length: 4096 },
    { type: CMD.READ, offset: 4096, length: 4096 },
    { type: CMD.WRITE, offset: 4096, length: 512, data: Buffer.alloc(512, 1) },
    { type: CMD.READ, offset: 2048, length: 4096 }, // straddles the bad range
    { type: CMD.READ, offset: 8192, length: 4096 },
  ]);
  assert.equal(r.get(1n)?.error, 0);
  assert.deepEqual(r.get(1n)?.data, data);
  assert.equal(r.get(2n)?.error, NBD_EIO);
  assert.equal(r.get(3n)?.error, NBD_EIO);
  assert.equal(r.get(4n)?.error, NBD_EIO);
  assert.equal(r.get(5n)?.error, 0);
  // Other export, other connection: unaffected, even while the faulty one keeps failing.
  const gr = await batch(g, [
    { type: CMD.WRITE, offset: 4096, length: 4096, data },
    { type: CMD.READ, offset: 4096, length: 4096 },
    { type: CMD.FLUSH, offset: 0, length: 0 },
  ]);
  assert.deepEqual([gr.get(1n)?.error, gr.get(2n)?.error, gr.get(3n)?.error], [0, 0, 0]);
  assert.deepEqual(gr.get(2n)?.data, data);
  // Whole-device read failure, then recovery on the same connection.
  await message('faulty', 'fail_reads');
  r = await batch(c, [{ type: CMD.READ, offset: 65536, length: 512 }]);
  assert.equal(r.get(1n)?.error, NBD_EIO);
  await message('faulty', 'clear');
  r = await batch(c, [{ type: CMD.READ, offset: 4096, length: 4096 }]);
  assert.equal(r.get(1n)?.error, 0);
  recordFaults('nbd-eio', 5, 5);
  c.close();
  g.close();
});

test('a failed flush and an undurable FUA write are reported to the client, never swallowed', async () => {
  const c = await openClient(fx, 'faulty');
  await message('faulty', 'fail_flush');
  const data = pattern(4096, 2);
  const r = await batch(c, [
    { type: CMD.WRITE, offset: 0, length: 4096, data },
    { type: CMD.FLUSH, offset: 0, length: 0 },
    { type: CMD.WRITE, offset: 4096, length: 4096, data, flags: FUA },
    { type: CMD.WRITE_ZEROES, offset: 8192, length: 4096, flags: FUA },
  ]);
  assert.equal(r.get(1n)?.error, 0, 'a plain write is only in the cache: it succeeds');
  assert.equal(r.get(2n)?.error, NBD_EIO, 'the flush failed: the client must hear it');
  assert.equal(r.get(3n)?.error, NBD_EIO, 'a FUA write that could not be made durable must fail');
  assert.equal(r.get(4n)?.error, NBD_EIO, 'so must a FUA write-zeroes');
  await message('faulty', 'fail_flush', 'off');
  const ok = await batch(c, [{ type: CMD.FLUSH, offset: 0, length: 0 }]);
  assert.equal(ok.get(1n)?.error, 0);
  recordFaults('nbd-flush', 3, 3);
  c.close();
});

test('a full device answers ENOSPC and loses nothing acknowledged', async () => {
  const c = await openClient(fx, 'thin'); // 64 sectors = 8 grains of 4 KiB
  const blocks = Array.from({ length: 12 }, (_, i) => pattern(4096, 100 + i));
  const r = await batch(
    c,
    blocks.map((data, i) => ({ type: CMD.WRITE, offset: i * 65536, length: 4096, data })),
  );
  const acked = [...r.entries()].filter(([, v]) => v.error === 0).map(([k]) => Number(k) - 1);
  const refused = [...r.entries()].filter(([, v]) => v.error !== 0);
  assert.equal(acked.length, 8);
  assert.ok(
    refused.every(([, v]) => v.error === NBD_ENOSPC),
    'a full device answers ENOSPC',
  );
  const f = await batch(c, [{ type: CMD.FLUSH, offset: 0, length: 0 }]);
  assert.equal(f.get(1n)?.error, 0);
  // Rewrites of held space still work; every acknowledged block reads back.
  const rw = await batch(c, [
    { type: CMD.WRITE, offset: (acked[0] ?? 0) * 65536, length: 4096, data: blocks[acked[0] ?? 0] },
  ]);
  assert.equal(rw.get(1n)?.error, 0);
  const back = await batch(
    c,
    acked.map((i) => ({ type: CMD.READ, offset: i * 65536, length: 4096 })),
  );
  for (const [k, i] of acked.entries())
    assert.deepEqual(back.get(BigInt(k + 1))?.data, blocks[i], `acknowledged block ${i} lost`);
  recordFaults('nbd-enospc', refused.length, refused.length);
  c.close();
});

test('seeded write faults under a pipelined load: each request fails alone, acknowledged data is exact', async () => {
  const c = await openClient(fx, 'flaky');
  const model = new Map<number, Buffer>();
  let injected = 0;
  for (let round = 0; round < 8; round++) {
    const reqs = Array.from({ length: 16 }, (_, i) => ({
      type: CMD.WRITE,
      offset: ((round * 7 + i * 13) % 64) * 4096,
      length: 4096,
      data: pattern(4096, round * 100 + i),
    }));
    // Distinct offsets per batch so the model does not depend on completion order.
    const seen = new Set<number>();
    const uniq = reqs.filter((q) => !seen.has(q.offset) && seen.add(q.offset));
    const r = await batch(c, uniq);
    for (const [k, q] of uniq.entries()) {
      const e = r.get(BigInt(k + 1))?.error;
      if (e === 0) model.set(q.offset, q.data);
      else {
        assert.equal(e, NBD_EIO);
        injected++;
      }
    }
  }
  assert.ok(injected > 0, 'the seeded rate injected no fault');
  const offs = [...model.keys()];
  const back = await batch(
    c,
    offs.map((o) => ({ type: CMD.READ, offset: o, length: 4096 })),
  );
  for (const [k, o] of offs.entries())
    assert.deepEqual(back.get(BigInt(k + 1))?.data, model.get(o), `acknowledged write at ${o} not read back`);
  recordFaults('nbd-rate', injected, injected);
  c.close();
});
