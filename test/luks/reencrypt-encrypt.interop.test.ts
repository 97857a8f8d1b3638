// cryptmap reencrypt --encrypt / --decrypt vs cryptsetup 2.6 (issue 16): either tool resumes what the
// other began, offline on files (cryptsetup --force-offline-reencrypt), in place with
// --reduce-device-size (datashift) and with a detached header. The plaintext is checked with the
// volume key cryptsetup dumps.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { cryptsetupReencrypt, cryptsetupSync, type CryptsetupResult } from '../helpers/tools.js';
import { fileTempDir } from '../helpers/tmp.js';
import { FaultDevice } from '../../src/blockdev/fault.js';
import { FileDevice } from '../../src/blockdev/file.js';
import { createSectorCipher } from '../../src/engine/index.js';
import { initEncrypt, Luks2Volume, runReencrypt } from '../../src/luks/index.js';
import { CryptmapError } from '../../src/util/errors.js';
import { inProcessCli } from './helpers.js';
import { FAST_PBKDF } from '../helpers/luks.js';

const dir = fileTempDir('cm-enc-');
const PLAIN = (6 << 20) + (512 << 10);
const REDUCE = 4 << 20; // shift 2 MiB: a few hotzones

function cs(...args: string[]): CryptsetupResult {
  return cryptsetupSync(args);
}
const cm = inProcessCli(dir);
/** cryptmap's resume of a regular file, offline as csReencrypt's. */
const RESUME = ['reencrypt', '--force-offline-reencrypt', '--resume-only', '-q'];
function dump(hdr: string, key: string): { vk: Buffer; offset: number; linear: boolean } {
  const r = cs('luksDump', '--dump-volume-key', '--batch-mode', '--key-file', key, hdr);
  const d = cs('luksDump', hdr).out;
  const m = /MK dump:\t([\s\S]*)$/.exec(r.out);
  const off = /Data segments:\n {2}0: (crypt|linear)\n\toffset: ([0-9]+) \[bytes\]/.exec(d);
  assert.ok(off, d);
  return {
    vk: m ? Buffer.from(m[1]!.replace(/[\s]/g, ''), 'hex') : Buffer.alloc(0),
    offset: Number(off[2]),
    linear: off[1] === 'linear',
  };
}
function plaintextOf(img: string, hdr: string, key: string): Buffer {
  const { vk, offset } = dump(hdr, key);
  const b = Buffer.from(readFileSync(img).subarray(offset, offset + PLAIN));
  const c = createSectorCipher({ spec: 'aes-xts-plain64', key: vk, sectorBytes: 512 });
  c.decrypt(b, 0n);
  c.dispose();
  return b;
}
function fresh(name: string, tail: number): { img: string; key: string; plain: Buffer } {
  const img = join(dir, name);
  const key = join(dir, `${name}.key`);
  writeFileSync(key, 'secret pass', { mode: 0o600 });
  const plain = randomBytes(PLAIN);
  writeFileSync(img, Buffer.concat([plain, randomBytes(tail)]));
  return { img, key, plain };
}
const csReencrypt = (...args: string[]) => cryptsetupReencrypt(args);
function noReencrypt(hdr: string): void {
  assert.doesNotMatch(cs('luksDump', hdr).out, /online-reencrypt|backup-|reencrypt/);
}

