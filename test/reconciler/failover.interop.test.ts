/**
 * Failover of a persistent volume on shared storage (issue 15 items 4-5), with real parts: a Ceph
 * RBD image (scripts/ceph-mini.sh) as the volume's `device:`, etcd for the single-writer leases, one
 * `cryptmap keyd`, and two `cryptmap agent` processes on this machine as nodes A and B (own state
 * dirs, own --node names).
 * - A serves the volume, a client writes and flushes; B waits for the lease (agent status names A).
 *   A is killed -9; B takes the lease after the TTL, opens the same image: the data is there.
 * - Partition: B's traffic to etcd is dropped (a proxy); B stops serving the volume (fenced) before
 *   A, restarted, takes the lease over.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { after, test } from 'node:test';
import { pollUntil, within } from '../helpers/wait.js';
import { NbdDevice } from '../../src/blockdev/nbd-client/device.js';
import { useCeph } from '../blockdev/ceph.js';
import { startEtcd, startProxy } from '../coordination/etcd.js';
import { makeTempDir } from '../helpers/tmp.js';

const ENTRY = fileURLToPath(new URL('../../src/cli/entry.js', import.meta.url));
const TTL = 4;
const MiB = 1 << 20;
const ceph = useCeph('cm-fo-');
const children = new Set<ChildProcess>();
after(() => {
  for (const c of children) c.kill('SIGKILL');
});

interface Proc {
  child: ChildProcess;
  out(): string;
  exited: Promise<number | null>;
}

function spawnCli(args: string[]): Proc {
  const child = spawn(process.execPath, [ENTRY, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  children.add(child);
  let out = '';
  child.stdout!.on('data', (c: Buffer) => (out += c.toString()));
  child.stderr!.on('data', (c: Buffer) => (out += c.toString()));
  const exited = new Promise<number | null>((res) => child.once('exit', (code) => res(code)));
  void exited.then(() => children.delete(child));
  return { child, out: () => out, exited };
}

/** Poll `cond` every 100 ms until true; fail after `ms` with `what` and the context. */
async function until(cond: () => boolean | Promise<boolean>, ms: number, what: () => string): Promise<number> {
  await pollUntil(cond, { deadlineMs: ms, intervalMs: 100, what: 'the condition', detail: what });
  return performance.now();
}

async function agentStatus(state: string): Promise<string> {
  const p = spawnCli(['agent', 'status', '--state-dir', state]);
  const code = await p.exited;
  assert.equal(code, 0, p.out());
  return p.out();
}

function nbdUriOf(state: string): string {
  return `nbd+unix:///${encodeURIComponent('scratch:db:data')}?socket=${join(state, 'run', 'nbd.sock')}`;
}

