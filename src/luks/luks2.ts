/**
 * LUKS2 semantics: loading with recovery from one bad header copy, unlocking keyslots by priority,
 * formatting and every header change, written crash-safely (LUKS2 On-Disk Format Specification §2-§4;
 * cryptsetup lib/luks2/luks2_disk_metadata.c `LUKS2_disk_hdr_read`/`_write`, luks2_json_format.c,
 * luks2_keyslot.c, luks2_token.c).
 *
 * Crash safety: every change writes new key material only into unused areas first, then the header
 * (primary copy, then secondary, each invalid-then-valid, see luks2-disk.ts `writeCopy`), and only
 * after that wipes areas no longer referenced. A process dying between any two writes leaves a
 * header that opens with the old or the new secret. Before writing, the on-disk seqid is compared
 * with the one loaded: a concurrent update is refused.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import type { BlockDevice } from '../blockdev/types.js';
import { afSplitBytes } from '../crypto/af.js';
import { checkKeyBytes, parseCipherSpec } from '../crypto/cipher-spec.js';
import { createSectorCipher } from '../engine/index.js';
import { calibrateKdf, type KdfParams } from '../crypto/kdf/index.js';
import type { SectorBytes } from '../engine/types.js';
import { alignUp } from '../util/bytes.js';
import { CryptmapError, EXIT_NO_PERMISSION, EXIT_WRONG_DEVICE, isCryptmapError } from '../util/errors.js';
import { logger } from '../util/log.js';
import { Secret } from '../util/secret.js';
import { wipeArea } from './keyslot-area.js';
import { foreignSignature } from './signatures.js';
import { LUKS2_HDR_BIN_LEN, LUKS2_HDR_SIZES, type Luks2BinHeader, type Luks2DiskCopy, readCopy, writeCopy } from './luks2-disk.js';
import { DIGEST_HANDLERS, handlerFor, KEYSLOT_HANDLERS, kdfJson, LUKS_SALTSIZE, LUKS_STRIPES, repairKeyslotKdf, TOKEN_HANDLERS, VALIDATORS } from './luks2-handlers.js';
import { buildJsonArea, type L2Keyslot, type L2Token, type Luks2Json, parseJsonArea, u64, unknownRequirements, validateLuks2Json } from './luks2-json.js';
import type { DataSegment, KeyAuth, KeyslotArea, KeyslotInfo, KeyslotPriority, LuksVolume, NewKeyslotOptions, UnlockOptions, UnlockResult } from './types.js';
import { removeKeyByPassphrase } from './volume-common.js';

const log = logger('luks2');

export const LUKS2_DEFAULT_METADATA_BYTES = 0x4000;
export const LUKS2_DEFAULT_DATA_OFFSET_BYTES = 0x1000000;
export const LUKS2_MAX_KEYSLOTS_SIZE = 0x8000000;
export const LUKS2_KEYSLOTS_MAX = 32;
export const LUKS2_TOKENS_MAX = 32;
/** Digest PBKDF2 iterations when the KDF is forced (cryptsetup uses the minimum then). */
export const LUKS2_DIGEST_MIN_ITERATIONS = 1000;

export function noKeyError(): CryptmapError {
  return new CryptmapError('ENOKEY', 'No key available with this passphrase.', { exitCode: EXIT_NO_PERMISSION, errno: 'EPERM' });
}

/** Unlock with a named --key-slot that is not active: cryptsetup's -ENOENT (exit 1) and its message. */
export function noUsableKeyslot(slot: number): CryptmapError {
  return new CryptmapError('EKEYSLOT', 'No usable keyslot is available.', { exitCode: 1, errno: 'ENOENT', context: { keyslot: slot } });
}

interface CopyState {
  ok: boolean;
  copy?: Luks2DiskCopy;
  json?: Luks2Json;
  error?: CryptmapError;
}

async function loadCopy(dev: BlockDevice, offset: number, kind: 'primary' | 'secondary'): Promise<CopyState> {
  try {
    const copy = await readCopy(dev, offset, kind);
    const raw = parseJsonArea(copy.jsonArea) as Record<string, unknown>;
    // Leftover parameters of another KDF type are dropped before validation (luks2_keyslot_repair).
    if (raw && typeof raw.keyslots === 'object' && raw.keyslots !== null) for (const ks of Object.values(raw.keyslots as object)) repairKeyslotKdf(ks);
    const json = validateLuks2Json(raw, copy.bin.hdrSize - LUKS2_HDR_BIN_LEN, VALIDATORS);
    return { ok: true, copy, json };
  } catch (e) {
    if (isCryptmapError(e)) return { ok: false, error: e };
    throw e;
  }
}

/** Result of reading both header copies. */
export interface Luks2ReadResult {
  bin: Luks2BinHeader;
  json: Luks2Json;
  primary: CopyState;
  secondary: CopyState;
  /** The copy that was used. */
  used: 'primary' | 'secondary';
  /** A copy is bad or stale and should be rewritten from the good one. */
  needsRepair: boolean;
  /**
   * The copy cryptsetup's load-time recovery rewrites from the good one: the invalid copy, or the
   * one with the lower seqid; null when both are valid with the same seqid.
   */
  stale: 'primary' | 'secondary' | null;
}

/** Read both copies (secondary at hdr_size, else scanned at the nine offsets) and pick the good, newest one. */
export async function readLuks2(dev: BlockDevice): Promise<Luks2ReadResult> {
  const primary = await loadCopy(dev, 0, 'primary');
  let secondary: CopyState = { ok: false };
  if (primary.ok) {
    secondary = await loadCopy(dev, primary.copy!.bin.hdrSize, 'secondary');
  } else {
    for (const off of LUKS2_HDR_SIZES) {
      if (off + LUKS2_HDR_BIN_LEN > dev.sizeBytes) break;
      secondary = await loadCopy(dev, off, 'secondary');
      if (secondary.ok) break;
    }
  }
  if (!primary.ok && !secondary.ok) {
    const err = primary.error ?? secondary.error;
    if (err?.code === 'ELUKS2MAGIC' && secondary.error?.code !== 'ELUKS2CSUM' && secondary.error?.code !== 'ELUKS2JSON') {
      throw new CryptmapError('ENOTLUKS', 'Device is not a valid LUKS device.', { exitCode: 1, cause: err });
    }
    if (err?.code === 'ELUKS2JSON') {
      // Metadata that does not parse or fails a named check: cryptsetup's "not a valid LUKS device"
      // (exit 1); the message keeps the check and key path that failed.
      throw new CryptmapError('ENOTLUKS', `Device is not a valid LUKS device (${err.message}).`, { exitCode: 1, cause: err, context: err.context });
    }
    throw new CryptmapError('ELUKS2HDR', `LUKS2 header is damaged beyond repair: ${err?.message ?? 'no valid copy'}`, { exitCode: EXIT_WRONG_DEVICE, cause: err });
  }
  let used: 'primary' | 'secondary' = primary.ok ? 'primary' : 'secondary';
  if (primary.ok && secondary.ok && secondary.copy!.bin.seqid > primary.copy!.bin.seqid) used = 'secondary';
  const chosen = used === 'primary' ? primary : secondary;
  const needsRepair =
    !primary.ok ||
    !secondary.ok ||
    primary.copy!.bin.seqid !== secondary.copy!.bin.seqid ||
    primary.copy!.bin.hdrSize !== secondary.copy!.bin.hdrSize ||
    !primary.copy!.jsonArea.equals(secondary.copy!.jsonArea);
  if (needsRepair) log.debug('LUKS2 header copies differ or one is damaged', { used, primary: primary.error?.message, secondary: secondary.error?.message });
  let stale: 'primary' | 'secondary' | null = null;
  if (!primary.ok || !secondary.ok) stale = primary.ok ? 'secondary' : 'primary';
  else if (primary.copy!.bin.seqid !== secondary.copy!.bin.seqid) stale = used === 'primary' ? 'secondary' : 'primary';
  return { bin: chosen.copy!.bin, json: chosen.json!, primary, secondary, used, needsRepair, stale };
}

