// LUKS2 reencryption with a data shift (`reencrypt --reduce-device-size N`, no --encrypt) against
// cryptsetup 2.6: either tool starts (--init-only, or killed -9 / crashed mid-way), the other finishes;
// the on-disk result is cryptsetup's (data offset + N, keyslots area grown to it) and the plaintext,
// all but the last N bytes, is intact. cryptsetup runs offline on files (--force-offline-reencrypt).
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { copyFileSync, existsSync, statSync, writeFileSync } from 'node:fs';
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
import { FAST_LUKS2_FORMAT, FAST_PBKDF } from '../helpers/luks.js';

const dir = fileTempDir('cm-reenc-shift-');
const DATA_OFF = 16 << 20;
const SIZE = 16 << 20;
const PASS = 'secret pass';

function cs(...args: string[]): CryptsetupResult {
  return cryptsetupSync(args, { timeoutMs: 600_000 });
}
const csReencrypt = (...args: string[]) => cryptsetupReencrypt(args, { timeoutMs: 600_000 });
const cm = inProcessCli(dir);
function volumeKey(img: string, key: string): Buffer {
  return cryptsetupVolumeKey(key, img);
}
function json(img: string): {
  segments: Record<string, { offset: string; type: string; flags?: string[] }>;
  config: { keyslots_size: string; requirements?: unknown };
} {
  const r = cs('luksDump', '--dump-json-metadata', img);
  assert.equal(r.status, 0, r.out);
  return JSON.parse(r.out);
}
/**
 * Image `name` of `bytes` bytes (and its key file `name.key`), LUKS2 as cryptsetup's luksFormat with
 * `args` makes it (header in `header` when given), random plaintext encrypted from `off` to its end.
 */
async function formatted(
  name: string,
  bytes: number,
  off: number,
  sector: number,
  args: string[],
  header?: string,
): Promise<{ img: string; key: string; plain: Buffer }> {
  const img = join(dir, name);
  const key = join(dir, `${name}.key`);
  writeFileSync(key, PASS, { mode: 0o600 });
  writeFileSync(img, Buffer.alloc(0));
  spawnSync('truncate', ['-s', String(bytes), img]);
  const hdr = header !== undefined ? ['--header', header] : [];
  const f = cs(...FAST_LUKS2_FORMAT, '--sector-size', String(sector), ...args, ...hdr, '--key-file', key, img);
  assert.equal(f.status, 0, f.out);
  const plain = randomBytes(bytes - off);
  await cryptFile(img, volumeKey(header ?? img, key), off, { sector, plain });
  return { img, key, plain };
}
function fresh(name: string, sector = 512): Promise<{ img: string; key: string; plain: Buffer }> {
  return formatted(name, DATA_OFF + SIZE, DATA_OFF, sector, []);
}
/**
 * The same arguments run by cryptmap on image `a` and by cryptsetup (offline) on image `b`, each
 * followed by its own --header (with `header`), key file and image.
 */
async function byBoth(
  args: string[],
  a: { img: string; key: string; hdr?: string },
  b: { img: string; key: string; hdr?: string },
  header = false,
): Promise<{ ours: { code: number; err: string }; theirs: CryptsetupResult }> {
  const tail = (x: typeof a) => [...(header ? ['--header', x.hdr!] : []), '-d', x.key, x.img];
  const ours = await cm(...args, '--force-offline-reencrypt', ...tail(a));
  return { ours, theirs: cs(...args, '--force-offline-reencrypt', ...tail(b)) };
}
/** The device after a finished shift of `shift` bytes: cryptsetup's header, the plaintext moved up. */
async function checkDone(img: string, key: string, plain: Buffer, shift: number, sector = 512): Promise<void> {
  const j = json(img);
  assert.deepEqual(Object.keys(j.segments), ['0']);
  assert.equal(j.segments['0']!.offset, String(DATA_OFF + shift));
  assert.equal(j.config.keyslots_size, String(DATA_OFF + shift - 2 * 0x4000));
  assert.equal(j.config.requirements, undefined);
  const got = await cryptFile(img, volumeKey(img, key), DATA_OFF + shift, { sector });
  assert.equal(got.length, SIZE - shift);
  assert.ok(got.equals(plain.subarray(0, SIZE - shift)), 'plaintext damaged');
}

