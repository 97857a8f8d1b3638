/**
 * The daemon's Prometheus families (issue 18 item 2), built at scrape time from what the parts keep
 * as plain numbers: each mapped device's I/O stats (dm/io-stats.ts), the NBD server's connections per
 * export, the FUSE export's request counts (its direct route bypasses the mapped device), and the
 * native crypt pool's threads and queue. `cryptmap daemon --metrics` and `cryptmap agent --metrics`
 * serve them (util/metrics-http.ts); docs/operations.md lists them.
 */
import { IO_OPS, type MappedDevice } from '../dm/index.js';
import { cryptPoolStats } from '../engine/index.js';
import type { ApplyReport } from '../reconciler/apply.js';
import type { AgentState, VolumePhase } from '../reconciler/state.js';
import { DURATION_BUCKETS, type MetricFamily, type MetricsRegistry, type Sample } from '../util/metrics.js';
import type { DaemonCore } from './core.js';

function family(name: string, help: string, type: MetricFamily['type'], samples: Sample[]): MetricFamily {
  return { name, help, type, samples };
}

/** The families for `core`'s mapped devices, exports and the crypt pool. */
export function daemonFamilies(core: DaemonCore): MetricFamily[] {
  const devs: MappedDevice[] = core.registry.list();
  const requests: Sample[] = [];
  const bytes: Sample[] = [];
  const errors: Sample[] = [];
  const latency: Sample[] = [];
  const errorsByCode: Sample[] = [];
  const inflight: Sample[] = [];
  const size: Sample[] = [];
  const suspended: Sample[] = [];
  const nbdConns: Sample[] = [];
  const fuse: Sample[] = [];
  for (const d of devs) {
    const device = d.name;
    // Registering the families turned the accounting on; a device without it has no samples yet.
    const s = d.ioStats;
    if (s !== null) {
      for (const op of IO_OPS) {
        const o = s.ops[op];
        requests.push({ labels: { device, op }, value: o.requests });
        if (op !== 'flush') bytes.push({ labels: { device, op }, value: o.bytes });
        errors.push({ labels: { device, op }, value: o.errors });
        latency.push({ labels: { device, op }, value: o.latency });
      }
      for (const [code, n] of s.errorsByCode) errorsByCode.push({ labels: { device, code }, value: n });
      inflight.push({ labels: { device }, value: s.inflight });
    }
    size.push({ labels: { device }, value: d.sizeBytes });
    suspended.push({ labels: { device }, value: d.suspended ? 1 : 0 });
    nbdConns.push({ labels: { export: device }, value: core.nbd.connectionCount(device) });
    const f = core.fuseStats(device);
    if (f) {
      fuse.push({ labels: { device, route: 'direct' }, value: f.direct });
      fuse.push({ labels: { device, route: 'js' }, value: f.js });
    }
  }
  const out: MetricFamily[] = [
    family(
      'cryptmap_device_requests_total',
      'Requests completed by a mapped device, by operation (failed ones included).',
      'counter',
      requests,
    ),
    family(
      'cryptmap_device_bytes_total',
      'Bytes read, written, discarded or zeroed through a mapped device.',
      'counter',
      bytes,
    ),
    family(
      'cryptmap_device_request_errors_total',
      'Requests of a mapped device that failed, by operation.',
      'counter',
      errors,
    ),
    family(
      'cryptmap_device_errors_total',
      'Failed requests of a mapped device by error code.',
      'counter',
      errorsByCode,
    ),
    family(
      'cryptmap_device_request_duration_seconds',
      'Time from a request entering a mapped device to its completion.',
      'histogram',
      latency,
    ),
    family('cryptmap_device_inflight_requests', 'Requests in a mapped device not completed yet.', 'gauge', inflight),
    family('cryptmap_device_size_bytes', 'Size of a mapped device (its live table).', 'gauge', size),
    family('cryptmap_device_suspended', '1 while a mapped device is suspended.', 'gauge', suspended),
    family('cryptmap_nbd_export_connections', 'NBD clients in the transmission phase on an export.', 'gauge', nbdConns),
    family('cryptmap_nbd_connections', 'NBD connections of the server (all exports, handshakes included).', 'gauge', [
      { value: core.nbd.connectionCount() },
    ]),
    family(
      'cryptmap_fuse_requests_total',
      'FUSE export requests by route: direct (the addon reads and decrypts itself, not counted by the device) or js (through the mapped device).',
      'counter',
      fuse,
    ),
  ];
  const pool = cryptPoolStats();
  if (pool) {
    out.push(
      family(
        'cryptmap_crypt_pool_threads',
        'Threads of the native crypt pool that take requests (--crypt-threads).',
        'gauge',
        [{ value: pool.threads }],
      ),
      family('cryptmap_crypt_pool_busy_threads', 'Crypt pool threads running a job now.', 'gauge', [
        { value: pool.busy },
      ]),
      family('cryptmap_crypt_pool_queue_depth', 'Crypt jobs waiting for a thread.', 'gauge', [{ value: pool.queued }]),
      family('cryptmap_crypt_pool_queued_bytes', 'Bytes of the crypt jobs waiting for a thread.', 'gauge', [
        { value: pool.queuedBytes },
      ]),
    );
  }
  return out;
}

