/**
 * LUKS2 reencryption (cryptsetup reencrypt) with cryptsetup 2.6's on-disk state, so that either tool
 * resumes what the other began. Facts learned from cryptsetup's lib/luks2/luks2_reencrypt.c,
 * luks2_reencrypt_digest.c, luks2_keyslot_reenc.c (read, not copied):
 *
 * - init: a keyslot for the new volume key under its own digest (bound to no segment, its own header
 *   write), two backup segments (`backup-previous`: the old data segment, old digest; `backup-final`:
 *   the new one, new digest), a `reencrypt` keyslot (key_size 1, mode, direction, priority 0, its
 *   `area` the largest free gap of the keyslots area: type checksum|journal|none, checksum with
 *   hash and sector_size = the larger encryption sector size) and a pbkdf2 digest bound only to that
 *   keyslot over the verification blob (below); then one write adding the `online-reencrypt-v2`
 *   mandatory requirement.
 * - verification blob (version v2): 0x76 '2', old key, new key, then the keyslot's mode, direction,
 *   area type, offset (u64 BE), size (u64 BE), [checksum: hash, sector_size (u32 BE)], then the
 *   backup-previous and backup-final segments (type, offset u64, size u64 or "dynamic", iv_tweak u64,
 *   encryption, sector_size u32). Strings without terminators.
 * - one step (forward): "hot" segments: new [0, off), the hotzone [off, off+len) in the new cipher
 *   flagged `in-reencryption` (bound to both digests), old [off+len, end); the backup segments follow
 *   at the next free ids. Read the hotzone's raw ciphertext; checksum: a hash of each sector_size
 *   block of it goes to the keyslot area, journal: the raw bytes themselves; then the header (commit
 *   point). Decrypt old, encrypt new, write, fsync; then the "post" segments new [0, off+len), old
 *   after (commit). `none` writes the header only at the end (or when stopped).
 * - recovery of a crashed hotzone: checksum: a block whose raw bytes still hash to the stored checksum
 *   is old and is reencrypted, any other is already new; journal: the stored raw old ciphertext is
 *   decrypted and written in the new cipher; none: not recoverable.
 * - finish: the old keyslots, the backup segments, the requirement and the reencrypt keyslot go.
 *   cryptmap does this in the same header write as the last post segments (cryptsetup writes the
 *   last post segments, then removes each old keyslot with its own write): no window in which the
 *   header says "reencrypt from the start" over already reencrypted data.
 */
import * as nodeCrypto from 'node:crypto';
import { createHash, randomFillSync } from 'node:crypto';
import type { BlockDevice } from '../blockdev/types.js';
import { createSectorCipher } from '../engine/index.js';
import type { SectorBytes, SectorCipher } from '../engine/types.js';
import { CryptmapError, type ErrorCode, isCryptmapError } from '../util/errors.js';
import { wipeArea } from './keyslot-area.js';
import { FileDevice } from '../blockdev/file.js';
import { MemoryDevice } from '../blockdev/memory.js';
import { type Luks2FormatOptions, Luks2Volume } from './luks2.js';
import { DIGEST_HANDLERS, handlerFor, KEYSLOT_HANDLERS } from './luks2-handlers.js';
import { digestIterations } from './luks2-keyslots.js';
import {
  firstFreeId,
  knownReencryptRequirement,
  type L2Keyslot,
  type L2Segment,
  type Luks2Json,
  reencryptRequirementVersion,
  unmetReencryptRequirement,
} from './luks2-json.js';
import type { NewKeyslotOptions } from './types.js';

/** LUKS2 reencryption resilience modes (cryptsetup --resilience). */
export type Resilience = 'checksum' | 'journal' | 'none' | 'datashift' | 'datashift-checksum' | 'datashift-journal';
export const REENCRYPT_REQUIREMENT = 'online-reencrypt-v2';
const REQ_VERSION = 2;
const MAX_HOTZONE_BYTES = 0x40000000;
const DEFAULT_NONE_HOTZONE_BYTES = 0x1400000;

/** cryptsetup reencrypt --init-only options: the new key, cipher and resilience. */
export interface ReencryptInitOptions extends NewKeyslotOptions {
  /** The keyslot to unlock the old key with (cryptsetup --key-slot); the new keyslot takes the first free one. */
  oldKeySlot?: number;
  /**
   * Passphrases of further keyslots of the old key, by keyslot (cryptsetup asks for every active
   * keyslot's): each gets a keyslot of the new key, so it still opens the volume afterwards. A
   * keyslot of the old key without one is gone when the reencryption finishes, as in cryptsetup.
   */
  morePassphrases?: ReadonlyMap<number, Uint8Array>;
  resilience?: Resilience;
  /** Checksum hash (cryptsetup --resilience-hash), default sha256. */
  resilienceHash?: string;
  cipher?: string;
  keyBytes?: number;
  sectorBytes?: SectorBytes;
  /**
   * cryptsetup reencrypt --reduce-device-size N (no --encrypt): the data moves N bytes up while it is
   * reencrypted (resilience datashift, backward, hotzones of N from the end); the new data offset is the
   * old one plus N and the last N bytes of the data are given up.
   */
  shiftBytes?: number;
}

/** Options of `runReencrypt` (cryptsetup reencrypt --resume-only): data device, progress, cancellation. */
export interface ReencryptRunOptions {
  /** Data device when the header is detached (default: the volume's own device). */
  dataDev?: BlockDevice;
  /** Largest hotzone in bytes (cryptsetup --hotzone-size). */
  hotzoneBytes?: number;
  /** Called at the start and after each hotzone with the bytes done (by earlier runs too) and the total. */
  onProgress?: (doneBytes: number, totalBytes: number) => void;
  /** When aborted, stops cleanly after the current hotzone (resumable). */
  signal?: AbortSignal;
  /** Online reencryption: a live mapping serves the data while it runs (the daemon's hooks). */
  hotzone?: HotzoneHooks;
}

/**
 * What a live mapping of the data does around each hotzone (logical bytes [off, off+len) of the data,
 * in the run's direction), so that clients keep reading and writing the rest (online reencryption).
 */
export interface HotzoneHooks {
  /**
   * Before the hotzone's old data is read: from here until `done`, I/O to it waits and I/O in flight
   * to it has completed; the rest maps to the new layout before the hotzone's side, the old one after.
   */
  start(off: number, len: number, segments: MappedSegment[]): Promise<void>;
  /** The hotzone is written in the new layout and flushed: its I/O goes on, in the new layout. */
  done(off: number, len: number): Promise<void>;
}

/**
 * One part of a mapping of a LUKS2 device in reencryption (cryptsetup 2.6 maps each live segment:
 * LUKS2_assembly_multisegment_dmd): logical bytes [startBytes, startBytes+lengthBytes) of the volume,
 * linear (plaintext) or crypt with the old or the new volume key, its data at `offsetBytes` of the
 * data device. `hot`: the hotzone, in the new layout.
 */
export interface MappedSegment {
  startBytes: number;
  lengthBytes: number;
  type: 'crypt' | 'linear';
  offsetBytes: number;
  /** crypt only: the cipher, its sector size, its first IV (512-byte units) and which volume key. */
  cipher?: string;
  sectorBytes?: SectorBytes;
  ivTweak?: bigint;
  key?: 'old' | 'new';
  /** In the new layout (progress counts these). */
  isNew: boolean;
  hot?: boolean;
}

/** Live segments with their roles as MappedSegments over `totalBytes` ('dynamic' takes the rest). */
function toMapped(live: Array<[L2Segment, Role]>, totalBytes: number): MappedSegment[] {
  const out: MappedSegment[] = [];
  let at = 0;
  for (const [s, role] of live) {
    const len = s.size === 'dynamic' ? totalBytes - at : Number(s.size);
    if (!(len > 0) || len % 512 !== 0 || at + len > totalBytes) fail('Reencryption metadata is invalid.');
    const m: MappedSegment = {
      startBytes: at,
      lengthBytes: len,
      type: s.type === 'crypt' ? 'crypt' : 'linear',
      offsetBytes: Number(s.offset),
      isNew: role !== 'old',
    };
    if (s.type === 'crypt') {
      m.cipher = s.encryption!;
      m.sectorBytes = (s.sector_size ?? 512) as SectorBytes;
      m.ivTweak = BigInt(s.iv_tweak ?? '0');
      m.key = role === 'old' ? 'old' : 'new';
    } else if (s.type !== 'linear') fail('Reencryption metadata is invalid.');
    if (role === 'hot') m.hot = true;
    out.push(m);
    at += len;
  }
  return out;
}

/**
 * The mapping of LUKS2 device `vol` as its reencryption left it on disk (cryptsetup 2.6 activation of
 * a device in reencryption: each live segment with its key; a last 'dynamic' segment reaches the end
 * of the data). `hotzone`: a hotzone is in progress (a crash: recover it first, runReencrypt does);
 * its segment is then flagged `hot`. `doneBytes`: what is in the new layout. `dataDev`: the data
 * device when the header is detached.
 */
export async function reencryptSegments(
  vol: Luks2Volume,
  dataDev?: BlockDevice,
): Promise<{
  layout: ReencryptLayout;
  segments: MappedSegment[];
  totalBytes: number;
  doneBytes: number;
  hotzone: boolean;
}> {
  const j = vol.jsonSnapshot();
  const layout = reencryptLayout(j);
  const { ks } = reencryptKeyslot(j);
  const a = ks.area as Record<string, unknown>;
  const moved = segmentByFlag(j, 'backup-moved-segment');
  // cryptsetup: the data offset is the new segment's, plus the shift while data moves forward.
  let dataBytes = await dataSize(vol, j, dataDev);
  if (String(a.type).startsWith('datashift') && !layout.backward) dataBytes -= Number(a.shift_size);
  const bound = (d: string | undefined, id: string) => d !== undefined && j.digests[d]!.segments.includes(id);
  const live: Array<[L2Segment, Role]> = [];
  let hotzone = false;
  for (const [id, sg] of Object.entries(j.segments).sort((x, y) => Number(x[0]) - Number(y[0]))) {
    if (sg.flags?.some((f) => f.startsWith('backup-'))) continue;
    let role: Role;
    if (sg.flags?.includes('in-reencryption')) {
      role = 'hot';
      hotzone = true;
    } else if (sg.type === 'crypt') {
      const n = bound(layout.newDigest, id);
      const o = bound(layout.oldDigest, id);
      if (n === o) fail('Reencryption metadata is invalid.');
      role = n ? 'new' : 'old';
    } else {
      // Plaintext: the old layout while encrypting (the moved part too), the new one while decrypting.
      role = layout.mode === 'decrypt' ? 'new' : 'old';
    }
    live.push([sg, role]);
  }
  if (live.length === 0) fail('Reencryption metadata is invalid.');
  const fixed = live.every(([sg]) => sg.size !== 'dynamic');
  const total = fixed ? live.reduce((n, [sg]) => n + Number(sg.size), 0) : dataBytes;
  if (total > dataBytes + (moved ? Number(moved[1].size) : 0)) fail('Device is too small.', 'EDEVSIZE');
  const segments = toMapped(live, total);
  const doneBytes = segments.filter((x) => x.isNew && !x.hot).reduce((n, x) => n + x.lengthBytes, 0);
  return { layout, segments, totalBytes: total, doneBytes, hotzone };
}

/** The volume keys a reencryption works with: of the old segment and of the new one (absent for plaintext). */
export interface ReencryptKeys {
  oldKey?: Uint8Array;
  newKey?: Uint8Array;
}

function fail(msg: string, code: ErrorCode = 'EREENCRYPT', exitCode = 1): never {
  throw new CryptmapError(code, msg, { exitCode });
}

/**
 * What a reencryption, decryption or header-exporting decryption starts from (cryptsetup 2.6): no
 * reencryption begun, one crypt data segment, and no integrity profile on it (luks2_reencrypt_eligible:
 * AEAD is not reencrypted). Returns that segment.
 */
