// Thin pools in the manifest (issue 17 item 5), over the real data path in one agent process: the
// agent makes a pool (metadata and data files under its state dir) and volumes that are thin
// devices in it; `cryptmap volume snapshot` takes a snapshot while the volume is open; the snapshot
// opens with the service's derived key and shows the data as of the snapshot; thin_check (the
// oracle, Debian thin-provisioning-tools) accepts the pool metadata afterwards. Bad input: a full
// pool fails with an error that names the pool; a snapshot of a volume not in a pool is refused.
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { test } from 'node:test';
import { prepareLoadedLuks } from '../../src/activate/mapping.js';
import { main } from '../../src/cli/main.js';
import { AgentHost } from '../../src/daemon/agent-host.js';
import { memoryAudit } from '../../src/keyservice/audit.js';
import { inprocKeyClient } from '../../src/keyservice/client.js';
import { DEFAULT_POLICY } from '../../src/keyservice/policy.js';
import { KeyService } from '../../src/keyservice/service.js';
import { openLuks } from '../../src/luks/index.js';
import { parseManifest } from '../../src/reconciler/manifest.js';
import { Secret } from '../../src/util/secret.js';
import { captureIO } from '../daemon/helpers.js';
import { tool } from '../dm/thin-helpers.js';
import { makeTempDir } from '../helpers/tmp.js';

const MiB = 1 << 20;

function keys() {
  return inprocKeyClient(
    new KeyService({ root: Secret.copyOf(Buffer.alloc(32, 5)), policy: DEFAULT_POLICY, audit: memoryAudit() }),
  );
}

const POOL_MANIFEST = `version: 1
pools:
  - name: main
    size: 64M
services:
  - name: db
    volumes:
      - name: data
        size: 32M
        class: persistent
        filesystem: none
        pool: main
      - name: logs
        size: 128M
        class: persistent
        filesystem: none
        pool: main
  - name: web
    volumes:
      - name: cache
        size: 8M
        filesystem: none
        pool: main
      - name: plain
        size: 4M
        class: persistent
        filesystem: none
`;

function stamp(n: number, bytes = 64 * 1024): Buffer {
  const b = Buffer.alloc(bytes);
  for (let i = 0; i < bytes; i += 32) b.write(`block ${n} at ${i}`.padEnd(32, '.'), i);
  return b;
}

