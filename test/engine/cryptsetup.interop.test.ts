/**
 * Interop with cryptsetup 2.6 (Debian cryptsetup-bin), no device-mapper needed: `cryptsetup reencrypt
 * --encrypt` turns a file of known plaintext into a LUKS2 volume in userspace; `luksDump
 * --dump-volume-key` gives the volume key and the data segment offset; every sector of the data
 * segment must decrypt to the plaintext under both backends (and, for XTS, each native implementation
 * the CPU supports), and encrypting the plaintext must give the image's bytes. Recipe: ../shared/INTEROP.md "Known data in a LUKS volume without device-mapper".
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { copyFileSync, readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { fileTempDir } from '../helpers/tmp.js';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { seededBytes } from '../helpers/prng.js';
import type { BackendName, SectorBytes } from '../../src/engine/index.js';
import { loadNative, XTS_IMPL_IDS } from '../../src/util/native.js';
import { TEST_BACKENDS } from './backends.js';
import { createSectorCipher } from './imports.js';
import { FAST_PBKDF } from '../helpers/luks.js';

const DATA_BYTES = 4 << 20;

function cryptsetup(args: string[]): string {
  const r = spawnSync('cryptsetup', args, { encoding: 'utf8' });
  if (r.error) assert.fail(`cryptsetup not runnable (${r.error.message}): install the Debian package cryptsetup-bin`);
  assert.equal(r.status, 0, `cryptsetup ${args.join(' ')} failed: ${r.stderr}`);
  return r.stdout;
}

/** Deterministic pseudo-random plaintext (xorshift32). */
const plaintext = (seed: number): Buffer => seededBytes(DATA_BYTES, seed);

const CASES: { spec: string; keyBits: number; sectorBytes: SectorBytes }[] = [
  { spec: 'aes-xts-plain64', keyBits: 256, sectorBytes: 512 },
  { spec: 'aes-xts-plain64', keyBits: 512, sectorBytes: 512 },
  { spec: 'aes-xts-plain64', keyBits: 256, sectorBytes: 4096 },
  { spec: 'aes-xts-plain64', keyBits: 512, sectorBytes: 4096 },
  { spec: 'aes-cbc-essiv:sha256', keyBits: 256, sectorBytes: 512 },
  { spec: 'aes-cbc-essiv:sha256', keyBits: 128, sectorBytes: 4096 },
  { spec: 'aes-xts-plain', keyBits: 512, sectorBytes: 512 },
  { spec: 'aes-cbc-plain64', keyBits: 256, sectorBytes: 512 },
];

describe('engine vs cryptsetup reencrypt --encrypt (LUKS2 data segment)', () => {
  const dir = fileTempDir('cryptmap-engine-interop-');

  CASES.forEach((c, n) => {
    it(`${c.spec} ${c.keyBits}-bit key, ${c.sectorBytes}-byte sectors`, () => {
      const plain = plaintext(0x9e3779b9 ^ (n + 1));
      const img = join(dir, `case${n}.img`);
      const keyFile = join(dir, `case${n}.key`);
      writeFileSync(keyFile, `passphrase ${n}`, { mode: 0o600 });
      writeFileSync(img, plain);
      truncateSync(img, DATA_BYTES + (4 << 20));
      cryptsetup([
        'reencrypt',
        '--encrypt',
        '--type',
        'luks2',
        '--reduce-device-size',
        '4M',
        '--luks2-keyslots-size',
        '1M',
        '--batch-mode',
        '--key-file',
        keyFile,
        ...FAST_PBKDF,
        '--cipher',
        c.spec,
        '--key-size',
        String(c.keyBits),
        '--sector-size',
        String(c.sectorBytes),
        img,
      ]);
      // Work on a copy for the dump: cryptsetup may rewrite header copies on read.
      const dumpCopy = join(dir, `case${n}.dump.img`);
      copyFileSync(img, dumpCopy);
      const dump = cryptsetup(['luksDump', '--dump-volume-key', '--batch-mode', '--key-file', keyFile, dumpCopy]);
      const hdr = cryptsetup(['luksDump', dumpCopy]);
      const mk = /MK dump:\s*((?:[0-9a-f]{2}\s+)+)/.exec(dump);
      assert.ok(mk, `no MK dump in luksDump output`);
      const key = Buffer.from(mk[1]!.replace(/\s+/g, ''), 'hex');
      assert.equal(key.length * 8, c.keyBits);
      const seg =
        /Data segments:\s*\n\s*0: crypt\s*\n\s*offset: (\d+) \[bytes\][\s\S]*?cipher: (\S+)\s*\n\s*sector: (\d+) \[bytes\]/.exec(
          hdr,
        );
      assert.ok(seg, `no data segment in luksDump output:\n${hdr}`);
      assert.equal(seg[2], c.spec);
      assert.equal(Number(seg[3]), c.sectorBytes);
      const offset = Number(seg[1]);
      const disk = readFileSync(img).subarray(offset, offset + DATA_BYTES);
      // Each backend, and for XTS each native implementation this CPU supports (vaes512, vaes256, aesni, evp).
      const variants: [string, BackendName, number][] = TEST_BACKENDS.map((b) => [b, b, 0]);
      if (c.spec.includes('-xts-'))
        for (const impl of loadNative()?.xtsImpls ?? [])
          variants.push([`native ${impl}`, 'native', XTS_IMPL_IDS[impl]]);
      for (const [what, backend, impl] of variants) {
        const cipher = createSectorCipher({ spec: c.spec, key, sectorBytes: c.sectorBytes, backend });
        if (impl) (cipher as unknown as { setXtsImplForBench(n: number): void }).setXtsImplForBench(impl);
        const out = Buffer.alloc(DATA_BYTES);
        cipher.decrypt(disk, 0n, out);
        const bad = [];
        for (let s = 0; s < DATA_BYTES && bad.length < 5; s += c.sectorBytes) {
          if (!out.subarray(s, s + c.sectorBytes).equals(plain.subarray(s, s + c.sectorBytes)))
            bad.push(s / c.sectorBytes);
        }
        assert.deepEqual(bad, [], `${what}: sectors that do not decrypt to the plaintext`);
        const enc = Buffer.from(plain);
        cipher.encrypt(enc, 0n);
        assert.ok(enc.equals(disk), `${what}: encrypting the plaintext does not give cryptsetup's bytes`);
        cipher.dispose();
      }
      key.fill(0);
    });
  });
});
