// Key rotation for service volumes (issue 16 item 5), with an agent in this process and its embedded
// key service: `cryptmap volume rotate-key` reencrypts a persistent volume online (new volume key,
// data kept); a root rotation (`cryptmap keyd rotate-root begin|commit`) with `cryptmap volume
// rewrap-keys` moves every persistent volume's keyslot to the new root's key without reencryption,
// finishing what a run that crashed in the middle of the fleet left, before and after the commit.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { requireTool } from '../helpers/tools.js';
import { main } from '../../src/cli/main.js';
import { AgentHost } from '../../src/daemon/agent-host.js';
import { FileDevice } from '../../src/blockdev/file.js';
import { deriveKey } from '../../src/keyservice/derive.js';
import { Luks2Volume } from '../../src/luks/index.js';
import { parseManifest } from '../../src/reconciler/manifest.js';
import { VOLUME_KEYSLOT_PBKDF } from '../../src/reconciler/ports.js';
import { Secret } from '../../src/util/secret.js';
import { makeTempDir } from '../helpers/tmp.js';
import { captureIO } from './helpers.js';

const MANIFEST = parseManifest(
  [
    'version: 1',
    'services:',
    '  - name: db',
    '    volumes:',
    '      - name: data',
    '        size: 8M',
    '        class: persistent',
    '        filesystem: none',
    '  - name: web',
    '    volumes:',
    '      - name: data',
    '        size: 8M',
    '        class: persistent',
    '        filesystem: none',
    '',
  ].join('\n'),
);
const IDS = ['db/data', 'web/data'];
const mapping = (id: string) => `scratch:${id.replace('/', ':')}`;
const image = (state: string, id: string) => join(state, 'volumes', 'scratch', `${id}.img`);

async function cm(...argv: string[]): Promise<{ code: number; out: string; err: string }> {
  const c = captureIO();
  const code = await main(argv, { ...c.io, env: { ...process.env } } as never);
  return { code, out: c.out(), err: c.err() };
}

async function startAgent(state: string): Promise<AgentHost> {
  const host = await AgentHost.start({ manifest: MANIFEST, stateDir: state, bootId: 'b', serve: 'nbd-only' });
  const r = await host.reconcile();
  assert.ok(r.converged, JSON.stringify(r.volumes));
  return host;
}

async function marker(host: AgentHost, id: string, write?: Buffer): Promise<Buffer> {
  const dev = host.core.registry.open(mapping(id));
  try {
    const b = Buffer.alloc(1 << 20);
    if (write) {
      write.copy(b);
      await dev.write(3 << 20, b);
      await dev.flush();
      return b;
    }
    await dev.read(3 << 20, b);
    return b;
  } finally {
    await dev.close();
  }
}

/** The keyslot passphrase of `id` under the root secret file `file` (what the key service derives). */
function passphrase(file: string | Buffer, id: string): Secret {
  const [service, volume] = id.split('/') as [string, string];
  const rootBytes = typeof file === 'string' ? readFileSync(file) : file;
  return deriveKey(Secret.copyOf(rootBytes), { purpose: 'scratch', service, volume, length: 32 });
}

/** Which of the passphrases open a keyslot of `id`'s image (cryptsetup as the judge). */
function opens(state: string, id: string, pass: Secret): boolean {
  const f = join(state, `pass-${Math.random().toString(36).slice(2)}`);
  writeFileSync(f, pass.expose(), { mode: 0o600 });
  requireTool('cryptsetup');
  const r = spawnSync('cryptsetup', ['open', '--test-passphrase', '--key-file', f, image(state, id)]);
  assert.ifError(r.error);
  return r.status === 0;
}

function digests(state: string, id: string): string {
  const r = spawnSync('cryptsetup', ['luksDump', image(state, id)], { encoding: 'utf8' });
  return r.stdout.slice(r.stdout.indexOf('Digests:'));
}

