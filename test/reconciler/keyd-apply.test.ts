// The apply loop against a real key service over its Unix socket (fake data path): waiting while the
// socket is absent, converging once keyd listens, and a client the policy does not allow refused.
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { test } from 'node:test';
import { memoryAudit } from '../../src/keyservice/audit.js';
import { connectKeyService } from '../../src/keyservice/client.js';
import { policyFromObject, tokenDigest } from '../../src/keyservice/policy.js';
import { listenUnix } from '../../src/keyservice/server.js';
import { KeyService } from '../../src/keyservice/service.js';
import { apply } from '../../src/reconciler/apply.js';
import { parseManifest } from '../../src/reconciler/manifest.js';
import { desiredVolumes } from '../../src/reconciler/plan.js';
import { MemoryKeyStore } from '../../src/reconciler/ports.js';
import { StateStore } from '../../src/reconciler/state.js';
import { setLogSink } from '../../src/util/log.js';
import { Secret } from '../../src/util/secret.js';
import { makeTempDir } from '../helpers/tmp.js';
import { FakeWorld } from './fake-world.js';

setLogSink(() => {});

test('persistent volumes wait for keyd, then converge; a client outside the policy is refused', async () => {
  const t = makeTempDir('cryptmap-keyd-apply-');
  const sock = join(t.dir, 'keyd.sock');
  const targets = desiredVolumes(
    parseManifest(
      `version: 1\nkeyService: {address: "unix:${sock}"}\nservices:\n  - name: db\n    volumes: [{name: data, size: 8M, class: persistent, mountpoint: /srv/db}]\n  - name: web\n    volumes: [{name: c, size: 8M}]\n`,
    ),
    join(t.dir, 'volumes'),
  );
  const world = new FakeWorld();
  const audit = memoryAudit();
  const agentToken = 'agent-token';
  const service = new KeyService({
    root: Secret.copyOf(Buffer.alloc(32, 9)),
    policy: policyFromObject({
      version: 1,
      clients: [{ identity: 'token:agent', tokenSha256: tokenDigest(agentToken), services: ['db'] }],
    }),
    audit,
  });
  const store = new StateStore(t.dir);
  const ephemeralKeys = new MemoryKeyStore();
  const sleeps: number[] = [];
  const run = (keys: ReturnType<typeof connectKeyService>) =>
    apply({
      targets,
      store,
      ports: world,
      keys,
      ephemeralKeys,
      bootId: 'b',
      retry: { attempts: 3, baseMs: 1, maxMs: 2 },
      sleep: async (ms) => void sleeps.push(ms),
    });
  let srv: Awaited<ReturnType<typeof listenUnix>> | undefined;
  try {
    const client = connectKeyService(`unix:${sock}`, { timeoutMs: 2000 });
    const agentClient = connectKeyService(`unix:${sock}`, { timeoutMs: 2000, token: agentToken });
    const r1 = await run(agentClient);
    assert.deepEqual(
      r1.volumes.map((v) => [v.id, v.state]),
      [
        ['scratch/db/data', 'waiting-for-keys'],
        ['scratch/web/c', 'ready'],
      ],
    );
    assert.deepEqual(sleeps, [1, 2]);
    srv = await listenUnix(service, sock);
    const r2 = await run(agentClient);
    assert.ok(r2.converged);
    assert.ok(world.mounted.has('scratch:db:data'));
    // A client without the token is `local`, which this policy does not list.
    world.restart();
    const r3 = await run(client);
    assert.equal(r3.volumes.find((v) => v.id === 'scratch/db/data')?.state, 'failed');
    assert.equal(r3.volumes.find((v) => v.id === 'scratch/db/data')?.code, 'EKEYD_DENIED');
    assert.match(audit.lines.join(''), /"identity":"local".*"denied"/);
  } finally {
    await srv?.close();
    await t.cleanup();
  }
});
