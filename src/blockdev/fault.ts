/**
 * Fault-injecting block device wrapper (test and reliability tooling; the userspace analogue of
 * nbdkit's error filter and the kernel's dm-flakey / dm-dust targets).
 *
 * Wraps any BlockDevice and, by plan, makes chosen calls misbehave:
 *   - writes (write, writeZeroes, discard: "mutating calls", counted from 1) at chosen numbers or
 *     at a seeded rate: `fail` (EIO, nothing written), `short` (a prefix of whole logical blocks is
 *     written, then EIO), `tear` (a seeded subset of the logical blocks is written, then the
 *     device "crashes"), `crash` (nothing written, the device is dead from then on);
 *   - `crashAfterWrites`: every mutating call after the first N throws (power cut after N writes);
 *   - flushes at chosen numbers (or all) fail with EIO; the failure is reported, never hidden
 *     (with all flushes failing, FUA writes fail too, after their data was written);
 *   - reads or writes touching `badRanges` fail with EIO (a bad sector area);
 *   - `capacityBytes`: a thin device that can hold only that many distinct bytes (4 KiB grain):
 *     writes that would allocate beyond it fail with ENOSPC (a full disk), rewrites succeed.
 * Every injected failure is a CryptmapError (code EFAULT_*), so upper layers map it like a real one
 * (NBD: errno EIO / ENOSPC). `stats` counts calls and injected faults for reports.
 */
import { CryptmapError } from '../util/errors.js';
import type {
  BlockDevice,
  BlockDeviceCapabilities,
  BlockDeviceLimits,
  Extent,
  WriteFlags,
  WriteZeroesFlags,
} from './types.js';

export type WriteFaultKind = 'fail' | 'short' | 'tear' | 'crash';

export interface FaultRange {
  offsetBytes: number;
  lengthBytes: number;
  /** Which calls fail in the range (default both). */
  ops?: readonly ('read' | 'write')[];
}

export interface FaultPlan {
  /** 1-based mutating-call number -> what happens to it. */
  writes?: Readonly<Record<number, WriteFaultKind>>;
  /** Fault a seeded fraction of the mutating calls (0..1) with `kind` (default 'fail'). */
  rate?: { probability: number; seed: number; kind?: WriteFaultKind };
  /** Mutating calls after this many throw EFAULT_CRASH and reach nothing (a power cut). */
  crashAfterWrites?: number;
  /** 1-based flush numbers that fail, or true for every flush. */
  failFlushes?: readonly number[] | boolean;
  /** Areas where I/O fails with EIO. */
  badRanges?: readonly FaultRange[];
  /** Distinct bytes the device can hold (4 KiB grain) before writes fail with ENOSPC. */
  capacityBytes?: number;
}

export interface FaultStats {
  writes: number;
  flushes: number;
  reads: number;
  /** Injected failures by kind (fail, short, tear, crash, flush, read, enospc). */
  injected: Record<string, number>;
}

const GRAIN = 4096;

/** Deterministic 32-bit PRNG (mulberry32): seeded fault rates reproduce exactly. */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function isInjectedFault(e: unknown): boolean {
  return e instanceof CryptmapError && e.code.startsWith('EFAULT_');
}

export class FaultDevice implements BlockDevice {
  readonly inner: BlockDevice;
  readonly stats: FaultStats = { writes: 0, flushes: 0, reads: 0, injected: {} };
  plan: FaultPlan;
  #dead = false;
  readonly #rand: () => number;
  readonly #allocated = new Set<number>();

  constructor(inner: BlockDevice, plan: FaultPlan = {}) {
    this.inner = inner;
    this.plan = plan;
    this.#rand = mulberry32(plan.rate?.seed ?? 1);
  }

  get sizeBytes(): number {
    return this.inner.sizeBytes;
  }
  get capabilities(): BlockDeviceCapabilities {
    return this.inner.capabilities;
  }
  get limits(): BlockDeviceLimits {
    return this.inner.limits;
  }
  /** True once a crash or tear fault fired: nothing reaches the inner device any more. */
  get crashed(): boolean {
    return this.#dead;
  }

