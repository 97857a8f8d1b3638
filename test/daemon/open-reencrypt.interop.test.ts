// `cryptmap open` of a LUKS2 device in the middle of a reencryption (issue 16 follow-up; cryptsetup
// 2.6 activates it segment by segment): the daemon maps the part already reencrypted with the new key
// and the rest with the old one, the plaintext reads back whole over NBD, and `cryptmap reencrypt
// --resume-only NAME` finishes it online. The reencryption was stopped by cryptsetup (SIGINT, clean),
// killed -9 (a hotzone in progress: open recovers it first, as cryptsetup's open does) or crashed in
// cryptmap (FaultDevice). Refusals: cryptsetup's reencryption lock held ("Reencryption in-progress.
// Cannot activate device.", exit 5), a wrong passphrase (cryptsetup's exit code), resize while mapped that way (exit 5).
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { before, test } from 'node:test';
import { FaultDevice } from '../../src/blockdev/fault.js';
import { FileDevice } from '../../src/blockdev/file.js';
import { initReencrypt, Luks2Volume, reencryptLockPath, runReencrypt } from '../../src/luks/index.js';
import { CryptmapError } from '../../src/util/errors.js';
import { requireTool, cryptsetupSync, cryptsetupVolumeKey, type CryptsetupResult } from '../helpers/tools.js';
import { cli, cliOk, volumeStatus, readVolume, startDaemon } from '../load/helpers.js';
import { fileTempDir } from '../helpers/tmp.js';
import { FAST_PBKDF } from '../helpers/luks.js';
import { cryptFile } from '../luks/helpers.js';

const MiB = 1 << 20;
const DATA_OFF = 16 * MiB;
const DATA = 24 * MiB;
const PASS = 'open mid pass';

const dir = fileTempDir('cm-open-reenc-');
before(() => requireTool('nbdcopy'));

function cs(...args: string[]): CryptsetupResult {
  return cryptsetupSync(args);
}

/** The plaintext of the finished image (one segment, 512-byte sectors) through the key cryptsetup dumps. */
function plainOf(img: string, key: string): Promise<Buffer> {
  return cryptFile(img, cryptsetupVolumeKey(key, img), DATA_OFF, { bytes: DATA });
}

interface Vol {
  img: string;
  key: string;
  run: string;
  env: NodeJS.ProcessEnv;
  plain: Buffer;
}

/** A LUKS2 image (cryptsetup, 512-byte sectors) holding DATA random bytes of plaintext. */
async function fresh(name: string): Promise<Vol> {
  const img = join(dir, `${name}.img`);
  const key = join(dir, `${name}.key`);
  writeFileSync(key, PASS, { mode: 0o600 });
  writeFileSync(img, '');
  truncateSync(img, DATA_OFF + DATA);
  const f = cs('luksFormat', '-q', '--type', 'luks2', '--sector-size', '512', ...FAST_PBKDF, '--key-file', key, img);
  assert.equal(f.status, 0, f.out);
  const plain = randomBytes(DATA);
  await cryptFile(img, cryptsetupVolumeKey(key, img), DATA_OFF, { plain });
  const run = join(dir, `${name}-run`);
  return { img, key, run, env: { CRYPTMAP_RUNTIME_DIR: run, CRYPTMAP_LOCK_DIR: join(dir, 'locks') }, plain };
}

/** cryptsetup reencrypt (64 KiB hotzones) sent `sig` once the header shows progress; fails if it finished first. */
async function cryptsetupStopped(v: Vol, sig: 'SIGINT' | 'SIGKILL'): Promise<void> {
  const child = spawn(
    'cryptsetup',
    [
      'reencrypt',
      '--force-offline-reencrypt',
      '-q',
      '--hotzone-size',
      '64K',
      ...FAST_PBKDF,
      '--key-file',
      v.key,
      v.img,
    ],
    { stdio: 'ignore' },
  );
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  for (let i = 0; i < 3000; i++) {
    const d = cs('luksDump', '--disable-locks', v.img).out;
    if (/Data segments:\n {2}0: crypt\n\toffset: [0-9]+ \[bytes\]\n\tlength: [0-9]+ \[bytes\]/.test(d)) break;
    await new Promise((r) => setTimeout(r, 20));
  }
  child.kill(sig);
  const t = setTimeout(() => child.kill('SIGKILL'), 120_000);
  await exited;
  clearTimeout(t);
  assert.match(cs('luksDump', v.img).out, /online-reencrypt/, 'cryptsetup finished before it could be stopped');
}

