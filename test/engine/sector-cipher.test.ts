/**
 * The engine contract over every backend: cross-check against the per-sector node:crypto reference on
 * seeded random data, IV numbering (512-byte units, iv_large_sectors, iv_offset, plain's 2^32 wrap),
 * in place and into a destination, async forms, equal XTS key halves, and the error codes for bad input.
 */
import assert from 'node:assert/strict';
import { closeSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { makeTempDir } from '../helpers/tmp.js';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import type { SectorBytes } from '../../src/engine/index.js';
import type { ErrorCode } from '../../src/util/errors.js';
import { TEST_BACKENDS } from './backends.js';
import { createSectorCipher, isCryptmapError, setCryptThreads } from './imports.js';
import { refCrypt } from './reference.js';
import { byteStream } from '../helpers/prng.js';

const SPECS: { spec: string; chain: string; iv: string | undefined; opts?: string; keys: number[] }[] = [
  { spec: 'aes-xts-plain64', chain: 'xts', iv: 'plain64', keys: [32, 64] },
  { spec: 'aes-xts-plain', chain: 'xts', iv: 'plain', keys: [32, 64] },
  { spec: 'aes-xts-plain64be', chain: 'xts', iv: 'plain64be', keys: [64] },
  { spec: 'aes-xts-essiv:sha256', chain: 'xts', iv: 'essiv', opts: 'sha256', keys: [32] },
  { spec: 'aes-xts-benbi', chain: 'xts', iv: 'benbi', keys: [32] },
  { spec: 'aes-xts-null', chain: 'xts', iv: 'null', keys: [64] },
  { spec: 'capi:xts(aes)-plain64', chain: 'xts', iv: 'plain64', keys: [64] },
  { spec: 'aes-cbc-essiv:sha256', chain: 'cbc', iv: 'essiv', opts: 'sha256', keys: [16, 24, 32] },
  { spec: 'aes-cbc-plain64', chain: 'cbc', iv: 'plain64', keys: [16, 32] },
  { spec: 'aes-cbc-plain', chain: 'cbc', iv: 'plain', keys: [32] },
  { spec: 'aes-cbc-benbi', chain: 'cbc', iv: 'benbi', keys: [32] },
  { spec: 'aes-cbc-essiv:md5', chain: 'cbc', iv: 'essiv', opts: 'md5', keys: [32] },
  { spec: 'aes-ecb', chain: 'ecb', iv: undefined, keys: [16, 32] },
];

const rng = byteStream;

function code(c: ErrorCode): (e: unknown) => boolean {
  return (e) => isCryptmapError(e, c);
}

for (const backend of TEST_BACKENDS) {
  describe(`sector cipher [${backend}]`, () => {
    it('matches the per-sector reference for every spec, key size and sector size', () => {
      const rand = rng(7);
      for (const s of SPECS) {
        for (const kb of s.keys) {
          for (const sb of [512, 1024, 2048, 4096] as SectorBytes[]) {
            for (const large of [false, true]) {
              const key = rand(kb);
              const data = rand(sb * 5);
              const spb = BigInt(sb / 512);
              const sector = spb * 3n + 0xfffffff0n * spb; // crosses bit 32 in some IV modes
              const c = createSectorCipher({
                spec: s.spec,
                key,
                sectorBytes: sb,
                ivLargeSectors: large,
                backend,
                ivOffsetSectors: spb * 2n,
              });
              const ivFirst = large ? (sector + spb * 2n) / spb : sector + spb * 2n;
              const step = large ? 1n : spb;
              const want = refCrypt(true, s.chain, s.iv, s.opts, key, sb, data, ivFirst, step);
              const out = Buffer.alloc(data.length);
              c.encrypt(data, sector, out);
              assert.ok(out.equals(want), `${s.spec} key ${kb} sector ${sb} large ${large}`);
              const back = Buffer.from(out);
              c.decrypt(back, sector);
              assert.ok(back.equals(data), `${s.spec} decrypt`);
              c.dispose();
            }
          }
        }
      }
    });

    it('agrees with the reference on random requests (property)', () => {
      fc.assert(
        fc.property(
          fc.constantFrom(...SPECS),
          fc.constantFrom<SectorBytes>(512, 1024, 4096),
          fc.integer({ min: 1, max: 9 }),
          fc.bigInt({ min: 0n, max: (1n << 40n) - 1n }),
          fc.boolean(),
          fc.integer({ min: 1, max: 0x7fffffff }),
          (s, sb, count, sec, large, seed) => {
            const rand = rng(seed);
            const key = rand(s.keys[seed % s.keys.length]!);
            const spb = BigInt(sb / 512);
            const sector = sec * spb;
            const data = rand(sb * count);
            const c = createSectorCipher({ spec: s.spec, key, sectorBytes: sb, ivLargeSectors: large, backend });
            const want = refCrypt(true, s.chain, s.iv, s.opts, key, sb, data, large ? sec : sector, large ? 1n : spb);
            c.encrypt(data, sector);
            c.dispose();
            return data.equals(want);
          },
        ),
        { seed: 42, numRuns: 60 },
      );
    });

    it('numbers IVs in 512-byte units, or per sector with iv_large_sectors', () => {
      // plain64 with a 4096-byte sector: IVs 0, 8, 16 (LUKS2) or 0, 1, 2 (iv_large_sectors).
      const key = rng(1)(64);
      const data = rng(2)(4096 * 3);
      for (const [large, ivs] of [
        [false, [0n, 8n, 16n]],
        [true, [0n, 1n, 2n]],
      ] as const) {
        const c = createSectorCipher({
          spec: 'aes-xts-plain64',
          key,
          sectorBytes: 4096,
          ivLargeSectors: large,
          backend,
        });
        const out = Buffer.alloc(data.length);
        c.encrypt(data, 0n, out);
        for (let i = 0; i < 3; i++) {
          const one = refCrypt(
            true,
            'xts',
            'plain64',
            undefined,
            key,
            4096,
            data.subarray(i * 4096, (i + 1) * 4096),
            ivs[i]!,
            0n,
          );
          assert.ok(out.subarray(i * 4096, (i + 1) * 4096).equals(one), `sector ${i}`);
        }
        c.dispose();
      }
    });

    it('plain wraps at 2^32 while plain64 does not', () => {
      const key = rng(3)(32);
      const data = rng(4)(512);
      const enc = (spec: string, sector: bigint) => {
        const c = createSectorCipher({ spec, key, backend });
        const b = Buffer.from(data);
        c.encrypt(b, sector);
        c.dispose();
        return b;
      };
      assert.ok(enc('aes-cbc-plain', 1n << 32n).equals(enc('aes-cbc-plain', 0n)));
      assert.ok(enc('aes-cbc-plain', (1n << 32n) + 5n).equals(enc('aes-cbc-plain', 5n)));
      assert.ok(!enc('aes-cbc-plain64', 1n << 32n).equals(enc('aes-cbc-plain64', 0n)));
      // A run crossing the wrap: sector 2^32-1 then 2^32 (= IV 0).
      const c = createSectorCipher({ spec: 'aes-cbc-plain', key, backend });
      const two = Buffer.concat([data, data]);
      c.encrypt(two, (1n << 32n) - 1n);
      assert.ok(two.subarray(512).equals(enc('aes-cbc-plain', 0n)));
      assert.ok(two.subarray(0, 512).equals(enc('aes-cbc-plain', 0xffffffffn)));
      c.dispose();
    });

    it('works in place, into a separate buffer, and on subarray views', () => {
      const key = rng(5)(64);
      const data = rng(6)(512 * 8);
      const c = createSectorCipher({ spec: 'aes-xts-plain64', key, backend });
      const a = Buffer.from(data);
      c.encrypt(a, 16n);
      const b = Buffer.alloc(data.length);
      c.encrypt(data, 16n, b);
      assert.ok(a.equals(b));
      assert.ok(!a.equals(data));
      // views at odd offsets of a bigger buffer
      const big = Buffer.alloc(data.length + 3);
      data.copy(big, 3);
      const view = new Uint8Array(big.buffer, big.byteOffset + 3, data.length);
      c.encrypt(view, 16n);
      assert.ok(Buffer.from(view).equals(a));
      c.decrypt(view, 16n);
      assert.ok(Buffer.from(view).equals(data));
      // cbc in place both ways
      const cc = createSectorCipher({ spec: 'aes-cbc-essiv:sha256', key: key.subarray(0, 32), backend });
      const x = Buffer.from(data);
      const y = Buffer.alloc(data.length);
      cc.encrypt(x, 9n);
      cc.encrypt(data, 9n, y);
      assert.ok(x.equals(y));
      cc.decrypt(x, 9n);
      assert.ok(x.equals(data));
      cc.decrypt(y, 9n, y);
      assert.ok(y.equals(data));
      c.dispose();
      cc.dispose();
    });

    it('handles XTS keys whose halves are equal (OpenSSL refuses them)', () => {
      const key = Buffer.alloc(64, 0x5a);
      const data = rng(8)(4096);
      const c = createSectorCipher({ spec: 'aes-xts-plain64', key, backend });
      const b = Buffer.from(data);
      c.encrypt(b, 0n);
      // Check against the decrypt direction of the reference, which OpenSSL permits.
      const back = refCrypt(false, 'xts', 'plain64', undefined, key, 512, b, 0n, 1n);
      assert.ok(back.equals(data));
      c.decrypt(b, 0n);
      assert.ok(b.equals(data));
      c.dispose();
    });

    it('supports aes-192 xts (48-byte keys)', () => {
      const key = rng(9)(48);
      const data = rng(10)(1024);
      const c = createSectorCipher({ spec: 'aes-xts-plain64', key, backend });
      const b = Buffer.from(data);
      c.encrypt(b, 0n);
      assert.ok(!b.equals(data));
      c.decrypt(b, 0n);
      assert.ok(b.equals(data));
      c.dispose();
    });

    it('cipher_null-ecb copies', () => {
      const c = createSectorCipher({ spec: 'cipher_null-ecb', key: new Uint8Array(0), backend });
      const data = rng(11)(1024);
      const out = Buffer.alloc(1024);
      c.encrypt(data, 0n, out);
      assert.ok(out.equals(data));
      c.decrypt(out, 2n);
      assert.ok(out.equals(data));
      c.dispose();
    });

    it('async forms give the same bytes, large and small, and sameCpu', async () => {
      const key = rng(12)(64);
      const data = rng(13)(1 << 20);
      const want = Buffer.alloc(data.length);
      const c = createSectorCipher({ spec: 'aes-xts-plain64', key, sectorBytes: 4096, backend });
      c.encrypt(data, 0n, want);
      const got = Buffer.alloc(data.length);
      await c.encryptAsync(data, 0n, got);
      assert.ok(got.equals(want));
      // Several concurrent requests on one key.
      const parts = await Promise.all(
        [0, 1, 2, 3].map(async (i) => {
          const b = Buffer.from(data.subarray(i * 262144, (i + 1) * 262144));
          await c.encryptAsync(b, BigInt(i * 512));
          return b;
        }),
      );
      assert.ok(Buffer.concat(parts).equals(want));
      await c.decryptAsync(got, 0n);
      assert.ok(got.equals(data));
      const small = Buffer.from(data.subarray(0, 4096));
      await c.encryptAsync(small, 0n);
      assert.ok(small.equals(want.subarray(0, 4096)));
      c.dispose();
      const s = createSectorCipher({ spec: 'aes-xts-plain64', key, sectorBytes: 4096, backend, sameCpu: true });
      const t = Buffer.from(data);
      await s.encryptAsync(t, 0n);
      assert.ok(t.equals(want));
      s.dispose();
    });

    it('a deep queue of large requests (completions delivered in batches) settles every request with the right bytes', async () => {
      const key = rng(14)(64);
      const c = createSectorCipher({ spec: 'aes-xts-plain64', key, sectorBytes: 4096, backend, asyncMinBytes: 0 });
      const mib = 1 << 20;
      const data = rng(15)(24 * mib);
      const want = Buffer.alloc(data.length);
      c.encrypt(data, 0n, want);
      for (const threads of [1, 2]) {
        const prev = setCryptThreads(threads);
        try {
          // 24 requests of 1 MiB in flight plus small ones mixed in: the pool holds completions back
          // while its queue is deep; every promise must still settle, in any order, with the right bytes.
          const got = Buffer.from(data);
          const settled: number[] = [];
          await Promise.all(
            Array.from({ length: 24 }, async (_, i) => {
              await c.encryptAsync(got.subarray(i * mib, (i + 1) * mib), BigInt((i * mib) / 512));
              settled.push(i);
            }),
          );
          assert.equal(settled.length, 24);
          assert.ok(got.equals(want), `pool of ${threads}: ciphertext differs`);
          const small = Buffer.from(data.subarray(0, 4096));
          await c.decryptAsync(Buffer.from(want.subarray(0, 4096)), 0n, small);
          assert.ok(small.equals(data.subarray(0, 4096)));
        } finally {
          if (prev > 0) setCryptThreads(prev);
        }
      }
      c.dispose();
    });

    it('file forms: encryptWriteAsync writes what encrypt produces, readDecryptAsync reads it back; I/O errors keep their errno code', async () => {
      const { dir, cleanup: removeDir } = makeTempDir('cryptmap-engine-file-');
      const file = join(dir, 'f');
      writeFileSync(file, Buffer.alloc(3 << 20, 0xaa), { mode: 0o600 });
      const fd = openSync(file, 'r+');
      try {
        const key = rng(16)(64);
        const data = rng(17)(1 << 20);
        const want = Buffer.alloc(data.length);
        for (const sameCpu of [false, true]) {
          const c = createSectorCipher({ spec: 'aes-xts-plain64', key, sectorBytes: 4096, backend, sameCpu });
          c.encrypt(data, 8n, want);
          // Into a separate buffer (the source stays plaintext), at a file offset unrelated to the sector.
          const dst = Buffer.alloc(data.length);
          await c.encryptWriteAsync(fd, 4096, data, 8n, dst);
          assert.ok(dst.equals(want));
          assert.ok(
            readFileSync(file)
              .subarray(4096, 4096 + data.length)
              .equals(want),
            `ciphertext in the file (sameCpu ${sameCpu})`,
          );
          assert.ok(readFileSync(file).subarray(0, 4096).equals(Buffer.alloc(4096, 0xaa)), 'bytes before untouched');
          // In place.
          const inPlace = Buffer.from(data);
          await c.encryptWriteAsync(fd, 2 << 20, inPlace, 8n);
          assert.ok(inPlace.equals(want));
          const back = Buffer.alloc(data.length);
          await c.readDecryptAsync(fd, 2 << 20, back, 8n);
          assert.ok(back.equals(data), 'plaintext read back');
          await c.readDecryptAsync(fd, 0, Buffer.alloc(0), 0n); // nothing to do
          // Past the end of the file: a short read, never silently zero-filled plaintext.
          await assert.rejects(c.readDecryptAsync(fd, (3 << 20) - 4096, Buffer.alloc(8192), 0n), { code: 'ESHORTIO' });
          await assert.rejects(c.readDecryptAsync(fd, -1, Buffer.alloc(4096), 0n), code('EINVAL'));
          await assert.rejects(c.encryptWriteAsync(1.5, 0, Buffer.alloc(4096), 0n), code('EINVAL'));
          await assert.rejects(c.readDecryptAsync(fd, 0, Buffer.alloc(100), 0n), code('EALIGN'));
          c.dispose();
        }
        // A descriptor that is not open: the system's errno name comes back as the code.
        const c = createSectorCipher({ spec: 'aes-xts-plain64', key, sectorBytes: 4096, backend });
        const closed = openSync(file, 'r');
        closeSync(closed);
        await assert.rejects(c.readDecryptAsync(closed, 0, Buffer.alloc(4096), 0n), { code: 'EBADF' });
        await assert.rejects(c.encryptWriteAsync(closed, 0, Buffer.alloc(4096), 0n), { code: 'EBADF' });
        c.dispose();
      } finally {
        closeSync(fd);
        removeDir();
      }
    });

    it('rejects bad input with stable codes', async () => {
      const key = Buffer.alloc(64, 1);
      key[0] = 2;
      assert.throws(
        () => createSectorCipher({ spec: 'aes-xts-plain64', key: key.subarray(0, 20), backend }),
        code('EKEY_SIZE'),
      );
      assert.throws(() => createSectorCipher({ spec: 'aes-cbc-essiv:sha256', key, backend }), code('EKEY_SIZE'));
      assert.throws(() => createSectorCipher({ spec: 'aes-xts-', key, backend }), code('ECIPHER_SPEC'));
      assert.throws(
        () => createSectorCipher({ spec: 'serpent-xts-plain64', key, backend }),
        code('ECIPHER_UNSUPPORTED'),
      );
      assert.throws(
        () => createSectorCipher({ spec: 'aes-xts-plain64', key, sectorBytes: 8192 as SectorBytes, backend }),
        code('ESECTOR_SIZE'),
      );
      assert.throws(
        () => createSectorCipher({ spec: 'aes-xts-plain64', key, sectorBytes: 4096, ivOffsetSectors: 3n, backend }),
        code('EALIGN'),
      );
      const c = createSectorCipher({ spec: 'aes-xts-plain64', key, sectorBytes: 4096, backend });
      assert.throws(() => c.encrypt(Buffer.alloc(4095), 0n), code('EALIGN'));
      assert.throws(() => c.encrypt(Buffer.alloc(512), 0n), code('EALIGN'));
      assert.throws(() => c.encrypt(Buffer.alloc(4096), 1n), code('EALIGN'));
      assert.throws(() => c.encrypt(Buffer.alloc(4096), -8n), code('ERANGE'));
      assert.throws(() => c.encrypt(Buffer.alloc(4096), 1n << 64n), code('ERANGE'));
      assert.throws(() => c.encrypt(Buffer.alloc(8192), (1n << 64n) - 8n), code('ERANGE'));
      c.encrypt(Buffer.alloc(4096), (1n << 64n) - 8n); // the very last sector is fine
      assert.throws(() => c.encrypt(Buffer.alloc(4096), 0n, Buffer.alloc(8192)), code('EINVAL'));
      const shared = Buffer.alloc(8192 + 512);
      assert.throws(() => c.encrypt(shared.subarray(0, 8192), 0n, shared.subarray(512)), code('EOVERLAP'));
      await assert.rejects(c.encryptAsync(Buffer.alloc(100), 0n), code('EALIGN'));
      c.encrypt(Buffer.alloc(0), 0n); // empty request: nothing to do
      c.dispose();
      c.dispose();
      assert.throws(() => c.encrypt(Buffer.alloc(4096), 0n), code('EDISPOSED'));
      const o = createSectorCipher({ spec: 'aes-xts-plain64', key, ivOffsetSectors: (1n << 64n) - 1n, backend });
      o.encrypt(Buffer.alloc(512), 0n);
      assert.throws(() => o.encrypt(Buffer.alloc(512), 1n), code('ERANGE'));
      o.dispose();
    });
  });
}