test('encrypt in place: cryptmap --init-only, cryptsetup resumes; cryptsetup --init-only, cryptmap resumes', async () => {
  const a = fresh('a.img', REDUCE);
  let r = await cm(
    'reencrypt',
    '--encrypt',
    '--init-only',
    '-q',
    '--type',
    'luks2',
    '--reduce-device-size',
    String(REDUCE),
    ...FAST_PBKDF,
    '--key-file',
    a.key,
    a.img,
  );
  assert.equal(r.code, 0, r.err);
  assert.match(cs('luksDump', a.img).out, /online-reencrypt-v2/);
  csReencrypt('--resume-only', '--key-file', a.key, a.img);
  noReencrypt(a.img);
  assert.ok(plaintextOf(a.img, a.img, a.key).equals(a.plain));

  const b = fresh('b.img', REDUCE);
  csReencrypt(
    '--encrypt',
    '--init-only',
    '--type',
    'luks2',
    '--reduce-device-size',
    String(REDUCE),
    ...FAST_PBKDF,
    '--key-file',
    b.key,
    b.img,
  );
  // In the middle: luksDump as cryptsetup's, and the passphrase tests good (segment 0 has no key yet).
  assert.equal((await cm('luksDump', b.img)).out, cs('luksDump', b.img).out);
  assert.equal((await cm('open', '--test-passphrase', '--key-file', b.key, b.img)).code, 0);
  r = await cm(...RESUME, '--key-file', b.key, b.img);
  assert.equal(r.code, 0, r.err);
  noReencrypt(b.img);
  assert.ok(plaintextOf(b.img, b.img, b.key).equals(b.plain));
});

test('encrypt in place in one go by cryptmap; cryptsetup reads the result; an existing LUKS device is refused', async () => {
  const a = fresh('c.img', REDUCE);
  let r = await cm(
    'reencrypt',
    '--encrypt',
    '-q',
    '--reduce-device-size',
    '4M',
    ...FAST_PBKDF,
    '--key-file',
    a.key,
    a.img,
  );
  assert.equal(r.code, 0, r.err);
  assert.equal(cs('isLuks', a.img).status, 0);
  noReencrypt(a.img);
  assert.ok(plaintextOf(a.img, a.img, a.key).equals(a.plain));
  r = await cm('reencrypt', '--encrypt', '-q', '--reduce-device-size', '4M', ...FAST_PBKDF, '--key-file', a.key, a.img);
  assert.equal(r.code, 1);
  assert.match(r.err, /already LUKS device/);
  r = await cm('reencrypt', '--encrypt', '-q', ...FAST_PBKDF, '--key-file', a.key, a.img);
  assert.equal(r.code, 1);
  assert.match(r.err, /not possible without data device size reduction/);
});

test('encrypt with a detached header, both ways', async () => {
  const a = fresh('d.img', 0);
  const ah = join(dir, 'd.hdr');
  let r = await cm(
    'reencrypt',
    '--encrypt',
    '--init-only',
    '-q',
    '--header',
    ah,
    ...FAST_PBKDF,
    '--key-file',
    a.key,
    a.img,
  );
  assert.equal(r.code, 0, r.err);
  csReencrypt('--resume-only', '--header', ah, '--key-file', a.key, a.img);
  noReencrypt(ah);
  assert.ok(plaintextOf(a.img, ah, a.key).equals(a.plain));

  const b = fresh('e.img', 0);
  const bh = join(dir, 'e.hdr');
  csReencrypt('--encrypt', '--init-only', '--header', bh, ...FAST_PBKDF, '--key-file', b.key, b.img);
  r = await cm(...RESUME, '--header', bh, '--hotzone-size', '1M', '--key-file', b.key, b.img);
  assert.equal(r.code, 0, r.err);
  noReencrypt(bh);
  assert.ok(plaintextOf(b.img, bh, b.key).equals(b.plain));
});

