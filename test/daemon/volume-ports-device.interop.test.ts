/**
 * A manifest volume on shared storage (issue 15 item 2): `device: nbd+unix:///...` names an NBD
 * export (nbdkit here; Ceph RBD in test/blockdev/ceph-rbd.interop.test.ts). The agent formats only a
 * blank export, serves it like a file-backed persistent volume, and another node (its own state
 * dir, same key service) adopts it with its data; an export holding something else, or one that
 * cannot be reached, is refused and never written.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { within } from '../helpers/wait.js';
import { memoryAudit } from '../../src/keyservice/audit.js';
import { inprocKeyClient } from '../../src/keyservice/client.js';
import { DEFAULT_POLICY } from '../../src/keyservice/policy.js';
import { KeyService } from '../../src/keyservice/service.js';
import { parseManifest } from '../../src/reconciler/manifest.js';
import { desiredVolumes } from '../../src/reconciler/plan.js';
import { Secret } from '../../src/util/secret.js';
import { useServers } from '../blockdev/nbd-servers.js';
import { makeTempDir } from '../helpers/tmp.js';
import { TestNode } from './volume-ports-harness.js';

const servers = useServers('cm-devvol-');
const MiB = 1 << 20;
const keys = inprocKeyClient(
  new KeyService({ root: Secret.copyOf(Buffer.alloc(32, 9)), policy: DEFAULT_POLICY, audit: memoryAudit() }),
);
const MARKER = Buffer.from('written on node A, read on node B');

function manifest(uri: string, filesystem = 'ext4'): string {
  return `version: 1\nservices:\n  - name: db\n    volumes:\n      - name: data\n        class: persistent\n        filesystem: ${filesystem}\n        mountpoint: /srv/db\n        device: "${uri}"\n`;
}

test('a blank export is formatted and served; node B adopts it with its data; no file under the volume dir', async () => {
  const img = join(servers.dir, 'shared.img');
  writeFileSync(img, Buffer.alloc(0));
  writeFileSync(img, Buffer.alloc(40 * MiB));
  const srv = await servers.start('nbdkit', (sock) => ['-f', '-U', sock, 'file', img]);
  const uri = `nbd+unix:///?socket=${srv.sock}`;
  const a = makeTempDir('cm-devvol-a-');
  const b = makeTempDir('cm-devvol-b-');
  const nodeA = await TestNode.start({ dir: a.dir, keys });
  let nodeB: TestNode | undefined;
  try {
    const [ta] = desiredVolumes(parseManifest(manifest(uri)), join(a.dir, 'volumes'));
    let r = await nodeA.reconcile([ta!], 'boot-a');
    assert.ok(r.converged, JSON.stringify(r.volumes));
    assert.deepEqual(
      r.executed.map((s) => s.kind),
      ['createFile', 'format', 'open', 'attach', 'mkfs', 'mount'],
    );
    assert.ok(
      readFileSync(img).subarray(0, 6).equals(Buffer.from('LUKS\xba\xbe', 'latin1')),
      'the LUKS2 header is on the export',
    );
    const st = nodeA.core.statusOf(ta!.mapping);
    assert.equal(
      st.mapping!.sizeSectors * 512,
      40 * MiB - 16 * MiB,
      "the volume's size is the export's less the header",
    );
    assert.deepEqual([...(await nodeA.read(ta!, 1024 + 56, 2))], [0x53, 0xef], 'ext4 made on it');
    assert.ok(!existsSync(join(a.dir, 'volumes')), 'no backing file on the node');
    await nodeA.write(ta!, 8 * MiB, MARKER);
    const down = await nodeA.stop('boot-a');
    assert.deepEqual(
      down.volumes.map((v) => [v.id, v.state]),
      [['scratch/db/data', 'stopped']],
    );

    // Node B: its own state dir, the same key service; the volume is adopted, never formatted or mkfs-ed.
    nodeB = await TestNode.start({ dir: b.dir, keys });
    const [tb] = desiredVolumes(parseManifest(manifest(uri)), join(b.dir, 'volumes'));
    r = await nodeB.reconcile([tb!], 'boot-b');
    assert.ok(r.converged, JSON.stringify(r.volumes));
    assert.deepEqual(
      r.executed.map((s) => s.kind),
      ['open', 'attach', 'mount'],
    );
    assert.deepEqual(await nodeB.read(tb!, 8 * MiB, MARKER.length), MARKER);
    const rec = (await nodeB.store.load()).volumes['scratch/db/data']!;
    assert.equal(rec.created, false);
    assert.equal(rec.path, uri);
    await nodeB.stop('boot-b');
    nodeB = undefined;
  } finally {
    await nodeA.core.shutdown().catch(() => {});
    await nodeB?.core.shutdown().catch(() => {});
    await a.cleanup();
    await b.cleanup();
  }
});

test('an export holding data, or unreachable, is refused and never written', async () => {
  const img = join(servers.dir, 'taken.img');
  const junk = randomBytes(4096);
  writeFileSync(img, Buffer.concat([junk, Buffer.alloc(32 * MiB - 4096)]));
  const srv = await servers.start('nbdkit', (sock) => ['-f', '-U', sock, 'file', img]);
  const t = makeTempDir('cm-devvol-r-');
  const node = await TestNode.start({ dir: t.dir, keys });
  try {
    const [v] = desiredVolumes(
      parseManifest(manifest(`nbd+unix:///?socket=${srv.sock}`, 'none').replace('        mountpoint: /srv/db\n', '')),
      join(t.dir, 'volumes'),
    );
    let r = await node.reconcile([v!], 'boot-1');
    assert.equal(r.volumes[0]!.state, 'refused', JSON.stringify(r.volumes));
    assert.match(r.volumes[0]!.reason!, /is not a LUKS volume/);
    assert.ok(readFileSync(img).subarray(0, 4096).equals(junk), 'untouched');

    const [gone] = desiredVolumes(
      parseManifest(
        manifest(`nbd+unix:///?socket=${join(servers.dir, 'none.sock')}`, 'none').replace(
          '        mountpoint: /srv/db\n',
          '',
        ),
      ),
      join(t.dir, 'volumes'),
    );
    r = await node.reconcile([gone!], 'boot-1');
    assert.equal(r.volumes[0]!.state, 'refused', JSON.stringify(r.volumes));
    assert.match(r.volumes[0]!.reason!, /unreachable \(cannot open nbd\+unix/);
  } finally {
    await node.core.shutdown().catch(() => {});
    await t.cleanup();
  }
});

test('fencing with the export gone: the NBD client is cut off by the deadline, waiting I/O fails, nothing reaches the export later', async () => {
  // A lost server is waited for much longer than the fence may take: only the fence deadline ends the wait.
  const saved = process.env.CRYPTMAP_NBD_RECONNECT_TIMEOUT_MS;
  process.env.CRYPTMAP_NBD_RECONNECT_TIMEOUT_MS = '600000';
  const img = join(servers.dir, 'fence.img');
  writeFileSync(img, Buffer.alloc(40 * MiB));
  let srv = await servers.start('nbdkit', (sock) => ['-f', '-U', sock, 'file', img]);
  const t = makeTempDir('cm-devvol-f-');
  const node = await TestNode.start({ dir: t.dir, keys });
  try {
    const [v] = desiredVolumes(
      parseManifest(manifest(`nbd+unix:///?socket=${srv.sock}`, 'none').replace('        mountpoint: /srv/db\n', '')),
      join(t.dir, 'volumes'),
    );
    const r = await node.reconcile([v!], 'boot-1');
    assert.ok(r.converged, JSON.stringify(r.volumes));
    const h = node.core.registry.open(v!.mapping);
    await h.write(0, Buffer.alloc(4096, 1));
    await h.flush();
    const dataAt = 16 * MiB; // the LUKS2 data offset
    assert.ok(
      !readFileSync(img)
        .subarray(dataAt, dataAt + 4096)
        .equals(Buffer.alloc(4096)),
      'the first write landed',
    );
    await srv.kill();
    // Written while the server is gone: held for the reconnect.
    const pending = h.write(MiB, Buffer.alloc(64 << 10, 2)).then(
      () => undefined,
      (e: unknown) => e,
    );
    await within(node.real.fence(v!, 'lease lost (test)', 2000), 30_000, 'the fence to finish');
    const err = await pending;
    assert.ok(err instanceof Error, 'the held write failed');
    assert.equal(node.core.registry.find(v!.mapping), undefined, 'the mapping is closed');
    await h.close().catch(() => {});
    // The server comes back: nothing of the held write arrives (the client's reconnect backoff is at most 2 s).
    srv = await servers.start('nbdkit', (sock) => ['-f', '-U', sock, 'file', img], srv.sock);
    await new Promise((res) => setTimeout(res, 3000));
    assert.ok(
      readFileSync(img)
        .subarray(dataAt + MiB, dataAt + MiB + (64 << 10))
        .equals(Buffer.alloc(64 << 10)),
      'the held write never reached the export',
    );
  } finally {
    if (saved === undefined) delete process.env.CRYPTMAP_NBD_RECONNECT_TIMEOUT_MS;
    else process.env.CRYPTMAP_NBD_RECONNECT_TIMEOUT_MS = saved;
    // Bounded: a fence that failed leaves I/O waiting for the server (600 s).
    await Promise.race([node.core.shutdown().catch(() => {}), new Promise((res) => setTimeout(res, 20_000).unref())]);
    await t.cleanup();
    await srv.stop();
  }
});