function eligibleSegment(j: Luks2Json): L2Segment {
  if (inReencryption(j) || reencryptKeyslotId(j) !== undefined)
    fail('LUKS2 reencryption already initialized. Run --resume-only.', 'EBUSY');
  const seg = j.segments['0'];
  if (seg?.integrity !== undefined) fail('Reencryption of device with integrity profile is not supported.', 'ENOTSUP');
  if (Object.keys(j.segments).length !== 1 || seg?.type !== 'crypt')
    fail('Unsupported LUKS2 segments layout for reencryption.');
  return seg;
}

/** The reencrypt keyslot's id, or undefined. */
export function reencryptKeyslotId(j: Luks2Json): string | undefined {
  return Object.keys(j.keyslots).find((k) => j.keyslots[k]!.type === 'reencrypt');
}

/**
 * True when the metadata carries an online-reencrypt requirement cryptsetup 2.6 knows (a reencryption
 * is in progress; LUKS2_reencrypt_status: a later version is an unknown requirement, not a reencryption).
 */
export function inReencryption(j: Luks2Json): boolean {
  return reencryptRequirementVersion(j) !== undefined;
}

function segmentByFlag(j: Luks2Json, flag: string): [string, L2Segment] | undefined {
  for (const [id, s] of Object.entries(j.segments)) if (s.flags?.includes(flag)) return [id, s];
  return undefined;
}

function digestOfSegment(j: Luks2Json, seg: string): string | undefined {
  return Object.keys(j.digests).find((d) => j.digests[d]!.segments.includes(seg));
}

function digestOfKeyslot(j: Luks2Json, ks: string): string | undefined {
  return Object.keys(j.digests).find((d) => j.digests[d]!.keyslots.includes(ks));
}

// ---- the verification blob (luks2_reencrypt_digest.c) ----

function u64be(v: string): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(v));
  return b;
}
function u32be(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v);
  return b;
}
function str(v: unknown): Buffer {
  if (typeof v !== 'string' || v.length > 64) fail('Reencryption metadata is invalid.');
  return Buffer.from(v, 'latin1');
}
function segmentBlob(s: L2Segment): Buffer[] {
  const size = s.size === 'dynamic' ? Buffer.from('dynamic') : u64be(s.size);
  if (s.type === 'linear') return [str(s.type), u64be(s.offset), size];
  if (s.type !== 'crypt') fail('Reencryption metadata is invalid.');
  return [str(s.type), u64be(s.offset), size, u64be(s.iv_tweak ?? '0'), str(s.encryption), u32be(s.sector_size ?? 512)];
}

/**
 * A key the verification needs was not unlocked (`open --test-passphrase --key-slot N` opens one
 * keyslot only): cryptsetup's -EINVAL (exit 1), which it reports only in its debug output.
 */
function keyNotUnlocked(digest: string): never {
  throw new CryptmapError('EREENCRYPT', '', { exitCode: 1, errno: 'EINVAL', context: { digest } });
}

function verificationBlob(j: Luks2Json, keys: Map<string, Buffer>, version: number): Buffer {
  const ksId = reencryptKeyslotId(j);
  const prev = segmentByFlag(j, 'backup-previous');
  const fin = segmentByFlag(j, 'backup-final');
  if (ksId === undefined || !prev || !fin) fail('Reencryption metadata is invalid.');
  const ks = j.keyslots[ksId]!;
  const area = ks.area as Record<string, unknown>;
  const dOld = digestOfSegment(j, prev[0]);
  const dNew = digestOfSegment(j, fin[0]);
  const parts: Buffer[] = [Buffer.from([0x76, 0x30 + version])];
  if (dOld !== undefined) parts.push(keys.get(dOld) ?? keyNotUnlocked(dOld));
  if (dNew !== undefined && dNew !== dOld) parts.push(keys.get(dNew) ?? keyNotUnlocked(dNew));
  parts.push(str(ks.mode), str(ks.direction), str(area.type), u64be(String(area.offset)), u64be(String(area.size)));
  if (area.type === 'checksum') parts.push(str(area.hash), u32be(Number(area.sector_size)));
  else if (area.type === 'datashift' || area.type === 'datashift-journal') parts.push(u64be(String(area.shift_size)));
  else if (area.type === 'datashift-checksum')
    parts.push(str(area.hash), u32be(Number(area.sector_size)), u64be(String(area.shift_size)));
  else if (area.type !== 'journal' && area.type !== 'none') fail(`Unsupported resilience mode ${String(area.type)}.`);
  parts.push(...segmentBlob(prev[1]), ...segmentBlob(fin[1]));
  const moved = segmentByFlag(j, 'backup-moved-segment');
  if (moved) parts.push(...segmentBlob(moved[1]));
  return Buffer.concat(parts);
}

/**
 * The reencryption metadata of `j` against the digest of its reencrypt keyslot `ksId`, with the volume
 * keys by digest id. A mismatch is cryptsetup's "Reencryption metadata is invalid." with its exit 2
 * (the activation it verifies in fails with EPERM); no digest at all (legacy metadata, or deleted),
 * the same message with -ENOENT, exit 1.
 */
async function checkReencryptDigest(
  j: Luks2Json,
  ksId: string,
  keys: Map<string, Buffer>,
  version: number,
): Promise<void> {
  const blob = verificationBlob(j, keys, version);
  const rd = digestOfKeyslot(j, ksId);
  const d = rd === undefined ? undefined : j.digests[rd];
  const ok = d !== undefined && (await handlerFor(DIGEST_HANDLERS, d.type)?.verify(d, blob)) === true;
  blob.fill(0);
  if (!ok)
    throw new CryptmapError('EREENCRYPT', 'Reencryption metadata is invalid.', {
      exitCode: d === undefined ? 1 : 2,
      errno: d === undefined ? 'ENOENT' : 'EPERM',
    });
}

/** The version of the reencryption requirement (legacy `online-reencrypt` is 1). */
function requirementVersion(j: Luks2Json): number {
  return reencryptRequirementVersion(j) ?? fail('Device is not in reencryption.', 'EINVAL');
}

// ---- init ----

/** Largest gap of the keyslots area (LUKS2_find_area_max_gap). */
function maxGap(j: Luks2Json, hdrBytes: number): { offset: number; size: number } {
  const start = 2 * hdrBytes;
  const end = start + Number(j.config.keyslots_size);
  const used = Object.values(j.keyslots)
    .map((k) => ({ o: Number(k.area.offset), e: Number(k.area.offset) + Number(k.area.size) }))
    .sort((a, b) => a.o - b.o);
  let best = { offset: 0, size: 0 };
  let off = start;
  for (const u of used) {
    if (u.o > off && u.o - off > best.size) best = { offset: off, size: u.o - off };
    off = Math.max(off, u.e);
  }
  if (end > off && end - off > best.size) best = { offset: off, size: end - off };
  return best;
}

/**
 * Put the reencryption of `vol` to a new volume key (cryptsetup reencrypt --init-only) on disk.
 * Returns the new keyslot.
 */
export async function initReencrypt(
  vol: Luks2Volume,
  passphrase: Uint8Array,
  o: ReencryptInitOptions = {},
): Promise<number> {
  vol.assertChangeable();
  const j0 = vol.jsonSnapshot();
  const old = eligibleSegment(j0);
  const oldSector = (old.sector_size ?? 512) as SectorBytes;
  const newSector = o.sectorBytes ?? oldSector;
  const align = Math.max(oldSector, newSector);
  // Every check that needs no new keyslot comes before the new keyslot's own header write.
  const shift = o.shiftBytes ?? 0;
  // cryptsetup 2.6: with a data shift the resilience is datashift whatever --resilience says.
  const area =
    shift > 0
      ? { type: 'datashift', shift_size: String(shift) }
      : checksumArea(o.resilience ?? 'checksum', o.resilienceHash, align);
  if (shift > 0 && shift % align !== 0)
    fail(`Data shift value is not aligned to encryption sector size (${align} bytes).`, 'EARGS');
  const { volumeKey, keyslot: oldSlot } = await vol.unlock(passphrase, { keySlot: o.oldKeySlot });
  const cipher = o.cipher ?? old.encryption!;
  const keyBytes = o.keyBytes ?? volumeKey.length;
  const newVk = randomFillSync(Buffer.alloc(keyBytes));
  const oldVk = Buffer.from(volumeKey.expose());
  volumeKey.dispose();
  try {
    createSectorCipher({ spec: cipher, key: newVk, sectorBytes: newSector }).dispose();
    const dataBytes = await dataSize(vol, j0, undefined);
    if (dataBytes % align !== 0) fail(`Data device is not aligned to encryption sector size (${align} bytes).`);
    const kso = { ...o, keySlot: undefined, morePassphrases: undefined };
    const { keyslot: newSlot, digest: dNew } = await vol.addUnboundKey(newVk, passphrase, kso);
    const added = [newSlot];
    try {
      for (const [slot, pass] of o.morePassphrases ?? []) {
        if (slot === oldSlot) continue;
        // Each passphrase must open its own keyslot of the old key (cryptsetup's init_passphrase).
        const k = await vol.unlock(pass, { keySlot: slot });
        k.volumeKey.dispose();
        added.push((await vol.addUnboundKey(newVk, pass, { ...kso, digest: dNew })).keyslot);
      }
      const j = vol.jsonSnapshot();
      const dOld = digestOfKeyslot(j, String(oldSlot))!;
      const pid = String(firstFreeId(j.segments));
      j.segments[pid] = { ...structuredClone(old), flags: [...(old.flags ?? []), 'backup-previous'] };
      const fid = String(firstFreeId(j.segments));
      j.segments[fid] = {
        type: 'crypt',
        offset: String(Number(old.offset) + shift),
        size: 'dynamic',
        iv_tweak: old.iv_tweak ?? '0',
        encryption: cipher,
        sector_size: newSector,
        flags: ['backup-final'],
      };
      j.digests[dOld]!.segments.push(pid);
      j.digests[dNew]!.segments.push(fid);
      const keys = new Map([
        [dOld, oldVk],
        [dNew, newVk],
      ]);
      const iterations = Number(j.digests[dNew]!.iterations ?? 1000);
      const dir = shift > 0 ? 'backward' : 'forward';
      await addReencryptState(j, vol.metadataBytes, 'reencrypt', dir, area, keys, iterations);
      await vol.commitJson(j);
    } catch (e) {
      // The new keyslots and their digest would stay behind, bound to nothing (cryptsetup rolls its header back too).
      await dropUnbound(vol, added, dNew).catch(() => {});
      throw e;
    }
    return newSlot;
  } finally {
    newVk.fill(0);
    oldVk.fill(0);
  }
}

/** Remove the keyslots `slots` and their digest `d` initReencrypt added, with the keyslots' areas wiped. */
async function dropUnbound(vol: Luks2Volume, slots: readonly number[], d: string): Promise<void> {
  const j = vol.jsonSnapshot();
  const ks = slots.map(String);
  const areas = ks.map((k) => j.keyslots[k]?.area);
  if (areas.some((a) => a === undefined) || !j.digests[d]?.keyslots.every((x) => ks.includes(x))) return;
  for (const k of ks) delete j.keyslots[k];
  delete j.digests[d];
  for (const t of Object.values(j.tokens)) t.keyslots = t.keyslots.filter((x) => !ks.includes(x));
  await vol.commitJson(j);
  for (const a of areas) await wipeArea(vol.metadataDevice, Number(a!.offset), Number(a!.size));
}

/** The first 4096-byte gap of the keyslots area (LUKS2_find_area_gap for datashift's empty area). */
function firstGap(j: Luks2Json, hdrBytes: number): { offset: number; size: number } {
  const end = 2 * hdrBytes + Number(j.config.keyslots_size);
  const used = Object.values(j.keyslots).map(
    (k) => [Number(k.area.offset), Number(k.area.offset) + Number(k.area.size)] as const,
  );
  for (let off = 2 * hdrBytes; off + 4096 <= end; off += 4096) {
    if (!used.some(([a, b]) => off < b && off + 4096 > a)) return { offset: off, size: 4096 };
  }
  fail('Not enough space in the keyslots area for reencryption metadata.', 'ENOSPACE');
}

