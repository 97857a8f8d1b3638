import assert from 'node:assert/strict';
import { test } from 'node:test';
import { memoryAudit } from '../../src/keyservice/audit.js';
import { inprocKeyClient } from '../../src/keyservice/client.js';
import { DEFAULT_POLICY } from '../../src/keyservice/policy.js';
import { KeyService } from '../../src/keyservice/service.js';
import { type ApplyReport, apply, observe, type StatePort } from '../../src/reconciler/apply.js';
import { parseManifest } from '../../src/reconciler/manifest.js';
import { desiredVolumes, plan } from '../../src/reconciler/plan.js';
import { type KeyPort, type LeasePort, MemoryKeyStore, type VolumeTarget } from '../../src/reconciler/ports.js';
import { type AgentState, emptyState } from '../../src/reconciler/state.js';
import { formatStatus, statusRows } from '../../src/reconciler/status.js';
import { CryptmapError } from '../../src/util/errors.js';
import { setLogSink } from '../../src/util/log.js';
import { Secret } from '../../src/util/secret.js';
import { Crash, crashingStore, FakeWorld } from './fake-world.js';

const MANIFEST = `version: 1
services:
  - name: web
    volumes:
      - {name: cache, size: 8M, mountpoint: /srv/web}
  - name: db
    volumes:
      - {name: data, size: 8M, class: persistent, mountpoint: /srv/db}
      - {name: raw, size: 4M, class: persistent, filesystem: none}
swap:
  - {name: swap0, size: 4M}
`;
const TARGETS = desiredVolumes(parseManifest(MANIFEST), '/vol');
const byId = (id: string) => TARGETS.find((t) => t.id === id)!;
const CACHE = byId('scratch/web/cache');
const DATA = byId('scratch/db/data');
const RAW = byId('scratch/db/raw');
const SWAP = byId('swap/swap0');

const logLines: string[] = [];
setLogSink((l) => logLines.push(l));

/** State kept in memory as JSON text (what the file would hold). */
class MemoryState implements StatePort {
  text = JSON.stringify(emptyState());
  async load(): Promise<AgentState> {
    return JSON.parse(this.text) as AgentState;
  }
  async save(s: AgentState): Promise<void> {
    this.text = JSON.stringify(s);
  }
}

function keyService(rootByte = 0x42): KeyPort {
  return inprocKeyClient(
    new KeyService({ root: Secret.copyOf(Buffer.alloc(32, rootByte)), policy: DEFAULT_POLICY, audit: memoryAudit() }),
  );
}

interface Node {
  world: FakeWorld;
  state: MemoryState;
  ephemeralKeys: MemoryKeyStore;
  keys: KeyPort;
}

function node(world = new FakeWorld(), keys = keyService()): Node {
  return { world, state: new MemoryState(), ephemeralKeys: new MemoryKeyStore(), keys };
}

const sleeps: number[] = [];
function run(
  n: Node,
  bootId: string,
  targets: VolumeTarget[] = TARGETS,
  extra: Partial<Parameters<typeof apply>[0]> = {},
): Promise<ApplyReport> {
  return apply({
    targets,
    store: crashingStore(n.state, n.world),
    ports: n.world,
    keys: n.keys,
    ephemeralKeys: n.ephemeralKeys,
    bootId,
    retry: { attempts: 4, baseMs: 100, maxMs: 250 },
    sleep: async (ms) => {
      sleeps.push(ms);
    },
    ...extra,
  });
}

