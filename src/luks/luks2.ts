/**
 * The LUKS2 volume: a thin facade over the loaded header and the operations on it (LUKS2 On-Disk
 * Format Specification §2-§4). Where each part lives:
 *  - luks2-header.ts: reading both copies, load-time recovery and repair, the crash-safe write;
 *  - luks2-format.ts: a new header, UUID, label, subsystem, persistent flags;
 *  - luks2-keyslots.ts: unlock, add, change, kill, move keyslots;
 *  - luks2-tokens.ts: import, export, remove, assign tokens.
 * Bytes (luks2-disk.ts), schema (luks2-json.ts) and handlers (luks2-handlers.ts) lie below these.
 */
import { randomBytes } from 'node:crypto';
import type { BlockDevice } from '../blockdev/types.js';
import type { SectorBytes } from '../engine/types.js';
import { CryptmapError, EXIT_NO_PERMISSION } from '../util/errors.js';
import type { Luks2BinHeader } from './luks2-disk.js';
import { formatLuks2, type Luks2FormatOptions, setLabel, setPersistentFlags, setUuid } from './luks2-format.js';
import { Luks2Header, readLuks2, sortKeys } from './luks2-header.js';
import { type L2Token, type Luks2Json, u64, unknownRequirements } from './luks2-json.js';
import * as keyslots from './luks2-keyslots.js';
import * as tokens from './luks2-tokens.js';
import type {
  DataSegment,
  KeyAuth,
  KeyslotArea,
  KeyslotInfo,
  KeyslotPriority,
  LuksVolume,
  NewKeyslotOptions,
  UnlockOptions,
  UnlockResult,
} from './types.js';
import { removeKeyByPassphrase } from './volume-common.js';

export type { Luks2FormatOptions } from './luks2-format.js';
export { type Luks2ReadResult, readLuks2 } from './luks2-header.js';

/** The LUKS2 volume: header in memory, device for I/O. */
export class Luks2Volume implements LuksVolume {
  readonly type = 'luks2' as const;
  readonly #h: Luks2Header;

  private constructor(h: Luks2Header) {
    this.#h = h;
  }

  /** Load from a device (the header device when detached). Does not write; see `recoverHeader()` and `repair()`. */
  static async open(dev: BlockDevice): Promise<Luks2Volume> {
    const r = await readLuks2(dev);
    // cryptsetup LUKS2_device_size check on load: both metadata copies and the whole keyslots area must
    // be on the device (a truncated image is refused, not read past its end).
    const need = 2 * r.bin.hdrSize + Number(r.json.config.keyslots_size);
    if (dev.sizeBytes < need)
      throw new CryptmapError('EDEVSIZE', `Device is too small. Need at least ${need} bytes.`, {
        exitCode: 1,
        context: { needBytes: need },
      });
    return new Luks2Volume(
      new Luks2Header(dev, {
        bin: r.bin,
        json: r.json,
        needsRepair: r.needsRepair,
        salts: {
          primary: r.primary.ok ? r.primary.copy!.bin.salt : randomBytes(64),
          secondary: r.secondary.ok ? r.secondary.copy!.bin.salt : randomBytes(64),
        },
      }),
    );
  }

  /** Create a new LUKS2 header with one keyslot for `passphrase`. */
  static async format(dev: BlockDevice, passphrase: Uint8Array, o: Luks2FormatOptions = {}): Promise<Luks2Volume> {
    return new Luks2Volume(await formatLuks2(dev, passphrase, o));
  }

