// The crypt target over a file: requests above 64 KiB go through the file's DirectIo (pread + decrypt,
// or encrypt + pwrite, in one crypt-thread job). The bytes on disk must be what the engine produces,
// for every request size on both sides of the threshold, scratch or not, FUA or not, and I/O errors
// must come back as the file device's typed errors.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { fileTempDir, makeTempDir } from '../helpers/tmp.js';
import { DeviceRegistry } from '../../src/dm/registry.js';
import { createSectorCipher } from '../../src/engine/index.js';
import type { SectorBytes } from '../../src/engine/index.js';
import { pattern, xtsKey } from './helpers.js';

const dir = fileTempDir('cryptmap-crypt-direct-');

const MiB = 1 << 20;
const OFFSET_SECTORS = 4096; // 2 MiB of "header" before the payload, as LUKS does

for (const sectorBytes of [512, 4096] as SectorBytes[]) {
  test(`file-backed crypt target (${sectorBytes}-byte sectors): on-disk bytes equal the engine's for small and large requests`, async () => {
    const key = xtsKey(sectorBytes);
    const file = join(dir, `img-${sectorBytes}`);
    writeFileSync(file, Buffer.alloc(8 * MiB, 0xee), { mode: 0o600 });
    const registry = new DeviceRegistry();
    const lenS = 6 * 2048;
    const opts = sectorBytes === 512 ? '' : ` 1 sector_size:${sectorBytes}`;
    await registry.create('c', {
      table: `0 ${lenS} crypt aes-xts-plain64 ${key.toString('hex')} 0 ${file} ${OFFSET_SECTORS}${opts}`,
    });
    const dev = registry.open('c');
    const plain = pattern(lenS * 512, 31);
    // 4 KiB (inline), 64 KiB (at the threshold), 64 KiB + one sector, 1 MiB and the rest: every path.
    const sizes = [4096, 65536, 65536 + 4096, MiB, 256 * 1024];
    let at = 0;
    for (const [i, n] of sizes.entries()) {
      const chunk = Buffer.from(plain.subarray(at, at + n));
      await dev.write(at, chunk, { scratch: i % 2 === 0, fua: i === 3 });
      if (i % 2 === 1)
        assert.ok(chunk.equals(plain.subarray(at, at + n)), 'without scratch the caller data is untouched');
      at += n;
    }
    await dev.write(at, Buffer.from(plain.subarray(at)), { scratch: true });
    const cipher = createSectorCipher({ spec: 'aes-xts-plain64', key, sectorBytes });
    const expected = Buffer.alloc(plain.length);
    cipher.encrypt(plain, 0n, expected);
    await dev.flush();
    const raw = readFileSync(file);
    assert.ok(
      raw.subarray(OFFSET_SECTORS * 512, OFFSET_SECTORS * 512 + plain.length).equals(expected),
      'ciphertext on disk',
    );
    assert.ok(
      raw.subarray(0, OFFSET_SECTORS * 512).equals(Buffer.alloc(OFFSET_SECTORS * 512, 0xee)),
      'bytes before the payload untouched',
    );
    // Read back with the same mix of sizes, and at an unaligned-to-request (but sector-aligned) offset.
    for (const n of [4096, 65536, 65536 + 4096, MiB, 2 * MiB]) {
      const o = 3 * sectorBytes * 8;
      const back = Buffer.alloc(n);
      await dev.read(o, back);
      assert.ok(back.equals(plain.subarray(o, o + n)), `read of ${n} bytes`);
    }
    cipher.dispose();
    await dev.close();
    await registry.closeAll();
  });
}

test('file-backed crypt target: a file shrunk under it gives a typed short-I/O error on large reads, and the device still works', async () => {
  const key = xtsKey(9);
  const file = join(dir, 'shrunk');
  writeFileSync(file, Buffer.alloc(4 * MiB), { mode: 0o600 });
  const registry = new DeviceRegistry();
  await registry.create('s', { table: `0 8192 crypt aes-xts-plain64 ${key.toString('hex')} 0 ${file} 0` });
  const dev = registry.open('s');
  truncateSync(file, 2 * MiB);
  await assert.rejects(dev.read(3 * MiB, Buffer.alloc(MiB)), (e: Error & { code?: string }) => {
    assert.equal(e.code, 'ESHORTIO');
    assert.match(e.message, /end of file/);
    return true;
  });
  const back = Buffer.alloc(MiB);
  await dev.write(0, Buffer.alloc(MiB, 7));
  await dev.read(0, back);
  assert.ok(back.equals(Buffer.alloc(MiB, 7)));
  await dev.close();
  await registry.closeAll();
});

const isRoot = process.getuid?.() === 0;

test('file-backed crypt target on a full file system: a large write fails with a typed ENOSPC error, written data stays readable', {
  skip: !isRoot && !process.env.CI ? 'needs root to mount a small tmpfs' : false,
}, async () => {
  const { dir: mnt, cleanup: removeMnt } = makeTempDir('cryptmap-full-');
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=2m,mode=0700', 'tmpfs', mnt]);
  try {
    // A sparse 8 MiB file on a 2 MiB file system: writes past about 2 MiB cannot be allocated.
    const file = join(mnt, 'sparse.img');
    writeFileSync(file, '', { mode: 0o600 });
    truncateSync(file, 8 * MiB);
    const key = xtsKey(10);
    const registry = new DeviceRegistry();
    await registry.create('f', { table: `0 16384 crypt aes-xts-plain64 ${key.toString('hex')} 0 ${file} 0` });
    const dev = registry.open('f');
    const first = pattern(MiB, 41);
    await dev.write(0, Buffer.from(first), { scratch: true });
    await assert.rejects(
      dev.write(MiB, pattern(4 * MiB, 42), { scratch: true }),
      (e: Error & { code?: string; errno?: string }) => {
        assert.equal(e.code, 'EWRITE');
        assert.equal(e.errno, 'ENOSPC');
        assert.match(e.message, /write of 4194304 bytes at 1048576 to .*sparse\.img failed/);
        return true;
      },
    );
    const back = Buffer.alloc(MiB);
    await dev.read(0, back);
    assert.ok(back.equals(first), 'what was written before the failure reads back');
    await dev.close();
    await registry.closeAll();
  } finally {
    execFileSync('umount', [mnt]);
    removeMnt();
  }
});
