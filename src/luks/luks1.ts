/**
 * LUKS1: on-disk header and its semantics (LUKS On-Disk Format Specification 1.2.3; cryptsetup
 * lib/luks1/luks.h `struct luks_phdr`, lib/luks1/keymanage.c, keyencryption.c). Big-endian.
 *
 *   off  len  field                off        len  field
 *   0    6    magic LUKS\xba\xbe   112        20   mkDigest
 *   6    2    version (1)          132        32   mkDigestSalt
 *   8    32   cipherName           164        4    mkDigestIterations
 *   40   32   cipherMode           168        40   uuid
 *   72   32   hashSpec             208+48*i   48   keyblock i (i = 0..7):
 *   104  4    payloadOffset (sec)               active u32, passwordIterations u32,
 *   108  4    keyBytes                          passwordSalt[32], keyMaterialOffset u32 (sec), stripes u32
 *
 * Keyslot: Kd = PBKDF2(hashSpec, pass, salt, iterations, keyBytes); the AF material is encrypted with
 * the data cipher in 512-byte sectors, IV from 0. The header is one 1024-byte write, after the new key
 * material (add) or before the wipe (remove), so a crash leaves the old or the new state.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import type { BlockDevice } from '../blockdev/types.js';
import { afMerge, afSplit, afSplitBytes } from '../crypto/af.js';
import { calibrateKdf, hashDigestBytes, type KdfParams, pbkdf2 } from '../crypto/kdf/index.js';
import { constantTimeEqual } from '../util/bytes.js';
import { CryptmapError, EXIT_NO_PERMISSION, EXIT_WRONG_DEVICE, isCryptmapError } from '../util/errors.js';
import { Secret } from '../util/secret.js';
import { readKeyslotArea, wipeArea, writeKeyslotArea } from './keyslot-area.js';
import { LUKS_SALTSIZE, LUKS_STRIPES } from './constants.js';
import { noKeyError, noUsableKeyslot } from './errors.js';
import type {
  DataSegment,
  KeyAuth,
  KeyslotArea,
  KeyslotInfo,
  LuksVolume,
  NewKeyslotOptions,
  UnlockResult,
} from './types.js';
import { removeKeyByPassphrase } from './volume-common.js';

export const LUKS_MAGIC = Buffer.from([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]);
export const LUKS_NUMKEYS = 8;
export const LUKS_KEY_ENABLED = 0x00ac71f3;
export const LUKS_KEY_DISABLED = 0x0000dead;
export const LUKS_DIGESTSIZE = 20;
export const LUKS_PHDR_BYTES = 592;
export const LUKS_MKD_ITERATIONS_MIN = 1000;
/** Keyslot alignment (sectors) and default data alignment (sectors). */
export const LUKS_ALIGN_KEYSLOTS_SECTORS = 8;
export const LUKS_DEFAULT_ALIGN_SECTORS = 2048;

export interface Luks1Keyblock {
  active: number;
  iterations: number;
  salt: Buffer;
  keyMaterialOffset: number;
  stripes: number;
}
export interface Luks1Header {
  version: number;
  cipherName: string;
  cipherMode: string;
  hashSpec: string;
  payloadOffset: number;
  keyBytes: number;
  mkDigest: Buffer;
  mkDigestSalt: Buffer;
  mkDigestIterations: number;
  uuid: string;
  keyblock: Luks1Keyblock[];
}

function cstr(b: Buffer, off: number, len: number): string {
  const s = b.subarray(off, off + len);
  const nul = s.indexOf(0);
  return s.subarray(0, nul < 0 ? len : nul).toString('latin1');
}
function put(b: Buffer, off: number, len: number, s: string, what: string): void {
  const v = Buffer.from(s, 'latin1');
  if (v.length >= len) throw new CryptmapError('EARGS', `${what} is too long.`);
  v.copy(b, off);
}

export function hasLuks1Magic(buf: Uint8Array): boolean {
  const b = Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength);
  return b.length >= 8 && b.subarray(0, 6).equals(LUKS_MAGIC) && b.readUInt16BE(6) === 1;
}

