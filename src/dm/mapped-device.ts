/**
 * A mapped device: a BlockDevice whose live table maps ranges of 512-byte sectors to targets
 * (Linux drivers/md/dm.c, in userspace).
 *
 * Data path: every request is validated once here (range, alignment to the table's logical block
 * size, write/discard capability), split at target edges and at the table's max request size, and
 * the pieces run concurrently. write-zeroes on a target without its own hook is emulated here with
 * writes of a shared zero buffer (targets never modify the data they are given to write).
 *
 * Lifecycle (serialised per device by a promise-chain lock; data operations are not serialised):
 *   load     -> the new table becomes the inactive table (the previous inactive one is disposed)
 *   suspend  -> new I/O waits (FIFO) at a gate, in-flight I/O drains, then the live table is flushed,
 *               then its postsuspend hooks run (background writers stop)
 *   resume   -> preresume hooks, swap in the inactive table (suspending first when needed), dispose
 *               the old live table, resume hooks of the live table, open the gate: queued I/O runs in
 *               arrival order on the new table
 *   remove   -> refused while open unless forced; forced: in-flight drains, I/O then fails with EIO
 * Major/minor: every mapped device has major 253 (DM_MAJOR, the usual dynamic dm major) and the
 * lowest minor not in use in its registry, like the kernel's idr allocation.
 */
import type {
  BlockDevice,
  BlockDeviceCapabilities,
  BlockDeviceLimits,
  Extent,
  WriteFlags,
  WriteZeroesFlags,
} from '../blockdev/types.js';
import { deviceView } from '../blockdev/view.js';
import { CryptmapError, EXIT_BUSY } from '../util/errors.js';
import { DeviceIoStats } from './io-stats.js';
import type { Table } from './table.js';
import { settleAll } from './targets/args.js';
import type { TargetInstance } from './types.js';

/** The major number mapped devices report (the kernel's device-mapper usually gets 253). */
export const DM_MAJOR = 253;
const ZERO_CHUNK_BYTES = 1 << 20;
let zeroChunk: Buffer | undefined;
const RESOLVED: Promise<void> = Promise.resolve();

interface Deferred {
  promise: Promise<void>;
  resolve: () => void;
}
function deferred(): Deferred {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => {
    resolve = r;
  });
  return { promise, resolve };
}

const NO_CAPS: BlockDeviceCapabilities = {
  write: false,
  flush: false,
  fua: false,
  discard: false,
  writeZeroes: false,
  blockStatus: false,
  multiConn: true,
};
const NO_LIMITS: BlockDeviceLimits = { logicalBlockBytes: 512, physicalBlockBytes: 512, maxRequestBytes: 64 << 20 };

export interface MappedDeviceInit {
  name: string;
  uuid: string;
  minor: number;
  readOnly: boolean;
}

/** A mapped device: a BlockDevice whose live table maps sector ranges to targets (see the file comment). */
export class MappedDevice implements BlockDevice {
  name: string;
  readonly uuid: string;
  readonly major = DM_MAJOR;
  readonly minor: number;
  readonly readOnly: boolean;
  /** dm event number (bumped by target events: the thin pool's low-water mark and mode changes). */
  eventNr = 0;
  #live: Table | null = null;
  #inactive: Table | null = null;
  #suspended = false;
  #gate: Deferred | null = null;
  #inflight = 0;
  #ioStats: DeviceIoStats | null = null;
  #drained: Deferred | null = null;
  #openCount = 0;
  #removed = false;
  #lock: Promise<unknown> = RESOLVED;

  constructor(init: MappedDeviceInit) {
    this.name = init.name;
    this.uuid = init.uuid;
    this.minor = init.minor;
    this.readOnly = init.readOnly;
  }

  get sizeBytes(): number {
    return this.#live?.sizeBytes ?? 0;
  }

  get capabilities(): BlockDeviceCapabilities {
    const t = this.#live;
    if (t === null) return NO_CAPS;
    const c = t.capabilities;
    return {
      write: c.write && !this.readOnly,
      flush: c.flush,
      fua: c.fua,
      discard: c.discard && !this.readOnly,
      writeZeroes: c.writeZeroes && !this.readOnly,
      blockStatus: c.blockStatus,
      multiConn: c.multiConn,
    };
  }

