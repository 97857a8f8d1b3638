/**
 * LUKS1 <-> LUKS2 conversion in place (cryptsetup `convert --type luks1|luks2`; the rules follow
 * cryptsetup 2.6 lib/luks2/luks2_luks1_convert.c, checked against cryptsetup 2.6.1).
 *
 * The layouts: LUKS1 keeps its 1024-byte header at 0 and keyslot material from sector 8; LUKS2 has
 * two 16 KiB header copies and its keyslots area from 32 KiB. cryptsetup moves every keyslot by the
 * difference (28 KiB) and keeps everything else: same UUID, data offset, cipher, salts, digest and
 * iterations; a converted LUKS2 header has seqid 1, 16 KiB metadata and a keyslots area up to the data
 * offset. Refused, as cryptsetup refuses (exit 1): LUKS2 -> LUKS1 with a sector size other than 512,
 * more than one digest or a non-pbkdf2 one (unbound keys), more segments, any token, an active keyslot
 * above 7 or one LUKS1 cannot express (argon2, another hash, its own cipher or key size, another area
 * size); LUKS1 -> LUKS2 with keyslots not starting at sector 8, a cipher LUKS2 keyslots cannot use,
 * LUKSMETA data after the keyslots, or too little room for the shifted keyslots.
 *
 * Crash safety (cryptsetup moves the whole keyslot region in one write, which a power cut can leave
 * half done): the keyslots are moved one at a time while the LUKS1 header is in charge, each through
 * the area of an inactive LUKS1 keyslot (copy there, header write, copy to the target, header write),
 * so every LUKS1 header written points at whole key material. LUKS1 -> LUKS2 moves first and then
 * writes the LUKS2 secondary copy (not at offset 0, so LUKS1 stays in charge), then the primary (from
 * its first byte on, LUKS2 loads from the secondary). LUKS2 -> LUKS1 first writes a LUKS1 header that
 * names the keyslots where LUKS2 has them (one sector write switches the format), then moves them down
 * and zeroes the rest of the old LUKS2 headers. With all eight LUKS1 keyslots active there is no spare
 * area: the move is done in one pass and a warning says it is not crash-safe.
 */
import { randomBytes } from 'node:crypto';
import type { BlockDevice } from '../blockdev/types.js';
import { afSplitBytes } from '../crypto/af.js';
import { checkKeyBytes, parseCipherSpec } from '../crypto/cipher-spec.js';
import { createSectorCipher } from '../engine/index.js';
import { CryptmapError } from '../util/errors.js';
import { logger } from '../util/log.js';
import { LUKS_STRIPES } from './constants.js';
import {
  decodeLuks1,
  encodeLuks1,
  LUKS_KEY_DISABLED,
  LUKS_KEY_ENABLED,
  LUKS_NUMKEYS,
  type Luks1Header,
  Luks1Volume,
  validateLuks1,
} from './luks1.js';
import { encodeBinHeader, LUKS2_HDR_BIN_LEN, writeCopy } from './luks2-disk.js';
import { VALIDATORS } from './luks2-handlers.js';
import { buildJsonArea, type L2Keyslot, type Luks2Json, validateLuks2Json } from './luks2-json.js';
import { Luks2Volume } from './luks2.js';

const log = logger('luks-convert');

const HDR16K = 0x4000;
/** LUKS2 keyslots start at 2 * 16 KiB, LUKS1 ones at 4 KiB: the shift, in bytes and in sectors. */
const SHIFT_BYTES = 2 * HDR16K - 4096;
const SHIFT_SECTORS = SHIFT_BYTES / 512;
const UINT32_MAX = 0xffffffff;

function refuse(message: string, exitCode = 1): CryptmapError {
  return new CryptmapError('ECONVERT', message, { exitCode, errno: 'EINVAL' });
}

const alignUp = (n: number, a: number) => Math.ceil(n / a) * a;

