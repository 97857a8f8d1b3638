// `cryptmap reencrypt` refusals before any work, with cryptsetup 2.6 as the oracle (same message, same
// exit code): a --type that is not the device's ("Conflicting versions. ..."), --resume-only of a device
// not in reencryption. LUKS1 reencryption is not built (cryptsetup's legacy one runs through
// device-mapper): a LUKS1 device, or one in cryptsetup's legacy LUKS1 reencryption (magic LUKS\xde\xad,
// which cryptsetup itself reports as "in LUKS1 reencryption"), is refused with exit 1 and left as it was.
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { before, test } from 'node:test';
import { main } from '../../src/cli/main.js';
import { FAST_LUKS2_FORMAT, FAST_PBKDF } from '../helpers/luks.js';
import { Sink } from './helpers.js';
import { cryptsetupSync, type CryptsetupResult } from '../helpers/tools.js';
import { fileTempDir } from '../helpers/tmp.js';

const dir = fileTempDir('cm-reenc-ver-');
const key = join(dir, 'key');
before(() => writeFileSync(key, 'versions', { mode: 0o600 }));

function cs(...args: string[]): CryptsetupResult {
  return cryptsetupSync(args, { cwd: dir });
}

async function cm(...argv: string[]): Promise<{ code: number; err: string }> {
  const err = new Sink();
  const code = await main(argv, {
    stdin: Readable.from([]) as unknown as NodeJS.ReadableStream,
    stdout: new Sink(),
    stderr: err,
    env: { ...process.env, CRYPTMAP_LOCK_DIR: join(dir, 'locks') },
  });
  return { code, err: err.data };
}

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
    const got = await cm('reencrypt', '-q', '--key-file', key, ...args);
    assert.equal(got.code, want.status, `${args.join(' ')}: ${got.err} / cryptsetup: ${want.out}`);
    assert.equal(got.err.trim(), want.out.trim(), args.join(' '));
  }
  assert.match(cs('luksDump', mid).out, /online-reencrypt/, 'nothing changed the reencryption in progress');
});

test('LUKS1, and LUKS1 in cryptsetup legacy reencryption: refused (exit 1), the device unchanged', async () => {
  const l1 = image('r1.img', 'luks1');
  const stained = image('r1-stained.img', 'luks1');
  const b = readFileSync(stained);
  b[4] = 0xde;
  b[5] = 0xad;
  writeFileSync(stained, b);
  for (const [img, args, why] of [
    [l1, [], /LUKS1 reencryption is not supported by cryptmap: convert the device to LUKS2/],
    [l1, ['--decrypt'], /LUKS1 reencryption is not supported by cryptmap/],
    [stained, [], /is in LUKS1 reencryption \(cryptsetup's legacy format/],
    [stained, ['--encrypt', '--reduce-device-size', '4M'], /is in LUKS1 reencryption/],
  ] as Array<[string, string[], RegExp]>) {
    const was = readFileSync(img);
    const r = await cm('reencrypt', '-q', '--key-file', key, ...args, img);
    assert.equal(r.code, 1, r.err);
    assert.match(r.err, why);
    assert.ok(readFileSync(img).equals(was), `${args.join(' ')} ${img}: unchanged`);
  }
  // Not built either: cryptsetup's --decrypt --header NEW of an in-place LUKS2 header (header export).
  const l2 = image('r2.img', 'luks2');
  const was = readFileSync(l2);
  const r = await cm('reencrypt', '--decrypt', '-q', '--header', join(dir, 'exported.hdr'), '--key-file', key, l2);
  assert.equal(r.code, 1, r.err);
  assert.match(r.err, /header exported to .* is not supported by cryptmap yet/);
  assert.ok(readFileSync(l2).equals(was));
  // cryptsetup takes that magic for its own reencryption in progress.
  assert.match(cs('reencrypt', '-q', '--type', 'luks2', '--key-file', key, stained).out, /in LUKS1 reencryption/);
});