async function assertConverged(n: Node, bootId: string, targets: VolumeTarget[] = TARGETS, what = ''): Promise<void> {
  const w = n.world;
  for (const t of targets) {
    assert.ok(w.mappings.has(t.mapping), `${what}: ${t.id} open`);
    assert.ok(w.attached.has(t.mapping), `${what}: ${t.id} attached`);
    if (t.mountpoint || t.kind === 'swap') assert.ok(w.mounted.has(t.mapping), `${what}: ${t.id} mounted`);
    if (t.filesystem !== 'none')
      assert.equal(w.files.get(t.path)?.fs, t.filesystem, `${what}: ${t.id} has its file system`);
  }
  assert.deepEqual(
    [...w.files.keys()].sort(),
    targets.map((t) => t.path).sort(),
    `${what}: exactly the desired files exist`,
  );
  const st = await n.state.load();
  const steps = plan(targets, await observe(targets, st, w, n.ephemeralKeys, bootId), bootId);
  assert.deepEqual(steps, [], `${what}: nothing left to do`);
  for (const t of targets) assert.equal(st.volumes[t.id]?.phase, 'ready', `${what}: ${t.id} recorded ready`);
}

test('from scratch to converged, then a rerun does nothing', async () => {
  const n = node();
  const r = await run(n, 'boot-1');
  assert.ok(r.converged);
  assert.deepEqual(
    r.volumes.map((v) => [v.id, v.state]),
    TARGETS.map((t) => [t.id, 'ready']),
  );
  assert.deepEqual(
    r.executed.filter((s) => s.id === DATA.id).map((s) => s.kind),
    ['createFile', 'format', 'open', 'attach', 'mkfs', 'mount'],
  );
  assert.deepEqual(
    r.executed.filter((s) => s.id === SWAP.id).map((s) => s.kind),
    ['createFile', 'open', 'attach', 'mkfs', 'mount'],
  );
  assert.deepEqual(
    r.executed.filter((s) => s.id === RAW.id).map((s) => s.kind),
    ['createFile', 'format', 'open', 'attach'],
  );
  await assertConverged(n, 'boot-1');
  assert.equal(
    r.volumes.find((v) => v.id === DATA.id)?.record?.attach?.nbdUri,
    'nbd+unix:///scratch:db:data?socket=/fake/nbd.sock',
  );
  const again = await run(n, 'boot-1');
  assert.deepEqual(again.executed, []);
  assert.ok(again.converged);
});

test('reboot: ephemeral volumes and swap are fresh (new key), persistent ones reopened intact', async () => {
  const n = node();
  await run(n, 'boot-1');
  n.world.write(DATA, 'precious');
  n.world.write(CACHE, 'scratch');
  const oldCacheKey = n.world.files.get(CACHE.path)!.luksKey!;
  const oldSwapKey = n.world.files.get(SWAP.path)!.plainKey!;
  const dataKey = n.world.files.get(DATA.path)!.luksKey!;
  // Reboot: the process and its mappings are gone, so are the in-memory keys.
  n.world.restart();
  n.ephemeralKeys = new MemoryKeyStore();
  const r = await run(n, 'boot-2');
  assert.ok(r.converged);
  await assertConverged(n, 'boot-2');
  assert.deepEqual(n.world.files.get(DATA.path)!.data, ['precious']);
  assert.equal(n.world.files.get(DATA.path)!.luksKey, dataKey);
  assert.deepEqual(
    r.executed.filter((s) => s.id === DATA.id).map((s) => s.kind),
    ['open', 'attach', 'mount'],
  );
  assert.deepEqual(n.world.files.get(CACHE.path)!.data, []);
  assert.notEqual(n.world.files.get(CACHE.path)!.luksKey, oldCacheKey, 'ephemeral volume unreadable with the old key');
  assert.notEqual(n.world.files.get(SWAP.path)!.plainKey, oldSwapKey);
  assert.equal(r.executed.find((s) => s.id === CACHE.id)?.reason, 'new boot');
  // Agent restart within the same boot: persistent reopened, ephemeral remade (its key is gone).
  n.world.restart();
  n.ephemeralKeys = new MemoryKeyStore();
  const r3 = await run(n, 'boot-2');
  assert.equal(r3.executed.find((s) => s.id === CACHE.id)?.reason, 'per-boot key no longer in memory');
  await assertConverged(n, 'boot-2');
});

