/**
 * A thin pool at run time (kernel drivers/md/dm-thin.c `struct pool`): the metadata, the data
 * device, the pool mode and the I/O paths of the thin devices over it. The `thin-pool` target
 * creates or binds one per pool mapped device (the kernel's pool table, keyed by the mapped
 * device); `thin` targets find it through their <pool dev>.
 *
 * Behaviour (kernel facts, learnt not copied):
 *   - A write to an unmapped block allocates a data block; a partial write zeroes the rest of the
 *     block first unless skip_block_zeroing. A write to a shared block (the device was snapshotted
 *     after the block was mapped) copies the block to a new one and remaps (break sharing).
 *   - Metadata commits on REQ_PREFLUSH/FUA (flush() here), after every pool message, and on suspend;
 *     the data device is flushed before the commit so no committed mapping points at unwritten data.
 *   - A block freed in a transaction is not reused before the commit; when only such blocks are
 *     left the pool commits and retries. With no free block at all the pool goes out_of_data_space:
 *     writes needing a block wait (queue_if_no_space, up to no_space_timeout = 60 s, then fail) or
 *     fail with ENOSPC at once (error_if_no_space). Growing the pool (reload with a larger length)
 *     lets them go on.
 *   - Free data blocks falling to the low water mark raise one dm event (until the pool grows).
 *   - Discard unmaps whole blocks; a data block no longer referenced is discarded on the data
 *     device after the next commit (passdown), unless no_discard_passdown.
 *   - Metadata full: the pool aborts to the last commit and goes read-only (status `ro`); writes to
 *     provisioned, unshared blocks still work, others fail with EIO.
 *   - A discard waits for the I/O in flight that found its blocks mapped before they are freed
 *     (the kernel's all_io deferred set); freed blocks are not reused until passed down.
 *   - Suspending the pool device suspends its thin devices' I/O: new thin I/O waits until the
 *     pool resumes, running I/O drains first (writes queued for data space do not count: they wait
 *     again for the resume when woken), then the metadata is committed.
 */
import type { BlockDevice, Extent, WriteZeroesFlags } from '../../blockdev/types.js';
import { CryptmapError, isCryptmapError } from '../../util/errors.js';
import { NEEDS_CHECK_FLAG, ThinMetadata, type ThinDevice, blockOf, packBlockTime, timeOf } from './metadata.js';

export interface PoolFeatures {
  zeroNewBlocks: boolean;
  discardEnabled: boolean;
  discardPassdown: boolean;
  readOnly: boolean;
  errorIfNoSpace: boolean;
}

export type PoolMode = 'rw' | 'out_of_data_space' | 'ro' | 'fail';

/** The kernel's no_space_timeout module parameter default. */
export const NO_SPACE_TIMEOUT_MS = 60_000;

/**
 * How long a pool suspend waits for thin I/O in flight to drain before it goes on without it (the
 * kernel waits without bound, interruptibly; here nothing could interrupt it, and the device's
 * lifecycle, removal included, waits behind the suspend). The NBD client's reconnect window is 30 s.
 */
export const HOLD_DRAIN_TIMEOUT_MS = 60_000;

/** What the pool needs to know of one active thin target. */
export interface ThinUser {
  readonly devId: number;
  /** True while the thin device's table is live and not suspended. */
  active: boolean;
}

function ioError(message: string, errno: 'EIO' | 'ENOSPC' = 'EIO'): CryptmapError {
  return new CryptmapError(errno === 'ENOSPC' ? 'ENOSPC' : 'EIO', message, { errno });
}

