/**
 * The LUKS2 header of a loaded volume and its crash-safe writes (LUKS2 On-Disk Format Specification
 * §2-§3; cryptsetup lib/luks2/luks2_disk_metadata.c `LUKS2_disk_hdr_read`/`_write`): reading both
 * copies and choosing the good, newest one; load-time recovery and explicit repair; writing both
 * copies after checking that no one else changed them. The format, keyslot and token operations
 * (luks2-format.ts, luks2-keyslots.ts, luks2-tokens.ts) change `json`/`bin` here and call `write`.
 *
 * Crash safety: every change writes new key material only into unused areas first, then the header
 * (primary copy, then secondary, each invalid-then-valid, see luks2-disk.ts `writeCopy`), and only
 * after that wipes areas no longer referenced. A process dying between any two writes leaves a
 * header that opens with the old or the new secret. Before writing, the on-disk seqid is compared
 * with the one loaded: a concurrent update is refused.
 */
import { randomBytes } from 'node:crypto';
import type { BlockDevice } from '../blockdev/types.js';
import { CryptmapError, EXIT_NO_PERMISSION, EXIT_WRONG_DEVICE, isCryptmapError } from '../util/errors.js';
import { logger } from '../util/log.js';
import {
  LUKS2_HDR_BIN_LEN,
  LUKS2_HDR_SIZES,
  type Luks2BinHeader,
  type Luks2DiskCopy,
  readCopy,
  writeCopy,
} from './luks2-disk.js';
import { repairKeyslotKdf, VALIDATORS } from './luks2-handlers.js';
import { buildJsonArea, type Luks2Json, parseJsonArea, unknownRequirements, validateLuks2Json } from './luks2-json.js';
import { wipeArea } from './keyslot-area.js';
import { foreignSignature } from './signatures.js';

const log = logger('luks2');

function areaRange(area: { offset?: string; size?: string } | undefined): { o: number; n: number } {
  return area?.offset !== undefined && area.size !== undefined
    ? { o: Number(area.offset), n: Number(area.size) }
    : { o: 0, n: 0 };
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
    if (raw && typeof raw.keyslots === 'object' && raw.keyslots !== null)
      for (const ks of Object.values(raw.keyslots as object)) repairKeyslotKdf(ks);
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
    if (
      err?.code === 'ELUKS2MAGIC' &&
      secondary.error?.code !== 'ELUKS2CSUM' &&
      secondary.error?.code !== 'ELUKS2JSON'
    ) {
      throw new CryptmapError('ENOTLUKS', 'Device is not a valid LUKS device.', { exitCode: 1, cause: err });
    }
    if (err?.code === 'ELUKS2JSON') {
      // Metadata that does not parse or fails a named check: cryptsetup's "not a valid LUKS device"
      // (exit 1); the message keeps the check and key path that failed.
      throw new CryptmapError('ENOTLUKS', `Device is not a valid LUKS device (${err.message}).`, {
        exitCode: 1,
        cause: err,
        context: err.context,
      });
    }
    throw new CryptmapError('ELUKS2HDR', `LUKS2 header is damaged beyond repair: ${err?.message ?? 'no valid copy'}`, {
      exitCode: EXIT_WRONG_DEVICE,
      cause: err,
    });
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
  if (needsRepair)
    log.debug('LUKS2 header copies differ or one is damaged', {
      used,
      primary: primary.error?.message,
      secondary: secondary.error?.message,
    });
  let stale: 'primary' | 'secondary' | null = null;
  if (!primary.ok || !secondary.ok) stale = primary.ok ? 'secondary' : 'primary';
  else if (primary.copy!.bin.seqid !== secondary.copy!.bin.seqid) stale = used === 'primary' ? 'secondary' : 'primary';
  return { bin: chosen.copy!.bin, json: chosen.json!, primary, secondary, used, needsRepair, stale };
}

/**
 * Keep the digests' keyslot lists in numeric order. (Numbered object keys already enumerate in
 * ascending numeric order in JavaScript, which is the order cryptsetup inserts them.)
 */
