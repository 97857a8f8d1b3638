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
import { createHash, randomBytes } from 'node:crypto';
import type { BlockDevice } from '../blockdev/types.js';
import { createSectorCipher } from '../engine/index.js';
import type { SectorBytes, SectorCipher } from '../engine/types.js';
import { CryptmapError, isCryptmapError } from '../util/errors.js';
import { wipeArea } from './keyslot-area.js';
import type { Luks2Volume } from './luks2.js';
import { DIGEST_HANDLERS, handlerFor, KEYSLOT_HANDLERS } from './luks2-handlers.js';
import type { L2Keyslot, L2Segment, Luks2Json } from './luks2-json.js';
import type { NewKeyslotOptions } from './types.js';

export type Resilience = 'checksum' | 'journal' | 'none';
export const REENCRYPT_REQUIREMENT = 'online-reencrypt-v2';
const REQ_VERSION = 2;
const MAX_HOTZONE_BYTES = 0x40000000;
const DEFAULT_NONE_HOTZONE_BYTES = 0x1400000;

export interface ReencryptInitOptions extends NewKeyslotOptions {
  /** The keyslot to unlock the old key with (cryptsetup --key-slot); the new keyslot takes the first free one. */
  oldKeySlot?: number;
  resilience?: Resilience;
  /** Checksum hash (cryptsetup --resilience-hash), default sha256. */
  resilienceHash?: string;
  cipher?: string;
  keyBytes?: number;
  sectorBytes?: SectorBytes;
}

export interface ReencryptRunOptions {
  /** Data device when the header is detached (default: the volume's own device). */
  dataDev?: BlockDevice;
  /** Largest hotzone in bytes (cryptsetup --hotzone-size). */
  hotzoneBytes?: number;
  /** Called after each hotzone with bytes done and the total. */
  onProgress?: (doneBytes: number, totalBytes: number) => void;
  /** When aborted, stops cleanly after the current hotzone (resumable). */
  signal?: AbortSignal;
}

function fail(msg: string, code = 'EREENCRYPT', exitCode = 1): never {
  throw new CryptmapError(code, msg, { exitCode });
}

/** The reencrypt keyslot's id, or undefined. */
export function reencryptKeyslotId(j: Luks2Json): string | undefined {
  return Object.keys(j.keyslots).find((k) => j.keyslots[k]!.type === 'reencrypt');
}

export function inReencryption(j: Luks2Json): boolean {
  return (j.config.requirements?.mandatory ?? []).some((x) => x === 'online-reencrypt' || x.startsWith('online-reencrypt-v'));
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
  if (dOld !== undefined) parts.push(keys.get(dOld) ?? fail('Reencryption metadata is invalid.'));
  if (dNew !== undefined && dNew !== dOld) parts.push(keys.get(dNew) ?? fail('Reencryption metadata is invalid.'));
  parts.push(str(ks.mode), str(ks.direction), str(area.type), u64be(String(area.offset)), u64be(String(area.size)));
  if (area.type === 'checksum') parts.push(str(area.hash), u32be(Number(area.sector_size)));
  else if (area.type !== 'journal' && area.type !== 'none') fail(`Unsupported resilience mode ${String(area.type)}.`);
  parts.push(...segmentBlob(prev[1]), ...segmentBlob(fin[1]));
  const moved = segmentByFlag(j, 'backup-moved-segment');
  if (moved) parts.push(...segmentBlob(moved[1]));
  return Buffer.concat(parts);
}

