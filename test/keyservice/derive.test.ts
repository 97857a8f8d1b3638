import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { contextInfo, deriveKey, isValidName } from '../../src/keyservice/derive.js';
import { Secret } from '../../src/util/secret.js';
import { VECTORS } from './vectors.js';

/** RFC 5869 written out with HMAC, independent of node:crypto's hkdf. */
function rfc5869(ikm: Buffer, salt: Buffer, info: Buffer, length: number): Buffer {
  const prk = createHmac('sha256', salt.length ? salt : Buffer.alloc(32))
    .update(ikm)
    .digest();
  const blocks: Buffer[] = [];
  let t = Buffer.alloc(0);
  for (let i = 1; Buffer.concat(blocks).length < length; i++) {
    t = createHmac('sha256', prk)
      .update(Buffer.concat([t, info, Buffer.from([i])]))
      .digest();
    blocks.push(t);
  }
  return Buffer.concat(blocks).subarray(0, length);
}

test('derivation matches the published vectors and a hand-written RFC 5869', () => {
  for (const v of VECTORS) {
    const k = deriveKey(Secret.copyOf(Buffer.from(v.root, 'hex')), v);
    assert.equal(k.expose().toString('hex'), v.key, `${v.purpose}/${v.service}/${v.volume}`);
    const info = Buffer.from(contextInfo(v.purpose, v.service, v.volume));
    assert.equal(rfc5869(Buffer.from(v.root, 'hex'), Buffer.alloc(0), info, v.length).toString('hex'), v.key);
    k.dispose();
  }
});

test('docs/keyservice.md lists the same vectors', () => {
  const doc = readFileSync(new URL('../../../docs/keyservice.md', import.meta.url), 'utf8');
  for (const v of VECTORS) {
    assert.ok(doc.includes(v.key), `doc misses ${v.purpose}/${v.service}/${v.volume}/${v.length}`);
    assert.ok(doc.includes(contextInfo(v.purpose, v.service, v.volume)));
  }
});

test('info string is versioned and names are strict', () => {
  assert.equal(contextInfo('scratch', 'web', 'data'), 'cryptmap/v1/scratch/web/data');
  assert.ok(isValidName('db-1.main_x'));
  for (const bad of ['', 'a/b', '.x', '-x', 'a b', 'x'.repeat(65)]) assert.ok(!isValidName(bad), bad);
  const root = Secret.copyOf(Buffer.alloc(32, 1));
  assert.throws(() => deriveKey(root, { purpose: 'scratch', service: 'a/b', volume: 'v' }), { code: 'EKEYREQ' });
  assert.throws(() => deriveKey(root, { purpose: 'scratch', service: 'a', volume: 'v', length: 16 }), {
    code: 'EKEYREQ',
  });
  assert.throws(() => deriveKey(root, { purpose: 'other' as 'swap', service: 'a', volume: 'v' }), { code: 'EKEYREQ' });
  assert.throws(() => deriveKey(Secret.copyOf(Buffer.alloc(16)), { purpose: 'scratch', service: 'a', volume: 'v' }), {
    code: 'EROOTSECRET',
  });
});