for (const mode of ['after', 'before'] as const) {
  for (const restart of [true, false]) {
    test(`a crash ${mode} each step N (${restart ? 'process restarts' : 'same process'}), then a rerun converges with nothing lost`, async () => {
      for (const scenario of ['fresh', 'reboot'] as const) {
        let n = 1;
        for (; n < 200; n++) {
          const nd = node();
          const bootId = scenario === 'fresh' ? 'boot-1' : 'boot-2';
          if (scenario === 'reboot') {
            await run(nd, 'boot-1');
            nd.world.write(DATA, 'precious');
            nd.world.restart();
            nd.ephemeralKeys = new MemoryKeyStore();
          }
          nd.world.mutations = 0;
          nd.world.crashAt = n;
          nd.world.crashMode = mode;
          await run(nd, bootId).catch((e) => assert.ok(e instanceof Crash, String(e)));
          if (!nd.world.crashed) break; // N is past the last step
          if (restart) {
            nd.world.restart();
            nd.ephemeralKeys = new MemoryKeyStore();
          } else {
            nd.world.crashed = false;
            nd.world.crashAt = undefined;
          }
          const r = await run(nd, bootId);
          const what = `${scenario}, crash ${mode} step ${n}`;
          assert.ok(r.converged, what);
          await assertConverged(nd, bootId, TARGETS, what);
          if (scenario === 'reboot')
            assert.deepEqual(nd.world.files.get(DATA.path)!.data, ['precious'], `${what}: persistent data intact`);
        }
        assert.ok(n > 10, `${scenario}: crashes were injected at ${n - 1} points`);
      }
    });
  }
}

test('removing services: unmounted and closed; ephemeral files deleted, persistent kept', async () => {
  const n = node();
  await run(n, 'boot-1');
  n.world.write(DATA, 'precious');
  const onlyWeb = desiredVolumes(
    parseManifest(
      'version: 1\nservices:\n  - name: web\n    volumes:\n      - {name: cache, size: 8M, mountpoint: /srv/web}\n',
    ),
    '/vol',
  );
  const r = await run(n, 'boot-1', onlyWeb);
  assert.ok(r.converged);
  assert.deepEqual(
    r.executed.filter((s) => s.id === DATA.id).map((s) => s.kind),
    ['unmount', 'detach', 'close'],
  );
  assert.deepEqual(
    r.executed.filter((s) => s.id === SWAP.id).map((s) => s.kind),
    ['unmount', 'detach', 'close', 'deleteFile'],
  );
  assert.ok(n.world.files.has(DATA.path) && n.world.files.has(RAW.path));
  assert.ok(!n.world.files.has(SWAP.path));
  assert.ok(!n.world.mappings.has(DATA.mapping));
  const st = await n.state.load();
  assert.equal(st.volumes[DATA.id]?.phase, 'retired');
  assert.equal(st.volumes[SWAP.id], undefined);
  assert.deepEqual(
    r.volumes.map((v) => [v.id, v.state]).sort(),
    [
      [CACHE.id, 'ready'],
      [DATA.id, 'retired'],
      [RAW.id, 'retired'],
      [SWAP.id, 'removed'],
    ].sort(),
  );
  // Bringing the service back reopens its data; no mkfs.
  const back = await run(n, 'boot-1');
  assert.deepEqual(
    back.executed.filter((s) => s.id === DATA.id).map((s) => s.kind),
    ['open', 'attach', 'mount'],
  );
  assert.deepEqual(n.world.files.get(DATA.path)!.data, ['precious']);
});