export function sortKeys(j: Luks2Json): void {
  for (const d of Object.values(j.digests)) d.keyslots.sort((a, b) => Number(a) - Number(b));
}

function concurrentUpdate(): CryptmapError {
  return new CryptmapError(
    'ECONCURRENT',
    'Detected attempt for concurrent LUKS2 metadata update. Aborting operation.',
    { exitCode: 1, errno: 'EBUSY' },
  );
}

/** The header in memory (binary header, JSON metadata, the copies' salts) and the device for its I/O. */
export class Luks2Header {
  readonly dev: BlockDevice;
  bin: Luks2BinHeader;
  json: Luks2Json;
  salts: { primary: Buffer; secondary: Buffer };
  needsRepair: boolean;

  constructor(
    dev: BlockDevice,
    r: { bin: Luks2BinHeader; json: Luks2Json; needsRepair: boolean; salts: { primary: Buffer; secondary: Buffer } },
  ) {
    this.dev = dev;
    this.bin = r.bin;
    this.json = r.json;
    this.needsRepair = r.needsRepair;
    this.salts = r.salts;
  }

  get keyslotsBytes(): number {
    return Number(this.json.config.keyslots_size);
  }

  /** Throws when this header may not be changed (unknown requirements, read-only device). */
  requireChangeable(): void {
    const unknown = unknownRequirements(this.json);
    if (unknown.length)
      throw new CryptmapError(
        'EREQUIREMENT',
        `Operation incompatible with device marked for unknown requirements (${unknown.join(', ')}).`,
        { errno: 'ENOTSUP' },
      );
    if (!this.dev.capabilities.write)
      throw new CryptmapError('EROFS', 'Device is read-only.', { exitCode: EXIT_NO_PERMISSION, errno: 'EPERM' });
  }

  digestOfKeyslot(slot: string): string | undefined {
    return Object.keys(this.json.digests).find((d) => this.json.digests[d]!.keyslots.includes(slot));
  }

  /** The digest protecting segment 0 (the volume key). */
  segmentDigest(): string {
    const id = Object.keys(this.json.digests).find((d) => this.json.digests[d]!.segments.includes('0'));
    if (id === undefined) throw new CryptmapError('EDIGEST', 'No digest for the data segment.');
    return id;
  }

  /**
   * Write both header copies (seqid + 1). Unless `fresh`, first checks that the on-disk seqid is the
   * one loaded (a concurrent updater is refused).
   */
  async write(fresh = false): Promise<void> {
    if (!fresh) await this.#checkConcurrent();
    // Digests with neither keyslots nor segments go (LUKS2_digests_erase_unused, on every write).
    for (const [id, d] of Object.entries(this.json.digests))
      if (d.keyslots.length === 0 && d.segments.length === 0) delete this.json.digests[id];
    // Validate what is about to be written: never write metadata we would refuse to load.
    const json = validateLuks2Json(structuredClone(this.json), this.bin.hdrSize - LUKS2_HDR_BIN_LEN, VALIDATORS);
    const area = buildJsonArea(json, this.bin.hdrSize);
    const seqid = this.bin.seqid + 1n;
    const common = {
      hdrSize: this.bin.hdrSize,
      seqid,
      label: this.bin.label,
      checksumAlg: this.bin.checksumAlg,
      uuid: this.bin.uuid,
      subsystem: this.bin.subsystem,
    };
    await writeCopy(this.dev, { ...common, kind: 'primary', salt: this.salts.primary, hdrOffset: 0n }, area);
    await writeCopy(
      this.dev,
      { ...common, kind: 'secondary', salt: this.salts.secondary, hdrOffset: BigInt(this.bin.hdrSize) },
      area,
    );
    this.bin = { ...this.bin, seqid };
    this.needsRepair = false;
  }

