/**
 * Online LUKS2 reencryption, encryption and decryption (cryptsetup reencrypt on an active device):
 * the daemon rewrites the data of a volume it serves while NBD and FUSE clients keep reading and
 * writing. The on-disk work is luks/reencrypt.ts (runReencryptWithKeys: cryptsetup's state, so either
 * tool resumes after a crash); this file keeps the mapping right around each hotzone, as cryptsetup
 * does with its overlay and hotzone devices (lib/luks2/luks2_reencrypt.c; read, not copied). The
 * mapping is always the header's live segments (cryptsetup's LUKS2_assembly_multisegment_dmd): each
 * a crypt target with the old or the new volume key, or linear over plaintext (encryption,
 * decryption, the moved part of a data shift):
 *
 *   <name>:           the segments before the hotzone | [off, off+len) linear <name>-hotzone-N | after
 *   <name>-hotzone-N: the whole data as it was mapped before the hotzone, suspended while the hotzone
 *                     is rewritten (its I/O waits; what was in flight has drained), then reloaded with
 *                     the hotzone in the new layout and resumed once the header says it is done.
 *
 * Two hotzone devices take turns, so the next one is ready before the top table stops naming the
 * previous one. Only the hotzone's I/O waits, apart from the moment each top table is swapped in
 * (a suspend that drains what is in flight). At the end the top table is the final segment over the
 * mapping's size (which stays what it was: with a data shift the volume does not grow under its
 * clients): crypt with the new key under the volume's keyring name, or linear after a decryption,
 * and the record's mapping describes it (none after a decryption: a bare linear device, as cryptsetup
 * leaves it). A stop (SIGINT in the CLI, close, daemon shutdown) leaves the mixed mapping without
 * hotzone device; a failure inside a hotzone maps it to `error` (its data is half rewritten: close
 * the volume and open it again, or resume offline, to recover it from the resilience data).
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { type CryptMapping, cryptTableLine, dmUuid, keyDescription } from '../activate/mapping.js';
import { exportIfLive } from './export-sync.js';
import { openBlockDevice } from '../blockdev/open.js';
import type { BlockDevice } from '../blockdev/types.js';
import type { ReencryptStatus } from '../control/protocol.js';
import type { DeviceIoStats } from '../dm/io-stats.js';
import {
  Luks2Volume,
  type MappedSegment,
  openLuks,
  type ReencryptLock,
  reencryptSegments,
  runReencryptWithKeys,
  takeReencryptLock,
  verifyReencryptDigest,
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
  /** What the top table maps while no job runs (opened mid-way, or stopped), and the key sizes. */
  parts?: Part[];
  keyBytes?: KeyBytes;
}

export interface OnlineReencryptOptions {
  hotzoneBytes?: number;
}

