/**
 * Known answers over every backend:
 * - IEEE Std 1619-2007 Annex B XTS-AES vectors 1, 2, 4, 5 (XTS-AES-128) and 10 (XTS-AES-256).
 *   Vectors 1/2/5 are 32-byte data units: XTS without ciphertext stealing treats each block on its
 *   own, so they are checked as the first 32 bytes of a 512-byte sector. Vector 1 has equal key
 *   halves (OpenSSL refuses those for XTS encryption): our XTS must still give the standard answer.
 * - cryptsetup's IV-generator vectors (cryptsetup-iv-vectors.ts).
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { describe, it } from 'node:test';
import { createSectorCipher, isCryptmapError } from './imports.js';
import { TEST_BACKENDS } from './backends.js';
import { IV_VECTORS } from './cryptsetup-iv-vectors.js';
import { loadNative } from '../../src/util/native.js';

const PT512 = Buffer.alloc(512);
for (let i = 0; i < 512; i++) PT512[i] = i & 0xff;

const V4_CT =
  '27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89cc78cf7f5e543445f8333d8fa7f56000005279fa5d8b5e4ad40e736ddb4d35412' +
  '328063fd2aab53e5ea1e0a9f332500a5df9487d07a5c92cc512c8866c7e860ce93fdf166a24912b422976146ae20ce846bb7dc9ba94a767aaef20c0d61ad0265' +
  '5ea92dc4c4e41a8952c651d33174be51a10c421110e6d81588ede82103a252d8a750e8768defffed9122810aaeb99f9172af82b604dc4b8e51bcb08235a6f434' +
  '1332e4ca60482a4ba1a03b3e65008fc5da76b70bf1690db4eae29c5f1badd03c5ccf2a55d705ddcd86d449511ceb7ec30bf12b1fa35b913f9f747a8afd1b130e' +
  '94bff94effd01a91735ca1726acd0b197c4e5b03393697e126826fb6bbde8ecc1e08298516e2c9ed03ff3c1b7860f6de76d4cecd94c8119855ef5297ca67e9f3' +
  'e7ff72b1e99785ca0a7e7720c5b36dc6d72cac9574c8cbbc2f801e23e56fd344b07f22154beba0f08ce8891e643ed995c94d9a69c9f1b5f499027a78572aeebd' +
  '74d20cc39881c213ee770b1010e4bea718846977ae119f7a023ab58cca0ad752afe656bb3c17256a9f6e9bf19fdd5a38fc82bbe872c5539edb609ef4f79c203e' +
  'bb140f2e583cb2ad15b4aa5b655016a8449277dbd477ef2c8d6c017db738b18deb4a427d1923ce3ff262735779a418f20a282df920147beabe421ee5319d0568';

const V10_CT =
  '1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd' +
  '5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca' +
  '2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f' +
  '93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a' +
  '84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae' +
  '9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac' +
  '6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed4385' +
  '1ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151';

interface XtsVector {
  name: string;
  key: string;
  sector: bigint;
  pt: Buffer;
  ct: string;
}

const XTS_VECTORS: XtsVector[] = [
  {
    name: 'vector 1 (equal key halves)',
    key: '00'.repeat(32),
    sector: 0n,
    pt: Buffer.alloc(32),
    ct: '917cf69ebd68b2ec9b9fe9a3eadda692cd43d2f59598ed858c02c2652fbf922e',
  },
  {
    name: 'vector 2',
    key: '11'.repeat(16) + '22'.repeat(16),
    sector: 0x3333333333n,
    pt: Buffer.alloc(32, 0x44),
    ct: 'c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0',
  },
  {
    name: 'vector 5',
    key: 'fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0bfbebdbcbbbab9b8b7b6b5b4b3b2b1b0',
    sector: 0x123456789an,
    pt: Buffer.alloc(32, 0x44),
    ct: 'b01f86f8edc1863706fa8a4253e34f28af319de38334870f4dd1f94cbe9832f1',
  },
  {
    name: 'vector 4',
    key: '2718281828459045235360287471352631415926535897932384626433832795',
    sector: 0n,
    pt: PT512,
    ct: V4_CT,
  },
  {
    name: 'vector 10 (XTS-AES-256)',
    key: '27182818284590452353602874713526624977572470936999595749669676273141592653589793238462643383279502884197169399375105820974944592',
    sector: 0xffn,
    pt: PT512,
    ct: V10_CT,
  },
];

// xts-impls.test.ts reruns this file with CRYPTMAP_CRYPTO_IMPL forcing each native XTS implementation.
const forced = process.env.CRYPTMAP_CRYPTO_IMPL;
const inUse = loadNative()?.xtsImpl;
console.log(`# native XTS implementation: ${inUse ?? 'none (addon not loaded)'}`);
if (forced) assert.equal(inUse, forced, 'CRYPTMAP_CRYPTO_IMPL not honoured');

for (const backend of TEST_BACKENDS) {
  describe(`IEEE 1619 XTS-AES vectors [${backend}]`, () => {
    for (const v of XTS_VECTORS) {
      it(v.name, () => {
        const c = createSectorCipher({ spec: 'aes-xts-plain64', key: Buffer.from(v.key, 'hex'), backend });
        const sector = Buffer.alloc(512);
        v.pt.copy(sector);
        const out = Buffer.alloc(512);
        c.encrypt(sector, v.sector, out);
        assert.equal(out.subarray(0, v.pt.length).toString('hex'), v.ct);
        c.decrypt(out, v.sector);
        assert.deepEqual(out, sector);
        c.dispose();
      });
    }
  });

  describe(`cryptsetup IV vectors [${backend}]`, () => {
    for (const v of IV_VECTORS) {
      const spec = `${v.cipher}-${v.mode}-${v.iv}`;
      if (v.iv === 'eboiv') {
        it(`${spec} is reported unsupported`, () => {
          assert.throws(
            () => createSectorCipher({ spec, key: Buffer.from(v.key, 'hex'), backend }),
            (e: unknown) => isCryptmapError(e, 'ECIPHER_UNSUPPORTED') && /eboiv/.test((e as Error).message),
          );
        });
        continue;
      }
      for (const o of v.out) {
        it(`${spec} sector ${o.sectorBytes}${o.large ? ' iv_large_sectors' : ''}`, () => {
          const c = createSectorCipher({
            spec,
            key: Buffer.from(v.key, 'hex'),
            sectorBytes: o.sectorBytes,
            ivLargeSectors: o.large,
            backend,
          });
          const buf = Buffer.alloc(v.length);
          c.encrypt(buf, v.ivOffset);
          assert.equal(createHash('sha256').update(buf).digest('hex'), o.sha256);
          c.decrypt(buf, v.ivOffset);
          assert.equal(createHash('sha256').update(buf).digest('hex'), v.inSha256);
          c.dispose();
        });
      }
    }
  });
}
