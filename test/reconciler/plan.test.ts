import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { parseManifest } from '../../src/reconciler/manifest.js';
import {
  desiredPools,
  desiredVolumes,
  type ObservedVolume,
  plan,
  planPools,
  planPoolTeardown,
} from '../../src/reconciler/plan.js';
import type { VolumeProbe } from '../../src/reconciler/ports.js';
import type { VolumeRecord } from '../../src/reconciler/state.js';

const T = desiredVolumes(
  parseManifest(`version: 1
services:
  - name: web
    volumes: [{name: cache, size: 8M, mountpoint: /srv/web}]
  - name: db
    volumes: [{name: data, size: 8M, class: persistent, mountpoint: /srv/db}]
swap: [{name: s0, size: 4M}]
`),
  '/vol',
);
const [CACHE, DATA, SWAP] = T as [(typeof T)[0], (typeof T)[0], (typeof T)[0]];

const down: VolumeProbe = { fileExists: false, open: false, attached: false, mounted: false };
const up: VolumeProbe = { fileExists: true, isLuks: true, open: true, attached: true, mounted: true };
const stopped: VolumeProbe = { fileExists: true, isLuks: true, open: false, attached: false, mounted: false };

function rec(id: string, over: Partial<VolumeRecord> = {}): VolumeRecord {
  const t = T.find((x) => x.id === id)!;
  return {
    id,
    kind: t.kind,
    class: t.class,
    path: t.path,
    filesystem: t.filesystem,
    mapping: t.mapping,
    bootId: 'b1',
    phase: 'ready',
    created: true,
    formatted: true,
    mkfsDone: true,
    updatedAt: '',
    ...(t.mountpoint ? { mountpoint: t.mountpoint } : {}),
    ...over,
  };
}

const kinds = (steps: { kind: string; id: string }[], id: string) =>
  steps.filter((s) => s.id === id).map((s) => s.kind);

test('nothing observed: build everything in manifest order', () => {
  const s = plan(T, new Map(), 'b1');
  assert.deepEqual(kinds(s, CACHE.id), ['createFile', 'format', 'open', 'attach', 'mkfs', 'mount']);
  assert.deepEqual(kinds(s, DATA.id), ['createFile', 'format', 'open', 'attach', 'mkfs', 'mount']);
  assert.deepEqual(kinds(s, SWAP.id), ['createFile', 'open', 'attach', 'mkfs', 'mount']);
  assert.deepEqual([...new Set(s.map((x) => x.id))], [CACHE.id, DATA.id, SWAP.id]);
});

test('converged: no steps; new boot: ephemeral and swap rebuilt, persistent untouched', () => {
  const obs = new Map<string, ObservedVolume>(
    T.map((t) => [t.id, { record: rec(t.id), probe: up, keyAvailable: true }]),
  );
  assert.deepEqual(plan(T, obs, 'b1'), []);
  const after = new Map<string, ObservedVolume>(
    T.map((t) => [t.id, { record: rec(t.id), probe: stopped, keyAvailable: false }]),
  );
  const s = plan(T, after, 'b2');
  assert.deepEqual(kinds(s, CACHE.id), ['deleteFile', 'createFile', 'format', 'open', 'attach', 'mkfs', 'mount']);
  assert.equal(s.find((x) => x.id === CACHE.id)?.reason, 'new boot');
  assert.deepEqual(kinds(s, SWAP.id), ['deleteFile', 'createFile', 'open', 'attach', 'mkfs', 'mount']);
  assert.deepEqual(kinds(s, DATA.id), ['open', 'attach', 'mount']);
});