/** Add the reencrypt keyslot, its verification digest and the requirement to `j` (in memory). */
async function addReencryptState(
  j: Luks2Json,
  hdrBytes: number,
  mode: Mode,
  direction: 'forward' | 'backward',
  area: Record<string, unknown>,
  keys: Map<string, Buffer>,
  iterations: number,
  version = REQ_VERSION,
): Promise<void> {
  const rid = firstFreeId(j.keyslots);
  const gap = area.type === 'datashift' ? firstGap(j, hdrBytes) : maxGap(j, hdrBytes);
  if (gap.size < 4096) fail('Not enough space in the keyslots area for reencryption resilience data.', 'ENOSPACE');
  j.keyslots[String(rid)] = {
    area: { offset: String(gap.offset), size: String(gap.size), ...area },
    type: 'reencrypt',
    key_size: 1,
    mode,
    direction,
    priority: 0,
  } as unknown as L2Keyslot;
  await setReencryptDigest(j, String(rid), keys, version, iterations);
  setReencryptRequirement(j, version);
}

/**
 * A new digest of the reencryption metadata of `j` (version `version`, the volume keys by digest id) for
 * the reencrypt keyslot `ksId`, which leaves any digest it had (LUKS2_keyslot_reencrypt_digest_create).
 */
async function setReencryptDigest(
  j: Luks2Json,
  ksId: string,
  keys: Map<string, Buffer>,
  version: number,
  iterations: number,
): Promise<void> {
  const blob = verificationBlob(j, keys, version);
  try {
    const d = await DIGEST_HANDLERS.pbkdf2!.create(blob, { hash: 'sha256', iterations });
    for (const x of Object.values(j.digests)) x.keyslots = x.keyslots.filter((k) => k !== ksId);
    j.digests[String(firstFreeId(j.digests))] = { ...d, keyslots: [ksId], segments: [] };
  } finally {
    blob.fill(0);
  }
}

/** The online-reencrypt requirement of `j` set to `version` (cryptsetup reencrypt_update_flag: the old one goes, the new one last). */
function setReencryptRequirement(j: Luks2Json, version: number): void {
  const req = j.config.requirements ?? {};
  req.mandatory = [
    ...(req.mandatory ?? []).filter((x) => !knownReencryptRequirement(x)),
    `online-reencrypt-v${version}`,
  ];
  j.config.requirements = req;
}

function checksumArea(resilience: Resilience, hash: string | undefined, blockBytes: number): Record<string, unknown> {
  if (resilience === 'datashift') fail('Resilience mode datashift needs --reduce-device-size.', 'EARGS');
  // cryptsetup: these protect the moved segment of a decryption with the header exported, nothing else.
  if (resilience === 'datashift-checksum' || resilience === 'datashift-journal')
    fail('Failed to initialize LUKS2 reencryption in metadata.', 'EARGS');
  const area: Record<string, unknown> = { type: resilience };
  if (resilience === 'checksum') {
    const h = hash ?? 'sha256';
    try {
      createHash(h);
    } catch {
      fail(`Hash algorithm ${h} is not available.`, 'EARGS');
    }
    area.hash = h;
    area.sector_size = blockBytes;
  }
  return area;
}

/** cryptsetup reencrypt --encrypt options: the new LUKS2 header and where the data moves. */
export interface EncryptInitOptions extends Omit<Luks2FormatOptions, 'detachedHeader' | 'offsetBytes'> {
  /** cryptsetup --reduce-device-size: in-place header; the data moves by half of it (datashift). */
  reduceBytes?: number;
  /** Data offset with a detached header (cryptsetup --offset), default 0. */
  offsetBytes?: number;
  resilience?: Resilience;
  resilienceHash?: string;
}

/**
 * Put the encryption of the plaintext on `dataDev` (cryptsetup reencrypt --encrypt --init-only) on disk
 * and return the LUKS2 volume in reencryption. With `hdrDev` (a detached header) the data stays where
 * it is (forward, checksum|journal|none); without, `reduceBytes` makes room for the header: the
 * first half of it (the shift S) holds the header, the plaintext's first S bytes are copied to the
 * device's end and the data is then encrypted backwards, each block S bytes up (datashift).
 * With both (cryptsetup 2.6 `--header H --reduce-device-size R`), the data stays in place at the
 * data offset too, encrypted backwards in hotzones of R bytes, with resilience datashift (shift R)
 * and no copy of the data anywhere: cryptsetup's format for it has no hotzone protection, so a
 * crash inside a hotzone is not recoverable (resume refuses it, as with resilience none).
 * The header is built in memory and reaches the device in one write after the data copy, so a crash
 * leaves either the untouched plaintext or a header that resumes (no half-formatted state).
 */
export async function initEncrypt(
  dataDev: BlockDevice,
  hdrDev: BlockDevice | undefined,
  passphrase: Uint8Array,
  o: EncryptInitOptions = {},
): Promise<Luks2Volume> {
  const detached = hdrDev !== undefined && hdrDev !== dataDev;
  const meta = o.metadataBytes ?? 0x4000;
  const sector = o.sectorBytes ?? 512;
  let shift = 0;
  let offset: number;
  let keyslots = o.keyslotsBytes;
  if (o.reduceBytes !== undefined && (o.reduceBytes % 512 !== 0 || o.reduceBytes <= 0))
    fail('Device size reduction must be a multiple of 512 bytes.', 'EARGS');
  if (o.reduceBytes !== undefined && detached) {
    // cryptsetup 2.6 (encrypt_luks2_init with --header): the shift is the whole reduction; the
    // header file holds the metadata and a keyslots area of the rest of it; the data stays in place.
    shift = o.reduceBytes;
    if (shift % sector !== 0)
      fail(`Data shift value is not aligned to encryption sector size (${sector} bytes).`, 'EARGS');
    offset = o.offsetBytes ?? 0;
    keyslots ??= shift - 2 * meta;
    if (keyslots <= 0 || 2 * meta + keyslots > shift)
      fail('LUKS2 metadata size is larger than data shift value.', 'EARGS');
  } else if (o.reduceBytes !== undefined) {
    shift = o.reduceBytes / 2;
    if (shift % sector !== 0) fail(`Data shift is not aligned to encryption sector size (${sector} bytes).`, 'EARGS');
    offset = shift;
    keyslots ??= Math.min(Math.floor((shift - 2 * meta) / 4096) * 4096, 0x8000000);
    if (keyslots <= 0 || 2 * meta + keyslots > shift)
      fail('LUKS2 metadata size is larger than data shift value.', 'EARGS');
  } else {
    if (!detached)
      fail(
        'Encryption without detached header (--header) is not possible without data device size reduction (--reduce-device-size).',
        'ENOTSUP',
        1,
      );
    offset = o.offsetBytes ?? 0;
  }
  /** Encryption with data shift in place: the plaintext's head moves to the device's end first. */
  const moves = shift > 0 && !detached;
  const D = dataDev.sizeBytes;
  const plain = moves ? D - 2 * shift : D - offset;
  if (plain <= 0) fail(`Device is too small.`, 'EDEVSIZE');
  if (plain % Math.max(sector, 512) !== 0)
    fail(`Data device is not aligned to encryption sector size (${sector} bytes).`, 'EARGS');
  // The header image, built in memory.
  const hdrBytes = 2 * meta + (keyslots ?? 0x1000000 - 2 * meta);
  const img = new MemoryDevice({ sizeBytes: Math.max(hdrBytes, moves ? shift : 0) });
  const fo: Luks2FormatOptions = { ...o, offsetBytes: offset, detachedHeader: detached, sectorBytes: sector };
  if (keyslots !== undefined) fo.keyslotsBytes = keyslots;
  delete (fo as EncryptInitOptions).reduceBytes;
  delete (fo as EncryptInitOptions).resilience;
  delete (fo as EncryptInitOptions).resilienceHash;
  const mv = await Luks2Volume.format(img, passphrase, fo);
  const { volumeKey } = await mv.unlock(passphrase);
  const vk = Buffer.from(volumeKey.expose());
  volumeKey.dispose();
  try {
    const j = mv.jsonSnapshot();
    const fin: L2Segment = { ...structuredClone(j.segments['0']!), flags: ['backup-final'] };
    const dNew = digestOfSegment(j, '0')!;
    j.digests[dNew]!.segments = [];
    const segs: Record<string, L2Segment> = {};
    let n = 0;
    let mlen = 0;
    if (shift && detached) {
      // cryptsetup: both linear segments sized to the data (not 'dynamic').
      segs[String(n++)] = { type: 'linear', offset: String(offset), size: String(plain) };
      segs[String(n++)] = { type: 'linear', offset: String(offset), size: String(plain), flags: ['backup-previous'] };
    } else if (shift) {
      const P = D - 2 * shift;
      mlen = Math.min(shift, P);
      segs[String(n++)] = { type: 'linear', offset: String(D - shift), size: String(mlen) };
      if (P > shift) segs[String(n++)] = { type: 'linear', offset: String(shift), size: String(P - shift) };
      segs[String(n++)] = {
        type: 'linear',
        offset: String(D - shift),
        size: String(mlen),
        flags: ['backup-moved-segment'],
      };
      segs[String(n++)] = { type: 'linear', offset: '0', size: String(P), flags: ['backup-previous'] };
    } else {
      segs[String(n++)] = { type: 'linear', offset: String(offset), size: 'dynamic' };
      segs[String(n++)] = { type: 'linear', offset: String(offset), size: 'dynamic', flags: ['backup-previous'] };
    }
    const fid = String(n++);
    segs[fid] = fin;
    j.segments = segs;
    j.digests[dNew]!.segments = [fid];
    const area: Record<string, unknown> = shift
      ? { type: 'datashift', shift_size: String(shift) }
      : checksumArea(o.resilience ?? 'checksum', o.resilienceHash, Math.max(sector, 4096));
    await addReencryptState(
      j,
      meta,
      'encrypt',
      shift ? 'backward' : 'forward',
      area,
      new Map([[dNew, vk]]),
      Number(j.digests[dNew]!.iterations ?? 1000),
    );
    await mv.commitJson(j);
    // The plaintext's head goes to the end of the device before the header covers it.
    if (moves) {
      const b = Buffer.alloc(mlen);
      try {
        await dataDev.read(0, b);
        await dataDev.write(D - shift, b);
        await dataDev.flush();
      } finally {
        b.fill(0);
      }
    }
    const target = detached ? hdrDev! : dataDev;
    if (target.sizeBytes < img.sizeBytes)
      fail(`Device is too small. Need at least ${img.sizeBytes} bytes.`, 'EDEVSIZE');
    const whole = Buffer.alloc(img.sizeBytes);
    await img.read(0, whole);
    await target.write(0, whole);
    await target.flush();
    whole.fill(0);
    return await Luks2Volume.open(target);
  } finally {
    vk.fill(0);
    await img.close();
  }
}

/**
 * Put the decryption of `vol` (cryptsetup reencrypt --decrypt --init-only) on disk: LUKS2 with a
 * detached header and data offset 0 only (cryptsetup 2.6's rule), backward, checksum|journal|none.
 */
