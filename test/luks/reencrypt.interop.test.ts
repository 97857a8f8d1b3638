// cryptmap reencrypt vs cryptsetup 2.6 reencrypt (issue 16): either tool resumes what the other began,
// offline on files (cryptsetup needs --force-offline-reencrypt on a regular file, no device-mapper).
// The plaintext is checked with the volume key cryptsetup dumps before and after.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import {
  cryptsetupKilledWhen,
  cryptsetupReencrypt,
  cryptsetupSync,
  cryptsetupVolumeKey,
  type CryptsetupResult,
} from '../helpers/tools.js';
import { fileTempDir } from '../helpers/tmp.js';
import { FaultDevice } from '../../src/blockdev/fault.js';
import { FileDevice } from '../../src/blockdev/file.js';
import { initReencrypt, Luks2Volume, runReencrypt } from '../../src/luks/index.js';
import { CryptmapError } from '../../src/util/errors.js';
import { cryptFile, inProcessCli } from './helpers.js';
import { FAST_PBKDF } from '../helpers/luks.js';

const dir = fileTempDir('cm-reenc-');
const DATA_OFF = 16 << 20;
const SIZE = 24 << 20;

function cs(...args: string[]): CryptsetupResult {
  return cryptsetupSync(args, { timeoutMs: 600_000 });
}
const csReencrypt = (...args: string[]) => cryptsetupReencrypt(args, { timeoutMs: 600_000 });
const cli = inProcessCli(dir);
async function cm(...argv: string[]): Promise<number> {
  return (await cli(...argv)).code;
}
function volumeKey(img: string, key: string): Buffer {
  return cryptsetupVolumeKey(key, img);
}
/** The plaintext of the data at DATA_OFF (SIZE bytes: up to the end of the image), or `plain` encrypted there. */
function crypt(img: string, vk: Buffer, plain: Buffer | undefined): Promise<Buffer> {
  return cryptFile(img, vk, DATA_OFF, plain ? { plain } : {});
}
async function fresh(name: string): Promise<{ img: string; key: string; plain: Buffer }> {
  const img = join(dir, name);
  const key = join(dir, `${name}.key`);
  writeFileSync(key, 'secret pass', { mode: 0o600 });
  writeFileSync(img, Buffer.alloc(0));
  spawnSync('truncate', ['-s', String(DATA_OFF + SIZE), img]);
  const f = cs('luksFormat', '-q', '--type', 'luks2', '--sector-size', '512', ...FAST_PBKDF, '--key-file', key, img);
  assert.equal(f.status, 0, f.out);
  const plain = randomBytes(SIZE);
  await crypt(img, volumeKey(img, key), plain);
  return { img, key, plain };
}

for (const resilience of ['checksum', 'journal', 'none']) {
  test(`cryptmap reencrypt --init-only (${resilience}), cryptsetup --resume-only finishes; plaintext intact`, async () => {
    const { img, key, plain } = await fresh(`a-${resilience}.img`);
    const vk0 = volumeKey(img, key);
    assert.equal(
      await cm('reencrypt', '--init-only', '-q', '--resilience', resilience, ...FAST_PBKDF, '--key-file', key, img),
      0,
    );
    csReencrypt('--resume-only', '--key-file', key, img);
    const vk1 = volumeKey(img, key);
    assert.notDeepEqual(vk1, vk0);
    assert.ok((await crypt(img, vk1, undefined)).equals(plain));
  });

  test(`cryptsetup reencrypt --init-only (${resilience}), cryptmap resumes; plaintext intact`, async () => {
    const { img, key, plain } = await fresh(`b-${resilience}.img`);
    csReencrypt('--init-only', '--resilience', resilience, ...FAST_PBKDF, '--key-file', key, img);
    assert.equal(
      await cm(
        'reencrypt',
        '--force-offline-reencrypt',
        '--resume-only',
        '-q',
        '--hotzone-size',
        '4M',
        '--key-file',
        key,
        img,
      ),
      0,
    );
    const d = cs('luksDump', img);
    assert.doesNotMatch(d.out, /online-reencrypt|backup-|reencrypt/);
    assert.ok((await crypt(img, volumeKey(img, key), undefined)).equals(plain));
  });
}

