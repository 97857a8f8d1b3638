// AF splitter (LUKS1 spec §2.4): split/merge round trip, size rule, and that every stripe matters.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { test } from 'node:test';
import { afMerge, afSplit, afSplitBytes } from '../../src/crypto/af.js';

test('split size is whole 512-byte sectors', () => {
  assert.equal(afSplitBytes(64, 4000), 256000);
  assert.equal(afSplitBytes(32, 4000), 128000);
  assert.equal(afSplitBytes(16, 4000), 64000);
  assert.equal(afSplitBytes(20, 3), 512);
});

test('merge(split(key)) == key for several hashes and key sizes', () => {
  for (const hash of ['sha1', 'sha256', 'sha512', 'ripemd160']) {
    for (const len of [16, 32, 64, 33]) {
      const key = createHash('sha512').update(`${hash}${len}`).digest().subarray(0, len);
      const m = afSplit(key, 4000, hash);
      assert.equal(m.length, afSplitBytes(len, 4000));
      assert.deepEqual(afMerge(m, len, 4000, hash), Buffer.from(key));
    }
  }
});

test('one stripe is the key itself; damaging any stripe changes the result', () => {
  const key = Buffer.from('000102030405060708090a0b0c0d0e0f', 'hex');
  assert.deepEqual(afMerge(afSplit(key, 1, 'sha256'), 16, 1, 'sha256'), key);
  const m = afSplit(key, 10, 'sha256');
  m[3 * 16]! ^= 1;
  assert.notDeepEqual(afMerge(m, 16, 10, 'sha256'), key);
});

test('manual diffusion matches for 2 stripes', () => {
  // d = H(be32(0) || s0) for a 32-byte key with sha256 (one full block); key = s1 ^ d.
  const key = Buffer.alloc(32, 7);
  const m = afSplit(key, 2, 'sha256');
  const d = createHash('sha256')
    .update(Buffer.from([0, 0, 0, 0]))
    .update(m.subarray(0, 32))
    .digest();
  const s1 = m.subarray(32, 64);
  assert.deepEqual(Buffer.from(s1.map((x, i) => x ^ d[i]!)), key);
});