export async function initDecrypt(
  vol: Luks2Volume,
  passphrase: Uint8Array,
  o: {
    keySlot?: number;
    resilience?: Resilience;
    resilienceHash?: string;
    dataDev?: BlockDevice;
    /** cryptsetup --reduce-device-size: the plaintext ends up this many bytes further up (datashift). */
    shiftBytes?: number;
  } = {},
): Promise<void> {
  vol.assertChangeable();
  const j = vol.jsonSnapshot();
  const old = eligibleSegment(j);
  if (o.dataDev === undefined || o.dataDev === vol.metadataDevice || Number(old.offset) !== 0) {
    fail('LUKS2 decryption is supported with detached header device only (with data offset set to 0).', 'ENOTSUP');
  }
  const { volumeKey } = await vol.unlock(passphrase, { keySlot: o.keySlot });
  const vk = Buffer.from(volumeKey.expose());
  volumeKey.dispose();
  try {
    const ss = old.sector_size ?? 512;
    if (o.dataDev.sizeBytes % ss !== 0) fail(`Data device is not aligned to encryption sector size (${ss} bytes).`);
    const shift = o.shiftBytes ?? 0;
    if (shift % ss !== 0) fail(`Data shift value is not aligned to encryption sector size (${ss} bytes).`, 'EARGS');
    const dOld = digestOfSegment(j, '0')!;
    j.segments['1'] = { ...structuredClone(old), flags: [...(old.flags ?? []), 'backup-previous'] };
    const newOffset = String(Number(old.offset) + shift);
    j.segments['2'] = { type: 'linear', offset: newOffset, size: 'dynamic', flags: ['backup-final'] };
    j.digests[dOld]!.segments = ['0', '1'];
    const area =
      shift > 0
        ? { type: 'datashift', shift_size: String(shift) }
        : checksumArea(o.resilience ?? 'checksum', o.resilienceHash, Math.max(ss, 4096));
    await addReencryptState(
      j,
      vol.metadataBytes,
      'decrypt',
      'backward',
      area,
      new Map([[dOld, vk]]),
      Number(j.digests[dOld]!.iterations ?? 1000),
    );
    await vol.commitJson(j);
  } finally {
    vk.fill(0);
  }
}

/** cryptsetup 2.6's requirement version for a decryption with the header exported (LUKS2_DECRYPT_DATASHIFT_REQ_VERSION). */
const DECRYPT_DATASHIFT_REQ_VERSION = 3;
/** cryptsetup's default length of the moved segment (LUKS2_DEFAULT_NONE_REENCRYPTION_LENGTH, 20 MiB). */
const DEFAULT_MOVED_BYTES = 0x1400000;

/** Options of `initDecryptExport` (cryptsetup reencrypt --decrypt --header NEW-FILE). */
export interface DecryptExportOptions {
  keySlot?: number;
  /** How the moved part (decrypted in place last) is protected; default datashift-checksum. */
  resilience?: 'datashift-checksum' | 'datashift-journal';
  resilienceHash?: string;
  /** Length of the moved part (cryptsetup --hotzone-size), at most the data offset; default min(offset, 20 MiB). */
  movedBytes?: number;
}

/**
 * Put the decryption of the LUKS2 device `dev` whose header is in place (cryptsetup 2.6 `reencrypt
 * --decrypt --header H DEV` with H not existing yet: decrypt_luks2_datashift_init) on disk; returns
 * the volume of the exported header on `hdr`. Facts from cryptsetup's luks2_reencrypt.c: the header
 * and keyslots area are copied to H first (a header backup), the LUKS signatures on the device go,
 * the first M bytes of ciphertext (the moved segment, M at most the data offset) are copied to the
 * device's start, and only then H gets the reencryption metadata (requirement online-reencrypt-v3,
 * resilience datashift-checksum|journal with shift_size = the data offset, mode decrypt, forward).
 * The data is then decrypted forward, each hotzone (the shift long) written the shift lower; the
 * moved part is decrypted in place last, under checksums or a journal. Until H's write the data is
 * untouched past the old header area, and H holds the original header (luksHeaderRestore).
 * On a failure before that write the device's header area is put back.
 */
export async function initDecryptExport(
  dev: BlockDevice,
  hdr: BlockDevice,
  passphrase: Uint8Array,
  o: DecryptExportOptions = {},
): Promise<Luks2Volume> {
  const vol = await Luks2Volume.open(dev);
  vol.assertChangeable();
  const j = vol.jsonSnapshot();
  const old = eligibleSegment(j);
  const shift = Number(old.offset);
  if (!(shift > 0)) fail('Reencryption metadata is invalid.', 'EINVAL');
  if (o.movedBytes !== undefined && o.movedBytes > shift)
    fail('Moved segment size can not be greater than data shift value.', 'EARGS');
  const ss = old.sector_size ?? 512;
  const dataBytes = dev.sizeBytes - shift;
  if (!(dataBytes > 0)) fail(`Device is too small.`, 'EDEVSIZE');
  if (dataBytes % ss !== 0) fail(`Data device is not aligned to encryption sector size (${ss} bytes).`);
  const M = Math.min(o.movedBytes ?? Math.min(shift, DEFAULT_MOVED_BYTES), dataBytes);
  if (M % ss !== 0) fail(`Hotzone size must be multiple of calculated zone alignment (${ss} bytes).`, 'EARGS');
  const resilience = o.resilience ?? 'datashift-checksum';
  const align = Math.max(ss, 4096);
  const area: Record<string, unknown> = { type: resilience };
  if (resilience === 'datashift-checksum') {
    const h = o.resilienceHash ?? 'sha256';
    try {
      createHash(h);
    } catch {
      fail(`Hash algorithm ${h} is not available.`, 'EARGS');
    }
    area.hash = h;
    area.sector_size = align;
  }
  area.shift_size = String(shift);
  const { volumeKey } = await vol.unlock(passphrase, { keySlot: o.keySlot });
  const vk = Buffer.from(volumeKey.expose());
  volumeKey.dispose();
  const hdrBytes = vol.headerBytes;
  const backup = Buffer.alloc(hdrBytes);
  let touched = false;
  try {
    if (hdr.sizeBytes < hdrBytes) fail(`Device is too small. Need at least ${hdrBytes} bytes.`, 'EDEVSIZE');
    const dOld = digestOfSegment(j, '0')!;
    const moved: L2Segment = {
      type: 'crypt',
      offset: '0',
      size: String(M),
      iv_tweak: old.iv_tweak ?? '0',
      encryption: old.encryption,
      sector_size: ss,
    };
    const segs: Record<string, L2Segment> = { '0': moved };
    let n = 1;
    if (dataBytes > M)
      segs[String(n++)] = {
        type: 'crypt',
        offset: String(shift + M),
        size: 'dynamic',
        iv_tweak: String(BigInt(old.iv_tweak ?? '0') + BigInt(M / 512)),
        encryption: old.encryption,
        sector_size: ss,
      };
    const live = n;
    segs[String(n++)] = { ...structuredClone(moved), flags: ['backup-moved-segment'] };
    segs[String(n++)] = { ...structuredClone(old), flags: ['backup-previous'] };
    segs[String(n++)] = { type: 'linear', offset: '0', size: 'dynamic', flags: ['backup-final'] };
    j.segments = segs;
    j.digests[dOld]!.segments = Array.from({ length: live + 2 }, (_, i) => String(i));
    await addReencryptState(
      j,
      vol.metadataBytes,
      'decrypt',
      'forward',
      area,
      new Map([[dOld, vk]]),
      Number(j.digests[dOld]!.iterations ?? 1000),
      DECRYPT_DATASHIFT_REQ_VERSION,
    );
    const ks = j.keyslots[reencryptKeyslotId(j)!]!.area as unknown as Record<string, unknown>;
    const room =
      resilience === 'datashift-checksum'
        ? Math.floor(Number(ks.size) / hashBytes(String(area.hash))) * align
        : Number(ks.size);
    if (M > room) fail(`Moved segment too large. Requested size ${M}, available space for: ${room}.`);
    // The header backup: cryptsetup's luksHeaderBackup of the device, to H.
    await dev.read(0, backup);
    await hdr.write(0, backup);
    await hdr.flush();
    // The LUKS signatures of both header copies go (cryptsetup wipes the device's signatures with blkid).
    touched = true;
    const zero = Buffer.alloc(8);
    await dev.write(0, zero);
    await dev.write(vol.metadataBytes, zero);
    // The moved segment: the ciphertext's first M bytes to the device's start (inside the old header area).
    const b = Buffer.alloc(M);
    try {
      await dev.read(shift, b);
      await dev.write(0, b);
      await dev.flush();
    } finally {
      b.fill(0);
    }
    const hv = await Luks2Volume.open(hdr);
    await hv.commitJson(j);
    touched = false;
    return hv;
  } catch (e) {
    // Not begun after all: the device's header area as it was (cryptsetup restores the header).
    if (touched && !(isCryptmapError(e) && e.code === 'EFAULT_CRASH')) {
      await dev.write(0, backup).catch(() => {});
      await dev.flush().catch(() => {});
    }
    throw e;
  } finally {
    vk.fill(0);
    backup.fill(0);
  }
}

/**
 * The header export of `reencrypt --decrypt --header H DEV` from its start to the reencryption on disk:
 * H (the path `headerFile`, which must not exist) is created for the device's header and keyslots
 * (FileDevice.createNew: exclusively, 0600, in a directory no other user can rewrite; a refusal of
 * the directory is thrown as it is, any other failure to create it is "Cannot create header file H: ...",
 * exit 1), then initDecryptExport runs on it with `passphrase` and `o`. Everything is written through
 * the descriptor that created H, never by its path again. On a failure H is removed (only while the
 * path still names the file made here) and the device keeps its header (initDecryptExport's promise).
 * On success the caller owns `hdr` (close it) and runs the decryption on `vol`.
 * @example const { vol, hdr } = await initDecryptExportFile(dev, '/root/hdr', pass, { resilience });
 */
export async function initDecryptExportFile(
  dev: BlockDevice,
  headerFile: string,
  passphrase: Uint8Array,
  o: DecryptExportOptions = {},
): Promise<{ vol: Luks2Volume; hdr: FileDevice }> {
  const vol = await Luks2Volume.open(dev);
  const hdrBytes = vol.headerBytes;
  const hdr = await FileDevice.createNew(headerFile, hdrBytes).catch((e: unknown) => {
    if (isCryptmapError(e) && e.code === 'EUNTRUSTED_PATH') throw e;
    const why = e instanceof Error && e.cause instanceof Error ? e.cause.message : String(e);
    throw new CryptmapError('EIO', `Cannot create header file ${headerFile}: ${why}`, {
      exitCode: 1,
      cause: e,
    });
  });
  try {
    return { vol: await initDecryptExport(dev, hdr, passphrase, o), hdr };
  } catch (e) {
    await hdr.discardCreated().catch(() => {});
    throw e;
  }
}

// ---- run / resume ----

async function dataSize(vol: Luks2Volume, j: Luks2Json, dataDev: BlockDevice | undefined): Promise<number> {
  const fin = segmentByFlag(j, 'backup-final')?.[1] ?? j.segments['0']!;
  const off = Number(fin.offset);
  const dev = dataDev ?? vol.metadataDevice;
  if (dev.sizeBytes <= off) fail('Device is too small.', 'EDEVSIZE');
  return dev.sizeBytes - off;
}

type Mode = 'reencrypt' | 'encrypt' | 'decrypt';

interface Ctx {
  j: Luks2Json;
  ksId: string;
  mode: Mode;
  backward: boolean;
  area: { offset: number; size: number; type: Resilience; hash?: string; blockBytes: number; shift: number };
  /** Device offset of logical byte 0 in the new layout and in the old one (they differ by the shift). */
  newOff: number;
  oldOff: number;
  newIv: bigint;
  oldIv: bigint;
  /** Logical bytes to go through (cryptsetup's device_size). */
  total: number;
  prev: L2Segment;
  fin: L2Segment;
  /** Encryption with data shift: the first part of the plaintext, moved to the device's end at init. */
  moved?: L2Segment;
  /**
   * Decryption with the header exported (datashift-checksum|journal): the first part of the
   * ciphertext, moved to the device's start at init; decrypted in place last, under `movedType`.
   */
  decMoved?: L2Segment;
  movedType?: 'checksum' | 'journal';
  dOld?: string;
  dNew?: string;
  /** Undefined: that side is plaintext (linear). */
  oldC?: SectorCipher;
  newC?: SectorCipher;
}

/**
 * The key of one luks2 keyslot if the passphrase opens it and digest `d` verifies it (a wrong
 * passphrase or key: undefined); out of memory and I/O errors are thrown.
 */
