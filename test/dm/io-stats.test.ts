/**
 * Per-device I/O accounting (dm/io-stats.ts): off until the registry's enableIoStats (what attaching
 * a metrics registry does), then requests, bytes, errors by code and latency per operation, for the
 * devices there were and the ones created later.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { memRegistry } from './helpers.js';

test('I/O accounting is off by default and counts once enabled, for existing and new devices', async () => {
  const { registry } = memRegistry({ a: 1 << 20, b: 1 << 20 });
  const a = await registry.create('a', { table: '0 2048 linear /mem/a 0' });
  const ha = registry.open('a');
  await ha.write(0, Buffer.alloc(4096, 1));
  assert.equal(a.ioStats, null, 'no accounting without a metrics registry');

  registry.enableIoStats();
  const sa = a.ioStats!;
  assert.ok(sa, 'the device that existed is accounted');
  await ha.write(0, Buffer.alloc(4096, 2));
  await ha.read(0, Buffer.alloc(8192));
  await ha.flush();
  await assert.rejects(ha.read(1 << 20, Buffer.alloc(512)));
  assert.equal(sa.ops.write.requests, 1);
  assert.equal(sa.ops.write.bytes, 4096);
  assert.equal(sa.ops.read.requests, 2);
  assert.equal(sa.ops.read.bytes, 8192, 'a failed request moves no bytes');
  assert.equal(sa.ops.read.errors, 1);
  assert.equal(sa.ops.flush.requests, 1);
  assert.equal(sa.ops.read.latency.count, 2);
  assert.equal(
    [...sa.errorsByCode.values()].reduce((x, y) => x + y, 0),
    1,
  );
  assert.equal(sa.inflight, 0);

  const b = await registry.create('b', { table: '0 2048 linear /mem/b 0' });
  assert.ok(b.ioStats, 'a device created later is accounted');
  assert.equal(a.enableIoStats(), sa, 'enabling again keeps the counts');
  await ha.close();
  await registry.closeAll();
});
