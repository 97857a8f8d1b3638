/**
 * The key service's audit log: one JSON object per line, appended, file mode 0600.
 * Fields: time (ISO 8601), transport (unix|https|inproc), identity, op, purpose, service, volume,
 * length, result (granted|denied|error), reason. It never holds key material: records are built
 * from a fixed list of fields, none of which carries a key.
 */
import { promises as fs } from 'node:fs';
import { fromSystemError } from '../util/errors.js';

export interface AuditRecord {
  transport: 'unix' | 'https' | 'inproc';
  identity: string;
  op: string;
  purpose?: string;
  service?: string;
  volume?: string;
  length?: number;
  result: 'granted' | 'denied' | 'error';
  reason?: string;
}

export interface AuditSink {
  record(r: AuditRecord): void;
  close(): Promise<void>;
}

const FIELDS = ['transport', 'identity', 'op', 'purpose', 'service', 'volume', 'length', 'result', 'reason'] as const;

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
  let fh: fs.FileHandle;
  try {
    fh = await fs.open(path, 'a', 0o600);
    await fh.chmod(0o600);
  } catch (e) {
    throw fromSystemError('EAUDIT', `cannot open audit log ${path}`, e);
  }
  let chain: Promise<unknown> = Promise.resolve();
  return {
    record(r) {
      const line = auditLine(r);
      chain = chain.then(() => fh.appendFile(line)).catch(() => {});
    },
    async close() {
      await chain;
      await fh.close();
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