export class Pool {
  md: ThinMetadata;
  /** The <metadata dev> argument the pool was built with (a reload may not change it). */
  readonly metadataArg: string;
  metaDev: BlockDevice;
  dataDev: BlockDevice;
  readonly blockSectors: number;
  readonly blockBytes: number;
  features: PoolFeatures;
  lowWaterBlocks: number;
  mode: PoolMode;
  /**
   * Set while the pool device is suspended: thin I/O waits until the pool resumes, as the kernel
   * suspends the active thin devices with their pool (pool_presuspend) and resumes them after.
   */
  #hold: { promise: Promise<void>; release: () => void } | undefined;
  /** Thin I/O running (not waiting for data space, a provisioning or the pool to resume). */
  #active = 0;
  /** Pool suspends waiting for the running thin I/O to drain: every one is woken (drained, resumed or removed). */
  readonly #idle = new Set<(drained: boolean) => void>();
  raiseEvent: () => void;
  readonly users = new Set<ThinUser>();
  /** Pool target instances bound to this pool (the kernel's pool refcount). */
  refs = 0;
  #lowWaterTriggered = false;
  /** Went read-only after an aborted commit (metadata full): stays so until the pool is rebuilt. */
  #aborted = false;
  #metaLowTriggered = false;
  /** Blocks being provisioned or copied: device id -> virtual block -> the provisioning. */
  readonly #locks = new Map<number, Map<number, Promise<void>>>();
  /** I/O sent straight to mapped data blocks since the last unmap (see #drainIo). */
  #epoch = new IoEpoch();
  /** Unmaps whose blocks wait for older I/O before they are freed; commits wait for them. */
  #unmapsPending = 0;
  #unmapTail: Promise<void> = Promise.resolve();
  #commitTail: Promise<void> = Promise.resolve();
  #passdown: number[] = [];
  /** Freed blocks being discarded on the data device: not allocated until that is done. */
  #passdownRunning: Promise<void> | undefined;
  #spaceWaiters: (() => void)[] = [];

  constructor(
    md: ThinMetadata,
    metadataArg: string,
    metaDev: BlockDevice,
    dataDev: BlockDevice,
    blockSectors: number,
    lowWaterBlocks: number,
    features: PoolFeatures,
    raiseEvent: () => void,
  ) {
    this.md = md;
    this.metadataArg = metadataArg;
    this.metaDev = metaDev;
    this.dataDev = dataDev;
    this.blockSectors = blockSectors;
    this.blockBytes = blockSectors * 512;
    this.lowWaterBlocks = lowWaterBlocks;
    this.features = features;
    // Metadata flagged needs_check stays read-only until repaired (thin_check/thin_repair), as the kernel's.
    this.mode = features.readOnly || (md.flags & NEEDS_CHECK_FLAG) !== 0 ? 'ro' : 'rw';
    this.raiseEvent = raiseEvent;
  }

  /** Adopt a new table's devices and settings (the new pool table went live); grow the data space. */
  rebind(
    metaDev: BlockDevice,
    dataDev: BlockDevice,
    nrDataBlocks: number,
    lowWaterBlocks: number,
    features: PoolFeatures,
    raiseEvent: () => void,
  ): void {
    this.metaDev = metaDev;
    this.dataDev = dataDev;
    this.lowWaterBlocks = lowWaterBlocks;
    this.features = features;
    this.raiseEvent = raiseEvent;
    if (this.mode !== 'fail') {
      if (features.readOnly) this.mode = 'ro';
      else if (this.mode === 'ro' && !this.#aborted && (this.md.flags & NEEDS_CHECK_FLAG) === 0) this.mode = 'rw';
    }
    if (nrDataBlocks > this.md.nrDataBlocks) {
      this.md.growData(nrDataBlocks);
      this.#lowWaterTriggered = false;
      if (this.mode === 'out_of_data_space') this.mode = 'rw';
      const w = this.#spaceWaiters;
      this.#spaceWaiters = [];
      for (const f of w) f();
    }
  }

  /** The pool device is suspended (thin targets may not be built then; thin I/O waits). */
  get suspended(): boolean {
    return this.#hold !== undefined;
  }

  /**
   * Hold new thin I/O and wait until none is running (the pool device is being suspended). True
   * when the running I/O drained; false when the wait ended first: `timeoutMs` passed (I/O stuck
   * on the data device: the suspend goes on, new I/O stays held, the stuck I/O ends by itself), or
   * the hold was released meanwhile (resume, or the pool going away). Any number may wait at once.
   */
  holdThinIo(timeoutMs = HOLD_DRAIN_TIMEOUT_MS): Promise<boolean> {
    if (this.#hold === undefined) {
      let release!: () => void;
      const promise = new Promise<void>((r) => {
        release = r;
      });
      this.#hold = { promise, release };
    }
    if (this.#active === 0) return Promise.resolve(true);
    return new Promise<boolean>((resolve) => {
      const done = (drained: boolean): void => {
        clearTimeout(timer);
        this.#idle.delete(done);
        resolve(drained);
      };
      const timer = setTimeout(() => done(false), timeoutMs);
      timer.unref?.();
      this.#idle.add(done);
    });
  }

  /** Let held thin I/O go on (the pool resumed, or is going away: then it fails); drain waiters are let go too. */
  releaseThinIo(): void {
    const h = this.#hold;
    this.#hold = undefined;
    h?.release();
    this.#wakeIdle(false);
  }

  #wakeIdle(drained: boolean): void {
    for (const f of [...this.#idle]) f(drained);
  }

  async #admit(): Promise<void> {
    while (this.#hold !== undefined) await this.#hold.promise;
  }

  #enter(): void {
    this.#active++;
  }

  #leave(): void {
    if (--this.#active === 0 && this.#idle.size > 0) this.#wakeIdle(true);
  }

  /** Count `p` as running thin I/O until it settles. */
  #running(p: Promise<void>): Promise<void> {
    this.#enter();
    const leave = (): void => this.#leave();
    p.then(leave, leave);
    return p;
  }

  /** Wait for `p` not counted as running (it may wait for data space), then for the pool to resume. */
  async #parked(p: Promise<unknown>): Promise<void> {
    this.#leave();
    try {
      await p;
    } finally {
      await this.#admit();
      this.#enter();
    }
  }

