/**
 * Metrics in the Prometheus text exposition format, version 0.0.4 (prometheus.io "Exposition
 * formats"): `# HELP` and `# TYPE` per family, one `name{label="value"} number` line per sample,
 * histograms as cumulative `_bucket{le=...}` lines plus `_sum` and `_count`. No dependency: the
 * format is small, and most values are pulled at scrape time from counters the components keep as
 * plain numbers (a mapped device's I/O stats, the crypt pool's queue), so nothing on the data path
 * calls into a metrics library.
 *
 * Two ways in: `MetricsRegistry.counter/gauge/histogram` for values a component pushes (keyd
 * requests, the agent's reconciles), and `MetricsRegistry.collect(fn)` for families built at scrape
 * time. Names follow Prometheus practice: `cryptmap_` prefix, base units (seconds, bytes), counters
 * end in `_total`.
 */

export type MetricType = 'counter' | 'gauge' | 'histogram';
export type Labels = Readonly<Record<string, string>>;

/** Histogram data: `counts[i]` observations <= `bounds[i]` and > bounds[i-1] (not cumulative); the last slot is +Inf. */
export interface HistogramValue {
  readonly bounds: readonly number[];
  readonly counts: ArrayLike<number>;
  readonly sum: number;
  readonly count: number;
}

export interface Sample {
  readonly labels?: Labels;
  readonly value: number | HistogramValue;
}

export interface MetricFamily {
  readonly name: string;
  readonly help: string;
  readonly type: MetricType;
  readonly samples: readonly Sample[];
}

/** Latency buckets in seconds (100 us .. 10 s), for I/O requests. */
export const LATENCY_BUCKETS: readonly number[] = Object.freeze([
  0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
]);

/** Duration buckets in seconds (10 ms .. 10 min), for reconciles. */
export const DURATION_BUCKETS: readonly number[] = Object.freeze([
  0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600,
]);

const NAME_RE = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL_RE = /^[a-zA-Z_][a-zA-Z0-9_]*$/;

function escapeHelp(s: string): string {
  return s.replace(/\\/g, '\\\\').replace(/\n/g, '\\n');
}

function escapeLabel(s: string): string {
  return s.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n');
}

function num(v: number): string {
  if (Number.isNaN(v)) return 'NaN';
  if (v === Number.POSITIVE_INFINITY) return '+Inf';
  if (v === Number.NEGATIVE_INFINITY) return '-Inf';
  return String(v);
}

function labelText(labels: Labels | undefined, extra?: [string, string]): string {
  const parts: string[] = [];
  if (labels) for (const [k, v] of Object.entries(labels)) parts.push(`${k}="${escapeLabel(v)}"`);
  if (extra) parts.push(`${extra[0]}="${escapeLabel(extra[1])}"`);
  return parts.length ? `{${parts.join(',')}}` : '';
}

/** Render families in the text format (0.0.4). Families with the same name must not repeat. */
export function renderMetrics(families: readonly MetricFamily[]): string {
  const out: string[] = [];
  for (const f of families) {
    if (!NAME_RE.test(f.name)) throw new Error(`bad metric name '${f.name}'`);
    out.push(`# HELP ${f.name} ${escapeHelp(f.help)}`, `# TYPE ${f.name} ${f.type}`);
    for (const s of f.samples) {
      if (s.labels)
        for (const k of Object.keys(s.labels))
          if (!LABEL_RE.test(k) || k.startsWith('__')) throw new Error(`bad label name '${k}' on ${f.name}`);
      if (typeof s.value === 'number') {
        out.push(`${f.name}${labelText(s.labels)} ${num(s.value)}`);
        continue;
      }
      const h = s.value;
      let acc = 0;
      for (let i = 0; i < h.bounds.length; i++) {
        acc += h.counts[i] ?? 0;
        out.push(`${f.name}_bucket${labelText(s.labels, ['le', num(h.bounds[i]!)])} ${acc}`);
      }
      out.push(`${f.name}_bucket${labelText(s.labels, ['le', '+Inf'])} ${h.count}`);
      out.push(`${f.name}_sum${labelText(s.labels)} ${num(h.sum)}`);
      out.push(`${f.name}_count${labelText(s.labels)} ${h.count}`);
    }
  }
  return out.join('\n') + '\n';
}

/** A histogram kept as plain numbers: `observe` is a short loop over the bounds, no allocation. */
export class Histogram implements HistogramValue {
  readonly bounds: readonly number[];
  readonly counts: Float64Array;
  sum = 0;
  count = 0;
  constructor(bounds: readonly number[] = LATENCY_BUCKETS) {
    this.bounds = bounds;
    this.counts = new Float64Array(bounds.length + 1);
  }
  /** Count one observation of `v` in its bucket, the sum and the count. */
  observe(v: number): void {
    let i = 0;
    const b = this.bounds;
    while (i < b.length && v > b[i]!) i++;
    this.counts[i]!++;
    this.sum += v;
    this.count++;
  }
}