function priorityName(p: number | undefined): KeyslotPriority {
  return p === 0 ? 'ignore' : p === 2 ? 'prefer' : 'normal';
}

export interface Luks2FormatOptions {
  /** Data cipher, default aes-xts-plain64. */
  cipher?: string;
  /** Volume key length in bytes, default 64. */
  keyBytes?: number;
  /** Volume key to use instead of a random one (copied). */
  volumeKey?: Uint8Array;
  sectorBytes?: SectorBytes;
  /** Data offset in bytes; default 16 MiB (0 allowed only with a detached header). */
  offsetBytes?: number;
  /** The header lives on its own device (data offset defaults to 0). */
  detachedHeader?: boolean;
  /**
   * Data alignment in bytes (cryptsetup --align-payload N = N * 512): without offsetBytes, data starts
   * after the metadata and keyslots areas rounded up to it, or with a detached header at it.
   */
  alignBytes?: number;
  metadataBytes?: number;
  keyslotsBytes?: number;
  uuid?: string;
  label?: string;
  subsystem?: string;
  /** PBKDF2 hash for the digest (and the pbkdf2 KDF), default sha256. */
  hash?: string;
  /** Keyslot for the passphrase (default 0); its KDF settings. */
  keyslot?: NewKeyslotOptions;
  /** Digest iterations (default: benchmarked 125 ms, or 1000 when the KDF is forced). */
  digestIterations?: number;
}

function checkUuid(uuid: string): void {
  if (!/^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$/.test(uuid)) {
    throw new CryptmapError('EUUID', `Wrong LUKS UUID format provided.`);
  }
}

async function resolveKdf(opts: NewKeyslotOptions | undefined, keyBytes: number, hash: string): Promise<KdfParams> {
  if (opts?.kdf) return opts.kdf;
  const type = opts?.pbkdf ?? 'argon2id';
  return calibrateKdf({ type, hash: opts?.hash ?? hash, iterTimeMs: opts?.iterTimeMs, maxMemoryKiB: opts?.pbkdfMemoryKiB, parallel: opts?.pbkdfParallel, keyBytes });
}

async function digestIterations(forced: boolean, hash: string, explicit?: number): Promise<number> {
  if (explicit !== undefined) return explicit;
  if (forced) return LUKS2_DIGEST_MIN_ITERATIONS;
  const p = await calibrateKdf({ type: 'pbkdf2', hash, iterTimeMs: 125, keyBytes: 32 });
  return p.type === 'pbkdf2' ? p.iterations : LUKS2_DIGEST_MIN_ITERATIONS;
}

/** The LUKS2 volume: header in memory, device for I/O. */
export class Luks2Volume implements LuksVolume {
  readonly type = 'luks2' as const;
  #dev: BlockDevice;
  #bin: Luks2BinHeader;
  #json: Luks2Json;
  #salts: { primary: Buffer; secondary: Buffer };
  #needsRepair: boolean;

  private constructor(dev: BlockDevice, r: { bin: Luks2BinHeader; json: Luks2Json; needsRepair: boolean; salts: { primary: Buffer; secondary: Buffer } }) {
    this.#dev = dev;
    this.#bin = r.bin;
    this.#json = r.json;
    this.#needsRepair = r.needsRepair;
    this.#salts = r.salts;
  }

  /** Load from a device (the header device when detached). Does not write; see `recoverHeader()` and `repair()`. */
  static async open(dev: BlockDevice): Promise<Luks2Volume> {
    const r = await readLuks2(dev);
    // cryptsetup LUKS2_device_size check on load: both metadata copies and the whole keyslots area must
    // be on the device (a truncated image is refused, not read past its end).
    const need = 2 * r.bin.hdrSize + Number(r.json.config.keyslots_size);
    if (dev.sizeBytes < need) throw new CryptmapError('EDEVSMALL', `Device is too small. Need at least ${need} bytes.`, { exitCode: 1, context: { needBytes: need } });
    return new Luks2Volume(dev, {
      bin: r.bin,
      json: r.json,
      needsRepair: r.needsRepair,
      salts: {
        primary: r.primary.ok ? r.primary.copy!.bin.salt : randomBytes(64),
        secondary: r.secondary.ok ? r.secondary.copy!.bin.salt : randomBytes(64),
      },
    });
  }