/** "aes-xts-plain64" -> name "aes", mode "xts-plain64" (crypt_parse_name_and_mode); "cipher_null" has no mode. */
function nameAndMode(spec: string): { name: string; mode: string } {
  if (spec.startsWith('capi:'))
    throw refuse(`Cannot convert to LUKS1 format - cipher ${spec} cannot be stored in a LUKS1 header.`);
  const i = spec.indexOf('-');
  return i < 0 ? { name: spec, mode: '' } : { name: spec.slice(0, i), mode: spec.slice(i + 1) };
}

/** LUKS2_check_cipher: can the keyslot storage wrapper decrypt a 512-byte sector with this cipher and key size? */
function luks2CipherUsable(spec: string, keyBytes: number): boolean {
  try {
    checkKeyBytes(parseCipherSpec(spec), keyBytes);
    const c = createSectorCipher({ spec, key: randomBytes(keyBytes), sectorBytes: 512 });
    c.dispose();
    return true;
  } catch {
    return false;
  }
}

// ---- moving LUKS1 keyslot material with a LUKS1 header in charge ------------------------------

type Step = { kind: 'copy'; from: number; to: number } | { kind: 'header'; h: Luks1Header };

/** A deep copy (structuredClone would turn the Buffers into plain Uint8Arrays). */
function cloneHeader(h: Readonly<Luks1Header>): Luks1Header {
  return {
    ...h,
    mkDigest: Buffer.from(h.mkDigest),
    mkDigestSalt: Buffer.from(h.mkDigestSalt),
    keyblock: h.keyblock.map((k) => ({ ...k, salt: Buffer.from(k.salt) })),
  };
}

function valid(h: Luks1Header, deviceBytes: number): boolean {
  try {
    validateLuks1(h, deviceBytes);
    return true;
  } catch {
    return false;
  }
}

const overlaps = (a: number, b: number, len: number) => a < b + len && b < a + len;

/**
 * Plan moving every LUKS1 keyslot (sector offsets) to `target`, one keyslot at a time, so that every
 * header on the way is a valid LUKS1 header whose active keyslots point at whole material. Returns the
 * copies and header writes in order, or null when no such order exists (no inactive keyslot to use as
 * scratch space, or targets that collide).
 */
export function planLuks1Moves(h0: Luks1Header, target: readonly number[], deviceBytes: number): Step[] | null {
  const afSectors = afSplitBytes(h0.keyBytes, LUKS_STRIPES) / 512;
  let h = cloneHeader(h0);
  const steps: Step[] = [];
  const withOffsets = (base: Luks1Header, change: Record<number, number>): Luks1Header => {
    const n = cloneHeader(base);
    for (const [k, o] of Object.entries(change)) n.keyblock[Number(k)]!.keyMaterialOffset = o;
    return n;
  };
  for (let round = 0; round < 4 * LUKS_NUMKEYS; round++) {
    const pending = h.keyblock.map((_, k) => k).filter((k) => h.keyblock[k]!.keyMaterialOffset !== target[k]);
    if (pending.length === 0) return mergeHeaders(steps);
    // Upward moves are done from the top down, downward ones from the bottom up.
    pending.sort((a, b) => {
      const ua = target[a]! > h.keyblock[a]!.keyMaterialOffset;
      const oa = h.keyblock[a]!.keyMaterialOffset;
      const ob = h.keyblock[b]!.keyMaterialOffset;
      return ua ? ob - oa : oa - ob;
    });
    let progress = false;
    for (const k of pending) {
      const kb = h.keyblock[k]!;
      const A = kb.keyMaterialOffset;
      const B = target[k]!;
      const direct = withOffsets(h, { [k]: B });
      if (!valid(direct, deviceBytes)) continue;
      if (kb.active !== LUKS_KEY_ENABLED) {
        steps.push({ kind: 'header', h: direct });
        h = direct;
        progress = true;
        continue;
      }
      if (!overlaps(A, B, afSectors)) {
        steps.push({ kind: 'copy', from: A, to: B }, { kind: 'header', h: direct });
        h = direct;
        progress = true;
        continue;
      }
      // The material overlaps its own target: go through an inactive keyslot's area.
      for (let j = 0; j < LUKS_NUMKEYS; j++) {
        const jb = h.keyblock[j]!;
        if (j === k || jb.active === LUKS_KEY_ENABLED) continue;
        const R = jb.keyMaterialOffset;
        if (overlaps(R, A, afSectors) || overlaps(R, B, afSectors)) continue;
        const via = withOffsets(h, { [k]: R, [j]: A });
        if (!valid(via, deviceBytes)) continue;
        steps.push(
          { kind: 'copy', from: A, to: R },
          { kind: 'header', h: via },
          { kind: 'copy', from: R, to: B },
          { kind: 'header', h: direct },
        );
        h = direct;
        progress = true;
        break;
      }
    }
    if (!progress) return null;
  }
  return null;
}

