/**
 * Online LUKS2 reencryption (cryptsetup reencrypt on an active device): the daemon rewrites the data
 * of a volume it serves with the new volume key while NBD and FUSE clients keep reading and writing.
 * The on-disk work is luks/reencrypt.ts (runReencryptWithKeys: cryptsetup's state, so either tool
 * resumes after a crash); this file keeps the mapping right around each hotzone, as cryptsetup does
 * with its overlay and hotzone devices (lib/luks2/luks2_reencrypt.c; read, not copied):
 *
 *   <name>:           [0, off) crypt new key | [off, off+len) linear <name>-hotzone-N | [off+len, end) crypt old key
 *                     (backward: old, hotzone, new)
 *   <name>-hotzone-N: the whole data in the old layout, suspended while the hotzone is rewritten (its
 *                     I/O waits; what was in flight has drained), then reloaded in the new layout and
 *                     resumed once the header says the hotzone is done.
 *
 * Two hotzone devices take turns, so the next one is ready before the top table stops naming the
 * previous one. Only the hotzone's I/O waits, apart from the moment each top table is swapped in
 * (a suspend that drains what is in flight). At the end the top table is one crypt target with the
 * new key under the volume's keyring name, and the record's mapping describes the new segment.
 * A stop (SIGINT in the CLI, close, daemon shutdown) leaves the mixed mapping without hotzone
 * device; a failure inside a hotzone maps it to `error` (its data is half rewritten: resume the
 * reencryption, online or offline, to recover it from the resilience data).
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { type CryptMapping, cryptTableLine, dmUuid, keyDescription, keyRefArg } from '../activate/mapping.js';
import { exportIfLive } from './export-sync.js';
import { openBlockDevice } from '../blockdev/open.js';
import type { BlockDevice } from '../blockdev/types.js';
import type { ReencryptStatus } from '../control/protocol.js';
import type { DeviceIoStats } from '../dm/io-stats.js';
import type { SectorBytes } from '../engine/types.js';
import {
  Luks2Volume,
  openLuks,
  type ReencryptLock,
  reencryptLayout,
  runReencryptWithKeys,
  takeReencryptLock,
} from '../luks/index.js';
import { constantTimeEqual } from '../util/bytes.js';
import { CryptmapError, type ErrorCode, EXIT_BUSY, EXIT_FAILURE, isCryptmapError } from '../util/errors.js';
import { logger } from '../util/log.js';
import type { Secret } from '../util/secret.js';
import type { CoreParts } from './volume-table.js';

const log = logger('daemon');

/** Largest hotzone online unless asked otherwise: the most a client's I/O to it waits for. */
export const ONLINE_HOTZONE_BYTES = 8 << 20;

/**
 * How the reencryption yields to clients (as md's resync drops to speed_limit_min while its array has
 * other I/O): after a hotzone during which clients did I/O, it pauses YIELD_FACTOR times as long as
 * that hotzone took (at most MAX_YIELD_MS), so that busy clients have the volume and the CPU to
 * themselves at least two thirds of the time. Without client I/O it runs flat out. Issue 16's target
 * is a client keeping at least half its throughput; on 2 cores a hotzone's read, hash, decrypt, encrypt
 * and write take most of the CPU the client would have had, and a client whose random I/O meets the
 * suspended hotzone waits, so 1 (half the time) put the target at the bottom of what it guarantees
 * (rounds of 0.43-0.45 under heavy load); 2 leaves a margin (README, bench:reencrypt-online).
 */
export const YIELD_FACTOR = 2;
const MAX_YIELD_MS = 1000;

/** A reencryption the daemon runs (VolumeRecord.reencrypt). */
export interface ReencryptJob {
  status: ReencryptStatus;
  readonly abort: AbortController;
  /** Settles when the job ends, however it ends (never rejects). */
  readonly ended: Promise<void>;
}

export interface OnlineReencryptOptions {
  hotzoneBytes?: number;
}

const busy = (msg: string) => new CryptmapError('EBUSY', msg, { exitCode: EXIT_BUSY, errno: 'EBUSY' });
const refuse = (msg: string, code: ErrorCode = 'EINVAL') => new CryptmapError(code, msg, { exitCode: EXIT_FAILURE });

/** The keyring name of the new volume key while the reencryption runs. */
export function newKeyDescription(name: string): string {
  return `${keyDescription(name)}:reencrypt`;
}

/** The names of the two hotzone devices of volume `name`. */
export function hotzoneDevices(name: string): string[] {
  return [`${name}-hotzone-0`, `${name}-hotzone-1`];
}

