/**
 * Activation: the bridge from an unlocked LUKS volume (or a plain-mode spec) to a dm `crypt` table.
 * cryptsetup builds the same table (`lib/libdevmapper.c` get_dm_crypt_params):
 *
 *   0 <size_sectors> crypt <cipher> <key> <iv_offset> <device> <offset_sectors> [<#opt> <opt>...]
 *
 * The key never goes into the table text: the volume key is kept in the daemon's keyring and the
 * table names it as `:<bytes>:logon:<description>`, like cryptsetup with the kernel keyring, so
 * `table --showkeys`, status and logs never show it.
 */
import { openBlockDevice, resolveDevice } from '../blockdev/open.js';
import type { BlockDevice } from '../blockdev/types.js';
import type { SectorBytes } from '../engine/types.js';
import { inReencryption, openLuks } from '../luks/index.js';
import type { LuksVolume, UnlockResult } from '../luks/types.js';
import { SECTOR_BYTES } from '../util/bytes.js';
import { CryptmapError, EXIT_FAILURE, EXIT_WRONG_DEVICE } from '../util/errors.js';
import type { Secret } from '../util/secret.js';
import { type ActivationFlags, dmWords, flagOfPersistent, type PersistentFlag } from './flags.js';

export type MappingType = 'LUKS1' | 'LUKS2' | 'PLAIN';

/** Everything the daemon needs to create a crypt mapping, except the key itself. */
export interface CryptMapping extends ActivationFlags {
  name: string;
  type: MappingType;
  /** LUKS uuid ('' for plain). */
  uuid: string;
  /** Data device path (as given by the user, resolved to absolute). */
  device: string;
  /** Detached header path, if any. */
  header?: string;
  cipher: string;
  keyBytes: number;
  sectorBytes: SectorBytes;
  /** dm iv_offset (512-byte units). */
  ivOffsetSectors: bigint;
  /** Where the data starts on `device` (512-byte units). */
  offsetSectors: number;
  /** Mapping length (512-byte units). */
  sizeSectors: number;
  readOnly: boolean;
  /** Always present (the other activation flags of ./flags.ts are absent when off). */
  allowDiscards: boolean;
  ivLargeSectors?: boolean;
  /** Keyslot that unlocked the volume (LUKS), for status. */
  keyslot?: number;
  /**
   * LUKS2 opened (or resumed) with --disable-keyring: cryptsetup keeps such a volume key in the crypt
   * target, not the kernel keyring (status "key location: dm-crypt"), so resize asks no passphrase.
   * The daemon keeps every key the same way either way.
   */
  keyNotInKeyring?: boolean;
}

/**
 * Where cryptsetup 2.6 says a volume key is ("key location:"): the kernel keyring for LUKS2 unless
 * --disable-keyring, the crypt target (dm-crypt) for LUKS1 and plain (lib/setup.c use_keyring).
 */
export function keyLocation(m: Pick<CryptMapping, 'type' | 'keyNotInKeyring'>): 'keyring' | 'dm-crypt' {
  return m.type === 'LUKS2' && m.keyNotInKeyring !== true ? 'keyring' : 'dm-crypt';
}

/** The keyring description a mapping's volume key is stored under. */
export function keyDescription(name: string): string {
  return `cryptmap:${name}`;
}

/** dm uuid as cryptsetup names it: CRYPT-LUKS2-<uuid without dashes>-<name>, CRYPT-PLAIN-<name>. */
export function dmUuid(m: Pick<CryptMapping, 'type' | 'uuid' | 'name'>): string {
  return m.type === 'PLAIN' ? `CRYPT-PLAIN-${m.name}` : `CRYPT-${m.type}-${m.uuid.replace(/-/g, '')}-${m.name}`;
}

/** The crypt table line (one target covering the whole mapping). `keyArg` is hex or a key reference. */
export function cryptTableLine(m: CryptMapping, keyArg: string): string {
  const opts: string[] = dmWords(m);
  if (m.sectorBytes !== SECTOR_BYTES) opts.push(`sector_size:${m.sectorBytes}`);
  if (m.ivLargeSectors) opts.push('iv_large_sectors');
  const tail = opts.length ? ` ${opts.length} ${opts.join(' ')}` : '';
  return `0 ${m.sizeSectors} crypt ${m.cipher} ${keyArg} ${m.ivOffsetSectors} ${m.device} ${m.offsetSectors}${tail}`;
}