/** Decode the 592-byte LUKS1 header (phdr) at the start of `buf`; ENOTLUKS when the magic is not there. */
export function decodeLuks1(buf: Uint8Array): Luks1Header {
  const b = Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength);
  if (b.length < LUKS_PHDR_BYTES || !hasLuks1Magic(b))
    throw new CryptmapError('ENOTLUKS', 'Device is not a valid LUKS device.', { exitCode: 1 });
  const keyblock: Luks1Keyblock[] = [];
  for (let i = 0; i < LUKS_NUMKEYS; i++) {
    const o = 208 + 48 * i;
    keyblock.push({
      active: b.readUInt32BE(o),
      iterations: b.readUInt32BE(o + 4),
      salt: Buffer.from(b.subarray(o + 8, o + 40)),
      keyMaterialOffset: b.readUInt32BE(o + 40),
      stripes: b.readUInt32BE(o + 44),
    });
  }
  return {
    version: b.readUInt16BE(6),
    cipherName: cstr(b, 8, 32),
    cipherMode: cstr(b, 40, 32),
    hashSpec: cstr(b, 72, 32),
    payloadOffset: b.readUInt32BE(104),
    keyBytes: b.readUInt32BE(108),
    mkDigest: Buffer.from(b.subarray(112, 132)),
    mkDigestSalt: Buffer.from(b.subarray(132, 164)),
    mkDigestIterations: b.readUInt32BE(164),
    uuid: cstr(b, 168, 40),
    keyblock,
  };
}

/** Encode into 1024 bytes (two sectors; bytes after 592 are zero). */
export function encodeLuks1(h: Luks1Header): Buffer {
  const b = Buffer.alloc(1024);
  LUKS_MAGIC.copy(b, 0);
  b.writeUInt16BE(1, 6);
  put(b, 8, 32, h.cipherName, 'Cipher name');
  put(b, 40, 32, h.cipherMode, 'Cipher mode');
  put(b, 72, 32, h.hashSpec, 'Hash');
  b.writeUInt32BE(h.payloadOffset, 104);
  b.writeUInt32BE(h.keyBytes, 108);
  h.mkDigest.copy(b, 112, 0, 20);
  h.mkDigestSalt.copy(b, 132, 0, 32);
  b.writeUInt32BE(h.mkDigestIterations, 164);
  put(b, 168, 40, h.uuid, 'UUID');
  h.keyblock.forEach((k, i) => {
    const o = 208 + 48 * i;
    b.writeUInt32BE(k.active, o);
    b.writeUInt32BE(k.iterations, o + 4);
    k.salt.copy(b, o + 8, 0, 32);
    b.writeUInt32BE(k.keyMaterialOffset, o + 40);
    b.writeUInt32BE(k.stripes, o + 44);
  });
  return b;
}