function key(labels: Labels): string {
  return JSON.stringify(Object.entries(labels).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
}

/** A labelled counter or gauge family. */
export class LabelledValue {
  readonly #values = new Map<string, { labels: Labels; value: number }>();
  constructor(
    readonly name: string,
    readonly help: string,
    readonly type: 'counter' | 'gauge',
  ) {}
  #slot(labels: Labels) {
    const k = key(labels);
    let s = this.#values.get(k);
    if (!s) {
      s = { labels: { ...labels }, value: 0 };
      this.#values.set(k, s);
    }
    return s;
  }
  inc(labels: Labels = {}, by = 1): void {
    this.#slot(labels).value += by;
  }
  set(labels: Labels, value: number): void {
    this.#slot(labels).value = value;
  }
  /** Forget every labelled value (a gauge rebuilt from scratch, e.g. volumes by phase). */
  clear(): void {
    this.#values.clear();
  }
  family(): MetricFamily {
    return {
      name: this.name,
      help: this.help,
      type: this.type,
      samples: [...this.#values.values()].map((s) => ({ labels: s.labels, value: s.value })),
    };
  }
}

/** A labelled histogram family. */
export class LabelledHistogram {
  readonly #values = new Map<string, { labels: Labels; h: Histogram }>();
  constructor(
    readonly name: string,
    readonly help: string,
    readonly bounds: readonly number[] = LATENCY_BUCKETS,
  ) {}
  observe(labels: Labels, v: number): void {
    const k = key(labels);
    let s = this.#values.get(k);
    if (!s) {
      s = { labels: { ...labels }, h: new Histogram(this.bounds) };
      this.#values.set(k, s);
    }
    s.h.observe(v);
  }
  family(): MetricFamily {
    return {
      name: this.name,
      help: this.help,
      type: 'histogram',
      samples: [...this.#values.values()].map((s) => ({ labels: s.labels, value: s.h })),
    };
  }
}

/** The families one process exposes: pushed ones plus collectors run at each scrape. */
export class MetricsRegistry {
  readonly #owned: (LabelledValue | LabelledHistogram)[] = [];
  readonly #collectors: (() => MetricFamily[])[] = [];

  counter(name: string, help: string): LabelledValue {
    const c = new LabelledValue(name, help, 'counter');
    this.#owned.push(c);
    return c;
  }
  gauge(name: string, help: string): LabelledValue {
    const g = new LabelledValue(name, help, 'gauge');
    this.#owned.push(g);
    return g;
  }
  histogram(name: string, help: string, bounds?: readonly number[]): LabelledHistogram {
    const h = new LabelledHistogram(name, help, bounds);
    this.#owned.push(h);
    return h;
  }
  /** Add families computed at scrape time. */
  collect(fn: () => MetricFamily[]): void {
    this.#collectors.push(fn);
  }
  families(): MetricFamily[] {
    return [...this.#owned.map((o) => o.family()), ...this.#collectors.flatMap((c) => c())];
  }
  render(): string {
    return renderMetrics(this.families());
  }
}

/** process_* families as Prometheus clients name them: CPU, memory, start time, open descriptors. */
export function processFamilies(startTimeSeconds: number): MetricFamily[] {
  const cpu = process.cpuUsage();
  const mem = process.memoryUsage();
  return [
    {
      name: 'process_cpu_seconds_total',
      help: 'Total user and system CPU time spent in seconds.',
      type: 'counter',
      samples: [{ value: (cpu.user + cpu.system) / 1e6 }],
    },
    {
      name: 'process_resident_memory_bytes',
      help: 'Resident memory size in bytes.',
      type: 'gauge',
      samples: [{ value: mem.rss }],
    },
    {
      name: 'process_start_time_seconds',
      help: 'Start time of the process since unix epoch in seconds.',
      type: 'gauge',
      samples: [{ value: startTimeSeconds }],
    },
    {
      name: 'nodejs_heap_size_used_bytes',
      help: 'Process heap size used from Node.js in bytes.',
      type: 'gauge',
      samples: [{ value: mem.heapUsed }],
    },
  ];
}

const START_SECONDS = Date.now() / 1000;

/**
 * Add the process_* families and `cryptmap_build_info{version,component}` (always 1) to `registry`.
 * @example registerProcessMetrics(registry, 'keyd', cryptmapVersion());
 */
export function registerProcessMetrics(registry: MetricsRegistry, component: string, version: string): void {
  registry.collect(() => [
    ...processFamilies(START_SECONDS),
    {
      name: 'cryptmap_build_info',
      help: 'Always 1; the labels say which cryptmap and which process.',
      type: 'gauge',
      samples: [{ labels: { version, component }, value: 1 }],
    },
  ]);
}
