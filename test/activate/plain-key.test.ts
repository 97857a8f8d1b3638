/**
 * Plain-mode key derivation vectors from cryptsetup tests/password-hash-test (mbroz/cryptsetup,
 * `crypt_key HASH KEYBITS pwd PASSPHRASE EXPECTED_KEY [LIMIT]`; LIMIT truncates the passphrase first,
 * as --keyfile-size does). stribog512 is left out: Node's OpenSSL lacks it; whirlpool needs the native
 * addon (OpenSSL's legacy provider).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { plainKeyFromPassphrase } from '../../src/activate/plain-key.js';

const V: [hash: string, bits: number, pwd: string, key: string, limit?: number][] = [
  ['ripemd160', 256, 'xxx', 'aeb26d1f69eb6dddfb9381eed4d7299f091e99aa5d3ff06866d4ce9f620f7aca'],
  ['ripemd160', 128, 'xxx', 'aeb26d1f69eb6dddfb9381eed4d7299f'],
  ['sha1', 256, 'xxx', 'b60d121b438a380c343d5ec3c2037564b82ffef30b1e0a6ad9af7a73aa91c197'],
  ['sha1', 128, 'xxx', 'b60d121b438a380c343d5ec3c2037564'],
  ['sha256', 256, 'xxx', 'cd2eb0837c9b4c962c22d2ff8b5441b7b45805887f051d39bf133b583baf6860'],
  ['sha256', 128, 'xxx', 'cd2eb0837c9b4c962c22d2ff8b5441b7'],
  ['sha256', 256, 'xxx\n', '042aea10a0f14f2d391373599be69d53a75dde9951fc3d3cd10b6100aa7a9f24'],
  [
    'sha256',
    128,
    'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaabbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb',
    '2a42b97084779dcedf2c66405c5d296c',
  ],
  ['sha256:20', 256, 'xxx', 'cd2eb0837c9b4c962c22d2ff8b5441b7b4580588000000000000000000000000'],
  ['sha256:32', 256, 'xxx', 'cd2eb0837c9b4c962c22d2ff8b5441b7b45805887f051d39bf133b583baf6860'],
  ['plain', 256, 'xxxxxxxx', '7878787878787878000000000000000000000000000000000000000000000000'],
  ['plain:2', 256, 'xxxxxxxx', '7878000000000000000000000000000000000000000000000000000000000000'],
  ['sha256', 128, '0123456789abcdef', '9f9f5111f7b27a781f1f1ddde5ebc2dd', 16],
  ['sha256', 128, '0123456789abcdef', '1be2e452b46d7a0d9656bbb1f768e824', 4],
  ['sha256', 128, '0123', '1be2e452b46d7a0d9656bbb1f768e824', 4],
  ['sha1', 256, '0123456789abcdef', 'fe5567e8d769550852182cdf69d74bb16dff8e295e4b6077d6d3fc73e7fe33b0'],
  ['sha224', 256, '0123456789abcdef', '7330215f6741fd2bacbd3658681a70f65e2e90a02887989018974ce83775a568'],
  ['sha256', 256, '0123456789abcdef', '9f9f5111f7b27a781f1f1ddde5ebc2dd2b796bfc7365c9c28b548e564176929f'],
  ['sha384', 256, '0123456789abcdef', 'fc6304023487cb6f85ac80e47817760c6b153c02da46c6429649e963b031e525'],
  ['sha512', 256, '0123456789abcdef', '1c043fbe4bca7c7920dae536c680fd44c15d71ec12cd82a2a9491b0043b57f4d'],
  ['ripemd160', 256, '0123456789abcdef', 'edf4e38018cd71dd489b9c1e54b32054eb42dfad9fdcc22d629d756391a24982'],
  ['sha3-224', 256, '0123456789abcdef', 'bbb7d56cc80a8c80e907f7d9240edc0be264aa173266b30918bc1065d59a9388'],
  ['sha3-256', 256, '0123456789abcdef', 'a5df4caae9fdb5dbacf667075b709a2f30a115c43168af332062b42d4b0da01f'],
  ['sha3-384', 256, '0123456789abcdef', '56f351f754c418892eab4009e5f85c8d5436a591014503563e9395b895526413'],
  ['sha3-512', 256, '0123456789abcdef', '59d06155d25dffdb982729de8dce9d7855ca094d8bab8124b347c40668477056'],
  ['sm3', 256, '0123456789abcdef', 'a34fdd8e843802b31a262dce5b1f501bed68ef81520de14b39657aecffaf8a86'],
];

test('cryptsetup password-hash-test vectors', () => {
  for (const [hash, bits, pwd, key, limit] of V) {
    const p = Buffer.from(pwd, 'latin1').subarray(0, limit);
    const k = plainKeyFromPassphrase(p, hash, bits / 8);
    assert.equal(k.expose().toString('hex'), key, `${hash} ${bits} ${JSON.stringify(pwd)} ${limit ?? ''}`);
    k.dispose();
  }
});

test('cryptsetup failure cases fail here too', () => {
  assert.throws(() => plainKeyFromPassphrase(Buffer.from('xxx'), 'sha256:', 32), { code: 'EPLAINHASH' });
  assert.throws(() => plainKeyFromPassphrase(Buffer.from('xxx'), 'sha256:xx', 32), { code: 'EPLAINHASH' });
  assert.throws(() => plainKeyFromPassphrase(Buffer.from('xxxxxxxx'), 'plain:9', 32), /shorter/);
  assert.throws(() => plainKeyFromPassphrase(Buffer.from('xxx'), 'sha256:33', 32), /more than the key size/);
  assert.throws(() => plainKeyFromPassphrase(Buffer.from('xxx'), 'stribog512', 32), /not available/);
});