test('persistent refusals: not LUKS, damaged, disappeared, does not unlock', () => {
  const one = (o: ObservedVolume) => plan([DATA], new Map([[DATA.id, o]]), 'b1');
  assert.match(
    one({ record: rec(DATA.id), probe: { ...stopped, isLuks: false }, keyAvailable: false })[0]!.reason!,
    /not a LUKS volume/,
  );
  assert.match(
    one({ record: rec(DATA.id), probe: { ...stopped, damage: 'truncated' }, keyAvailable: false })[0]!.reason!,
    /truncated/,
  );
  assert.match(one({ record: rec(DATA.id), probe: down, keyAvailable: false })[0]!.reason!, /disappeared/);
  assert.match(
    one({ record: rec(DATA.id), probe: stopped, keyAvailable: false, unlockFailed: 'x' })[0]!.reason!,
    /does not unlock/,
  );
  for (const o of [{ probe: { ...stopped, isLuks: false } }])
    assert.equal(one({ ...o, keyAvailable: false })[0]!.kind, 'refuse');
  // Found without a record (a copy from another node): opened, never mkfs-ed.
  assert.deepEqual(kinds(one({ probe: stopped, keyAvailable: false }), DATA.id), ['open', 'attach', 'mount']);
  // Interrupted creation: no data yet, so remade.
  assert.deepEqual(
    kinds(
      one({
        record: rec(DATA.id, { phase: 'creating', formatted: false, mkfsDone: false }),
        probe: { ...stopped, isLuks: false },
        keyAvailable: false,
      }),
      DATA.id,
    ),
    ['deleteFile', 'createFile', 'format', 'open', 'attach', 'mkfs', 'mount'],
  );
  // Formatted by us but mkfs not done yet: mkfs once.
  assert.deepEqual(
    kinds(one({ record: rec(DATA.id, { mkfsDone: false }), probe: stopped, keyAvailable: false }), DATA.id),
    ['open', 'attach', 'mkfs', 'mount'],
  );
});

test('class changes: persistent to ephemeral refused; ephemeral to persistent remade', () => {
  const p2e = plan(
    [CACHE],
    new Map([[CACHE.id, { record: rec(CACHE.id, { class: 'persistent' }), probe: stopped, keyAvailable: false }]]),
    'b1',
  );
  assert.equal(p2e[0]?.kind, 'refuse');
  assert.match(p2e[0]!.reason!, /would destroy its data/);
  const e2p = plan(
    [DATA],
    new Map([[DATA.id, { record: rec(DATA.id, { class: 'ephemeral' }), probe: up, keyAvailable: true }]]),
    'b1',
  );
  assert.deepEqual(kinds(e2p, DATA.id), [
    'unmount',
    'detach',
    'close',
    'deleteFile',
    'createFile',
    'format',
    'open',
    'attach',
    'mkfs',
    'mount',
  ]);
});

test('removed volumes: torn down first; only ephemeral files this agent made are deleted', () => {
  const obs = new Map<string, ObservedVolume>(
    T.map((t) => [t.id, { record: rec(t.id), probe: up, keyAvailable: true }]),
  );
  const s = plan([], obs, 'b1');
  assert.deepEqual(kinds(s, CACHE.id), ['unmount', 'detach', 'close', 'deleteFile']);
  assert.deepEqual(kinds(s, DATA.id), ['unmount', 'detach', 'close']);
  assert.deepEqual(kinds(s, SWAP.id), ['unmount', 'detach', 'close', 'deleteFile']);
  const onlyCache = plan(
    [CACHE],
    new Map([...obs].map(([k, v]) => [k, k === CACHE.id ? { ...v, probe: stopped } : v])),
    'b1',
  );
  assert.ok(
    onlyCache.findIndex((x) => x.id === DATA.id) < onlyCache.findIndex((x) => x.id === CACHE.id),
    'teardown before bring-up',
  );
  // An unexplained file at an ephemeral path is refused, not deleted.
  const foreign = plan([CACHE], new Map([[CACHE.id, { probe: stopped, keyAvailable: false }]]), 'b1');
  assert.deepEqual(kinds(foreign, CACHE.id), ['refuse']);
});