/** cryptsetup's LUKS1 checks (_check_and_convert_hdr, LUKS_check_keyslots), as ordered named checks. */
export function validateLuks1(h: Luks1Header, deviceBytes?: number): void {
  const bad = (check: string, msg: string): never => {
    throw new CryptmapError('ELUKS1HDR', `LUKS1 header invalid (${check}): ${msg}`, {
      exitCode: EXIT_WRONG_DEVICE,
      context: { check },
    });
  };
  if (h.keyBytes < 1 || h.keyBytes > 512) bad('key_bytes', `invalid key size ${h.keyBytes}`);
  if (h.mkDigestIterations < 1) bad('mk_digest', 'invalid digest iterations');
  const afSectors = afSplitBytes(h.keyBytes, LUKS_STRIPES) / 512;
  const spans: { s: number; e: number; i: number }[] = [];
  h.keyblock.forEach((k, i) => {
    if (k.active !== LUKS_KEY_ENABLED && k.active !== LUKS_KEY_DISABLED)
      bad('keyslot_state', `keyslot ${i} has an invalid state`);
    if (k.stripes !== LUKS_STRIPES) bad('keyslot_stripes', `LUKS keyslot ${i} is invalid (stripes ${k.stripes}).`);
    if (k.keyMaterialOffset * 512 < LUKS_PHDR_BYTES)
      bad('keyslot_offset', `LUKS keyslot ${i} is invalid (material inside the header).`);
    const end = k.keyMaterialOffset + afSectors;
    if (h.payloadOffset !== 0 && end > h.payloadOffset)
      bad('keyslot_bounds', `LUKS keyslot ${i} is invalid (overlaps the payload).`);
    spans.push({ s: k.keyMaterialOffset, e: end, i });
  });
  for (const a of spans)
    for (const b of spans)
      if (a.i < b.i && a.s < b.e && b.s < a.e) bad('keyslot_overlap', `LUKS keyslots ${a.i} and ${b.i} overlap.`);
  if (deviceBytes !== undefined) {
    const last = Math.max(...spans.map((s) => s.e)) * 512;
    // cryptsetup LUKS_check_device_size: every keyslot's key material must fit on the device.
    if (deviceBytes < last)
      throw new CryptmapError('EDEVSIZE', `Device is too small. (LUKS1 requires at least ${last} bytes.)`, {
        exitCode: 1,
        context: { check: 'device_size', needBytes: last },
      });
  }
}

function checkLuks1Uuid(uuid: string): void {
  if (!/^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$/.test(uuid))
    throw new CryptmapError('EUUID', 'Wrong LUKS UUID format provided.', { exitCode: 1 });
}

/** luksFormat --type luks1 options (cipher, key size, hash, UUID, payload offset, keyslot KDF). */
export interface Luks1FormatOptions {
  cipher?: string;
  keyBytes?: number;
  volumeKey?: Uint8Array;
  hash?: string;
  uuid?: string;
  /** Payload offset in bytes (0 with a detached header); default: aligned to 1 MiB after the keyslots. */
  offsetBytes?: number;
  detachedHeader?: boolean;
  /**
   * Data alignment in bytes (cryptsetup --align-payload N = N * 512): without offsetBytes, the payload
   * starts at the end of the keyslots rounded up to it, or with a detached header at it.
   */
  alignBytes?: number;
  keyslot?: NewKeyslotOptions;
  digestIterations?: number;
}

/** Split `aes-xts-plain64` into LUKS1 cipherName/cipherMode. */
function splitCipher(spec: string): { name: string; mode: string } {
  const i = spec.indexOf('-');
  if (i <= 0 || spec.startsWith('capi:'))
    throw new CryptmapError('EARGS', `Cipher ${spec} cannot be stored in a LUKS1 header.`);
  return { name: spec.slice(0, i), mode: spec.slice(i + 1) };
}

async function pbkdf2Iterations(opts: NewKeyslotOptions | undefined, hash: string, keyBytes: number): Promise<number> {
  if (opts?.kdf) {
    if (opts.kdf.type !== 'pbkdf2') throw new CryptmapError('EARGS', 'LUKS1 supports only the pbkdf2 KDF.');
    return Math.max(opts.kdf.iterations, 1000);
  }
  if (opts?.pbkdf && opts.pbkdf !== 'pbkdf2') throw new CryptmapError('EARGS', 'LUKS1 supports only the pbkdf2 KDF.');
  const p = (await calibrateKdf({ type: 'pbkdf2', hash, iterTimeMs: opts?.iterTimeMs, keyBytes })) as KdfParams & {
    iterations: number;
  };
  return p.iterations;
}

/** A LUKS1 header on a device: unlock and keyslot changes, written in place as cryptsetup does. */
export class Luks1Volume implements LuksVolume {
  readonly type = 'luks1' as const;
  #dev: BlockDevice;
  #h: Luks1Header;

  private constructor(dev: BlockDevice, h: Luks1Header) {
    this.#dev = dev;
    this.#h = h;
  }

