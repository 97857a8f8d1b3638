import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { deriveKey } from '../../src/keyservice/derive.js';
import { keyServiceForManifest } from '../../src/reconciler/keys.js';
import { Secret } from '../../src/util/secret.js';
import { makeTempDir } from '../helpers/tmp.js';

test('embedded key service: root secret under STATE/keyd, same keys after a restart', async () => {
  const t = makeTempDir('cryptmap-keys-');
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

test('embedded key service: a wrapped root (passphrase file) and a root secret file elsewhere; no warning for either', async () => {
  const t = makeTempDir('cryptmap-keys-');
  try {
    const { writeFile, mkdir, readdir } = await import('node:fs/promises');
    const { loadOrCreateRootSecret } = await import('../../src/keyservice/root-secret.js');
    const req = { purpose: 'scratch' as const, service: 'db', volume: 'data' };
    // Wrapped: STATE/keyd holds root.key.wrapped only; a copy of the state dir is not enough.
    const pass = join(t.dir, 'root.pass');
    await writeFile(pass, 'a long passphrase kept elsewhere\n', { mode: 0o600 });
    const state = join(t.dir, 'state');
    const w = await keyServiceForManifest({ address: 'embedded', passphraseFile: pass }, state);
    assert.match(w.describe, /embedded \(wrapped root secret created at .*root\.key\.wrapped\)/);
    assert.equal(w.warning, undefined);
    const kw = await w.keys.deriveKey(req);
    await w.close();
    assert.deepEqual((await readdir(join(state, 'keyd'))).sort(), ['audit.log', 'root.key.wrapped']);
    const again = await keyServiceForManifest({ address: 'embedded', passphraseFile: 'root.pass' }, state, t.dir);
    assert.deepEqual((await again.keys.deriveKey(req)).expose(), kw.expose());
    await again.close();
    await writeFile(pass, 'wrong\n', { mode: 0o600 });
    await assert.rejects(keyServiceForManifest({ address: 'embedded', passphraseFile: pass }, state), {
      code: 'EROOTPASS',
    });
    await assert.rejects(keyServiceForManifest({ address: 'embedded' }, state), /wrapped by a passphrase/);
    // A passphrase file others can read is refused.
    await writeFile(join(t.dir, 'loose.pass'), 'x\n', { mode: 0o644 });
    await assert.rejects(
      keyServiceForManifest({ address: 'embedded', passphraseFile: join(t.dir, 'loose.pass') }, state),
      /chmod 600/,
    );
    // Root secret file on another path: must exist (never created), used as is.
    const medium = join(t.dir, 'medium');
    await mkdir(medium, { mode: 0o700 });
    const rootFile = join(medium, 'cryptmap-root.key');
    await assert.rejects(
      keyServiceForManifest({ address: 'embedded', rootSecretFile: rootFile }, join(t.dir, 's2')),
      /does not exist .*never created/,
    );
    const made = await loadOrCreateRootSecret(join(t.dir, 'maker'));
    await writeFile(rootFile, made.secret.expose(), { mode: 0o600 });
    const f = await keyServiceForManifest({ address: 'embedded', rootSecretFile: rootFile }, join(t.dir, 's2'));
    assert.equal(f.warning, undefined);
    assert.deepEqual((await f.keys.deriveKey(req)).expose(), deriveKey(made.secret, req).expose());
    await f.close();
    assert.deepEqual(await readdir(join(t.dir, 's2', 'keyd')), ['audit.log'], 'no root secret beside the volumes');
    made.secret.dispose();
  } finally {
    await t.cleanup();
  }
});

test('agent status repeats the warning while a raw embedded root secret sits in the state dir', async () => {
  const t = makeTempDir('cryptmap-keys-');
  try {
    const { spawnSync } = await import('node:child_process');
    const entry = new URL('../../src/cli/entry.js', import.meta.url).pathname;
    const status = () =>
      spawnSync(process.execPath, [entry, 'agent', 'status', '--state-dir', t.dir], { encoding: 'utf8' });
    assert.doesNotMatch(status().stdout, /WARNING/);
    const a = await keyServiceForManifest({ address: 'embedded' }, t.dir);
    await a.close();
    const r = status();
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /WARNING: the embedded key service keeps the raw root secret in .*keyd\/root\.key/);
    const json = JSON.parse(
      spawnSync(process.execPath, [entry, 'agent', 'status', '--json', '--state-dir', t.dir], { encoding: 'utf8' })
        .stdout,
    ) as { warning?: string };
    assert.match(json.warning ?? '', /decrypt every persistent volume/);
  } finally {
    await t.cleanup();
  }
});
