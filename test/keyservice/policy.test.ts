import assert from 'node:assert/strict';
import { test } from 'node:test';
import { parse } from 'yaml';
import { identityForToken, isAllowed, policyFromObject, tokenDigest } from '../../src/keyservice/policy.js';

const TOKEN = 'tok-123';
const doc = parse(`
version: 1
clients:
  - identity: local
    services: ["*"]
  - identity: cn:node-b.example
    services: [web, "db-*"]
    purposes: [scratch]
  - identity: token:backup
    tokenSha256: ${tokenDigest(TOKEN)}
    services: [db]
`);

test('policy grants exactly what it lists', () => {
  const p = policyFromObject(doc);
  assert.ok(isAllowed(p, 'local', 'swap', 'anything'));
  assert.ok(isAllowed(p, 'cn:node-b.example', 'scratch', 'web'));
  assert.ok(isAllowed(p, 'cn:node-b.example', 'scratch', 'db-main'));
  assert.ok(!isAllowed(p, 'cn:node-b.example', 'scratch', 'webx'));
  assert.ok(!isAllowed(p, 'cn:node-b.example', 'swap', 'web'));
  assert.ok(!isAllowed(p, 'cn:other', 'scratch', 'web'));
  assert.equal(identityForToken(p, TOKEN), 'token:backup');
  assert.equal(identityForToken(p, 'nope'), undefined);
  assert.ok(isAllowed(p, 'token:backup', 'scratch', 'db'));
  assert.ok(!isAllowed(p, 'token:backup', 'scratch', 'web'));
});

test('policy validation names the field', () => {
  assert.throws(() => policyFromObject({ version: 2, clients: [] }), /version must be 1/);
  assert.throws(
    () => policyFromObject({ version: 1, clients: [{ identity: 'uid:0', services: [] }] }),
    /clients\[0\]\.identity/,
  );
  assert.throws(
    () => policyFromObject({ version: 1, clients: [{ identity: 'local', services: ['a/b'] }] }),
    /clients\[0\]\.services/,
  );
  assert.throws(
    () => policyFromObject({ version: 1, clients: [{ identity: 'token:x', services: [] }] }),
    /tokenSha256/,
  );
  assert.throws(
    () => policyFromObject({ version: 1, clients: [{ identity: 'local', services: [], extra: 1 }] }),
    /unknown key 'extra'/,
  );
  assert.throws(
    () =>
      policyFromObject({
        version: 1,
        clients: [
          { identity: 'local', services: [] },
          { identity: 'local', services: [] },
        ],
      }),
    /twice/,
  );
});
