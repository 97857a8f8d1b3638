/**
 * `cryptmap agent`: the per-service volume reconciler (issue 6, docs/manifest.md), hosting the
 * data path in process (daemon/agent-host.ts).
 *
 *   cryptmap agent [--manifest FILE] --state-dir DIR [--boot-id ID] [--once] [--nbd-only]
const USAGE = `usage: cryptmap agent [--manifest FILE] --state-dir DIR [--boot-id ID] [--once] [--nbd-only] [--force-swap] [--mount-root DIR] [--node NAME] ${METRICS_USAGE}
 *   cryptmap agent status [--json] --state-dir DIR
 *
 * Without --manifest the built-in default manifest (examples/manifest.yaml) is used: what `npm start`
 * runs. Runs until SIGINT/SIGTERM, then tears down (unmount, detach, close; persistent files kept).
 * --once: reconcile, print, tear down and exit (0 when every volume came up). SIGHUP reloads --manifest
 * and reconciles again (a service removed from it is torn down; its persistent files are kept).
 */
import { parseArgs } from 'node:util';
import { existsSync } from 'node:fs';
import { resolve } from 'node:path';
import { AgentHost } from '../../daemon/agent-host.js';
import { runningAgentPid } from '../../reconciler/agent-dir.js';
import { readBootId } from '../../reconciler/agent.js';
import { embeddedRawRootPath, rawRootWarning } from '../../reconciler/keys.js';
import type { ApplyReport } from '../../reconciler/apply.js';
import { DEFAULT_MANIFEST_FILE, DEFAULT_MANIFEST_YAML } from '../../reconciler/default-manifest.js';
import { loadManifest, type Manifest, parseManifest } from '../../reconciler/manifest.js';
import { StateStore } from '../../reconciler/state.js';
import { formatStatus, statusRows } from '../../reconciler/status.js';
import { CryptmapError, EXIT_WRONG_PARAMS } from '../../util/errors.js';
import type { CliIO, VerbMain } from '../types.js';
import { disableCoreDumps } from '../../util/dumpable.js';
import { sdNotifier } from '../../util/sd-notify.js';
import { AgentMetrics, registerDaemonMetrics } from '../../daemon/metrics.js';
import {
  checkMetricsOptions,
  METRICS_OPTIONS,
  METRICS_USAGE,
  metricsRegistry,
  serveMetricsOption,
} from '../metrics-option.js';
import type { MetricsServer } from '../../util/metrics-http.js';

const USAGE = `usage: cryptmap agent [--manifest FILE] --state-dir DIR [--boot-id ID] [--once] [--nbd-only] [--force-swap] [--mount-root DIR] [--node NAME] ${METRICS_USAGE}
       cryptmap agent status [--json] --state-dir DIR
`;

function usageError(msg: string): CryptmapError {
  return new CryptmapError('EARGS', `${msg}\n${USAGE.trimEnd()}`, { exitCode: EXIT_WRONG_PARAMS });
}

function parse(argv: string[]) {
  try {
    return parseArgs({
      args: argv,
      options: {
        manifest: { type: 'string' },
        'state-dir': { type: 'string' },
        'boot-id': { type: 'string' },
        once: { type: 'boolean' },
        'nbd-only': { type: 'boolean' },
        'force-swap': { type: 'boolean' },
        'mount-root': { type: 'string' },
        node: { type: 'string' },
        json: { type: 'boolean' },
        ...METRICS_OPTIONS,
        help: { type: 'boolean', short: 'h' },
      },
      strict: true,
      allowPositionals: true,
    });
  } catch (e) {
    throw usageError((e as Error).message);
  }
}

