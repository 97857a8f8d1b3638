/**
 * The format-independent view of a LUKS volume that the activation layer and the CLI use. LUKS1
 * (luks1.ts) and LUKS2 (luks2.ts) both implement `LuksVolume`.
 */
import type { KdfParams } from '../crypto/kdf/index.js';
import type { SectorBytes } from '../engine/types.js';
import type { Secret } from '../util/secret.js';

/** Where and how the encrypted data lives (what a dm-crypt table needs). */
export interface DataSegment {
  /** Byte offset of the data on the data device (0 with a detached header and no --offset). */
  offsetBytes: number;
  /** Data length, or 'dynamic' = up to the end of the device. */
  sizeBytes: number | 'dynamic';
  /** dm-crypt cipher spec, e.g. `aes-xts-plain64`. */
  cipher: string;
  sectorBytes: SectorBytes;
  /** dm-crypt iv_offset in 512-byte sectors (LUKS2 `iv_tweak`, 0 for LUKS1). */
  ivTweak: bigint;
  /** Volume key length in bytes. */
  keyBytes: number;
}

/** cryptsetup's keyslot priority: `prefer` slots are tried first, `ignore` ones only when named. */
export type KeyslotPriority = 'ignore' | 'normal' | 'prefer';

/** One keyslot as `keyslots()` lists it (luksDump's Keyslots section). */
export interface KeyslotInfo {
  id: number;
  /** 'luks2', 'reencrypt', 'luks1', or an unknown type string. */
  type: string;
  active: boolean;
  priority: KeyslotPriority;
  kdf: string;
  /** LUKS2: the keyslot holds a key not assigned to the data segment (cryptsetup --unbound). */
  unbound?: boolean;
}

/** Where one keyslot's key material lies on the header device. */
export interface KeyslotArea {
  id: number;
  offsetBytes: number;
  sizeBytes: number;
}

/** How a mutating operation proves it knows the volume key. */
export type KeyAuth = { passphrase: Uint8Array } | { volumeKey: Secret };

/** Where a new keyslot goes and how its passphrase is hashed (cryptsetup luksAddKey/luksFormat options). */
export interface NewKeyslotOptions {
  /** Slot number; default: the lowest free one. */
  keySlot?: number;
  /** KDF parameters; default: calibrated to iterTimeMs. */
  kdf?: KdfParams;
  /** For calibration: target time (cryptsetup --iter-time). */
  iterTimeMs?: number;
  /** For calibration: 'pbkdf2' | 'argon2i' | 'argon2id', memory and lanes ceilings. */
  pbkdf?: 'pbkdf2' | 'argon2i' | 'argon2id';
  pbkdfMemoryKiB?: number;
  pbkdfParallel?: number;
  hash?: string;
  /** LUKS2 keyslot area encryption (cryptsetup --keyslot-cipher / --keyslot-key-size); both or neither. */
  keyslotCipher?: string;
  keyslotKeyBytes?: number;
}

/** Limits on which keyslots `unlock` tries. */
export interface UnlockOptions {
  /** Only this keyslot. */
  keySlot?: number;
  /**
   * LUKS2: keyslots of any digest count, unbound ones too (cryptsetup CRYPT_ACTIVATE_ALLOW_UNBOUND_KEY:
   * `open --test-passphrase` with --key-slot or --unbound, luksChangeKey); the key returned is then the
   * keyslot's own key, not necessarily the volume key.
   */
  anySegment?: boolean;
  /**
   * LUKS2: only keyslots of this digest (cryptsetup LUKS2_keyslot_open_by_digest: the old or the new
   * volume key of a reencryption); the others count as unusable, as cryptsetup counts them.
   */
  digest?: string;
}

/** What a successful unlock gives: the volume key (the caller disposes it) and the keyslot that opened. */
export interface UnlockResult {
  volumeKey: Secret;
  keyslot: number;
}

/**
 * A LUKS1 or LUKS2 header in memory with the device it lives on: unlock, keyslot management and the
 * data segment a crypt mapping needs. `openLuks` returns one; `Luks1Volume`/`Luks2Volume` implement it.
 */
export interface LuksVolume {
  readonly type: 'luks1' | 'luks2';
  readonly uuid: string;
  readonly label: string;
  readonly subsystem: string;
  readonly dataSegment: DataSegment;
  /** False when the metadata carries requirements cryptmap does not know (no activation, no changes). */
  readonly activatable: boolean;
  /** Bytes of header + keyslot areas (what a header backup holds). */
  readonly headerBytes: number;
  /** Every keyslot with its state, priority and KDF (luksDump's Keyslots). */
  keyslots(): KeyslotInfo[];
  /** Byte ranges of the active keyslots' key material (used to order a header restore crash-safely). */
  keyslotAreas(): KeyslotArea[];
  /** Try the slots (priority order, or only `keySlot`); "No key available with this passphrase." (exit 2) otherwise. */
  unlock(passphrase: Uint8Array, opts?: UnlockOptions): Promise<UnlockResult>;
  /** True when `vk` is this volume's key. */
  verifyVolumeKey(vk: Uint8Array): Promise<boolean>;
  /** Add a keyslot; returns its number. */
  addKey(auth: KeyAuth, newPassphrase: Uint8Array, opts?: NewKeyslotOptions): Promise<number>;
  /** Replace the passphrase of the slot `oldPassphrase` opens; returns the slot number. */
  changeKey(oldPassphrase: Uint8Array, newPassphrase: Uint8Array, opts?: NewKeyslotOptions): Promise<number>;
  /** Remove the slot the passphrase opens; returns its number. */
  removeKey(passphrase: Uint8Array, opts?: { keySlot?: number }): Promise<number>;
  /** Wipe keyslot `slot` without a passphrase (luksKillSlot). */
  killSlot(slot: number): Promise<void>;
  /** Set the header UUID (luksUUID --uuid). */
  setUuid(uuid: string): Promise<void>;
  /** Erase every keyslot (the volume becomes permanently inaccessible). */
  erase(): Promise<void>;
  /** Flush and close the underlying devices' use by this object (does not close devices passed in). */
  close(): Promise<void>;
}