  device(id: number): ThinDevice {
    const d = this.md.devices.get(id);
    if (d === undefined) throw ioError(`thin device ${id} no longer exists in the pool`);
    return d;
  }

  // -------------------------------------------------------------------------------- commit

  /** Flush the data device, then commit the metadata if it changed (serialised), then pass down discards. */
  commit(): Promise<void> {
    return this.exclusive(() => this.#commitNow());
  }

  /**
   * Run `fn` alone among commits (metadata snapshot messages commit inside it); the data device is
   * flushed first so no commit can name a block whose data is not durable.
   */
  exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.#commitTail.then(fn);
    this.#commitTail = run.then(
      () => {},
      () => {},
    );
    return run;
  }

  /** A metadata operation that commits by itself (reserve/release_metadata_snap), serialised with commits. */
  metadataOp(fn: (md: ThinMetadata) => Promise<void>): Promise<void> {
    return this.exclusive(async () => {
      if (this.mode === 'fail') throw ioError('the thin pool has failed (metadata I/O error)');
      await this.dataDev.flush();
      try {
        await fn(this.md);
      } catch (e) {
        if (isCryptmapError(e, 'ENOSPC_METADATA')) await this.#abort();
        throw e;
      }
    });
  }

  async #commitNow(): Promise<void> {
    if (this.mode === 'fail') throw ioError('the thin pool has failed (metadata I/O error)');
    await this.dataDev.flush();
    // An unmap between removing its mappings and freeing their blocks would commit as leaked blocks.
    while (this.#unmapsPending > 0) await this.#unmapTail;
    if (!this.md.dirty || this.mode === 'ro') return;
    const discards = this.#passdown;
    this.#passdown = [];
    try {
      await this.md.commit();
    } catch (e) {
      if (isCryptmapError(e, 'ENOSPC_METADATA')) {
        await this.#abort();
        throw ioError(`thin pool switched to read-only mode: ${e.message}`);
      }
      this.mode = 'fail';
      throw ioError(`thin pool metadata commit failed: ${e instanceof Error ? e.message : String(e)}`);
    }
    this.#checkMetadataLowWater();
    if (this.features.discardPassdown) {
      // The blocks are free in the committed space map now: hold allocation until their discards
      // are done, or a new write to a reused block could land before the discard (and be lost).
      const free = discards.filter((b) => this.md.dataCounts[b] === 0);
      if (free.length === 0) return;
      const run = settle(free.map((b) => this.dataDev.discard(b * this.blockBytes, this.blockBytes))).catch(() => {});
      this.#passdownRunning = run;
      try {
        await run;
      } finally {
        if (this.#passdownRunning === run) this.#passdownRunning = undefined;
      }
    }
  }

  /** Out of metadata space: drop the uncommitted changes (reload the last commit) and go read-only. */
  async #abort(): Promise<void> {
    this.mode = 'ro';
    this.#aborted = true;
    try {
      const opens = new Map([...this.md.devices].map(([id, d]) => [id, d.openCount]));
      const md = await ThinMetadata.open(this.metaDev, this.md.dataBlockSectors, this.md.nrDataBlocks);
      for (const [id, n] of opens) {
        const d = md.devices.get(id);
        if (d !== undefined) d.openCount = n;
      }
      this.md = md;
    } catch {
      this.mode = 'fail';
    }
    this.raiseEvent();
  }

  #checkMetadataLowWater(): void {
    const free = this.md.nrMetaBlocks - this.md.usedMetadataBlocks;
    if (free <= this.metadataThreshold()) {
      if (!this.#metaLowTriggered) {
        this.#metaLowTriggered = true;
        this.raiseEvent();
      }
    } else this.#metaLowTriggered = false;
  }

  /** The kernel's calc_metadata_threshold: a quarter of the metadata blocks, at most 1024 (4 MiB). */
  metadataThreshold(): number {
    return Math.min(1024, Math.floor(this.md.nrMetaBlocks / 4));
  }

  // ------------------------------------------------------------------------------ allocation

  async #allocate(): Promise<number> {
    for (;;) {
      while (this.#passdownRunning !== undefined) await this.#passdownRunning;
      if (this.mode === 'ro' || this.mode === 'fail')
        throw ioError(`the thin pool is ${this.mode === 'ro' ? 'read-only' : 'failed'}: no block can be allocated`);
      let b = this.md.allocDataBlock();
      if (b === undefined && this.md.freeDataBlocks > 0) {
        // Only blocks freed in this transaction are left: commit, then they can be reused.
        await this.commit();
        while (this.#passdownRunning !== undefined) await this.#passdownRunning;
        b = this.md.allocDataBlock();
      }
      if (b !== undefined) {
        if (this.mode === 'out_of_data_space') this.mode = 'rw';
        this.#checkLowWater();
        return b;
      }
      if (this.mode === 'rw') {
        this.mode = 'out_of_data_space';
        this.raiseEvent();
      }
      if (this.features.errorIfNoSpace) throw ioError('the thin pool is out of data space', 'ENOSPC');
      let grown = false;
      const waited = new Promise<void>((resolve) => {
        const t = setTimeout(() => {
          this.#spaceWaiters = this.#spaceWaiters.filter((f) => f !== wake);
          resolve();
        }, NO_SPACE_TIMEOUT_MS);
        t.unref?.();
        const wake = (): void => {
          clearTimeout(t);
          grown = true;
          resolve();
        };
        this.#spaceWaiters.push(wake);
      });
      await this.#parked(waited);
      if (!grown) throw ioError(`the thin pool stayed out of data space for ${NO_SPACE_TIMEOUT_MS / 1000} s`, 'ENOSPC');
    }
  }

  #checkLowWater(): void {
    if (!this.#lowWaterTriggered && this.md.allocatableDataBlocks <= this.lowWaterBlocks) {
      this.#lowWaterTriggered = true;
      this.raiseEvent();
    }
  }

  /** Wake the writes waiting for data space: they retry (and fail if the pool is going away). */
  wakeSpaceWaiters(): void {
    const w = this.#spaceWaiters;
    this.#spaceWaiters = [];
    for (const f of w) f();
  }

  // -------------------------------------------------------------------------- thin I/O paths

  #shared(d: ThinDevice, v: number): boolean {
    return d.snapshottedTime > timeOf(v);
  }

  /**
   * Walk [off, off+len) block by block: `direct(dataOffset, pos, n)` for pieces whose data block is
   * mapped (and, for writes, not shared nor being provisioned), merged while consecutive on the
   * data device (sequentially provisioned blocks are); `other(vb, inOff, pos, n, v)` for the rest.
   * The direct pieces count in the current I/O epoch until they settle (see #drainIo).
   */
  #walk(
    d: ThinDevice,
    off: number,
    len: number,
    forWrite: boolean,
    direct: (dataOffset: number, pos: number, n: number) => Promise<void>,
    other: (vb: number, inOff: number, pos: number, n: number, v: number | undefined) => Promise<void> | void,
  ): Promise<void> {
    const bb = this.blockBytes;
    const locks = forWrite ? this.#locks.get(d.id) : undefined;
    const epoch = this.#epoch;
    const go = (at: number, pos: number, n: number): Promise<void> => this.#running(epoch.track(direct(at, pos, n)));
    const leaveRunning = (): void => this.#leave();
    const ps: Promise<void>[] = [];
    let runAt = -1;
    let runPos = 0;
    let runLen = 0;
    for (let pos = 0; pos < len; ) {
      const abs = off + pos;
      const vb = Math.floor(abs / bb);
      const inOff = abs - vb * bb;
      const n = Math.min(len - pos, bb - inOff);
      const v = d.map.get(vb);
      if (v !== undefined && (!forWrite || (!this.#shared(d, v) && locks?.has(vb) !== true))) {
        const at = blockOf(v) * bb + inOff;
        if (runAt >= 0 && runAt + runLen === at) runLen += n;
        else {
          if (runAt >= 0) ps.push(go(runAt, runPos, runLen));
          runAt = at;
          runPos = pos;
          runLen = n;
        }
      } else {
        if (runAt >= 0) ps.push(go(runAt, runPos, runLen));
        runAt = -1;
        // Counted as running before it starts: it may park (uncount itself) at once.
        this.#enter();
        const r = other(vb, inOff, pos, n, v);
        if (r === undefined) this.#leave();
        else {
          r.then(leaveRunning, leaveRunning);
          ps.push(r);
        }
      }
      pos += n;
    }
    if (runAt >= 0) ps.push(go(runAt, runPos, runLen));
    return ps.length === 1 ? ps[0]! : settle(ps);
  }

  /**
   * `dst` from the external origin at `at`: what lies past the origin's end reads as zeros (the
   * thin device may be larger than its origin).
   */
  #readOrigin(origin: BlockDevice, at: number, dst: Uint8Array): Promise<void> | undefined {
    const n = Math.max(0, Math.min(dst.length, origin.sizeBytes - at));
    if (n < dst.length) dst.fill(0, n);
    return n > 0 ? origin.read(at, dst.subarray(0, n)) : undefined;
  }

  /** Reads of unmapped blocks come from `origin` when the thin device has an external origin. */
  async read(id: number, off: number, buf: Uint8Array, origin?: BlockDevice): Promise<void> {
    if (this.#hold !== undefined) await this.#admit();
    if (this.mode === 'fail') throw ioError('the thin pool has failed');
    const d = this.device(id);
    await this.#walk(
      d,
      off,
      buf.length,
      false,
      (at, pos, n) => this.dataDev.read(at, buf.subarray(pos, pos + n)),
      origin === undefined
        ? (_vb, _in, pos, n) => {
            buf.fill(0, pos, pos + n);
          }
        : (_vb, _in, pos, n) => this.#readOrigin(origin, off + pos, buf.subarray(pos, pos + n)),
    );
  }

  /** A partial write to an unmapped block copies the rest of the block from `origin`, if given. */
  async write(id: number, off: number, data: Uint8Array, fua: boolean, origin?: BlockDevice): Promise<void> {
    if (this.#hold !== undefined) await this.#admit();
    if (this.mode === 'fail') throw ioError('the thin pool has failed');
    const d = this.device(id);
    await this.#walk(
      d,
      off,
      data.length,
      true,
      (at, pos, n) => this.dataDev.write(at, data.subarray(pos, pos + n)),
      (vb, inOff, pos, n) => this.#writeBlock(d, vb, inOff, data.subarray(pos, pos + n), origin),
    );
    if (fua) await this.flush();
  }

  /** A thin device's flush: commit (waits while the pool is suspended). */
  async flush(): Promise<void> {
    if (this.#hold !== undefined) await this.#admit();
    this.#enter();
    try {
      await this.commit();
    } finally {
      this.#leave();
    }
  }

  async #writeBlock(
    d: ThinDevice,
    vb: number,
    inOff: number,
    chunk: Uint8Array,
    origin: BlockDevice | undefined,
  ): Promise<void> {
    for (;;) {
      let locks = this.#locks.get(d.id);
      const held = locks?.get(vb);
      if (held !== undefined) {
        await this.#parked(held.catch(() => {}));
        continue;
      }
      const v = d.map.get(vb);
      if (v !== undefined && !this.#shared(d, v)) {
        await this.#epoch.track(this.dataDev.write(blockOf(v) * this.blockBytes + inOff, chunk));
        return;
      }
      if (locks === undefined) {
        locks = new Map();
        this.#locks.set(d.id, locks);
      }
      const p = this.#provision(d, vb, v, inOff, chunk, origin);
      locks.set(vb, p);
      try {
        await p;
      } finally {
        locks.delete(vb);
        if (locks.size === 0 && this.#locks.get(d.id) === locks) this.#locks.delete(d.id);
      }
      return;
    }
  }

  /** A provisioning of one of the blocks [first, end) of device `id`, if any is running. */
  #provisioningIn(id: number, first: number, end: number): Promise<void> | undefined {
    const locks = this.#locks.get(id);
    if (locks === undefined) return undefined;
    for (const [vb, p] of locks) if (vb >= first && vb < end) return p;
    return undefined;
  }

  /**
   * Wait until every direct data-device I/O issued before this call has settled: it may have
   * found a mapping an unmap just removed, so the unmapped block may not be freed (reused by
   * another device, discarded) before then. Later I/O cannot see the removed mappings. As the
   * kernel's all_io deferred set, without a count per block in the I/O path.
   */
  #drainIo(): Promise<void> {
    const old = this.#epoch;
    this.#epoch = new IoEpoch();
    return old.drained();
  }

  /**
   * Allocate a block for `vb` (copying the shared old one, or the external origin's block, or
   * zeroing), write `chunk`, map it.
   */
  async #provision(
    d: ThinDevice,
    vb: number,
    old: number | undefined,
    inOff: number,
    chunk: Uint8Array,
    origin: BlockDevice | undefined,
  ): Promise<void> {
    const bb = this.blockBytes;
    const b = await this.#allocate();
    try {
      const full = inOff === 0 && chunk.length === bb;
      const fromOrigin = old === undefined && this.#fromOrigin(vb, origin);
      if (full) await this.dataDev.write(b * bb, chunk);
      else if (old !== undefined || fromOrigin || this.features.zeroNewBlocks) {
        const whole = Buffer.alloc(bb);
        if (old !== undefined) await this.dataDev.read(blockOf(old) * bb, whole);
        else if (fromOrigin) await this.#readOrigin(origin!, vb * bb, whole);
        whole.set(chunk, inOff);
        await this.dataDev.write(b * bb, whole);
      } else await this.dataDev.write(b * bb + inOff, chunk);
    } catch (e) {
      this.md.decData(b);
      throw e;
    }
    // The device may have been deleted meanwhile (only when not open, so never for a live thin).
    const cur = d.map.get(vb);
    d.map.set(vb, packBlockTime(b, this.md.time));
    d.changed = true;
    if (cur !== undefined) this.md.decData(blockOf(cur));
    this.md.dirty = true;
  }

  /**
   * Unmap whole blocks in the range (discard and write-zeroes); partial blocks are left. Waits for
   * provisionings in the range (and for the pool to resume), removes the mappings at once (later I/O reads zeros or provisions
   * anew), and frees the data blocks once the I/O that may still be using them has settled.
   */
  async unmap(id: number, off: number, len: number): Promise<void> {
    const refuse = (): void => {
      if (this.mode === 'ro' || this.mode === 'fail')
        throw ioError(`the thin pool is ${this.mode === 'ro' ? 'read-only' : 'failed'}`);
    };
    refuse();
    const d = this.device(id);
    const bb = this.blockBytes;
    const first = Math.ceil(off / bb);
    const end = Math.floor((off + len) / bb);
    if (first >= end) return;
    for (;;) {
      const held = this.#provisioningIn(d.id, first, end);
      if (held !== undefined) await held.catch(() => {});
      else if (this.#hold !== undefined) await this.#admit();
      else break;
    }
    refuse();
    const freed: number[] = [];
    const take = (vb: number, v: number): void => {
      d.map.delete(vb);
      freed.push(blockOf(v));
    };
    if (end - first <= d.map.size) {
      for (let vb = first; vb < end; vb++) {
        const v = d.map.get(vb);
        if (v !== undefined) take(vb, v);
      }
    } else for (const [vb, v] of d.map) if (vb >= first && vb < end) take(vb, v);
    if (freed.length === 0) return;
    d.changed = true;
    this.md.dirty = true;
    const md = this.md;
    this.#unmapsPending++;
    const drained = Promise.all([this.#unmapTail, this.#drainIo()]).then(() => {});
    this.#unmapTail = drained;
    this.#enter();
    try {
      await drained;
    } finally {
      this.#unmapsPending--;
      this.#leave();
    }
    // An aborted transaction (metadata full) reloaded the last commit: these blocks are its.
    if (this.md !== md) return;
    let nowFree = 0;
    for (const b of freed) {
      if (md.decData(b) === 0) {
        this.#passdown.push(b);
        nowFree++;
      }
    }
    // Writes queued out of data space retry (they commit to reuse these), as the kernel's after a commit.
    if (nowFree > 0) this.wakeSpaceWaiters();
  }

  /** Zeros over [off, off+len): whole blocks are unmapped, unless they would read from `origin`. */
  async writeZeroes(
    id: number,
    off: number,
    len: number,
    flags?: WriteZeroesFlags,
    origin?: BlockDevice,
  ): Promise<void> {
    const bb = this.blockBytes;
    const d = this.device(id);
    const zero = async (o: number, n: number): Promise<void> => {
      for (let pos = 0; pos < n; ) {
        const vb = Math.floor((o + pos) / bb);
        const m = Math.min(n - pos, (vb + 1) * bb - (o + pos));
        // An unmapped block already reads as zeros (past the external origin's end).
        if (d.map.has(vb) || flags?.noHole || this.#fromOrigin(vb, origin))
          await this.write(id, o + pos, Buffer.alloc(m), false, origin);
        pos += m;
      }
    };
    const first = Math.ceil(off / bb) * bb;
    const end = Math.floor((off + len) / bb) * bb;
    // Unmapping a block under the external origin would show the origin's data again.
    if (flags?.noHole || first >= end || (origin !== undefined && first < origin.sizeBytes)) await zero(off, len);
    else {
      await zero(off, first - off);
      await this.unmap(id, first, end - first);
      await zero(end, off + len - end);
    }
    if (flags?.fua) await this.flush();
  }

  /** An unmapped block `vb` reads from the external origin (it starts before the origin's end). */
  #fromOrigin(vb: number, origin: BlockDevice | undefined): boolean {
    return origin !== undefined && vb * this.blockBytes < origin.sizeBytes;
  }

  blockStatus(id: number, off: number, len: number, origin?: BlockDevice): Extent[] {
    const d = this.device(id);
    const bb = this.blockBytes;
    const out: Extent[] = [];
    for (let pos = 0; pos < len; ) {
      const vb = Math.floor((off + pos) / bb);
      const n = Math.min(len - pos, (vb + 1) * bb - (off + pos));
      const hole = !d.map.has(vb) && !this.#fromOrigin(vb, origin);
      const last = out[out.length - 1];
      if (last !== undefined && last.hole === hole) last.lengthBytes += n;
      else out.push({ lengthBytes: n, hole, zero: hole });
      pos += n;
    }
    return out;
  }

  /** Highest mapped virtual block of a device, or -1. */
  highestMapped(id: number): number {
    let hi = -1;
    for (const k of this.device(id).map.keys()) if (k > hi) hi = k;
    return hi;
  }
}

/** Direct I/O in flight, counted until it settles; drained() resolves when none is left (any number of waiters). */
class IoEpoch {
  #n = 0;
  #waiters: (() => void)[] = [];

  track(p: Promise<void>): Promise<void> {
    this.#n++;
    const leave = (): void => {
      if (--this.#n !== 0) return;
      const ws = this.#waiters;
      this.#waiters = [];
      for (const w of ws) w();
    };
    p.then(leave, leave);
    return p;
  }

  drained(): Promise<void> {
    if (this.#n === 0) return Promise.resolve();
    return new Promise((resolve) => {
      this.#waiters.push(resolve);
    });
  }
}

async function settle(ps: Promise<void>[]): Promise<void> {
  const rs = await Promise.allSettled(ps);
  for (const r of rs) if (r.status === 'rejected') throw r.reason;
}