/** A segment of a crypt mapping: logical sectors [start, start+len) of `m`, keyed by `keyArg`. */
function segmentLine(m: CryptMapping, keyArg: string, startSectors: number, lenSectors: number): string {
  const line = cryptTableLine(
    {
      ...m,
      sizeSectors: lenSectors,
      ivOffsetSectors: m.ivOffsetSectors + BigInt(startSectors),
      offsetSectors: m.offsetSectors + startSectors,
    },
    keyArg,
  );
  return `${startSectors}${line.slice(1)}`;
}

/**
 * The table of `name` stopped between hotzones: the new layout (`next`, key under newKeyDescription)
 * on logical [0, boundary) forward or [boundary, end) backward, the old one (`old`, the volume's key)
 * on the rest.
 */
export function mixedTable(
  name: string,
  old: CryptMapping,
  next: CryptMapping,
  boundaryBytes: number,
  backward: boolean,
): string {
  const a = boundaryBytes / 512;
  const T = old.sizeSectors;
  const oldLine = (st: number, n: number) => segmentLine(old, keyRefArg(old), st, n);
  const newLine = (st: number, n: number) =>
    segmentLine(next, `:${next.keyBytes}:logon:${newKeyDescription(name)}`, st, n);
  const lines: string[] = [];
  if (a > 0) lines.push(backward ? oldLine(0, a) : newLine(0, a));
  if (a < T) lines.push(backward ? newLine(a, T - a) : oldLine(a, T - a));
  return lines.join('\n');
}

/**
 * Activate a LUKS2 volume whose reencryption stopped between hotzones (cryptsetup 2.6 open of a
 * device in reencryption, LUKS2_activate_multi): `old` is the old layout with its key (the volume's
 * keyring entry), `next` the new one with its key (newKeyDescription), meeting at `boundaryBytes`
 * (see mixedTable). The record keeps the old mapping and a stopped reencryption, so that
 * `cryptmap reencrypt --resume-only NAME` continues online and the verbs that rebuild the table are
 * refused until it has finished. Takes copies of the keys.
 */
export async function openMidReencryption(
  p: CoreParts,
  old: CryptMapping,
  next: CryptMapping,
  boundaryBytes: number,
  backward: boolean,
  oldKey: Secret,
  newKey: Secret,
): Promise<void> {
  const name = old.name;
  if (p.registry.find(name))
    throw new CryptmapError('EEXIST', `Device ${name} already exists.`, { exitCode: EXIT_BUSY, errno: 'EEXIST' });
  if (
    next.name !== name ||
    next.uuid !== old.uuid ||
    next.device !== old.device ||
    next.sizeSectors !== old.sizeSectors
  )
    throw refuse('The two layouts of a reencryption must describe the same volume.', 'EARGS');
  if (
    !Number.isSafeInteger(boundaryBytes) ||
    boundaryBytes < 0 ||
    boundaryBytes % 512 !== 0 ||
    boundaryBytes > old.sizeSectors * 512
  )
    throw refuse('Invalid reencryption boundary.', 'EARGS');
  if (oldKey.length !== old.keyBytes || newKey.length !== next.keyBytes)
    throw refuse('Volume key sizes do not match.', 'EKEY');
  const desc = keyDescription(name);
  p.keyring.set(desc, oldKey.expose());
  p.keyring.set(newKeyDescription(name), newKey.expose());
  try {
    await p.dm.create(name, {
      table: mixedTable(name, old, next, boundaryBytes, backward),
      uuid: dmUuid(old),
      readOnly: old.readOnly,
    });
    try {
      exportIfLive(p, name);
    } catch (e) {
      await p.dm.remove(name, { force: true });
      throw e;
    }
  } catch (e) {
    p.keyring.delete(desc);
    p.keyring.delete(newKeyDescription(name));
    throw e;
  }
  const rec = p.volumes.get(name);
  rec.mapping = old;
  const total = old.sizeSectors * 512;
  rec.reencrypt = {
    status: { state: 'stopped', doneBytes: backward ? total - boundaryBytes : boundaryBytes, totalBytes: total },
    abort: new AbortController(),
    ended: Promise.resolve(),
  };
  log.info('volume opened in reencryption', { name, boundaryBytes, backward });
}

/**
 * Start reencrypting the active LUKS2 volume `name` (its header already in reencryption: the CLI
 * initialised it) with its old and new volume keys. Returns once the job runs; its progress is in
 * the record's `reencrypt` status. Takes copies of the keys.
 */