/** A part of the mapping: a live segment of the header, or `error` (a hotzone a failure left half rewritten). */
type Part = MappedSegment & { error?: boolean };
/** The sizes of the old and the new volume key (absent: that side is plaintext). */
interface KeyBytes {
  old?: number;
  new?: number;
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

/** The crypt mapping of part `s` (crypt) of volume `base` over logical [0, s.lengthBytes) (the caller places it). */
function partMapping(base: CryptMapping, s: MappedSegment, keyBytes: number): CryptMapping {
  return {
    ...base,
    cipher: s.cipher!,
    keyBytes,
    sectorBytes: s.sectorBytes!,
    ivOffsetSectors: s.ivTweak!,
    offsetSectors: s.offsetBytes / 512,
    sizeSectors: s.lengthBytes / 512,
  };
}

/** The key reference of the old or the new volume key of volume `name`. */
function keyArg(name: string, which: 'old' | 'new', kb: KeyBytes): string {
  const n = which === 'old' ? kb.old : kb.new;
  if (n === undefined) throw new CryptmapError('EINTERNAL', `no ${which} volume key for a crypt segment`);
  return `:${n}:logon:${which === 'old' ? keyDescription(name) : newKeyDescription(name)}`;
}

/**
 * The table of volume `base` mapped as `parts` (in order, covering it whole); the hotzone part maps to
 * device `hotDev` when given (at the same logical offsets), else in its own (new) layout.
 */
export function partsTable(base: CryptMapping, parts: Part[], kb: KeyBytes, hotDev?: string): string {
  return parts
    .map((s) => {
      const a = s.startBytes / 512;
      const n = s.lengthBytes / 512;
      if (s.hot && hotDev !== undefined) return `${a} ${n} linear ${hotDev} ${a}`;
      if (s.error) return `${a} ${n} error`;
      if (s.type === 'linear') return `${a} ${n} linear ${base.device} ${s.offsetBytes / 512}`;
      const which = s.key ?? 'new';
      const line = cryptTableLine(
        partMapping(base, s, (which === 'old' ? kb.old : kb.new) ?? 0),
        keyArg(base.name, which, kb),
      );
      return `${a}${line.slice(1)}`;
    })
    .join('\n');
}

/** Parts as a comparable string (the header's live segments against what is mapped). */
function partsKey(parts: Part[]): string {
  return JSON.stringify(
    parts.map((s) => [
      s.startBytes,
      s.lengthBytes,
      s.type,
      s.offsetBytes,
      s.cipher,
      s.sectorBytes,
      String(s.ivTweak),
      s.key,
    ]),
  );
}

/** The whole volume `m` (crypt, one key) as one part. */
function wholePart(m: CryptMapping, key: 'old' | 'new'): Part {
  return {
    startBytes: 0,
    lengthBytes: m.sizeSectors * 512,
    type: 'crypt',
    offsetBytes: m.offsetSectors * 512,
    cipher: m.cipher,
    sectorBytes: m.sectorBytes,
    ivTweak: m.ivOffsetSectors,
    key,
    isNew: key === 'new',
  };
}

/** Check a volume key against the one the daemon's keyring holds for `desc`. */
async function sameKey(p: CoreParts, desc: string, key: Secret, what: string): Promise<void> {
  const running = await p.keyring.resolve({ type: 'logon', description: desc, keyBytes: key.length });
  try {
    if (!constantTimeEqual(running.expose(), key.expose())) throw refuse(what, 'EKEY');
  } finally {
    running.dispose();
  }
}

/** The LUKS2 header (and the data device, when detached) of volume `m`, checked to be its header. */
async function openHeader(
  m: CryptMapping,
  readOnly: boolean,
): Promise<{ vol: Luks2Volume; hdrDev: BlockDevice; dataDev?: BlockDevice; close(): Promise<void> }> {
  const hdrPath = m.header ?? m.device;
  const hdrDev = await openBlockDevice(hdrPath, { readOnly });
  let dataDev: BlockDevice | undefined;
  try {
    const l = await openLuks(hdrDev);
    if (!(l instanceof Luks2Volume)) throw refuse(`Device ${hdrPath} is not LUKS2.`, 'ENOTLUKS');
    if (l.uuid !== m.uuid) throw refuse(`The header on ${hdrPath} is not the one ${m.name} was opened from.`);
    if (m.header !== undefined) dataDev = await openBlockDevice(m.device, { readOnly });
    const dd = dataDev;
    return {
      vol: l,
      hdrDev,
      ...(dd ? { dataDev: dd } : {}),
      async close() {
        await dd?.close().catch(() => undefined);
        await hdrDev.close().catch(() => undefined);
      },
    };
  } catch (e) {
    await dataDev?.close().catch(() => undefined);
    await hdrDev.close().catch(() => undefined);
    throw e;
  }
}

/** The crypt mapping the record describes while parts are mapped: the old layout's, else the new one's. */
function recordMapping(base: CryptMapping, final: Part, kb: KeyBytes, old?: Part): CryptMapping | undefined {
  if (old?.type === 'crypt') return partMapping(base, { ...old, lengthBytes: base.sizeSectors * 512 }, kb.old!);
  if (final.type === 'crypt') return partMapping(base, { ...final, lengthBytes: base.sizeSectors * 512 }, kb.new!);
  return undefined;
}

/**
 * Activate LUKS2 volume `m` (name, uuid, device, header and activation flags; its other fields are
 * not used) whose header is in the middle of a reencryption, encryption or decryption, stopped
 * between hotzones (cryptsetup 2.6 open of such a device, LUKS2_activate_multi): each live segment of
 * the header is mapped with its key (`oldKey` of the old layout, `newKey` of the new one; a side that
 * is plaintext has none). The keys are checked against the reencryption's digest. The record keeps a
 * stopped reencryption, so that `cryptmap reencrypt --resume-only NAME` continues online and the
 * verbs that rebuild the table are refused until it has finished. Takes copies of the keys.
 */
export async function openMidReencryption(
  p: CoreParts,
  m: CryptMapping,
  oldKey: Secret | undefined,
  newKey: Secret | undefined,
): Promise<void> {
  const name = m.name;
  if (p.registry.find(name))
    throw new CryptmapError('EEXIST', `Device ${name} already exists.`, { exitCode: EXIT_BUSY, errno: 'EEXIST' });
  const h = await openHeader(m, true);
  let parts: Part[];
  let kb: KeyBytes;
  let base: CryptMapping;
  let final: Part;
  let st: Awaited<ReturnType<typeof reencryptSegments>>;
  try {
    st = await reencryptSegments(h.vol, h.dataDev);
    if (st.hotzone)
      throw refuse(`Device ${name} has a reencryption hotzone in progress: it needs recovery first.`, 'EREENCRYPT');
    const { layout } = st;
    const needOld = layout.previous.type === 'crypt';
    const needNew = layout.final.type === 'crypt';
    if (needOld !== (oldKey !== undefined) || needNew !== (newKey !== undefined))
      throw refuse('The volume keys given are not the ones this reencryption needs.', 'EKEY');
    await verifyReencryptDigest(h.vol, {
      ...(oldKey ? { oldKey: oldKey.expose() } : {}),
      ...(newKey ? { newKey: newKey.expose() } : {}),
    });
    parts = st.segments;
    kb = { ...(oldKey ? { old: oldKey.length } : {}), ...(newKey ? { new: newKey.length } : {}) };
    base = { ...m, sizeSectors: st.totalBytes / 512 };
    final = finalPart(layout.final, st.totalBytes, layout.final.type === 'crypt' ? 'new' : undefined);
  } finally {
    await h.close();
  }
  const desc = keyDescription(name);
  if (oldKey) p.keyring.set(desc, oldKey.expose());
  if (newKey) p.keyring.set(newKeyDescription(name), newKey.expose());
  try {
    await p.dm.create(name, { table: partsTable(base, parts, kb), uuid: dmUuid(m), readOnly: m.readOnly });
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
  const mapped = recordMapping(base, final, kb, finalPart(st.layout.previous, st.totalBytes, 'old'));
  if (mapped) rec.mapping = mapped;
  else delete rec.mapping;
  rec.reencrypt = {
    status: { state: 'stopped', doneBytes: st.doneBytes, totalBytes: st.totalBytes },
    abort: new AbortController(),
    ended: Promise.resolve(),
    parts,
    keyBytes: kb,
  };
  log.info('volume opened in reencryption', { name, mode: st.layout.mode, doneBytes: st.doneBytes });
}

/** A backup segment (backup-final, backup-previous) as one part over the mapping's `total` bytes. */
function finalPart(
  fin: { type: string; offset: string; encryption?: string; sector_size?: number; iv_tweak?: string },
  total: number,
  key: 'old' | 'new' | undefined,
): Part {
  const p: Part = {
    startBytes: 0,
    lengthBytes: total,
    type: fin.type === 'crypt' ? 'crypt' : 'linear',
    offsetBytes: Number(fin.offset),
    isNew: true,
  };
  if (fin.type === 'crypt') {
    p.cipher = fin.encryption!;
    p.sectorBytes = (fin.sector_size ?? 512) as MappedSegment['sectorBytes'];
    p.ivTweak = BigInt(fin.iv_tweak ?? '0');
    p.key = key ?? 'new';
  }
  return p;
}

/**
 * Start the reencryption (or encryption, or decryption) of the active LUKS2 volume `name` (its header
 * already in reencryption: the CLI initialised it, or the volume was opened in the middle of one),
 * with its old volume key (absent when encrypting) and its new one (absent when decrypting). What is
 * mapped must be the header's live segments: the volume opened whole before the header was
 * initialised, or opened in the middle. Returns once the job runs; its progress is in the record's
 * `reencrypt` status. Takes copies of the keys.
 */
export async function startOnlineReencrypt(
  p: CoreParts,
  name: string,
  oldKey: Secret | undefined,
  newKey: Secret | undefined,
  o: OnlineReencryptOptions = {},
): Promise<void> {
  const dev = p.registry.find(name);
  const rec = p.volumes.find(name);
  const m = rec?.mapping;
  if (!dev || !rec) throw new CryptmapError('ENODEV', `Device ${name} is not active.`, { exitCode: 4 });
  if (m === undefined || m.type !== 'LUKS2')
    throw refuse(`Device ${name} is not an active LUKS2 volume: online reencryption needs one.`, 'ENOTLUKS');
  const prior = rec.reencrypt;
  if (prior?.status.state === 'running') throw busy(`Reencryption of ${name} is already running.`);
  if (prior?.status.state === 'failed')
    throw refuse(
      `The online reencryption of ${name} failed inside a hotzone; close the volume and open it again (that recovers the hotzone), then resume.`,
      'EREENCRYPT',
    );
  if (dev.suspended) throw refuse(`Volume ${name} is suspended (luksResume it first).`, 'ESUSPENDED');
  if (m.readOnly || dev.readOnly) throw refuse(`Device ${name} is active read-only: it cannot be reencrypted online.`);
  if (m.ivLargeSectors) throw refuse('Online reencryption of a mapping with iv_large_sectors is not supported.');
  if (o.hotzoneBytes !== undefined && (!Number.isSafeInteger(o.hotzoneBytes) || o.hotzoneBytes < 512))
    throw refuse('Invalid hotzone size.', 'EARGS');
  // What is mapped now: the parts of a volume opened (or stopped) in the middle, else the whole old layout.
  const stopped = prior?.parts !== undefined && prior.status.state !== 'finished';
  const kbNow: KeyBytes = stopped ? prior!.keyBytes! : { old: m.keyBytes };
  const now: Part[] = stopped ? prior!.parts! : [wholePart(m, 'old')];
  if (
    (oldKey && kbNow.old !== undefined && oldKey.length !== kbNow.old) ||
    (newKey && kbNow.new !== undefined && newKey.length !== kbNow.new)
  )
    throw refuse('Volume key sizes do not match.', 'EKEY');
  if (now.some((x) => x.key === 'old')) {
    if (!oldKey) throw refuse(`Volume ${name} is mapped with a volume key: the old key is needed.`, 'EKEY');
    await sameKey(
      p,
      keyDescription(name),
      oldKey,
      `The volume key given is not the one active volume ${name} runs with.`,
    );
  }
  if (now.some((x) => x.key === 'new')) {
    if (!newKey) throw refuse('The new volume key is needed.', 'EKEY');
    await sameKey(
      p,
      newKeyDescription(name),
      newKey,
      `The new volume key given is not the one ${name} is mapped with.`,
    );
  }
  const h = await openHeader(m, false);
  let lock: ReencryptLock | undefined;
  try {
    // cryptsetup's reencryption lock, held by the job (luks/reencrypt-lock.ts): busy while cryptsetup runs one.
    lock = takeReencryptLock(h.vol.uuid);
    const st = await reencryptSegments(h.vol, h.dataDev);
    const { layout } = st;
    if (st.hotzone || partsKey(st.segments) !== partsKey(now) || st.totalBytes !== m.sizeSectors * 512)
      throw refuse(`The mapping of ${name} is not what the header of its reencryption describes.`);
    if (
      (layout.previous.type === 'crypt') !== (oldKey !== undefined) ||
      (layout.final.type === 'crypt') !== (newKey !== undefined)
    )
      throw refuse('The volume keys given are not the ones this reencryption needs.', 'EKEY');
    const kb: KeyBytes = { ...(oldKey ? { old: oldKey.length } : {}), ...(newKey ? { new: newKey.length } : {}) };
    const base: CryptMapping = { ...m, sizeSectors: st.totalBytes / 512 };
    const final = finalPart(layout.final, st.totalBytes, 'new');
    if (newKey) p.keyring.set(newKeyDescription(name), newKey.expose());
    const ac = new AbortController();
    const status: ReencryptStatus = { state: 'running', doneBytes: st.doneBytes, totalBytes: st.totalBytes };
    const keys = {
      ...(oldKey ? { oldKey: Buffer.from(oldKey.expose()) } : {}),
      ...(newKey ? { newKey: Buffer.from(newKey.expose()) } : {}),
    };
    const held = lock;
    const hd = h;
    lock = undefined;
    const job: ReencryptJob = { status, abort: ac, ended: Promise.resolve() };
    const run = new HotzoneMapping(p, name, base, kb, now, ac.signal);
    (job as { ended: Promise<void> }).ended = (async () => {
      // The state changes last, once the lock, keys and devices are released: a client that sees
      // 'finished' (the CLI returns on it) finds cryptsetup's lock free and the header closed.
      let end: ReencryptStatus['state'] = 'failed';
      try {
        const finished = await runReencryptWithKeys(hd.vol, keys, {
          ...(hd.dataDev ? { dataDev: hd.dataDev } : {}),
          hotzoneBytes: o.hotzoneBytes ?? ONLINE_HOTZONE_BYTES,
          signal: ac.signal,
          hotzone: run,
          onProgress: (done, total) => {
            // What is left counts (with a data shift the run's total is larger than the mapping).
            status.doneBytes = Math.max(0, st.totalBytes - (total - done));
          },
        });
        const counts = {
          hotzones: run.hotzones,
          yieldedMs: Math.round(run.yieldedMs),
          suspendedMs: Math.round(run.suspendedMs),
        };
        if (finished) {
          await run.finish(final);
          status.doneBytes = st.totalBytes;
          delete job.parts;
          end = 'finished';
          log.info('online reencryption finished', { name, ...counts });
        } else {
          await run.stop();
          job.parts = run.parts;
          job.keyBytes = kb;
          end = 'stopped';
          log.info('online reencryption stopped', { name, doneBytes: status.doneBytes, ...counts });
        }
      } catch (e) {
        await run.fail().catch(() => undefined);
        end = 'failed';
        status.error = isCryptmapError(e) || e instanceof Error ? e.message : String(e);
        log.error('online reencryption failed', { name, error: status.error });
      } finally {
        keys.oldKey?.fill(0);
        keys.newKey?.fill(0);
        if (end !== 'stopped') p.keyring.delete(newKeyDescription(name));
        await hd.close();
        held.release();
        status.state = end;
      }
    })();
    rec.reencrypt = job;
    log.info('online reencryption started', { name, mode: layout.mode, totalBytes: st.totalBytes });
  } catch (e) {
    lock?.release();
    await h.close();
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
  readonly #base: CryptMapping;
  readonly #kb: KeyBytes;
  /** What the top table maps between hotzones (the hotzone, once done, in its new layout). */
  #current: Part[];
  /** The hotzone device the top table names now, the hotzone and the parts while it is rewritten. */
  #hot: { dev: string; off: number; len: number; parts: Part[] } | undefined;
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

  constructor(p: CoreParts, name: string, base: CryptMapping, kb: KeyBytes, current: Part[], signal: AbortSignal) {
    this.#p = p;
    this.#signal = signal;
    this.#io = p.registry.find(name)?.enableIoStats();
    this.#name = name;
    this.#base = base;
    this.#kb = kb;
    this.#current = current;
  }

  /** What the top table maps between hotzones (after a stop: the mixed mapping). */
  get parts(): Part[] {
    return this.#current;
  }

  #table(parts: Part[], hotDev?: string): string {
    return partsTable(this.#base, parts, this.#kb, hotDev);
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

  async start(off: number, len: number, segments: MappedSegment[]): Promise<void> {
    const dm = this.#p.dm;
    const hotPart = segments.find((x) => x.hot);
    if (!hotPart || hotPart.startBytes !== off || hotPart.lengthBytes !== len)
      throw new CryptmapError('EINVAL', 'hotzone segments out of order');
    await this.#yieldToClients();
    this.hotzones++;
    // The one the top table does not name (a run resumed after a failure may find both left over).
    const names = hotzoneDevices(this.#name);
    const dev = names.find((n) => n !== this.#hot?.dev && !this.#p.registry.find(n)) ?? names[0]!;
    await this.#removeHot(dev);
    await dm.create(dev, {
      table: this.#table(this.#current),
      uuid: `CRYPT-TEMP-${this.#base.uuid.replace(/-/g, '')}-${dev}`,
    });
    await this.#swapTop(this.#table(segments, dev));
    this.#hot = { dev, off, len, parts: segments };
    for (const n of names) if (n !== dev) await this.#removeHot(n);
    // From here the hotzone's I/O waits, and what was in flight to it is done.
    await dm.suspend(dev);
    this.#suspendedAt = performance.now();
  }

  async done(off: number, len: number): Promise<void> {
    const h = this.#hot;
    if (!h || h.off !== off || h.len !== len) throw new CryptmapError('EINVAL', 'hotzone out of order');
    const after = h.parts.map((x) => (x.hot ? { ...x, hot: false } : x));
    await this.#p.dm.load(h.dev, this.#table(after));
    await this.#p.dm.resume(h.dev);
    this.suspendedMs += performance.now() - this.#suspendedAt;
    this.#current = after;
  }

  /** Finished: the final segment alone, its key (if any) under the volume's keyring name. */
  async finish(final: Part): Promise<void> {
    const p = this.#p;
    const name = this.#name;
    if (final.type === 'crypt') {
      const key = await p.keyring.resolve({
        type: 'logon',
        description: newKeyDescription(name),
        keyBytes: this.#kb.new!,
      });
      try {
        p.keyring.set(keyDescription(name), key.expose());
      } finally {
        key.dispose();
      }
    }
    const kb: KeyBytes = { ...(this.#kb.new !== undefined ? { old: this.#kb.new } : {}) };
    const whole: Part = { ...final, key: 'old' };
    await this.#swapTop(partsTable(this.#base, [whole], kb));
    const rec = p.volumes.get(name);
    const mapped = recordMapping(this.#base, final, this.#kb);
    if (mapped) rec.mapping = mapped;
    else {
      // Decrypted: a bare linear device, as cryptsetup leaves it; no key stays behind.
      delete rec.mapping;
      p.keyring.delete(keyDescription(name));
    }
    if (this.#hot) await this.#removeHot(this.#hot.dev);
    this.#hot = undefined;
    this.#current = [whole];
  }

  /** Stopped between hotzones: the mixed mapping stays, without a hotzone device. */
  async stop(): Promise<void> {
    if (!this.#hot) return;
    await this.#swapTop(this.#table(this.#current));
    await this.#removeHot(this.#hot.dev);
    this.#hot = undefined;
  }

  /** Failed inside a hotzone: its data is half rewritten, so its I/O fails until the reencryption is recovered. */
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
    await this.#p.dm.load(h.dev, `0 ${this.#base.sizeSectors} error`);
    await this.#p.dm.resume(h.dev);
  }
}
