/**
 * The key service's audit log: one JSON object per line, appended, file mode 0600.
 * Fields: time (ISO 8601), transport (unix|https|inproc), identity, peer (address or uid), op,
 * purpose, service, volume, length, result (granted|denied|error), reason, count. It never holds key
 * material: records are built from a fixed list of fields, none of which carries a key.
 *
 * The file is opened with O_APPEND|O_NOFOLLOW and checked with fstat (ours or root's, one link, not
 * writable by others: util/trusted-path.ts), so a planted symlink or file is refused.
 *
 * Refusals are rate-limited (`rateLimitedAudit`): a client that fails TLS handshakes in a loop must
 * not fill the disk. Per (transport, peer, identity, op, reason) the first refusal is written at
 * once; further ones within the interval are counted and written as one line with `count` at the
 * end of the interval. Granted requests are always written one per line.
 */
import { closeSync, fchmodSync, write } from 'node:fs';
import { promisify } from 'node:util';
import { fromSystemError, isCryptmapError } from '../util/errors.js';
import { openTrustedAppend } from '../util/trusted-path.js';

export interface AuditRecord {
  transport: 'unix' | 'https' | 'inproc';
  identity: string;
  /** Where the request came from when known: `ip:port`'s address, or `uid:N` on the Unix socket. */
  peer?: string;
  op: string;
  purpose?: string;
  service?: string;
  volume?: string;
  length?: number;
  result: 'granted' | 'denied' | 'error';
  reason?: string;
  /** Aggregated refusals: how many this line stands for. */
  count?: number;
}

export interface AuditSink {
  record(r: AuditRecord): void;
  close(): Promise<void>;
}

const FIELDS = [
  'transport',
  'identity',
  'peer',
  'op',
  'purpose',
  'service',
  'volume',
  'length',
  'result',
  'reason',
  'count',
] as const;

/** Render one line; only whitelisted fields, strings capped at 256 characters. */
export function auditLine(r: AuditRecord, now = new Date()): string {
  const o: Record<string, unknown> = { time: now.toISOString() };
  for (const f of FIELDS) {
    const v = r[f];
    if (v !== undefined) o[f] = typeof v === 'string' ? v.slice(0, 256) : v;
  }
  return JSON.stringify(o) + '\n';
}

/** Append-only file sink. Writes are queued in order; `close` flushes them. */
export async function openAuditFile(path: string): Promise<AuditSink> {
  let fd: number;
  try {
    fd = openTrustedAppend(path, { code: 'EAUDIT' });
    fchmodSync(fd, 0o600); // ours (checked): never readable by others
  } catch (e) {
    if (isCryptmapError(e)) throw e;
    throw fromSystemError('EAUDIT', `cannot open audit log ${path}`, e);
  }
  const append = promisify(write);
  let chain: Promise<unknown> = Promise.resolve();
  return {
    record(r) {
      const line = Buffer.from(auditLine(r));
      chain = chain.then(() => append(fd, line)).catch(() => {});
    },
    async close() {
      await chain;
      closeSync(fd);
    },
  };
}

/** In-memory sink (tests, embedded key service). */
export function memoryAudit(): AuditSink & { lines: string[] } {
  const lines: string[] = [];
  return {
    lines,
    record(r) {
      lines.push(auditLine(r));
    },
    async close() {},
  };
}

export interface RateLimitOptions {
  /** Length of one aggregation interval (default 10 s). */
  intervalMs?: number;
  /** Distinct refusal keys tracked at once; beyond it they share one key (default 1024). */
  maxKeys?: number;
}

interface Pending {
  first: AuditRecord;
  count: number;
  since: number;
}

/**
 * Wrap `sink` so refusals (result denied or error) are aggregated per peer and reason: the first
 * is written, the rest of the interval becomes one line with `count` and `reason` saying so.
 * @example const audit = rateLimitedAudit(await openAuditFile(p), { intervalMs: 10_000 });
 */
export function rateLimitedAudit(sink: AuditSink, opts: RateLimitOptions = {}): AuditSink {
  const interval = opts.intervalMs ?? 10_000;
  const maxKeys = opts.maxKeys ?? 1024;
  const pending = new Map<string, Pending>();
  const flush = (all: boolean) => {
    const now = Date.now();
    for (const [k, p] of pending) {
      if (p.count > 0) {
        const seconds = Math.max(1, Math.round((now - p.since) / 1000));
        sink.record({
          ...p.first,
          count: p.count,
          reason: `${p.first.reason ?? p.first.result} (${p.count} more in ${seconds} s, aggregated)`,
        });
        p.count = 0;
        p.since = now;
      } else if (all || now - p.since >= interval) pending.delete(k);
    }
  };
  const timer = setInterval(() => flush(false), interval);
  timer.unref();
  return {
    record(r) {
      if (r.result === 'granted') {
        sink.record(r);
        return;
      }
      let key = [r.transport, r.peer ?? '', r.identity, r.op, r.reason ?? ''].join('\u0000');
      if (!pending.has(key) && pending.size >= maxKeys) key = 'overflow';
      const p = pending.get(key);
      if (p) {
        p.count++;
        return;
      }
      pending.set(key, {
        first:
          key === 'overflow' ? { ...r, peer: '(many)', identity: '(many)', reason: 'refusals from many peers' } : r,
        count: 0,
        since: Date.now(),
      });
      sink.record(r);
    },
    async close() {
      clearInterval(timer);
      flush(true);
      await sink.close();
    },
  };
}