test('cryptmap reencrypt --reduce-device-size --init-only, cryptsetup --resume-only finishes', async () => {
  const { img, key, plain } = await fresh('a.img');
  const vk0 = volumeKey(img, key);
  const r0 = await cm('reencrypt', '--init-only', '-q', '--reduce-device-size', '2M', ...FAST_PBKDF, '-d', key, img);
  assert.equal(r0.code, 0, r0.err);
  csReencrypt('--resume-only', '--key-file', key, img);
  assert.notDeepEqual(volumeKey(img, key), vk0);
  await checkDone(img, key, plain, 2 << 20);
});

test('cryptsetup reencrypt --reduce-device-size --init-only, cryptmap resumes (4096-byte sectors)', async () => {
  const { img, key, plain } = await fresh('b.img', 4096);
  csReencrypt(
    '--init-only',
    '--resilience',
    'none',
    '--reduce-device-size',
    '1M',
    ...FAST_PBKDF,
    '--key-file',
    key,
    img,
  );
  const r1 = await cm('reencrypt', '--force-offline-reencrypt', '--resume-only', '-q', '-d', key, img);
  assert.equal(r1.code, 0, r1.err);
  await checkDone(img, key, plain, 1 << 20, 4096);
});

test('cryptmap reencrypt --reduce-device-size in one go leaves the header cryptsetup leaves', async () => {
  const a = await fresh('c1.img');
  const b = await fresh('c2.img');
  const { ours: r0, theirs: r } = await byBoth(
    ['reencrypt', '-q', '--reduce-device-size', '256K', ...FAST_PBKDF],
    a,
    b,
  );
  assert.equal(r0.code, 0, r0.err);
  assert.equal(r.status, 0, r.out);
  const ja = json(a.img);
  const jb = json(b.img);
  assert.deepEqual(ja.segments, jb.segments);
  assert.deepEqual(ja.config, jb.config);
  await checkDone(a.img, a.key, a.plain, 256 << 10);
  await checkDone(b.img, b.key, b.plain, 256 << 10);
});

test('cryptsetup reencrypt --reduce-device-size killed -9 mid-way, cryptmap resumes', async () => {
  const { img, key, plain } = await fresh('k.img');
  // Killed once the header shows progress (an old data segment of fixed length below the new one).
  await cryptsetupKilledWhen(
    [
      'reencrypt',
      '--force-offline-reencrypt',
      '-q',
      '--reduce-device-size',
      '64K',
      ...FAST_PBKDF,
      '--key-file',
      key,
      img,
    ],
    img,
    /Data segments:\n {2}0: crypt\n\toffset: [0-9]+ \[bytes\]\n\tlength: [0-9]+ \[bytes\]/,
  );
  assert.match(cs('luksDump', img).out, /online-reencrypt-v2/, 'cryptsetup finished before it could be killed');
  const r = await cm('reencrypt', '--force-offline-reencrypt', '--resume-only', '-q', '-d', key, img);
  assert.equal(r.code, 0, r.err);
  await checkDone(img, key, plain, 64 << 10);
});