test('node A killed -9: node B takes the lease after the TTL and serves the fsynced data; a partitioned node stops before the other takes over', async () => {
  const t = makeTempDir('cm-fo-');
  const etcd = await startEtcd();
  const proxyB = await startProxy(etcd.url);
  const rbd = await ceph.c.exportImage('rbd/fleet', '48M');
  const keydDir = join(t.dir, 'keyd');
  const keyd = spawnCli(['keyd', '--state-dir', keydDir]);
  await until(
    () => existsSync(join(keydDir, 'keyd.sock')),
    30_000,
    () => `keyd did not start: ${keyd.out()}`,
  );
  const manifest = (etcdUrl: string) =>
    `version: 1\nkeyService: {address: "unix:${join(keydDir, 'keyd.sock')}"}\ncoordination: {etcd: ["${etcdUrl}"], ttl: ${TTL}}\n` +
    `services:\n  - name: db\n    volumes:\n      - {name: data, class: persistent, filesystem: none, device: "${rbd}"}\n`;
  const mA = join(t.dir, 'a.yaml');
  const mB = join(t.dir, 'b.yaml');
  await writeFile(mA, manifest(etcd.url));
  await writeFile(mB, manifest(proxyB.url));
  const stateA = join(t.dir, 'a');
  const stateB = join(t.dir, 'b');
  const agent = (m: string, state: string, node: string) =>
    spawnCli(['agent', '--manifest', m, '--state-dir', state, '--nbd-only', '--node', node]);
  const serving = (p: Proc) => p.out().includes('Press Ctrl-C to stop.');
  try {
    // Node A formats the blank image and serves it.
    let a = agent(mA, stateA, 'node-a');
    await until(
      () => serving(a) || a.child.exitCode !== null,
      90_000,
      () => `node A did not serve:\n${a.out()}`,
    );
    assert.match(a.out(), /scratch\/db\/data \(persistent, none\): ready/);
    assert.match(await agentStatus(stateA), /scratch\/db\/data: lease held by node-a \(this node\)/);

    // Node B waits for the lease, and says who holds it.
    const b = agent(mB, stateB, 'node-b');
    let st = '';
    await until(
      async () =>
        /waiting-for-lease/.test((st = existsSync(join(stateB, 'agent-state.json')) ? await agentStatus(stateB) : '')),
      60_000,
      () => `node B does not wait for the lease:\n${st}\n${b.out()}`,
    );
    assert.match(st, /scratch\/db\/data: lease held by node-a since /);

    // A client writes through node A and fsyncs (NBD FLUSH): acknowledged, so it must survive A.
    const data = randomBytes(2 * MiB);
    const client = await NbdDevice.open(nbdUriOf(stateA), { reconnectTimeoutMs: 1000 });
    await client.write(4 * MiB, data);
    await client.flush();
    await client.close();
    a.child.kill('SIGKILL');
    await a.exited;
    const killedAt = performance.now();

    // B takes over after A's lease runs out, and serves the same bytes.
    const tookAt = await until(
      () => serving(b) || b.child.exitCode !== null,
      90_000,
      () => `node B did not take over:\n${b.out()}`,
    );
    assert.match(b.out(), /scratch\/db\/data \(persistent, none\): ready/);
    assert.ok(
      tookAt - killedAt >= TTL * 1000 * 0.5,
      `B took over ${tookAt - killedAt} ms after A died: sooner than its lease could end`,
    );
    assert.match(await agentStatus(stateB), /scratch\/db\/data: lease held by node-b \(this node\)/);
    const onB = await NbdDevice.open(nbdUriOf(stateB), { reconnectTimeoutMs: 1000 });
    const back = Buffer.alloc(data.length);
    await onB.read(4 * MiB, back);
    assert.ok(back.equals(data), "the client's fsynced data is on node B");

    // Partition: B is cut off from etcd while serving. A (restarted) waits, B fences itself (the
    // volume closes: its clients get errors), and only then does A get the lease.
    a = agent(mA, stateA, 'node-a');
    await until(
      async () => /lease held by node-b/.test(await agentStatus(stateA)),
      60_000,
      () => `node A does not wait for B's lease:\n${a.out()}`,
    );
    proxyB.blackhole();
    const cutAt = performance.now();
    let fencedAt = 0;
    await until(
      async () => {
        try {
          await onB.read(0, Buffer.alloc(4096));
          return false;
        } catch {
          fencedAt = performance.now();
          return true;
        }
      },
      30_000,
      () => `node B kept serving after the partition:\n${b.out()}`,
    );
    const aAt = await until(
      () => serving(a) || a.child.exitCode !== null,
      90_000,
      () => `node A did not take over:\n${a.out()}`,
    );
    assert.match(b.out(), /lease lost: stopping I\/O to the volume/);
    assert.ok(fencedAt - cutAt <= TTL * 1000, `B stopped ${fencedAt - cutAt} ms after the cut (TTL ${TTL} s)`);
    assert.ok(fencedAt < aAt, `B stopped at +${fencedAt - cutAt} ms, A took over at +${aAt - cutAt} ms`);
    await onB.close().catch(() => undefined);
    const onA = await NbdDevice.open(nbdUriOf(stateA));
    await onA.read(4 * MiB, back);
    assert.ok(back.equals(data), 'the data is still there on node A');
    await onA.close();

    proxyB.heal();
    for (const p of [a, b]) {
      p.child.kill('SIGTERM');
      assert.equal(await within(p.exited, 60_000, `the agent to exit on SIGTERM: ${p.out()}`), 0, p.out());
    }
  } finally {
    for (const c of children) c.kill('SIGKILL');
    await t.cleanup();
  }
});
