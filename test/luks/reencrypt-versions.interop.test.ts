// `cryptmap reencrypt` refusals before any work, with cryptsetup 2.6 as the oracle (same message, same
// exit code): a --type that is not the device's ("Conflicting versions. ..."), --resume-only of a device
// not in reencryption. LUKS1 reencryption in cryptsetup's legacy format (magic LUKS\xde\xad, log and
// header copies in the working directory): cryptsetup begins (and stops here without device-mapper),
// cryptmap resumes; a working directory another user can write to is refused.
import assert from 'node:assert/strict';
import { chmodSync, chownSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { before, test } from 'node:test';
import { FAST_LUKS2_FORMAT, FAST_PBKDF } from '../helpers/luks.js';
import { inProcessCli } from './helpers.js';
import { cryptsetupSync, type CryptsetupResult } from '../helpers/tools.js';
import { fileTempDir } from '../helpers/tmp.js';

const dir = fileTempDir('cm-reenc-ver-');
const key = join(dir, 'key');
before(() => writeFileSync(key, 'versions', { mode: 0o600 }));

function cs(...args: string[]): CryptsetupResult {
  return cryptsetupSync(args, { cwd: dir });
}

const cm = inProcessCli(dir);

function image(name: string, type: 'luks1' | 'luks2'): string {
  const img = join(dir, name);
  writeFileSync(img, Buffer.alloc(24 << 20));
  const f =
    type === 'luks2'
      ? cs(...FAST_LUKS2_FORMAT, '--key-file', key, img)
      : cs('luksFormat', '-q', '--type', 'luks1', '--pbkdf-force-iterations', '1000', '--key-file', key, img);
  assert.equal(f.status, 0, f.out);
  return img;
}

test('type conflicts and --resume-only without a reencryption: cryptsetup 2.6 words and exit codes', async () => {
  const l1 = image('l1.img', 'luks1');
  const l2 = image('l2.img', 'luks2');
  const mid = image('mid.img', 'luks2');
  const i = cs('reencrypt', '--init-only', '-q', ...FAST_PBKDF, '--key-file', key, mid);
  assert.equal(i.status, 0, i.out);
  // Legacy LUKS1 reencryption marks the device by its magic (what cryptsetup writes, and reads back below).
  const stained = image('stained.img', 'luks1');
  const b = readFileSync(stained);
  b[4] = 0xde;
  b[5] = 0xad;
  writeFileSync(stained, b);
  const cases: string[][] = [
    ['--type', 'luks2', l1],
    ['--type', 'luks1', l2],
    ['--type', 'luks1', mid],
    ['--type', 'luks2', stained],
    ['--resume-only', l2],
    ['--resume-only', l1],
    ['--encrypt', '--type', 'luks1', '--reduce-device-size', '4M', l2],
  ];
  for (const args of cases) {
    const want = cs('reencrypt', '-q', '--force-offline-reencrypt', '--key-file', key, ...args);
    const got = await cm('reencrypt', '--force-offline-reencrypt', '-q', '--key-file', key, ...args);
    assert.equal(got.code, want.status, `${args.join(' ')}: ${got.err} / cryptsetup: ${want.out}`);
    assert.equal(got.err.trim(), want.out.trim(), args.join(' '));
  }
  assert.match(cs('luksDump', mid).out, /online-reencrypt/, 'nothing changed the reencryption in progress');
});

test('LUKS1 legacy reencryption: cryptsetup begins (it stops here without device-mapper), cryptmap resumes; refusals as cryptsetup', async () => {
  // cryptmap keeps the log and header copies in its working directory, as cryptsetup does.
  const cwd = process.cwd();
  process.chdir(dir);
  try {
    const l1 = image('r1.img', 'luks1');
    const plainOf = async (img: string) => {
      const { Luks1Volume } = await import('../../src/luks/index.js');
      const { FileDevice } = await import('../../src/blockdev/file.js');
      const { createSectorCipher } = await import('../../src/engine/index.js');
      const d = await FileDevice.open(img, { readOnly: true });
      try {
        const v = await Luks1Volume.open(d);
        const { volumeKey } = await v.unlock(readFileSync(key));
        const b = Buffer.alloc(d.sizeBytes - v.dataSegment.offsetBytes);
        await d.read(v.dataSegment.offsetBytes, b);
        const c = createSectorCipher({ spec: v.cipher, key: volumeKey.expose(), sectorBytes: 512 });
        c.decrypt(b, 0n);
        c.dispose();
        volumeKey.dispose();
        return { data: b, offset: v.dataSegment.offsetBytes, cipher: v.cipher };
      } finally {
        await d.close();
      }
    };
    const before = await plainOf(l1);
    // cryptsetup writes its log and header copies, marks the device, then fails to map it.
    const c = cs(
      'reencrypt',
      '-q',
      '--pbkdf-force-iterations',
      '1000',
      '-c',
      'aes-cbc-essiv:sha256',
      '-s',
      '256',
      '--reduce-device-size',
      '1M',
      '--key-file',
      key,
      l1,
    );
    assert.notEqual(c.status, 0, c.out);
    assert.equal(cs('isLuks', l1).status, 1, 'the device is marked as in reencryption');
    const r = await cm('reencrypt', '-q', '--key-file', key, l1);
    assert.equal(r.code, 0, r.err);
    const after = await plainOf(l1);
    assert.equal(after.cipher, 'aes-cbc-essiv:sha256');
    assert.equal(after.offset, before.offset + (1 << 20));
    assert.ok(after.data.equals(before.data.subarray(0, after.data.length)), 'plaintext intact');
    assert.equal(cs('open', '--test-passphrase', '--key-file', key, l1).status, 0);
    assert.deepEqual(
      readdirSync(dir).filter((f) => f.startsWith('LUKS-')),
      [],
      'the log and header copies are gone',
    );
    // A key file with two keyslots active and no --key-slot: cryptsetup's words, exit 1, nothing written.
    const two = image('r2.img', 'luks1');
    const other = join(dir, 'other');
    writeFileSync(other, 'another', { mode: 0o600 });
    assert.equal(cs('luksAddKey', '-q', '--pbkdf-force-iterations', '1000', '--key-file', key, two, other).status, 0);
    const was = readFileSync(two);
    const want = cs('reencrypt', '-q', '--pbkdf-force-iterations', '1000', '--key-file', key, two);
    const got = await cm('reencrypt', '-q', '--pbkdf-force-iterations', '1000', '--key-file', key, two);
    assert.equal(got.code, want.status);
    assert.equal(got.err.trim(), want.out.trim());
    assert.ok(readFileSync(two).equals(was));
    // With --key-slot the other keyslot goes (cryptsetup's rule).
    const s0 = await cm('reencrypt', '-q', '--pbkdf-force-iterations', '1000', '-S', '0', '--key-file', key, two);
    assert.equal(s0.code, 0, s0.err);
    assert.equal(cs('open', '--test-passphrase', '--key-file', other, two).status, 2);
    // A device in legacy reencryption whose log is not here: refused, unchanged.
    const stained = image('r1-stained.img', 'luks1');
    const b = readFileSync(stained);
    b[4] = 0xde;
    b[5] = 0xad;
    writeFileSync(stained, b);
    const st = await cm('reencrypt', '-q', '--key-file', key, stained);
    assert.equal(st.code, 1, st.err);
    assert.match(st.err, /is in LUKS1 reencryption but its log .* is not in the working directory/);
    assert.ok(readFileSync(stained).equals(b));
    // --keep-key: a new header (hash, iterations), the same key, no data rewrite; 999 iterations refused as cryptsetup.
    const kk = image('r3.img', 'luks1');
    const k0 = await plainOf(kk);
    const low = await cm('reencrypt', '-q', '--keep-key', '--pbkdf-force-iterations', '999', '--key-file', key, kk);
    assert.equal(low.code, 1);
    assert.match(low.err, /Forced iteration count is too low for pbkdf2 \(minimum is 1000\)/);
    const kr = await cm(
      'reencrypt',
      '-q',
      '--keep-key',
      '--hash',
      'sha512',
      '--pbkdf-force-iterations',
      '1001',
      '--key-file',
      key,
      kk,
    );
    assert.equal(kr.code, 0, kr.err);
    const dump = cs('luksDump', kk).out;
    assert.match(dump, /Hash spec:\s+sha512/);
    assert.match(dump, /Iterations:\s+1001/);
    assert.ok((await plainOf(kk)).data.equals(k0.data));
  } finally {
    process.chdir(cwd);
  }
  // --decrypt --header NEW of a device that is not LUKS2 either: the header is what is missing (cryptsetup's words).
  const plain = join(dir, 'r2.img');
  writeFileSync(plain, Buffer.alloc(1 << 20));
  const was = readFileSync(plain);
  const hdrNew = join(dir, 'exported.hdr');
  const r = await cm('reencrypt', '--decrypt', '-q', '--header', hdrNew, '--key-file', key, plain);
  const c = cs('reencrypt', '--decrypt', '-q', '--header', hdrNew, '--key-file', key, plain);
  assert.equal(r.code, c.status, `${r.err} / ${c.out}`);
  assert.equal(r.err.trim(), c.out.trim());
  assert.ok(readFileSync(plain).equals(was));
});

test('LUKS1 legacy reencryption: a working directory others can write to is refused unless sticky; there a file planted under its names is refused', async () => {
  const l1 = image('r-shared.img', 'luks1');
  const before = readFileSync(l1);
  const inDir = async (d: string, mode: number) => {
    mkdirSync(d);
    chmodSync(d, mode);
    const cwd = process.cwd();
    process.chdir(d);
    try {
      return await cm('reencrypt', '-q', '--key-file', key, l1);
    } finally {
      process.chdir(cwd);
    }
  };
  // Not sticky (0777): anyone could swap our files there.
  const open = join(dir, 'shared-open');
  const r1 = await inDir(open, 0o777);
  assert.equal(r1.code, 2, r1.err);
  assert.match(r1.err, /refusing .*shared-open: it is writable by group or others \(mode 777\)/);
  assert.deepEqual(readdirSync(open), [], 'no file was created there');
  assert.ok(readFileSync(l1).equals(before), 'the device is untouched');
  // Sticky (1777, as /tmp or a tmpfs mount) with a journal another user planted under the device's name.
  const sticky = join(dir, 'shared-sticky');
  mkdirSync(sticky);
  const uuid = cryptsetupSync(['luksUUID', l1]).out.trim();
  const planted = join(sticky, `LUKS-${uuid}.journal`);
  writeFileSync(planted, 'not ours');
  chownSync(planted, 65534, 65534);
  chmodSync(sticky, 0o1777);
  const cwd = process.cwd();
  process.chdir(sticky);
  let r2: Awaited<ReturnType<typeof cm>>;
  try {
    r2 = await cm('reencrypt', '-q', '--key-file', key, l1);
  } finally {
    process.chdir(cwd);
  }
  assert.equal(r2.code, 2, r2.err);
  assert.match(r2.err, /refusing .*LUKS-.*\.journal: it belongs to uid 65534/);
  assert.deepEqual(readdirSync(sticky), [`LUKS-${uuid}.journal`], 'nothing else was created there');
  assert.ok(readFileSync(l1).equals(before), 'the device is untouched');
  // Without the planted file the sticky directory serves, as cryptsetup's test suite runs it (a tmpfs mount).
  rmSync(planted);
  const clean = join(dir, 'shared-clean');
  const r3 = await inDir(clean, 0o1777);
  assert.equal(r3.code, 0, r3.err);
  assert.deepEqual(readdirSync(clean), [], 'the log and header copies are gone afterwards');
  assert.equal(cryptsetupSync(['open', '--test-passphrase', '--key-file', key, l1]).status, 0);
});
