// The file backend's inline (synchronous pread/pwrite) path for small requests on memory-backed
// files: the same bytes as the thread-pool path, the same errors, and larger requests still correct.
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { fileTempDir } from '../helpers/tmp.js';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { byteStream } from '../helpers/prng.js';
import { FileDevice } from '../../src/blockdev/file.js';

// tmpfs when the machine has it (the default turns inline I/O on there), else the usual tmpdir.
const dir = fileTempDir('cryptmap-file-inline-', existsSync('/dev/shm') ? '/dev/shm' : tmpdir());

/** Deterministic bytes (xorshift32's low byte each). */
const pattern = (n: number, seed: number): Buffer => byteStream(seed)(n);

test('inline and thread-pool I/O see the same bytes, for sizes around the 64 KiB inline limit', async () => {
  const p = join(dir, 'a.img');
  const size = 4 << 20;
  const inline = await FileDevice.create(p, size, { inlineIo: true });
  const pooled = await FileDevice.open(p, { inlineIo: false });
  const auto = await FileDevice.open(p);
  const expect = Buffer.alloc(size);
  const sizes = [512, 4096, 65024, 65536, 66048, 262144];
  let seed = 1;
  for (const [i, n] of sizes.entries()) {
    for (const [writer, reader] of [
      [inline, pooled],
      [pooled, inline],
      [auto, inline],
    ] as const) {
      const off = ((seed * 7919) % Math.floor((size - n) / 512)) * 512;
      const data = pattern(n, seed++);
      await writer.write(off, data, i % 2 === 0 ? { fua: true } : undefined);
      data.copy(expect, off);
      const back = Buffer.alloc(n);
      await reader.read(off, back);
      assert.ok(back.equals(data), `${n} bytes at ${off}`);
    }
  }
  // Concurrent small and large requests on both paths.
  const ops: Promise<void>[] = [];
  for (let k = 0; k < 32; k++) {
    const n = k % 4 === 0 ? 131072 : 4096;
    const off = k * 131072;
    const data = pattern(n, 1000 + k);
    data.copy(expect, off);
    ops.push((k % 2 === 0 ? inline : pooled).write(off, data));
  }
  await Promise.all(ops);
  const whole = Buffer.alloc(size);
  await auto.read(0, whole);
  assert.ok(whole.equals(expect));
  await inline.close();
  await pooled.close();
  await auto.close();
  assert.ok(readFileSync(p).equals(expect));
});

test('inline I/O keeps the range, read-only and closed checks', async () => {
  const p = join(dir, 'b.img');
  const dev = await FileDevice.create(p, 65536, { inlineIo: true });
  await assert.rejects(dev.read(65024, Buffer.alloc(1024)), { code: 'ERANGE', errno: 'EINVAL' });
  await assert.rejects(dev.write(65024, Buffer.alloc(1024)), { code: 'ERANGE', errno: 'ENOSPC' });
  const ro = await FileDevice.open(p, { readOnly: true, inlineIo: true });
  await assert.rejects(ro.write(0, Buffer.alloc(512)), { code: 'EROFS' });
  await ro.read(0, Buffer.alloc(512));
  await ro.close();
  await dev.close();
  await assert.rejects(dev.read(0, Buffer.alloc(512)), { code: 'ECLOSED' });
  await assert.rejects(dev.write(0, Buffer.alloc(512)), { code: 'ECLOSED' });
});
