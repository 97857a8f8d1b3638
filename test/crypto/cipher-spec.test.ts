/** dm-crypt cipher spec grammar: both syntaxes, legacy defaults, and the error split (malformed vs unsupported). */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { parseCipherSpec } from '../../src/crypto/cipher-spec.js';
import { IV_GENERATORS } from '../../src/crypto/iv/index.js';
import { isCryptmapError } from '../../src/util/errors.js';

describe('parseCipherSpec', () => {
  it('parses the legacy syntax', () => {
    const s = parseCipherSpec('aes-xts-plain64');
    assert.equal(s.cipher, 'aes');
    assert.equal(s.chainMode, 'xts');
    assert.equal(s.ivMode, 'plain64');
    assert.equal(s.ivOpts, undefined);
    assert.deepEqual(s.keyBytesAllowed, [32, 48, 64]);
    assert.equal(s.capi, false);
    const e = parseCipherSpec('aes-cbc-essiv:sha256');
    assert.equal(e.ivMode, 'essiv');
    assert.equal(e.ivOpts, 'sha256');
    assert.deepEqual(e.keyBytesAllowed, [16, 24, 32]);
    assert.equal(parseCipherSpec('aes:1-cbc-plain').keyCount, 1);
  });

  it('parses the capi syntax', () => {
    const s = parseCipherSpec('capi:xts(aes)-plain64');
    assert.equal(s.capi, true);
    assert.equal(s.canonical, 'aes-xts-plain64');
    assert.equal(parseCipherSpec('capi:cbc(aes)-essiv:sha256').canonical, 'aes-cbc-essiv:sha256');
  });

  it('applies the original dm-crypt defaults and ecb rules', () => {
    assert.equal(parseCipherSpec('aes').canonical, 'aes-cbc-plain');
    assert.equal(parseCipherSpec('aes-plain').canonical, 'aes-cbc-plain');
    assert.equal(parseCipherSpec('aes-ecb').ivMode, undefined);
    assert.equal(parseCipherSpec('aes-ecb-plain64').canonical, 'aes-ecb');
    const n = parseCipherSpec('cipher_null-ecb');
    assert.equal(n.cipher, 'cipher_null');
    assert.deepEqual(n.keyBytesAllowed, []);
  });

  const malformed = [
    '',
    'aes-',
    'aes-xts',
    'aes-cbc-',
    '-xts-plain64',
    'aes-xts-plain64-junk',
    'aes-xts-essiv',
    'aes-xts-essiv:',
    'aes-xts-plain64:x',
    'aes:0-cbc-plain',
    'aes:3-cbc-plain',
    'aes:x-cbc-plain',
    'capi:',
    'capi:xts(aes',
    'capi:xts-aes-plain64',
    'aes xts plain64',
    'aes-xts-foo',
    'a$s-xts-plain64',
  ];
  for (const spec of malformed) {
    it(`rejects malformed '${spec}' with ECIPHER_SPEC`, () => {
      assert.throws(
        () => parseCipherSpec(spec),
        (e: unknown) => isCryptmapError(e, 'ECIPHER_SPEC'),
      );
    });
  }

  const unsupported: [string, string][] = [
    ['serpent-xts-plain64', 'serpent'],
    ['twofish-cbc-essiv:sha256', 'twofish'],
    ['aes-lrw-benbi', 'lrw'],
    ['aes-cbc-lmk', 'lmk'],
    ['aes-cbc-tcw', 'tcw'],
    ['aes-xts-random', 'random'],
    ['aes-cbc-eboiv', 'eboiv'],
    ['aes-cbc-elephant:512', 'elephant'],
    ['aes:64-cbc-lmk', 'lmk'],
    ['aes:2-cbc-plain64', 'aes:2'],
    ['capi:gcm(aes)-random', 'gcm(aes)'],
    ['capi:authenc(hmac(sha256),xts(aes))-random', 'authenc'],
    ['capi:rfc7539(chacha20,poly1305)-random', 'rfc7539'],
    ['capi:xts(serpent)-plain64', 'serpent'],
    ['capi:adiantum(xchacha12,aes)-plain64', 'adiantum'],
    ['aes-cbc-essiv:nosuchhash', 'nosuchhash'],
    ['cipher_null-cbc-plain', 'cipher_null'],
  ];
  it('accepts exactly the IV modes of the generator table and lists them in its error', () => {
    for (const [name, g] of Object.entries(IV_GENERATORS)) {
      assert.equal(parseCipherSpec(`aes-cbc-${name}${g.options === undefined ? '' : ':sha256'}`).ivMode, name);
    }
    assert.throws(
      () => parseCipherSpec('aes-cbc-lmk'),
      (e: unknown) =>
        isCryptmapError(e) && e.message.includes('IV modes plain, plain64, plain64be, essiv:<hash>, benbi, null;'),
    );
  });

  for (const [spec, part] of unsupported) {
    it(`reports '${spec}' as unsupported, naming '${part}'`, () => {
      assert.throws(
        () => parseCipherSpec(spec),
        (e: unknown) => isCryptmapError(e, 'ECIPHER_UNSUPPORTED') && (e as Error).message.includes(part),
      );
    });
  }

  it('never fails with anything but ECIPHER_SPEC or ECIPHER_UNSUPPORTED (property)', () => {
    const parts = fc.constantFrom(
      'aes',
      'capi:',
      'xts',
      'cbc',
      'ecb',
      '(',
      ')',
      '-',
      ':',
      'plain64',
      'essiv',
      'sha256',
      'benbi',
      'null',
      '2',
      'cipher_null',
      'x',
    );
    const spec = fc.oneof(
      fc.string(),
      fc.array(parts, { maxLength: 8 }).map((a) => a.join('')),
    );
    fc.assert(
      fc.property(spec, (s) => {
        try {
          const r = parseCipherSpec(s);
          return r.cipher === 'aes' || r.cipher === 'cipher_null';
        } catch (e) {
          return isCryptmapError(e, 'ECIPHER_SPEC') || isCryptmapError(e, 'ECIPHER_UNSUPPORTED');
        }
      }),
      { seed: 1619, numRuns: 2000 },
    );
  });
});