test('encrypt with a detached header and --reduce-device-size (cryptsetup 2.6: data in place, datashift), both ways, also mid-way', async () => {
  // Hotzones of the shift (1664 KiB: a quarter of the data, so that a run stopped after two of
  // them is one cryptsetup resumes; it cannot resume its own runs stopped where the rest is not a
  // multiple of the shift) and a data offset below it (the keyslots area shrinks to fit).
  const OFF = 1 << 20;
  const make = (name: string) => {
    const f = fresh(name, 0);
    const head = randomBytes(OFF);
    writeFileSync(f.img, Buffer.concat([head, f.plain]));
    return { ...f, head, hdr: `${f.img}.hdr` };
  };
  const args = (x: { hdr: string; key: string; img: string }) => [
    '--encrypt',
    '-q',
    '--header',
    x.hdr,
    '--offset',
    String(OFF / 512),
    '--reduce-device-size',
    '1664K',
    ...FAST_PBKDF,
    '--key-file',
    x.key,
    x.img,
  ];
  const check = (x: ReturnType<typeof make>) => {
    noReencrypt(x.hdr);
    assert.ok(plaintextOf(x.img, x.hdr, x.key).equals(x.plain));
    assert.ok(readFileSync(x.img).subarray(0, OFF).equals(x.head), 'the bytes before the data offset are not touched');
  };
  // cryptmap begins (the keyslots area shrunk to fit before --offset, with cryptsetup's warning).
  const a = make('ha.img');
  let r = await cm('reencrypt', '--init-only', ...args(a));
  assert.equal(r.code, 0, r.err);
  assert.equal(r.out, `WARNING: LUKS2 keyslots area size changed to ${OFF - 0x8000} bytes.\n`);
  const ref = make('hr.img');
  const c0 = cs('reencrypt', '--init-only', '--force-offline-reencrypt', ...args(ref));
  assert.equal(c0.status, 0, c0.out);
  const shape = (h: string) =>
    cs('luksDump', h)
      .out.split('\n')
      .filter((l) => !/UUID|Epoch|Salt|Digest:|^\t {3,}[0-9a-f]{2} /.test(l))
      .join('\n');
  assert.equal(shape(a.hdr), shape(ref.hdr));
  assert.equal(readFileSync(a.hdr).length, readFileSync(ref.hdr).length);
  csReencrypt('--resume-only', '--header', a.hdr, '--key-file', a.key, a.img);
  check(a);
  // cryptsetup begins, cryptmap runs.
  r = await cm(...RESUME, '--header', ref.hdr, '--key-file', ref.key, ref.img);
  assert.equal(r.code, 0, r.err);
  check(ref);
  // cryptmap stops after its first hotzone; cryptsetup finishes.
  const m = make('hm.img');
  r = await cm('reencrypt', '--init-only', ...args(m));
  assert.equal(r.code, 0, r.err);
  const hdev = await FileDevice.open(m.hdr, { readOnly: false });
  const ddev = await FileDevice.open(m.img, { readOnly: false });
  try {
    const ac = new AbortController();
    let steps = 0;
    const done = await runReencrypt(await Luks2Volume.open(hdev), Buffer.from('secret pass'), {
      dataDev: ddev,
      signal: ac.signal,
      onProgress: () => {
        if (++steps === 3) ac.abort();
      },
    });
    assert.equal(done, false);
  } finally {
    await hdev.close();
    await ddev.close();
  }
  assert.match(cs('luksDump', m.hdr).out, /online-reencrypt-v2/);
  csReencrypt('--resume-only', '--header', m.hdr, '--key-file', m.key, m.img);
  check(m);
});

test('decrypt with a detached header, both ways; without --header it is refused', async () => {
  for (const [first, second] of [
    ['cm', 'cs'],
    ['cs', 'cm'],
  ] as const) {
    const a = fresh(`f-${first}.img`, 0);
    const h = join(dir, `f-${first}.hdr`);
    csReencrypt('--encrypt', '--header', h, ...FAST_PBKDF, '--key-file', a.key, a.img);
    assert.equal((await cm('reencrypt', '--decrypt', '-q', '--key-file', a.key, h)).code, 1);
    if (first === 'cm') {
      const r = await cm('reencrypt', '--decrypt', '--init-only', '-q', '--header', h, '--key-file', a.key, a.img);
      assert.equal(r.code, 0, r.err);
      csReencrypt('--resume-only', '--header', h, '--key-file', a.key, a.img);
    } else {
      csReencrypt('--decrypt', '--init-only', '--header', h, '--key-file', a.key, a.img);
      const r = await cm(...RESUME, '--header', h, '--hotzone-size', '1M', '--key-file', a.key, a.img);
      assert.equal(r.code, 0, r.err);
    }
    noReencrypt(h);
    assert.ok(dump(h, a.key).linear);
    assert.ok(readFileSync(a.img).subarray(0, PLAIN).equals(a.plain), `decrypted by ${second}`);
  }
});

