/**
 * Per mapped device I/O accounting, what the kernel keeps for a dm device in /sys/block/dm-N/stat
 * (Documentation/block/stat.rst: requests and sectors per direction, in flight) plus a latency
 * histogram per operation and errors by code. Plain numbers updated with an increment or two per
 * request; `cryptmap daemon --metrics` reads them at scrape time (daemon/metrics.ts).
 */
import { Histogram, LATENCY_BUCKETS } from '../util/metrics.js';

/** The request kinds a mapped device accounts separately. */
export type IoOp = 'read' | 'write' | 'flush' | 'discard' | 'write_zeroes';

/** Every `IoOp`, in the order the metrics list them. */
export const IO_OPS: readonly IoOp[] = Object.freeze(['read', 'write', 'flush', 'discard', 'write_zeroes']);

/** Counters and latency of one request kind. */
export interface IoOpStats {
  /** Requests completed (successfully or not). */
  requests: number;
  /** Bytes of the completed requests (0 for flush). */
  bytes: number;
  /** Requests that failed. */
  errors: number;
  /** Completion latency in seconds, from the call into the mapped device to its settlement. */
  readonly latency: Histogram;
}

/** One mapped device's I/O accounting (`MappedDevice.ioStats` once `DeviceRegistry.enableIoStats()` ran). */
export class DeviceIoStats {
  readonly ops: Readonly<Record<IoOp, IoOpStats>>;
  /** Failed requests by error code (CryptmapError code, or the errno name of a system error). */
  readonly errorsByCode = new Map<string, number>();
  /** Requests started and not settled yet. */
  inflight = 0;

  constructor() {
    const mk = (): IoOpStats => ({ requests: 0, bytes: 0, errors: 0, latency: new Histogram(LATENCY_BUCKETS) });
    this.ops = { read: mk(), write: mk(), flush: mk(), discard: mk(), write_zeroes: mk() };
  }

  /** Account `p`, a request of `bytes` started now, when it settles (the caller returns `p` itself). */
  track(op: IoOp, bytes: number, p: Promise<unknown>): void {
    const s = this.ops[op];
    const t0 = performance.now();
    this.inflight++;
    p.then(
      () => {
        this.inflight--;
        s.requests++;
        s.bytes += bytes;
        s.latency.observe((performance.now() - t0) / 1000);
      },
      (e: unknown) => {
        this.inflight--;
        s.requests++;
        s.errors++;
        s.latency.observe((performance.now() - t0) / 1000);
        const code =
          typeof (e as { code?: unknown })?.code === 'string' ? (e as { code: string }).code.slice(0, 32) : 'EIO';
        // Codes are a small fixed set in practice; cap the map anyway (a label per distinct code).
        if (this.errorsByCode.has(code) || this.errorsByCode.size < 64)
          this.errorsByCode.set(code, (this.errorsByCode.get(code) ?? 0) + 1);
      },
    );
  }
}