/** Header writes with no copy between them: only the last one matters. */
function mergeHeaders(steps: Step[]): Step[] {
  const out: Step[] = [];
  for (const s of steps) {
    const last = out[out.length - 1];
    if (s.kind === 'header' && last?.kind === 'header') out[out.length - 1] = s;
    else out.push(s);
  }
  return out;
}

async function copySectors(dev: BlockDevice, from: number, to: number, sectors: number): Promise<void> {
  const buf = Buffer.alloc(sectors * 512);
  try {
    await dev.read(from * 512, buf);
    await dev.write(to * 512, buf);
    await dev.flush();
  } finally {
    buf.fill(0);
  }
}

/**
 * Write the LUKS1 header `h`. It is 592 bytes: keyslot 6's offset and all of keyslot 7 lie in its
 * second sector, and a two-sector write may reach the disk as either sector alone. So the sectors
 * that change are written one at a time, each flushed, in an order whose half-way state opens: over a
 * LUKS2 header the second sector first (the first sector still LUKS2, only the primary copy's checksum
 * fails and the secondary copy opens it); over a LUKS1 header whichever order leaves a valid header
 * between the two writes. When neither does (a keyslot swapping areas with one in the other sector)
 * the two sectors go in one write, as before: not safe against a torn write.
 */
async function writeLuks1Header(dev: BlockDevice, h: Luks1Header): Promise<void> {
  const next = encodeLuks1(h);
  const cur = Buffer.alloc(next.length);
  await dev.read(0, cur);
  const changed = [0, 512].filter((at) => !cur.subarray(at, at + 512).equals(next.subarray(at, at + 512)));
  let order: number[] | null = changed;
  if (changed.length === 2) {
    const opensHalfWay = (first: number): boolean => {
      const mid = Buffer.from(cur);
      next.copy(mid, first, first, first + 512);
      try {
        return valid(decodeLuks1(mid), dev.sizeBytes);
      } catch {
        return false;
      }
    };
    const onLuks1 = cur.subarray(0, 8).equals(next.subarray(0, 8)); // magic and version 1
    order = !onLuks1 ? [512, 0] : opensHalfWay(512) ? [512, 0] : opensHalfWay(0) ? [0, 512] : null;
  }
  if (order === null) {
    await dev.write(0, next);
    await dev.flush();
    return;
  }
  for (const at of order) {
    await dev.write(at, next.subarray(at, at + 512));
    await dev.flush();
  }
}

/**
 * Bring the LUKS1 header `h` (already on disk) to the keyslot offsets `target`, crash-safely when a
 * plan exists, else in one pass (all material read first) with a warning. The final header is written
 * last in both cases.
 */