test('cryptmap reencrypt in one go (checksum, small hotzones) and a wrong passphrase on resume', async () => {
  const { img, key, plain } = await fresh('c.img');
  assert.equal(
    await cm(
      'reencrypt',
      '--force-offline-reencrypt',
      '-q',
      '--hotzone-size',
      '1M',
      ...FAST_PBKDF,
      '--key-file',
      key,
      img,
    ),
    0,
  );
  assert.ok((await crypt(img, volumeKey(img, key), undefined)).equals(plain));
  assert.equal(cs('isLuks', img).status, 0);
  assert.equal(await cm('reencrypt', '--init-only', '-q', ...FAST_PBKDF, '--key-file', key, img), 0);
  const bad = join(dir, 'bad.key');
  writeFileSync(bad, 'wrong', { mode: 0o600 });
  assert.equal(await cm('reencrypt', '--force-offline-reencrypt', '--resume-only', '-q', '--key-file', bad, img), 2);
  assert.equal(await cm('reencrypt', '--init-only', '-q', '--key-file', key, img), 1);
  assert.equal(await cm('reencrypt', '--force-offline-reencrypt', '--resume-only', '-q', '--key-file', key, img), 0);
  assert.ok((await crypt(img, volumeKey(img, key), undefined)).equals(plain));
});

test('cryptsetup reencrypt killed -9 mid-way, cryptmap resumes; plaintext intact', async () => {
  const { img, key, plain } = await fresh('k.img');
  // Killed once the header shows progress (a first data segment of fixed length).
  await cryptsetupKilledWhen(
    ['reencrypt', '--force-offline-reencrypt', '-q', '--hotzone-size', '64K', ...FAST_PBKDF, '--key-file', key, img],
    img,
    /Data segments:\n {2}0: crypt\n\toffset: [0-9]+ \[bytes\]\n\tlength: [0-9]+ \[bytes\]/,
  );
  assert.match(cs('luksDump', img).out, /online-reencrypt-v2/, 'cryptsetup finished before it could be killed');
  assert.equal(await cm('reencrypt', '--force-offline-reencrypt', '--resume-only', '-q', '--key-file', key, img), 0);
  assert.doesNotMatch(cs('luksDump', img).out, /online-reencrypt/);
  assert.ok((await crypt(img, volumeKey(img, key), undefined)).equals(plain));
});

for (const resilience of ['checksum', 'journal'] as const) {
  test(`cryptmap crashes mid-way (${resilience}), cryptsetup resumes; plaintext intact`, async () => {
    const { img, key, plain } = await fresh(`f-${resilience}.img`);
    const file = await FileDevice.open(img);
    try {
      const v = await Luks2Volume.open(file);
      await initReencrypt(v, Buffer.from('secret pass'), {
        kdf: { type: 'pbkdf2', hash: 'sha256', iterations: 1000 },
        resilience,
      });
      const faulty = await Luks2Volume.open(new FaultDevice(file, { crashAfterWrites: 23 }));
      await assert.rejects(
        runReencrypt(faulty, Buffer.from('secret pass'), { hotzoneBytes: 1 << 20 }),
        (e) => e instanceof CryptmapError && e.code === 'EFAULT_CRASH',
      );
    } finally {
      await file.close();
    }
    assert.match(cs('luksDump', img).out, /in-reencryption/);
    // cryptsetup 2.6 wants the crashed hotzone recovered by `repair` before it resumes.
    const rr = cs('repair', '-q', '--key-file', key, img);
    assert.equal(rr.status, 0, rr.out);
    csReencrypt('--resume-only', '--key-file', key, img);
    assert.ok((await crypt(img, volumeKey(img, key), undefined)).equals(plain));
  });
}