function requirementVersion(j: Luks2Json): number {
  const r = (j.config.requirements?.mandatory ?? []).find((x) => x.startsWith('online-reencrypt'));
  const m = r ? /^online-reencrypt-v([0-9]+)$/.exec(r) : null;
  if (!m) fail('Legacy (online-reencrypt) reencryption metadata is not supported; use cryptsetup repair.');
  return Number(m[1]);
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
export async function initReencrypt(vol: Luks2Volume, passphrase: Uint8Array, o: ReencryptInitOptions = {}): Promise<number> {
  vol.assertChangeable();
  let j = vol.jsonSnapshot();
  if (inReencryption(j) || reencryptKeyslotId(j) !== undefined) fail('LUKS2 reencryption already initialized. Run --resume-only.', 'EBUSY');
  const ids = Object.keys(j.segments);
  if (ids.length !== 1 || j.segments['0']?.type !== 'crypt') fail('Unsupported LUKS2 segments layout for reencryption.');
  const old = j.segments['0']!;
  const { volumeKey, keyslot: oldSlot } = await vol.unlock(passphrase, { keySlot: o.oldKeySlot });
  const cipher = o.cipher ?? old.encryption!;
  const keyBytes = o.keyBytes ?? volumeKey.length;
  const oldSector = (old.sector_size ?? 512) as SectorBytes;
  const newSector = o.sectorBytes ?? oldSector;
  const newVk = randomBytes(keyBytes);
  try {
    // Check the new cipher and key size before anything is written.
    createSectorCipher({ spec: cipher, key: newVk, sectorBytes: newSector }).dispose();
    const dataBytes = await dataSize(vol, j, undefined);
    const align = Math.max(oldSector, newSector);
    if (dataBytes % align !== 0) fail(`Data device is not aligned to encryption sector size (${align} bytes).`);
    const { keyslot: newSlot, digest: dNew } = await vol.addUnboundKey(newVk, passphrase, { ...o, keySlot: undefined });
    j = vol.jsonSnapshot();
    const dOld = digestOfKeyslot(j, String(oldSlot))!;
    const free = (): string => {
      let i = 0;
      while (j.segments[String(i)]) i++;
      return String(i);
    };
    const prev: L2Segment = { ...structuredClone(old), flags: [...(old.flags ?? []), 'backup-previous'] };
    const pid = free();
    j.segments[pid] = prev;
    const fin: L2Segment = { type: 'crypt', offset: old.offset, size: 'dynamic', iv_tweak: old.iv_tweak ?? '0', encryption: cipher, sector_size: newSector, flags: ['backup-final'] };
    const fid = free();
    j.segments[fid] = fin;
    j.digests[dOld]!.segments.push(pid);
    j.digests[dNew]!.segments.push(fid);
    const resilience = o.resilience ?? 'checksum';
    const gap = maxGap(j, vol.metadataBytes);
    if (gap.size < 4096) fail('Not enough space in the keyslots area for reencryption resilience data.', 'ENOSPACE');
    const area: Record<string, unknown> = { offset: String(gap.offset), size: String(gap.size), type: resilience };
    if (resilience === 'checksum') {
      const hash = o.resilienceHash ?? 'sha256';
      try {
        createHash(hash);
      } catch {
        fail(`Hash algorithm ${hash} is not available.`, 'EPARAM');
      }
      area.hash = hash;
      area.sector_size = Math.max(align, 512);
    }
    let rid = 0;
    while (j.keyslots[String(rid)]) rid++;
    j.keyslots[String(rid)] = { area, type: 'reencrypt', key_size: 1, mode: 'reencrypt', direction: 'forward', priority: 0 } as unknown as L2Keyslot;
    const keys = new Map<string, Buffer>([
      [dOld, Buffer.from(volumeKey.expose())],
      [dNew, newVk],
    ]);
    const blob = verificationBlob(j, keys, REQ_VERSION);
    try {
      const d = await DIGEST_HANDLERS.pbkdf2!.create(blob, { hash: 'sha256', iterations: Number(j.digests[dNew]!.iterations ?? 1000) });
      let did = 0;
      while (j.digests[String(did)]) did++;
      j.digests[String(did)] = { ...d, keyslots: [String(rid)], segments: [] };
    } finally {
      blob.fill(0);
      keys.get(dOld)!.fill(0);
    }
    const req = j.config.requirements ?? {};
    req.mandatory = [...(req.mandatory ?? []), REENCRYPT_REQUIREMENT];
    j.config.requirements = req;
    await vol.commitJson(j);
    return newSlot;
  } finally {
    newVk.fill(0);
    volumeKey.dispose();
  }
}

// ---- run / resume ----

async function dataSize(vol: Luks2Volume, j: Luks2Json, dataDev: BlockDevice | undefined): Promise<number> {
  const fin = segmentByFlag(j, 'backup-final')?.[1] ?? j.segments['0']!;
  const off = Number(fin.offset);
  const dev = dataDev ?? vol.metadataDevice;
  if (dev.sizeBytes <= off) fail('Device is too small.', 'EDEVSMALL');
  return dev.sizeBytes - off;
}

interface Ctx {
  j: Luks2Json;
  ksId: string;
  area: { offset: number; size: number; type: Resilience; hash?: string; blockBytes: number };
  dataOff: number;
  ivBase: bigint;
  total: number;
  prev: L2Segment;
  fin: L2Segment;
  dOld: string;
  dNew: string;
  oldC: SectorCipher;
  newC: SectorCipher;
}

/** Unlock every keyslot the passphrase opens; returns the keys by digest id. */
async function unlockAll(vol: Luks2Volume, j: Luks2Json, passphrase: Uint8Array, want: string[]): Promise<Map<string, Buffer>> {
  const keys = new Map<string, Buffer>();
  for (const [id, ks] of Object.entries(j.keyslots)) {
    if (ks.type !== 'luks2') continue;
    const d = digestOfKeyslot(j, id);
    if (d === undefined || keys.has(d) || !want.includes(d)) continue;
    let vk: Buffer;
    try {
      vk = await KEYSLOT_HANDLERS.luks2!.open!(vol.metadataDevice, ks, passphrase);
    } catch (e) {
      if (isCryptmapError(e) && (e.code === 'ENOMEM' || e.code === 'EIO')) throw e;
      continue;
    }
    const dg = j.digests[d]!;
    if ((await handlerFor(DIGEST_HANDLERS, dg.type)?.verify(dg, vk)) === true) keys.set(d, vk);
    else vk.fill(0);
    if (want.every((w) => keys.has(w))) break;
  }
  return keys;
}

function segCrypt(base: L2Segment, offset: number, size: number | 'dynamic', ivBase: bigint, rel: number, flags?: string[]): L2Segment {
  const s: L2Segment = { type: 'crypt', offset: String(offset), size: String(size), iv_tweak: String(ivBase + BigInt(rel / 512)), encryption: base.encryption, sector_size: base.sector_size ?? 512 };
  if (flags) s.flags = flags;
  return s;
}

/** The segments for "hotzone [off, off+len) in progress" (hot) or "done up to end" (post, len 0 hotzone omitted). */
function buildSegments(c: Ctx, off: number, len: number, hot: boolean): void {
  const j = c.j;
  const segs: Record<string, L2Segment> = {};
  const dig = (d: string) => j.digests[d]!;
  for (const d of Object.values(j.digests)) d.segments = [];
  let n = 0;
  const done = hot ? off : off + len;
  if (done > 0) {
    segs[String(n)] = segCrypt(c.fin, c.dataOff, done === c.total ? 'dynamic' : done, c.ivBase, 0);
    dig(c.dNew).segments.push(String(n++));
  }
  if (hot) {
    segs[String(n)] = segCrypt(c.fin, c.dataOff + off, len, c.ivBase, off, ['in-reencryption']);
    dig(c.dNew).segments.push(String(n));
    dig(c.dOld).segments.push(String(n++));
  }
  if (off + len < c.total) {
    segs[String(n)] = segCrypt(c.prev, c.dataOff + off + len, 'dynamic', c.ivBase, off + len);
    dig(c.dOld).segments.push(String(n++));
  }
  const prevFlags = c.prev.flags ?? [];
  segs[String(n)] = structuredClone(c.prev);
  segs[String(n)]!.flags = prevFlags;
  dig(c.dOld).segments.push(String(n++));
  segs[String(n)] = structuredClone(c.fin);
  dig(c.dNew).segments.push(String(n++));
  j.segments = segs;
}

async function readFull(dev: BlockDevice, off: number, len: number): Promise<Buffer> {
  const b = Buffer.alloc(len);
  await dev.read(off, b);
  return b;
}

function checksums(c: Ctx, raw: Buffer): Buffer {
  const parts: Buffer[] = [];
  for (let o = 0; o < raw.length; o += c.area.blockBytes) parts.push(createHash(c.area.hash!).update(raw.subarray(o, o + c.area.blockBytes)).digest());
  return Buffer.concat(parts);
}

/** Finish a hotzone the header says was in progress (reencrypt_recover_segment). */
async function recover(c: Ctx, meta: BlockDevice, data: BlockDevice, off: number, len: number): Promise<void> {
  const sector = c.ivBase + BigInt(off / 512);
  if (c.area.type === 'checksum') {
    const hs = createHash(c.area.hash!).digest().length;
    const count = len / c.area.blockBytes;
    if (count * hs > c.area.size) fail('Reencryption metadata is invalid.');
    const sums = await readFull(meta, c.area.offset, count * hs);
    const raw = await readFull(data, c.dataOff + off, len);
    const now = checksums(c, raw);
    for (let i = 0; i < count; i++) {
      if (!now.subarray(i * hs, (i + 1) * hs).equals(sums.subarray(i * hs, (i + 1) * hs))) continue;
      const b = raw.subarray(i * c.area.blockBytes, (i + 1) * c.area.blockBytes);
      const s = sector + BigInt((i * c.area.blockBytes) / 512);
      c.oldC.decrypt(b, s);
      c.newC.encrypt(b, s);
      await data.write(c.dataOff + off + i * c.area.blockBytes, b);
    }
    raw.fill(0);
  } else if (c.area.type === 'journal') {
    if (len > c.area.size) fail('Reencryption metadata is invalid.');
    const b = await readFull(meta, c.area.offset, len);
    c.oldC.decrypt(b, sector);
    c.newC.encrypt(b, sector);
    await data.write(c.dataOff + off, b);
    b.fill(0);
  } else {
    fail('Reencryption was interrupted with resilience none: the hotzone cannot be recovered.');
  }
  await data.flush();
}

function hotzoneLength(c: Ctx, max: number | undefined): number {
  const align = c.area.type === 'checksum' ? c.area.blockBytes : Math.max(c.prev.sector_size ?? 512, c.fin.sector_size ?? 512);
  if (max !== undefined && max % align !== 0) fail(`Hotzone size must be multiple of calculated zone alignment (${align} bytes).`, 'EPARAM');
  let len: number;
  if (c.area.type === 'none') len = max ?? DEFAULT_NONE_HOTZONE_BYTES;
  else if (c.area.type === 'checksum') len = Math.floor(c.area.size / createHash(c.area.hash!).digest().length) * c.area.blockBytes;
  else len = c.area.size;
  len = Math.min(len, MAX_HOTZONE_BYTES);
  if (max !== undefined) len = Math.min(len, max);
  len -= len % align;
  if (len < 512) fail('Invalid reencryption hotzone length.');
  return len;
}

/**
 * Run (or resume) the reencryption on disk in `vol` to the end (cryptsetup reencrypt [--resume-only]).
 * Returns true when finished, false when stopped by `signal` (resumable).
 */
export async function runReencrypt(vol: Luks2Volume, passphrase: Uint8Array, o: ReencryptRunOptions = {}): Promise<boolean> {
  const j = vol.jsonSnapshot();
  const ksId = reencryptKeyslotId(j);
  if (!inReencryption(j) || ksId === undefined) fail('Device is not in reencryption.', 'EINVAL');
  const ks = j.keyslots[ksId]!;
  if (ks.mode !== 'reencrypt' || ks.direction !== 'forward') fail(`Reencryption mode ${String(ks.mode)} (${String(ks.direction)}) is not supported by cryptmap yet; use cryptsetup.`, 'ENOTSUP');
  const prev = segmentByFlag(j, 'backup-previous');
  const fin = segmentByFlag(j, 'backup-final');
  if (!prev || !fin || prev[1].type !== 'crypt' || fin[1].type !== 'crypt') fail('Reencryption metadata is invalid.');
  if (prev[1].offset !== fin[1].offset || segmentByFlag(j, 'backup-moved-segment')) fail('Reencryption with data shift is not supported by cryptmap yet; use cryptsetup.', 'ENOTSUP');
  const dOld = digestOfSegment(j, prev[0]);
  const dNew = digestOfSegment(j, fin[0]);
  if (dOld === undefined || dNew === undefined) fail('Reencryption metadata is invalid.');
  const version = requirementVersion(j);
  const keys = await unlockAll(vol, j, passphrase, [dOld, dNew]);
  const wipeKeys = () => {
    for (const k of keys.values()) k.fill(0);
  };
  if (!keys.has(dOld) || !keys.has(dNew)) {
    wipeKeys();
    throw new CryptmapError('ENOKEY', 'No key available with this passphrase.', { exitCode: 2, errno: 'EPERM' });
  }
  let oldC: SectorCipher | undefined;
  let newC: SectorCipher | undefined;
  try {
    const blob = verificationBlob(j, keys, version);
    const rd = digestOfKeyslot(j, ksId);
    const d = rd === undefined ? undefined : j.digests[rd];
    const ok = d !== undefined && (await handlerFor(DIGEST_HANDLERS, d.type)?.verify(d, blob)) === true;
    blob.fill(0);
    if (!ok) fail('Reencryption metadata is invalid.');
    const a = ks.area as Record<string, unknown>;
    const type = a.type as Resilience;
    oldC = createSectorCipher({ spec: prev[1].encryption!, key: keys.get(dOld)!, sectorBytes: (prev[1].sector_size ?? 512) as SectorBytes });
    newC = createSectorCipher({ spec: fin[1].encryption!, key: keys.get(dNew)!, sectorBytes: (fin[1].sector_size ?? 512) as SectorBytes });
    const data = o.dataDev ?? vol.metadataDevice;
    const c: Ctx = {
      j,
      ksId,
      area: { offset: Number(a.offset), size: Number(a.size), type, hash: a.hash as string | undefined, blockBytes: Number(a.sector_size ?? 512) },
      dataOff: Number(fin[1].offset),
      ivBase: BigInt(prev[1].iv_tweak ?? '0'),
      total: await dataSize(vol, j, o.dataDev),
      prev: prev[1],
      fin: fin[1],
      dOld,
      dNew,
      oldC,
      newC,
    };
    const meta = vol.metadataDevice;
    // Where are we? A segment in reencryption: recover it first.
    const live = Object.values(j.segments).filter((s) => !s.flags?.some((f) => f.startsWith('backup-')));
    let off: number;
    const hotSeg = live.find((s) => s.flags?.includes('in-reencryption'));
    if (hotSeg) {
      off = Number(hotSeg.offset) - c.dataOff;
      const len = Number(hotSeg.size);
      if (!(len >= 512) || off + len > c.total) fail('Reencryption metadata is invalid.');
      await recover(c, meta, data, off, len);
      off += len;
      if (off < c.total) {
        buildSegments(c, off - len, len, false);
        await vol.commitJson(c.j);
      }
    } else if (live.length === 1) off = 0;
    else if (live.length === 2) off = Number(live[0]!.size);
    else fail('Reencryption metadata is invalid.');
    if (!(off >= 0) || off > c.total) fail('Reencryption metadata is invalid.');
    const maxLen = hotzoneLength(c, o.hotzoneBytes);
    const buf = Buffer.alloc(Math.min(maxLen, c.total));
    try {
      while (off < c.total) {
        if (o.signal?.aborted) {
          if (type === 'none') {
            buildSegments(c, off, 0, false);
            await vol.commitJson(c.j);
          }
          return false;
        }
        const len = Math.min(maxLen, c.total - off);
        const b = buf.subarray(0, len);
        await data.read(c.dataOff + off, b);
        if (type !== 'none') {
          buildSegments(c, off, len, true);
          const store = type === 'checksum' ? checksums(c, b) : b;
          await meta.write(c.area.offset, store);
          await meta.flush();
          await vol.commitJson(c.j);
        }
        const sector = c.ivBase + BigInt(off / 512);
        await oldC.decryptAsync(b, sector);
        await newC.encryptAsync(b, sector);
        await data.write(c.dataOff + off, b);
        if (type !== 'none') await data.flush();
        off += len;
        if (off < c.total && type !== 'none') {
          buildSegments(c, off - len, len, false);
          await vol.commitJson(c.j);
        }
        o.onProgress?.(off, c.total);
      }
    } finally {
      buf.fill(0);
    }
    await data.flush();
    await finish(vol, c);
    return true;
  } finally {
    oldC?.dispose();
    newC?.dispose();
    wipeKeys();
  }
}

/** The final header: the new segment alone, old keyslots, backups, requirement and reencrypt keyslot gone. */
async function finish(vol: Luks2Volume, c: Ctx): Promise<void> {
  const j = c.j;
  const wipe: Array<[number, number]> = [];
  const seg = structuredClone(c.fin);
  seg.flags = (seg.flags ?? []).filter((f) => f !== 'backup-final');
  if (seg.flags.length === 0) delete seg.flags;
  j.segments = { '0': seg };
  for (const d of Object.values(j.digests)) d.segments = [];
  j.digests[c.dNew]!.segments = ['0'];
  const rd = digestOfKeyslot(j, c.ksId);
  const gone = new Set([c.ksId, ...j.digests[c.dOld]!.keyslots]);
  for (const id of gone) {
    const k = j.keyslots[id];
    if (k && id !== c.ksId) wipe.push([Number(k.area.offset), Number(k.area.size)]);
    delete j.keyslots[id];
  }
  for (const t of Object.values(j.tokens)) t.keyslots = t.keyslots.filter((x) => !gone.has(x));
  delete j.digests[c.dOld];
  if (rd !== undefined) delete j.digests[rd];
  const req = j.config.requirements;
  if (req) {
    req.mandatory = (req.mandatory ?? []).filter((x) => !x.startsWith('online-reencrypt'));
    if (req.mandatory.length === 0) delete req.mandatory;
    if (Object.keys(req).length === 0) delete j.config.requirements;
  }
  await vol.commitJson(j);
  for (const [o, n] of wipe) await wipeArea(vol.metadataDevice, o, n);
}