async function openVerified(
  vol: Luks2Volume,
  j: Luks2Json,
  ks: Luks2Json['keyslots'][string],
  d: string,
  passphrase: Uint8Array,
): Promise<Buffer | undefined> {
  let vk: Buffer;
  try {
    vk = await KEYSLOT_HANDLERS.luks2!.open!(vol.metadataDevice, ks, passphrase);
  } catch (e) {
    if (isCryptmapError(e) && (e.code === 'ENOMEM' || e.code === 'EIO')) throw e;
    return undefined;
  }
  const dg = j.digests[d]!;
  if ((await handlerFor(DIGEST_HANDLERS, dg.type)?.verify(dg, vk)) === true) return vk;
  vk.fill(0);
  return undefined;
}

/**
 * The keys of the digests `want` (the old one first) that `passphrase` opens, each looked for as
 * cryptsetup 2.6 looks for it (LUKS2_keyslot_open_all_segments: keyslots of that digest by priority):
 * one it does not open is cryptsetup's error for it, "No key available with this passphrase." (exit 2)
 * or "No usable keyslot is available." (exit 1), as the last keyslot tried answers.
 */
async function unlockAll(vol: Luks2Volume, passphrase: Uint8Array, want: string[]): Promise<Map<string, Buffer>> {
  const keys = new Map<string, Buffer>();
  try {
    for (const d of want) {
      if (keys.has(d)) continue;
      const { volumeKey } = await vol.unlock(passphrase, { digest: d });
      keys.set(d, Buffer.from(volumeKey.expose()));
      volumeKey.dispose();
    }
  } catch (e) {
    for (const k of keys.values()) k.fill(0);
    throw e;
  }
  return keys;
}

/** A segment like `like` (crypt with its encryption, or linear) with data at `base` + off and IVs from `iv` + off/512. */
function segLike(like: L2Segment, base: number, iv: bigint, off: number, size: number | 'dynamic'): L2Segment {
  return like.type === 'crypt'
    ? {
        type: 'crypt',
        offset: String(base + off),
        size: String(size),
        iv_tweak: String(iv + BigInt(off / 512)),
        encryption: like.encryption,
        sector_size: like.sector_size ?? 512,
      }
    : { type: 'linear', offset: String(base + off), size: String(size) };
}

/** A segment of the new layout covering logical [off, off+size). */
function newSeg(c: Ctx, off: number, size: number | 'dynamic', flags?: string[]): L2Segment {
  const s = segLike(c.fin, c.newOff, c.newIv, off, size);
  if (flags) s.flags = flags;
  return s;
}

/** A segment of the old layout covering logical [off, off+size). */
function oldSeg(c: Ctx, off: number, size: number | 'dynamic'): L2Segment {
  return segLike(c.prev, c.oldOff, c.oldIv, off, size);
}

type Role = 'old' | 'new' | 'hot';

/** Install live segments (with their roles) plus the backup segments, and bind the digests as cryptsetup does. */
function setSegments(c: Ctx, live: Array<[L2Segment, Role]>): void {
  const j = c.j;
  for (const d of Object.values(j.digests)) d.segments = [];
  const bind = (d: string | undefined, id: string) => {
    if (d !== undefined) j.digests[d]!.segments.push(id);
  };
  const segs: Record<string, L2Segment> = {};
  let n = 0;
  for (const [s, role] of live) {
    const id = String(n++);
    segs[id] = s;
    if (s.type !== 'crypt') continue;
    if (role === 'new') bind(c.dNew, id);
    else if (role === 'old') bind(c.dOld, id);
    else {
      bind(c.dNew, id);
      if (c.mode === 'reencrypt') bind(c.dOld, id);
    }
  }
  const backups: Array<[L2Segment, string | undefined]> = [
    [c.prev, c.dOld],
    [c.fin, c.dNew],
  ];
  if (c.moved) backups.push([c.moved, c.dOld]);
  if (c.decMoved) backups.push([c.decMoved, c.dOld]);
  for (const [s, d] of backups) {
    const id = String(n++);
    segs[id] = structuredClone(s);
    if (s.type === 'crypt') bind(d, id);
  }
  j.segments = segs;
}

/** The size of a live mapping: the plaintext with data shift (its segments are all fixed), else the data. */
function mappedTotal(c: Ctx): number {
  return c.moved ? shiftPlainBytes(c) : c.total;
}

/** Plaintext bytes (encryption with data shift): the logical size less the shift. */
function shiftPlainBytes(c: Ctx): number {
  return Number(c.prev.size);
}

/** The segments while hotzone [off, off+len) is rewritten. */
function hotSegments(c: Ctx, off: number, len: number): void {
  setSegments(c, hotLive(c, off, len));
}

/** The live segments (with their roles) while hotzone [off, off+len) is rewritten. */
function hotLive(c: Ctx, off: number, len: number): Array<[L2Segment, Role]> {
  const live: Array<[L2Segment, Role]> = [];
  if (c.decMoved) {
    // Decryption with the header exported (forward): the moved ciphertext, the plaintext after it,
    // the hotzone, the rest of the ciphertext; last the moved part itself in place (offset 0).
    const M = Number(c.decMoved.size);
    if (off === 0) {
      live.push([newSeg(c, 0, len, ['in-reencryption']), 'hot']);
      if (c.total > M) live.push([newSeg(c, M, 'dynamic'), 'new']);
      return live;
    }
    live.push([stripBackup(c.decMoved), 'old']);
    if (off > M) live.push([newSeg(c, M, off - M), 'new']);
    live.push([newSeg(c, off, len, ['in-reencryption']), 'hot']);
    if (off + len < c.total) live.push([oldSeg(c, off + len, 'dynamic'), 'old']);
    return live;
  }
  if (c.moved) {
    // Encryption with data shift (backward): moved part, rest of the plaintext, hotzone, encrypted part.
    const S = c.area.shift;
    const P = shiftPlainBytes(c);
    if (off > 0) {
      live.push([structuredClone(stripBackup(c.moved)), 'old']);
      if (off > S) live.push([oldSeg(c, S, off - S), 'old']);
    }
    live.push([newSeg(c, off, len, ['in-reencryption']), 'hot']);
    if (P > off + len) live.push([newSeg(c, off + len, P - off - len), 'new']);
  } else if (!c.backward) {
    if (off > 0) live.push([newSeg(c, 0, off), 'new']);
    live.push([newSeg(c, off, len, ['in-reencryption']), 'hot']);
    if (off + len < c.total) live.push([oldSeg(c, off + len, 'dynamic'), 'old']);
  } else {
    if (off > 0) live.push([oldSeg(c, 0, off), 'old']);
    live.push([newSeg(c, off, len, ['in-reencryption']), 'hot']);
    if (off + len < c.total) live.push([newSeg(c, off + len, 'dynamic'), 'new']);
  }
  return live;
}

/** The segments once hotzone [off, off+len) is done (never called for the last one: finish() writes that). */
function postSegments(c: Ctx, off: number, len: number): void {
  const live: Array<[L2Segment, Role]> = [];
  if (c.decMoved) {
    const M = Number(c.decMoved.size);
    const rest = off + len < c.total;
    live.push([stripBackup(c.decMoved), 'old']);
    live.push([newSeg(c, M, rest ? off + len - M : 'dynamic'), 'new']);
    if (rest) live.push([oldSeg(c, off + len, 'dynamic'), 'old']);
  } else if (c.moved) {
    const S = c.area.shift;
    live.push([structuredClone(stripBackup(c.moved)), 'old']);
    if (off > S) live.push([oldSeg(c, S, off - S), 'old']);
    live.push([newSeg(c, off, shiftPlainBytes(c) - off), 'new']);
  } else if (!c.backward) {
    live.push([newSeg(c, 0, off + len), 'new']);
    live.push([oldSeg(c, off + len, 'dynamic'), 'old']);
  } else {
    live.push([oldSeg(c, 0, off), 'old']);
    live.push([newSeg(c, off, 'dynamic'), 'new']);
  }
  setSegments(c, live);
}

function stripBackup(s: L2Segment): L2Segment {
  const t = structuredClone(s);
  t.flags = (t.flags ?? []).filter((f) => !f.startsWith('backup-'));
  if (t.flags.length === 0) delete t.flags;
  return t;
}

async function readFull(dev: BlockDevice, off: number, len: number): Promise<Buffer> {
  const b = Buffer.alloc(len);
  await dev.read(off, b);
  return b;
}

/**
 * Online, a checksum hotzone up to this long is held in memory whole: read and hashed before its I/O
 * stops, read again once it has, and rewritten from memory (the run loop says why).
 */
const PREHASH_MAX_BYTES = 64 << 20;

/** Bytes one pipelined step of a hotzone moves; `STEP_DEPTH` steps are in flight at once. */
const STEP_BYTES = 4 << 20;
const STEP_DEPTH = 3;

/** The buffers for `inSteps` (fewer and shorter for a short hotzone). */
function stepBuffers(maxLen: number): Buffer[] {
  const n = Math.min(STEP_DEPTH, Math.ceil(maxLen / STEP_BYTES));
  return Array.from({ length: Math.max(n, 1) }, () => Buffer.alloc(Math.min(STEP_BYTES, maxLen)));
}

/**
 * Run `job(pos, b)` over [0, len) in steps of a buffer's length (each a multiple of every sector and
 * checksum block size: they are powers of two up to 4096, STEP_BYTES is 4 MiB), one step in flight per
 * buffer, so the reads, the cipher (on the crypt pool) and the writes of different steps overlap. A
 * failure stops further steps; this returns only once every started step has settled.
 */
async function inSteps(len: number, bufs: Buffer[], job: (pos: number, b: Buffer) => Promise<void>): Promise<void> {
  let next = 0;
  let failed = false;
  const lane = async (buf: Buffer): Promise<void> => {
    while (!failed && next < len) {
      const pos = next;
      const n = Math.min(buf.length, len - pos);
      next += n;
      try {
        await job(pos, buf.subarray(0, n));
      } catch (e) {
        failed = true;
        throw e;
      }
    }
  };
  const r = await Promise.allSettled(bufs.map(lane));
  for (const x of r) if (x.status === 'rejected') throw x.reason;
}

type OneShotHash = (alg: string, data: Uint8Array, enc: 'buffer') => Buffer;
/** crypto.hash (Node >= 20.12): one call per block, no Hash object (Hash objects were 40% of the time). */
const hashOnce: OneShotHash =
  (nodeCrypto as { hash?: OneShotHash }).hash ?? ((alg, data) => createHash(alg).update(data).digest());

function hashBytes(alg: string): number {
  return hashOnce(alg, Buffer.alloc(0), 'buffer').length;
}

/** The checksum of each `block`-byte block of `raw`, written into `out` from `at`. */
function blockSums(alg: string, raw: Buffer, block: number, out: Buffer, at: number): void {
  for (let o = 0, p = at; o < raw.length; o += block)
    p += hashOnce(alg, raw.subarray(o, o + block), 'buffer').copy(out, p);
}

/**
 * Bytes hashed between two turns of the event loop in `blockSumsYielding`: the hashes run on the main
 * thread (~6 us per 4 KiB block with SHA-NI on a loaded machine), and a 4 MiB step in one go kept the
 * clients of an online reencryption from their replies for ~25 ms.
 */
const HASH_SLICE_BYTES = 256 << 10;

/** `blockSums` in slices of HASH_SLICE_BYTES, letting other work (clients' requests) run between them. */
async function blockSumsYielding(alg: string, raw: Buffer, block: number, out: Buffer, at: number): Promise<void> {
  const hs = hashBytes(alg);
  for (let o = 0; o < raw.length; o += HASH_SLICE_BYTES) {
    if (o > 0) await new Promise<void>((r) => setImmediate(r));
    blockSums(alg, raw.subarray(o, o + HASH_SLICE_BYTES), block, out, at + (o / block) * hs);
  }
}

/** Old ciphertext (or plaintext) of logical bytes at `off` to the new form, in place. */
async function transform(c: Ctx, b: Buffer, off: number): Promise<void> {
  if (c.oldC) await c.oldC.decryptAsync(b, c.oldIv + BigInt(off / 512));
  if (c.newC) await c.newC.encryptAsync(b, c.newIv + BigInt(off / 512));
}