test('a pool and volumes in it from the manifest; a snapshot taken while open opens with the derived key and shows the data as of then; thin_check accepts the metadata', async () => {
  const t = makeTempDir('cryptmap-agent-pool-');
  const state = join(t.dir, 'state');
  const k = keys();
  let host: AgentHost | undefined = await AgentHost.start({
    manifest: parseManifest(POOL_MANIFEST),
    stateDir: state,
    bootId: 'b1',
    serve: 'nbd-only',
    keys: k,
  });
  try {
    const r = await host.reconcile();
    assert.ok(r.converged, JSON.stringify(r.volumes));
    assert.deepEqual(
      r.volumes.map((v) => [v.id, v.state]),
      [
        ['scratch/db/data', 'ready'],
        ['scratch/db/logs', 'ready'],
        ['scratch/web/cache', 'ready'],
        ['scratch/web/plain', 'ready'],
      ],
    );
    assert.deepEqual(r.pools, [{ id: 'pool/main', state: 'open' }]);
    const core = host.core;
    // Thin devices 0..2 (manifest order), overcommitted: 168M of volumes in a 64M pool.
    const rec = JSON.parse((await import('node:fs')).readFileSync(join(state, 'agent-state.json'), 'utf8')) as {
      volumes: Record<string, { thinId?: number; pool?: { name: string } }>;
    };
    assert.deepEqual(
      Object.entries(rec.volumes).map(([id, v]) => [id, v.pool?.name, v.thinId]),
      [
        ['scratch/db/data', 'main', 0],
        ['scratch/db/logs', 'main', 1],
        ['scratch/web/cache', 'main', 2],
        ['scratch/web/plain', undefined, undefined],
      ],
    );
    const tableOf = (name: string) => core.registry.get(name).liveTable!.format('table', false).join('\n');
    assert.match(
      tableOf('pool:main'),
      /thin-pool \S+\/volumes\/pools\/main\/metadata \S+\/volumes\/pools\/main\/data 128 /,
    );
    assert.match(tableOf('thin:db:data'), /^0 \d+ thin \/dev\/mapper\/pool:main 0$/);
    assert.match(tableOf('scratch:db:data'), / crypt aes-xts-plain64 .* \/dev\/mapper\/thin:db:data 32768/);

    // Data before the snapshot, the snapshot while the volume is open, then new data over it.
    const dev = core.registry.open('scratch:db:data');
    await dev.write(0, stamp(1));
    await dev.write(4 * MiB, stamp(2));
    const c = captureIO();
    assert.equal(await main(['volume', 'snapshot', 'db/data', 'before', '--state-dir', state], c.io), 0, c.err());
    assert.match(c.out(), /^snapshot before of scratch\/db\/data: thin device 3\n$/);
    await dev.write(0, stamp(3));
    await dev.write(8 * MiB, stamp(4));
    await dev.flush();
    const now = Buffer.alloc(64 * 1024);
    await dev.read(0, now);
    assert.deepEqual(now, stamp(3), 'the volume goes on with the new data');
    await dev.close();
    // A second snapshot of the same name, and bad names, are refused.
    const c2 = captureIO();
    assert.equal(await main(['volume', 'snapshot', 'db/data', 'before', '--state-dir', state], c2.io), 5);
    assert.match(c2.err(), /already has a snapshot 'before'/);
    const c3 = captureIO();
    assert.notEqual(await main(['volume', 'snapshot', 'web/plain', 's1', '--state-dir', state], c3.io), 0);
    assert.match(c3.err(), /scratch\/web\/plain is not in a thin pool/);
    const c4 = captureIO();
    assert.notEqual(await main(['volume', 'snapshot', 'web/cache', 's1', '--state-dir', state], c4.io), 0);
    assert.match(c4.err(), /ephemeral/);

    // The snapshot opens with the same derived key and holds the data as of the snapshot.
    await core.registry.create('snapcheck', { table: `0 ${(48 * MiB) / 512} thin /dev/mapper/pool:main 3` });
    const key = await k.deriveKey({ purpose: 'scratch', service: 'db', volume: 'data', length: 32 });
    const hdr = core.registry.open('snapcheck');
    const vol = await openLuks(hdr);
    const prepared = await prepareLoadedLuks(vol, hdr, {
      name: 'scratch:db:data@before',
      device: '/dev/mapper/snapcheck',
      passphrase: key.expose(),
    });
    await vol.close();
    await hdr.close();
    key.dispose();
    await core.openVolume(prepared.mapping, prepared.volumeKey);
    prepared.volumeKey.dispose();
    const snap = core.registry.open('scratch:db:data@before');
    const back = Buffer.alloc(64 * 1024);
    await snap.read(0, back);
    assert.deepEqual(back, stamp(1), 'block 0 as of the snapshot');
    await snap.read(4 * MiB, back);
    assert.deepEqual(back, stamp(2));
    await snap.read(8 * MiB, back);
    assert.notDeepEqual(back, stamp(4), 'a write after the snapshot is not in it');
    await snap.close();
    await core.closeVolume('scratch:db:data@before');
    await core.registry.remove('snapcheck');

    await host.stop();
    host = undefined;
    // Stopped: the pool is closed; thin_check accepts its metadata, thin_ls lists volumes and snapshot.
    const meta = join(state, 'volumes', 'pools', 'main', 'metadata');
    const chk = tool('thin_check', [meta]);
    assert.equal(chk.status, 0, `thin_check: ${chk.stdout}${chk.stderr}`);
    const dump = tool('thin_dump', [meta]);
    assert.equal(dump.status, 0, dump.stderr);
    assert.deepEqual(
      [...dump.stdout.matchAll(/<device dev_id="(\d+)"/g)].map((m) => Number(m[1])),
      [0, 1, 3],
      'the ephemeral volume was deleted at shutdown; the persistent ones and the snapshot stay',
    );

    // Restart: the pool and the persistent volumes in it reopen with their data; a changed size
    // leaves the thin device as it was made (no resize, as for files).
    host = await AgentHost.start({
      manifest: parseManifest(POOL_MANIFEST.replace('size: 32M', 'size: 40M')),
      stateDir: state,
      bootId: 'b2',
      serve: 'nbd-only',
      keys: k,
    });
    const r2 = await host.reconcile();
    assert.ok(r2.converged, JSON.stringify(r2.volumes));
    assert.equal(host.core.registry.get('thin:db:data').liveTable!.sizeBytes, 48 * MiB, '16M header + 32M');
    const again = host.core.registry.open('scratch:db:data');
    await again.read(0, back);
    assert.deepEqual(back, stamp(3), 'the data survives the restart');
    await again.close();
    await host.stop();
    host = undefined;
    assert.equal(tool('thin_check', [meta]).status, 0);
  } finally {
    await host?.stop().catch(() => {});
    await t.cleanup();
  }
});

test('bad input: a full pool fails the volume with an error naming the pool; a volume naming an unknown pool is a manifest error', async () => {
  assert.throws(
    () =>
      parseManifest(
        'version: 1\npools:\n  - {name: main, size: 64M}\nservices:\n  - name: db\n    volumes:\n      - {name: data, size: 8M, pool: mian}\n',
        'm.yaml',
      ),
    /m\.yaml:7: services\[0\]\.volumes\[0\]\.pool: no pool 'mian' is defined \(pools: main\)/,
  );
  const t = makeTempDir('cryptmap-agent-pool-full-');
  const state = join(t.dir, 'state');
  // A 2M pool (32 blocks of 64K): the header fits, a file system over 16M does not.
  const manifest = parseManifest(
    'version: 1\npools:\n  - {name: tiny, size: 2M}\nservices:\n  - name: db\n    volumes:\n      - {name: data, size: 16M, class: persistent, pool: tiny}\n',
  );
  const host = await AgentHost.start({ manifest, stateDir: state, bootId: 'b1', serve: 'nbd-only', keys: keys() });
  try {
    const r = await host.reconcile();
    const v = r.volumes[0]!;
    assert.equal(v.state, 'failed', JSON.stringify(r.volumes));
    assert.match(v.reason ?? '', /^mkfs: thin pool tiny: .*out of data space/);
    assert.equal(v.code, 'ENOSPC');
    assert.match(
      host.core.registry.get('pool:tiny').liveTable!.format('status', false).join(''),
      / 32\/32 - out_of_data_space /,
      'the pool says it is out of data space',
    );
  } finally {
    await host.stop();
    await t.cleanup();
  }
});