/**
 * Register the daemon's families on `registry` and turn on the mapped devices' I/O accounting (off
 * without metrics: it costs a clock read and a promise reaction per request).
 * @example const reg = new MetricsRegistry(); registerDaemonMetrics(reg, core);
 */
export function registerDaemonMetrics(registry: MetricsRegistry, core: DaemonCore): void {
  core.registry.enableIoStats();
  registry.collect(() => daemonFamilies(core));
}

const PHASES: readonly VolumePhase[] = ['creating', 'formatted', 'ready', 'refused', 'retired', 'stopped'];

/**
 * The agent's own families: volumes by phase (from its state file after each reconcile), and each
 * reconcile's duration and result (converged, pending: something waits or failed, error: it threw).
 */
export class AgentMetrics {
  readonly #volumes;
  readonly #reconciles;
  readonly #duration;
  readonly #last;
  readonly #lastOk;
  readonly #lastAt;

  constructor(registry: MetricsRegistry) {
    this.#volumes = registry.gauge(
      'cryptmap_agent_volumes',
      'Volumes of the agent by phase (its state file after the last reconcile).',
    );
    this.#reconciles = registry.counter(
      'cryptmap_agent_reconciles_total',
      'Reconciles run, by result: converged, pending (a volume waits, was refused or failed) or error.',
    );
    this.#duration = registry.histogram(
      'cryptmap_agent_reconcile_duration_seconds',
      'Duration of the reconciles.',
      DURATION_BUCKETS,
    );
    this.#last = registry.gauge('cryptmap_agent_last_reconcile_duration_seconds', 'Duration of the last reconcile.');
    this.#lastOk = registry.gauge(
      'cryptmap_agent_last_reconcile_success',
      '1 when the last reconcile converged, else 0.',
    );
    this.#lastAt = registry.gauge(
      'cryptmap_agent_last_reconcile_timestamp_seconds',
      'When the last reconcile ended (unix time).',
    );
    for (const phase of PHASES) this.#volumes.set({ phase }, 0);
    for (const result of ['converged', 'pending', 'error']) this.#reconciles.inc({ result }, 0);
  }

  /** Record one reconcile (`report` undefined when it threw) and the phases in `state`. */
  reconciled(seconds: number, report: ApplyReport | undefined, state: AgentState | undefined): void {
    const result = report === undefined ? 'error' : report.converged ? 'converged' : 'pending';
    this.#reconciles.inc({ result });
    this.#duration.observe({}, seconds);
    this.#last.set({}, seconds);
    this.#lastOk.set({}, result === 'converged' ? 1 : 0);
    this.#lastAt.set({}, Date.now() / 1000);
    if (state) {
      const n = new Map<string, number>(PHASES.map((p) => [p, 0]));
      for (const v of Object.values(state.volumes)) n.set(v.phase, (n.get(v.phase) ?? 0) + 1);
      for (const [phase, count] of n) this.#volumes.set({ phase }, count);
    }
  }
}
