/**
 * The built-in FUSE export (daemon/fuse-export.ts, native/fuse-export.c) on the real path, as root:
 * a LUKS2 volume attached `--via fuse` (FUSE file + loop with direct I/O), mkfs.ext4, mount, fio with
 * crc32c verify, fsync reaching the backing file, luksSuspend blocking requests, close refused while
 * mounted, bad requests on the FUSE file, and a non-crypt table served through the JS route.
 * The crash path (kill -9, restart, remount) is in fuse-crash.interop.test.ts.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdirSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { mustRun } from '../helpers/tools.js';
import { prepareLuks } from '../../src/activate/mapping.js';
import type { DaemonCore } from '../../src/daemon/core.js';
import { bestVia } from '../../src/daemon/fuse-export.js';
import { Secret } from '../../src/util/secret.js';
import { coreWithLuks2, MiB, PASS, plainMapping } from './fixtures.js';

let dir: string;
let core: DaemonCore;
let img: string;

/** Run a tool that must succeed; its stdout. */
const sh = (cmd: string, args: string[], timeoutMs = 120_000) => mustRun(cmd, args, { timeoutMs });

before(async () => {
  assert.equal(process.getuid?.(), 0, 'the FUSE export tests run as root (mount(2), losetup)');
  ({ dir, core, img } = await coreWithLuks2('cm-fuse-', 66 * MiB));
  await core.listen();
});

after(async () => {
  await sh('umount', [join(dir, 'mnt')]).catch(() => undefined);
  await core.shutdown();
  rmSync(dir, { recursive: true, force: true });
});

test('auto picks the kernel nbd client where the module exists, else the FUSE export (root)', () => {
  assert.equal(bestVia('/nonexistent-sys'), 'fuse');
});

test('a LUKS2 volume attached via fuse: ext4, fio verify, fsync reaches the file, direct route, suspend blocks, close refused while mounted', async () => {
  const { mapping, volumeKey } = await prepareLuks({ name: 'fx', device: img, passphrase: PASS });
  await core.openVolume(mapping, volumeKey);
  volumeKey.dispose();
  const info = await core.attach('fx', { via: 'fuse' });
  assert.match(info.devicePath, /^\/dev\/loop[0-9]+$/);
  assert.equal(core.statusOf('fx').attachedVia, 'fuse');
  const loop = info.devicePath.slice('/dev/'.length);
  assert.equal(readFileSync(`/sys/block/${loop}/loop/dio`, 'utf8').trim(), '1', 'loop uses direct I/O');
  assert.equal(core.fuseStats('fx')?.directOn, true, 'crypt over a file takes the direct route');

  const mnt = join(dir, 'mnt');
  mkdirSync(mnt, { recursive: true });
  await sh('mkfs.ext4', ['-q', '-F', info.devicePath]);
  await sh('mount', [info.devicePath, mnt]);
  const data = randomBytes(3 * MiB);
  try {
    await sh('fio', [
      '--name=verify',
      `--filename=${join(mnt, 'fio.dat')}`,
      '--size=24M',
      '--bs=256k',
      '--rw=randwrite',
      '--direct=1',
      '--ioengine=libaio',
      '--iodepth=8',
      '--verify=crc32c',
      '--do_verify=1',
      '--end_fsync=1',
    ]);
    writeFileSync(join(mnt, 'a.bin'), data);
    const before = core.fuseStats('fx')!;
    await sh('sync', ['-f', join(mnt, 'a.bin')]);
    const afterSync = core.fuseStats('fx')!;
    assert.ok(afterSync.fsync > before.fsync, 'fsync on ext4 reaches the FUSE export as FSYNC');
    assert.ok(afterSync.direct > 100, `requests ran on the direct route (${afterSync.direct})`);

    // luksSuspend: new requests wait until luksResume.
    await core.suspendVolume('fx');
    assert.equal(core.fuseStats('fx')?.directOn, false);
    let done = false;
    const reader = sh('dd', [
      `if=${info.devicePath}`,
      'of=/dev/null',
      'bs=4096',
      'count=1',
      'skip=777',
      'iflag=direct',
    ]).then(() => {
      done = true;
    });
    await new Promise((r) => setTimeout(r, 400));
    assert.equal(done, false, 'a read waits while the volume is suspended');
    const { volumeKey: k2 } = await prepareLuks({ name: 'fx', device: img, passphrase: PASS });
    await core.resumeVolume('fx', k2);
    k2.dispose();
    await reader;
    assert.equal(core.fuseStats('fx')?.directOn, true, 'the direct route is back after resume');

    await assert.rejects(core.closeVolume('fx'), /is mounted on/);
    await assert.rejects(core.detach('fx'), /unmount it first/);
    assert.ok(readFileSync(join(mnt, 'a.bin')).equals(data));
  } finally {
    await sh('umount', [mnt]);
  }
  // Remount: the file system and its data are intact.
  await sh('mount', ['-o', 'ro', info.devicePath, mnt]);
  try {
    assert.ok(readFileSync(join(mnt, 'a.bin')).equals(data));
  } finally {
    await sh('umount', [mnt]);
  }
  await core.detach('fx');
  assert.equal(core.statusOf('fx').attachedDevice, undefined);
  assert.ok(!readFileSync('/proc/self/mounts', 'utf8').includes(info.fuseDir!), 'the FUSE mount is gone');
  await core.closeVolume('fx');
});