export async function startOnlineReencrypt(
  p: CoreParts,
  name: string,
  oldKey: Secret,
  newKey: Secret,
  o: OnlineReencryptOptions = {},
): Promise<void> {
  const dev = p.registry.find(name);
  const rec = p.volumes.find(name);
  const m = rec?.mapping;
  if (!dev || !rec) throw new CryptmapError('ENODEV', `Device ${name} is not active.`, { exitCode: 4 });
  if (m === undefined || m.type !== 'LUKS2')
    throw refuse(`Device ${name} is not an active LUKS2 volume: online reencryption needs one.`, 'ENOTLUKS');
  if (rec.reencrypt?.status.state === 'running') throw busy(`Reencryption of ${name} is already running.`);
  if (dev.suspended) throw refuse(`Volume ${name} is suspended (luksResume it first).`, 'ESUSPENDED');
  if (m.readOnly || dev.readOnly) throw refuse(`Device ${name} is active read-only: it cannot be reencrypted online.`);
  if (m.ivLargeSectors) throw refuse('Online reencryption of a mapping with iv_large_sectors is not supported.');
  if (o.hotzoneBytes !== undefined && (!Number.isSafeInteger(o.hotzoneBytes) || o.hotzoneBytes < 512))
    throw refuse('Invalid hotzone size.', 'EARGS');
  const running = await p.keyring.resolve({ type: 'logon', description: keyDescription(name), keyBytes: m.keyBytes });
  try {
    if (!constantTimeEqual(running.expose(), oldKey.expose()))
      throw refuse(`The volume key given is not the one active volume ${name} runs with.`, 'EKEY');
  } finally {
    running.dispose();
  }
  const hdrPath = m.header ?? m.device;
  const hdrDev = await openBlockDevice(hdrPath, { readOnly: false });
  let dataDev: BlockDevice | undefined;
  let vol: Luks2Volume | undefined;
  let lock: ReencryptLock | undefined;
  try {
    const l = await openLuks(hdrDev);
    if (!(l instanceof Luks2Volume)) throw refuse(`Device ${hdrPath} is not LUKS2.`, 'ENOTLUKS');
    vol = l;
    if (vol.uuid !== m.uuid) throw refuse(`The header on ${hdrPath} is not the one ${name} was opened from.`);
    // cryptsetup's reencryption lock, held by the job (luks/reencrypt-lock.ts): busy while cryptsetup runs one.
    lock = takeReencryptLock(vol.uuid);
    const lay = reencryptLayout(vol.jsonSnapshot());
    if (lay.mode !== 'reencrypt')
      throw refuse(`Online ${lay.mode}ion is not supported by cryptmap; close ${name} and run it offline.`, 'ENOTSUP');
    const prev = lay.previous;
    const fin = lay.final;
    if (
      prev.encryption !== m.cipher ||
      Number(prev.offset) !== m.offsetSectors * 512 ||
      (prev.sector_size ?? 512) !== m.sectorBytes ||
      BigInt(prev.iv_tweak ?? '0') !== m.ivOffsetSectors ||
      prev.offset !== fin.offset
    )
      throw refuse(`The mapping of ${name} is not the reencryption's old segment.`);
    if (newKey.length === 0 || oldKey.length !== m.keyBytes) throw refuse('Volume key sizes do not match.', 'EKEY');
    if (m.header !== undefined) dataDev = await openBlockDevice(m.device, { readOnly: false });
    const dataBytes = (dataDev ?? hdrDev).sizeBytes - Number(fin.offset);
    if (dataBytes !== m.sizeSectors * 512)
      throw refuse(`The mapping of ${name} (${m.sizeSectors} sectors) does not cover the whole data device.`);
    const next: CryptMapping = {
      ...m,
      cipher: fin.encryption!,
      keyBytes: newKey.length,
      sectorBytes: (fin.sector_size ?? 512) as SectorBytes,
      ivOffsetSectors: BigInt(fin.iv_tweak ?? '0'),
      offsetSectors: Number(fin.offset) / 512,
    };
    p.keyring.set(newKeyDescription(name), newKey.expose());
    const ac = new AbortController();
    const status: ReencryptStatus = { state: 'running', doneBytes: 0, totalBytes: dataBytes };
    const keys = { oldKey: Buffer.from(oldKey.expose()), newKey: Buffer.from(newKey.expose()) };
    const v = vol;
    const d = dataDev;
    const held = lock;
    vol = undefined;
    dataDev = undefined;
    lock = undefined;
    const ended = (async () => {
      const run = new HotzoneMapping(p, name, m, next, lay.backward, ac.signal);
      // The state changes last, once the lock, keys and devices are released: a client that sees
      // 'finished' (the CLI returns on it) finds cryptsetup's lock free and the header closed.
      let end: ReencryptStatus['state'] = 'failed';
      try {
        const finished = await runReencryptWithKeys(v, keys, {
          ...(d ? { dataDev: d } : {}),
          hotzoneBytes: o.hotzoneBytes ?? ONLINE_HOTZONE_BYTES,
          signal: ac.signal,
          hotzone: run,
          onProgress: (done, total) => {
            status.doneBytes = done;
            status.totalBytes = total;
          },
        });
        const counts = {
          hotzones: run.hotzones,
          yieldedMs: Math.round(run.yieldedMs),
          suspendedMs: Math.round(run.suspendedMs),
        };
        if (finished) {
          await run.finish();
          end = 'finished';
          log.info('online reencryption finished', { name, ...counts });
        } else {
          await run.stop();
          end = 'stopped';
          log.info('online reencryption stopped', { name, doneBytes: status.doneBytes, ...counts });
        }
      } catch (e) {
        await run.fail().catch(() => undefined);
        end = 'failed';
        status.error = isCryptmapError(e) || e instanceof Error ? e.message : String(e);
        log.error('online reencryption failed', { name, error: status.error });
      } finally {
        keys.oldKey.fill(0);
        keys.newKey.fill(0);
        p.keyring.delete(newKeyDescription(name));
        await d?.close().catch(() => undefined);
        await hdrDev.close().catch(() => undefined);
        held.release();
        status.state = end;
      }
    })();
    rec.reencrypt = { status, abort: ac, ended };
    log.info('online reencryption started', { name, totalBytes: dataBytes });
  } catch (e) {
    lock?.release();
    await dataDev?.close().catch(() => undefined);
    await hdrDev.close().catch(() => undefined);
    throw e;
  }
}