async function moveLuks1Keyslots(dev: BlockDevice, h: Luks1Header, target: readonly number[]): Promise<Luks1Header> {
  const afSectors = afSplitBytes(h.keyBytes, LUKS_STRIPES) / 512;
  const plan = planLuks1Moves(h, target, dev.sizeBytes);
  if (plan) {
    let last = h;
    for (const s of plan) {
      if (s.kind === 'copy') await copySectors(dev, s.from, s.to, afSectors);
      else {
        await writeLuks1Header(dev, s.h);
        last = s.h;
      }
    }
    return last;
  }
  log.warn(
    'every LUKS1 keyslot is in use: there is no spare area to move keyslots through; the conversion is not crash-safe',
  );
  const active = h.keyblock.map((k, i) => ({ k, i })).filter(({ k }) => k.active === LUKS_KEY_ENABLED);
  const bufs = await Promise.all(
    active.map(async ({ k }) => {
      const b = Buffer.alloc(afSectors * 512);
      await dev.read(k.keyMaterialOffset * 512, b);
      return b;
    }),
  );
  const done = cloneHeader(h);
  try {
    for (let n = 0; n < active.length; n++) await dev.write(target[active[n]!.i]! * 512, bufs[n]!);
    await dev.flush();
  } finally {
    for (const b of bufs) b.fill(0);
  }
  done.keyblock.forEach((k, i) => {
    k.keyMaterialOffset = target[i]!;
  });
  await writeLuks1Header(dev, done);
  return done;
}

/** Options of `convertLuks1ToLuks2`/`convertLuks2ToLuks1` (cryptsetup convert). */
export interface ConvertOptions {
  /**
   * Called after every check, before the first write; may throw to stop (cryptsetup checks whether the
   * device is active, luks_header_in_use, at that point).
   */
  beforeWrite?: () => Promise<void>;
}

// ---- LUKS1 -> LUKS2 ---------------------------------------------------------------------------

/** The LUKS2 JSON cryptsetup builds from a LUKS1 header (json_luks1_object), keyslots already shifted. */
function luks2JsonFromLuks1(h: Luks1Header, keyslotsBytes: number): Luks2Json {
  const cipher = h.cipherMode ? `${h.cipherName}-${h.cipherMode}` : h.cipherName;
  const areaBytes = alignUp(afSplitBytes(h.keyBytes, LUKS_STRIPES), 4096);
  const keyslots: Record<string, L2Keyslot> = {};
  const active: string[] = [];
  h.keyblock.forEach((k, i) => {
    if (k.active !== LUKS_KEY_ENABLED) return;
    active.push(String(i));
    keyslots[String(i)] = {
      type: 'luks2',
      key_size: h.keyBytes,
      kdf: { type: 'pbkdf2', hash: h.hashSpec, iterations: k.iterations, salt: k.salt.toString('base64') },
      af: { type: 'luks1', hash: h.hashSpec, stripes: LUKS_STRIPES },
      area: {
        type: 'raw',
        encryption: cipher,
        key_size: h.keyBytes,
        offset: String(k.keyMaterialOffset * 512 + SHIFT_BYTES),
        size: String(areaBytes),
      },
    };
  });
  return {
    keyslots,
    tokens: {},
    segments: {
      '0': {
        type: 'crypt',
        offset: String(h.payloadOffset * 512),
        iv_tweak: '0',
        size: 'dynamic',
        encryption: cipher,
        sector_size: 512,
      },
    },
    digests: {
      '0': {
        type: 'pbkdf2',
        keyslots: active,
        segments: ['0'],
        hash: h.hashSpec,
        salt: h.mkDigestSalt.toString('base64'),
        digest: h.mkDigest.subarray(0, 20).toString('base64'),
        iterations: h.mkDigestIterations,
      },
    },
    config: {
      json_size: String(HDR16K - LUKS2_HDR_BIN_LEN),
      keyslots_size: String(keyslotsBytes - (keyslotsBytes % 4096)),
    },
  };
}

/**
 * Convert the LUKS1 header on `dev` (the header device when detached) to LUKS2 in place. Every check
 * runs before the first write.
 */
