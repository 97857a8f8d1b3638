import assert from 'node:assert/strict';
import { test } from 'node:test';
import { memoryAudit } from '../../src/keyservice/audit.js';
import { inprocKeyClient } from '../../src/keyservice/client.js';
import { DEFAULT_POLICY } from '../../src/keyservice/policy.js';
import { KeyService } from '../../src/keyservice/service.js';
import { apply, type StatePort } from '../../src/reconciler/apply.js';
import { deleteVolume } from '../../src/reconciler/delete.js';
import { parseManifest } from '../../src/reconciler/manifest.js';
import { desiredVolumes } from '../../src/reconciler/plan.js';
import { MemoryKeyStore } from '../../src/reconciler/ports.js';
import { type AgentState, emptyState } from '../../src/reconciler/state.js';
import { setLogSink } from '../../src/util/log.js';
import { Secret } from '../../src/util/secret.js';
import { FakeWorld } from './fake-world.js';

setLogSink(() => {});

test('volume delete: refused while named or in use, then removes the file and the record', async () => {
  let saved: AgentState = emptyState();
  const store: StatePort = {
    load: async () => structuredClone(saved),
    save: async (s) => void (saved = structuredClone(s)),
  };
  const world = new FakeWorld();
  const keys = inprocKeyClient(
    new KeyService({ root: Secret.copyOf(Buffer.alloc(32, 1)), policy: DEFAULT_POLICY, audit: memoryAudit() }),
  );
  const all = desiredVolumes(
    parseManifest(
      'version: 1\nservices:\n  - name: db\n    volumes: [{name: data, size: 8M, class: persistent, mountpoint: /srv/db}]\n',
    ),
    '/v',
  );
  const common = { store, ports: world, keys, ephemeralKeys: new MemoryKeyStore(), bootId: 'b' };
  await apply({ ...common, targets: all });
  const id = 'scratch/db/data';
  await assert.rejects(deleteVolume({ id, store, ports: world, desired: all }), { code: 'EVOLUME_NAMED' });
  await assert.rejects(deleteVolume({ id: 'scratch/x/y', store, ports: world, desired: [] }), { code: 'ENOVOLUME' });
  world.mounted.add('scratch:db:data');
  await assert.rejects(deleteVolume({ id, store, ports: world, desired: [] }), { code: 'EVOLUME_BUSY' });
  world.mounted.delete('scratch:db:data');
  await apply({ ...common, targets: [] });
  assert.ok(world.files.has('/v/scratch/db/data.img'), 'removing it from the manifest keeps the file');
  assert.deepEqual(await deleteVolume({ id, store, ports: world, desired: [] }), { path: '/v/scratch/db/data.img' });
  assert.equal(world.files.size, 0);
  assert.deepEqual(saved.volumes, {});
});