test('cryptmap crashes mid-hotzone (data shift), cryptsetup repairs and resumes', async () => {
  const { img, key, plain } = await fresh('f.img');
  const file = await FileDevice.open(img);
  try {
    const v = await Luks2Volume.open(file);
    await initReencrypt(v, Buffer.from(PASS), {
      kdf: { type: 'pbkdf2', hash: 'sha256', iterations: 1000 },
      shiftBytes: 1 << 20,
    });
  } finally {
    await file.close();
  }
  // The first crash point at or after 10 writes that leaves a hotzone in progress.
  const copy = join(dir, 'f-crash.img');
  let hot = false;
  for (let n = 10; n < 40 && !hot; n++) {
    copyFileSync(img, copy);
    const f = await FileDevice.open(copy);
    try {
      const faulty = await Luks2Volume.open(new FaultDevice(f, { crashAfterWrites: n }));
      await assert.rejects(
        runReencrypt(faulty, Buffer.from(PASS)),
        (e) => e instanceof CryptmapError && e.code === 'EFAULT_CRASH',
      );
    } finally {
      await f.close();
    }
    hot = /in-reencryption/.test(cs('luksDump', copy).out);
  }
  assert.ok(hot, 'no crash point left a hotzone in progress');
  const rr = cs('repair', '-q', '--key-file', key, copy);
  assert.equal(rr.status, 0, rr.out);
  csReencrypt('--resume-only', '--key-file', key, copy);
  await checkDone(copy, key, plain, 1 << 20);
});

test('a data shift not aligned to the encryption sector size: both tools refuse with the same words and exit code', async () => {
  const a = await fresh('m1.img', 4096);
  const b = await fresh('m2.img', 4096);
  const { ours: r0, theirs: r } = await byBoth(
    ['reencrypt', '-q', '--init-only', '--reduce-device-size', '1536', ...FAST_PBKDF],
    a,
    b,
  );
  assert.equal(r0.code, r.status, `${r0.err} / ${r.out}`);
  assert.match(r.out, /Data shift value is not aligned to encryption sector size \(4096 bytes\)\./);
  assert.match(r0.err, /Data shift value is not aligned to encryption sector size \(4096 bytes\)\./);
  assert.deepEqual(json(a.img).segments, json(b.img).segments);
  assert.equal(Object.keys(json(a.img).segments).length, 1);
});

for (const starter of ['cryptsetup', 'cryptmap'] as const) {
  test(`decryption of a detached header with --reduce-device-size: ${starter} starts, the other finishes`, async () => {
    const hdr = join(dir, `d-${starter}.hdr`);
    const { img, key, plain } = await formatted(
      `d-${starter}.img`,
      SIZE,
      0,
      512,
      ['--luks2-keyslots-size', '512K'],
      hdr,
    );
    const S = 2 << 20;
    const init = ['reencrypt', '--decrypt', '--init-only', '-q', '--reduce-device-size', '2M', '--header', hdr];
    if (starter === 'cryptsetup') {
      const r = cs(...init, '--force-offline-reencrypt', '-d', key, img);
      assert.equal(r.status, 0, r.out);
      const r1 = await cm(
        'reencrypt',
        '--force-offline-reencrypt',
        '--resume-only',
        '-q',
        '--header',
        hdr,
        '-d',
        key,
        img,
      );
      assert.equal(r1.code, 0, r1.err);
    } else {
      const r0 = await cm(...init, '-d', key, img);
      assert.equal(r0.code, 0, r0.err);
      csReencrypt('--resume-only', '--header', hdr, '-d', key, img);
    }
    const j = json(hdr);
    assert.deepEqual(Object.keys(j.segments), ['0']);
    assert.equal(j.segments['0']!.type, 'linear');
    assert.equal(j.segments['0']!.offset, String(S));
    const dev = await FileDevice.open(img);
    const b = Buffer.alloc(SIZE - S);
    await dev.read(S, b);
    await dev.close();
    assert.ok(b.equals(plain.subarray(0, SIZE - S)), 'plaintext damaged');
  });
}

// ---- decryption of a device whose header is in place: the header exported to a new --header file ----

const X_OFF = 1 << 20; // the data offset, and so the shift (small, so that a run has many hotzones)
const X_SIZE = X_OFF + (24 << 20);

