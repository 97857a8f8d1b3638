// deviceView: calls reach the device; close() is the caller's and leaves the device open.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import { deviceView } from '../../src/blockdev/view.js';

test('a view forwards I/O and properties; its close runs the given function only', async () => {
  const dev = new MemoryDevice({ sizeBytes: 1 << 20 });
  let closes = 0;
  const view = deviceView(dev, async () => {
    closes++;
  });
  assert.equal(view.sizeBytes, dev.sizeBytes);
  assert.equal(view.capabilities, dev.capabilities);
  assert.equal(view.limits, dev.limits);
  await view.write(4096, Buffer.alloc(4096, 7));
  await view.writeZeroes(8192, 4096);
  await view.discard(0, 4096);
  await view.flush();
  assert.deepEqual(await view.blockStatus!(4096, 8192), await dev.blockStatus(4096, 8192));
  await view.close();
  assert.equal(closes, 1);
  const back = Buffer.alloc(4096);
  await dev.read(4096, back);
  assert.deepEqual(back, Buffer.alloc(4096, 7));
  await dev.close();
});

test('a view of a device without blockStatus has none', () => {
  const dev = new MemoryDevice({ sizeBytes: 4096 });
  const view = deviceView(
    {
      sizeBytes: 4096,
      capabilities: dev.capabilities,
      limits: dev.limits,
      read: (o, b) => dev.read(o, b),
      write: (o, d) => dev.write(o, d),
      flush: () => dev.flush(),
      discard: (o, n) => dev.discard(o, n),
      writeZeroes: (o, n) => dev.writeZeroes(o, n),
      close: () => dev.close(),
    },
    async () => {},
  );
  assert.equal(view.blockStatus, undefined);
});