  get limits(): BlockDeviceLimits {
    return this.#live?.limits ?? NO_LIMITS;
  }

  /**
   * I/O accounting (requests, bytes, latency, errors by code) read by the daemon's metrics, or null
   * while off: until {@link enableIoStats} a request costs no clock read and no extra promise reaction.
   */
  get ioStats(): DeviceIoStats | null {
    return this.#ioStats;
  }

  /** Start the I/O accounting (idempotent; the registry does it for every device once metrics are on). */
  enableIoStats(): DeviceIoStats {
    this.#ioStats ??= new DeviceIoStats();
    return this.#ioStats;
  }

  get suspended(): boolean {
    return this.#suspended;
  }
  get openCount(): number {
    return this.#openCount;
  }
  get hasLiveTable(): boolean {
    return this.#live !== null;
  }
  get hasInactiveTable(): boolean {
    return this.#inactive !== null;
  }
  get liveTable(): Table | null {
    return this.#live;
  }
  get inactiveTable(): Table | null {
    return this.#inactive;
  }
  get removed(): boolean {
    return this.#removed;
  }

  /** Run a lifecycle operation after the previous one finished (per-device serialisation). */
  lifecycle<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.#lock.then(fn, fn);
    this.#lock = run.catch(() => {});
    return run;
  }

  // ---------------------------------------------------------------- data path

  #leave = (): void => {
    if (--this.#inflight === 0 && this.#drained !== null) {
      const d = this.#drained;
      this.#drained = null;
      d.resolve();
    }
  };

  /**
   * Count `p` as in flight until it settles. The caller gets `p` itself (no extra promise hop on
   * the hot path); the bookkeeping reaction is registered first, so it runs before the caller's.
   */
  #track(p: Promise<void>): Promise<void> {
    this.#inflight++;
    p.then(this.#leave, this.#leave);
    return p;
  }

  /** Run `start` now, or after resume when suspended (queued FIFO). */
  #run(start: () => Promise<void>): Promise<void> {
    if (this.#gate !== null) return this.#queued(start);
    let p: Promise<void>;
    try {
      p = start();
    } catch (e) {
      return Promise.reject(e);
    }
    return this.#track(p);
  }

  async #queued(start: () => Promise<void>): Promise<void> {
    while (this.#gate !== null) await this.#gate.promise;
    return this.#run(start);
  }

  #table(op: string): Table {
    const t = this.#live;
    if (t === null) {
      throw new CryptmapError('ENOTABLE', `device ${this.name} has no live table (${op})`, {
        errno: 'EIO',
        context: { device: this.name },
      });
    }
    return t;
  }

  #check(t: Table, offsetBytes: number, lengthBytes: number, op: string): void {
    const lbs = t.limits.logicalBlockBytes;
    if (
      !Number.isSafeInteger(offsetBytes) ||
      !Number.isSafeInteger(lengthBytes) ||
      offsetBytes < 0 ||
      lengthBytes < 0 ||
      offsetBytes + lengthBytes > t.sizeBytes
    ) {
      throw new CryptmapError(
        'ERANGE',
        `${op} of ${lengthBytes} bytes at ${offsetBytes} is outside device ${this.name} (${t.sizeBytes} bytes)`,
        {
          errno: op === 'write' ? 'ENOSPC' : 'EINVAL',
          context: { device: this.name, offsetBytes, lengthBytes },
        },
      );
    }
    if (offsetBytes % lbs !== 0 || lengthBytes % lbs !== 0) {
      throw new CryptmapError(
        'EALIGN',
        `${op} of ${lengthBytes} bytes at ${offsetBytes} on device ${this.name} is not aligned to its ${lbs}-byte logical blocks`,
        {
          context: { device: this.name, offsetBytes, lengthBytes },
        },
      );
    }
  }

  /** The cheap form of #check for the hot path (false: take the slow path, which reports). */
  #inRange(t: Table, offsetBytes: number, lengthBytes: number): boolean {
    const lbs = t.limits.logicalBlockBytes;
    return (
      offsetBytes >= 0 &&
      lengthBytes > 0 &&
      offsetBytes + lengthBytes <= t.sizeBytes &&
      offsetBytes % lbs === 0 &&
      lengthBytes % lbs === 0
    );
  }

  #writable(t: Table, op: string): void {
    if (this.readOnly || !t.capabilities.write) {
      throw new CryptmapError('EROFS', `device ${this.name} is read-only (${op})`, {
        errno: 'EPERM',
        exitCode: 2,
        context: { device: this.name },
      });
    }
  }

  /**
   * Split [offsetBytes, +lengthBytes) at target edges and max request size; call `each` per piece
   * with the target, the offset inside it, the position inside the request and the length.
   */
  #split(
    t: Table,
    offsetBytes: number,
    lengthBytes: number,
    each: (inst: TargetInstance, relBytes: number, at: number, n: number) => Promise<void>,
  ): Promise<void> {
    if (lengthBytes === 0) return RESOLVED;
    const max = t.limits.maxRequestBytes;
    let i = t.find(offsetBytes);
    const first = t.entries[i]!;
    const end = offsetBytes + lengthBytes;
    if (end <= first.endBytes && lengthBytes <= max)
      return each(first.instance, offsetBytes - first.startBytes, 0, lengthBytes);
    const ps: Promise<void>[] = [];
    let pos = offsetBytes;
    while (pos < end) {
      const e = t.entries[i]!;
      const n = Math.min(e.endBytes, end, pos + max) - pos;
      try {
        ps.push(each(e.instance, pos - e.startBytes, pos - offsetBytes, n));
      } catch (err) {
        ps.push(Promise.reject(err));
      }
      pos += n;
      if (pos >= e.endBytes) i++;
    }
    return settleAll(ps);
  }

  read(offsetBytes: number, buf: Uint8Array): Promise<void> {
    const p = this.#read(offsetBytes, buf);
    if (this.#ioStats !== null) this.#ioStats.track('read', buf.length, p);
    return p;
  }

  #read(offsetBytes: number, buf: Uint8Array): Promise<void> {
    // Hot path: not suspended, the request inside one target and under the size limit.
    const t = this.#live;
    if (this.#gate === null && t !== null && this.#inRange(t, offsetBytes, buf.length)) {
      const e = t.entries[t.find(offsetBytes)]!;
      if (offsetBytes + buf.length <= e.endBytes && buf.length <= t.limits.maxRequestBytes) {
        let p: Promise<void>;
        try {
          p = e.instance.read(offsetBytes - e.startBytes, buf);
        } catch (err) {
          return Promise.reject(err);
        }
        return this.#track(p);
      }
    }
    return this.#run(() => {
      const t = this.#table('read');
      this.#check(t, offsetBytes, buf.length, 'read');
      return this.#split(t, offsetBytes, buf.length, (inst, rel, at, n) =>
        inst.read(rel, n === buf.length ? buf : buf.subarray(at, at + n)),
      );
    });
  }

  write(offsetBytes: number, data: Uint8Array, flags?: WriteFlags): Promise<void> {
    const p = this.#write(offsetBytes, data, flags);
    if (this.#ioStats !== null) this.#ioStats.track('write', data.length, p);
    return p;
  }

  #write(offsetBytes: number, data: Uint8Array, flags?: WriteFlags): Promise<void> {
    const t = this.#live;
    if (
      this.#gate === null &&
      t !== null &&
      !this.readOnly &&
      t.capabilities.write &&
      this.#inRange(t, offsetBytes, data.length)
    ) {
      const e = t.entries[t.find(offsetBytes)]!;
      if (offsetBytes + data.length <= e.endBytes && data.length <= t.limits.maxRequestBytes) {
        let p: Promise<void>;
        try {
          p = e.instance.write(offsetBytes - e.startBytes, data, flags);
        } catch (err) {
          return Promise.reject(err);
        }
        return this.#track(p);
      }
    }
    return this.#run(() => {
      const t = this.#table('write');
      this.#writable(t, 'write');
      this.#check(t, offsetBytes, data.length, 'write');
      return this.#split(t, offsetBytes, data.length, (inst, rel, at, n) =>
        inst.write(rel, n === data.length ? data : data.subarray(at, at + n), flags),
      );
    });
  }

  flush(): Promise<void> {
    const p = this.#flush();
    if (this.#ioStats !== null) this.#ioStats.track('flush', 0, p);
    return p;
  }

  #flush(): Promise<void> {
    return this.#run(() => {
      const t = this.#live;
      if (t === null) return RESOLVED;
      return settleAll(t.entries.map((e) => e.instance.flush()));
    });
  }

  discard(offsetBytes: number, lengthBytes: number): Promise<void> {
    const p = this.#discard(offsetBytes, lengthBytes);
    if (this.#ioStats !== null) this.#ioStats.track('discard', lengthBytes, p);
    return p;
  }

  #discard(offsetBytes: number, lengthBytes: number): Promise<void> {
    return this.#run(() => {
      const t = this.#table('discard');
      this.#writable(t, 'discard');
      if (!t.capabilities.discard) {
        const e = t.entries.find((x) => !x.instance.capabilities.discard)!;
        throw new CryptmapError(
          'ENOTSUP',
          `device ${this.name} does not support discard (${e.type.name} target at table line ${e.line} refuses discards)`,
          {
            errno: 'ENOTSUP',
            context: { device: this.name },
          },
        );
      }
      this.#check(t, offsetBytes, lengthBytes, 'discard');
      return this.#split(t, offsetBytes, lengthBytes, (inst, rel, _at, n) => inst.discard!(rel, n));
    });
  }

  writeZeroes(offsetBytes: number, lengthBytes: number, flags?: WriteZeroesFlags): Promise<void> {
    const p = this.#writeZeroes(offsetBytes, lengthBytes, flags);
    if (this.#ioStats !== null) this.#ioStats.track('write_zeroes', lengthBytes, p);
    return p;
  }

  #writeZeroes(offsetBytes: number, lengthBytes: number, flags?: WriteZeroesFlags): Promise<void> {
    return this.#run(() => {
      const t = this.#table('write zeroes');
      this.#writable(t, 'write zeroes');
      this.#check(t, offsetBytes, lengthBytes, 'write');
      return this.#split(t, offsetBytes, lengthBytes, (inst, rel, _at, n) =>
        inst.writeZeroes ? inst.writeZeroes(rel, n, flags) : emulateWriteZeroes(inst, rel, n, flags),
      );
    });
  }

  /** Allocation status, split at target edges and merged (only when capabilities.blockStatus). */
  blockStatus(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    const out: Extent[] = [];
    return this.#run(async () => {
      const t = this.#table('block status');
      if (!t.capabilities.blockStatus) {
        throw new CryptmapError(
          'ENOTSUP',
          `device ${this.name} cannot report block status (a target in its table cannot)`,
          { errno: 'ENOTSUP' },
        );
      }
      this.#check(t, offsetBytes, lengthBytes, 'block status');
      const end = offsetBytes + lengthBytes;
      let pos = offsetBytes;
      for (let i = t.find(offsetBytes); pos < end; i++) {
        const e = t.entries[i]!;
        const n = Math.min(e.endBytes, end) - pos;
        for (const x of await e.instance.blockStatus!(pos - e.startBytes, n)) {
          const last = out[out.length - 1];
          if (last && last.hole === x.hole && last.zero === x.zero) last.lengthBytes += x.lengthBytes;
          else out.push({ ...x });
        }
        pos += n;
      }
    }).then(() => out);
  }

  /** The device object itself stays until removed from its registry; close() only flushes. */
  async close(): Promise<void> {
    if (this.#live !== null && !this.#removed && !this.#suspended) await this.flush();
  }

  /** A handle counted in the open count; its close() releases it (idempotent). */
  open(): BlockDevice {
    if (this.#removed)
      throw new CryptmapError('ENODEV', `device ${this.name} has been removed`, { errno: 'ENOENT', exitCode: 4 });
    this.#openCount++;
    let open = true;
    return deviceView(this, async () => {
      if (!open) return;
      open = false;
      try {
        // The contract: close flushes a writable device first (not while suspended: it would wait).
        if (!this.#removed && this.#live !== null && !this.#suspended && this.capabilities.write) await this.flush();
      } finally {
        this.#openCount--;
      }
    });
  }

  // ---------------------------------------------------------------- lifecycle (call under lifecycle())

  /** Make `table` the inactive table, disposing a previous inactive one. */
  async load(table: Table): Promise<void> {
    const old = this.#inactive;
    this.#inactive = table;
    if (old !== null) await old.dispose();
  }

  /** Drop the inactive table (dmsetup clear). */
  async clear(): Promise<void> {
    const old = this.#inactive;
    this.#inactive = null;
    if (old !== null) await old.dispose();
  }

  /** Stop new I/O, wait for in-flight I/O, flush (unless noflush). No-op when already suspended. */
  async suspend(opts: { noflush?: boolean } = {}): Promise<void> {
    if (this.#suspended) return;
    this.#suspended = true;
    this.#gate = deferred();
    if (this.#inflight > 0) {
      this.#drained = deferred();
      await this.#drained.promise;
    }
    const t = this.#live;
    if (t !== null && !opts.noflush) {
      try {
        await settleAll(t.entries.map((e) => e.instance.flush()));
      } catch (e) {
        this.#openGate();
        throw e;
      }
    }
    if (t !== null) await Promise.allSettled(t.entries.map(async (e) => e.instance.postsuspend?.()));
  }

  #openGate(): void {
    this.#suspended = false;
    const g = this.#gate;
    this.#gate = null;
    g?.resolve();
  }

  /** Swap in the inactive table if any (suspending first), then let I/O flow again. */
  async resume(): Promise<void> {
    const next = this.#inactive ?? this.#live;
    if (next !== null) for (const e of next.entries) e.instance.preresume?.();
    if (this.#inactive !== null) {
      if (!this.#suspended) await this.suspend();
      const old = this.#live;
      this.#live = this.#inactive;
      this.#inactive = null;
      if (old !== null) await old.dispose();
    }
    const live = this.#live;
    if (live !== null) for (const e of live.entries) e.instance.resume?.();
    this.#openGate();
  }

  /** dmsetup message: route to the target holding `sector`. */
  async message(sector: number, args: string[]): Promise<string> {
    const t = this.#live;
    if (t === null) throw new CryptmapError('ENOTABLE', `device ${this.name} has no live table to send a message to`);
    if (!Number.isSafeInteger(sector) || sector < 0 || sector * 512 >= t.sizeBytes) {
      throw new CryptmapError(
        'ERANGE',
        `message sector ${sector} is outside device ${this.name} (${t.sizeBytes / 512} sectors)`,
      );
    }
    const e = t.entries[t.find(sector * 512)]!;
    if (e.instance.message === undefined) {
      throw new CryptmapError('ENOMSG', `the ${e.type.name} target does not accept messages`);
    }
    return e.instance.message(args, this.#suspended);
  }

  /** Tear down (registry remove). With force, open handles stay but fail with EIO afterwards. */
  async teardown(): Promise<void> {
    this.#removed = true;
    if (!this.#suspended) await this.suspend({ noflush: false }).catch(() => this.suspend({ noflush: true }));
    const live = this.#live;
    const inactive = this.#inactive;
    this.#live = null;
    this.#inactive = null;
    if (inactive !== null) await inactive.dispose();
    if (live !== null) await live.dispose();
    this.#openGate();
  }

  /** Refuse removal while open (kernel EBUSY) unless forced. */
  checkRemovable(force: boolean): void {
    if (this.#openCount > 0 && !force) {
      throw new CryptmapError(
        'EBUSY',
        `device ${this.name} is in use (open count ${this.#openCount}); use --force to remove it anyway`,
        {
          errno: 'EBUSY',
          exitCode: EXIT_BUSY,
          context: { device: this.name },
        },
      );
    }
  }
}

const FUA: WriteFlags = { fua: true };

async function emulateWriteZeroes(
  inst: TargetInstance,
  relBytes: number,
  lengthBytes: number,
  flags?: WriteFlags,
): Promise<void> {
  zeroChunk ??= Buffer.alloc(ZERO_CHUNK_BYTES);
  for (let pos = 0; pos < lengthBytes; pos += ZERO_CHUNK_BYTES) {
    const n = Math.min(ZERO_CHUNK_BYTES, lengthBytes - pos);
    const last = pos + n >= lengthBytes;
    // The zero chunk is shared: never offered as scratch.
    await inst.write(relBytes + pos, zeroChunk.subarray(0, n), last && flags?.fua ? FUA : undefined);
  }
}
