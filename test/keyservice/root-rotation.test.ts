// Root rotation (issue 16 item 5, docs/keyservice.md): the next and previous root secret files, the
// commit's crash windows, and the key service deriving from each generation (ENOROOT when absent).
import assert from 'node:assert/strict';
import { chmodSync, copyFileSync, existsSync, readFileSync, renameSync, symlinkSync } from 'node:fs';
import { test } from 'node:test';
import { memoryAudit } from '../../src/keyservice/audit.js';
import { inprocKeyClient } from '../../src/keyservice/client.js';
import { deriveKey } from '../../src/keyservice/derive.js';
import { DEFAULT_POLICY } from '../../src/keyservice/policy.js';
import {
  beginRootRotation,
  commitRootRotation,
  loadOrCreateRootSecret,
  loadRootGenerations,
} from '../../src/keyservice/root-secret.js';
import { KeyService } from '../../src/keyservice/service.js';
import { isCryptmapError } from '../../src/util/errors.js';
import { Secret } from '../../src/util/secret.js';
import { makeTempDir } from '../helpers/tmp.js';

const REQ = { purpose: 'scratch' as const, service: 'db', volume: 'data' };

test('begin makes a next root once; commit keeps the old one as previous; a half-done commit finishes', async () => {
  const t = makeTempDir('cm-rootrot-');
  try {
    const cur = await loadOrCreateRootSecret(t.dir);
    cur.secret.dispose();
    const first = readFileSync(cur.path);
    assert.deepEqual(await loadRootGenerations(cur), {});
    assert.equal(await beginRootRotation(cur), true);
    const next = readFileSync(`${cur.path}.next`);
    assert.equal(await beginRootRotation(cur), false, 'a begun rotation is kept');
    assert.deepEqual(readFileSync(`${cur.path}.next`), next);
    const g = await loadRootGenerations(cur);
    assert.deepEqual(g.next?.expose(), next);
    assert.equal(g.previous, undefined);
    // A commit that crashed after copying the current file to .previous: the next commit finishes it.
    copyFileSync(cur.path, `${cur.path}.previous`);
    await commitRootRotation(cur.path);
    assert.deepEqual(readFileSync(cur.path), next);
    assert.deepEqual(readFileSync(`${cur.path}.previous`), first);
    assert.ok(!existsSync(`${cur.path}.next`));
    const g2 = await loadRootGenerations(cur);
    assert.deepEqual(g2.previous?.expose(), first);
    await assert.rejects(commitRootRotation(cur.path), (e) => isCryptmapError(e, 'ENOROOT'));
  } finally {
    await t.cleanup();
  }
});

test('commit refuses a next root that is a symlink or readable by others, and changes nothing', async () => {
  const t = makeTempDir('cm-rootrot-');
  try {
    const cur = await loadOrCreateRootSecret(t.dir);
    cur.secret.dispose();
    const first = readFileSync(cur.path);
    assert.equal(await beginRootRotation(cur), true);
    const next = `${cur.path}.next`;
    chmodSync(next, 0o644);
    await assert.rejects(commitRootRotation(cur.path), (e) => isCryptmapError(e, 'EROOTSECRET'));
    chmodSync(next, 0o600);
    renameSync(next, `${next}.real`);
    symlinkSync(`${next}.real`, next);
    await assert.rejects(commitRootRotation(cur.path), (e) => isCryptmapError(e, 'EROOTSECRET'));
    assert.deepEqual(readFileSync(cur.path), first, 'the current root secret is untouched');
    assert.ok(!existsSync(`${cur.path}.previous`));
  } finally {
    await t.cleanup();
  }
});

test('the key service derives from the generation asked for, ENOROOT when it has none', async () => {
  const a = Secret.copyOf(Buffer.alloc(32, 1));
  const b = Secret.copyOf(Buffer.alloc(32, 2));
  const svc = new KeyService({ root: a, policy: DEFAULT_POLICY, audit: memoryAudit() });
  const c = inprocKeyClient(svc);
  const want = (root: number) => deriveKey(Secret.copyOf(Buffer.alloc(32, root)), REQ).expose();
  assert.deepEqual((await c.deriveKey(REQ)).expose(), want(1));
  await assert.rejects(c.deriveKey({ ...REQ, generation: 'next' }), (e) => isCryptmapError(e, 'ENOROOT'));
  svc.setRoots(a, { next: b });
  assert.deepEqual((await c.deriveKey({ ...REQ, generation: 'next' })).expose(), want(2));
  assert.deepEqual(svc.rootGenerations, ['current', 'next']);
  svc.setRoots(Secret.copyOf(Buffer.alloc(32, 2)), { previous: Secret.copyOf(Buffer.alloc(32, 1)) });
  assert.deepEqual((await c.deriveKey(REQ)).expose(), want(2));
  assert.deepEqual((await c.deriveKey({ ...REQ, generation: 'previous' })).expose(), want(1));
  await assert.rejects(c.deriveKey({ ...REQ, generation: 'next' }), (e) => isCryptmapError(e, 'ENOROOT'));
});
