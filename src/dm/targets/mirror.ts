/**
 * The `mirror` target (RAID-1; kernel drivers/md/dm-raid1.c `mirror_ctr`/`mirror_status`, dirty log
 * drivers/md/dm-log.c `core_ctr`/`core_status`, Documentation/admin-guide/device-mapper/dm-log.rst):
 * every write goes to all legs, reads come from one in-sync leg, and a background resync copies
 * leg 0 (the kernel's default mirror) over the others region by region.
 *
 * Facts taken from the kernel (learnt, not copied):
 *   - 2 to MAX_NR_MIRRORS = DM_KCOPYD_MAX_REGIONS + 1 = 9 legs ("Invalid number of mirrors").
 *   - core log args `<region_size> [sync|nosync]`: 1 or 2 args; region_size (sectors, %u) a power of
 *     two, at least 2 and at most the target length; #regions = ceil(length / region_size), the last
 *     region may be short. `nosync` starts with every region in sync; otherwise none is.
 *   - features: `handle_errors`, `keep_log` (keep_log requires handle_errors).
 *   - STATUSTYPE_TABLE: `core <1|2> <region_size> [sync |nosync ]<#mirrors> <dev> <offset>...
 *     [<#features> handle_errors [keep_log]]` (core_status prints a trailing space, then mirror_status
 *     the mirror count).
 *   - STATUSTYPE_INFO: `<#mirrors> <dev> ... <in_sync>/<#regions> 1 <health chars> 1 core`, one health
 *     char per leg, the most severe error seen: F (flush) > D (write) > S (sync) > R (read), else A.
 *
 * Choices where cryptmap differs or the brief was silent (see also the tests):
 *   - Log type `disk` (and `userspace`) is refused with EUNSUPPORTED: only the in-memory core log.
 *   - `keep_log` is accepted and has no effect: it concerns a failing log device, which a core log
 *     never has.
 *   - Reads are not balanced: the first in-sync leg without errors serves them (leg 0 normally).
 *     Reads of a region not yet in sync come from leg 0 only.
 *   - With handle_errors a leg with a write (D), flush (F) or sync (S) error is dropped: it gets no
 *     more I/O; a write or flush succeeds when at least one remaining leg took it; a read error (R)
 *     retries the next healthy in-sync leg. Without handle_errors the kernel ignores write errors;
 *     cryptmap instead returns every error to the caller (the safe choice: the caller learns the
 *     data is not on every leg), still records it in the health chars and keeps writing to all legs.
 *   - The resync starts when the table is live (the resume hook), copies one region at a time under
 *     that region's lock (a write to a region not yet in sync waits for its copy, so the copy can
 *     never overwrite newer data), yields to the event loop between regions, pauses when the device
 *     is suspended (postsuspend waits for the region being copied, as the kernel stops recovery),
 *     goes on at the next resume and stops on dispose. It never writes leg 0.
 */
import type { BlockDevice, BlockDeviceLimits, WriteFlags, WriteZeroesFlags } from '../../blockdev/types.js';
import { isPowerOfTwo } from '../../util/bytes.js';
import { CryptmapError } from '../../util/errors.js';
import type { TargetCapabilities, TargetContext, TargetInstance, TargetType } from '../types.js';
import {
  checkDeviceAlignment,
  checkDeviceSize,
  combinedLimits,
  passThroughCapabilities,
  settleAll,
  uintArg,
} from './args.js';

/** dm-raid1.c MAX_NR_MIRRORS (DM_KCOPYD_MAX_REGIONS + 1). */
export const MAX_NR_MIRRORS = 9;
/** Largest piece the resync copies at once (one reusable buffer). */
const COPY_CHUNK_BYTES = 1 << 20;
/** Health chars by severity, as dm-raid1's device_status_char picks them. */
const SEVERITY = ['F', 'D', 'S', 'R'] as const;
type LegError = (typeof SEVERITY)[number];

interface Leg {
  readonly arg: string;
  readonly offsetSectors: number;
  readonly baseBytes: number;
  readonly dev: BlockDevice;
  readonly errors: Set<LegError>;
}

type SyncMode = 'default' | 'sync' | 'nosync';