/** Where the old data of logical [off, ...) lies now (the moved part for offset 0 with data shift). */
function sourceOffset(c: Ctx, off: number): number {
  if (c.moved && off === 0) return Number(c.moved.offset);
  if (c.decMoved && off === 0) return Number(c.decMoved.offset);
  return c.oldOff + off;
}

/** Finish a hotzone the header says was in progress (reencrypt_recover_segment). */
/** The resilience of hotzone [off, ...): the moved part's own (checksum|journal) for a decryption with the header exported. */
function zoneType(c: Ctx, off: number): Resilience {
  if (c.decMoved) return off === 0 ? c.movedType! : 'datashift';
  return c.area.type;
}

async function recover(c: Ctx, meta: BlockDevice, data: BlockDevice, off: number, len: number): Promise<void> {
  const zt = zoneType(c, off);
  if (zt === 'checksum') {
    const hs = hashBytes(c.area.hash!);
    const count = Math.ceil(len / c.area.blockBytes);
    if (count * hs > c.area.size) fail('Reencryption metadata is invalid.');
    const sums = await readFull(meta, c.area.offset, count * hs);
    const raw = await readFull(data, c.newOff + off, len);
    const now = Buffer.alloc(count * hs);
    blockSums(c.area.hash!, raw, c.area.blockBytes, now, 0);
    for (let i = 0; i < count; i++) {
      if (!now.subarray(i * hs, (i + 1) * hs).equals(sums.subarray(i * hs, (i + 1) * hs))) continue;
      const b = raw.subarray(i * c.area.blockBytes, (i + 1) * c.area.blockBytes);
      await transform(c, b, off + i * c.area.blockBytes);
      await data.write(c.newOff + off + i * c.area.blockBytes, b);
    }
    raw.fill(0);
  } else if (zt === 'journal') {
    if (len > c.area.size) fail('Reencryption metadata is invalid.');
    const b = await readFull(meta, c.area.offset, len);
    await transform(c, b, off);
    await data.write(c.newOff + off, b);
    b.fill(0);
  } else if (zt === 'datashift' && !c.moved && c.newOff === c.oldOff) {
    // In place (detached header, cryptsetup's --header --reduce-device-size): the hotzone was being
    // rewritten over its only copy, and the metadata keeps nothing of it.
    fail(
      'Reencryption was interrupted inside a hotzone with resilience datashift and the data in place (detached header): the hotzone cannot be recovered.',
    );
  } else if (zt === 'datashift') {
    // The source is intact: every hotzone is at most the shift long, so its write never reaches it
    // (encryption with the head moved, or reencryption moving the data up by the shift).
    const b = await readFull(data, sourceOffset(c, off), len);
    await transform(c, b, off);
    await data.write(c.newOff + off, b);
    b.fill(0);
  } else {
    fail('Reencryption was interrupted with resilience none: the hotzone cannot be recovered.');
  }
  await data.flush();
}

function hotzoneLength(c: Ctx, max: number | undefined): number {
  const align =
    c.area.type === 'checksum' ? c.area.blockBytes : Math.max(c.prev.sector_size ?? 512, c.fin.sector_size ?? 512);
  if (max !== undefined && max % align !== 0)
    fail(`Hotzone size must be multiple of calculated zone alignment (${align} bytes).`, 'EARGS');
  let len: number;
  if (c.area.type.startsWith('datashift')) return c.area.shift; // cryptsetup: the hotzone is the shift, whatever --hotzone-size says
  if (c.area.type === 'none') len = max ?? DEFAULT_NONE_HOTZONE_BYTES;
  else if (c.area.type === 'checksum')
    len = Math.floor(c.area.size / createHash(c.area.hash!).digest().length) * c.area.blockBytes;
  else len = c.area.size;
  len = Math.min(len, MAX_HOTZONE_BYTES);
  if (max !== undefined) len = Math.min(len, max);
  len -= len % align;
  if (len < 512) fail('Invalid reencryption hotzone length.');
  return len;
}

/** Is this live segment (no hotzone) of the new layout? */
function isNew(c: Ctx, id: string, s: L2Segment): boolean {
  if (s.type !== 'crypt') return c.mode === 'decrypt';
  if (c.mode !== 'reencrypt') return c.mode === 'encrypt';
  return (
    c.dNew !== undefined &&
    c.j.digests[c.dNew]!.segments.includes(id) &&
    !(c.dOld !== undefined && c.j.digests[c.dOld]!.segments.includes(id))
  );
}

/**
 * The next hotzone, from the live segments (no hotzone in progress): [off, off+len), or null when the
 * data is all in the new layout.
 */
function nextHotzone(c: Ctx, maxLen: number): { off: number; len: number } | null {
  const live = Object.entries(c.j.segments).filter(([, s]) => !s.flags?.some((f) => f.startsWith('backup-')));
  if (live.length === 0) fail('Reencryption metadata is invalid.');
  if (c.decMoved) {
    // cryptsetup (reencrypt_offset_forward_moved): from the last crypt segment; the moved part is last.
    const M = Number(c.decMoved.size);
    const crypt = live.map(([, s], i) => [s, i] as const).filter(([s]) => s.type === 'crypt');
    if (crypt.length === 0) return null;
    const [last, i] = crypt[crypt.length - 1]!;
    if (i === 0) return { off: 0, len: M };
    const off = Number(last.offset) - c.area.shift;
    if (!(off >= M) || off > c.total) fail('Reencryption metadata is invalid.');
    return off === c.total ? { off: 0, len: M } : { off, len: Math.min(c.area.shift, c.total - off) };
  }
  if (c.moved) {
    const S = c.area.shift;
    const linear = live.filter(([, s]) => s.type === 'linear');
    if (linear.length === 0) return null;
    const rest = linear.length > 1 ? Number(linear[1]![1].size) : 0;
    if (!(rest >= 0)) fail('Reencryption metadata is invalid.');
    if (rest === 0) return { off: 0, len: Math.min(S, Number(c.moved.size)) };
    if (rest < S) return { off: S, len: rest };
    return { off: rest, len: S };
  }
  if (live.length === 1) {
    if (isNew(c, live[0]![0], live[0]![1])) return null;
    if (!c.backward) return { off: 0, len: Math.min(maxLen, c.total) };
    const len = Math.min(maxLen, c.total);
    return { off: c.total - len, len };
  }
  if (live.length !== 2) fail('Reencryption metadata is invalid.');
  const first = Number(live[0]![1].size);
  if (!(first > 0)) fail('Reencryption metadata is invalid.');
  if (first > c.total) fail('Device is too small.', 'EDEVSIZE');
  if (!c.backward) return { off: first, len: Math.min(maxLen, c.total - first) };
  const len = Math.min(maxLen, first);
  return { off: first - len, len };
}

/** The hotzone after [off, off+len), in the run's direction, or null at the end. */
function following(c: Ctx, off: number, len: number, maxLen: number): { off: number; len: number } | null {
  if (c.decMoved) {
    if (off === 0) return null;
    const o = off + len;
    if (o >= c.total) return { off: 0, len: Number(c.decMoved.size) };
    return { off: o, len: Math.min(c.area.shift, c.total - o) };
  }
  if (c.moved) {
    const S = c.area.shift;
    if (off === 0) return null;
    if (off === S) return { off: 0, len: Math.min(S, Number(c.moved.size)) };
    const rest = off - S;
    if (rest < S) return { off: S, len: rest };
    return { off: rest, len: S };
  }
  if (c.area.type === 'datashift' && c.mode === 'encrypt') {
    // In place with a detached header: cryptsetup's order (reencrypt_context_update), so that a run
    // stops only where cryptsetup's own runs stop: hotzones of S from the end, then the short rest
    // just above S, then [0, S). Below S from a state cryptsetup left: the rest down to 0.
    const S = c.area.shift;
    if (off === 0) return null;
    const o = off - S;
    if (o <= 0) return { off: 0, len: off };
    if (o < S) return { off: S, len: o };
    return { off: o, len: S };
  }
  if (!c.backward) {
    const o = off + len;
    return o >= c.total ? null : { off: o, len: Math.min(maxLen, c.total - o) };
  }
  if (off === 0) return null;
  const l = Math.min(maxLen, off);
  return { off: off - l, len: l };
}

function resilienceOf(a: Record<string, unknown>): Resilience {
  const t = a.type;
  if (
    t === 'checksum' ||
    t === 'journal' ||
    t === 'none' ||
    t === 'datashift' ||
    t === 'datashift-checksum' ||
    t === 'datashift-journal'
  )
    return t;
  fail(`Unsupported resilience mode ${String(t)}.`, 'ENOTSUP');
}

/**
 * Run (or resume) the reencryption, encryption or decryption on disk in `vol` to the end (cryptsetup
 * reencrypt [--resume-only]). Returns true when finished, false when stopped by `signal` (resumable).
 */
export async function runReencrypt(
  vol: Luks2Volume,
  passphrase: Uint8Array,
  o: ReencryptRunOptions = {},
): Promise<boolean> {
  return run(vol, (_j, want) => unlockAll(vol, passphrase, want), o);
}

/**
 * `runReencrypt` with the volume keys themselves (online reencryption: the CLI unlocked them, the
 * daemon runs). Each key is checked against its digest; the caller keeps and wipes its copies.
 */
export async function runReencryptWithKeys(
  vol: Luks2Volume,
  keys: ReencryptKeys,
  o: ReencryptRunOptions = {},
): Promise<boolean> {
  return run(
    vol,
    async (j, want) => {
      const out = new Map<string, Buffer>();
      const l = reencryptLayout(j);
      const given: Array<[string | undefined, Uint8Array | undefined]> = [
        [l.oldDigest, keys.oldKey],
        [l.newDigest, keys.newKey],
      ];
      for (const [d, k] of given) {
        if (d === undefined || k === undefined || !want.includes(d)) continue;
        const dg = j.digests[d]!;
        const vk = Buffer.from(k);
        if ((await handlerFor(DIGEST_HANDLERS, dg.type)?.verify(dg, vk)) === true) out.set(d, vk);
        else vk.fill(0);
      }
      return out;
    },
    o,
  );
}

/** What a live mapping needs to know of a reencryption on disk: its mode, direction and the old and new segments. */
export interface ReencryptLayout {
  mode: Mode;
  backward: boolean;
  resilience: Resilience;
  /** The old data segment (backup-previous) and the new one (backup-final). */
  previous: L2Segment;
  final: L2Segment;
  oldDigest?: string;
  newDigest?: string;
}

/** The reencrypt keyslot of `j`, its mode and direction ("not in reencryption" / "metadata is invalid" otherwise). */
function reencryptKeyslot(j: Luks2Json): { ksId: string; ks: L2Keyslot; mode: Mode; backward: boolean } {
  const ksId = reencryptKeyslotId(j);
  if (!inReencryption(j) || ksId === undefined) fail('Device is not in reencryption.', 'EINVAL');
  const ks = j.keyslots[ksId]!;
  const mode = ks.mode as Mode;
  if (
    !['reencrypt', 'encrypt', 'decrypt'].includes(mode) ||
    (ks.direction !== 'forward' && ks.direction !== 'backward')
  )
    fail('Reencryption metadata is invalid.');
  return { ksId, ks, mode, backward: ks.direction === 'backward' };
}

/** The layout of the reencryption `j` is in (invalid metadata is an error). */
export function reencryptLayout(j: Luks2Json): ReencryptLayout {
  const prev = segmentByFlag(j, 'backup-previous');
  const fin = segmentByFlag(j, 'backup-final');
  if (!prev || !fin) fail('Device is not in reencryption.', 'EINVAL');
  const { ks, mode, backward } = reencryptKeyslot(j);
  const l: ReencryptLayout = {
    mode,
    backward,
    resilience: resilienceOf(ks.area as Record<string, unknown>),
    previous: structuredClone(prev[1]),
    final: structuredClone(fin[1]),
  };
  const dOld = prev[1].type === 'crypt' ? digestOfSegment(j, prev[0]) : undefined;
  const dNew = fin[1].type === 'crypt' ? digestOfSegment(j, fin[0]) : undefined;
  if (dOld !== undefined) l.oldDigest = dOld;
  if (dNew !== undefined) l.newDigest = dNew;
  return l;
}

