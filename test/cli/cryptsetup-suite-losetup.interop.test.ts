// The losetup the cryptsetup suite harness puts first on the upstream scripts' PATH
// (scripts/cryptsetup-suite/bin/losetup): numbers from a high range, a handed-out device removed while
// unbound (so the kernel's first free loop device is never one of them), and `-d` only for devices
// bound to a file of the run; another process's loop device is left alone.
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { testTempDir } from '../helpers/tmp.js';
import { exec, ok } from './harness.js';

const SHIM = fileURLToPath(new URL('../../../scripts/cryptsetup-suite/bin/losetup', import.meta.url));
const LOSETUP = '/usr/sbin/losetup';

function file(path: string): string {
  writeFileSync(path, '');
  truncateSync(path, 1 << 20);
  return path;
}
const backing = (dev: string) => {
  try {
    return readFileSync(`/sys/block/${dev.slice(5)}/loop/backing_file`, 'utf8').trim();
  } catch {
    return undefined;
  }
};

test('suite losetup: own range, re-created on bind, removed when unbound, never detaches a device of another process', async (t) => {
  const dir = testTempDir(t, 'cryptmap-cst-loop-');
  const run = join(dir, 'run');
  mkdirSync(run);
  const env = { ...process.env, CST_TMP: run, CST_LOOP_BASE: '700', CST_REAL_LOSETUP: LOSETUP };
  const shim = (args: string[]) =>
    exec(
      '/usr/bin/env',
      Object.entries(env)
        .map(([k, v]) => `${k}=${v}`)
        .concat(SHIM, args),
    );
  const mine: string[] = [];
  let other: string | undefined;
  t.after(async () => {
    for (const d of mine) if (backing(d)?.startsWith(run)) await exec(LOSETUP, ['-d', d]);
    if (other) await exec(LOSETUP, ['-d', other]);
  });

  // `-f`: a name from 700 up that no device has; nothing is created until the script binds it
  const f = await shim(['-f']);
  assert.equal(f.code, 0, f.stderr);
  const dev = f.stdout.trim();
  mine.push(dev);
  assert.match(dev, /^\/dev\/loop(\d+)$/);
  assert.ok(Number(dev.slice(9)) >= 700, dev);
  assert.equal(existsSync(`/sys/block/${dev.slice(5)}`), false);
  const a = file(join(run, 'a.img'));
  assert.equal((await shim([dev, a])).code, 0);
  assert.equal(backing(dev), a);

  // `-f --show FILE` (the harness's scsi_debug stand-in) gets another number, with its options
  const s = await shim(['--sector-size', '4096', '-f', '--show', file(join(run, 'b.img'))]);
  assert.equal(s.code, 0, s.stderr);
  const dev2 = s.stdout.trim();
  mine.push(dev2);
  assert.notEqual(dev2, dev);
  assert.equal((await ok('/usr/sbin/blockdev', ['--getss', dev2])).trim(), '4096');

  // another process's loop device (a file outside the run) is not detached, nor is -D obeyed
  other = (await ok(LOSETUP, ['-f', '--show', file(join(dir, 'outside.img'))])).trim();
  const r = await shim(['-d', other]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /refused: bound to a file outside this run/);
  assert.equal(backing(other), join(dir, 'outside.img'));
  assert.equal((await shim(['-D'])).code, 1);
  assert.equal(backing(other), join(dir, 'outside.img'));

  // detaching the run's device removes it (the kernel's first free device cannot hand it out), and
  // binding the same name again brings it back, as the scripts do block by block
  assert.equal((await shim(['-d', dev])).code, 0);
  assert.equal(existsSync(`/sys/block/${dev.slice(5)}`), false);
  assert.equal((await shim([dev, a])).code, 0);
  assert.equal(backing(dev), a);
  assert.equal((await shim(['-d', dev, dev2])).code, 0);
  assert.equal(backing(dev), undefined);
  assert.equal(backing(dev2), undefined);
});