function u32Arg(s: string, ctx: TargetContext, name: string): number {
  return uintArg(s, ctx, name, 0xffffffff);
}

/** Parse `core <#log_args> <region_size> [sync|nosync]`; returns the words it used. */
function parseLog(
  args: readonly string[],
  ctx: TargetContext,
): { regionSectors: number; sync: SyncMode; used: number } {
  if (args.length < 2)
    throw ctx.error(
      args.length === 0 ? 'log_type' : '#log_args',
      "missing argument (expected 'mirror <log_type> <#log_args> <log_args>... <#mirrors> <dev> <offset>...')",
    );
  const type = args[0]!;
  const count = u32Arg(args[1]!, ctx, '#log_args');
  if (args.length < 2 + count)
    throw ctx.error('#log_args', `says ${count} log arguments but ${args.length - 2} arguments follow`);
  if (type === 'disk' || type === 'userspace') {
    throw ctx.error('log_type', `log type '${type}' is not supported by cryptmap (use 'core')`, 'EUNSUPPORTED');
  }
  if (type !== 'core') throw ctx.error('log_type', `unknown log type '${type}' (known: core, disk, userspace)`);
  if (count < 1 || count > 2)
    throw ctx.error('#log_args', `the core log takes 1 or 2 arguments (<region_size> [sync|nosync]), got ${count}`);
  const rsArg = args[2]!;
  const regionSectors = u32Arg(rsArg, ctx, 'region_size');
  if (regionSectors < 2 || !isPowerOfTwo(regionSectors) || regionSectors > ctx.lengthSectors) {
    throw ctx.error(
      'region_size',
      `'${rsArg}' must be a power of two, at least 2 and at most the target length (${ctx.lengthSectors}) sectors`,
    );
  }
  let sync: SyncMode = 'default';
  if (count === 2) {
    const w = args[3]!;
    if (w === 'sync' || w === 'nosync') sync = w;
    else throw ctx.error('log_args', `unknown sync argument '${w}' (expected sync or nosync)`);
  }
  return { regionSectors, sync, used: 2 + count };
}

/*
 * Table grammar:
 *   mirror <log_type> <#log_args> <log_args...> <#mirrors> <dev> <offset> [<dev> <offset>]...
 *          [<#features> <features...>]
 *   <log_type> <#log_args> <log_args>  `core 1 <region_size>` or `core 2 <region_size> sync|nosync`
 *   <#mirrors>      2 to 9
 *   <dev> <offset>  one pair per leg; offset in 512-byte sectors
 *   <features>      handle_errors, keep_log (keep_log needs handle_errors)
 */
export const mirror: TargetType = {
  name: 'mirror',
  version: [1, 14, 0],
  async ctr(args, ctx): Promise<TargetInstance> {
    const log = parseLog(args, ctx);
    let i = log.used;
    if (i >= args.length) throw ctx.error('#mirrors', 'missing argument');
    const nrArg = args[i++]!;
    const nr = u32Arg(nrArg, ctx, '#mirrors');
    if (nr < 2 || nr > MAX_NR_MIRRORS) throw ctx.error('#mirrors', `'${nrArg}' must be from 2 to ${MAX_NR_MIRRORS}`);
    if (args.length - i < 2 * nr)
      throw ctx.error('dev', `expected ${nr} <dev> <offset> pairs, got ${args.length - i} arguments`);
    const pairs: { arg: string; offsetSectors: number }[] = [];
    for (let m = 0; m < nr; m++) {
      pairs.push({ arg: args[i]!, offsetSectors: uintArg(args[i + 1]!, ctx, `offset #${m}`) });
      i += 2;
    }
    let handleErrors = false;
    let keepLog = false;
    if (i < args.length) {
      const nfArg = args[i++]!;
      const nf = u32Arg(nfArg, ctx, '#features');
      if (nf > args.length - i) throw ctx.error('#features', `says ${nf} features but ${args.length - i} follow`);
      for (let f = 0; f < nf; f++) {
        const w = args[i++]!;
        if (w === 'handle_errors') handleErrors = true;
        else if (w === 'keep_log') keepLog = true;
        else throw ctx.error('features', `unknown feature '${w}' (known: handle_errors, keep_log)`);
      }
      if (keepLog && !handleErrors) throw ctx.error('features', 'keep_log requires the handle_errors feature');
    }
    if (i < args.length) throw ctx.error('args', `unexpected extra argument '${args[i]}'`);

    const legs: Leg[] = [];
    for (let m = 0; m < nr; m++) {
      const p = pairs[m]!;
      const dev = await ctx.openDevice(p.arg, `dev #${m}`);
      checkDeviceSize(dev, p.arg, ctx, `dev #${m}`, p.offsetSectors + ctx.lengthSectors);
      checkDeviceAlignment(dev, p.arg, ctx, `offset #${m}`, p.offsetSectors);
      legs.push({
        arg: p.arg,
        offsetSectors: p.offsetSectors,
        baseBytes: p.offsetSectors * 512,
        dev,
        errors: new Set(),
      });
    }
    return new MirrorSet(legs, log.regionSectors, log.sync, handleErrors, keepLog, ctx.lengthSectors * 512);
  },
};

