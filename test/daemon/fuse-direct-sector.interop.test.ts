/**
 * The FUSE export's direct route (native/fuse-export.c fuseSetDirect) takes only a key whose sector
 * fits whole in the export's block: with 4096-byte crypt sectors under a 512-byte export block, a
 * 512-byte WRITE holds no whole crypt sector and would be written to the backing file unencrypted.
 * Such a route is refused and the request goes through the JS path (the mapped device). Root.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { testTempDir } from '../helpers/tmp.js';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import { FuseExport } from '../../src/daemon/fuse-export.js';
import { plainMapping } from './fixtures.js';

test('a 4096-byte crypt sector under a 512-byte FUSE block: no direct route, a 512-byte write never reaches the file as plaintext', async (t) => {
  assert.equal(process.getuid?.(), 0, 'the FUSE export tests run as root (mount(2))');
  const dir = testTempDir(t, 'cm-fuse-sector-');
  const mnt = join(dir, 'mnt');
  mkdirSync(mnt);
  const backing = join(dir, 'disk.img');
  writeFileSync(backing, Buffer.alloc(1 << 20));
  const dev = new MemoryDevice({ sizeBytes: 1 << 20, logicalBlockBytes: 512 });
  const exp = FuseExport.start(dev, mnt);
  try {
    const on = exp.directOn(plainMapping(dir, { device: backing, sectorBytes: 4096 }), randomBytes(64));
    assert.equal(on, false, 'the direct route was taken with a key sector larger than the export block');
    assert.equal(exp.stats().directOn, false);
    const plain = Buffer.alloc(512, 0x5a);
    const fh = await open(exp.filePath, 'r+');
    try {
      await fh.write(plain, 0, 512, 0);
    } finally {
      await fh.close();
    }
    assert.ok(!readFileSync(backing).includes(plain), 'the plaintext reached the backing file');
    const back = Buffer.alloc(512);
    await dev.read(0, back);
    assert.deepEqual(back, plain, 'the write went through the mapped device');
    // The route of a key that fits is still taken.
    assert.equal(exp.directOn(plainMapping(dir, { device: backing, sectorBytes: 512 }), randomBytes(64)), true);
  } finally {
    await exp.stop();
  }
});