/** One block per volume: what it is and how to reach it. */
export function formatReport(host: AgentHost, r: ApplyReport): string {
  const lines: string[] = [];
  for (const t of host.targets) {
    const v = r.volumes.find((x) => x.id === t.id);
    const d = host.ports.describe(t);
    const state = v?.code === 'ESWAPUNSAFE' ? 'served (swapon refused)' : (v?.state ?? 'unknown');
    lines.push(`${t.id} (${t.class}${t.kind === 'swap' ? ' swap' : ''}, ${t.filesystem}): ${state}`);
    lines.push(`    nbd:    ${d.nbdUri}`);
    if (d.device) lines.push(`    device: ${d.device}`);
    if (d.mountpoint) lines.push(`    mount:  ${d.mountpoint}`);
    if (v?.reason) lines.push(`    note:   ${v.reason}`);
    else if (host.modeReason) lines.push(`    note:   ${host.modeReason}`);
  }
  for (const v of r.volumes)
    if (!host.targets.some((t) => t.id === v.id)) lines.push(`${v.id}: ${v.state}${v.reason ? ` (${v.reason})` : ''}`);
  return lines.join('\n') + '\n';
}

async function status(v: ReturnType<typeof parse>['values'], io: CliIO): Promise<number> {
  const dir = v['state-dir'];
  if (!dir) throw usageError('--state-dir is required');
  const rows = statusRows(await new StateStore(dir).load());
  const pid = runningAgentPid(dir);
  // The embedded default's raw root secret beside the volumes: repeated here, not only at start.
  const rawRoot = embeddedRawRootPath(resolve(dir));
  const warning = existsSync(rawRoot) ? rawRootWarning(rawRoot, resolve(dir)) : undefined;
  if (v.json)
    io.stdout.write(
      JSON.stringify(
        { running: pid !== undefined, pid: pid ?? null, volumes: rows, ...(warning ? { warning } : {}) },
        null,
        2,
      ) + '\n',
    );
  else
    io.stdout.write(
      (pid !== undefined ? `agent running (pid ${pid})\n` : 'agent not running\n') +
        formatStatus(rows) +
        (warning ? `\n${warning}\n` : ''),
    );
  return 0;
}