/** Key reference naming the daemon keyring entry of `m`. */
export function keyRefArg(m: Pick<CryptMapping, 'name' | 'keyBytes'>): string {
  return `:${m.keyBytes}:logon:${keyDescription(m.name)}`;
}

export interface LuksOpenOptions {
  name: string;
  device: string;
  header?: string;
  /** How to get the volume key: a passphrase (tried on the slots by priority), or a custom unlock (tokens, prompts with retries). */
  passphrase?: Uint8Array;
  unlock?: (vol: LuksVolume) => Promise<UnlockResult>;
  keySlot?: number;
  readOnly?: boolean;
  allowDiscards?: boolean;
}

async function withDevice<T>(path: string, readOnly: boolean, fn: (d: BlockDevice) => Promise<T>): Promise<T> {
  let dev: BlockDevice;
  try {
    dev = await openBlockDevice(path, { readOnly });
  } catch (e) {
    throw new CryptmapError('ENODEV', `Device ${path} does not exist or access denied.`, {
      exitCode: EXIT_WRONG_DEVICE,
      cause: e,
    });
  }
  try {
    return await fn(dev);
  } finally {
    await dev.close();
  }
}

/**
 * Unlock a LUKS volume and describe its crypt mapping. The caller owns the returned volume key.
 * Size: the segment size, or (dynamic) what is left of the data device after the data offset.
 */
export async function prepareLuks(o: LuksOpenOptions): Promise<{ mapping: CryptMapping; volumeKey: Secret }> {
  const headerPath = o.header === undefined ? resolveDevice(o.device) : resolveDevice(o.header);
  return withDevice(headerPath, true, async (hdrDev) => {
    const vol = await openLuks(hdrDev);
    try {
      return await prepareLoadedLuks(vol, hdrDev, o);
    } finally {
      await vol.close();
    }
  });
}

/**
 * `prepareLuks` for a volume the caller already loaded from its header device `hdrDev` (the file
 * `o.header`, or `o.device` when the header is not detached), e.g. after load-time header recovery:
 * the header is not read again. The caller keeps owning `vol` and `hdrDev` and owns the volume key.
 *
 * @example
 *   const vol = await openLuks(hdrDev);
 *   try { ({ mapping, volumeKey } = await prepareLoadedLuks(vol, hdrDev, { name, device, passphrase })); }
 *   finally { await vol.close(); await hdrDev.close(); }
 */
export async function prepareLoadedLuks(
  vol: Awaited<ReturnType<typeof openLuks>>,
  hdrDev: BlockDevice,
  o: LuksOpenOptions,
): Promise<{ mapping: CryptMapping; volumeKey: Secret }> {
  o = { ...o, device: resolveDevice(o.device), ...(o.header === undefined ? {} : { header: resolveDevice(o.header) }) };
  if (!vol.activatable) {
    // A LUKS2 reencryption in progress (cryptsetup's online-reencrypt requirement): its data is in two
    // layouts, which one mapping of segment 0 would mix up; `cryptmap open` maps each part
    // (cli/commands/open-reencrypt.ts), as cryptsetup maps each segment.
    if (vol.type === 'luks2' && inReencryption(vol.json)) {
      throw new CryptmapError(
        'EREQUIREMENT',
        `Device ${o.header ?? o.device} is in LUKS2 reencryption: one mapping cannot serve it. Open it with cryptmap open (each part mapped with its key), or finish it with cryptmap reencrypt --resume-only (or cryptsetup reencrypt --resume-only) first.`,
        { exitCode: 1 },
      );
    }
    throw new CryptmapError('EREQUIREMENT', 'Device has unknown mandatory requirements; refusing to activate.', {
      exitCode: 1,
    });
  }
  const seg = vol.dataSegment;
  const dataBytes =
    o.header === undefined ? hdrDev.sizeBytes : await withDevice(o.device, true, async (d) => d.sizeBytes);
  let sizeBytes: number;
  if (seg.sizeBytes === 'dynamic') {
    sizeBytes = dataBytes - seg.offsetBytes;
    sizeBytes -= sizeBytes % seg.sectorBytes;
  } else sizeBytes = seg.sizeBytes;
  if (sizeBytes <= 0 || seg.offsetBytes + sizeBytes > dataBytes) {
    throw new CryptmapError('EDEVSIZE', `Device ${o.device} is too small for the data segment.`, {
      exitCode: EXIT_WRONG_DEVICE,
    });
  }
  let unlocked: UnlockResult;
  if (o.unlock) unlocked = await o.unlock(vol);
  else if (o.passphrase)
    unlocked = await vol.unlock(o.passphrase, o.keySlot === undefined ? {} : { keySlot: o.keySlot });
  else throw new CryptmapError('EARGS', 'prepareLuks needs a passphrase or an unlock function');
  const { volumeKey, keyslot } = unlocked;
  const mapping: CryptMapping = {
    name: o.name,
    type: vol.type === 'luks1' ? 'LUKS1' : 'LUKS2',
    uuid: vol.uuid,
    device: o.device,
    cipher: seg.cipher,
    keyBytes: seg.keyBytes,
    sectorBytes: seg.sectorBytes,
    ivOffsetSectors: seg.ivTweak,
    offsetSectors: seg.offsetBytes / SECTOR_BYTES,
    sizeSectors: sizeBytes / SECTOR_BYTES,
    readOnly: o.readOnly ?? false,
    allowDiscards: o.allowDiscards ?? false,
    keyslot,
  };
  // LUKS2 persistent flags (open --persistent) apply as if given on the command line.
  for (const f of persistentFlagsOf(vol)) mapping[flagOfPersistent(f)!.field] = true;
  if (o.header !== undefined) mapping.header = o.header;
  return { mapping, volumeKey };
}