test('a second node with its own state opens a copy of a persistent volume through the same key service', async () => {
  const keys = keyService();
  const a = node(new FakeWorld(), keys);
  await run(a, 'boot-a');
  a.world.write(DATA, 'replicated');
  const b = node(new FakeWorld(), keys);
  b.world.files.set(DATA.path, structuredClone(a.world.files.get(DATA.path)!));
  const r = await run(b, 'boot-b', [DATA]);
  assert.ok(r.converged);
  assert.deepEqual(
    r.executed.map((s) => s.kind),
    ['open', 'attach', 'mount'],
    'adopted: never formatted or mkfs-ed',
  );
  assert.deepEqual(b.world.files.get(DATA.path)!.data, ['replicated']);
  assert.equal((await b.state.load()).volumes[DATA.id]?.created, false);
  // A node with another root secret cannot open it and refuses (never reformats).
  const c = node(new FakeWorld(), keyService(0x43));
  c.world.files.set(DATA.path, structuredClone(a.world.files.get(DATA.path)!));
  const rc = await run(c, 'boot-c', [DATA]);
  assert.equal(rc.volumes[0]?.state, 'refused');
  assert.match(rc.volumes[0]?.reason ?? '', /does not unlock with the service's key/);
  assert.deepEqual(c.world.files.get(DATA.path)!.data, ['replicated']);
  assert.ok(!c.world.calls.some((x) => /format|mkfs|deleteFile/.test(x)));
});

test('altered, truncated, foreign or vanished persistent files are refused, never reformatted', async () => {
  const n = node();
  await run(n, 'boot-1');
  n.world.write(DATA, 'precious');
  n.world.restart();
  n.world.files.get(DATA.path)!.bytes = 4096; // truncated by someone
  n.world.files.get(RAW.path)!.luksKey = undefined; // header overwritten by someone
  n.world.calls = [];
  const r = await run(n, 'boot-1', [DATA, RAW]);
  assert.deepEqual(
    r.volumes.filter((v) => v.id === DATA.id || v.id === RAW.id).map((v) => [v.id, v.state]),
    [
      [DATA.id, 'refused'],
      [RAW.id, 'refused'],
    ],
  );
  assert.match(r.volumes[0]!.reason!, /file is truncated \(4096 bytes, was 25165824\).*never reformatted/);
  assert.match(r.volumes[1]!.reason!, /not a LUKS volume/);
  assert.ok(
    !n.world.calls.some((x) => /(format|mkfs|deleteFile|createFile) scratch\/db/.test(x)),
    n.world.calls.join(),
  );
  // An ephemeral volume altered within its boot is refused too (remade after the next boot).
  const e = node();
  await run(e, 'boot-1');
  e.world.files.get(CACHE.path)!.bytes = 1;
  const re = await run(e, 'boot-1');
  assert.match(re.volumes.find((v) => v.id === CACHE.id)!.reason!, /truncated.*remade after the next boot/);
  n.world.files.delete(DATA.path);
  const gone = await run(n, 'boot-1', [DATA]);
  assert.match(gone.volumes[0]!.reason!, /has disappeared/);
  assert.ok(!n.world.files.has(DATA.path), 'not silently recreated empty');
  // A file nobody made at an ephemeral volume's path is not deleted.
  const m = node();
  m.world.files.set(CACHE.path, { bytes: 1, data: ['theirs'], foreign: true });
  const rm = await run(m, 'boot-1', [CACHE]);
  assert.equal(rm.volumes[0]!.state, 'refused');
  assert.deepEqual(m.world.files.get(CACHE.path)!.data, ['theirs']);
});

test('full disk during format: clean rollback, nothing half-made; the next run succeeds', async () => {
  const n = node();
  n.world.diskFull = true;
  const r = await run(n, 'boot-1');
  for (const v of r.volumes.filter((x) => x.id !== SWAP.id)) {
    assert.equal(v.state, 'failed');
    assert.match(v.reason!, /^format: .*No space left/);
  }
  assert.deepEqual([...n.world.files.keys()], [SWAP.path], 'no half-made LUKS files left');
  const st = await n.state.load();
  assert.deepEqual(Object.keys(st.volumes), [SWAP.id]);
  n.world.diskFull = false;
  const r2 = await run(n, 'boot-1');
  assert.ok(r2.converged);
  await assertConverged(n, 'boot-1');
});

test('a file that appears just before createFile is not ours: never deleted', async () => {
  const n = node();
  const racy = Object.create(n.world) as FakeWorld;
  racy.createFile = async (v: VolumeTarget) => {
    n.world.files.set(v.path, { bytes: 1, data: ['theirs'], foreign: true });
    return n.world.createFile(v);
  };
  const r = await apply({
    targets: [CACHE],
    store: n.state,
    ports: racy,
    keys: n.keys,
    ephemeralKeys: n.ephemeralKeys,
    bootId: 'b',
  });
  assert.equal(r.volumes[0]?.state, 'failed');
  assert.deepEqual(n.world.files.get(CACHE.path)?.data, ['theirs']);
  assert.equal((await n.state.load()).volumes[CACHE.id], undefined);
});

test('unreachable key service: retry with backoff, report, keep open volumes serving, converge later', async () => {
  let down = false;
  let calls = 0;
  const real = keyService();
  const flaky: KeyPort = {
    async deriveKey(req) {
      calls++;
      if (down)
        throw new CryptmapError('EKEYD_UNREACHABLE', 'key service unix:/x is unreachable: connect ECONNREFUSED', {
          errno: 'ESHUTDOWN',
        });
      return real.deriveKey(req);
    },
  };
  const n = node(new FakeWorld(), flaky);
  await run(n, 'boot-1');
  n.world.write(DATA, 'precious');
  // A new persistent volume while the key service is down: nothing is created; the open one keeps serving.
  down = true;
  sleeps.length = 0;
  calls = 0;
  const more = [
    ...TARGETS,
    {
      ...DATA,
      id: 'scratch/db/extra',
      volume: 'extra',
      path: '/vol/scratch/db/extra.img',
      mapping: 'scratch:db:extra',
      mountpoint: '/srv/extra',
    },
  ];
  const r = await run(n, 'boot-1', more);
  assert.equal(r.volumes.find((v) => v.id === 'scratch/db/extra')?.state, 'waiting-for-keys');
  assert.equal(r.volumes.find((v) => v.id === DATA.id)?.state, 'ready');
  assert.ok(r.retryLater && !r.converged);
  assert.equal(calls, 4);
  assert.deepEqual(sleeps, [100, 200, 250]);
  assert.ok(!n.world.files.has('/vol/scratch/db/extra.img'));
  assert.ok(n.world.mounted.has(DATA.mapping));
  // After a restart with the key service still down: ephemeral volumes come up, persistent wait.
  n.world.restart();
  n.ephemeralKeys = new MemoryKeyStore();
  const r2 = await run(n, 'boot-1', more);
  assert.equal(r2.volumes.find((v) => v.id === DATA.id)?.state, 'waiting-for-keys');
  assert.equal(r2.volumes.find((v) => v.id === CACHE.id)?.state, 'ready');
  down = false;
  const r3 = await run(n, 'boot-1', more);
  assert.ok(r3.converged);
  await assertConverged(n, 'boot-1', more);
  assert.deepEqual(n.world.files.get(DATA.path)!.data, ['precious']);
});

test('a key service that refuses: failed with the reason, no retries', async () => {
  const denied: KeyPort = {
    async deriveKey() {
      throw new CryptmapError(
        'EKEYD_DENIED',
        'key service unix:/x refused: local may not have keys of service db (scratch)',
      );
    },
  };
  const n = node(new FakeWorld(), denied);
  sleeps.length = 0;
  const r = await run(n, 'boot-1', [DATA]);
  assert.equal(r.volumes[0]?.state, 'failed');
  assert.equal(r.volumes[0]?.code, 'EKEYD_DENIED');
  assert.deepEqual(sleeps, []);
  assert.equal(n.world.files.size, 0);
});

test('no key material in the state record or the logs', async () => {
  logLines.length = 0;
  const n = node();
  await run(n, 'boot-1');
  const keys = [...n.world.files.values()]
    .flatMap((f) => [f.luksKey, f.plainKey])
    .filter((k): k is string => k !== undefined);
  assert.ok(keys.length >= 4);
  const text = n.state.text + logLines.join('\n');
  for (const k of keys) assert.ok(!text.includes(k.slice(0, 16)), 'key leaked');
  assert.ok(
    logLines.some((l) => l.includes('nbd+unix:///scratch:db:data')),
    'the log names each served volume with its NBD URI',
  );
});

test('a shared volume whose format fails gives its single-writer lease back (kept, it locked every other node out)', async () => {
  const held = new Set<string>();
  const leases: LeasePort = {
    node: 'node-a',
    acquire: async (id) => {
      held.add(id);
      return { held: true };
    },
    holds: (id) => held.has(id),
    release: async (id) => {
      held.delete(id);
    },
  };
  const shared: VolumeTarget = { ...DATA, device: 'nbd://store/data', path: 'nbd://store/data' };
  const n = node();
  n.world.diskFull = true;
  const r = await run(n, 'boot-1', [shared], { leases });
  assert.equal(r.volumes.find((v) => v.id === shared.id)?.state, 'failed');
  assert.equal(held.size, 0, 'the lease is still held after the failed format');
  // The next run, with the disk fixed, takes it again and keeps it while the volume is open.
  n.world.diskFull = false;
  await run(n, 'boot-1', [shared], { leases });
  assert.ok(held.has(shared.id), 'an open shared volume holds its lease');
});

test('waiting for a lease keeps the phase the volume reached; status shows both; taking the lease clears the wait', async () => {
  let holder: string | undefined;
  const leases: LeasePort = {
    node: 'node-a',
    acquire: async () => {
      if (holder !== undefined && holder !== 'node-a')
        return { held: false, holder: { node: holder, since: '2026-01-01T00:00:00Z' } };
      holder = 'node-a';
      return { held: true };
    },
    holds: () => holder === 'node-a',
    release: async () => {
      if (holder === 'node-a') holder = undefined;
    },
  };
  const shared: VolumeTarget = { ...DATA, device: 'nbd://store/data', path: 'nbd://store/data' };
  const n = node();
  await run(n, 'boot-1', [shared], { leases });
  assert.equal((await n.state.load()).volumes[shared.id]?.phase, 'ready');
  // Fenced: the volume is closed, the lease is gone, another node holds it now.
  n.world.mounted.clear();
  n.world.attached.clear();
  n.world.mappings.clear();
  holder = 'node-b';
  const r = await run(n, 'boot-1', [shared], { leases });
  assert.equal(r.volumes.find((v) => v.id === shared.id)?.state, 'waiting-for-lease');
  const rec = (await n.state.load()).volumes[shared.id]!;
  assert.equal(rec.phase, 'ready', 'the phase reached is kept');
  assert.equal(rec.formatted, true);
  assert.match(rec.leaseWait ?? '', /held by node-b/);
  const text = formatStatus(statusRows(await n.state.load()));
  assert.match(text, /ready, waiting-for-lease/);
  assert.match(text, /lease held by node-b since 2026-01-01T00:00:00Z/);
  assert.match(text, /waiting for the single-writer lease, held by node-b/);
  // Node B lets go: the volume comes back and the wait is gone.
  holder = undefined;
  await run(n, 'boot-1', [shared], { leases });
  const back = (await n.state.load()).volumes[shared.id]!;
  assert.equal(back.phase, 'ready');
  assert.equal(back.leaseWait, undefined);
  assert.doesNotMatch(formatStatus(statusRows(await n.state.load())), /waiting/);
});
