// `cryptmap open` of a LUKS2 device in the middle of an encryption (--encrypt with a detached header,
// or with a data shift: --reduce-device-size) or of a decryption (--decrypt, detached header): as
// cryptsetup 2.6 activates it (each live segment of the header with its key, linear over plaintext),
// the plaintext reads back whole over NBD, and `cryptmap reencrypt --resume-only NAME` finishes it
// online. Stopped by cryptsetup (SIGINT), killed -9 (a hotzone in progress: open recovers it first) or
// crashed in cryptmap (FaultDevice). Afterwards cryptsetup's tools find the result: the encrypted
// volume's plaintext under the volume key it dumps, or the plaintext on the data device.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { before, test } from 'node:test';
import { FaultDevice } from '../../src/blockdev/fault.js';
import { FileDevice } from '../../src/blockdev/file.js';
import { initEncrypt, Luks2Volume, runReencrypt } from '../../src/luks/index.js';
import { CryptmapError } from '../../src/util/errors.js';
import { requireTool, cryptsetupSync, cryptsetupVolumeKey, type CryptsetupResult } from '../helpers/tools.js';
import { cli, cliOk, volumeStatus, readVolume, startDaemon } from '../load/helpers.js';
import { fileTempDir } from '../helpers/tmp.js';
import { FAST_PBKDF } from '../helpers/luks.js';
import { cryptFile } from '../luks/helpers.js';

const MiB = 1 << 20;
const PASS = 'open mid encrypt pass';
/** Data shift of the --reduce-device-size cases (the hotzone is this long): half of the reduction. */
const SHIFT = MiB;

const dir = fileTempDir('cm-open-encdec-');
before(() => requireTool('nbdcopy'));

function cs(...args: string[]): CryptsetupResult {
  return cryptsetupSync(args);
}

interface Vol {
  /** The data device, and the header file when detached. */
  img: string;
  hdr?: string;
  key: string;
  run: string;
  env: NodeJS.ProcessEnv;
  /** What the volume holds (its whole size). */
  plain: Buffer;
}

function volFiles(name: string, bytes: number, detached: boolean): Omit<Vol, 'plain'> {
  const img = join(dir, `${name}.img`);
  const key = join(dir, `${name}.key`);
  writeFileSync(key, PASS, { mode: 0o600 });
  writeFileSync(img, '');
  truncateSync(img, bytes);
  const run = join(dir, `${name}-run`);
  return {
    img,
    ...(detached ? { hdr: join(dir, `${name}.hdr`) } : {}),
    key,
    run,
    env: { CRYPTMAP_RUNTIME_DIR: run, CRYPTMAP_LOCK_DIR: join(dir, 'locks') },
  };
}

const hdrArgs = (v: Vol) => (v.hdr ? ['--header', v.hdr] : []);

/** Plaintext in place on a fresh data device of `bytes` (the plaintext: `plainBytes` of it). */
function plainDevice(name: string, bytes: number, plainBytes: number, detached: boolean): Vol {
  const f = volFiles(name, bytes, detached);
  const plain = randomBytes(plainBytes);
  writeFileSync(f.img, Buffer.concat([plain, Buffer.alloc(bytes - plainBytes)]));
  return { ...f, plain };
}

function volumeKey(v: Vol): Buffer {
  return cryptsetupVolumeKey(v.key, v.hdr ?? v.img, hdrArgs(v));
}

/** A LUKS2 volume with a detached header (data offset 0) holding `bytes` of random plaintext. */
async function encryptedDetached(name: string, bytes: number): Promise<Vol> {
  const f = volFiles(name, bytes, true);
  const f1 = cs(
    'luksFormat',
    '-q',
    '--type',
    'luks2',
    '--sector-size',
    '512',
    ...FAST_PBKDF,
    '--header',
    f.hdr!,
    '--key-file',
    f.key,
    f.img,
  );
  assert.equal(f1.status, 0, f1.out);
  const v: Vol = { ...f, plain: randomBytes(bytes) };
  await cryptFile(v.img, volumeKey(v), 0, { plain: v.plain });
  return v;
}

/** The dump's live (not backup) data segments, as `type:length` ('dynamic' for the whole device). */
function liveSegments(v: Vol): string[] {
  const d = cs('luksDump', '--disable-locks', v.hdr ?? v.img).out;
  const sec = d.slice(d.indexOf('Data segments:'), d.indexOf('Keyslots:'));
  return sec
    .split(/\n {2}[0-9]+: /)
    .slice(1)
    .filter((s) => !/flags : backup-/.test(s))
    .map((s) => `${s.split('\n')[0]}:${/length: \(whole device\)/.test(s) ? 'dynamic' : 'fixed'}`);
}