/** Open mid-way, read the plaintext, finish online, close; the image then holds the plaintext under the new key. */
async function openResumeOnline(v: Vol): Promise<void> {
  const daemon = await startDaemon(v.run);
  try {
    await cliOk(['open', '--key-file', v.key, v.img, 'vol'], { env: v.env });
    const st = await volumeStatus(v.run, 'vol');
    assert.equal(st.reencrypt?.state, 'stopped');
    assert.ok(
      (await readVolume(v.run, 'vol', DATA)).equals(v.plain),
      'the plaintext reads back whole across both layouts',
    );
    // The table is rebuilt only by the reencryption itself meanwhile.
    const rs = await cli(['resize', '--size', '2048', '--key-file', v.key, 'vol'], { env: v.env });
    assert.equal(rs.code, 5, rs.stderr);
    const r = await cli(['reencrypt', '--resume-only', '-q', '--key-file', v.key, 'vol'], { env: v.env });
    assert.equal(r.code, 0, r.stderr);
    assert.equal((await volumeStatus(v.run, 'vol')).reencrypt?.state, 'finished');
    assert.ok((await readVolume(v.run, 'vol', DATA)).equals(v.plain));
    await cliOk(['close', 'vol'], { env: v.env });
  } finally {
    await daemon.kill();
  }
  assert.doesNotMatch(cs('luksDump', v.img).out, /online-reencrypt/);
  assert.ok((await plainOf(v.img, v.key)).equals(v.plain));
}

test('stopped by cryptsetup (SIGINT): cryptmap opens it, reads it whole, finishes it online', {
  timeout: 600_000,
}, async () => {
  const v = await fresh('int');
  await cryptsetupStopped(v, 'SIGINT');
  assert.doesNotMatch(cs('luksDump', v.img).out, /in-reencryption/);
  await openResumeOnline(v);
});

test('cryptsetup killed -9 mid-way: open recovers a hotzone left in progress, then maps both parts; finished online', {
  timeout: 600_000,
}, async () => {
  const v = await fresh('kill');
  await cryptsetupStopped(v, 'SIGKILL');
  await openResumeOnline(v);
});

test('cryptmap crashed mid-hotzone (journal): open recovers it; finished online', { timeout: 600_000 }, async () => {
  const v = await fresh('crash');
  const file = await FileDevice.open(v.img);
  try {
    await initReencrypt(await Luks2Volume.open(file), Buffer.from(PASS), {
      kdf: { type: 'pbkdf2', hash: 'sha256', iterations: 1000 },
      resilience: 'journal',
    });
    const faulty = await Luks2Volume.open(new FaultDevice(file, { crashAfterWrites: 23 }));
    await assert.rejects(
      runReencrypt(faulty, Buffer.from(PASS), { hotzoneBytes: MiB }),
      (e) => e instanceof CryptmapError && e.code === 'EFAULT_CRASH',
    );
  } finally {
    await file.close();
  }
  assert.match(cs('luksDump', v.img).out, /in-reencryption/);
  await openResumeOnline(v);
});

test('open mid-reencryption refused: reencryption lock held (exit 5), wrong passphrase (exit as cryptsetup); nothing mapped', {
  timeout: 600_000,
}, async () => {
  const v = await fresh('refuse');
  const i = cs(
    'reencrypt',
    '--init-only',
    '--force-offline-reencrypt',
    '-q',
    ...FAST_PBKDF,
    '--key-file',
    v.key,
    v.img,
  );
  assert.equal(i.status, 0, i.out);
  const uuid = cs('luksUUID', v.img).out.trim();
  const daemon = await startDaemon(v.run);
  try {
    const holder = spawn('flock', ['-x', reencryptLockPath(uuid), '-c', 'echo held; read x'], {
      stdio: ['pipe', 'pipe', 'inherit'],
    });
    const gone = new Promise((r) => holder.once('exit', r));
    try {
      await new Promise<void>((res, rej) => {
        const t = setTimeout(() => rej(new Error('flock(1) did not take the lock within 30 s')), 30_000);
        holder.stdout!.once('data', () => {
          clearTimeout(t);
          res();
        });
      });
      const r = await cli(['open', '--key-file', v.key, v.img, 'vol'], { env: v.env });
      assert.equal(r.code, 5, r.stderr);
      assert.match(r.stderr, /Reencryption in-progress\. Cannot activate device\./);
    } finally {
      holder.stdin!.end();
      await gone;
    }
    const bad = join(dir, 'bad.key');
    writeFileSync(bad, 'wrong', { mode: 0o600 });
    const w = await cli(['open', '--key-file', bad, v.img, 'vol'], { env: v.env });
    // cryptsetup's open takes the keys as its --test-passphrase does (_open_all_keys): the same answer.
    const want = cs('open', '--test-passphrase', '--key-file', bad, v.img);
    assert.equal(w.code, want.status, w.stderr);
    assert.equal(w.stderr.trim(), want.out.trim());
    assert.equal((await volumeStatus(v.run, 'vol')).active, false);
    // Nothing reencrypted yet: all of it is mapped with the old key, and reads back whole.
    await cliOk(['open', '--key-file', v.key, v.img, 'vol'], { env: v.env });
    assert.ok((await readVolume(v.run, 'vol', DATA)).equals(v.plain));
    await cliOk(['close', 'vol'], { env: v.env });
  } finally {
    await daemon.kill();
  }
});
