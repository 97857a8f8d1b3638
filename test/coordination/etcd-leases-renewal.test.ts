/**
 * Lease renewal timing (coordination/etcd-leases.ts) against a stand-in for the etcd3 client whose
 * keepalives answer late: renewals are timed from the lease's deadline, so answers that each take
 * a fifth of the TTL do not add up into a lapse (timed from the end of the previous renewal, the
 * holder was fenced within two renewals). A keepalive that never answers does not hold back the
 * next one; etcd that stops answering altogether still fences, with the time left passed on.
 */
import assert from 'node:assert/strict';
import { performance } from 'node:perf_hooks';
import { test } from 'node:test';
import { pollUntil } from '../helpers/wait.js';
import { type EtcdClient, type EtcdLease, EtcdLeases, type TxnResult } from '../../src/coordination/etcd-leases.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A stand-in etcd: every transaction succeeds; `answer(n)` says how the n-th keepalive answers. */
function fakeEtcd(answer: (n: number) => { delayMs: number } | 'never' | 'error') {
  const sent: number[] = [];
  const client: EtcdClient = {
    lease(ttl: number): EtcdLease {
      return {
        grant: async () => '1',
        keepaliveOnce: () => {
          const n = sent.length;
          sent.push(performance.now());
          const a = answer(n);
          if (a === 'never') return new Promise(() => {});
          if (a === 'error') return Promise.reject(new Error('unavailable'));
          return sleep(a.delayMs).then(() => ({ TTL: String(ttl) }));
        },
        revoke: async () => {},
        release: () => {},
        on: () => undefined,
      };
    },
    if: () => ({
      // biome-ignore lint/suspicious/noThenProperty: etcd3's transaction builder is named so
      then: () => ({ else: () => ({ commit: async (): Promise<TxnResult> => ({ succeeded: true, responses: [] }) }) }),
    }),
    put: () => ({ value: () => ({ lease: () => ({}) }) }),
    get: () => ({ string: async () => null }),
    delete: () => ({ key: async () => ({}) }),
    close: () => {},
  };
  return { client, sent };
}

test('renewals answered late (a fifth of the TTL each) are timed from the deadline: the lease never lapses', async () => {
  const TTL = 4;
  const { client, sent } = fakeEtcd(() => ({ delayMs: 900 }));
  const lost: string[] = [];
  const l = EtcdLeases.withClient(client, {
    endpoints: ['http://fake'],
    node: 'a',
    ttlSeconds: TTL,
    callTimeoutMs: 5000,
    onLost: (_v, why) => lost.push(why),
  });
  assert.deepEqual(await l.acquire('v'), { held: true });
  await sleep(TTL * 1000 * 2.5);
  assert.deepEqual(lost, [], 'the holder was fenced although every renewal was answered');
  assert.ok(l.holds('v'));
  assert.ok(sent.length >= 6, `${sent.length} renewals in 2.5 TTL`);
  await l.close();
});

test('a renewal that never answers does not hold back the next; silence fences with the time left', async () => {
  const TTL = 2;
  let silent = false;
  const { client } = fakeEtcd((n) => (silent ? 'error' : n === 0 ? 'never' : { delayMs: 10 }));
  const lost: { why: string; msLeft: number }[] = [];
  const l = EtcdLeases.withClient(client, {
    endpoints: ['http://fake'],
    node: 'a',
    ttlSeconds: TTL,
    callTimeoutMs: 60_000,
    onLost: (_v, why, msLeft) => lost.push({ why, msLeft }),
  });
  assert.deepEqual(await l.acquire('v'), { held: true });
  await sleep(TTL * 1000 * 2);
  assert.deepEqual(lost, [], 'one hung renewal fenced the holder');
  silent = true;
  await pollUntil(() => lost.length > 0, {
    deadlineMs: 10_000,
    intervalMs: 100,
    what: 'the holder to be fenced (etcd silent for the whole TTL)',
  });
  const f = lost.at(0) as { why: string; msLeft: number } | undefined;
  assert.ok(f && lost.length === 1, 'etcd silent for the whole TTL: fenced');
  assert.match(f.why, /no lease renewal/);
  assert.ok(f.msLeft > 0 && f.msLeft <= TTL * 1000, `msLeft ${f.msLeft}`);
  assert.ok(!l.holds('v'));
  await l.close();
});
