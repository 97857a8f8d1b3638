/**
 * `--metrics HOST:PORT` and `--metrics-token-file F`, shared by `cryptmap daemon`, `agent` and `keyd`
 * (util/metrics-http.ts has the trust rules).
 */
import { CryptmapError } from '../util/errors.js';
import { type MetricsServer, parseMetricsListen, readMetricsToken, serveMetrics } from '../util/metrics-http.js';
import { MetricsRegistry, registerProcessMetrics } from '../util/metrics.js';
import { cryptmapVersion } from '../util/version.js';

/** parseArgs option rows. */
export const METRICS_OPTIONS = {
  metrics: { type: 'string' },
  'metrics-token-file': { type: 'string' },
} as const;

export const METRICS_USAGE = '[--metrics [HOST:]PORT [--metrics-token-file F]]';

export interface MetricsValues {
  metrics?: string | undefined;
  'metrics-token-file'?: string | undefined;
}

/** Check the flags before anything starts (a bad --metrics fails at once, not after the volumes are up). */
export function checkMetricsOptions(v: MetricsValues): void {
  if (v['metrics-token-file'] !== undefined && v.metrics === undefined)
    throw new CryptmapError('EARGS', '--metrics-token-file only goes with --metrics [HOST:]PORT');
  if (v.metrics !== undefined) parseMetricsListen(v.metrics);
}

/**
 * A registry with the process families, or undefined when --metrics is not given; `serve` starts
 * the endpoint once the caller has registered its own families.
 */
export function metricsRegistry(v: MetricsValues, component: string): MetricsRegistry | undefined {
  if (v.metrics === undefined) return undefined;
  const r = new MetricsRegistry();
  registerProcessMetrics(r, component, cryptmapVersion());
  return r;
}

/** Serve `registry` as --metrics asks (undefined when it was not given). */
export async function serveMetricsOption(
  v: MetricsValues,
  registry: MetricsRegistry | undefined,
): Promise<MetricsServer | undefined> {
  if (v.metrics === undefined || registry === undefined) return undefined;
  const token = v['metrics-token-file'] !== undefined ? readMetricsToken(v['metrics-token-file']) : undefined;
  try {
    return await serveMetrics(registry, parseMetricsListen(v.metrics), token);
  } finally {
    // The server keeps its own copy of the expected header.
    token?.fill(0);
  }
}