  /** Create a new LUKS2 header with one keyslot for `passphrase`. */
  static async format(dev: BlockDevice, passphrase: Uint8Array, o: Luks2FormatOptions = {}): Promise<Luks2Volume> {
    const cipher = o.cipher ?? 'aes-xts-plain64';
    const keyBytes = o.volumeKey?.length ?? o.keyBytes ?? 64;
    const sectorBytes = o.sectorBytes ?? 512;
    const hash = o.hash ?? 'sha256';
    const metadata = o.metadataBytes ?? LUKS2_DEFAULT_METADATA_BYTES;
    if (!(LUKS2_HDR_SIZES as readonly number[]).includes(metadata)) throw new CryptmapError('EPARAM', `Unsupported LUKS2 metadata size ${metadata}.`);
    if (![512, 1024, 2048, 4096].includes(sectorBytes)) throw new CryptmapError('EPARAM', `Unsupported encryption sector size.`);
    if (!Number.isInteger(keyBytes) || keyBytes < 1 || keyBytes > 512) throw new CryptmapError('EPARAM', 'Invalid volume key size.');
    const uuid = o.uuid ?? randomUUID();
    checkUuid(uuid);
    let offset = o.offsetBytes ?? (o.detachedHeader ? (o.alignBytes ?? 0) : undefined);
    let keyslotsBytes = o.keyslotsBytes;
    if (offset === undefined && o.alignBytes) {
      // LUKS2_generate_hdr: the default keyslots area (16 MiB with the metadata), then the alignment.
      offset = alignUp(2 * metadata + (keyslotsBytes ?? LUKS2_DEFAULT_DATA_OFFSET_BYTES - 2 * metadata), o.alignBytes);
    }
    if (offset === undefined) {
      // Default: data at 16 MiB, or after the metadata and keyslots asked for (aligned to 1 MiB).
      offset = keyslotsBytes !== undefined ? alignUp(2 * metadata + keyslotsBytes, 1 << 20) : Math.max(LUKS2_DEFAULT_DATA_OFFSET_BYTES, alignUp(2 * metadata + 4096, 1 << 20));
    }
    if (offset % 512 !== 0 || offset % sectorBytes !== 0) throw new CryptmapError('EPARAM', 'Data offset is not aligned to the sector size.');
    if (keyslotsBytes === undefined) {
      keyslotsBytes = offset === 0 ? LUKS2_DEFAULT_DATA_OFFSET_BYTES - 2 * metadata : offset - 2 * metadata;
      keyslotsBytes = Math.min(Math.floor(keyslotsBytes / 4096) * 4096, LUKS2_MAX_KEYSLOTS_SIZE);
    }
    if (keyslotsBytes % 4096 !== 0 || keyslotsBytes > LUKS2_MAX_KEYSLOTS_SIZE || keyslotsBytes <= 0) throw new CryptmapError('EPARAM', 'Invalid keyslots area size.');
    if (offset !== 0 && offset < 2 * metadata + keyslotsBytes) throw new CryptmapError('EPARAM', 'Data offset is too small for the LUKS2 metadata and keyslots areas.');
    const hdrAndAreas = 2 * metadata + keyslotsBytes;
    // The data may lie past the device's end (cryptsetup only warns: no room for data); the header may not.
    if (dev.sizeBytes < hdrAndAreas) {
      throw new CryptmapError('EDEVSMALL', `Device is too small. Need at least ${hdrAndAreas} bytes.`, { exitCode: 1, context: { needBytes: hdrAndAreas } });
    }
    const vk = o.volumeKey ? Buffer.from(o.volumeKey) : randomBytes(keyBytes);
    try {
      const kdf = await resolveKdf(o.keyslot, keyBytes, hash);
      const dIter = await digestIterations(o.keyslot?.kdf !== undefined, hash, o.digestIterations);
      const digest = await DIGEST_HANDLERS.pbkdf2!.create(vk, { hash, iterations: dIter });
      const json: Luks2Json = {
        keyslots: {},
        tokens: {},
        segments: {
          '0': { type: 'crypt', offset: String(offset), size: 'dynamic', iv_tweak: '0', encryption: cipher, sector_size: sectorBytes },
        },
        digests: { '0': { ...digest, keyslots: [], segments: ['0'] } },
        config: { json_size: String(metadata - LUKS2_HDR_BIN_LEN), keyslots_size: String(keyslotsBytes) },
      };
      const bin: Luks2BinHeader = {
        kind: 'primary',
        version: 2,
        hdrSize: metadata,
        seqid: 0n,
        label: o.label ?? '',
        checksumAlg: 'sha256',
        salt: randomBytes(64),
        uuid,
        subsystem: o.subsystem ?? '',
        hdrOffset: 0n,
        csum: Buffer.alloc(64),
      };
      // Check label and subsystem lengths before touching the device.
      if (Buffer.byteLength(bin.label, 'latin1') >= 48 || Buffer.byteLength(bin.subsystem, 'latin1') >= 48) throw new CryptmapError('EPARAM', 'Label or subsystem is too long (max 47 characters).');
      const v = new Luks2Volume(dev, { bin, json, needsRepair: false, salts: { primary: bin.salt, secondary: randomBytes(64) } });
      // Destroy any previous header first (both copies and the keyslots area), as cryptsetup does.
      await dev.writeZeroes(0, hdrAndAreas);
      await dev.flush();
      const slot = o.keyslot?.keySlot ?? 0;
      await v.#storeKeyslot(slot, vk, passphrase, kdf, '0', v.#keyslotEncryption(o.keyslot, vk.length));
      await v.#write(true);
      return v;
    } finally {
      vk.fill(0);
    }
  }