  get uuid(): string {
    return this.#h.bin.uuid;
  }
  get label(): string {
    return this.#h.bin.label;
  }
  get subsystem(): string {
    return this.#h.bin.subsystem;
  }
  get seqid(): bigint {
    return this.#h.bin.seqid;
  }
  get metadataBytes(): number {
    return this.#h.bin.hdrSize;
  }
  get keyslotsBytes(): number {
    return this.#h.keyslotsBytes;
  }
  get headerBytes(): number {
    return 2 * this.#h.bin.hdrSize + this.keyslotsBytes;
  }
  get needsRepair(): boolean {
    return this.#h.needsRepair;
  }
  /** A deep copy of the JSON metadata. */
  get json(): Luks2Json {
    return structuredClone(this.#h.json);
  }
  get binHeader(): Readonly<Luks2BinHeader> {
    return this.#h.bin;
  }
  get activatable(): boolean {
    return unknownRequirements(this.#h.json).length === 0;
  }
  /** The header (metadata) device; reencrypt.ts does its keyslot-area I/O there. */
  get metadataDevice(): BlockDevice {
    return this.#h.dev;
  }

  get dataSegment(): DataSegment {
    const json = this.#h.json;
    const seg = json.segments['0'];
    if (seg?.type !== 'crypt') throw new CryptmapError('ESEGMENT', 'LUKS2 segment 0 is not a crypt segment.');
    const dg = Object.values(json.digests).find((d) => d.segments.includes('0'));
    const ksId = dg?.keyslots[0];
    const keyBytes = ksId !== undefined ? json.keyslots[ksId]!.key_size : 0;
    return {
      offsetBytes: Number(seg.offset),
      sizeBytes: seg.size === 'dynamic' ? 'dynamic' : Number(seg.size),
      cipher: seg.encryption!,
      sectorBytes: seg.sector_size as SectorBytes,
      ivTweak: BigInt(seg.iv_tweak ?? '0'),
      keyBytes,
    };
  }

  /** Load-time recovery of a damaged or stale copy from the good one (luks2-header.ts `recover`). */
  recoverHeader(opts: { force?: boolean } = {}): Promise<'primary' | 'secondary' | null> {
    return this.#h.recover(opts);
  }
  /** Rewrite both copies from the good one with fresh salts (cryptsetup repair). */
  repair(): Promise<void> {
    return this.#h.repair();
  }
  /** Throws when this header may not be changed (unknown requirements, read-only device). */
  assertChangeable(): void {
    this.#h.requireChangeable();
  }
  async close(): Promise<void> {
    await this.#h.dev.flush();
  }

  // ---- keyslots (luks2-keyslots.ts) ----
  keyslots(): KeyslotInfo[] {
    return keyslots.listKeyslots(this.#h);
  }
  keyslotAreas(): KeyslotArea[] {
    return keyslots.keyslotAreas(this.#h);
  }
  unlock(passphrase: Uint8Array, opts: UnlockOptions = {}): Promise<UnlockResult> {
    return keyslots.unlock(this.#h, passphrase, opts);
  }
  verifyVolumeKey(vk: Uint8Array): Promise<boolean> {
    return keyslots.verifyVolumeKey(this.#h, vk);
  }
  addKey(
    auth: KeyAuth,
    newPassphrase: Uint8Array,
    opts: NewKeyslotOptions & { assignTokens?: number[] } = {},
  ): Promise<number> {
    return keyslots.addKey(this.#h, auth, newPassphrase, opts);
  }
  /** A keyslot for a key assigned to no segment (luksAddKey --unbound); `key` or a random one of `keyBytes`. */
  addUnboundKeyslot(
    newPassphrase: Uint8Array,
    opts: NewKeyslotOptions & { keyBytes: number; key?: Uint8Array },
  ): Promise<number> {
    return keyslots.addUnboundKeyslot(this.#h, newPassphrase, opts);
  }
  /** Store `vk` as a new unbound key with its own digest, in a keyslot for `passphrase`. */
  addUnboundKey(
    vk: Uint8Array,
    passphrase: Uint8Array,
    opts: NewKeyslotOptions & { digest?: string } = {},
  ): Promise<{ keyslot: number; digest: string }> {
    return keyslots.addUnboundKey(this.#h, vk, passphrase, opts);
  }
  changeKey(oldPassphrase: Uint8Array, newPassphrase: Uint8Array, opts: NewKeyslotOptions = {}): Promise<number> {
    return keyslots.changeKey(this.#h, oldPassphrase, newPassphrase, opts);
  }
  removeKey(passphrase: Uint8Array, opts: UnlockOptions = {}): Promise<number> {
    return removeKeyByPassphrase(this, passphrase, opts);
  }
  killSlot(slot: number): Promise<void> {
    return keyslots.killSlot(this.#h, slot);
  }
  /** Set a keyslot's priority (config --priority). */
  setPriority(slot: number, priority: KeyslotPriority): Promise<void> {
    return keyslots.setPriority(this.#h, slot, priority);
  }
  /** Move a keyslot's material out of the byte ranges in `avoid`; false when there is no room. */
  relocateKeyslot(slot: number, avoid: ReadonlyArray<readonly [number, number]>): Promise<boolean> {
    return keyslots.relocateKeyslot(this.#h, slot, avoid);
  }
  erase(): Promise<void> {
    return keyslots.eraseKeyslots(this.#h);
  }

  // ---- identity and config (luks2-format.ts) ----
  setUuid(uuid: string): Promise<void> {
    return setUuid(this.#h, uuid);
  }
  /** Set the label and subsystem (config --label --subsystem). */
  setLabel(label?: string, subsystem?: string): Promise<void> {
    return setLabel(this.#h, label, subsystem);
  }
  /** Store activation flags in the header (refresh/open --persistent: allow-discards, ...). */
  setPersistentFlags(flags: readonly string[]): Promise<void> {
    return setPersistentFlags(this.#h, flags);
  }

  // ---- tokens (luks2-tokens.ts) ----
  /** Add a token from its JSON (token import); returns its id. */
  importToken(token: string | L2Token, tokenId?: number): Promise<number> {
    return tokens.importToken(this.#h, token, tokenId);
  }
  /** A token's JSON (token export). */
  exportToken(tokenId: number): string {
    return tokens.exportToken(this.#h, tokenId);
  }
  /** Remove a token (token remove). */
  removeToken(tokenId: number): Promise<void> {
    return tokens.removeToken(this.#h, tokenId);
  }
  /** Add a `luks2-keyring` token naming a kernel keyring key (token add --key-description); returns its id. */
  addKeyringToken(
    keyDescription: string,
    opts: { tokenId?: number; keySlot?: number; unbound?: boolean } = {},
  ): Promise<number> {
    return tokens.addKeyringToken(this.#h, keyDescription, opts);
  }
  /** Detach a token from a keyslot (token unassign). */
  unassignToken(tokenId: number, keySlot: number): Promise<void> {
    return tokens.unassignToken(this.#h, tokenId, keySlot);
  }

  // ---- the reencryption state machine (reencrypt.ts) ----
  /** A copy of the JSON metadata, for reencrypt.ts to build the next state from. */
  jsonSnapshot(): Luks2Json {
    return structuredClone(this.#h.json);
  }

  /**
   * Replace the JSON metadata and write both copies (validated first; the old metadata is kept in
   * memory when the write fails). Used by reencrypt.ts, which owns the reencryption state machine.
   */
  async commitJson(json: Luks2Json): Promise<void> {
    const h = this.#h;
    if (!h.dev.capabilities.write)
      throw new CryptmapError('EROFS', 'Device is read-only.', { exitCode: EXIT_NO_PERMISSION, errno: 'EPERM' });
    const before = h.json;
    h.json = structuredClone(json);
    sortKeys(h.json);
    try {
      await h.write();
    } catch (e) {
      h.json = before;
      throw e;
    }
  }
}

/** True when `u64` parsing accepts a string (re-exported for the CLI dump). */
export { u64 };