export async function convertLuks1ToLuks2(dev: BlockDevice, opts: ConvertOptions = {}): Promise<void> {
  const vol = await Luks1Volume.open(dev);
  const h = cloneHeader(vol.header);
  if (!dev.capabilities.write)
    throw new CryptmapError('EROFS', 'Device is read-only.', { exitCode: 1, errno: 'EPERM' });
  const afSectors = afSplitBytes(h.keyBytes, LUKS_STRIPES) / 512;
  const lastEnd = Math.max(...h.keyblock.map((k) => k.keyMaterialOffset + afSectors));
  const luks1Bytes = alignUp(lastEnd * 512, 4096);
  if (Math.min(...h.keyblock.map((k) => k.keyMaterialOffset)) !== 8)
    throw refuse('Cannot convert to LUKS2 format - unsupported keyslots material offset.');
  const cipher = h.cipherMode ? `${h.cipherName}-${h.cipherMode}` : h.cipherName;
  if (!luks2CipherUsable(cipher, h.keyBytes)) throw refuse(`Unable to use cipher specification ${cipher} for LUKS2.`);
  if (luks1Bytes + 8 <= dev.sizeBytes) {
    const m = Buffer.alloc(8);
    await dev.read(luks1Bytes, m);
    if (m.equals(Buffer.from('LUKSMETA', 'latin1')))
      throw refuse('Unable to convert header with LUKSMETA additional metadata.');
  }
  // The keyslots area reaches the data offset (a detached header: the end of the header device).
  const maxBytes = h.payloadOffset ? h.payloadOffset * 512 : dev.sizeBytes;
  const required = luks1Bytes + SHIFT_BYTES;
  if (maxBytes < required) throw refuse('Unable to move keyslot area. Not enough space.');
  const json = luks2JsonFromLuks1(h, maxBytes - 2 * HDR16K);
  if (luks1Bytes - 4096 > Number(json.config.keyslots_size))
    throw refuse('Unable to move keyslot area. LUKS2 keyslots area too small.');
  try {
    validateLuks2Json(structuredClone(json), HDR16K - LUKS2_HDR_BIN_LEN, VALIDATORS);
  } catch (e) {
    throw new CryptmapError('ECONVERT', 'Cannot convert to LUKS2 format - invalid metadata.', {
      exitCode: 1,
      errno: 'EINVAL',
      cause: e,
    });
  }
  const area = buildJsonArea(json, HDR16K);
  const target = h.keyblock.map((k) => k.keyMaterialOffset + SHIFT_SECTORS);
  if (target.some((t) => t > UINT32_MAX)) throw refuse('Cannot convert to LUKS2 format - invalid metadata.');
  await opts.beforeWrite?.();
  await moveLuks1Keyslots(dev, h, target);
  const common = { hdrSize: HDR16K, seqid: 1n, label: '', checksumAlg: 'sha256', uuid: h.uuid, subsystem: '' };
  // Secondary first: LUKS1 stays in charge until the primary's first byte changes.
  await writeCopy(dev, { ...common, kind: 'secondary', salt: randomBytes(64), hdrOffset: BigInt(HDR16K) }, area);
  const primary = { ...common, kind: 'primary' as const, salt: randomBytes(64), hdrOffset: 0n };
  // The LUKS1 header's second sector (keyslots 6 and 7) is overwritten by the primary's first write;
  // a torn write could change it while the first sector still says LUKS1. So the first sector goes
  // alone first: from then on it is a LUKS2 primary with no checksum, and the secondary opens it.
  await dev.write(0, encodeBinHeader(primary).subarray(0, 512));
  await dev.flush();
  await writeCopy(dev, primary, area);
}

// ---- LUKS2 -> LUKS1 ---------------------------------------------------------------------------