test('bad requests on the FUSE file: unaligned or past the end get EINVAL; reads at the end give 0 bytes', async () => {
  const { mapping, volumeKey } = await prepareLuks({ name: 'fy', device: img, passphrase: PASS });
  await core.openVolume(mapping, volumeKey);
  volumeKey.dispose();
  // Attach, then drop the loop device so the test can use the FUSE file itself.
  const info = await core.attach('fy', { via: 'fuse' });
  const file = join(info.fuseDir!, 'mnt', 'disk');
  await sh('losetup', ['-d', info.devicePath]);
  const size = core.registry.get('fy').sizeBytes;
  const fh = await open(file, 'r+');
  try {
    const buf = Buffer.alloc(8192);
    await assert.rejects(fh.read(buf, 0, 4096, 100), { code: 'EINVAL' });
    await assert.rejects(fh.write(buf, 0, 4096, size), { code: 'EINVAL' });
    await assert.rejects(fh.write(buf, 0, 8192, size - 4096), { code: 'EINVAL' });
    assert.equal((await fh.read(buf, 0, 4096, size)).bytesRead, 0);
    assert.equal((await fh.read(buf, 0, 8192, size - 4096)).bytesRead, 4096);
    const pattern = randomBytes(4096);
    await fh.write(pattern, 0, 4096, 8192);
    await fh.sync();
    const back = Buffer.alloc(4096);
    await fh.read(back, 0, 4096, 8192);
    assert.ok(back.equals(pattern));
    const viaDm = Buffer.alloc(4096);
    await core.registry.get('fy').read(8192, viaDm);
    assert.ok(viaDm.equals(pattern), 'what the FUSE file holds is what the mapped device holds');
  } finally {
    await fh.close();
  }
  await core.detach('fy');
  await core.closeVolume('fy');
});

test('a non-crypt table (linear over a file) is served through the mapped device (JS route)', async () => {
  const backing = join(dir, 'plain.img');
  const content = randomBytes(8 * MiB);
  writeFileSync(backing, content);
  await core.dm().create('lin', { table: `0 ${(8 * MiB) / 512} linear ${backing} 0` });
  const info = await core.attach('lin', { via: 'fuse' });
  assert.equal(core.fuseStats('lin')?.directOn, false);
  const out = join(dir, 'read.bin');
  await sh('dd', [`if=${info.devicePath}`, `of=${out}`, 'bs=1M', 'iflag=direct']);
  assert.ok(readFileSync(out).equals(content));
  const patch = randomBytes(MiB);
  writeFileSync(join(dir, 'patch.bin'), patch);
  await sh('dd', [
    `if=${join(dir, 'patch.bin')}`,
    `of=${info.devicePath}`,
    'bs=1M',
    'seek=3',
    'oflag=direct',
    'conv=fsync',
  ]);
  assert.ok(
    readFileSync(backing)
      .subarray(3 * MiB, 4 * MiB)
      .equals(patch),
  );
  assert.ok((core.fuseStats('lin')?.js ?? 0) > 8, 'requests went through the JS route');
  await core.detach('lin');
  await core.dm().remove('lin');
});

test('a full backing file system gives ENOSPC to the writer; a read-only attachment refuses writes', async () => {
  const small = join(dir, 'small');
  mkdirSync(small);
  await sh('mount', ['-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', small]);
  try {
    const backing = join(small, 'disk.img');
    writeFileSync(backing, Buffer.alloc(0));
    truncateSync(backing, 16 * MiB); // sparse: more than the file system holds
    const m = plainMapping(dir, { name: 'full', device: backing, sizeSectors: (16 * MiB) / 512 });
    await core.openVolume(m, new Secret(randomBytes(64)));
    const info = await core.attach('full', { via: 'fuse' });
    assert.equal(core.fuseStats('full')?.directOn, true);
    const r = await sh('dd', ['if=/dev/zero', `of=${info.devicePath}`, 'bs=1M', 'count=12', 'oflag=direct']).then(
      () => '',
      (e: Error) => e.message,
    );
    assert.match(r, /No space left on device/);
    await core.detach('full');
    const ro = await core.attach('full', { via: 'fuse', readOnly: true });
    const w = await sh('dd', ['if=/dev/zero', `of=${ro.devicePath}`, 'bs=4096', 'count=1', 'oflag=direct']).then(
      () => '',
      (e: Error) => e.message,
    );
    assert.match(w, /Operation not permitted|Read-only file system|Permission denied/);
    await assert.rejects(open(join(ro.fuseDir!, 'mnt', 'disk'), 'r+'), { code: 'EROFS' });
    await core.detach('full');
    await core.closeVolume('full');
  } finally {
    await sh('umount', [small]);
  }
});

test('resize: the FUSE file and the loop device on it follow the volume', async () => {
  const { mapping, volumeKey } = await prepareLuks({ name: 'fr', device: img, passphrase: PASS });
  await core.openVolume(mapping, volumeKey);
  const info = await core.attach('fr', { via: 'fuse' });
  const loopSize = () => Number(readFileSync(`/sys/block/${info.devicePath.slice(5)}/size`, 'utf8').trim());
  assert.equal(loopSize(), mapping.sizeSectors);
  await core.resizeVolume('fr', mapping.sizeSectors - 8192, volumeKey);
  volumeKey.dispose();
  assert.equal(loopSize(), mapping.sizeSectors - 8192);
  assert.equal(core.fuseStats('fr')?.directOn, true);
  await core.detach('fr');
  await core.closeVolume('fr');
});
