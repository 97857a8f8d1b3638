/**
 * Single-writer leases in a real etcd (issue 15 item 4): one holder per volume; a released lease
 * is free at once; a holder cut off from etcd (a partition: its traffic is dropped by a proxy) is
 * told to stop I/O before its TTL runs out, and the other node gets the lease only after that;
 * etcd stopped (SIGSTOP) fences the holder too.
 */
import assert from 'node:assert/strict';
import { performance } from 'node:perf_hooks';
import { test } from 'node:test';
import { pollUntil } from '../helpers/wait.js';
import { EtcdLeases } from '../../src/coordination/etcd-leases.js';
import { startEtcd, startProxy } from './etcd.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const TTL = 4;

/** Poll `acquire` until it holds (deadline `ms`); the time it got it. */
async function acquireWithin(l: EtcdLeases, volume: string, ms: number): Promise<number> {
  const t0 = performance.now();
  for (;;) {
    try {
      if ((await l.acquire(volume)).held) return performance.now();
    } catch {}
    if (performance.now() - t0 > ms) assert.fail(`${l.node} did not get ${volume} within ${ms} ms`);
    await sleep(100);
  }
}

test('one holder per volume; release frees it at once; a partitioned holder is fenced before the other node takes over', async () => {
  const etcd = await startEtcd();
  const proxy = await startProxy(etcd.url);
  const lost: { node: string; volume: string; at: number; why: string }[] = [];
  const mk = (node: string, url: string) =>
    EtcdLeases.connect({
      endpoints: [url],
      node,
      ttlSeconds: TTL,
      onLost: (volume, why) => lost.push({ node, volume, why, at: performance.now() }),
    });
  const a = await mk('node-a', proxy.url);
  const b = await mk('node-b', etcd.url);
  try {
    assert.deepEqual(await a.acquire('scratch/db/data'), { held: true });
    assert.ok(a.holds('scratch/db/data'));
    const other = await b.acquire('scratch/db/data');
    assert.equal(other.held, false);
    assert.equal(!other.held && other.holder?.node, 'node-a');
    assert.equal((await b.holder('scratch/db/data'))?.node, 'node-a');
    // Renewals keep it past its TTL.
    await sleep(TTL * 1000 * 1.5);
    assert.ok(a.holds('scratch/db/data'));
    assert.equal((await b.acquire('scratch/db/data')).held, false);
    // Released: free at once.
    await a.release('scratch/db/data');
    assert.deepEqual(await b.acquire('scratch/db/data'), { held: true });
    await b.release('scratch/db/data');

    // Partition: node A's traffic to etcd is dropped; node B keeps trying.
    assert.deepEqual(await a.acquire('scratch/db/data'), { held: true });
    const cutAt = performance.now();
    proxy.blackhole();
    const takenAt = await acquireWithin(b, 'scratch/db/data', 30_000);
    const fence = lost.find((x) => x.node === 'node-a');
    assert.ok(fence, 'node A was told to stop I/O');
    // The safety property, without wall-clock bounds (a loaded machine stretches them): A stops before B writes.
    assert.ok(fence.at < takenAt, `A stopped at ${fence.at - cutAt} ms, B took over at ${takenAt - cutAt} ms`);
    assert.ok(!a.holds('scratch/db/data'));
    assert.match(fence.why, /no lease renewal/);
    proxy.heal();

    // etcd itself stopped: the holder is fenced too; after it comes back the lease can be had again.
    lost.length = 0;
    assert.deepEqual(await b.acquire('scratch/other'), { held: true });
    etcd.pause();
    await pollUntil(() => lost.some((x) => x.volume === 'scratch/other'), {
      deadlineMs: 10_000,
      intervalMs: 100,
      what: 'the holder to be fenced while etcd is stopped',
    }).finally(() => etcd.resume());
    const f = lost.find((x) => x.volume === 'scratch/other');
    assert.ok(f, 'fenced while etcd was stopped');
    await acquireWithin(a, 'scratch/other', 30_000);
  } finally {
    await a.close();
    await b.close();
  }
});
