/**
 * A daemon killed with SIGKILL while its volume is attached via the built-in FUSE export: the FUSE
 * file then fails with ENOTCONN (no hang), and after a restart `attach` cleans the dead mount and loop
 * device; the file system mounts again with every file that was fsync'ed before the kill (fio
 * crc32c verify of a file written and fsync'ed before the kill).
 */
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, readdirSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { runTool } from '../helpers/tools.js';
import { makeTempDir } from '../helpers/tmp.js';
import { cliOk, startDaemon } from '../load/helpers.js';
import { FAST_LUKS2_FORMAT } from '../helpers/luks.js';

const MiB = 1 << 20;
const { dir, cleanup } = makeTempDir('cm-fusecrash-');

async function sh(cmd: string, args: string[], timeoutMs = 120_000): Promise<{ code: number; out: string }> {
  const r = await runTool(cmd, args, { timeoutMs });
  return { code: r.code, out: r.stdout + r.stderr };
}
async function ok(cmd: string, args: string[]): Promise<string> {
  const r = await sh(cmd, args);
  assert.equal(r.code, 0, `${cmd} ${args.join(' ')}: ${r.out}`);
  return r.out;
}

after(async () => {
  await sh('umount', ['-l', join(dir, 'mnt')]);
  cleanup();
});

const fioJob = (mnt: string, verifyOnly: boolean) => [
  '--name=crash',
  `--filename=${join(mnt, 'fio.dat')}`,
  '--size=16M',
  '--bs=64k',
  '--rw=write',
  '--direct=1',
  '--ioengine=libaio',
  '--iodepth=4',
  '--verify=crc32c',
  '--verify_state_save=0',
  ...(verifyOnly ? ['--verify_only'] : ['--do_verify=0', '--end_fsync=1']),
];

test('kill -9 of the daemon: ENOTCONN, not a hang; restart, attach cleans the dead mount and loop, files intact', async () => {
  assert.equal(process.getuid?.(), 0, 'runs as root');
  const run = join(dir, 'run');
  const img = join(dir, 'v.img');
  const key = join(dir, 'key');
  const mnt = join(dir, 'mnt');
  mkdirSync(mnt);
  writeFileSync(key, 'crash test passphrase', { mode: 0o600 });
  writeFileSync(img, '');
  truncateSync(img, 48 * MiB);
  await cliOk([...FAST_LUKS2_FORMAT, '--key-file', key, img]);

  let d = await startDaemon(run);
  await cliOk(['open', '--runtime-dir', run, '--key-file', key, img, 'cv']);
  const dev1 = (await cliOk(['attach', '--runtime-dir', run, '--via', 'fuse', 'cv'])).stdout.trim();
  assert.match(
    (await cliOk(['status', '--runtime-dir', run, 'cv'])).stdout,
    /attached: \/dev\/loop[0-9]+ \(via fuse\)/,
  );
  await ok('mkfs.ext4', ['-q', '-F', dev1]);
  await ok('mount', [dev1, mnt]);
  await ok('fio', fioJob(mnt, false));
  await ok('sync', ['-f', mnt]);

  await d.kill();
  const fuseDirs = readdirSync(join(run, 'attach')).filter((x) => x.startsWith('fuse-'));
  assert.equal(fuseDirs.length, 1);
  const dead = join(run, 'attach', fuseDirs[0]!, 'mnt', 'disk');
  const r = await sh('dd', [`if=${dead}`, 'of=/dev/null', 'bs=4096', 'count=1'], 20_000);
  assert.notEqual(r.code, 0);
  assert.match(r.out, /Transport endpoint is not connected|Input\/output error/);
  // The service's file system gets errors, not a hang; it can be unmounted.
  await sh('umount', [mnt], 30_000).then((x) => (x.code === 0 ? x : sh('umount', ['-l', mnt])));

  d = await startDaemon(run);
  try {
    await cliOk(['open', '--runtime-dir', run, '--key-file', key, img, 'cv']);
    const dev2 = (await cliOk(['attach', '--runtime-dir', run, '--via', 'fuse', 'cv'])).stdout.trim();
    assert.ok(!existsSync(join(run, 'attach', fuseDirs[0]!)), 'the dead export directory was cleaned');
    await ok('e2fsck', ['-f', '-p', dev2]).catch(() => ok('e2fsck', ['-f', '-n', dev2]));
    await ok('mount', [dev2, mnt]);
    await ok('fio', fioJob(mnt, true));
    await ok('umount', [mnt]);
    await cliOk(['close', '--runtime-dir', run, 'cv']);
  } finally {
    await d.stop();
  }
});