test('encrypt in place: cryptsetup killed -9 mid-way, cryptmap resumes; cryptmap crashes mid-way, cryptsetup resumes', async () => {
  // cryptsetup is stopped (SIGSTOP) once the header shows an encrypted part (a crypt segment of fixed
  // length), then killed -9 if the header is still in reencryption; a run that finished before it
  // could be stopped is tried again on a fresh image, and the test fails if none was caught mid-way.
  let a: ReturnType<typeof fresh> | undefined;
  for (let attempt = 0; attempt < 5 && !a; attempt++) {
    const t = fresh(`k${attempt}.img`, REDUCE);
    const child = spawn(
      'cryptsetup',
      [
        'reencrypt',
        '--encrypt',
        '--force-offline-reencrypt',
        '-q',
        '--type',
        'luks2',
        '--reduce-device-size',
        String(REDUCE),
        ...FAST_PBKDF,
        '--key-file',
        t.key,
        t.img,
      ],
      { stdio: 'ignore' },
    );
    const exited = new Promise<void>((r) => child.once('exit', () => r()));
    let gone = false;
    void exited.then(() => {
      gone = true;
    });
    for (let i = 0; i < 1500 && !gone; i++) {
      const d = cs('luksDump', '--disable-locks', t.img).out;
      if (/crypt\n\toffset: [0-9]+ \[bytes\]\n\tlength: [0-9]+ \[bytes\]/.test(d)) break;
      await new Promise((r) => setTimeout(r, 10));
    }
    child.kill('SIGSTOP');
    // --disable-locks: the stopped cryptsetup holds its lock, a locking luksDump would wait for it forever.
    const midway = /online-reencrypt-v2/.test(cs('luksDump', '--disable-locks', t.img).out);
    child.kill('SIGKILL');
    await exited;
    if (midway) a = t;
  }
  assert.ok(a, 'cryptsetup finished every time before it could be killed mid-way: resume was not exercised');
  const resumed = await cm(...RESUME, '--key-file', a.key, a.img);
  assert.equal(resumed.code, 0, resumed.err);
  noReencrypt(a.img);
  assert.ok(plaintextOf(a.img, a.img, a.key).equals(a.plain));

  // cryptmap cut off after a few writes of the run (a hotzone in flight), cryptsetup repairs and resumes.
  const b = fresh('l.img', REDUCE);
  const file = await FileDevice.open(b.img);
  try {
    const v = await initEncrypt(file, undefined, Buffer.from('secret pass'), {
      keyslot: { kdf: { type: 'pbkdf2', hash: 'sha256', iterations: 1000 } },
      reduceBytes: REDUCE,
    });
    const faulty = await Luks2Volume.open(new FaultDevice(file, { crashAfterWrites: 7 }));
    await assert.rejects(
      runReencrypt(faulty, Buffer.from('secret pass')),
      (e) => e instanceof CryptmapError && e.code === 'EFAULT_CRASH',
    );
    await v.close();
  } finally {
    await file.close();
  }
  assert.match(cs('luksDump', b.img).out, /online-reencrypt-v2/);
  const rr = cs('repair', '-q', '--key-file', b.key, b.img);
  assert.equal(rr.status, 0, rr.out);
  csReencrypt('--resume-only', '--key-file', b.key, b.img);
  noReencrypt(b.img);
  assert.ok(plaintextOf(b.img, b.img, b.key).equals(b.plain));
});
