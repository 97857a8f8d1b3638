/**
 * keyd's Prometheus families (issue 18 item 2): every audited request counted by transport, op and
 * result, and refusals by reason. Counted from the audit records (the one place every request and
 * refusal passes), before the audit's rate limiting, so a refusal flood is counted in full while the
 * log stays short. Reasons map to a fixed set of label values: a request's own text never becomes a
 * label (bounded cardinality, nothing a client sends reaches the metrics).
 */
import type { MetricsRegistry } from '../util/metrics.js';
import type { AuditRecord, AuditSink } from './audit.js';

/** The refusal reasons as label values. */
export const REFUSAL_REASONS = [
  'policy',
  'bad_request',
  'unknown_op',
  'unknown_token',
  'malformed_token',
  'request_too_long',
  'no_client_certificate',
  'tls_handshake',
  'other',
] as const;
export type RefusalReason = (typeof REFUSAL_REASONS)[number];

/** The label value for a refusal record. */
export function refusalReason(r: AuditRecord): RefusalReason {
  const why = r.reason ?? '';
  if (why === 'not allowed by policy') return 'policy';
  if (why === 'unknown op') return 'unknown_op';
  if (why === 'unknown token') return 'unknown_token';
  if (why === 'malformed token') return 'malformed_token';
  if (why === 'request too long') return 'request_too_long';
  if (why === 'no verified client certificate') return 'no_client_certificate';
  if (why.startsWith('TLS handshake failed')) return 'tls_handshake';
  if (r.result === 'error' && r.op === 'derive') return 'bad_request';
  return 'other';
}

const TRANSPORTS = new Set(['unix', 'https', 'inproc']);
const OPS = new Set(['derive', 'connect']);

/**
 * Wrap `sink` so each record also counts in `registry` (cryptmap_keyd_requests_total,
 * cryptmap_keyd_refusals_total); the records go on to `sink` unchanged.
 * @example const audit = countingAudit(rateLimitedAudit(file), registry);
 */
export function countingAudit(sink: AuditSink, registry: MetricsRegistry): AuditSink {
  const requests = registry.counter(
    'cryptmap_keyd_requests_total',
    'Key requests and refused connections keyd handled, by transport, operation and result (granted, denied, error).',
  );
  const refusals = registry.counter(
    'cryptmap_keyd_refusals_total',
    'Key requests and connections keyd refused, by reason.',
  );
  // Zero rows for every reason, so rate() works from the first refusal on.
  for (const reason of REFUSAL_REASONS) refusals.inc({ reason }, 0);
  for (const result of ['granted', 'denied', 'error']) requests.inc({ transport: 'unix', op: 'derive', result }, 0);
  return {
    record(r: AuditRecord): void {
      const n = r.count ?? 1;
      const transport = TRANSPORTS.has(r.transport) ? r.transport : 'other';
      const op = OPS.has(r.op) ? r.op : 'other';
      requests.inc({ transport, op, result: r.result }, n);
      if (r.result !== 'granted') refusals.inc({ reason: refusalReason(r) }, n);
      sink.record(r);
    },
    close: () => sink.close(),
  };
}
