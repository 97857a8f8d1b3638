/**
 * Creating a LUKS2 header (cryptsetup lib/luks2/luks2_json_format.c `LUKS2_generate_hdr`, luksFormat)
 * and changing its identity and configuration: UUID, label, subsystem, persistent activation flags
 * (cryptsetup luksUUID, config). The layout rules: data at 16 MiB by default, or after the metadata
 * and keyslots areas, or at --align-payload; the keyslots area at most LUKS2_MAX_KEYSLOTS_SIZE.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import type { BlockDevice } from '../blockdev/types.js';
import type { SectorBytes } from '../engine/types.js';
import { alignUp } from '../util/bytes.js';
import { CryptmapError } from '../util/errors.js';
import { LUKS2_DEFAULT_DATA_OFFSET_BYTES, LUKS2_DEFAULT_METADATA_BYTES, LUKS2_MAX_KEYSLOTS_SIZE } from './constants.js';
import { LUKS2_HDR_BIN_LEN, LUKS2_HDR_SIZES, type Luks2BinHeader } from './luks2-disk.js';
import { DIGEST_HANDLERS } from './luks2-handlers.js';
import { Luks2Header } from './luks2-header.js';
import type { Luks2Json } from './luks2-json.js';
import { digestIterations, keyslotEncryption, resolveKdf, storeKeyslot } from './luks2-keyslots.js';
import type { NewKeyslotOptions } from './types.js';

/** luksFormat --type luks2 options (cipher, key size, sector size, offsets, areas, label, keyslot KDF). */
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

function labelTooLong(): CryptmapError {
  return new CryptmapError('EARGS', 'Label or subsystem is too long (max 47 characters).');
}

/** Where a new LUKS2 header puts things (LUKS2_generate_hdr), in bytes. */
export interface Luks2Layout {
  metadata: number;
  offset: number;
  keyslotsBytes: number;
  /** Both metadata copies and the keyslots area: what a header device (a detached header file) must hold. */
  hdrAndAreas: number;
}

/**
 * The layout luksFormat (and reencrypt --encrypt) gives a new header from the options, checked.
 * @example luks2Layout({ detachedHeader: true }).hdrAndAreas // 16 MiB: the size of a new header file
 */
export function luks2Layout(
  o: Pick<
    Luks2FormatOptions,
    'metadataBytes' | 'keyslotsBytes' | 'offsetBytes' | 'alignBytes' | 'detachedHeader' | 'sectorBytes'
  >,
): Luks2Layout {
  const sectorBytes = o.sectorBytes ?? 512;
  const metadata = o.metadataBytes ?? LUKS2_DEFAULT_METADATA_BYTES;
  if (!(LUKS2_HDR_SIZES as readonly number[]).includes(metadata))
    throw new CryptmapError('EARGS', `Unsupported LUKS2 metadata size ${metadata}.`);
  if (![512, 1024, 2048, 4096].includes(sectorBytes))
    throw new CryptmapError('EARGS', `Unsupported encryption sector size.`);
  let offset = o.offsetBytes ?? (o.detachedHeader ? (o.alignBytes ?? 0) : undefined);
  let keyslotsBytes = o.keyslotsBytes;
  if (offset === undefined && o.alignBytes) {
    // LUKS2_generate_hdr: the default keyslots area (16 MiB with the metadata), then the alignment.
    offset = alignUp(2 * metadata + (keyslotsBytes ?? LUKS2_DEFAULT_DATA_OFFSET_BYTES - 2 * metadata), o.alignBytes);
  }
  if (offset === undefined) {
    // Default: data at 16 MiB, or after the metadata and keyslots asked for (aligned to 1 MiB).
    offset =
      keyslotsBytes !== undefined
        ? alignUp(2 * metadata + keyslotsBytes, 1 << 20)
        : Math.max(LUKS2_DEFAULT_DATA_OFFSET_BYTES, alignUp(2 * metadata + 4096, 1 << 20));
  }
  if (offset % 512 !== 0 || offset % sectorBytes !== 0)
    throw new CryptmapError('EARGS', 'Data offset is not aligned to the sector size.');
  if (keyslotsBytes === undefined) {
    keyslotsBytes = offset === 0 ? LUKS2_DEFAULT_DATA_OFFSET_BYTES - 2 * metadata : offset - 2 * metadata;
    keyslotsBytes = Math.min(Math.floor(keyslotsBytes / 4096) * 4096, LUKS2_MAX_KEYSLOTS_SIZE);
  }
  if (keyslotsBytes % 4096 !== 0 || keyslotsBytes > LUKS2_MAX_KEYSLOTS_SIZE || keyslotsBytes <= 0)
    throw new CryptmapError('EARGS', 'Invalid keyslots area size.');
  if (offset !== 0 && offset < 2 * metadata + keyslotsBytes)
    throw new CryptmapError('EARGS', 'Data offset is too small for the LUKS2 metadata and keyslots areas.');
  const hdrAndAreas = 2 * metadata + keyslotsBytes;

  return { metadata, offset, keyslotsBytes, hdrAndAreas };
}

