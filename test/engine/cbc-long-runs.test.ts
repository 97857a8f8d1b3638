/**
 * CBC encryption of long requests over every backend against the per-sector node:crypto reference.
 * The js backend encrypts runs of at least 4 x (sectorBytes / 16) sectors block column by block
 * column and shorter ones sector by sector (src/crypto/backends/js.ts): the counts here sit on both
 * sides of that switch, in place and into a destination, with IVs crossing bit 32.
 */
import assert from 'node:assert/strict';
import { createCipheriv, createHash } from 'node:crypto';
import { describe, it } from 'node:test';
import type { SectorBytes } from '../../src/engine/index.js';
import { TEST_BACKENDS } from './backends.js';
import { createSectorCipher } from './imports.js';
import { refCrypt } from './reference.js';

/** Deterministic bytes: an AES-128-CTR keystream under a key derived from `label`. */
function bytes(label: string, n: number): Buffer {
  const k = createHash('sha256').update(label).digest();
  return createCipheriv('aes-128-ctr', k.subarray(0, 16), k.subarray(16)).update(Buffer.alloc(n));
}

const SPECS: { spec: string; iv: string; opts?: string; key: number }[] = [
  { spec: 'aes-cbc-essiv:sha256', iv: 'essiv', opts: 'sha256', key: 32 },
  { spec: 'aes-cbc-plain64', iv: 'plain64', key: 16 },
  { spec: 'aes-cbc-plain', iv: 'plain', key: 24 },
  { spec: 'aes-cbc-benbi', iv: 'benbi', key: 32 },
];

for (const backend of TEST_BACKENDS) {
  describe(`cbc long runs [${backend}]`, () => {
    it('encrypts runs on both sides of the column-wise switch like the per-sector reference', () => {
      for (const s of SPECS) {
        for (const sb of [512, 1024, 4096] as SectorBytes[]) {
          const perColumn = 4 * (sb / 16);
          for (const count of [perColumn - 1, perColumn, perColumn + 3]) {
            const label = `${s.spec}/${sb}/${count}`;
            const key = bytes(`key/${label}`, s.key);
            const data = bytes(`data/${label}`, sb * count);
            const spb = BigInt(sb / 512);
            const sector = (0xffffff00n + 5n) * spb; // IV sectors cross bit 32
            const want = refCrypt(true, 'cbc', s.iv, s.opts, key, sb, data, sector, spb);
            const c = createSectorCipher({ spec: s.spec, key, sectorBytes: sb, backend });
            try {
              const out = Buffer.alloc(data.length);
              c.encrypt(data, sector, out);
              assert.ok(out.equals(want), `${label}: into a destination`);
              const inPlace = Buffer.from(data);
              c.encrypt(inPlace, sector);
              assert.ok(inPlace.equals(want), `${label}: in place`);
              c.decrypt(inPlace, sector);
              assert.ok(inPlace.equals(data), `${label}: decrypts back`);
            } finally {
              c.dispose();
            }
          }
        }
      }
    });
  });
}