/** cryptsetup reencrypt `args` sent `sig` once both layouts are live; fails if it finished first. */
async function cryptsetupStopped(v: Vol, args: string[], sig: 'SIGINT' | 'SIGKILL'): Promise<void> {
  const child = spawn(
    'cryptsetup',
    ['reencrypt', '--force-offline-reencrypt', '-q', ...FAST_PBKDF, ...hdrArgs(v), '--key-file', v.key, ...args, v.img],
    { stdio: 'ignore' },
  );
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  let seen = false;
  for (let i = 0; i < 3000 && child.exitCode === null; i++) {
    const live = liveSegments(v);
    // A crypt and a linear part (a new fixed-length part when decrypting: the old one shrank).
    if (live.some((s) => s.startsWith('crypt')) && live.some((s) => s.startsWith('linear'))) {
      seen = true;
      break;
    }
    await new Promise((r) => setTimeout(r, 15));
  }
  child.kill(sig);
  const t = setTimeout(() => child.kill('SIGKILL'), 120_000);
  await exited;
  clearTimeout(t);
  assert.ok(seen, 'cryptsetup made no progress to stop');
  assert.match(
    cs('luksDump', v.hdr ?? v.img).out,
    /online-reencrypt/,
    'cryptsetup finished before it could be stopped',
  );
}

/** Open mid-way, read the plaintext, finish online, read it again, close. */
async function openResumeOnline(v: Vol): Promise<void> {
  const daemon = await startDaemon(v.run);
  try {
    await cliOk(['open', ...hdrArgs(v), '--key-file', v.key, v.img, 'vol'], { env: v.env });
    const st = await volumeStatus(v.run, 'vol');
    assert.equal(st.reencrypt?.state, 'stopped');
    assert.ok((await readVolume(v.run, 'vol', v.plain.length)).equals(v.plain), 'the plaintext reads back whole');
    const r = await cli(['reencrypt', '--resume-only', '-q', '--key-file', v.key, 'vol'], { env: v.env });
    assert.equal(r.code, 0, r.stderr);
    assert.equal((await volumeStatus(v.run, 'vol')).reencrypt?.state, 'finished');
    assert.ok((await readVolume(v.run, 'vol', v.plain.length)).equals(v.plain), 'after the online run');
    await cliOk(['close', 'vol'], { env: v.env });
  } finally {
    await daemon.kill();
  }
  assert.doesNotMatch(cs('luksDump', v.hdr ?? v.img).out, /online-reencrypt/);
}

/** The encrypted volume's plaintext as cryptsetup's volume key decrypts it (data at `offset`, IV from 0). */
function encryptedPlain(v: Vol, offset: number): Promise<Buffer> {
  return cryptFile(v.img, volumeKey(v), offset, { bytes: v.plain.length });
}

for (const sig of ['SIGINT', 'SIGKILL'] as const) {
  test(`encryption with a detached header stopped by cryptsetup (${sig}): open maps plaintext and ciphertext, finished online`, {
    timeout: 600_000,
  }, async () => {
    const v = plainDevice(`enc-h-${sig}`, 24 * MiB, 24 * MiB, true);
    await cryptsetupStopped(v, ['--encrypt', '--type', 'luks2', '--hotzone-size', '64K'], sig);
    await openResumeOnline(v);
    assert.equal(cs('open', '--test-passphrase', '--header', v.hdr!, '--key-file', v.key, v.img).status, 0);
    assert.ok((await encryptedPlain(v, 0)).equals(v.plain));
  });

  test(`encryption with a data shift stopped by cryptsetup (${sig}): open maps the moved part, plaintext and ciphertext, finished online`, {
    timeout: 600_000,
  }, async () => {
    // The plaintext is the device less twice the shift (its head moves to the end, the header takes its place).
    const v = plainDevice(`enc-s-${sig}`, 66 * MiB, 64 * MiB, false);
    await cryptsetupStopped(v, ['--encrypt', '--type', 'luks2', '--reduce-device-size', String(2 * SHIFT)], sig);
    await openResumeOnline(v);
    assert.equal(cs('open', '--test-passphrase', '--key-file', v.key, v.img).status, 0);
    assert.ok((await encryptedPlain(v, SHIFT)).equals(v.plain));
  });

  test(`decryption (detached header) stopped by cryptsetup (${sig}): open maps ciphertext and plaintext, finished online`, {
    timeout: 600_000,
  }, async () => {
    const v = await encryptedDetached(`dec-${sig}`, 24 * MiB);
    await cryptsetupStopped(v, ['--decrypt', '--hotzone-size', '64K'], sig);
    await openResumeOnline(v);
    const dev = await FileDevice.open(v.img);
    try {
      const b = Buffer.alloc(v.plain.length);
      await dev.read(0, b);
      assert.ok(b.equals(v.plain), 'the data device holds the plaintext');
    } finally {
      await dev.close();
    }
  });
}

test('encryption with a data shift crashed in cryptmap (FaultDevice) mid-hotzone: open recovers it; finished online', {
  timeout: 600_000,
}, async () => {
  const v = plainDevice('enc-crash', 26 * MiB, 24 * MiB, false);
  const file = await FileDevice.open(v.img);
  try {
    await initEncrypt(file, undefined, Buffer.from(PASS), {
      reduceBytes: 2 * SHIFT,
      keyslot: { kdf: { type: 'pbkdf2', hash: 'sha256', iterations: 1000 } },
    });
    const faulty = await Luks2Volume.open(new FaultDevice(file, { crashAfterWrites: 23 }));
    await assert.rejects(
      runReencrypt(faulty, Buffer.from(PASS)),
      (e) => e instanceof CryptmapError && e.code === 'EFAULT_CRASH',
    );
  } finally {
    await file.close();
  }
  assert.match(cs('luksDump', v.img).out, /online-reencrypt/);
  await openResumeOnline(v);
  assert.ok((await encryptedPlain(v, SHIFT)).equals(v.plain));
});
