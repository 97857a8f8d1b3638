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
import { memoryAudit } from '../../src/keyservice/audit.js';
import { inprocKeyClient } from '../../src/keyservice/client.js';
import { DEFAULT_POLICY } from '../../src/keyservice/policy.js';
import { KeyService } from '../../src/keyservice/service.js';
import { parseManifest } from '../../src/reconciler/manifest.js';
import { desiredVolumes } from '../../src/reconciler/plan.js';
import { Secret } from '../../src/util/secret.js';
import { useServers } from '../blockdev/nbd-servers.js';
import { tempDir } from '../keyservice/helpers.js';
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
  const a = await tempDir('cm-devvol-a-');
  const b = await tempDir('cm-devvol-b-');
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
  const t = await tempDir('cm-devvol-r-');
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
