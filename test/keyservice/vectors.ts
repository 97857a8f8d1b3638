/**
 * HKDF derivation test vectors, published in docs/keyservice.md.
 * Provenance: computed by src/keyservice/derive.ts and checked against `openssl kdf ... HKDF`
 * (OpenSSL 3.0.19) in derive.interop.test.ts and a hand-written RFC 5869 HMAC computation in
 * derive.test.ts. Keep this table and the doc in sync (a test compares them).
 */
export interface Vector {
  root: string;
  purpose: 'scratch' | 'swap';
  service: string;
  volume: string;
  length: number;
  key: string;
}

export const ROOT_A = '000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f';
export const ROOT_B = 'c0ffee5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a';

export const VECTORS: Vector[] = [
  {
    root: ROOT_A,
    purpose: 'scratch',
    service: 'web',
    volume: 'data',
    length: 32,
    key: '159408c2b32c2c51a1aa0a7b788874606416167ba82db31aa575b815fab795e0',
  },
  {
    root: ROOT_A,
    purpose: 'scratch',
    service: 'db',
    volume: 'pgdata',
    length: 32,
    key: '51b63abbcbaba0228c5a7e318302cc70f310a57fbcabd2805ab3b3f5d9b61573',
  },
  {
    root: ROOT_A,
    purpose: 'scratch',
    service: 'web',
    volume: 'data',
    length: 64,
    key: '159408c2b32c2c51a1aa0a7b788874606416167ba82db31aa575b815fab795e03b859a25a4b5ccc046063d1b6bfecb7afda1d466deb238275d546888451029b2',
  },
  {
    root: ROOT_A,
    purpose: 'swap',
    service: 'node-1',
    volume: 'swap0',
    length: 64,
    key: 'f9d29e435ac6d7aef157d8c88c6537e1898669fc109a8e33695e418792ec603fb4429e3e3a061ada376a8da98d36f3930f96d93b2b13f1ed75d15b8fa5182954',
  },
  {
    root: ROOT_B,
    purpose: 'scratch',
    service: 'web',
    volume: 'data',
    length: 32,
    key: '22c13ac83a3909c5363ea397007917e26601baa34dd732bf9f00d89252b69a89',
  },
  {
    root: ROOT_B,
    purpose: 'scratch',
    service: 'db',
    volume: 'pgdata',
    length: 32,
    key: '943adb1d392311f4ea342caf4267f7e0e2a0996653a1e9af216ea3a131c8b35a',
  },
];
