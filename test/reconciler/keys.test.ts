import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { deriveKey } from '../../src/keyservice/derive.js';
import { keyServiceForManifest } from '../../src/reconciler/keys.js';
import { Secret } from '../../src/util/secret.js';
import { tempDir } from '../keyservice/helpers.js';

test('embedded key service: root secret under STATE/keyd, same keys after a restart', async () => {
  const t = await tempDir('cryptmap-keys-');
  try {
    const req = { purpose: 'scratch' as const, service: 'db', volume: 'data' };
    const a = await keyServiceForManifest({ address: 'embedded' }, t.dir);
    assert.match(a.describe, /embedded \(raw root secret created at .*keyd\/root\.key\)/);
    assert.match(a.warning ?? '', /WARNING: .*raw root secret.*decrypt every persistent volume/);
    const k1 = await a.keys.deriveKey(req);
    await a.close();
    const b = await keyServiceForManifest({ address: 'embedded' }, t.dir);
    assert.match(b.describe, /loaded/);
    const k2 = await b.keys.deriveKey(req);
    await b.close();
    assert.deepEqual(k1.expose(), k2.expose());
    const root = Secret.copyOf(await readFile(join(t.dir, 'keyd', 'root.key')));
    assert.deepEqual(deriveKey(root, req).expose(), k1.expose());
    const audit = await readFile(join(t.dir, 'keyd', 'audit.log'), 'utf8');
    assert.equal(audit.trim().split('\n').length, 2);
    assert.ok(!audit.includes(k1.expose().toString('hex')));
    const remote = await keyServiceForManifest({ address: `unix:${join(t.dir, 'none.sock')}` }, t.dir);
    await assert.rejects(remote.keys.deriveKey(req), { code: 'EKEYD_UNREACHABLE' });
  } finally {
    await t.cleanup();
  }
});
