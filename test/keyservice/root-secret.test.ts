import assert from 'node:assert/strict';
import { chmod, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { loadOrCreateRootSecret, ROOT_FILE, unwrapRootSecret, WRAPPED_FILE } from '../../src/keyservice/root-secret.js';
import { Secret } from '../../src/util/secret.js';
import { makeTempDir } from '../helpers/tmp.js';

const CHEAP = { timeCost: 1, memoryKiB: 64, parallelism: 1 };

test('root secret is created once (0600 in a 0700 dir) and reloaded the same', async () => {
  const t = makeTempDir('cryptmap-ks-');
  try {
    const sd = join(t.dir, 'state');
    const a = await loadOrCreateRootSecret(sd);
    assert.ok(a.created);
    assert.equal(a.secret.length, 32);
    assert.equal((await stat(sd)).mode & 0o777, 0o700);
    assert.equal((await stat(join(sd, ROOT_FILE))).mode & 0o777, 0o600);
    const b = await loadOrCreateRootSecret(sd);
    assert.ok(!b.created);
    assert.deepEqual(b.secret.expose(), a.secret.expose());
    // Concurrent first starts agree.
    const sd2 = join(t.dir, 'state2');
    const [x, y] = await Promise.all([loadOrCreateRootSecret(sd2), loadOrCreateRootSecret(sd2)]);
    assert.deepEqual(x.secret.expose(), y.secret.expose());
    assert.equal([x.created, y.created].filter(Boolean).length <= 2, true);
  } finally {
    await t.cleanup();
  }
});

test('refuses loose permissions and a wrong-sized file', async () => {
  const t = makeTempDir('cryptmap-ks-');
  try {
    const sd = join(t.dir, 'state');
    await loadOrCreateRootSecret(sd);
    await chmod(join(sd, ROOT_FILE), 0o644);
    await assert.rejects(loadOrCreateRootSecret(sd), { code: 'EROOTSECRET' });
    await chmod(join(sd, ROOT_FILE), 0o600);
    await chmod(sd, 0o755);
    await assert.rejects(loadOrCreateRootSecret(sd), { code: 'ESTATEDIR' });
    await chmod(sd, 0o700);
    await writeFile(join(sd, ROOT_FILE), Buffer.alloc(5), { mode: 0o600 });
    await assert.rejects(loadOrCreateRootSecret(sd), /exactly 32 bytes/);
  } finally {
    await t.cleanup();
  }
});

test('wrapped root secret: version byte, unwraps with the passphrase only', async () => {
  const t = makeTempDir('cryptmap-ks-');
  try {
    const sd = join(t.dir, 'state');
    const pass = () => Secret.copyOf(Buffer.from('correct horse'));
    const a = await loadOrCreateRootSecret(sd, { passphrase: pass(), wrapParams: CHEAP });
    assert.ok(a.created && a.wrapped);
    const file = await readFile(join(sd, WRAPPED_FILE));
    assert.equal(file.length, 96);
    assert.equal(file.toString('latin1', 0, 4), 'CMRK');
    assert.equal(file[4], 1);
    assert.equal(file[5], 2);
    assert.equal(file.readUInt32BE(12), 64);
    assert.ok(!file.includes(a.secret.expose()), 'the root secret is not stored in clear');
    const b = await loadOrCreateRootSecret(sd, { passphrase: pass() });
    assert.deepEqual(b.secret.expose(), a.secret.expose());
    await assert.rejects(loadOrCreateRootSecret(sd, { passphrase: Secret.copyOf(Buffer.from('wrong')) }), {
      code: 'EROOTPASS',
    });
    await assert.rejects(loadOrCreateRootSecret(sd), /wrapped by a passphrase/);
    const tampered = Buffer.from(file);
    tampered.writeUInt32BE(2, 8); // a changed parameter fails like a wrong passphrase
    await assert.rejects(unwrapRootSecret(tampered, pass()), { code: 'EROOTPASS' });
    tampered[4] = 9;
    await assert.rejects(unwrapRootSecret(tampered, pass()), /version 9/);
  } finally {
    await t.cleanup();
  }
});

test('a raw root secret is not silently wrapped', async () => {
  const t = makeTempDir('cryptmap-ks-');
  try {
    const sd = join(t.dir, 'state');
    await loadOrCreateRootSecret(sd);
    await assert.rejects(
      loadOrCreateRootSecret(sd, { passphrase: Secret.copyOf(Buffer.from('p')), wrapParams: CHEAP }),
      /not wrapped/,
    );
  } finally {
    await t.cleanup();
  }
});