/**
 * The keys of a reencryption the passphrase opens (the old volume key and the new one, each
 * verified by its digest; cryptsetup 2.6 _open_all_keys), for open, open --test-passphrase, repair
 * and a caller that hands them to the daemon (online reencryption); unlockAll's errors when it does
 * not open both. With `anySegment` (open --test-passphrase with --key-slot or --unbound, cryptsetup's
 * CRYPT_ACTIVATE_ALLOW_UNBOUND_KEY) only the one keyslot is opened, so a reencryption that needs two
 * keys then fails verifyReencryptDigest, as in cryptsetup.
 */
export async function unlockReencryptKeys(
  vol: Luks2Volume,
  passphrase: Uint8Array,
  opts: { keySlot?: number; anySegment?: boolean } = {},
): Promise<{ oldKey?: Buffer; newKey?: Buffer }> {
  const j = vol.jsonSnapshot();
  const l = reencryptLayout(j);
  const want = [l.oldDigest, l.newDigest].filter((d): d is string => d !== undefined);
  let keys: Map<string, Buffer>;
  if (opts.anySegment) {
    const { volumeKey, keyslot } = await vol.unlock(passphrase, { keySlot: opts.keySlot, anySegment: true });
    const d = digestOfKeyslot(j, String(keyslot));
    keys = new Map(d !== undefined && want.includes(d) ? [[d, Buffer.from(volumeKey.expose())]] : []);
    volumeKey.dispose();
  } else keys = await unlockAll(vol, passphrase, want);
  const oldKey = l.oldDigest === undefined ? undefined : keys.get(l.oldDigest);
  const newKey = l.newDigest === undefined ? undefined : keys.get(l.newDigest);
  return { ...(oldKey ? { oldKey } : {}), ...(newKey ? { newKey } : {}) };
}

/**
 * Where a reencryption on disk stands, for a mapping of it (cryptsetup 2.6 activates a device in
 * reencryption segment by segment): `hotzone` when a hotzone was left in progress (a crash: recover it
 * first, runReencrypt does), else `boundaryBytes`, the logical byte where the layouts meet: the new
 * layout covers [0, boundary) forward, [boundary, total) backward. Data shift is not covered (refused).
 * `dataDev`: the data device when the header is detached.
 */
export async function reencryptProgress(
  vol: Luks2Volume,
  dataDev?: BlockDevice,
): Promise<{ layout: ReencryptLayout; hotzone: boolean; boundaryBytes: number; totalBytes: number }> {
  const j = vol.jsonSnapshot();
  const layout = reencryptLayout(j);
  if (segmentByFlag(j, 'backup-moved-segment') || layout.previous.offset !== layout.final.offset)
    fail('Reencryption with data shift is not supported by cryptmap here; use cryptsetup.', 'ENOTSUP');
  const total = await dataSize(vol, j, dataDev);
  const live = Object.values(j.segments).filter((x) => !x.flags?.some((f) => f.startsWith('backup-')));
  const hotzone = live.some((x) => x.flags?.includes('in-reencryption'));
  const bound = (id: string | undefined, seg: L2Segment) => {
    const sid = Object.keys(j.segments).find((k) => j.segments[k] === seg)!;
    return id !== undefined && j.digests[id]!.segments.includes(sid);
  };
  let boundaryBytes = 0;
  if (!hotzone) {
    if (live.length === 1) {
      const isNew =
        layout.mode === 'reencrypt'
          ? bound(layout.newDigest, live[0]!) && !bound(layout.oldDigest, live[0]!)
          : (live[0]!.type === 'crypt') === (layout.mode === 'encrypt');
      boundaryBytes = isNew === layout.backward ? 0 : total;
    } else if (live.length === 2) {
      boundaryBytes = Number(live[0]!.size);
      if (!(boundaryBytes > 0) || boundaryBytes % 512 !== 0) fail('Reencryption metadata is invalid.');
      if (boundaryBytes > total) fail('Device is too small.', 'EDEVSIZE');
    } else fail('Reencryption metadata is invalid.');
  }
  return { layout, hotzone, boundaryBytes, totalBytes: total };
}

/**
 * Check the reencryption metadata of `vol` against its digest with the volume keys (cryptsetup's
 * LUKS2_reencrypt_digest_verify before an activation): tampered metadata is refused.
 */
export async function verifyReencryptDigest(vol: Luks2Volume, keys: ReencryptKeys): Promise<void> {
  const j = vol.jsonSnapshot();
  const l = reencryptLayout(j);
  const ksId = reencryptKeyslotId(j)!;
  const m = new Map<string, Buffer>();
  if (l.oldDigest !== undefined && keys.oldKey) m.set(l.oldDigest, Buffer.from(keys.oldKey));
  if (l.newDigest !== undefined && keys.newKey) m.set(l.newDigest, Buffer.from(keys.newKey));
  try {
    await checkReencryptDigest(j, ksId, m, requirementVersion(j));
  } finally {
    for (const k of m.values()) k.fill(0);
  }
}

/**
 * True when the reencryption metadata of `j` has no digest to check it against (legacy `online-reencrypt`
 * metadata, or its digest deleted): cryptsetup 2.6 then wants it repaired (CRYPT_REENCRYPT_REPAIR_NEEDED),
 * and its repair upgrades it (upgradeReencryptMetadata).
 */
export function reencryptDigestMissing(j: Luks2Json): boolean {
  const v = reencryptRequirementVersion(j);
  const ksId = reencryptKeyslotId(j);
  return v !== undefined && ksId !== undefined && (v < 2 || digestOfKeyslot(j, ksId) === undefined);
}

/**
 * Protect reencryption metadata that has no digest (cryptsetup 2.6 repair, reencrypt_repair_by_passphrase):
 * the passphrase must open the old and the new volume key (unlockAll's errors); a digest of the metadata
 * as it stands is made for the reencrypt keyslot, and the requirement becomes online-reencrypt-v2 (v3
 * for a decryption with the header exported), in one header write (both copies, as every commit). The
 * metadata is taken as it is: the caller asked whether the reencryption is genuine.
 */
export async function upgradeReencryptMetadata(vol: Luks2Volume, passphrase: Uint8Array): Promise<void> {
  const j = vol.jsonSnapshot();
  const { ksId, ks, mode } = reencryptKeyslot(j);
  const l = reencryptLayout(j);
  const area = ks.area as Record<string, unknown>;
  const version =
    mode === 'decrypt' && String(area.type).startsWith('datashift-') && segmentByFlag(j, 'backup-moved-segment')
      ? DECRYPT_DATASHIFT_REQ_VERSION
      : REQ_VERSION;
  const keys = await unlockAll(
    vol,
    passphrase,
    [l.oldDigest, l.newDigest].filter((d): d is string => d !== undefined),
  );
  try {
    await setReencryptDigest(j, ksId, keys, version, await digestIterations(false, 'sha256'));
  } finally {
    for (const k of keys.values()) k.fill(0);
  }
  setReencryptRequirement(j, version);
  await vol.commitJson(j);
}

