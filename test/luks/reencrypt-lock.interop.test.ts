// cryptsetup's reencryption lock (src/luks/reencrypt-lock.ts): flock on
// /run/cryptsetup/LN_LUKS2-reencryption-<UUID>. cryptsetup 2.6 is the oracle: while it holds the lock
// (a running resume, stopped with SIGSTOP, or util-linux flock on the same file) cryptmap refuses with
// its message and exit code, and while cryptmap holds it cryptsetup refuses; either finishes after.
// The lock directory's trust rule, a hostile UUID, and the CLI's device lock reading main()'s env.
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import {
  chmodSync,
  chownSync,
  existsSync,
  mkdirSync,
  readFileSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { dirname, join } from 'node:path';
import { Readable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { test } from 'node:test';
import { main } from '../../src/cli/main.js';
import { createSectorCipher } from '../../src/engine/index.js';
import { reencryptLockPath, takeReencryptLock } from '../../src/luks/index.js';
import { CryptmapError } from '../../src/util/errors.js';
import { FAST_LUKS2_FORMAT, FAST_PBKDF } from '../helpers/luks.js';
import { Sink } from './helpers.js';
import { cryptsetupSync, type CryptsetupResult } from '../helpers/tools.js';
import { fileTempDir } from '../helpers/tmp.js';

const CLI = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..', 'bin', 'cryptmap.js');
/** A new keyslot slow enough to open that a resume holds the lock for a while (any speed works). */
const SLOW = ['--pbkdf', 'pbkdf2', '--pbkdf-force-iterations', '1500000'];

const dir = fileTempDir('cm-reenc-lock-');

function env(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  return { ...process.env, CRYPTMAP_LOCK_DIR: join(dir, 'locks'), ...extra };
}

async function cm(argv: string[], e: NodeJS.ProcessEnv = env()): Promise<{ code: number; err: string }> {
  const err = new Sink();
  const code = await main(argv, {
    stdin: Readable.from([]) as unknown as NodeJS.ReadableStream,
    stdout: new Sink(),
    stderr: err,
    env: e,
  });
  return { code, err: err.data };
}

function cs(...args: string[]): CryptsetupResult {
  return cryptsetupSync(args);
}

/** A LUKS2 image (cryptsetup) with 8 MiB of random data, its reencryption initialised by cryptsetup. */
function initialised(
  name: string,
  newKdf: readonly string[] = FAST_PBKDF,
): { img: string; key: string; uuid: string; plain: Buffer } {
  const img = join(dir, name);
  const key = join(dir, `${name}.key`);
  writeFileSync(key, 'lock pass', { mode: 0o600 });
  writeFileSync(img, Buffer.concat([Buffer.alloc(16 << 20), randomBytes(8 << 20)]));
  const f = cs(...FAST_LUKS2_FORMAT, '--key-file', key, img);
  assert.equal(f.status, 0, f.out);
  const plain = plainOf(img, key);
  const i = cs('reencrypt', '--init-only', '-q', ...newKdf, '--key-file', key, img);
  assert.equal(i.status, 0, i.out);
  const uuid = cs('luksUUID', img).out.trim();
  return { img, key, uuid, plain };
}

/** The plaintext of the image through the volume key cryptsetup dumps (one data segment). */
function plainOf(img: string, key: string): Buffer {
  const d = cs('luksDump', '--dump-volume-key', '-q', '--key-file', key, img).out;
  const m = /MK dump:\t([\s\S]*)$/.exec(d);
  assert.ok(m, d);
  const seg = cs('luksDump', img).out;
  const ss = Number(/sector: (\d+) \[bytes\]/.exec(seg)?.[1] ?? 512);
  const b = Buffer.from(readFileSync(img).subarray(16 << 20));
  const c = createSectorCipher({
    spec: 'aes-xts-plain64',
    key: Buffer.from(m[1]!.replace(/\s/g, ''), 'hex'),
    sectorBytes: ss as 512,
  });
  c.decrypt(b, 0n);
  c.dispose();
  return b;
}

function finished(img: string): boolean {
  return !/online-reencrypt/.test(cs('luksDump', img).out);
}

/** True when process `pid` holds an flock on `file` (/proc/locks: "N: FLOCK ADVISORY WRITE pid maj:min:ino ..."). */
function holdsFlock(pid: number, file: string): boolean {
  const st = statSync(file, { throwIfNoEntry: false });
  if (!st) return false;
  return readFileSync('/proc/locks', 'utf8')
    .split('\n')
    .some((l) => {
      const f = l.trim().split(/\s+/);
      return f[1] === 'FLOCK' && f[4] === String(pid) && (f[5] ?? '').endsWith(`:${st.ino}`);
    });
}

/** Start `cmd`, wait (60 s at most) until it holds the lock file, then stop it with SIGSTOP. */
async function stoppedHolding(
  cmd: string,
  args: string[],
  file: string,
): Promise<{ child: ChildProcess; exited: Promise<{ code: number | null; err: string }> }> {
  const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'], env: env() });
  let err = '';
  child.stderr!.on('data', (d) => {
    err += String(d);
  });
  let ended = false;
  const exited = new Promise<{ code: number | null; err: string }>((r) =>
    child.once('exit', (code) => {
      ended = true;
      r({ code, err });
    }),
  );
  const deadline = Date.now() + 60_000;
  while (!ended && Date.now() < deadline && !holdsFlock(child.pid!, file)) await new Promise((r) => setTimeout(r, 10));
  if (ended || !holdsFlock(child.pid!, file)) {
    child.kill('SIGKILL');
    const r = await exited;
    assert.fail(`${cmd} never held ${file} (exit ${r.code}): ${r.err}`);
  }
  child.kill('SIGSTOP');
  return { child, exited };
}

async function resume(h: { child: ChildProcess; exited: Promise<{ code: number | null; err: string }> }) {
  h.child.kill('SIGCONT');
  const timer = setTimeout(() => h.child.kill('SIGKILL'), 300_000);
  try {
    return await h.exited;
  } finally {
    clearTimeout(timer);
  }
}

test('util-linux flock on the lock file: cryptmap refuses a resume as cryptsetup does (exit 5), then resumes', async () => {
  const { img, key, uuid, plain } = initialised('held.img');
  const file = reencryptLockPath(uuid);
  assert.equal(file, `/run/cryptsetup/LN_LUKS2-reencryption-${uuid}`);
  // `flock FILE -c` holds the lock until its stdin closes.
  const holder = spawn('flock', ['-x', file, '-c', 'echo held; read x'], { stdio: ['pipe', 'pipe', 'inherit'] });
  const gone = new Promise((r) => holder.once('exit', r));
  try {
    await new Promise<void>((res, rej) => {
      const t = setTimeout(() => rej(new Error('flock(1) did not take the lock within 30 s')), 30_000);
      holder.stdout!.once('data', () => {
        clearTimeout(t);
        res();
      });
      holder.once('error', (e) => {
        clearTimeout(t);
        rej(new Error(`flock(1) did not run (${e.message}): install util-linux`));
      });
    });
    const was = readFileSync(img);
    const c = cs('reencrypt', '--resume-only', '--force-offline-reencrypt', '-q', '--key-file', key, img);
    assert.equal(c.status, 5, c.out);
    assert.match(c.out, /Reencryption process is already running\./);
    const r = await cm(['reencrypt', '--force-offline-reencrypt', '--resume-only', '-q', '--key-file', key, img]);
    assert.equal(r.code, 5, r.err);
    assert.match(r.err, /Reencryption process is already running\./);
    assert.ok(readFileSync(img).equals(was), 'nothing written while refused');
  } finally {
    holder.stdin!.end();
    await gone;
  }
  const r = await cm(['reencrypt', '--force-offline-reencrypt', '--resume-only', '-q', '--key-file', key, img]);
  assert.equal(r.code, 0, r.err);
  assert.ok(finished(img));
  assert.ok(plainOf(img, key).equals(plain));
  assert.equal(existsSync(file), false, 'the lock file is removed on release, as cryptsetup does');
});

test('cryptsetup resuming (stopped while it holds the lock): cryptmap refuses with exit 5; cryptsetup then finishes', async () => {
  const { img, key, uuid, plain } = initialised('cs-running.img', SLOW);
  const file = reencryptLockPath(uuid);
  const h = await stoppedHolding(
    'cryptsetup',
    ['reencrypt', '--resume-only', '--force-offline-reencrypt', '-q', '--key-file', key, img],
    file,
  );
  try {
    const r = await cm(['reencrypt', '--force-offline-reencrypt', '--resume-only', '-q', '--key-file', key, img]);
    assert.equal(r.code, 5, r.err);
    assert.match(r.err, /Reencryption process is already running\./);
    const again = await cm(['reencrypt', '--force-offline-reencrypt', '-q', '--key-file', key, img]);
    assert.equal(again.code, 5, again.err);
  } finally {
    const done = await resume(h);
    assert.equal(done.code, 0, done.err);
  }
  assert.ok(finished(img));
  assert.ok(plainOf(img, key).equals(plain));
});

test('cryptmap resuming (stopped while it holds the lock): cryptsetup refuses with exit 5; cryptmap then finishes', async () => {
  const { img, key, uuid, plain } = initialised('cm-running.img', SLOW);
  const file = reencryptLockPath(uuid);
  const h = await stoppedHolding(
    process.execPath,
    [CLI, 'reencrypt', '--force-offline-reencrypt', '--resume-only', '-q', '--key-file', key, img],
    file,
  );
  try {
    const c = cs('reencrypt', '--resume-only', '--force-offline-reencrypt', '-q', '--key-file', key, img);
    assert.equal(c.status, 5, c.out);
    assert.match(c.out, /Reencryption process is already running\./);
  } finally {
    const done = await resume(h);
    assert.equal(done.code, 0, done.err);
  }
  assert.ok(finished(img));
  assert.ok(plainOf(img, key).equals(plain));
});

test('takeReencryptLock: one holder at a time in a process too, released lock is taken again, file removed', () => {
  const uuid = `0000${randomBytes(4).toString('hex')}-0000-4000-8000-000000000000`;
  const a = takeReencryptLock(uuid);
  try {
    assert.throws(
      () => takeReencryptLock(uuid),
      (e) => e instanceof CryptmapError && e.code === 'EBUSY' && e.exitCode === 5,
    );
    assert.equal(takeReencryptLock(uuid, { disabled: true }).path, undefined, '--disable-locks takes nothing');
  } finally {
    a.release();
    a.release();
  }
  assert.equal(existsSync(reencryptLockPath(uuid)), false);
  takeReencryptLock(uuid).release();
});

test('a header UUID that is not one name is refused (exit 1), nothing created', () => {
  for (const bad of ['../../etc/x', '', 'a/b', 'x'.repeat(41)])
    assert.throws(
      () => takeReencryptLock(bad),
      (e) => e instanceof CryptmapError && e.code === 'ELOCKDIR' && e.exitCode === 1,
      bad,
    );
});

test('the lock directory must be root-owned and not writable by others; a planted symlink is refused', () => {
  const uuid = '11111111-2222-4333-8444-555555555555';
  const refused = (d: string, why: RegExp) =>
    assert.throws(
      () => takeReencryptLock(uuid, { env: { CRYPTMAP_CRYPTSETUP_LOCK_DIR: d } }),
      (e) => e instanceof CryptmapError && e.code === 'ELOCKDIR' && why.test(e.message),
      d,
    );
  const open = join(dir, 'lk-open');
  mkdirSync(open);
  chmodSync(open, 0o777);
  refused(open, /writable by group or others/);
  const other = join(dir, 'lk-other');
  mkdirSync(other, { mode: 0o700 });
  chownSync(other, 65534, 65534);
  refused(other, /belongs to uid 65534/);
  const real = join(dir, 'lk-real');
  mkdirSync(real, { mode: 0o700 });
  const link = join(dir, 'lk-link');
  symlinkSync(real, link);
  refused(link, /symbolic link/);
  // A symlink where the lock file goes (O_NOFOLLOW), pointing at a file it would otherwise create.
  symlinkSync(join(dir, 'victim'), join(real, `LN_LUKS2-reencryption-${uuid}`));
  refused(real, /symbolic link/);
  assert.equal(existsSync(join(dir, 'victim')), false);
  // A missing directory is created 0700, as cryptsetup creates /run/cryptsetup.
  const fresh = join(dir, 'lk-fresh');
  const l = takeReencryptLock(uuid, { env: { CRYPTMAP_CRYPTSETUP_LOCK_DIR: fresh } });
  assert.equal(statSync(fresh).mode & 0o777, 0o700);
  l.release();
});

test('the CLI device lock lives where main() was told (its env, not process.env)', async () => {
  const { img, key } = initialised('envlock.img');
  const locks = join(dir, 'other-locks');
  mkdirSync(locks, { mode: 0o700 });
  const st = statSync(img);
  // A live owner (this process) holds cryptmap's lock of the image in that directory only.
  writeFileSync(join(locks, `L_${st.dev}_${st.ino}`), String(process.pid), { mode: 0o600 });
  const r = await cm(
    ['reencrypt', '--force-offline-reencrypt', '--resume-only', '-q', '--key-file', key, img],
    env({ CRYPTMAP_LOCK_DIR: locks }),
  );
  assert.equal(r.code, 5, r.err);
  assert.match(r.err, /Reencryption process is already running\./);
  rmSync(join(locks, `L_${st.dev}_${st.ino}`));
  const ok = await cm(
    ['reencrypt', '--force-offline-reencrypt', '--resume-only', '-q', '--key-file', key, img],
    env({ CRYPTMAP_LOCK_DIR: locks }),
  );
  assert.equal(ok.code, 0, ok.err);
});