function allFailed(what: string, cause: unknown): CryptmapError {
  return new CryptmapError('EIO', `mirror: ${what} failed on every leg`, { errno: 'EIO', cause });
}

class MirrorSet implements TargetInstance {
  readonly capabilities: TargetCapabilities;
  readonly limits: BlockDeviceLimits;
  readonly #legs: Leg[];
  readonly #regionSectors: number;
  readonly #regionBytes: number;
  readonly #lengthBytes: number;
  readonly #sync: SyncMode;
  readonly #handleErrors: boolean;
  readonly #keepLog: boolean;
  readonly #inSync: Uint8Array;
  #syncCount: number;
  /** Per-region lock tails: held by the resync copy and by writes to regions not yet in sync. */
  readonly #locks = new Map<number, Promise<void>>();
  #stopped = false;
  /** Suspended: the resync waits for the next resume. */
  #paused = false;
  /** The region copy in progress, if any. */
  #copying: Promise<void> | undefined;
  #cursor = 0;
  #immediate: NodeJS.Immediate | undefined;
  #copyBuf: Buffer | undefined;

  constructor(
    legs: Leg[],
    regionSectors: number,
    sync: SyncMode,
    handleErrors: boolean,
    keepLog: boolean,
    lengthBytes: number,
  ) {
    this.#legs = legs;
    this.#regionSectors = regionSectors;
    this.#regionBytes = regionSectors * 512;
    this.#lengthBytes = lengthBytes;
    this.#sync = sync;
    this.#handleErrors = handleErrors;
    this.#keepLog = keepLog;
    const regions = Math.ceil(lengthBytes / this.#regionBytes);
    this.#inSync = new Uint8Array(regions).fill(sync === 'nosync' ? 1 : 0);
    this.#syncCount = sync === 'nosync' ? regions : 0;
    const devs = legs.map((l) => l.dev);
    this.capabilities = passThroughCapabilities(devs);
    this.limits = combinedLimits(devs);
  }

  get #regions(): number {
    return this.#inSync.length;
  }

