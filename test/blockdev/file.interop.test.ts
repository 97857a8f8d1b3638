// The file backend over a real block device: a loop device (package mount, `losetup`) over a file.
// The size comes from /sys/dev/block/MAJ:MIN/size; the dm registry resolves `MAJ:MIN` to it.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { testTempDir } from '../helpers/tmp.js';
import { FileDevice } from '../../src/blockdev/file.js';
import { DeviceRegistry } from '../../src/dm/registry.js';

function losetup(args: string[]): string {
  const r = spawnSync('losetup', args, { encoding: 'utf8' });
  if (r.error && (r.error as NodeJS.ErrnoException).code === 'ENOENT')
    assert.fail('losetup not found: install the Debian package mount');
  assert.equal(r.status, 0, `losetup ${args.join(' ')} failed: ${r.stderr}`);
  return r.stdout.trim();
}

test('a loop device opens as a block device with its size from sysfs', async (t) => {
  const dir = testTempDir(t, 'cryptmap-loop-');
  const img = join(dir, 'disk.img');
  const data = Buffer.alloc(3 << 20);
  for (let i = 0; i < data.length; i += 512) data.writeUInt32LE(i / 512, i);
  writeFileSync(img, data, { mode: 0o600 });
  const loop = losetup(['-f', '--show', img]);
  try {
    const dev = await FileDevice.open(loop);
    assert.equal(dev.isBlockDevice, true);
    assert.equal(dev.sizeBytes, 3 << 20);
    assert.equal(dev.capabilities.discard, false);
    const b = Buffer.alloc(4096);
    await dev.read(1 << 20, b);
    assert.ok(b.equals(data.subarray(1 << 20, (1 << 20) + 4096)));
    await dev.write(0, Buffer.alloc(4096, 0xee), { fua: true });
    await dev.close();
    assert.ok(readFileSync(img).subarray(0, 4096).equals(Buffer.alloc(4096, 0xee)));

    const rdev = statSync(loop).rdev;
    const majMin = `${Math.floor(rdev / 256) & 0xfff}:${(rdev & 0xff) | ((rdev >> 12) & 0xfff00)}`;
    const registry = new DeviceRegistry();
    await registry.create('onloop', { table: `0 2048 linear ${majMin} 2048` });
    const m = registry.open('onloop');
    const c = Buffer.alloc(512);
    await m.read(512, c);
    assert.equal(c.readUInt32LE(0), 2049);
    await m.close();
    await assert.rejects(
      registry.create('toobig', { table: `0 8192 linear ${loop} 0` }),
      /is too small: it has 6144 sectors, the target needs 8192/,
    );
    await registry.closeAll();
  } finally {
    losetup(['-d', loop]);
  }
});