  /** Read the LUKS1 header on `dev` (ENOTLUKS when there is none). */
  static async open(dev: BlockDevice): Promise<Luks1Volume> {
    const buf = Buffer.alloc(1024);
    if (dev.sizeBytes < 1024)
      throw new CryptmapError('ENOTLUKS', 'Device is not a valid LUKS device.', { exitCode: 1 });
    await dev.read(0, buf);
    const h = decodeLuks1(buf);
    validateLuks1(h, dev.sizeBytes);
    hashDigestBytes(h.hashSpec.toLowerCase());
    return new Luks1Volume(dev, h);
  }

  /** Write a new LUKS1 header on `dev` with one keyslot for `passphrase` (luksFormat --type luks1). */
  static async format(dev: BlockDevice, passphrase: Uint8Array, o: Luks1FormatOptions = {}): Promise<Luks1Volume> {
    const { name, mode } = splitCipher(o.cipher ?? 'aes-xts-plain64');
    const keyBytes = o.volumeKey?.length ?? o.keyBytes ?? 64;
    const hash = o.hash ?? 'sha256';
    hashDigestBytes(hash);
    const uuid = o.uuid ?? randomUUID();
    const stride =
      Math.ceil(afSplitBytes(keyBytes, LUKS_STRIPES) / 512 / LUKS_ALIGN_KEYSLOTS_SECTORS) * LUKS_ALIGN_KEYSLOTS_SECTORS;
    const first = LUKS_ALIGN_KEYSLOTS_SECTORS;
    const end = first + LUKS_NUMKEYS * stride;
    const align = o.alignBytes !== undefined && o.alignBytes > 0 ? o.alignBytes / 512 : undefined;
    if (align !== undefined && !Number.isInteger(align))
      throw new CryptmapError('EARGS', 'Data alignment must be a multiple of 512 bytes.');
    let payload =
      o.offsetBytes !== undefined
        ? o.offsetBytes / 512
        : o.detachedHeader
          ? (align ?? 0)
          : Math.ceil(end / (align ?? LUKS_DEFAULT_ALIGN_SECTORS)) * (align ?? LUKS_DEFAULT_ALIGN_SECTORS);
    if (!Number.isInteger(payload)) throw new CryptmapError('EARGS', 'Data offset must be a multiple of 512 bytes.');
    if (payload !== 0 && payload < end)
      throw new CryptmapError('EARGS', 'Data offset is too small for the LUKS1 keyslots.');
    if (o.uuid !== undefined) checkLuks1Uuid(o.uuid);
    // The key material must fit; the data may lie past the device's end (cryptsetup only warns).
    if (dev.sizeBytes < end * 512)
      throw new CryptmapError('EDEVSIZE', `Device is too small. (LUKS1 requires at least ${end * 512} bytes.)`, {
        exitCode: 1,
        context: { needBytes: end * 512 },
      });
    payload = Math.floor(payload);
    const vk = o.volumeKey ? Buffer.from(o.volumeKey) : randomBytes(keyBytes);
    try {
      const mkSalt = randomBytes(LUKS_SALTSIZE);
      // Digest iterations: benchmarked for 125 ms (min 1000), or the minimum when the KDF is forced (as cryptsetup).
      const mkIter =
        o.digestIterations ??
        (o.keyslot?.kdf
          ? LUKS_MKD_ITERATIONS_MIN
          : Math.max(LUKS_MKD_ITERATIONS_MIN, await pbkdf2Iterations({ iterTimeMs: 125 }, hash, keyBytes)));
      const h: Luks1Header = {
        version: 1,
        cipherName: name,
        cipherMode: mode,
        hashSpec: hash,
        payloadOffset: payload,
        keyBytes,
        mkDigest: await pbkdf2(hash, vk, mkSalt, mkIter, LUKS_DIGESTSIZE),
        mkDigestSalt: mkSalt,
        mkDigestIterations: mkIter,
        uuid,
        keyblock: Array.from({ length: LUKS_NUMKEYS }, (_, i) => ({
          active: LUKS_KEY_DISABLED,
          iterations: 0,
          salt: Buffer.alloc(32),
          keyMaterialOffset: first + i * stride,
          stripes: LUKS_STRIPES,
        })),
      };
      const v = new Luks1Volume(dev, h);
      await dev.writeZeroes(0, end * 512);
      await dev.flush();
      const slot = o.keyslot?.keySlot ?? 0;
      await v.#store(slot, vk, passphrase, await pbkdf2Iterations(o.keyslot, hash, keyBytes));
      h.keyblock[slot]!.active = LUKS_KEY_ENABLED;
      await v.#writeHeader();
      return v;
    } finally {
      vk.fill(0);
    }
  }