  get uuid(): string {
    return this.#bin.uuid;
  }
  get label(): string {
    return this.#bin.label;
  }
  get subsystem(): string {
    return this.#bin.subsystem;
  }
  get seqid(): bigint {
    return this.#bin.seqid;
  }
  get metadataBytes(): number {
    return this.#bin.hdrSize;
  }
  get keyslotsBytes(): number {
    return Number(this.#json.config.keyslots_size);
  }
  get headerBytes(): number {
    return 2 * this.#bin.hdrSize + this.keyslotsBytes;
  }
  get needsRepair(): boolean {
    return this.#needsRepair;
  }

  /**
   * Load-time recovery as cryptsetup does it on every load (LUKS2_disk_hdr_read with recovery): the
   * invalid copy, or the one with the lower seqid, is rewritten from the good one, byte for byte (its
   * JSON area and seqid), with a fresh salt for the rewritten copy; the good copy is not touched.
   * Nothing is written when the device is read-only, when both copies agree, or when the damaged
   * primary area carries the signature of another format (signatures.ts; cryptsetup refuses
   * auto-recovery over "ambiguous signatures" likewise): only an explicit `repair` overwrites that.
   * Returns the copy written, or null. `force` (the explicit `repair` verb, after its confirmation)
   * skips the signature check.
   */
  async recoverHeader(opts: { force?: boolean } = {}): Promise<'primary' | 'secondary' | null> {
    if (!this.#dev.capabilities.write) return null;
    const r = await readLuks2(this.#dev);
    if (r.stale === null) return null;
    if (r.bin.seqid !== this.#bin.seqid) {
      throw new CryptmapError('ECONCURRENT', 'Detected attempt for concurrent LUKS2 metadata update. Aborting operation.', { exitCode: 1, errno: 'EBUSY' });
    }
    const good = (r.used === 'primary' ? r.primary : r.secondary).copy!;
    const hdrSize = good.bin.hdrSize;
    const offset = r.stale === 'primary' ? 0 : hdrSize;
    if (offset + hdrSize > this.#dev.sizeBytes) return null;
    if (r.stale === 'primary' && !r.primary.ok && !opts.force) {
      const area = Buffer.alloc(hdrSize);
      await this.#dev.read(0, area);
      const other = foreignSignature(area);
      if (other !== null) {
        log.warn('Device contains ambiguous signatures, cannot auto-recover LUKS2; run repair to recover it', { signature: other });
        return null;
      }
    }
    const salt = randomBytes(64);
    const b = good.bin;
    await writeCopy(
      this.#dev,
      { kind: r.stale, hdrSize, seqid: b.seqid, label: b.label, checksumAlg: b.checksumAlg, salt, uuid: b.uuid, subsystem: b.subsystem, hdrOffset: BigInt(offset) },
      good.jsonArea,
    );
    this.#salts[r.stale] = salt;
    this.#needsRepair = false;
    return r.stale;
  }
  /** A deep copy of the JSON metadata. */
  get json(): Luks2Json {
    return structuredClone(this.#json);
  }
  get binHeader(): Readonly<Luks2BinHeader> {
    return this.#bin;
  }
  get activatable(): boolean {
    return unknownRequirements(this.#json).length === 0;
  }

  get dataSegment(): DataSegment {
    const seg = this.#json.segments['0'];
    if (seg?.type !== 'crypt') throw new CryptmapError('ESEGMENT', 'LUKS2 segment 0 is not a crypt segment.');
    const dg = Object.values(this.#json.digests).find((d) => d.segments.includes('0'));
    const ksId = dg?.keyslots[0];
    const keyBytes = ksId !== undefined ? this.#json.keyslots[ksId]!.key_size : 0;
    return {
      offsetBytes: Number(seg.offset),
      sizeBytes: seg.size === 'dynamic' ? 'dynamic' : Number(seg.size),
      cipher: seg.encryption!,
      sectorBytes: seg.sector_size as SectorBytes,
      ivTweak: BigInt(seg.iv_tweak ?? '0'),
      keyBytes,
    };
  }

  keyslots(): KeyslotInfo[] {
    return Object.keys(this.#json.keyslots)
      .map(Number)
      .sort((a, b) => a - b)
      .map((id) => {
        const ks = this.#json.keyslots[String(id)]!;
        const d = this.#digestOfKeyslot(String(id));
        const unbound = d !== undefined && !this.#json.digests[d]!.segments.includes('0');
        return { id, type: ks.type, active: true, priority: priorityName(ks.priority), kdf: ks.kdf?.type ?? '', ...(unbound ? { unbound } : {}) };
      });
  }

  keyslotAreas(): KeyslotArea[] {
    return Object.entries(this.#json.keyslots)
      .filter(([, ks]) => ks.area?.offset !== undefined && ks.area.size !== undefined)
      .map(([id, ks]) => ({ id: Number(id), offsetBytes: Number(ks.area.offset), sizeBytes: Number(ks.area.size) }));
  }

  /**
   * Move a keyslot's material to a free place in the keyslots area that overlaps none of `avoid`
   * (byte ranges [start, end)), then point the header at it: copy first, header write second, so a
   * crash leaves the keyslot usable at its old or its new place. The material is position independent
   * (keyslot area IVs count from the area start). Returns false, writing nothing, when no gap fits.
   */
  async relocateKeyslot(slot: number, avoid: ReadonlyArray<readonly [number, number]>): Promise<boolean> {
    this.#requireChangeable();
    const ks = this.#json.keyslots[String(slot)];
    if (!ks?.area) throw new CryptmapError('EKEYSLOT', `Keyslot ${slot} is not active.`, { errno: 'ENOENT' });
    const size = Number(ks.area.size);
    const start = 2 * this.#bin.hdrSize;
    const end = start + this.keyslotsBytes;
    const busy = [
      ...avoid.map(([a, b]) => ({ o: a, e: b })),
      ...Object.entries(this.#json.keyslots)
        .filter(([id]) => id !== String(slot))
        .map(([, k]) => ({ o: Number(k.area.offset), e: Number(k.area.offset) + Number(k.area.size) })),
      { o: Number(ks.area.offset), e: Number(ks.area.offset) + size },
    ].sort((a, b) => a.o - b.o);
    let off = start;
    for (const u of busy) {
      if (u.e <= off) continue;
      if (u.o >= off + size) break;
      off = alignUp(Math.max(off, u.e), 4096);
    }
    if (off + size > end) return false;
    const material = Buffer.alloc(size);
    try {
      await this.#dev.read(Number(ks.area.offset), material);
      await this.#dev.write(off, material);
      await this.#dev.flush();
    } finally {
      material.fill(0);
    }
    const before = ks.area.offset;
    ks.area.offset = String(off);
    try {
      await this.#write();
    } catch (e) {
      ks.area.offset = before;
      throw e;
    }
    return true;
  }

  /** Throws when this header may not be changed (unknown requirements, read-only device). */
  assertChangeable(): void {
    this.#requireChangeable();
  }

  #requireChangeable(): void {
    const unknown = unknownRequirements(this.#json);
    if (unknown.length) throw new CryptmapError('EREQUIREMENT', `Operation incompatible with device marked for unknown requirements (${unknown.join(', ')}).`, { errno: 'ENOTSUP' });
    if (!this.#dev.capabilities.write) throw new CryptmapError('EREADONLY', 'Device is read-only.', { exitCode: EXIT_NO_PERMISSION, errno: 'EPERM' });
  }

  #digestOfKeyslot(slot: string): string | undefined {
    return Object.keys(this.#json.digests).find((d) => this.#json.digests[d]!.keyslots.includes(slot));
  }

  /** The digest protecting segment 0 (the volume key). */
  #segmentDigest(): string {
    const id = Object.keys(this.#json.digests).find((d) => this.#json.digests[d]!.segments.includes('0'));
    if (id === undefined) throw new CryptmapError('EDIGEST', 'No digest for the data segment.');
    return id;
  }

  async verifyVolumeKey(vk: Uint8Array): Promise<boolean> {
    const d = this.#json.digests[this.#segmentDigest()]!;
    const h = handlerFor(DIGEST_HANDLERS, d.type);
    if (!h) return false;
    return h.verify(d, vk);
  }

  /** Slots to try, in cryptsetup's order: priority prefer, then normal (ignore only when named). */
  #candidates(keySlot?: number): string[] {
    if (keySlot !== undefined) {
      if (!this.#json.keyslots[String(keySlot)]) throw noUsableKeyslot(keySlot);
      return [String(keySlot)];
    }
    const ids = Object.keys(this.#json.keyslots).sort((a, b) => Number(a) - Number(b));
    const prio = (k: string) => this.#json.keyslots[k]!.priority ?? 1;
    return [...ids.filter((k) => prio(k) === 2), ...ids.filter((k) => prio(k) === 1)];
  }

  async unlock(passphrase: Uint8Array, opts: UnlockOptions = {}): Promise<UnlockResult> {
    let tried = 0;
    for (const k of this.#candidates(opts.keySlot)) {
      const ks = this.#json.keyslots[k]!;
      const h = handlerFor(KEYSLOT_HANDLERS, ks.type);
      if (!h?.open) continue;
      const dId = this.#digestOfKeyslot(k);
      if (dId === undefined) continue;
      const d = this.#json.digests[dId]!;
      // Keyslots of other segments (unbound keys) only when asked for (LUKS2_keyslot_for_segment).
      if (!opts.anySegment && !d.segments.includes('0')) continue;
      let vk: Buffer;
      tried++;
      try {
        vk = await h.open(this.#dev, ks, passphrase);
      } catch (e) {
        // Memory exhaustion is reported; a slot we cannot run (unknown KDF, cipher) is skipped.
        // So is a KDF cost past cryptsetup's limits ("Keyslot open failed.", as cryptsetup).
        if (isCryptmapError(e) && (e.code === 'ENOMEM' || e.code === 'EIO' || e.code === 'EKDFLIMIT')) throw e;
        if (isCryptmapError(e) && opts.keySlot !== undefined && e.code !== 'ENOKEY') throw e;
        continue;
      }
      let ok = false;
      try {
        ok = (await handlerFor(DIGEST_HANDLERS, d.type)?.verify(d, vk)) === true;
      } finally {
        // A slot whose key does not verify (or whose digest throws) leaves no copy behind.
        if (!ok) vk.fill(0);
      }
      if (ok) return { volumeKey: new Secret(vk), keyslot: Number(k) };
    }
    // No keyslot could even be tried (none active, or none bound to the data segment): cryptsetup's -ENOENT.
    if (tried === 0) throw new CryptmapError('EKEYSLOT', 'No usable keyslot is available.', { exitCode: 1, errno: 'ENOENT' });
    throw noKeyError();
  }

  async #authenticate(auth: KeyAuth): Promise<Secret> {
    if ('passphrase' in auth) return (await this.unlock(auth.passphrase)).volumeKey;
    if (!(await this.verifyVolumeKey(auth.volumeKey.expose()))) throw new CryptmapError('EVOLUMEKEY', 'Volume key does not match the volume.', { exitCode: EXIT_NO_PERMISSION, errno: 'EPERM' });
    return Secret.copyOf(auth.volumeKey.expose());
  }

  /** First gap in the keyslots area of `bytes` (LUKS2_find_area_gap), skipping `exclude`. */
  #findArea(bytes: number): number {
    const start = 2 * this.#bin.hdrSize;
    const end = start + this.keyslotsBytes;
    const used = Object.values(this.#json.keyslots)
      .map((ks) => ({ o: Number(ks.area.offset), e: Number(ks.area.offset) + Number(ks.area.size) }))
      .sort((a, b) => a.o - b.o);
    let off = start;
    for (const u of used) {
      if (u.e <= off) continue;
      if (u.o >= off + bytes) break;
      off = Math.max(off, u.e);
    }
    if (off + bytes > end) throw new CryptmapError('ENOSPACE', 'No space for new keyslot.', { errno: 'ENOSPC' });
    return off;
  }

  #freeSlot(want?: number): string {
    if (want !== undefined) {
      if (!Number.isInteger(want) || want < 0 || want >= LUKS2_KEYSLOTS_MAX) throw new CryptmapError('EKEYSLOT', `Key slot ${want} is invalid.`);
      if (this.#json.keyslots[String(want)]) throw new CryptmapError('EKEYSLOT', `Key slot ${want} is full, please select another one.`);
      return String(want);
    }
    for (let i = 0; i < LUKS2_KEYSLOTS_MAX; i++) if (!this.#json.keyslots[String(i)]) return String(i);
    throw new CryptmapError('EKEYSLOT', 'All key slots full.');
  }

  /** Key size of the volume key (segment 0's digest), 0 when no keyslot holds it. */
  #volumeKeyBytes(): number {
    const d = Object.values(this.#json.digests).find((x) => x.segments.includes('0'));
    const k = d?.keyslots.find((id) => this.#json.keyslots[id]);
    return k === undefined ? 0 : this.#json.keyslots[k]!.key_size;
  }

  /**
   * Keyslot area encryption (crypt_keyslot_get_encryption): --keyslot-cipher/--keyslot-key-size when
   * given; else the data cipher with the volume key's size, when that cipher can encrypt 512-byte
   * keyslot sectors; else aes-xts-plain64 with a 512-bit key.
   */
  #keyslotEncryption(opts: NewKeyslotOptions | undefined, volumeKeyBytes: number): { encryption: string; keyBytes: number } {
    if (opts?.keyslotCipher !== undefined || opts?.keyslotKeyBytes !== undefined) {
      const encryption = opts.keyslotCipher ?? '';
      const keyBytes = opts.keyslotKeyBytes ?? 0;
      if (!keyslotCipherUsable(encryption, keyBytes)) throw new CryptmapError('ECIPHER', `Cipher ${encryption} (key size ${keyBytes * 8} bits) is not available for keyslot encryption.`, { exitCode: 1 });
      return { encryption, keyBytes };
    }
    const cipher = this.#json.segments['0']?.encryption ?? 'aes-xts-plain64';
    if (volumeKeyBytes > 0 && !cipher.startsWith('cipher_null') && keyslotCipherUsable(cipher, volumeKeyBytes)) return { encryption: cipher, keyBytes: volumeKeyBytes };
    return { encryption: 'aes-xts-plain64', keyBytes: 64 };
  }

  /** Build keyslot `slot` in a free area and write its material (the header is not written here). */
  async #storeKeyslot(slot: number | string, vk: Uint8Array, passphrase: Uint8Array, kdf: KdfParams, digestId: string, enc: { encryption: string; keyBytes: number }): Promise<L2Keyslot> {
    const areaBytes = alignUp(afSplitBytes(vk.length, LUKS_STRIPES), 4096);
    const offset = this.#findArea(areaBytes);
    const ks: L2Keyslot = {
      type: 'luks2',
      key_size: vk.length,
      af: { type: 'luks1', stripes: LUKS_STRIPES, hash: kdf.type === 'pbkdf2' ? kdf.hash : 'sha256' },
      area: { type: 'raw', offset: String(offset), size: String(areaBytes), encryption: enc.encryption, key_size: enc.keyBytes },
      kdf: kdfJson(kdf, randomBytes(LUKS_SALTSIZE)),
    };
    await KEYSLOT_HANDLERS.luks2!.store!(this.#dev, ks, passphrase, vk);
    this.#json.keyslots[String(slot)] = ks;
    const d = this.#json.digests[digestId]!;
    if (!d.keyslots.includes(String(slot))) d.keyslots.push(String(slot));
    sortKeys(this.#json);
    return ks;
  }

  /**
   * Write both header copies (seqid + 1). Unless `fresh`, first checks that the on-disk seqid is the
   * one loaded (a concurrent updater is refused).
   */
  async #write(fresh = false): Promise<void> {
    if (!fresh) await this.#checkConcurrent();
    // Digests with neither keyslots nor segments go (LUKS2_digests_erase_unused, on every write).
    for (const [id, d] of Object.entries(this.#json.digests)) if (d.keyslots.length === 0 && d.segments.length === 0) delete this.#json.digests[id];
    // Validate what is about to be written: never write metadata we would refuse to load.
    const json = validateLuks2Json(structuredClone(this.#json), this.#bin.hdrSize - LUKS2_HDR_BIN_LEN, VALIDATORS);
    const area = buildJsonArea(json, this.#bin.hdrSize);
    const seqid = this.#bin.seqid + 1n;
    const common = { hdrSize: this.#bin.hdrSize, seqid, label: this.#bin.label, checksumAlg: this.#bin.checksumAlg, uuid: this.#bin.uuid, subsystem: this.#bin.subsystem };
    await writeCopy(this.#dev, { ...common, kind: 'primary', salt: this.#salts.primary, hdrOffset: 0n }, area);
    await writeCopy(this.#dev, { ...common, kind: 'secondary', salt: this.#salts.secondary, hdrOffset: BigInt(this.#bin.hdrSize) }, area);
    this.#bin = { ...this.#bin, seqid };
    this.#needsRepair = false;
  }

  async #checkConcurrent(): Promise<void> {
    let onDisk: bigint;
    try {
      const r = await readLuks2(this.#dev);
      onDisk = r.bin.seqid;
    } catch {
      return; // nothing valid on disk: nothing to race with
    }
    if (onDisk !== this.#bin.seqid) {
      throw new CryptmapError('ECONCURRENT', 'Detected attempt for concurrent LUKS2 metadata update. Aborting operation.', { exitCode: 1, errno: 'EBUSY' });
    }
  }

  async addKey(auth: KeyAuth, newPassphrase: Uint8Array, opts: NewKeyslotOptions & { assignTokens?: number[] } = {}): Promise<number> {
    this.#requireChangeable();
    const slot = this.#freeSlot(opts.keySlot);
    for (const t of opts.assignTokens ?? []) if (!this.#json.tokens[String(t)]) throw new CryptmapError('ETOKEN', `Token ${t} is not in use.`, { exitCode: 1, errno: 'ENOENT' });
    const vk = await this.#authenticate(auth);
    try {
      const kdf = await resolveKdf(opts, vk.length, opts.hash ?? 'sha256');
      await this.#storeKeyslot(slot, vk.expose(), newPassphrase, kdf, this.#segmentDigest(), this.#keyslotEncryption(opts, vk.length));
      // A keyslot whose passphrase came from a token is assigned to it in the same header write.
      for (const t of opts.assignTokens ?? []) {
        const tok = this.#json.tokens[String(t)]!;
        if (!tok.keyslots.includes(slot)) tok.keyslots.push(slot);
      }
      await this.#write();
      return Number(slot);
    } catch (e) {
      await this.#reload();
      throw e;
    } finally {
      vk.dispose();
    }
  }

  /**
   * Add a keyslot holding a key that is not the volume key (cryptsetup luksAddKey --unbound,
   * crypt_keyslot_add_by_key with CRYPT_VOLUME_KEY_NO_SEGMENT): `key` or a random key of `keyBytes`,
   * under a new pbkdf2 digest assigned to no segment. Such a keyslot never opens the volume; `unlock`
   * with `anySegment` tests its passphrase and returns its key. Returns the keyslot number.
   */
  async addUnboundKeyslot(newPassphrase: Uint8Array, opts: NewKeyslotOptions & { keyBytes: number; key?: Uint8Array }): Promise<number> {
    this.#requireChangeable();
    const keyBytes = opts.key?.length ?? opts.keyBytes;
    if (!Number.isInteger(keyBytes) || keyBytes < 1 || keyBytes > 512) throw new CryptmapError('EPARAM', 'Invalid key size.', { exitCode: 1 });
    const slot = this.#freeSlot(opts.keySlot);
    const key = opts.key ? Buffer.from(opts.key) : randomBytes(keyBytes);
    try {
      const hash = opts.hash ?? 'sha256';
      const kdf = await resolveKdf(opts, keyBytes, hash);
      const digest = await DIGEST_HANDLERS.pbkdf2!.create(key, { hash, iterations: await digestIterations(opts.kdf !== undefined, hash) });
      let dId = 0;
      while (this.#json.digests[String(dId)]) dId++;
      this.#json.digests[String(dId)] = { ...digest, keyslots: [], segments: [] };
      await this.#storeKeyslot(slot, key, newPassphrase, kdf, String(dId), this.#keyslotEncryption(opts, this.#volumeKeyBytes()));
      await this.#write();
      return Number(slot);
    } catch (e) {
      await this.#reload();
      throw e;
    } finally {
      key.fill(0);
    }
  }

  async changeKey(oldPassphrase: Uint8Array, newPassphrase: Uint8Array, opts: NewKeyslotOptions = {}): Promise<number> {
    this.#requireChangeable();
    // Any segment, as cryptsetup's crypt_keyslot_change_by_passphrase: an unbound keyslot stays unbound.
    const { volumeKey, keyslot } = await this.unlock(oldPassphrase, { keySlot: opts.keySlot, anySegment: true });
    const old = this.#json.keyslots[String(keyslot)]!;
    const oldArea = { o: Number(old.area.offset), n: Number(old.area.size) };
    try {
      const kdf = await resolveKdf(opts, volumeKey.length, opts.hash ?? 'sha256');
      // New material goes into a free area while the old slot stays intact; then one header write swaps them.
      const tmpSlot = `${keyslot}`;
      delete this.#json.keyslots[tmpSlot];
      this.#json.keyslots['__old'] = old;
      let ks: L2Keyslot;
      let inPlace = false;
      try {
        const dId = this.#digestOfKeyslot(tmpSlot) ?? this.#segmentDigest();
        const bound = this.#json.digests[dId]!.segments.includes('0');
        const store = () => this.#storeKeyslot(tmpSlot, volumeKey.expose(), newPassphrase, kdf, dId, this.#keyslotEncryption(opts, bound ? volumeKey.length : this.#volumeKeyBytes()));
        try {
          ks = await store();
        } catch (e) {
          if (!isCryptmapError(e, 'ENOSPACE')) throw e;
          // No room for a second copy: the keyslot is overwritten in place, as cryptsetup does (its old
          // area is reused; a crash before the header write loses this keyslot).
          delete this.#json.keyslots['__old'];
          inPlace = true;
          ks = await store();
        }
      } finally {
        delete this.#json.keyslots['__old'];
      }
      if (old.priority !== undefined) ks.priority = old.priority;
      this.#json.keyslots[tmpSlot] = ks;
      sortKeys(this.#json);
      await this.#write();
      // The old material goes; in place, only what the new area does not cover.
      const nO = Number(ks.area.offset);
      const nE = nO + Number(ks.area.size);
      const oE = oldArea.o + oldArea.n;
      if (!inPlace || nE <= oldArea.o || nO >= oE) await wipeArea(this.#dev, oldArea.o, oldArea.n);
      else {
        if (oldArea.o < nO) await wipeArea(this.#dev, oldArea.o, nO - oldArea.o);
        if (oE > nE) await wipeArea(this.#dev, nE, oE - nE);
      }
      return keyslot;
    } catch (e) {
      await this.#reload();
      throw e;
    } finally {
      volumeKey.dispose();
    }
  }

  removeKey(passphrase: Uint8Array, opts: UnlockOptions = {}): Promise<number> {
    return removeKeyByPassphrase(this, passphrase, opts);
  }

  async killSlot(slot: number): Promise<void> {
    this.#requireChangeable();
    const k = String(slot);
    const ks = this.#json.keyslots[k];
    if (!ks) throw new CryptmapError('EKEYSLOT', `Keyslot ${slot} is not active.`, { errno: 'ENOENT' });
    delete this.#json.keyslots[k];
    for (const d of Object.values(this.#json.digests)) d.keyslots = d.keyslots.filter((x) => x !== k);
    for (const t of Object.values(this.#json.tokens)) t.keyslots = t.keyslots.filter((x) => x !== k);
    try {
      await this.#write();
    } catch (e) {
      await this.#reload();
      throw e;
    }
    if (ks.area?.offset !== undefined && ks.area.size !== undefined) await wipeArea(this.#dev, Number(ks.area.offset), Number(ks.area.size));
  }

  async setUuid(uuid: string): Promise<void> {
    this.#requireChangeable();
    checkUuid(uuid);
    await this.#mutateBin({ uuid });
  }

  /** Set label and/or subsystem (cryptsetup config --label/--subsystem). */
  async setLabel(label?: string, subsystem?: string): Promise<void> {
    this.#requireChangeable();
    for (const s of [label, subsystem]) if (s !== undefined && Buffer.byteLength(s, 'latin1') >= 48) throw new CryptmapError('EPARAM', 'Label or subsystem is too long (max 47 characters).');
    await this.#mutateBin({ ...(label !== undefined ? { label } : {}), ...(subsystem !== undefined ? { subsystem } : {}) });
  }

  async #mutateBin(change: Partial<Luks2BinHeader>): Promise<void> {
    const before = this.#bin;
    this.#bin = { ...this.#bin, ...change };
    try {
      await this.#write();
    } catch (e) {
      this.#bin = before;
      throw e;
    }
  }

  /**
   * Persistent activation flags (config.flags; cryptsetup `open --persistent`, lib/luks2
   * LUKS2_config_set_flags): the array is replaced by `flags`, in the order given.
   */
  async setPersistentFlags(flags: readonly string[]): Promise<void> {
    this.#requireChangeable();
    const before = this.#json.config.flags;
    this.#json.config.flags = [...flags];
    try {
      await this.#write();
    } catch (e) {
      if (before === undefined) delete this.#json.config.flags;
      else this.#json.config.flags = before;
      throw e;
    }
  }

  /** cryptsetup config --priority: 'normal' removes the field, as cryptsetup does. */
  async setPriority(slot: number, priority: KeyslotPriority): Promise<void> {
    this.#requireChangeable();
    const ks = this.#json.keyslots[String(slot)];
    if (!ks) throw new CryptmapError('EKEYSLOT', `Keyslot ${slot} is not active.`, { errno: 'ENOENT' });
    if (priority === 'normal') delete ks.priority;
    else ks.priority = priority === 'ignore' ? 0 : 2;
    await this.#writeOrReload();
  }

  async #writeOrReload(): Promise<void> {
    try {
      await this.#write();
    } catch (e) {
      await this.#reload();
      throw e;
    }
  }

  async #reload(): Promise<void> {
    try {
      const r = await readLuks2(this.#dev);
      this.#bin = r.bin;
      this.#json = r.json;
    } catch {
      // keep the in-memory state; the caller reports the original error
    }
  }

  /** Add a token (JSON text or object); returns its id. Built-in types are validated. */
  async importToken(token: string | L2Token, tokenId?: number): Promise<number> {
    this.#requireChangeable();
    let t: unknown;
    try {
      t = typeof token === 'string' ? JSON.parse(token) : structuredClone(token);
    } catch {
      throw new CryptmapError('ETOKEN', 'Failed to parse token JSON.');
    }
    if (typeof t !== 'object' || t === null || Array.isArray(t)) throw new CryptmapError('ETOKEN', 'Token JSON is not an object.');
    const tok = t as L2Token;
    if (typeof tok.type !== 'string' || !tok.type) throw new CryptmapError('ETOKEN', 'Token is missing its type.');
    if (tok.type.startsWith('luks2-') && !handlerFor(TOKEN_HANDLERS, tok.type)) throw new CryptmapError('ETOKEN', `Token type ${tok.type} is reserved.`);
    if (!Array.isArray(tok.keyslots)) throw new CryptmapError('ETOKEN', 'Token is missing its keyslots array.');
    for (const k of tok.keyslots) if (typeof k !== 'string' || !this.#json.keyslots[k]) throw new CryptmapError('ETOKEN', `Token references missing keyslot ${String(k)}.`);
    let id = tokenId;
    if (id === undefined) {
      id = 0;
      while (this.#json.tokens[String(id)]) id++;
    }
    if (!Number.isInteger(id) || id < 0 || id >= LUKS2_TOKENS_MAX) throw new CryptmapError('ETOKEN', `Token ${id} is invalid.`);
    if (this.#json.tokens[String(id)]) throw new CryptmapError('ETOKEN', `Token ${id} is already in use.`);
    handlerFor(TOKEN_HANDLERS, tok.type)?.validate(tok, `tokens.${id}`);
    this.#json.tokens[String(id)] = tok;
    sortKeys(this.#json);
    await this.#writeOrReload();
    return id;
  }

  /** The token's JSON text (compact, as cryptsetup token export prints it). */
  exportToken(tokenId: number): string {
    const t = this.#json.tokens[String(tokenId)];
    if (!t) throw new CryptmapError('ETOKEN', `Token ${tokenId} is not in use.`, { errno: 'ENOENT' });
    return JSON.stringify(t);
  }

  async removeToken(tokenId: number): Promise<void> {
    this.#requireChangeable();
    if (!this.#json.tokens[String(tokenId)]) throw new CryptmapError('ETOKEN', `Token ${tokenId} is not in use.`, { errno: 'ENOENT' });
    delete this.#json.tokens[String(tokenId)];
    await this.#writeOrReload();
  }

  /**
   * cryptsetup token add --key-description: a luks2-keyring token ({"type","keyslots","key_description"}
   * in that order) assigned to `keySlot`, to every keyslot when none is given, or to none with
   * `unbound`; one header write. The id is `tokenId` or the lowest free one. Returns the id.
   */
  async addKeyringToken(keyDescription: string, opts: { tokenId?: number; keySlot?: number; unbound?: boolean } = {}): Promise<number> {
    this.#requireChangeable();
    if (!keyDescription) throw new CryptmapError('ETOKEN', '--key-description parameter is mandatory for token add action.', { exitCode: 1 });
    let id = opts.tokenId;
    if (id !== undefined) {
      if (!Number.isInteger(id) || id < 0 || id >= LUKS2_TOKENS_MAX) throw new CryptmapError('ETOKEN', `Token ${id} is invalid.`, { exitCode: 1 });
      if (this.#json.tokens[String(id)]) throw new CryptmapError('ETOKEN', `Token ${id} in use.`, { exitCode: 1 });
    } else {
      id = 0;
      while (this.#json.tokens[String(id)]) id++;
      if (id >= LUKS2_TOKENS_MAX) throw new CryptmapError('ETOKEN', `Failed to add luks2-keyring token ${id}.`, { exitCode: 1 });
    }
    if (opts.keySlot !== undefined && !this.#json.keyslots[String(opts.keySlot)]) throw new CryptmapError('EKEYSLOT', `Keyslot ${opts.keySlot} is not active.`, { exitCode: 1 });
    const keyslots = opts.unbound ? [] : opts.keySlot !== undefined ? [String(opts.keySlot)] : Object.keys(this.#json.keyslots);
    this.#json.tokens[String(id)] = { type: 'luks2-keyring', keyslots, key_description: keyDescription };
    await this.#writeOrReload();
    return id;
  }

  /** cryptsetup token unassign --token-id T --key-slot S: the keyslot leaves the token's list. */
  async unassignToken(tokenId: number, keySlot: number): Promise<void> {
    this.#requireChangeable();
    const failed = () => new CryptmapError('ETOKEN', `Failed to unassign token ${tokenId} from keyslot ${keySlot}.`, { exitCode: 1 });
    if (!Number.isInteger(tokenId) || tokenId < 0 || tokenId >= LUKS2_TOKENS_MAX || !Number.isInteger(keySlot) || keySlot < 0 || keySlot >= LUKS2_KEYSLOTS_MAX) throw failed();
    const tok = this.#json.tokens[String(tokenId)];
    if (!tok?.keyslots.includes(String(keySlot))) throw new CryptmapError('ETOKEN', `Token ${tokenId} is not assigned to keyslot ${keySlot}.`, { exitCode: 1, errno: 'ENOENT' });
    tok.keyslots = tok.keyslots.filter((k) => k !== String(keySlot));
    await this.#writeOrReload();
  }

  /** Rewrite both copies from the good one with fresh salts (cryptsetup repair). */
  async repair(): Promise<void> {
    if (!this.#dev.capabilities.write) throw new CryptmapError('EREADONLY', 'Device is read-only.', { exitCode: EXIT_NO_PERMISSION });
    this.#salts = { primary: randomBytes(64), secondary: randomBytes(64) };
    // The loaded copy already had leftover KDF parameters removed; write it back at its own seqid.
    this.#bin = { ...this.#bin, seqid: this.#bin.seqid > 0n ? this.#bin.seqid - 1n : 0n };
    await this.#write(true);
  }

  async erase(): Promise<void> {
    this.#requireChangeable();
    const areas = Object.values(this.#json.keyslots).map((ks) => ({ o: Number(ks.area?.offset ?? 0), n: Number(ks.area?.size ?? 0) }));
    for (const k of Object.keys(this.#json.keyslots)) delete this.#json.keyslots[k];
    for (const d of Object.values(this.#json.digests)) d.keyslots = [];
    for (const t of Object.values(this.#json.tokens)) t.keyslots = [];
    await this.#writeOrReload();
    for (const a of areas) if (a.n > 0) await wipeArea(this.#dev, a.o, a.n);
  }

  async close(): Promise<void> {
    await this.#dev.flush();
  }

  /** The header (metadata) device; reencrypt.ts does its keyslot-area I/O there. */
  get metadataDevice(): BlockDevice {
    return this.#dev;
  }

  /** A copy of the JSON metadata, for reencrypt.ts to build the next state from. */
  jsonSnapshot(): Luks2Json {
    return structuredClone(this.#json);
  }

  /**
   * Replace the JSON metadata and write both copies (validated first; the old metadata is kept in
   * memory when the write fails). Used by reencrypt.ts, which owns the reencryption state machine.
   */
  async commitJson(json: Luks2Json): Promise<void> {
    if (!this.#dev.capabilities.write) throw new CryptmapError('EREADONLY', 'Device is read-only.', { exitCode: EXIT_NO_PERMISSION, errno: 'EPERM' });
    const before = this.#json;
    this.#json = structuredClone(json);
    sortKeys(this.#json);
    try {
      await this.#write();
    } catch (e) {
      this.#json = before;
      throw e;
    }
  }

  /**
   * Store a keyslot for `vk` under `passphrase` with a new digest bound to no segment (cryptsetup's
   * CRYPT_VOLUME_KEY_NO_SEGMENT: the reencryption's new key) and write the header. Returns
   * the keyslot and digest ids.
   */
  async addUnboundKey(vk: Uint8Array, passphrase: Uint8Array, opts: NewKeyslotOptions = {}): Promise<{ keyslot: number; digest: string }> {
    this.#requireChangeable();
    const slot = this.#freeSlot(opts.keySlot);
    const before = structuredClone(this.#json);
    try {
      const hash = opts.hash ?? 'sha256';
      const kdf = await resolveKdf(opts, vk.length, hash);
      const dIter = await digestIterations(opts.kdf !== undefined, hash, undefined);
      const d = await DIGEST_HANDLERS.pbkdf2!.create(vk, { hash, iterations: dIter });
      let id = 0;
      while (this.#json.digests[String(id)]) id++;
      this.#json.digests[String(id)] = { ...d, keyslots: [], segments: [] };
      // The new key's keyslot area is encrypted with the cipher of the segment it will protect.
      await this.#storeKeyslot(slot, vk, passphrase, kdf, String(id), this.#keyslotEncryption(opts, vk.length));
      await this.#write();
      return { keyslot: Number(slot), digest: String(id) };
    } catch (e) {
      this.#json = before;
      throw e;
    }
  }
}

/** Can the keyslot storage encrypt 512-byte sectors with this cipher and key size (LUKS2_keyslot_cipher_incompatible)? */
function keyslotCipherUsable(spec: string, keyBytes: number): boolean {
  if (!spec || spec.startsWith('cipher_null') || keyBytes < 1 || keyBytes > 1024) return false;
  try {
    checkKeyBytes(parseCipherSpec(spec), keyBytes);
    createSectorCipher({ spec, key: randomBytes(keyBytes), sectorBytes: 512 }).dispose();
    return true;
  } catch {
    return false;
  }
}

/**
 * Keep the digests' keyslot lists in numeric order. (Numbered object keys already enumerate in
 * ascending numeric order in JavaScript, which is the order cryptsetup inserts them.)
 */
function sortKeys(j: Luks2Json): void {
  for (const d of Object.values(j.digests)) d.keyslots.sort((a, b) => Number(a) - Number(b));
}

/** True when `u64` parsing accepts a string (re-exported for the CLI dump). */
export { u64 };