/**
 * The known persistent flags a LUKS2 header carries (none for LUKS1). `high_priority` and
 * `no-journal` (dm-integrity) are kept in the header but change nothing in userspace: not ours.
 */
export function persistentFlagsOf(vol: Awaited<ReturnType<typeof openLuks>>): PersistentFlag[] {
  if (vol.type !== 'luks2') return [];
  const flags = (vol.json.config as { flags?: unknown }).flags;
  if (!Array.isArray(flags)) return [];
  return flags.filter((f): f is PersistentFlag => typeof f === 'string' && flagOfPersistent(f) !== undefined);
}

export interface PlainOpenOptions {
  name: string;
  device: string;
  key: Secret;
  cipher: string;
  sectorBytes?: SectorBytes;
  /** --offset: start of data on the device (512-byte sectors). */
  offsetSectors?: number;
  /** --skip: IV offset (512-byte sectors). */
  skipSectors?: number;
  /** --size: mapping length (512-byte sectors); default the rest of the device. */
  sizeSectors?: number;
  readOnly?: boolean;
  allowDiscards?: boolean;
  ivLargeSectors?: boolean;
}

/** Describe a plain-mode mapping (no header: every parameter comes from the caller). */
export async function preparePlain(o: PlainOpenOptions): Promise<CryptMapping> {
  o = { ...o, device: resolveDevice(o.device) };
  const sectorBytes = o.sectorBytes ?? SECTOR_BYTES;
  const offset = o.offsetSectors ?? 0;
  const devBytes = await withDevice(o.device, true, async (d) => d.sizeBytes);
  const avail = Math.floor(devBytes / SECTOR_BYTES) - offset;
  // cryptsetup 2.6 device_block_adjust: both EINVAL (exit 1).
  if (avail <= 0)
    throw new CryptmapError('EDEVSIZE', `Requested offset is beyond real size of device ${o.device}.`, {
      exitCode: EXIT_FAILURE,
    });
  const size = o.sizeSectors ?? avail - (avail % (sectorBytes / SECTOR_BYTES));
  if (size <= 0 || size > avail)
    throw new CryptmapError('EDEVSIZE', `Device ${o.device} is too small.`, { exitCode: EXIT_FAILURE });
  return {
    name: o.name,
    type: 'PLAIN',
    uuid: '',
    device: o.device,
    cipher: o.cipher,
    keyBytes: o.key.length,
    sectorBytes,
    ivOffsetSectors: BigInt(o.skipSectors ?? 0),
    offsetSectors: offset,
    sizeSectors: size,
    readOnly: o.readOnly ?? false,
    allowDiscards: o.allowDiscards ?? false,
    ivLargeSectors: o.ivLargeSectors ?? false,
  };
}