test('volume rotate-key: a new volume key, reencrypted online, data kept', { timeout: 300_000 }, async () => {
  const t = makeTempDir('cm-rotate-');
  const state = join(t.dir, 'agent');
  let host: AgentHost | undefined = await startAgent(state);
  try {
    const data = Buffer.from('rotate-key marker '.repeat(1000));
    const want = await marker(host, 'db/data', data);
    const before = digests(state, 'db/data');
    const r = await cm('volume', 'rotate-key', 'db/data', '--state-dir', state, '--hotzone-size', '1048576');
    assert.equal(r.code, 0, r.err);
    assert.match(r.out, /db\/data: finished 100\.0%/);
    assert.ok((await marker(host, 'db/data')).equals(want), 'read through the live mapping after the rotation');
    const after = digests(state, 'db/data');
    assert.notEqual(after, before, 'the volume key digest changed');
    assert.doesNotMatch(
      spawnSync('cryptsetup', ['luksDump', image(state, 'db/data')], { encoding: 'utf8' }).stdout,
      /reencrypt/,
    );
    // Unknown volume, and a plain daemon's refusal is the agent's only (a name that is not in the manifest).
    assert.equal((await cm('volume', 'rotate-key', 'db/nope', '--state-dir', state)).code, 4);
    // A volume with another passphrase (a recovery keyslot added with cryptsetup) is not rotated: the
    // new key would get a keyslot only for the key service's passphrase and drop that one.
    const own = join(t.dir, 'own-pass');
    writeFileSync(own, passphrase(join(state, 'keyd', 'root.key'), 'web/data').expose(), { mode: 0o600 });
    const recovery = join(t.dir, 'recovery-pass');
    writeFileSync(recovery, 'recovery passphrase', { mode: 0o600 });
    const add = spawnSync('cryptsetup', [
      'luksAddKey',
      '--pbkdf',
      'pbkdf2',
      '--pbkdf-force-iterations',
      '1000',
      '--key-file',
      own,
      image(state, 'web/data'),
      recovery,
    ]);
    assert.equal(add.status, 0, String(add.stderr));
    const webBefore = digests(state, 'web/data');
    const refused = await cm('volume', 'rotate-key', 'web/data', '--state-dir', state);
    assert.equal(refused.code, 1, refused.err);
    assert.match(refused.err, /keyslot 1 of .* holds another passphrase, which a new volume key would drop/);
    assert.equal(digests(state, 'web/data'), webBefore, 'nothing changed on the refused volume');
    assert.ok(opens(state, 'web/data', Secret.copyOf(Buffer.from('recovery passphrase'))));
    await host.stop();
    host = undefined;
    // It reopens after a restart with the same derived passphrase and the new key.
    host = await startAgent(state);
    assert.ok((await marker(host, 'db/data')).equals(want));
  } finally {
    await host?.stop();
    await t.cleanup();
  }
});

test('root rotation: rewrap-keys finishes what a crash left in the middle of the fleet, before and after the commit', {
  timeout: 300_000,
}, async () => {
  const t = makeTempDir('cm-rewrap-');
  const state = join(t.dir, 'agent');
  const root = join(state, 'keyd', 'root.key');
  let host: AgentHost | undefined = await startAgent(state);
  try {
    const want = new Map<string, Buffer>();
    for (const id of IDS) want.set(id, await marker(host, id, Buffer.from(`${id} marker `.repeat(500))));
    // Nothing to do without a rotation.
    let r = await cm('volume', 'rewrap-keys', '--state-dir', state);
    assert.equal(r.code, 0, r.err);
    assert.match(r.out, /scratch\/db\/data: nothing-to-do/);

    // ---- 1. a rotation begun; a rewrap crashed half-way through db/data (new keyslot added, old one not removed)
    assert.equal((await cm('keyd', 'rotate-root', 'begin', '--state-dir', join(state, 'keyd'))).code, 0);
    assert.equal((await cm('keyd', 'rotate-root', 'begin', '--state-dir', join(state, 'keyd'))).code, 0, 'again: kept');
    const old1 = (id: string) => passphrase(root, id);
    const next1 = (id: string) => passphrase(`${root}.next`, id);
    {
      const dev = await FileDevice.open(image(state, 'db/data'));
      const vol = await Luks2Volume.open(dev);
      await vol.addKey({ passphrase: old1('db/data').expose() }, next1('db/data').expose(), {
        kdf: { ...VOLUME_KEYSLOT_PBKDF },
      });
      await dev.close();
    }
    r = await cm('volume', 'rewrap-keys', '--state-dir', state);
    assert.equal(r.code, 0, r.err);
    assert.match(r.out, /scratch\/db\/data: rewrapped/);
    assert.match(r.out, /scratch\/web\/data: rewrapped/);
    for (const id of IDS) {
      assert.ok(opens(state, id, next1(id)), `${id}: the next root's key opens it`);
      assert.ok(!opens(state, id, old1(id)), `${id}: the old root's key no longer does`);
    }
    // Idempotent: run again (a crash after the last volume, say).
    r = await cm('volume', 'rewrap-keys', '--state-dir', state);
    assert.match(r.out, /scratch\/db\/data: done-already\nscratch\/web\/data: done-already/);
    assert.equal((await cm('keyd', 'rotate-root', 'commit', '--state-dir', join(state, 'keyd'))).code, 0);
    assert.notEqual((await cm('keyd', 'rotate-root', 'commit', '--state-dir', join(state, 'keyd'))).code, 0);
    await host.stop();
    host = await startAgent(state);
    for (const id of IDS) assert.ok((await marker(host, id)).equals(want.get(id)!), `${id} after the first rotation`);

    // ---- 2. a rotation committed before any volume was rewrapped: rewrap-keys moves them from the previous root
    assert.equal((await cm('keyd', 'rotate-root', 'begin', '--state-dir', join(state, 'keyd'))).code, 0);
    const oldRoot2 = readFileSync(root);
    const old2 = (id: string) => passphrase(oldRoot2, id);
    assert.equal((await cm('keyd', 'rotate-root', 'commit', '--state-dir', join(state, 'keyd'))).code, 0);
    const cur2 = (id: string) => passphrase(root, id);
    for (const id of IDS) assert.ok(opens(state, id, old2(id)) && !opens(state, id, cur2(id)));
    r = await cm('volume', 'rewrap-keys', '--state-dir', state);
    assert.equal(r.code, 0, r.err);
    assert.match(r.out, /scratch\/db\/data: rewrapped\nscratch\/web\/data: rewrapped/);
    for (const id of IDS) assert.ok(opens(state, id, cur2(id)) && !opens(state, id, old2(id)));
    await host.stop();
    host = await startAgent(state);
    for (const id of IDS) assert.ok((await marker(host, id)).equals(want.get(id)!), `${id} after the second rotation`);
  } finally {
    await host?.stop();
    await t.cleanup();
  }
});