async function freshInPlace(name: string): Promise<{ img: string; key: string; plain: Buffer; hdr: string }> {
  const args = ['--luks2-metadata-size', '16K', '--luks2-keyslots-size', '960K', '--offset', String(X_OFF / 512)];
  return { ...(await formatted(name, X_SIZE, X_OFF, 512, args)), hdr: join(dir, `${name}.hdr`) };
}
/** The device after a finished decryption with the header exported: plaintext at 0, H a linear header. */
async function checkDecrypted(img: string, hdr: string, plain: Buffer): Promise<void> {
  const j = json(hdr);
  assert.deepEqual(Object.keys(j.segments), ['0']);
  assert.equal(j.segments['0']!.type, 'linear');
  assert.equal(j.segments['0']!.offset, '0');
  assert.equal(j.config.requirements, undefined);
  const dev = await FileDevice.open(img);
  try {
    const b = Buffer.alloc(plain.length);
    await dev.read(0, b);
    assert.ok(b.equals(plain), 'plaintext damaged');
  } finally {
    await dev.close();
  }
}

test('cryptmap reencrypt --decrypt --header NEW --init-only exports the header as cryptsetup does; cryptsetup finishes', async () => {
  const a = await freshInPlace('x1.img');
  const b = await freshInPlace('x2.img');
  const { ours: r0, theirs: r } = await byBoth(['reencrypt', '--decrypt', '--init-only', '-q'], a, b, true);
  assert.equal(r0.code, 0, r0.err);
  assert.equal(r.status, 0, r.out);
  const ja = json(a.hdr);
  const jb = json(b.hdr);
  assert.deepEqual(ja.segments, jb.segments);
  assert.deepEqual(ja.config, jb.config);
  assert.equal(statSync(a.hdr).mode & 0o777, 0o600);
  assert.equal(statSync(a.hdr).size, statSync(b.hdr).size);
  assert.notEqual(cs('isLuks', a.img).status, 0, 'the device keeps no LUKS signature');
  csReencrypt('--resume-only', '--header', a.hdr, '-d', a.key, a.img);
  await checkDecrypted(a.img, a.hdr, a.plain);
});

test('cryptsetup reencrypt --decrypt --header NEW --init-only (journal), cryptmap resumes', async () => {
  const { img, key, plain, hdr } = await freshInPlace('x3.img');
  csReencrypt(
    '--decrypt',
    '--init-only',
    '--resilience',
    'journal',
    '--hotzone-size',
    '512K',
    '--header',
    hdr,
    '-d',
    key,
    img,
  );
  assert.match(cs('luksDump', hdr).out, /online-reencrypt-v3/);
  const r1 = await cm('reencrypt', '--force-offline-reencrypt', '--resume-only', '-q', '--header', hdr, '-d', key, img);
  assert.equal(r1.code, 0, r1.err);
  await checkDecrypted(img, hdr, plain);
});

test('cryptmap reencrypt --decrypt --header NEW in one go', async () => {
  const { img, key, plain, hdr } = await freshInPlace('x4.img');
  const r = await cm('reencrypt', '--force-offline-reencrypt', '--decrypt', '-q', '--header', hdr, '-d', key, img);
  assert.equal(r.code, 0, r.err);
  await checkDecrypted(img, hdr, plain);
});

test('cryptsetup reencrypt --decrypt --header NEW killed -9 mid-way, cryptmap resumes', async () => {
  const { img, key, plain, hdr } = await freshInPlace('x5.img');
  // Killed once the header shows progress (plaintext after the moved segment).
  await cryptsetupKilledWhen(
    ['reencrypt', '--decrypt', '--force-offline-reencrypt', '-q', '--header', hdr, '--key-file', key, img],
    hdr,
    /Data segments:\n {2}0: crypt[\s\S]*\n {2}1: linear/,
  );
  assert.match(cs('luksDump', hdr).out, /online-reencrypt-v3/, 'cryptsetup finished before it could be killed');
  const r = await cm('reencrypt', '--force-offline-reencrypt', '--resume-only', '-q', '--header', hdr, '-d', key, img);
  assert.equal(r.code, 0, r.err);
  await checkDecrypted(img, hdr, plain);
});