  async #checkConcurrent(): Promise<void> {
    let onDisk: bigint;
    try {
      const r = await readLuks2(this.dev);
      onDisk = r.bin.seqid;
    } catch {
      return; // nothing valid on disk: nothing to race with
    }
    if (onDisk !== this.bin.seqid) throw concurrentUpdate();
  }

  /**
   * Change the metadata with `change` (which may also store keyslot material in unused areas) and write
   * both copies. When `change` or the write fails, the in-memory header becomes what the device holds
   * (re-read; the state before `change` when nothing valid can be read), and every keyslot area
   * `change` filled that the device's header does not reference is wiped: a failed add leaves no key
   * material behind. The error is rethrown.
   */
  async update<T>(change: () => Promise<T> | T): Promise<T> {
    const before = structuredClone(this.json);
    try {
      const result = await change();
      await this.write();
      return result;
    } catch (e) {
      const attempted = this.json;
      await this.#settleFailedChange(before, attempted);
      throw e;
    }
  }

  async #settleFailedChange(before: Luks2Json, attempted: Luks2Json): Promise<void> {
    try {
      const r = await readLuks2(this.dev);
      this.bin = r.bin;
      this.json = r.json;
    } catch {
      this.json = before; // nothing valid on the device: keep what was loaded before the change
    }
    const live = Object.values(this.json.keyslots).map((k) => areaRange(k.area));
    for (const ks of Object.values(attempted.keyslots)) {
      const a = areaRange(ks.area);
      if (a.n === 0 || live.some((l) => l.o < a.o + a.n && a.o < l.o + l.n)) continue;
      try {
        await wipeArea(this.dev, a.o, a.n);
      } catch (w) {
        log.error('could not wipe the keyslot area of a change that failed', {
          offset: a.o,
          size: a.n,
          error: String(w),
        });
      }
    }
  }

  /** Change binary header fields (uuid, label, subsystem) and write; the old fields stay when that fails. */
  async mutateBin(change: Partial<Luks2BinHeader>): Promise<void> {
    const before = this.bin;
    this.bin = { ...this.bin, ...change };
    try {
      await this.write();
    } catch (e) {
      this.bin = before;
      throw e;
    }
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
  async recover(opts: { force?: boolean } = {}): Promise<'primary' | 'secondary' | null> {
    if (!this.dev.capabilities.write) return null;
    const r = await readLuks2(this.dev);
    if (r.stale === null) return null;
    if (r.bin.seqid !== this.bin.seqid) throw concurrentUpdate();
    const good = (r.used === 'primary' ? r.primary : r.secondary).copy!;
    const hdrSize = good.bin.hdrSize;
    const offset = r.stale === 'primary' ? 0 : hdrSize;
    if (offset + hdrSize > this.dev.sizeBytes) return null;
    if (r.stale === 'primary' && !r.primary.ok && !opts.force) {
      const area = Buffer.alloc(hdrSize);
      await this.dev.read(0, area);
      const other = foreignSignature(area);
      if (other !== null) {
        log.warn('Device contains ambiguous signatures, cannot auto-recover LUKS2; run repair to recover it', {
          signature: other,
        });
        return null;
      }
    }
    const salt = randomBytes(64);
    const b = good.bin;
    await writeCopy(
      this.dev,
      {
        kind: r.stale,
        hdrSize,
        seqid: b.seqid,
        label: b.label,
        checksumAlg: b.checksumAlg,
        salt,
        uuid: b.uuid,
        subsystem: b.subsystem,
        hdrOffset: BigInt(offset),
      },
      good.jsonArea,
    );
    this.salts[r.stale] = salt;
    this.needsRepair = false;
    return r.stale;
  }

  /** Rewrite both copies from the good one with fresh salts (cryptsetup repair). */
  async repair(): Promise<void> {
    if (!this.dev.capabilities.write)
      throw new CryptmapError('EROFS', 'Device is read-only.', { exitCode: EXIT_NO_PERMISSION });
    this.salts = { primary: randomBytes(64), secondary: randomBytes(64) };
    // The loaded copy already had leftover KDF parameters removed; write it back at its own seqid.
    this.bin = { ...this.bin, seqid: this.bin.seqid > 0n ? this.bin.seqid - 1n : 0n };
    await this.write(true);
  }
}