/** Stop the running reencryption of `name` after its current hotzone and wait for it (no-op when none runs). */
export async function stopOnlineReencrypt(p: CoreParts, name: string): Promise<void> {
  const job = p.volumes.find(name)?.reencrypt;
  if (!job) return;
  job.abort.abort();
  await job.ended;
}

/** The mapping of a volume in online reencryption: the luks HotzoneHooks over the daemon's dm verbs. */
class HotzoneMapping {
  readonly #p: CoreParts;
  readonly #name: string;
  readonly #old: CryptMapping;
  readonly #new: CryptMapping;
  readonly #backward: boolean;
  readonly #totalSectors: number;
  /** The hotzone device the top table names now, and the hotzone. */
  #hot: { dev: string; off: number; len: number } | undefined;
  /** Logical bytes in the new layout so far: [0, boundary) forward, [boundary, end) backward. */
  #boundary: number;
  readonly #signal: AbortSignal;
  /** The top device's I/O accounting: client requests (the reencryption's own I/O goes to the storage). */
  readonly #io: DeviceIoStats | undefined;
  /** When the current hotzone began and the client requests completed by then. */
  #since: { t: number; requests: number } | undefined;
  /** Hotzones started, the time spent yielding to clients between them and the time hotzones were suspended. */
  hotzones = 0;
  yieldedMs = 0;
  suspendedMs = 0;
  #suspendedAt = 0;

  constructor(
    p: CoreParts,
    name: string,
    oldM: CryptMapping,
    newM: CryptMapping,
    backward: boolean,
    signal: AbortSignal,
  ) {
    this.#p = p;
    this.#signal = signal;
    this.#io = p.registry.find(name)?.enableIoStats();
    this.#name = name;
    this.#old = oldM;
    this.#new = newM;
    this.#backward = backward;
    this.#totalSectors = oldM.sizeSectors;
    this.#boundary = backward ? oldM.sizeSectors * 512 : 0;
  }

  #oldLine(start: number, len: number): string {
    return segmentLine(this.#old, keyRefArg(this.#old), start, len);
  }
  #newLine(start: number, len: number): string {
    return segmentLine(this.#new, `:${this.#new.keyBytes}:logon:${newKeyDescription(this.#name)}`, start, len);
  }