for (const where of ['a shifted hotzone', 'the moved segment'] as const) {
  test(`cryptmap crashes inside ${where} of a decryption with the header exported, cryptsetup repairs and resumes`, async () => {
    const { img, key, plain, hdr } = await freshInPlace(`x6-${where === 'a shifted hotzone' ? 's' : 'm'}.img`);
    const r0 = await cm('reencrypt', '--decrypt', '--init-only', '-q', '--header', hdr, '-d', key, img);
    assert.equal(r0.code, 0, r0.err);
    const imgCopy = `${img}.crash`;
    const hdrCopy = `${hdr}.crash`;
    // The writes of the whole run (header and data devices count apart), so that the moved segment's
    // hotzone, the last one, is looked for near the end.
    let total = 0;
    {
      copyFileSync(img, imgCopy);
      copyFileSync(hdr, hdrCopy);
      const h = await FileDevice.open(hdrCopy);
      const d = await FileDevice.open(imgCopy);
      try {
        const fh = new FaultDevice(h);
        const fdd = new FaultDevice(d);
        assert.equal(await runReencrypt(await Luks2Volume.open(fh), Buffer.from(PASS), { dataDev: fdd }), true);
        total = Math.max(fh.stats.writes, fdd.stats.writes);
      } finally {
        await h.close();
        await d.close();
      }
    }
    // The first crash point that leaves a hotzone in progress at the wanted place (offset 0: the moved segment).
    let hit = false;
    for (let n = where === 'a shifted hotzone' ? 2 : Math.max(2, total - 12); n < total && !hit; n++) {
      copyFileSync(img, imgCopy);
      copyFileSync(hdr, hdrCopy);
      const h = await FileDevice.open(hdrCopy);
      const d = await FileDevice.open(imgCopy);
      try {
        const hv = await Luks2Volume.open(new FaultDevice(h, { crashAfterWrites: n }));
        const done = await runReencrypt(hv, Buffer.from(PASS), { dataDev: new FaultDevice(d, { crashAfterWrites: n }) })
          .then(() => true)
          .catch((e) => {
            assert.ok(e instanceof CryptmapError && e.code === 'EFAULT_CRASH', String(e));
            return false;
          });
        if (done) break;
      } finally {
        await h.close();
        await d.close();
      }
      const j = json(hdrCopy);
      const hot = Object.values(j.segments).find((s) => s.flags?.includes('in-reencryption'));
      if (hot) hit = where === 'the moved segment' ? hot.offset === '0' : hot.offset !== '0';
    }
    assert.ok(hit, `no crash point left ${where} in progress`);
    const rr = cs('repair', '-q', '--header', hdrCopy, '--key-file', key, imgCopy);
    assert.equal(rr.status, 0, rr.out);
    // cryptsetup's repair recovers the hotzone; when it was the last one (the moved segment) that finishes.
    if (/online-reencrypt/.test(cs('luksDump', hdrCopy).out)) {
      csReencrypt('--resume-only', '--header', hdrCopy, '--key-file', key, imgCopy);
    }
    await checkDecrypted(imgCopy, hdrCopy, plain);
  });
}

test('decryption with the header exported: refusals as cryptsetup (resilience none, a moved segment longer than the shift)', async () => {
  for (const [args, msg] of [
    [['--resilience', 'none'], /Requested --resilience option cannot be applied to current reencryption operation\./],
    [['--hotzone-size', '2M'], /Moved segment size can not be greater than data shift value\./],
  ] as const) {
    const a = await freshInPlace('x7.img');
    const { ours: r0, theirs: r } = await byBoth(['reencrypt', '--decrypt', '--init-only', '-q', ...args], a, a, true);
    assert.equal(r0.code, r.status, `${r0.err} / ${r.out}`);
    assert.match(r.out, msg);
    assert.match(r0.err, msg);
    assert.ok(!existsSync(a.hdr), 'no header file is left');
    assert.equal(cs('isLuks', a.img).status, 0, 'the device keeps its header');
  }
});