  #count(kind: string): void {
    this.stats.injected[kind] = (this.stats.injected[kind] ?? 0) + 1;
  }

  #fault(kind: string, op: string, offsetBytes: number, errno: 'EIO' | 'ENOSPC' = 'EIO'): CryptmapError {
    this.#count(kind);
    const msg =
      errno === 'ENOSPC'
        ? `no space left on device (injected, ${op} at ${offsetBytes})`
        : `I/O error (injected ${kind}, ${op} at ${offsetBytes})`;
    return new CryptmapError(
      kind === 'crash' || kind === 'tear' ? 'EFAULT_CRASH' : errno === 'ENOSPC' ? 'EFAULT_ENOSPC' : 'EFAULT_EIO',
      msg,
      {
        errno,
        context: { op, offsetBytes },
      },
    );
  }

  #inBad(op: 'read' | 'write', offsetBytes: number, lengthBytes: number): boolean {
    for (const r of this.plan.badRanges ?? []) {
      if (r.ops && !r.ops.includes(op)) continue;
      if (offsetBytes < r.offsetBytes + r.lengthBytes && r.offsetBytes < offsetBytes + lengthBytes) return true;
    }
    return false;
  }

  /** The fault for the next mutating call (undefined: let it through). */
  #nextWriteFault(offsetBytes: number, lengthBytes: number): WriteFaultKind | 'bad' | 'enospc' | undefined {
    if (this.#dead) return 'crash';
    const n = ++this.stats.writes;
    const crashAfter = this.plan.crashAfterWrites;
    if (crashAfter !== undefined && n > crashAfter) return 'crash';
    const chosen = this.plan.writes?.[n];
    if (chosen) return chosen;
    const rate = this.plan.rate;
    if (rate && this.#rand() < rate.probability) return rate.kind ?? 'fail';
    if (this.#inBad('write', offsetBytes, lengthBytes)) return 'bad';
    if (this.plan.capacityBytes !== undefined && !this.#allocate(offsetBytes, lengthBytes)) return 'enospc';
    return undefined;
  }

  /** Account the grains a write touches; false (nothing accounted) when they do not fit. */
  #allocate(offsetBytes: number, lengthBytes: number): boolean {
    const cap = Math.floor((this.plan.capacityBytes ?? 0) / GRAIN);
    const first = Math.floor(offsetBytes / GRAIN);
    const last = Math.floor((offsetBytes + Math.max(lengthBytes, 1) - 1) / GRAIN);
    let fresh = 0;
    for (let g = first; g <= last; g++) if (!this.#allocated.has(g)) fresh++;
    if (this.#allocated.size + fresh > cap) return false;
    for (let g = first; g <= last; g++) this.#allocated.add(g);
    return true;
  }

  async read(offsetBytes: number, buf: Uint8Array): Promise<void> {
    this.stats.reads++;
    if (this.#inBad('read', offsetBytes, buf.length)) throw this.#fault('read', 'read', offsetBytes);
    await this.inner.read(offsetBytes, buf);
  }

  async write(offsetBytes: number, data: Uint8Array, flags?: WriteFlags): Promise<void> {
    const f = this.#nextWriteFault(offsetBytes, data.length);
    if (f === undefined) {
      await this.inner.write(offsetBytes, data, flags);
      // A FUA write is a write plus a flush of it: when flushes fail, so does FUA (data not durable).
      if (flags?.fua && this.plan.failFlushes === true) throw this.#fault('flush', 'fua write', offsetBytes);
      return;
    }
    const lbs = this.inner.limits.logicalBlockBytes;
    const blocks = Math.floor(data.length / lbs);
    switch (f) {
      case 'short': {
        const keep = blocks > 1 ? 1 + Math.floor(this.#rand() * (blocks - 1)) : 0;
        if (keep > 0) await this.inner.write(offsetBytes, data.subarray(0, keep * lbs));
        throw this.#fault('short', 'write', offsetBytes);
      }
      case 'tear': {
        // Some blocks of the write reached the medium, in no particular order; then power went.
        for (let b = 0; b < blocks; b++) {
          if (this.#rand() < 0.5) await this.inner.write(offsetBytes + b * lbs, data.subarray(b * lbs, (b + 1) * lbs));
        }
        this.#dead = true;
        throw this.#fault('tear', 'write', offsetBytes);
      }
      case 'crash':
        this.#dead = true;
        throw this.#fault('crash', 'write', offsetBytes);
      case 'enospc':
        throw this.#fault('enospc', 'write', offsetBytes, 'ENOSPC');
      default:
        throw this.#fault(f, 'write', offsetBytes);
    }
  }

  async writeZeroes(offsetBytes: number, lengthBytes: number, flags?: WriteZeroesFlags): Promise<void> {
    const f = this.#nextWriteFault(offsetBytes, lengthBytes);
    if (f === undefined) {
      await this.inner.writeZeroes(offsetBytes, lengthBytes, flags);
      if (flags?.fua && this.plan.failFlushes === true) throw this.#fault('flush', 'fua write zeroes', offsetBytes);
      return;
    }
    if (f === 'crash' || f === 'tear') this.#dead = true;
    throw this.#fault(f === 'bad' ? 'fail' : f, 'write zeroes', offsetBytes, f === 'enospc' ? 'ENOSPC' : 'EIO');
  }

  async discard(offsetBytes: number, lengthBytes: number): Promise<void> {
    if (this.#dead) throw this.#fault('crash', 'discard', offsetBytes);
    this.stats.writes++;
    const crashAfter = this.plan.crashAfterWrites;
    if (crashAfter !== undefined && this.stats.writes > crashAfter) {
      this.#dead = true;
      throw this.#fault('crash', 'discard', offsetBytes);
    }
    return this.inner.discard(offsetBytes, lengthBytes);
  }

  async flush(): Promise<void> {
    const n = ++this.stats.flushes;
    if (this.#dead) throw this.#fault('crash', 'flush', 0);
    const ff = this.plan.failFlushes;
    if (ff === true || (Array.isArray(ff) && ff.includes(n))) throw this.#fault('flush', 'flush', 0);
    return this.inner.flush();
  }

  blockStatus(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    return (
      this.inner.blockStatus?.(offsetBytes, lengthBytes) ?? Promise.resolve([{ lengthBytes, hole: false, zero: false }])
    );
  }

  /** Closes the inner device unless crashed (a dead device has nothing left to flush). */
  async close(): Promise<void> {
    if (this.#dead) return;
    await this.inner.close();
  }
}