  get header(): Readonly<Luks1Header> {
    return this.#h;
  }
  get uuid(): string {
    return this.#h.uuid;
  }
  get label(): string {
    return '';
  }
  get subsystem(): string {
    return '';
  }
  get activatable(): boolean {
    return true;
  }
  get cipher(): string {
    return `${this.#h.cipherName}-${this.#h.cipherMode}`;
  }
  /**
   * The header and the keyslot areas up to the last one's end, whatever the slots' states
   * (cryptsetup's LUKS_device_sectors): what a header restore writes. A backup file holds them
   * rounded up to 4 KiB (headerBackup). The payload offset may lie further out (2 MiB alignment).
   */
  get headerBytes(): number {
    const afSectors = afSplitBytes(this.#h.keyBytes, LUKS_STRIPES) / 512;
    return Math.max(...this.#h.keyblock.map((k) => k.keyMaterialOffset + afSectors)) * 512;
  }
  get dataSegment(): DataSegment {
    return {
      offsetBytes: this.#h.payloadOffset * 512,
      sizeBytes: 'dynamic',
      cipher: this.cipher,
      sectorBytes: 512,
      ivTweak: 0n,
      keyBytes: this.#h.keyBytes,
    };
  }

  keyslots(): KeyslotInfo[] {
    return this.#h.keyblock.map((k, id) => ({
      id,
      type: 'luks1',
      active: k.active === LUKS_KEY_ENABLED,
      priority: 'normal',
      kdf: 'pbkdf2',
    }));
  }

  keyslotAreas(): KeyslotArea[] {
    const bytes = afSplitBytes(this.#h.keyBytes, LUKS_STRIPES);
    return this.#h.keyblock.flatMap((k, id) =>
      k.active === LUKS_KEY_ENABLED ? [{ id, offsetBytes: k.keyMaterialOffset * 512, sizeBytes: bytes }] : [],
    );
  }

  async verifyVolumeKey(vk: Uint8Array): Promise<boolean> {
    if (vk.length !== this.#h.keyBytes) return false;
    const d = await pbkdf2(
      this.#h.hashSpec.toLowerCase(),
      vk,
      this.#h.mkDigestSalt,
      this.#h.mkDigestIterations,
      LUKS_DIGESTSIZE,
    );
    return constantTimeEqual(d, this.#h.mkDigest);
  }

  async #openSlot(i: number, passphrase: Uint8Array): Promise<Buffer | null> {
    const k = this.#h.keyblock[i]!;
    const hash = this.#h.hashSpec.toLowerCase();
    const kd = await pbkdf2(hash, passphrase, k.salt, k.iterations, this.#h.keyBytes);
    let material: Buffer;
    try {
      material = await readKeyslotArea(
        this.#dev,
        k.keyMaterialOffset * 512,
        afSplitBytes(this.#h.keyBytes, LUKS_STRIPES),
        this.cipher,
        kd,
      );
    } finally {
      kd.fill(0);
    }
    const vk = afMerge(material, this.#h.keyBytes, LUKS_STRIPES, hash);
    material.fill(0);
    if (await this.verifyVolumeKey(vk)) return vk;
    vk.fill(0);
    return null;
  }

  async unlock(passphrase: Uint8Array, opts: { keySlot?: number } = {}): Promise<UnlockResult> {
    const slots = opts.keySlot !== undefined ? [opts.keySlot] : [0, 1, 2, 3, 4, 5, 6, 7];
    // No active keyslot at all: cryptsetup's "No usable keyslot is available." (-ENOENT, exit 1).
    if (!this.#h.keyblock.some((k) => k.active === LUKS_KEY_ENABLED))
      throw new CryptmapError('EKEYSLOT', 'No usable keyslot is available.', { exitCode: 1, errno: 'ENOENT' });
    for (const i of slots) {
      const k = this.#h.keyblock[i];
      if (!k) throw new CryptmapError('EKEYSLOT', `Key slot ${i} is invalid.`);
      if (k.active !== LUKS_KEY_ENABLED) {
        if (opts.keySlot !== undefined) throw noUsableKeyslot(i);
        continue;
      }
      let vk: Buffer | null;
      try {
        vk = await this.#openSlot(i, passphrase);
      } catch (e) {
        if (isCryptmapError(e) && (e.code === 'ENOMEM' || e.code === 'ECIPHER' || e.code === 'EHASH')) throw e;
        continue;
      }
      if (vk) return { volumeKey: new Secret(vk), keyslot: i };
    }
    throw noKeyError();
  }

  async #store(slot: number, vk: Uint8Array, passphrase: Uint8Array, iterations: number): Promise<void> {
    const k = this.#h.keyblock[slot]!;
    const hash = this.#h.hashSpec.toLowerCase();
    k.salt = randomBytes(LUKS_SALTSIZE);
    k.iterations = iterations;
    const kd = await pbkdf2(hash, passphrase, k.salt, iterations, this.#h.keyBytes);
    try {
      await writeKeyslotArea(this.#dev, k.keyMaterialOffset * 512, afSplit(vk, LUKS_STRIPES, hash), this.cipher, kd);
    } finally {
      kd.fill(0);
    }
  }

  async #writeHeader(): Promise<void> {
    await this.#dev.write(0, encodeLuks1(this.#h));
    await this.#dev.flush();
  }

  #requireWritable(): void {
    if (!this.#dev.capabilities.write)
      throw new CryptmapError('EROFS', 'Device is read-only.', { exitCode: EXIT_NO_PERMISSION, errno: 'EPERM' });
  }

  #freeSlot(want?: number): number {
    if (want !== undefined) {
      if (!Number.isInteger(want) || want < 0 || want >= LUKS_NUMKEYS)
        throw new CryptmapError('EKEYSLOT', `Key slot ${want} is invalid.`);
      if (this.#h.keyblock[want]!.active === LUKS_KEY_ENABLED)
        throw new CryptmapError('EKEYSLOT', `Key slot ${want} is full, please select another one.`);
      return want;
    }
    const i = this.#h.keyblock.findIndex((k) => k.active !== LUKS_KEY_ENABLED);
    if (i < 0) throw new CryptmapError('EKEYSLOT', 'All key slots full.');
    return i;
  }

  async #auth(auth: KeyAuth): Promise<Secret> {
    if ('passphrase' in auth) return (await this.unlock(auth.passphrase)).volumeKey;
    if (!(await this.verifyVolumeKey(auth.volumeKey.expose())))
      throw new CryptmapError('EVOLUMEKEY', 'Volume key does not match the volume.', { exitCode: EXIT_NO_PERMISSION });
    return Secret.copyOf(auth.volumeKey.expose());
  }

  async #withRollback<T>(fn: () => Promise<T>): Promise<T> {
    const saved = structuredClone(this.#h);
    try {
      return await fn();
    } catch (e) {
      this.#h = saved;
      throw e;
    }
  }

  async addKey(auth: KeyAuth, newPassphrase: Uint8Array, opts: NewKeyslotOptions = {}): Promise<number> {
    this.#requireWritable();
    const slot = this.#freeSlot(opts.keySlot);
    const vk = await this.#auth(auth);
    try {
      return await this.#withRollback(async () => {
        await this.#store(
          slot,
          vk.expose(),
          newPassphrase,
          await pbkdf2Iterations(opts, this.#h.hashSpec.toLowerCase(), vk.length),
        );
        this.#h.keyblock[slot]!.active = LUKS_KEY_ENABLED;
        await this.#writeHeader();
        return slot;
      });
    } finally {
      vk.dispose();
    }
  }

  async changeKey(oldPassphrase: Uint8Array, newPassphrase: Uint8Array, opts: NewKeyslotOptions = {}): Promise<number> {
    this.#requireWritable();
    const { volumeKey, keyslot } = await this.unlock(oldPassphrase, { keySlot: opts.keySlot });
    try {
      return await this.#withRollback(async () => {
        const iters = await pbkdf2Iterations(opts, this.#h.hashSpec.toLowerCase(), volumeKey.length);
        const free = this.#h.keyblock.findIndex((k) => k.active !== LUKS_KEY_ENABLED);
        // With a free slot the change is crash-safe: new slot, one header write, then wipe the old one.
        // A keyslot named (-S) is rewritten in place, as cryptsetup does (keyslot_new = keyslot_old).
        const target = free >= 0 && opts.keySlot === undefined ? free : keyslot;
        await this.#store(target, volumeKey.expose(), newPassphrase, iters);
        this.#h.keyblock[target]!.active = LUKS_KEY_ENABLED;
        if (target !== keyslot) {
          const old = this.#h.keyblock[keyslot]!;
          old.active = LUKS_KEY_DISABLED;
          old.iterations = 0;
          old.salt = Buffer.alloc(32);
        }
        await this.#writeHeader();
        if (target !== keyslot)
          await wipeArea(
            this.#dev,
            this.#h.keyblock[keyslot]!.keyMaterialOffset * 512,
            afSplitBytes(this.#h.keyBytes, LUKS_STRIPES),
          );
        return target;
      });
    } finally {
      volumeKey.dispose();
    }
  }

  removeKey(passphrase: Uint8Array, opts: { keySlot?: number } = {}): Promise<number> {
    return removeKeyByPassphrase(this, passphrase, opts);
  }

  async killSlot(slot: number): Promise<void> {
    this.#requireWritable();
    const k = this.#h.keyblock[slot];
    if (!k) throw new CryptmapError('EKEYSLOT', `Key slot ${slot} is invalid.`);
    if (k.active !== LUKS_KEY_ENABLED)
      throw new CryptmapError('EKEYSLOT', `Keyslot ${slot} is not active.`, { errno: 'ENOENT' });
    await this.#withRollback(async () => {
      k.active = LUKS_KEY_DISABLED;
      k.iterations = 0;
      k.salt = Buffer.alloc(32);
      await this.#writeHeader();
    });
    await wipeArea(this.#dev, k.keyMaterialOffset * 512, afSplitBytes(this.#h.keyBytes, LUKS_STRIPES));
  }

  async setUuid(uuid: string): Promise<void> {
    this.#requireWritable();
    if (!/^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$/.test(uuid))
      throw new CryptmapError('EUUID', 'Wrong LUKS UUID format provided.');
    await this.#withRollback(async () => {
      this.#h.uuid = uuid;
      await this.#writeHeader();
    });
  }

  async erase(): Promise<void> {
    this.#requireWritable();
    for (let i = 0; i < LUKS_NUMKEYS; i++) if (this.#h.keyblock[i]!.active === LUKS_KEY_ENABLED) await this.killSlot(i);
  }

  async close(): Promise<void> {
    await this.#dev.flush();
  }

  /**
   * `repair` for LUKS1, what cryptsetup 2.6 repairs (lib/luks1/keymanage.c `_keyslot_repair`; checked
   * against cryptsetup 2.6.1): a hash name with capitals is lower-cased ("Cipher hash repaired to
   * lowercase"); when the keyslot checks fail, every keyslot that is not active gets the standard
   * offset and stripes back (the layout luksFormat makes: from sector 8, each slot's AF material
   * rounded up to 8 sectors) and is disabled with its salt and iterations wiped, as is keyslot 6 when
   * an MS-DOS partition signature (0x55AA at byte 510) sits in it. Active keyslots are never touched.
   * Refused (nothing written): a non-standard key size, keyslots not 4 KiB aligned (cryptsetup 1.0),
   * or a header that still fails the checks after repair. The header is written only when something
   * changed. Returns cryptsetup's messages, in order.
   */
  static async repair(dev: BlockDevice): Promise<{ messages: string[]; written: boolean }> {
    if (dev.sizeBytes < 1024)
      throw new CryptmapError('ENOTLUKS', 'Device is not a valid LUKS device.', { exitCode: 1 });
    const raw = Buffer.alloc(1024);
    await dev.read(0, raw);
    if (!hasLuks1Magic(raw)) throw new CryptmapError('ENOTLUKS', 'Device is not a valid LUKS device.', { exitCode: 1 });
    const h = decodeLuks1(raw);
    const messages: string[] = [];
    const fail = (msg: string): never => {
      throw new CryptmapError('EREPAIR', msg, { exitCode: 1, context: { messages } });
    };
    let needWrite = false;
    const lower = h.hashSpec.toLowerCase();
    if (lower !== h.hashSpec) {
      messages.push(`LUKS hash ${h.hashSpec} is invalid.`, `Cipher hash repaired to lowercase (${lower}).`);
      h.hashSpec = lower;
      needWrite = true;
    }
    hashDigestBytes(h.hashSpec);
    let keyslotsOk = true;
    try {
      validateLuks1(h);
    } catch (e) {
      if (!isCryptmapError(e)) throw e;
      messages.push(e.message);
      keyslotsOk = false;
    }
    if (!keyslotsOk || needWrite) {
      if (h.keyBytes !== 16 && h.keyBytes !== 32 && h.keyBytes !== 64)
        fail('Non standard key size, manual repair required.');
      if (h.keyblock[0]!.keyMaterialOffset < LUKS_ALIGN_KEYSLOTS_SECTORS)
        fail('Non standard keyslots alignment, manual repair required.');
      messages.push('Repairing keyslots.');
      const afSectors = afSplitBytes(h.keyBytes, LUKS_STRIPES) / 512;
      let next = LUKS_ALIGN_KEYSLOTS_SECTORS;
      for (let i = 0; i < LUKS_NUMKEYS; i++) {
        const want = next;
        next = Math.ceil((next + afSectors) / LUKS_ALIGN_KEYSLOTS_SECTORS) * LUKS_ALIGN_KEYSLOTS_SECTORS;
        const k = h.keyblock[i]!;
        if (k.active === LUKS_KEY_ENABLED) continue;
        let bad = false;
        if (k.keyMaterialOffset !== want) {
          messages.push(`Keyslot ${i}: offset repaired (${k.keyMaterialOffset} -> ${want}).`);
          k.keyMaterialOffset = want;
          bad = true;
        }
        if (k.stripes !== LUKS_STRIPES) {
          messages.push(`Keyslot ${i}: stripes repaired (${k.stripes} -> ${LUKS_STRIPES}).`);
          k.stripes = LUKS_STRIPES;
          bad = true;
        }
        if (i === 6 && raw[0x1fe] === 0x55 && raw[0x1ff] === 0xaa) {
          messages.push(`Keyslot ${i}: bogus partition signature.`);
          bad = true;
        }
        if (bad) {
          messages.push(`Keyslot ${i}: salt wiped.`);
          k.active = LUKS_KEY_DISABLED;
          k.salt.fill(0);
          k.iterations = 0;
          needWrite = true;
        }
      }
      try {
        validateLuks1(h);
      } catch (e) {
        if (!isCryptmapError(e)) throw e;
        fail('Repair failed.');
      }
    }
    if (!needWrite) {
      messages.push('No known problems detected for LUKS header.');
      return { messages, written: false };
    }
    if (!dev.capabilities.write)
      throw new CryptmapError('EROFS', 'Device is read-only.', { exitCode: EXIT_NO_PERMISSION, errno: 'EPERM' });
    messages.push('Writing LUKS header to disk.');
    const out = encodeLuks1(h);
    await dev.write(0, out.subarray(0, LUKS_PHDR_BYTES));
    await dev.flush();
    return { messages, written: true };
  }
}