/** Give `id`'s image a keyslot for `to` (unlocked with `from`) and, unless `keepFrom`, remove `from`'s: a rewrap's two steps. */
async function rewrapBy(state: string, id: string, from: Secret, to: Secret, keepFrom: boolean): Promise<void> {
  const dev = await FileDevice.open(image(state, id));
  try {
    const vol = await Luks2Volume.open(dev);
    await vol.addKey({ passphrase: from.expose() }, to.expose(), { kdf: { ...VOLUME_KEYSLOT_PBKDF } });
    if (!keepFrom) {
      const { keyslot, volumeKey } = await vol.unlock(from.expose());
      volumeKey.dispose();
      await vol.killSlot(keyslot);
    }
  } finally {
    await dev.close();
  }
}

test('root rotation: an agent restarted with the fleet half rewrapped opens every volume (next, current or previous root key)', {
  timeout: 300_000,
}, async () => {
  const t = makeTempDir('cm-rewrap-restart-');
  const state = join(t.dir, 'agent');
  const root = join(state, 'keyd', 'root.key');
  let host: AgentHost | undefined = await startAgent(state);
  try {
    const want = new Map<string, Buffer>();
    for (const id of IDS) want.set(id, await marker(host, id, Buffer.from(`${id} restart marker `.repeat(400))));
    await host.stop();
    host = undefined;
    // ---- a rotation begun; the rewrap run crashed in the middle of the fleet: db/data moved to the next
    // root's key only, web/data half-way (both keyslots). The agent restarts before the commit.
    assert.equal((await cm('keyd', 'rotate-root', 'begin', '--state-dir', join(state, 'keyd'))).code, 0);
    const cur = (id: string) => passphrase(root, id);
    const next = (id: string) => passphrase(`${root}.next`, id);
    await rewrapBy(state, 'db/data', cur('db/data'), next('db/data'), false);
    await rewrapBy(state, 'web/data', cur('web/data'), next('web/data'), true);
    assert.ok(!opens(state, 'db/data', cur('db/data')), 'db/data: only the next root key opens it');
    host = await startAgent(state);
    for (const id of IDS) assert.ok((await marker(host, id)).equals(want.get(id)!), `${id}: opened before the commit`);
    // rotate-key works on a volume whose keyslot is the next root's.
    const rk = await cm('volume', 'rotate-key', 'db/data', '--state-dir', state, '--hotzone-size', '1048576');
    assert.equal(rk.code, 0, rk.err);
    assert.ok((await marker(host, 'db/data')).equals(want.get('db/data')!));
    await host.stop();
    host = undefined;
    // ---- committed with the fleet still half rewrapped: db/data on the current root (was next), web/data
    // with both keyslots (previous and current). A second rotation committed before any rewrap: both on
    // `previous` only. The agent restarts in each state and opens them.
    assert.equal((await cm('keyd', 'rotate-root', 'commit', '--state-dir', join(state, 'keyd'))).code, 0);
    host = await startAgent(state);
    for (const id of IDS) assert.ok((await marker(host, id)).equals(want.get(id)!), `${id}: opened after the commit`);
    await host.stop();
    host = undefined;
    assert.equal((await cm('keyd', 'rotate-root', 'begin', '--state-dir', join(state, 'keyd'))).code, 0);
    const prevRoot = readFileSync(root);
    assert.equal((await cm('keyd', 'rotate-root', 'commit', '--state-dir', join(state, 'keyd'))).code, 0);
    for (const id of IDS)
      assert.ok(!opens(state, id, passphrase(root, id)), `${id}: the current root key does not open it`);
    host = await startAgent(state);
    for (const id of IDS)
      assert.ok((await marker(host, id)).equals(want.get(id)!), `${id}: opened by the previous root`);
    // rewrap-keys (the agent running) then finishes the fleet: every volume on the current root only.
    const r = await cm('volume', 'rewrap-keys', '--state-dir', state);
    assert.equal(r.code, 0, r.err);
    for (const id of IDS) {
      assert.ok(opens(state, id, passphrase(root, id)), `${id}: the current root key opens it`);
      assert.ok(!opens(state, id, passphrase(prevRoot, id)), `${id}: the previous root key no longer does`);
    }
    await host.stop();
    host = await startAgent(state);
    for (const id of IDS) assert.ok((await marker(host, id)).equals(want.get(id)!), `${id}: after rewrap-keys`);
  } finally {
    await host?.stop();
    await t.cleanup();
  }
});