const agent: VerbMain = async (argv, io) => {
  const { values: v, positionals } = parse(argv.slice(1));
  if (v.help) {
    io.stdout.write(USAGE);
    return 0;
  }
  if (positionals[0] === 'status' && positionals.length === 1) return status(v, io);
  if (positionals.length > 0) throw usageError(`unexpected argument '${positionals[0]}'`);
  const stateDir = v['state-dir'];
  if (!stateDir) throw usageError('--state-dir is required');
  const manifest: Manifest = v.manifest
    ? await loadManifest(v.manifest)
    : parseManifest(DEFAULT_MANIFEST_YAML, DEFAULT_MANIFEST_FILE);
  checkMetricsOptions(v);
  const bootId = await readBootId(v['boot-id']);
  disableCoreDumps('agent');
  const sd = sdNotifier(io.env, 'agent');
  sd.status('starting: opening the key service and the data path');
  const host = await AgentHost.start({
    manifest,
    stateDir,
    bootId,
    serve: v['nbd-only'] ? 'nbd-only' : 'auto',
    forceSwap: v['force-swap'] ?? false,
    ...(v['mount-root'] ? { mountRoot: v['mount-root'] } : {}),
    ...(v.node ? { node: v.node } : {}),
    onStep: stepProgress(io),
  });
  const registry = metricsRegistry(v, 'agent');
  const agentMetrics = registry ? new AgentMetrics(registry) : undefined;
  if (registry) registerDaemonMetrics(registry, host.core);
  let metrics: MetricsServer | undefined;
  try {
    metrics = await serveMetricsOption(v, registry);
  } catch (e) {
    await host.stop();
    throw e;
  }
  if (metrics) io.stdout.write(`cryptmap agent: metrics on ${metrics.url}\n`);
  /** host.reconcile, timed and recorded in the metrics. */
  const reconcile = async (signal: AbortSignal): Promise<ApplyReport> => {
    const t0 = performance.now();
    let report: ApplyReport | undefined;
    try {
      report = await host.reconcile(signal);
      return report;
    } finally {
      if (agentMetrics)
        agentMetrics.reconciled(
          (performance.now() - t0) / 1000,
          report,
          await new StateStore(host.stateDir).load().catch(() => undefined),
        );
    }
  };
  const ac = new AbortController();
  let signalled: (() => void) | undefined;
  const stopped = new Promise<void>((res) => {
    signalled = res;
  });
  const onSignal = () => {
    ac.abort();
    signalled?.();
  };
  // SIGHUP: read the manifest again and reconcile (a removed service is torn down, a new one made).
  let busy: Promise<void> = Promise.resolve();
  const manifestPath = v.manifest;
  const onHup = () => {
    busy = busy.then(async () => {
      if (ac.signal.aborted) return;
      if (manifestPath === undefined) {
        io.stdout.write('cryptmap agent: SIGHUP ignored (built-in manifest)\n');
        return;
      }
      try {
        sd.reloading(`reloading ${manifestPath}`);
        host.setManifest(await loadManifest(manifestPath));
        io.stdout.write(`cryptmap agent: manifest ${manifestPath} reloaded\n`);
        const r = await reconcile(ac.signal);
        io.stdout.write(formatReport(host, r));
        sd.ready(readinessLine(r));
      } catch (e) {
        io.stderr.write(
          `cryptmap agent: reload failed, keeping the previous manifest:\n${e instanceof Error ? e.message : String(e)}\n`,
        );
        sd.ready(`reload failed, previous manifest kept: ${e instanceof Error ? e.message : String(e)}`);
      }
    });
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  process.on('SIGHUP', onHup);
  let ok = false;
  try {
    io.stdout.write(
      `cryptmap agent: manifest ${manifest.file}, state ${host.stateDir}, keys ${host.keyServiceDescription}\n`,
    );
    if (host.keyServiceWarning) io.stderr.write(`\n*** ${host.keyServiceWarning} ***\n\n`);
    const report = await reconcile(ac.signal);
    ok = report.volumes.every((x) => x.state === 'ready' || x.code === 'ESWAPUNSAFE');
    io.stdout.write(formatReport(host, report));
    // READY=1 once the first reconcile is done (volumes up, or reported as failed in STATUS=).
    sd.ready(readinessLine(report));
    if (!v.once && !ac.signal.aborted) {
      io.stdout.write(
        `Serving on ${host.core.nbdSocketPath} (status: cryptmap agent status --state-dir ${stateDir}). Press Ctrl-C to stop.\n`,
      );
      await stopped;
    }
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    process.off('SIGHUP', onHup);
    await busy;
    sd.stopping('stopping: tearing down the volumes');
    io.stdout.write('cryptmap agent: tearing down (persistent volumes are kept)\n');
    await metrics?.close();
    const down = await host.stop();
    for (const x of down?.volumes ?? []) io.stdout.write(`${x.id}: ${x.state}${x.reason ? ` (${x.reason})` : ''}\n`);
  }
  sd.close();
  return v.once && !ok ? 1 : 0;
};

/** What the slow steps are called in the progress lines (the others pass unannounced). */
const SLOW_STEPS: Readonly<Record<string, string>> = {
  createFile: 'creating the volume file',
  format: 'formatting LUKS2',
  mkfs: 'making the file system',
};

/**
 * Progress of the slow reconcile steps (issue 18 item 4): on a terminal `<volume>: <step>...` then
 * ` done (1.2 s)` on the same line; elsewhere a line when the step starts and one when it ends.
 */
function stepProgress(io: CliIO): NonNullable<Parameters<typeof AgentHost.start>[0]['onStep']> {
  const tty = (io.stdout as { isTTY?: boolean }).isTTY === true;
  return (step, event, ms, error) => {
    const what = SLOW_STEPS[step.kind];
    if (what === undefined) return;
    const end = `${error === undefined ? 'done' : 'failed'} (${(ms / 1000).toFixed(1)} s)`;
    if (event === 'start') io.stdout.write(tty ? `${step.id}: ${what}...` : `${step.id}: ${what}...\n`);
    else io.stdout.write(tty ? ` ${end}\n` : `${step.id}: ${what} ${end}\n`);
  };
}

/** STATUS= after a reconcile: how many volumes are ready of how many, and the first failure. */
function readinessLine(r: ApplyReport): string {
  const ready = r.volumes.filter((x) => x.state === 'ready').length;
  const bad = r.volumes.find((x) => x.state !== 'ready' && x.code !== 'ESWAPUNSAFE');
  return `${ready} of ${r.volumes.length} volumes ready${bad ? `; ${bad.id}: ${bad.state}${bad.reason ? ` (${bad.reason})` : ''}` : ''}`;
}

export default agent;