/** keyslot_LUKS1_compatible: can this LUKS2 keyslot become a LUKS1 one as it is? */
function keyslotLuks1Compatible(j: Luks2Json, k: string, keyBytes: number, hash: string): boolean {
  const ks = j.keyslots[k]!;
  if (ks.type !== 'luks2') return false;
  if (ks.kdf?.type !== 'pbkdf2' || ks.kdf.hash !== hash) return false;
  if (ks.af?.stripes !== LUKS_STRIPES || ks.af.hash !== hash) return false;
  if (ks.area?.encryption !== j.segments['0']?.encryption || ks.area?.key_size !== keyBytes) return false;
  return Number(ks.area.size) === alignUp(afSplitBytes(keyBytes, LUKS_STRIPES), 4096);
}

/** First gap of `bytes` in the keyslots area (LUKS2_find_area_gap), given the areas in use. */
function findGap(used: { o: number; e: number }[], start: number, end: number, bytes: number): number | null {
  let off = start;
  for (const u of [...used].sort((a, b) => a.o - b.o)) {
    if (off < u.o && off + bytes <= u.o) break;
    off = Math.max(off, u.e);
  }
  return off + bytes > end ? null : off;
}

/**
 * Convert the LUKS2 header on `dev` (the header device when detached) to LUKS1 in place. Every check
 * runs before the first write.
 */