  /** A dropped leg: with handle_errors, a write, flush or sync error takes it out of service. */
  #dead(l: Leg): boolean {
    return this.#handleErrors && (l.errors.has('D') || l.errors.has('F') || l.errors.has('S'));
  }

  #fail(l: Leg, kind: LegError): void {
    if (!this.#stopped) l.errors.add(kind);
  }

  /** Split [o, o+len) at region edges: `f(region, at, n)` per piece, in parallel. */
  #pieces(o: number, len: number, f: (r: number, at: number, n: number) => Promise<void>): Promise<void> {
    const ps: Promise<void>[] = [];
    let at = 0;
    while (at < len) {
      const pos = o + at;
      const r = Math.floor(pos / this.#regionBytes);
      const n = Math.min((r + 1) * this.#regionBytes - pos, len - at);
      ps.push(f(r, at, n));
      at += n;
    }
    return ps.length === 1 ? ps[0]! : settleAll(ps);
  }

  /** Run `fn` holding region `r`'s lock (FIFO). */
  async #withRegion<T>(r: number, fn: () => Promise<T>): Promise<T> {
    const prev = this.#locks.get(r);
    let release!: () => void;
    const mine = new Promise<void>((res) => {
      release = res;
    });
    this.#locks.set(r, mine);
    try {
      if (prev !== undefined) await prev;
      return await fn();
    } finally {
      release();
      if (this.#locks.get(r) === mine) this.#locks.delete(r);
    }
  }

  /**
   * A mutating call on every leg still in service, in parallel; errors mark `kind` on the leg. With
   * handle_errors it succeeds when one leg took it; without, any error is returned.
   */
  async #allLegs(what: string, kind: LegError, op: (l: Leg) => Promise<void>): Promise<void> {
    const live = this.#legs.filter((l) => !this.#dead(l));
    if (live.length === 0) throw allFailed(what, undefined);
    const rs = await Promise.allSettled(live.map(op));
    let firstError: unknown;
    let ok = 0;
    rs.forEach((r, k) => {
      if (r.status === 'fulfilled') ok++;
      else {
        this.#fail(live[k]!, kind);
        firstError ??= r.reason;
      }
    });
    if (firstError === undefined) return;
    if (!this.#handleErrors) throw firstError;
    if (ok === 0) throw allFailed(what, firstError);
  }

  /** A mutation of [o, o+len): regions not yet in sync are serialised against their resync copy. */
  #mutate(
    o: number,
    len: number,
    what: string,
    op: (l: Leg, devOffset: number, at: number, n: number) => Promise<void>,
  ): Promise<void> {
    const run = (at: number, n: number) => this.#allLegs(what, 'D', (l) => op(l, l.baseBytes + o + at, at, n));
    if (this.#syncCount === this.#regions) return run(0, len);
    // Regions only ever go from out-of-sync to in-sync, so an in-sync region needs no lock.
    return this.#pieces(o, len, (r, at, n) => (this.#inSync[r] ? run(at, n) : this.#withRegion(r, () => run(at, n))));
  }

  read(o: number, buf: Uint8Array): Promise<void> {
    if (this.#syncCount === this.#regions) return this.#readFrom(o, buf, true);
    return this.#pieces(o, buf.length, (r, at, n) =>
      this.#readFrom(o + at, buf.subarray(at, at + n), this.#inSync[r] === 1),
    );
  }

  /** Read from the first healthy leg (in sync) or leg 0 (not yet in sync); retry with handle_errors. */
  async #readFrom(o: number, buf: Uint8Array, inSync: boolean): Promise<void> {
    const order = inSync
      ? [
          ...this.#legs.filter((l) => !this.#dead(l) && l.errors.size === 0),
          ...this.#legs.filter((l) => !this.#dead(l) && l.errors.size > 0),
        ]
      : this.#dead(this.#legs[0]!)
        ? []
        : [this.#legs[0]!];
    let last: unknown;
    for (const l of order) {
      try {
        await l.dev.read(l.baseBytes + o, buf);
        return;
      } catch (e) {
        this.#fail(l, 'R');
        if (!this.#handleErrors) throw e;
        last = e;
      }
    }
    throw allFailed(inSync ? 'read' : 'read of a region not yet in sync (only leg 0 holds it)', last);
  }

  write(o: number, data: Uint8Array, flags?: WriteFlags): Promise<void> {
    // The same buffer goes to every leg: never let a leg scribble on it (drop `scratch`).
    const f: WriteFlags | undefined = flags?.fua ? { fua: true } : undefined;
    return this.#mutate(o, data.length, 'write', (l, d, at, n) => l.dev.write(d, data.subarray(at, at + n), f));
  }

  flush(): Promise<void> {
    return this.#allLegs('flush', 'F', (l) => l.dev.flush());
  }

  discard(o: number, len: number): Promise<void> {
    return this.#mutate(o, len, 'discard', (l, d, _at, n) => l.dev.discard(d, n));
  }

  writeZeroes(o: number, len: number, flags?: WriteZeroesFlags): Promise<void> {
    return this.#mutate(o, len, 'write zeroes', (l, d, _at, n) => l.dev.writeZeroes(d, n, flags));
  }

  status(kind: 'table' | 'status'): string {
    if (kind === 'table') {
      const logArgs =
        this.#sync === 'default' ? `core 1 ${this.#regionSectors}` : `core 2 ${this.#regionSectors} ${this.#sync}`;
      const features = [...(this.#handleErrors ? ['handle_errors'] : []), ...(this.#keepLog ? ['keep_log'] : [])];
      return (
        `${logArgs} ${this.#legs.length}` +
        this.#legs.map((l) => ` ${l.arg} ${l.offsetSectors}`).join('') +
        (features.length > 0 ? ` ${features.length} ${features.join(' ')}` : '')
      );
    }
    const health = this.#legs.map((l) => SEVERITY.find((c) => l.errors.has(c)) ?? 'A').join('');
    return `${this.#legs.length} ${this.#legs.map((l) => `${l.arg} `).join('')}${this.#syncCount}/${this.#regions} 1 ${health} 1 core`;
  }

  /** The resync runs while the table is live and not suspended (the kernel starts recovery on resume). */
  resume(): void {
    if (this.#stopped) return;
    this.#paused = false;
    if (this.#syncCount < this.#regions && this.#copying === undefined && this.#immediate === undefined)
      this.#schedule();
  }

  /** Suspended: no resync writes until the next resume; waits for the region being copied. */
  async postsuspend(): Promise<void> {
    this.#paused = true;
    if (this.#immediate !== undefined) clearImmediate(this.#immediate);
    this.#immediate = undefined;
    await this.#copying;
  }

  #schedule(): void {
    this.#immediate = setImmediate(() => {
      this.#immediate = undefined;
      this.#step();
    });
  }

  /** Copy the next region not in sync, then yield to the event loop before the one after. */
  #step(): void {
    if (this.#stopped || this.#paused) return;
    while (this.#cursor < this.#regions && this.#inSync[this.#cursor]) this.#cursor++;
    if (this.#cursor >= this.#regions) return;
    const r = this.#cursor;
    this.#copying = this.#withRegion(r, () => this.#copyRegion(r)).then(
      (goOn) => {
        this.#copying = undefined;
        this.#cursor = r + 1;
        if (goOn && !this.#stopped && !this.#paused) this.#schedule();
      },
      () => {
        this.#copying = undefined; // #copyRegion reports through leg health, never by rejecting
      },
    );
  }

  /** Copy region `r` from leg 0 to every other leg in service; false stops the resync. */
  async #copyRegion(r: number): Promise<boolean> {
    if (this.#stopped) return false;
    if (this.#inSync[r]) return true;
    const src = this.#legs[0]!;
    if (this.#dead(src)) return false;
    const startBytes = r * this.#regionBytes;
    const endBytes = Math.min(startBytes + this.#regionBytes, this.#lengthBytes);
    this.#copyBuf ??= Buffer.allocUnsafe(Math.min(this.#regionBytes, COPY_CHUNK_BYTES));
    let clean = true;
    for (let pos = startBytes; pos < endBytes; pos += this.#copyBuf.length) {
      const b = this.#copyBuf.subarray(0, Math.min(this.#copyBuf.length, endBytes - pos));
      try {
        await src.dev.read(src.baseBytes + pos, b);
      } catch {
        this.#fail(src, 'S');
        return false;
      }
      if (this.#stopped) return false;
      const dests = this.#legs.slice(1).filter((l) => !this.#dead(l));
      const rs = await Promise.allSettled(dests.map((l) => l.dev.write(l.baseBytes + pos, b)));
      rs.forEach((res, k) => {
        if (res.status === 'rejected') {
          this.#fail(dests[k]!, 'S');
          // With handle_errors the leg is now out of service; without, the region stays out of sync.
          if (!this.#handleErrors) clean = false;
        }
      });
      if (this.#stopped) return false;
    }
    if (clean) {
      this.#inSync[r] = 1;
      this.#syncCount++;
    }
    return true;
  }

  dispose(): void {
    this.#stopped = true;
    if (this.#immediate !== undefined) clearImmediate(this.#immediate);
    this.#immediate = undefined;
  }
}
