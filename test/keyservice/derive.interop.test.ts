// Checks the derivation against OpenSSL's HKDF (package: openssl). The root secrets here are test
// constants from vectors.ts, so passing them in argv is acceptable for this test only; real keys
// never go into process arguments.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { test } from 'node:test';
import { requireTool } from '../helpers/tools.js';
import { contextInfo } from '../../src/keyservice/derive.js';
import { VECTORS } from './vectors.js';

test('openssl kdf HKDF agrees with every vector', () => {
  requireTool('openssl');
  for (const v of VECTORS) {
    const r = spawnSync(
      'openssl',
      [
        'kdf',
        '-keylen',
        String(v.length),
        '-kdfopt',
        'digest:SHA256',
        '-kdfopt',
        `hexkey:${v.root}`,
        '-kdfopt',
        `info:${contextInfo(v.purpose, v.service, v.volume)}`,
        'HKDF',
      ],
      { encoding: 'utf8' },
    );
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout.trim().replace(/:/g, '').toLowerCase(), v.key);
  }
});