test('a formatted persistent volume is never deleted, reformatted or opened as ephemeral or swap (any probe, boot, key)', () => {
  const probe = fc.record({
    fileExists: fc.constant(true),
    isLuks: fc.option(fc.boolean(), { nil: undefined }),
    open: fc.boolean(),
    attached: fc.boolean(),
    mounted: fc.boolean(),
    damage: fc.option(fc.constant('truncated'), { nil: undefined }),
  });
  const record = fc.record({
    bootId: fc.constantFrom('b1', 'b0'),
    phase: fc.constantFrom('creating', 'ready'),
    created: fc.boolean(),
    mkfsDone: fc.boolean(),
  });
  fc.assert(
    fc.property(fc.constantFrom(CACHE, SWAP), probe, record, fc.boolean(), (t, p, over, keyAvailable) => {
      const r = rec(t.id, { ...over, class: 'persistent', formatted: true } as Partial<VolumeRecord>);
      const steps = plan([t], new Map([[t.id, { record: r, probe: p as VolumeProbe, keyAvailable }]]), 'b1');
      assert.deepEqual(kinds(steps, t.id), ['refuse'], `${t.id}: ${JSON.stringify(steps)}`);
      assert.match(steps[0]!.reason!, /was persistent; making it ephemeral would destroy its data/);
    }),
    { numRuns: 300, seed: 7 },
  );
  // The same file as a persistent volume: opened as it is, never rebuilt or formatted.
  for (const p of [stopped, up, { ...stopped, damage: 'truncated' }, { ...stopped, isLuks: false }]) {
    const steps = plan([DATA], new Map([[DATA.id, { record: rec(DATA.id), probe: p, keyAvailable: false }]]), 'b2');
    for (const s of steps) assert.ok(['open', 'attach', 'mount', 'refuse'].includes(s.kind), JSON.stringify(steps));
  }
});

test('thin pools: made when their files are missing (never named devices), opened when closed, closed when no longer asked for', () => {
  const m = parseManifest(`version: 1
pools:
  - {name: main, size: 64M}
  - {name: big, dataDevice: /dev/vdb, metadataDevice: /dev/vdc, blockSize: 1M}
services:
  - name: db
    volumes: [{name: data, size: 8M, class: persistent, pool: main}]
`);
  const pools = desiredPools(m, '/vol');
  assert.deepEqual(
    pools.map((p) => [
      p.id,
      p.mapping,
      p.metadataPath,
      p.dataPath,
      p.ownFiles,
      p.dataBytes,
      p.metadataBytes,
      p.blockBytes,
    ]),
    [
      ['pool/main', 'pool:main', '/vol/pools/main/metadata', '/vol/pools/main/data', true, 64 << 20, 4 << 20, 65536],
      ['pool/big', 'pool:big', '/dev/vdc', '/dev/vdb', false, 0, 0, 1 << 20],
    ],
  );
  const [v] = desiredVolumes(m, '/vol');
  assert.deepEqual(v!.pool, { name: 'main', mapping: 'pool:main', thinMapping: 'thin:db:data' });
  assert.equal(v!.path, '/dev/mapper/thin:db:data');
  const none = { exists: false, partial: false, open: false };
  const kinds = (o: Record<string, { exists: boolean; partial: boolean; open: boolean }>) =>
    planPools(pools, new Map(Object.entries(o))).map((s) => `${s.kind} ${s.id}${s.reason ? `: ${s.reason}` : ''}`);
  assert.deepEqual(kinds({}), [
    'createPool pool/main',
    'openPool pool/main',
    'refuse pool/big: the pool devices are missing (/dev/vdc, /dev/vdb); named devices are never created',
  ]);
  assert.deepEqual(kinds({ 'pool/main': { ...none, partial: true }, 'pool/big': { ...none, exists: true } }), [
    'createPool pool/main: creation was interrupted',
    'openPool pool/main',
    'openPool pool/big',
  ]);
  assert.deepEqual(
    kinds({ 'pool/main': { ...none, exists: true, open: true }, 'pool/big': { ...none, exists: true, open: true } }),
    [],
  );
  assert.deepEqual(planPoolTeardown(pools, ['pool/main', 'pool/old']), [{ kind: 'closePool', id: 'pool/old' }]);
  assert.deepEqual(planPoolTeardown([], ['pool/main']), [{ kind: 'closePool', id: 'pool/main' }]);
});