/** Create a new LUKS2 header on `dev` with one keyslot for `passphrase`. */
export async function formatLuks2(
  dev: BlockDevice,
  passphrase: Uint8Array,
  o: Luks2FormatOptions = {},
): Promise<Luks2Header> {
  const cipher = o.cipher ?? 'aes-xts-plain64';
  const keyBytes = o.volumeKey?.length ?? o.keyBytes ?? 64;
  const sectorBytes = o.sectorBytes ?? 512;
  const hash = o.hash ?? 'sha256';
  const { metadata, offset, keyslotsBytes, hdrAndAreas } = luks2Layout({ ...o, sectorBytes });
  if (!Number.isInteger(keyBytes) || keyBytes < 1 || keyBytes > 512)
    throw new CryptmapError('EARGS', 'Invalid volume key size.');
  const uuid = o.uuid ?? randomUUID();
  checkUuid(uuid);
  // The data may lie past the device's end (cryptsetup only warns: no room for data); the header may not.
  if (dev.sizeBytes < hdrAndAreas) {
    throw new CryptmapError('EDEVSIZE', `Device is too small. Need at least ${hdrAndAreas} bytes.`, {
      exitCode: 1,
      context: { needBytes: hdrAndAreas },
    });
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
        '0': {
          type: 'crypt',
          offset: String(offset),
          size: 'dynamic',
          iv_tweak: '0',
          encryption: cipher,
          sector_size: sectorBytes,
        },
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
    if (Buffer.byteLength(bin.label, 'latin1') >= 48 || Buffer.byteLength(bin.subsystem, 'latin1') >= 48)
      throw labelTooLong();
    const h = new Luks2Header(dev, {
      bin,
      json,
      needsRepair: false,
      salts: { primary: bin.salt, secondary: randomBytes(64) },
    });
    // Destroy any previous header first (both copies and the keyslots area), as cryptsetup does.
    await dev.writeZeroes(0, hdrAndAreas);
    await dev.flush();
    const slot = o.keyslot?.keySlot ?? 0;
    await storeKeyslot(h, slot, vk, passphrase, kdf, '0', keyslotEncryption(h, o.keyslot, vk.length));
    await h.write(true);
    return h;
  } finally {
    vk.fill(0);
  }
}

export async function setUuid(h: Luks2Header, uuid: string): Promise<void> {
  h.requireChangeable();
  checkUuid(uuid);
  await h.mutateBin({ uuid });
}

/** Set label and/or subsystem (cryptsetup config --label/--subsystem). */
export async function setLabel(h: Luks2Header, label?: string, subsystem?: string): Promise<void> {
  h.requireChangeable();
  for (const s of [label, subsystem]) if (s !== undefined && Buffer.byteLength(s, 'latin1') >= 48) throw labelTooLong();
  await h.mutateBin({ ...(label !== undefined ? { label } : {}), ...(subsystem !== undefined ? { subsystem } : {}) });
}

/**
 * Persistent activation flags (config.flags; cryptsetup `open --persistent`, lib/luks2
 * LUKS2_config_set_flags): the array is replaced by `flags`, in the order given.
 */
export async function setPersistentFlags(h: Luks2Header, flags: readonly string[]): Promise<void> {
  h.requireChangeable();
  await h.update(() => {
    h.json.config.flags = [...flags];
  });
}