  /** The top table: new and old parts around [off, off+len), which maps to `hot` (or is left to the sides when absent). */
  #topTable(off: number, len: number, hot?: string): string {
    if (hot === undefined) return mixedTable(this.#name, this.#old, this.#new, off, this.#backward);
    const a = off / 512;
    const b = (off + len) / 512;
    const T = this.#totalSectors;
    const lines: string[] = [];
    const before = (s: number, n: number) => (this.#backward ? this.#oldLine(s, n) : this.#newLine(s, n));
    const after = (s: number, n: number) => (this.#backward ? this.#newLine(s, n) : this.#oldLine(s, n));
    if (a > 0) lines.push(before(0, a));
    lines.push(`${a} ${b - a} linear ${hot} ${a}`);
    if (b < T) lines.push(after(b, T - b));
    return lines.join('\n');
  }

  async #swapTop(table: string): Promise<void> {
    const dm = this.#p.dm;
    // suspend first through the daemon's dm control: it switches the FUSE direct route off before.
    await dm.suspend(this.#name);
    try {
      await dm.load(this.#name, table);
    } finally {
      await dm.resume(this.#name);
    }
  }

  async #removeHot(dev: string): Promise<void> {
    if (this.#p.registry.find(dev)) await this.#p.dm.remove(dev, { force: true });
  }

  #requests(): number {
    const o = this.#io?.ops;
    return o ? o.read.requests + o.write.requests + o.flush.requests + o.discard.requests + o.write_zeroes.requests : 0;
  }

  /** Before a hotzone: pause when clients did I/O during the last one (YIELD_FACTOR); an abort cuts it short. */
  async #yieldToClients(): Promise<void> {
    const s = this.#since;
    if (s !== undefined && (this.#requests() !== s.requests || (this.#io?.inflight ?? 0) > 0)) {
      const t0 = performance.now();
      const ms = Math.min((t0 - s.t) * YIELD_FACTOR, MAX_YIELD_MS);
      await sleep(ms, undefined, { signal: this.#signal }).catch(() => undefined);
      this.yieldedMs += performance.now() - t0;
    }
    this.#since = { t: performance.now(), requests: this.#requests() };
  }

  async start(off: number, len: number): Promise<void> {
    const dm = this.#p.dm;
    await this.#yieldToClients();
    this.hotzones++;
    // The one the top table does not name (a run resumed after a failure may find both left over).
    const names = hotzoneDevices(this.#name);
    const dev = names.find((n) => n !== this.#hot?.dev && !this.#p.registry.find(n)) ?? names[0]!;
    await this.#removeHot(dev);
    await dm.create(dev, {
      table: this.#oldLine(0, this.#totalSectors),
      uuid: `CRYPT-TEMP-${this.#old.uuid.replace(/-/g, '')}-${dev}`,
    });
    await this.#swapTop(this.#topTable(off, len, dev));
    this.#hot = { dev, off, len };
    for (const n of names) if (n !== dev) await this.#removeHot(n);
    // From here the hotzone's I/O waits, and what was in flight to it is done.
    await dm.suspend(dev);
    this.#suspendedAt = performance.now();
  }

  async done(off: number, len: number): Promise<void> {
    const h = this.#hot;
    if (!h || h.off !== off || h.len !== len) throw new CryptmapError('EINVAL', 'hotzone out of order');
    await this.#p.dm.load(h.dev, this.#newLine(0, this.#totalSectors));
    await this.#p.dm.resume(h.dev);
    this.suspendedMs += performance.now() - this.#suspendedAt;
    this.#boundary = this.#backward ? off : off + len;
  }

  /** Finished: one crypt target with the new key under the volume's keyring name. */
  async finish(): Promise<void> {
    const p = this.#p;
    const key = await p.keyring.resolve({
      type: 'logon',
      description: newKeyDescription(this.#name),
      keyBytes: this.#new.keyBytes,
    });
    try {
      p.keyring.set(keyDescription(this.#name), key.expose());
    } finally {
      key.dispose();
    }
    const rec = p.volumes.get(this.#name);
    rec.mapping = this.#new;
    await this.#swapTop(cryptTableLine(this.#new, keyRefArg(this.#new)));
    if (this.#hot) await this.#removeHot(this.#hot.dev);
    this.#hot = undefined;
  }

  /** Stopped between hotzones: the mixed mapping stays, without a hotzone device. */
  async stop(): Promise<void> {
    if (!this.#hot) return;
    await this.#swapTop(this.#topTable(this.#boundary, 0));
    await this.#removeHot(this.#hot.dev);
    this.#hot = undefined;
  }

  /** Failed inside a hotzone: its data is half rewritten, so its I/O fails until the reencryption is resumed. */
  async fail(): Promise<void> {
    const h = this.#hot;
    if (!h) return;
    const dev = this.#p.registry.find(h.dev);
    if (!dev) return;
    if (!dev.suspended) {
      // The failure came after the hotzone was done (a header write): the mapping is right as it is.
      await this.stop();
      return;
    }
    await this.#p.dm.load(h.dev, `0 ${this.#totalSectors} error`);
    await this.#p.dm.resume(h.dev);
  }
}