export async function convertLuks2ToLuks1(dev: BlockDevice, opts: ConvertOptions = {}): Promise<void> {
  const vol = await Luks2Volume.open(dev);
  vol.assertChangeable();
  const j = vol.json;
  const seg = j.segments['0'];
  if (!seg) throw refuse('Cannot convert to LUKS1 format - invalid metadata.');
  if (seg.sector_size !== 512)
    throw refuse('Cannot convert to LUKS1 format - default segment encryption sector size is not 512 bytes.');
  const digests = Object.keys(j.digests);
  const d = j.digests['0'];
  if (d?.type !== 'pbkdf2' || digests.length !== 1)
    throw refuse('Cannot convert to LUKS1 format - key slot digests are not LUKS1 compatible.');
  const hash = d.hash!;
  const cipherSpec = seg.encryption ?? '';
  const { name, mode } = nameAndMode(cipherSpec);
  if (name.startsWith('paes')) throw refuse(`Cannot convert to LUKS1 format - device uses wrapped key cipher ${name}.`);
  if (Object.keys(j.segments).length !== 1) throw refuse('Cannot convert to LUKS1 format - device uses more segments.');
  const tokens = Object.keys(j.tokens).length;
  if (tokens > 0) throw refuse(`Cannot convert to LUKS1 format - LUKS2 header contains ${tokens} token(s).`);
  const first = d.keyslots[0];
  if (first === undefined) throw refuse('Cannot convert to LUKS1 format - no active keyslot.');
  const keyBytes = j.keyslots[first]!.key_size;
  const ids = Object.keys(j.keyslots)
    .map(Number)
    .sort((a, b) => a - b);
  for (const i of ids) {
    if (!d.keyslots.includes(String(i)))
      throw refuse(`Cannot convert to LUKS1 format - keyslot ${i} is in invalid state.`);
    if (i >= LUKS_NUMKEYS)
      throw refuse(`Cannot convert to LUKS1 format - slot ${i} (over maximum slots) is still active.`);
    if (!keyslotLuks1Compatible(j, String(i), keyBytes, hash))
      throw refuse(`Cannot convert to LUKS1 format - keyslot ${i} is not LUKS1 compatible.`);
  }
  const digest = Buffer.from(d.digest ?? '', 'base64');
  const salt = Buffer.from(d.salt ?? '', 'base64');
  if (digest.length < 20 || salt.length !== 32)
    throw refuse('Cannot convert to LUKS1 format - key slot digests are not LUKS1 compatible.');
  const payload = Number(seg.offset) / 512;
  if (payload > UINT32_MAX) throw refuse('Cannot convert to LUKS1 format - data offset is too large.');
  const { name: ksName, mode: ksMode } = nameAndMode(j.keyslots[String(ids[ids.length - 1])]!.area.encryption!);
  if (
    Buffer.byteLength(ksName, 'latin1') >= 32 ||
    Buffer.byteLength(ksMode, 'latin1') >= 32 ||
    Buffer.byteLength(hash, 'latin1') >= 32
  ) {
    throw refuse('Cannot convert to LUKS1 format - cipher or hash name is too long.');
  }
  void name;
  void mode;

  // LUKS1 keyslots where LUKS2 has them now; inactive ones get the free gaps cryptsetup's placeholders take.
  const areaBytes = alignUp(afSplitBytes(keyBytes, LUKS_STRIPES), 4096);
  const start = 2 * vol.metadataBytes;
  const end = start + vol.keyslotsBytes;
  const used = Object.values(j.keyslots).map((ks) => ({
    o: Number(ks.area.offset),
    e: Number(ks.area.offset) + Number(ks.area.size),
  }));
  const now: number[] = [];
  for (let i = 0; i < LUKS_NUMKEYS; i++) {
    const ks = j.keyslots[String(i)];
    let off: number;
    if (ks) off = Number(ks.area.offset);
    else {
      const gap = findGap(used, start, end, areaBytes);
      if (gap === null)
        throw refuse(
          'Cannot convert to LUKS1 format - not enough space in the keyslots area for the inactive LUKS1 keyslots.',
        );
      used.push({ o: gap, e: gap + areaBytes });
      off = gap;
    }
    if (off / 512 - SHIFT_SECTORS < 8 || off % 512 !== 0)
      throw refuse('Cannot convert to LUKS1 format - keyslot area offset is not LUKS1 compatible.');
    now.push(off / 512);
  }
  const h: Luks1Header = {
    version: 1,
    cipherName: ksName,
    cipherMode: ksMode,
    hashSpec: hash,
    payloadOffset: payload,
    keyBytes,
    mkDigest: Buffer.from(digest.subarray(0, 20)),
    mkDigestSalt: salt,
    mkDigestIterations: d.iterations!,
    uuid: vol.uuid,
    keyblock: now.map((o, i) => {
      const ks = j.keyslots[String(i)];
      return ks
        ? {
            active: LUKS_KEY_ENABLED,
            iterations: ks.kdf.iterations!,
            salt: Buffer.from(ks.kdf.salt, 'base64'),
            keyMaterialOffset: o,
            stripes: LUKS_STRIPES,
          }
        : {
            active: LUKS_KEY_DISABLED,
            iterations: 0,
            salt: Buffer.alloc(32),
            keyMaterialOffset: o,
            stripes: LUKS_STRIPES,
          };
    }),
  };
  if (!valid(h, dev.sizeBytes)) throw refuse('Cannot convert to LUKS1 format - invalid metadata.');
  // The header must round-trip through the LUKS1 decoder exactly.
  decodeLuks1(encodeLuks1(h));
  const target = now.map((o) => o - SHIFT_SECTORS);
  const final = cloneHeader(h);
  final.keyblock.forEach((k, i) => {
    k.keyMaterialOffset = target[i]!;
  });
  if (!valid(final, dev.sizeBytes)) throw refuse('Cannot convert to LUKS1 format - invalid metadata.');

  await opts.beforeWrite?.();
  // One sector write switches the device to LUKS1 (keyslots still where LUKS2 put them).
  await writeLuks1Header(dev, h);
  const done = await moveLuks1Keyslots(dev, h, target);
  // Zero what is left of the LUKS2 headers (everything below 32 KiB but the LUKS1 header and live key material).
  const afBytes = afSplitBytes(keyBytes, LUKS_STRIPES);
  const live = done.keyblock
    .filter((k) => k.active === LUKS_KEY_ENABLED)
    .map((k) => ({ o: k.keyMaterialOffset * 512, e: k.keyMaterialOffset * 512 + afBytes }));
  const zero = Buffer.alloc(512);
  for (let o = 1024; o < 2 * HDR16K && o < dev.sizeBytes; o += 512) {
    if (live.some((r) => o < r.e && r.o < o + 512)) continue;
    await dev.write(o, zero);
  }
  await dev.flush();
}
