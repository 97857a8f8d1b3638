import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { memoryAudit } from '../../src/keyservice/audit.js';
import { inprocKeyClient } from '../../src/keyservice/client.js';
import { DEFAULT_POLICY } from '../../src/keyservice/policy.js';
import { KeyService } from '../../src/keyservice/service.js';
import { readBootId, reconcileUntilSettled, shutdown } from '../../src/reconciler/agent.js';
import { DEFAULT_MANIFEST_YAML } from '../../src/reconciler/default-manifest.js';
import { parseManifest } from '../../src/reconciler/manifest.js';
import { desiredVolumes } from '../../src/reconciler/plan.js';
import { type KeyPort, MemoryKeyStore } from '../../src/reconciler/ports.js';
import { StateStore } from '../../src/reconciler/state.js';
import { CryptmapError } from '../../src/util/errors.js';
import { setLogSink } from '../../src/util/log.js';
import { Secret } from '../../src/util/secret.js';
import { makeTempDir } from '../helpers/tmp.js';
import { FakeWorld } from './fake-world.js';

setLogSink(() => {});

test('boot id: from the kernel file or an override', async () => {
  const t = makeTempDir('cryptmap-boot-');
  try {
    const f = join(t.dir, 'boot_id');
    await writeFile(f, '3f1c0e9a-5d0b-4c4e-9a55-0d2f6b8f0a11\n');
    assert.equal(await readBootId(undefined, f), '3f1c0e9a-5d0b-4c4e-9a55-0d2f6b8f0a11');
    assert.equal(await readBootId('test-boot-2', f), 'test-boot-2');
    await assert.rejects(readBootId('a b'), { code: 'EBOOTID' });
    await assert.rejects(readBootId(undefined, join(t.dir, 'missing')), /give --boot-id/);
  } finally {
    await t.cleanup();
  }
});

test('reconcile until the key service answers, then shut down cleanly and start again', async () => {
  const t = makeTempDir('cryptmap-agent-');
  try {
    const targets = desiredVolumes(parseManifest(DEFAULT_MANIFEST_YAML), join(t.dir, 'volumes'));
    const real = inprocKeyClient(
      new KeyService({ root: Secret.copyOf(Buffer.alloc(32, 5)), policy: DEFAULT_POLICY, audit: memoryAudit() }),
    );
    let failures = 2;
    const keys: KeyPort = {
      async deriveKey(req) {
        if (failures-- > 0) throw new CryptmapError('EKEYD_UNREACHABLE', 'key service is unreachable');
        return real.deriveKey(req);
      },
    };
    const world = new FakeWorld();
    const store = new StateStore(t.dir);
    const ephemeralKeys = new MemoryKeyStore();
    const reports: string[] = [];
    const common = {
      store,
      ports: world,
      keys,
      ephemeralKeys,
      bootId: 'b1',
      retry: { attempts: 1, baseMs: 1, maxMs: 1 },
    };
    const r = await reconcileUntilSettled({
      ...common,
      targets,
      intervalMs: 1,
      onReport: (x) => reports.push(x.retryLater ? 'waiting' : 'settled'),
    });
    assert.deepEqual(reports, ['waiting', 'waiting', 'settled']);
    assert.ok(r.converged);
    const db = targets.find((x) => x.class === 'persistent')!;
    world.write(db, 'kept');
    const down = await shutdown(common);
    assert.deepEqual(down.volumes.map((v) => [v.id, v.state]).sort(), [
      ['scratch/db/data', 'stopped'],
      ['scratch/web/cache', 'removed'],
      ['swap/swap0', 'removed'],
    ]);
    assert.deepEqual([...world.files.keys()], [db.path], 'only the persistent file is left');
    assert.equal(world.mappings.size + world.attached.size + world.mounted.size, 0);
    assert.equal((await store.load()).volumes[db.id]?.phase, 'stopped');
    // Run again: the persistent volume is reopened with its data; the others are made afresh.
    const again = await reconcileUntilSettled({ ...common, targets, ephemeralKeys: new MemoryKeyStore() });
    assert.ok(again.converged);
    assert.deepEqual(
      again.executed.filter((s) => s.id === db.id).map((s) => s.kind),
      ['open', 'attach', 'mount'],
    );
    assert.deepEqual(world.files.get(db.path)!.data, ['kept']);
    // An aborted loop returns at once.
    const ac = new AbortController();
    ac.abort();
    failures = 100;
    await shutdown(common);
    const aborted = await reconcileUntilSettled({ ...common, targets, intervalMs: 60_000, signal: ac.signal });
    assert.ok(aborted.retryLater);
  } finally {
    await t.cleanup();
  }
});