async function run(
  vol: Luks2Volume,
  getKeys: (j: Luks2Json, want: string[]) => Promise<Map<string, Buffer>>,
  o: ReencryptRunOptions,
): Promise<boolean> {
  const j = vol.jsonSnapshot();
  const { ksId, ks, mode, backward } = reencryptKeyslot(j);
  // A requirement cryptsetup does not know next to the reencryption's: not resumed (its status is invalid).
  const unmet = unmetReencryptRequirement(j);
  if (unmet !== undefined) fail(unmet, 'EREQUIREMENT');
  const a = ks.area as Record<string, unknown>;
  const type = resilienceOf(a);
  const prev = segmentByFlag(j, 'backup-previous');
  const fin = segmentByFlag(j, 'backup-final');
  const moved = segmentByFlag(j, 'backup-moved-segment');
  if (!prev || !fin) fail('Reencryption metadata is invalid.');
  const wantType = (s: L2Segment, crypt: boolean) => s.type === (crypt ? 'crypt' : 'linear');
  if (!wantType(prev[1], mode !== 'encrypt') || !wantType(fin[1], mode !== 'decrypt'))
    fail('Reencryption metadata is invalid.');
  const shift = type.startsWith('datashift') ? Number(a.shift_size) : 0;
  /** Decryption with the header exported: the ciphertext's head moved to the start, the rest shifted down. */
  const decMoved = type === 'datashift-checksum' || type === 'datashift-journal';
  if (decMoved) {
    const m = moved?.[1];
    if (
      !(mode === 'decrypt' && !backward && m?.type === 'crypt') ||
      !(shift > 0) ||
      shift % 512 !== 0 ||
      Number(prev[1].offset) - shift !== Number(fin[1].offset) ||
      m.offset !== fin[1].offset ||
      !(Number(m.size) > 0) ||
      Number(m.size) > shift ||
      m.encryption !== prev[1].encryption ||
      (m.sector_size ?? 512) !== (prev[1].sector_size ?? 512) ||
      (m.iv_tweak ?? '0') !== (prev[1].iv_tweak ?? '0')
    )
      fail('Reencryption metadata is invalid.');
  } else if (type === 'datashift') {
    // With data moved (header in place), or in place with a detached header (same offsets).
    const inPlace = !moved && prev[1].offset === fin[1].offset;
    // Reencryption with the data moving up by the shift (cryptsetup reencrypt --reduce-device-size).
    const up = !moved && mode !== 'encrypt' && Number(fin[1].offset) === Number(prev[1].offset) + shift && shift > 0;
    if (!(backward && ((mode === 'encrypt' && (inPlace || moved?.[1].type === 'linear')) || up))) {
      fail(
        `Reencryption mode ${mode} (${String(ks.direction)}) with data shift is not supported by cryptmap yet; use cryptsetup.`,
        'ENOTSUP',
      );
    }
    if (!(shift > 0) || shift % 512 !== 0 || (moved && Number(fin[1].offset) < shift))
      fail('Reencryption metadata is invalid.');
  } else if (moved || prev[1].offset !== fin[1].offset) {
    fail('Reencryption with data shift is not supported by cryptmap yet; use cryptsetup.', 'ENOTSUP');
  }
  const dOld = mode === 'encrypt' ? undefined : digestOfSegment(j, prev[0]);
  const dNew = mode === 'decrypt' ? undefined : digestOfSegment(j, fin[0]);
  if ((mode !== 'encrypt' && dOld === undefined) || (mode !== 'decrypt' && dNew === undefined))
    fail('Reencryption metadata is invalid.');
  const version = requirementVersion(j);
  if (version < 2) fail('Legacy (online-reencrypt) reencryption metadata has no digest; run repair first.');
  const want = [dOld, dNew].filter((d): d is string => d !== undefined);
  const keys = await getKeys(j, want);
  const wipeKeys = () => {
    for (const k of keys.values()) k.fill(0);
  };
  if (!want.every((d) => keys.has(d))) {
    wipeKeys();
    throw new CryptmapError('ENOKEY', 'No key available with this passphrase.', { exitCode: 2, errno: 'EPERM' });
  }
  let oldC: SectorCipher | undefined;
  let newC: SectorCipher | undefined;
  try {
    await checkReencryptDigest(j, ksId, keys, version);
    if (dOld !== undefined)
      oldC = createSectorCipher({
        spec: prev[1].encryption!,
        key: keys.get(dOld)!,
        sectorBytes: (prev[1].sector_size ?? 512) as SectorBytes,
      });
    if (dNew !== undefined)
      newC = createSectorCipher({
        spec: fin[1].encryption!,
        key: keys.get(dNew)!,
        sectorBytes: (fin[1].sector_size ?? 512) as SectorBytes,
      });
    const data = o.dataDev ?? vol.metadataDevice;
    const newOff = Number(fin[1].offset);
    const c: Ctx = {
      j,
      ksId,
      mode,
      backward,
      area: {
        offset: Number(a.offset),
        size: Number(a.size),
        type,
        hash: a.hash as string | undefined,
        blockBytes: Number(a.sector_size ?? 512),
        shift,
      },
      newOff,
      oldOff: moved && !decMoved ? newOff - shift : Number(prev[1].offset),
      newIv: BigInt(fin[1].iv_tweak ?? '0'),
      oldIv: BigInt(prev[1].iv_tweak ?? '0'),
      // cryptsetup: a forward data shift's device size ends where the old data ends (data offset + shift).
      total: (await dataSize(vol, j, o.dataDev)) - (decMoved ? shift : 0),
      prev: prev[1],
      fin: fin[1],
      ...(moved && !decMoved ? { moved: moved[1] } : {}),
      ...(moved && decMoved
        ? { decMoved: moved[1], movedType: type === 'datashift-checksum' ? 'checksum' : 'journal' }
        : {}),
      ...(dOld !== undefined ? { dOld } : {}),
      ...(dNew !== undefined ? { dNew } : {}),
      ...(oldC ? { oldC } : {}),
      ...(newC ? { newC } : {}),
    };
    if (c.moved) {
      const P = shiftPlainBytes(c);
      if (!(P > 0) || P + shift > c.total || Number(c.moved.offset) + Number(c.moved.size) > data.sizeBytes)
        fail('Device is too small.', 'EDEVSIZE');
    }
    const bb = c.area.blockBytes;
    // cryptsetup's check (a power of two from 512); more than a step (4 MiB) is not in any header it writes.
    if (
      (type === 'checksum' || type === 'datashift-checksum') &&
      (!(bb >= 512 && bb <= STEP_BYTES) || (bb & (bb - 1)) !== 0)
    )
      fail('Reencryption metadata is invalid.');
    if (c.decMoved && (!(c.total > 0) || Number(c.decMoved.size) > c.total)) fail('Device is too small.', 'EDEVSIZE');
    const meta = vol.metadataDevice;
    const maxLen = hotzoneLength(c, o.hotzoneBytes);
    let next: { off: number; len: number } | null;
    /** The last hotzone, whose I/O waits until the final header is written. */
    let lastHot: { off: number; len: number } | undefined;
    const hot = Object.values(j.segments).find((s) => s.flags?.includes('in-reencryption'));
    if (hot) {
      const off = Number(hot.offset) - c.newOff;
      const len = Number(hot.size);
      if (!(len >= 512) || !(off >= 0) || (type.startsWith('datashift') && len > shift))
        fail('Reencryption metadata is invalid.');
      if (off + len > c.total) fail('Device is too small.', 'EDEVSIZE');
      await o.hotzone?.start(off, len, toMapped(hotLive(c, off, len), mappedTotal(c)));
      await recover(c, meta, data, off, len);
      next = following(c, off, len, maxLen);
      if (next) {
        postSegments(c, off, len);
        await vol.commitJson(c.j);
        await o.hotzone?.done(off, len);
      } else lastHot = { off, len };
    } else next = nextHotzone(c, maxLen);
    // Progress counts what earlier runs did too (cryptsetup's rh->progress).
    let done = c.total;
    for (let h = next; h; h = following(c, h.off, h.len, maxLen)) done -= h.len;
    o.onProgress?.(done, c.total);
    const bufs = stepBuffers(Math.min(Math.max(maxLen, shift), c.total));
    const sums =
      type === 'checksum' || type === 'datashift-checksum'
        ? Buffer.alloc(Math.ceil(maxLen / c.area.blockBytes) * hashBytes(c.area.hash!))
        : null;
    const hs = sums ? hashBytes(c.area.hash!) : 0;
    /** Online checksum hotzones up to PREHASH_MAX_BYTES: the whole hotzone in memory (see the loop). */
    const pre =
      sums && type === 'checksum' && o.hotzone && maxLen <= PREHASH_MAX_BYTES
        ? Buffer.alloc(Math.min(maxLen, c.total))
        : null;
    try {
      while (next) {
        const { off, len } = next;
        if (o.signal?.aborted) {
          // resilience none wrote no header per hotzone: record where the run got to, once the data
          // up to there is on disk (the header's own flush comes after its writes).
          if (type === 'none' && done > 0) {
            await data.flush();
            postSegments(c, c.backward ? off + len : off, 0);
            await vol.commitJson(c.j);
          }
          return false;
        }
        if (!(len > 0) || (type.startsWith('datashift') && len > shift)) fail('Reencryption metadata is invalid.');
        /** This hotzone's resilience (the moved part of a decryption with the header exported has its own). */
        const zt = zoneType(c, off);
        const h = pre?.subarray(0, len);
        if (h && sums) {
          // Online: read and hash the hotzone while clients still use it. Once its I/O has stopped it
          // is read again and only the blocks a client changed in between are hashed again, so the
          // hotzone's I/O waits for a read, the header commits and the rewrite, not for the hashing.
          await inSteps(len, bufs, async (pos, b) => {
            const x = h.subarray(pos, pos + b.length);
            await data.read(sourceOffset(c, off) + pos, x);
            await blockSumsYielding(c.area.hash!, x, c.area.blockBytes, sums, (pos / c.area.blockBytes) * hs);
          });
        }
        await o.hotzone?.start(off, len, toMapped(hotLive(c, off, len), mappedTotal(c)));
        if (type !== 'none') {
          hotSegments(c, off, len);
          if (h && sums) {
            const bb = c.area.blockBytes;
            await inSteps(len, bufs, async (pos, b) => {
              await data.read(sourceOffset(c, off) + pos, b);
              if (b.equals(h.subarray(pos, pos + b.length))) return;
              for (let k = 0; k < b.length; k += bb) {
                const now = b.subarray(k, k + bb);
                if (now.equals(h.subarray(pos + k, pos + k + bb))) continue;
                now.copy(h, pos + k);
                blockSums(c.area.hash!, now, bb, sums, ((pos + k) / bb) * hs);
              }
            });
            await meta.write(c.area.offset, sums.subarray(0, (len / bb) * hs));
            await meta.flush();
          } else if (sums && zt === 'checksum') {
            // The hotzone is read twice (here for its checksums, then to rewrite it) so that memory
            // stays a few steps long whatever the hotzone's length (cryptsetup's reaches 1 GiB).
            await inSteps(len, bufs, async (pos, b) => {
              await data.read(sourceOffset(c, off) + pos, b);
              await blockSumsYielding(c.area.hash!, b, c.area.blockBytes, sums, (pos / c.area.blockBytes) * hs);
            });
            await meta.write(c.area.offset, sums.subarray(0, (len / c.area.blockBytes) * hs));
            await meta.flush();
          } else if (zt === 'journal') {
            await inSteps(len, bufs, async (pos, b) => {
              await data.read(sourceOffset(c, off) + pos, b);
              await meta.write(c.area.offset + pos, b);
            });
            await meta.flush();
          }
          await vol.commitJson(c.j);
        }
        if (h && sums) {
          // Read since the hotzone's I/O stopped: what is on the device now.
          await inSteps(len, bufs, async (pos, b) => {
            const x = h.subarray(pos, pos + b.length);
            await transform(c, x, off + pos);
            await data.write(c.newOff + off + pos, x);
          });
        } else {
          await inSteps(len, bufs, async (pos, b) => {
            await data.read(sourceOffset(c, off) + pos, b);
            await transform(c, b, off + pos);
            await data.write(c.newOff + off + pos, b);
          });
        }
        if (type !== 'none' || o.hotzone) await data.flush();
        next = following(c, off, len, maxLen);
        if (next && type !== 'none') {
          postSegments(c, off, len);
          await vol.commitJson(c.j);
        }
        // After the header says the hotzone is done: a crash before it would recover the hotzone from
        // the journal over what clients wrote to it since.
        if (next) await o.hotzone?.done(off, len);
        else lastHot = { off, len };
        done += len;
        o.onProgress?.(done, c.total);
      }
    } finally {
      for (const b of bufs) b.fill(0);
      pre?.fill(0);
    }
    await data.flush();
    await finish(vol, c, data);
    if (lastHot) await o.hotzone?.done(lastHot.off, lastHot.len);
    return true;
  } finally {
    oldC?.dispose();
    newC?.dispose();
    wipeKeys();
  }
}

/** The final header: the new segment alone, old keyslots, backups, requirement and reencrypt keyslot gone. */
async function finish(vol: Luks2Volume, c: Ctx, data: BlockDevice): Promise<void> {
  const j = c.j;
  const wipe: Array<[number, number]> = [];
  j.segments = { '0': stripBackup(c.fin) };
  for (const d of Object.values(j.digests)) d.segments = [];
  if (c.dNew !== undefined) j.digests[c.dNew]!.segments = ['0'];
  const rd = digestOfKeyslot(j, c.ksId);
  const gone = new Set([c.ksId, ...(c.dOld !== undefined ? j.digests[c.dOld]!.keyslots : [])]);
  for (const id of gone) {
    const k = j.keyslots[id];
    if (k && id !== c.ksId) wipe.push([Number(k.area.offset), Number(k.area.size)]);
    delete j.keyslots[id];
  }
  for (const t of Object.values(j.tokens)) t.keyslots = t.keyslots.filter((x) => !gone.has(x));
  if (c.dOld !== undefined) delete j.digests[c.dOld];
  if (rd !== undefined) delete j.digests[rd];
  const req = j.config.requirements;
  if (req) {
    req.mandatory = (req.mandatory ?? []).filter((x) => !x.startsWith('online-reencrypt'));
    if (req.mandatory.length === 0) delete req.mandatory;
    if (Object.keys(req).length === 0) delete j.config.requirements;
  }
  // The data moved up (reencryption with data shift): the keyslots area grows to the new data offset,
  // as cryptsetup sets it at the end (LUKS2_set_keyslots_size: at most 128 MiB, 4096-aligned).
  if (c.mode === 'reencrypt' && c.area.type === 'datashift' && data === vol.metadataDevice) {
    let kss = Math.min(c.newOff - 2 * vol.metadataBytes, 0x8000000);
    kss -= kss % 4096;
    if (kss > Number(j.config.keyslots_size)) j.config.keyslots_size = String(kss);
  }
  await vol.commitJson(j);
  for (const [o, n] of wipe) await wipeArea(vol.metadataDevice, o, n);
  // Encryption with data shift: the moved plaintext copy at the device's end goes (cryptsetup wipes it
  // with random bytes); decryption with the header exported: the last shift's worth of the device (the
  // old ciphertext's tail), as cryptsetup wipes it.
  if (c.moved || c.decMoved) {
    const off = c.moved ? Number(c.moved.offset) : Math.max(0, data.sizeBytes - c.area.shift);
    const len = c.moved ? Math.min(Number(c.moved.size), data.sizeBytes - off) : data.sizeBytes - off;
    const r = Buffer.alloc(Math.min(1 << 20, len));
    for (let p = 0; p < len; p += r.length)
      await data.write(off + p, randomFillSync(r).subarray(0, Math.min(r.length, len - p)));
    await data.flush();
  }
}

/**
 * The keyslot `passphrase` opens on a volume in reencryption (cryptsetup accepts a keyslot of the old
 * or of the new volume key; with encryption under way segment 0 has no key at all).
 */
export async function unlockInReencryption(
  vol: Luks2Volume,
  passphrase: Uint8Array,
  keySlot?: number,
): Promise<number> {
  const j = vol.jsonSnapshot();
  const want = [segmentByFlag(j, 'backup-previous'), segmentByFlag(j, 'backup-final')]
    .map((s) => (s ? digestOfSegment(j, s[0]) : undefined))
    .filter((d): d is string => d !== undefined);
  for (const [id, ks] of Object.entries(j.keyslots)) {
    if (ks.type !== 'luks2' || (keySlot !== undefined && Number(id) !== keySlot)) continue;
    const d = digestOfKeyslot(j, id);
    if (d === undefined || !want.includes(d)) continue;
    const vk = await openVerified(vol, j, ks, d, passphrase);
    if (vk) {
      vk.fill(0);
      return Number(id);
    }
  }
  throw new CryptmapError('ENOKEY', 'No key available with this passphrase.', { exitCode: 2, errno: 'EPERM' });
}
