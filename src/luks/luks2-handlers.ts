/**
 * LUKS2 keyslot, digest and token handlers as ops tables keyed by their JSON `type` (LUKS2 spec §3.2
 * keyslots, §3.4 digests, §3.5 tokens; cryptsetup lib/luks2/luks2_keyslot_luks2.c,
 * luks2_keyslot_reenc.c, luks2_digest_pbkdf2.c, luks2_token_keyring.c). Handlers see the parsed JSON
 * object of their entry and the device; never raw header bytes.
 */
import { randomBytes } from 'node:crypto';
import type { BlockDevice } from '../blockdev/types.js';
import { afMerge, afSplit, afSplitBytes } from '../crypto/af.js';
import { checkKeyBytes, parseCipherSpec } from '../crypto/cipher-spec.js';
import {
  ARGON2_MAX_PARALLEL,
  deriveKey,
  hashDigestBytes,
  type KdfParams,
  PBKDF2_MIN_ITERATIONS,
  pbkdf2,
} from '../crypto/kdf/index.js';
import { constantTimeEqual } from '../util/bytes.js';
import { CryptmapError } from '../util/errors.js';
import { loadNative } from '../util/native.js';
import { LUKS_SALTSIZE, LUKS_STRIPES } from './constants.js';
import { readKeyslotArea, writeKeyslotArea } from './keyslot-area.js';
import { type L2Digest, type L2Keyslot, type TypeValidators, u64 } from './luks2-json.js';

function invalid(path: string, msg: string): never {
  throw new CryptmapError('ELUKS2JSON', `LUKS2 metadata invalid (keyslot_types: ${path}): ${msg}`, {
    context: { path },
  });
}
type Obj = Record<string, unknown>;
const isObj = (v: unknown): v is Obj => typeof v === 'object' && v !== null && !Array.isArray(v);
const isStr = (v: unknown): v is string => typeof v === 'string' && v.length > 0;
const isInt = (v: unknown): v is number => typeof v === 'number' && Number.isInteger(v);

/**
 * The handler registered under `type`, looked up among the table's own keys only: a header's
 * "constructor", "toString" or "__proto__" never reaches Object.prototype.
 * @example handlerFor(DIGEST_HANDLERS, d.type)?.verify(d, vk)
 */
export function handlerFor<T>(table: Readonly<Record<string, T>>, type: unknown): T | undefined {
  return typeof type === 'string' && Object.hasOwn(table, type) ? table[type] : undefined;
}

export function b64decode(s: string, what: string): Buffer {
  if (!/^[A-Za-z0-9+/]*={0,2}$/.test(s) || s.length % 4 !== 0)
    throw new CryptmapError('ELUKS2JSON', `${what} is not valid base64.`);
  return Buffer.from(s, 'base64');
}

/** KDF parameters of a keyslot's `kdf` object; throws for types cryptmap cannot run (e.g. legacy "argon2"). */
export function kdfParamsOf(kdf: L2Keyslot['kdf']): KdfParams {
  if (kdf.type === 'pbkdf2') return { type: 'pbkdf2', hash: kdf.hash!, iterations: kdf.iterations! };
  if (kdf.type === 'argon2i' || kdf.type === 'argon2id')
    return { type: kdf.type, time: kdf.time!, memoryKiB: kdf.memory!, parallel: kdf.cpus! };
  throw new CryptmapError('EKDFTYPE', `Keyslot KDF ${kdf.type} is not supported.`);
}

/** The `kdf` JSON object for parameters and a salt, in cryptsetup's key order. */
export function kdfJson(p: KdfParams, salt: Buffer): L2Keyslot['kdf'] {
  if (p.type === 'pbkdf2')
    return { type: 'pbkdf2', hash: p.hash, iterations: p.iterations, salt: salt.toString('base64') };
  return { type: p.type, time: p.time, memory: p.memoryKiB, cpus: p.parallel, salt: salt.toString('base64') };
}

export interface KeyslotHandler {
  name: string;
  /** Type-specific field checks (LUKS2_keyslots_validate). */
  validate(ks: Obj, path: string): void;
  /** Recover the volume key with a passphrase; null when the passphrase does not open this slot's material. */
  open?(dev: BlockDevice, ks: L2Keyslot, passphrase: Uint8Array): Promise<Buffer>;
  /** Derive, split, encrypt and write `vk` into the slot's area (the JSON entry is already filled in). */
  store?(dev: BlockDevice, ks: L2Keyslot, passphrase: Uint8Array, vk: Uint8Array): Promise<void>;
}

const luks2Keyslot: KeyslotHandler = {
  name: 'luks2',
  validate(ks, path) {
    const kdf = ks.kdf;
    const af = ks.af;
    const area = ks.area;
    if (!isObj(kdf) || !isObj(af) || !isObj(area)) invalid(path, 'kdf, af and area must be objects');
    if (!isStr(kdf.type)) invalid(path, 'kdf type missing');
    const n = Object.keys(kdf).length;
    if (kdf.type === 'pbkdf2') {
      if (n !== 4 || !isStr(kdf.hash) || !isInt(kdf.iterations) || !isStr(kdf.salt))
        invalid(`${path}.kdf`, 'pbkdf2 needs exactly type, hash, iterations, salt');
    } else if (kdf.type === 'argon2i' || kdf.type === 'argon2id') {
      if (n !== 5 || !isInt(kdf.time) || !isInt(kdf.memory) || !isInt(kdf.cpus) || !isStr(kdf.salt))
        invalid(`${path}.kdf`, 'argon2 needs exactly type, time, memory, cpus, salt');
    }
    if (af.type !== 'luks1') invalid(`${path}.af`, 'af type must be luks1');
    if (!isStr(af.hash) || !isInt(af.stripes)) invalid(`${path}.af`, 'luks1 af needs hash and stripes');
    if (area.type !== 'raw') invalid(`${path}.area`, 'area type must be raw');
    if (!isStr(area.encryption) || !isInt(area.key_size) || !isStr(area.offset) || !isStr(area.size)) {
      invalid(`${path}.area`, 'raw area needs encryption, key_size, offset, size');
    }
  },
  async open(dev, ks, passphrase) {
    const params = kdfParamsOf(ks.kdf);
    // cryptsetup refuses a keyslot whose Argon2 cpus exceed its limit, before deriving anything.
    if (params.type !== 'pbkdf2' && !(params.parallel >= 1 && params.parallel <= ARGON2_MAX_PARALLEL)) {
      throw new CryptmapError('EKDFLIMIT', 'Keyslot open failed.', {
        exitCode: 1,
        errno: 'EINVAL',
        context: { cpus: params.parallel },
      });
    }
    if (ks.af.stripes !== LUKS_STRIPES)
      throw new CryptmapError('ELUKS2AF', `Keyslot AF stripes ${ks.af.stripes} not supported.`);
    const afBytes = afSplitBytes(ks.key_size, LUKS_STRIPES);
    if (BigInt(afBytes) > BigInt(ks.area.size))
      throw new CryptmapError('ELUKS2AREA', 'Keyslot area is too small for its key.');
    const encryption = ks.area.encryption!;
    if (encryption === 'cipher_null' || encryption.startsWith('cipher_null-')) {
      if (passphrase.length !== 0)
        throw new CryptmapError('ENOKEY', 'No key available with this passphrase.', { exitCode: 2, errno: 'EPERM' });
    }
    // The KDF output length is the area key size: refuse one the area cipher cannot take before
    // deriving, or a forged header asks for gigabytes of KDF output (a hang; found by the fuzzer).
    const areaKeyBytes = ks.area.key_size!;
    if (areaKeyBytes > 1024 || !encryption.startsWith('cipher_null')) {
      try {
        if (areaKeyBytes > 1024) throw new CryptmapError('EKEY_SIZE', `area key of ${areaKeyBytes} bytes`);
        checkKeyBytes(parseCipherSpec(encryption), areaKeyBytes);
      } catch (e) {
        throw new CryptmapError(
          'ELUKS2AREA',
          `Keyslot area key size ${areaKeyBytes} does not fit its cipher ${encryption}.`,
          { cause: e },
        );
      }
    }
    const salt = b64decode(ks.kdf.salt, 'kdf salt');
    const kd = await deriveKey(params, passphrase, salt, areaKeyBytes);
    let material: Buffer;
    try {
      material = await readKeyslotArea(dev, Number(ks.area.offset), afBytes, encryption, kd);
    } finally {
      kd.fill(0);
    }
    try {
      return afMerge(material, ks.key_size, LUKS_STRIPES, ks.af.hash);
    } finally {
      material.fill(0);
    }
  },
  async store(dev, ks, passphrase, vk) {
    const params = kdfParamsOf(ks.kdf);
    const salt = b64decode(ks.kdf.salt, 'kdf salt');
    const kd = await deriveKey(params, passphrase, salt, ks.area.key_size!);
    try {
      const material = afSplit(vk, LUKS_STRIPES, ks.af.hash);
      await writeKeyslotArea(dev, Number(ks.area.offset), material, ks.area.encryption!, kd);
    } finally {
      kd.fill(0);
    }
  },
};

const reencryptKeyslot: KeyslotHandler = {
  name: 'reencrypt',
  validate(ks, path) {
    if (!isStr(ks.mode) || !['reencrypt', 'encrypt', 'decrypt'].includes(ks.mode))
      invalid(path, 'reencrypt keyslot needs mode');
    if (!isStr(ks.direction) || !['forward', 'backward'].includes(ks.direction))
      invalid(path, 'reencrypt keyslot needs direction');
    if (!isObj(ks.area) || !isStr(ks.area.type)) invalid(path, 'reencrypt keyslot needs an area');
    // reenc_keyslot_validate: key_size 1; checksum areas a hash and a power-of-two sector size of at
    // least 512; data shift areas a non-zero shift of whole 512-byte sectors.
    if (ks.key_size !== 1) invalid(path, 'reencrypt keyslot key_size must be 1');
    const a = ks.area;
    if (a.type === 'checksum' || a.type === 'datashift-checksum') {
      const ss = a.sector_size;
      if (!isStr(a.hash) || !isInt(ss) || ss < 512 || ss > 0xffffffff || (ss & (ss - 1)) !== 0)
        invalid(`${path}.area`, 'checksum area needs hash and a power-of-two sector_size of at least 512');
    } else if (a.type === 'datashift' || a.type === 'datashift-journal') {
      const shift = isStr(a.shift_size) ? u64(a.shift_size) : null;
      if (!shift || shift % 512n !== 0n) invalid(`${path}.area`, 'data shift area needs a shift_size in whole sectors');
    }
  },
};

/** Keyslot handlers keyed by JSON `type`. Unknown types load but cannot be unlocked. */
export const KEYSLOT_HANDLERS: Record<string, KeyslotHandler> = { luks2: luks2Keyslot, reencrypt: reencryptKeyslot };

export interface DigestHandler {
  name: string;
  verify(d: L2Digest, vk: Uint8Array): Promise<boolean>;
  /** Fill a new digest object for `vk` (keyslots and segments are set by the caller). */
  create(
    vk: Uint8Array,
    opts: { hash: string; iterations: number },
  ): Promise<{ type: string; hash: string; iterations: number; salt: string; digest: string }>;
}

const pbkdf2Digest: DigestHandler = {
  name: 'pbkdf2',
  async verify(d, vk) {
    if (!isStr(d.hash) || !isInt(d.iterations) || !isStr(d.salt) || !isStr(d.digest)) return false;
    const want = b64decode(d.digest, 'digest');
    const salt = b64decode(d.salt, 'digest salt');
    const len = want.length;
    if (len !== hashDigestBytes(d.hash) && len !== 20) return false;
    const got = await pbkdf2(d.hash, vk, salt, d.iterations, len);
    try {
      return constantTimeEqual(got, want);
    } finally {
      got.fill(0);
    }
  },
  async create(vk, { hash, iterations }) {
    const salt = randomBytes(LUKS_SALTSIZE);
    const len = hashDigestBytes(hash);
    const dg = await pbkdf2(hash, vk, salt, Math.max(iterations, PBKDF2_MIN_ITERATIONS), len);
    return {
      type: 'pbkdf2',
      hash,
      iterations: Math.max(iterations, PBKDF2_MIN_ITERATIONS),
      salt: salt.toString('base64'),
      digest: dg.toString('base64'),
    };
  },
};

export const DIGEST_HANDLERS: Record<string, DigestHandler> = { pbkdf2: pbkdf2Digest };

export interface TokenHandler {
  name: string;
  /** Type-specific field checks of a token (throws naming `path`). */
  validate(tok: Obj, path: string): void;
  /**
   * Produce the passphrase of the token's keyslots (cryptsetup's token `open`), or throw a
   * CryptmapError saying why the token cannot be used here. A handler without `open` marks a type
   * cryptmap keeps intact but cannot unlock with ("No usable token").
   */
  open?(tok: Obj, tokenId: number): Promise<Buffer>;
}

const keyringToken: TokenHandler = {
  name: 'luks2-keyring',
  validate(tok, path) {
    const keys = Object.keys(tok);
    if (keys.length !== 3 || !isStr(tok.key_description) || !Array.isArray(tok.keyslots)) {
      throw new CryptmapError(
        'ELUKS2TOKEN',
        `LUKS2 metadata invalid (token_types: ${path}): luks2-keyring needs exactly type, keyslots, key_description`,
      );
    }
  },
  // The passphrase is the payload of the "user" key named key_description in the kernel keyring, found
  // as cryptsetup finds it (request_key: thread, process, session keyrings); read by the native addon.
  async open(tok, tokenId) {
    const read = loadNative()?.keyringReadUser;
    if (!read) {
      throw new CryptmapError(
        'ETOKENKEYRING',
        `Token ${tokenId} (luks2-keyring) cannot be used: reading the kernel keyring needs cryptmap's native addon. Use a passphrase or key file.`,
        {
          exitCode: 2,
          errno: 'EPERM',
          context: { tokenId },
        },
      );
    }
    const desc = String(tok.key_description);
    const pass = read(desc);
    if (!pass) {
      throw new CryptmapError(
        'ETOKENKEYRING',
        `Token ${tokenId} (luks2-keyring): no key "${desc}" of type user in the kernel keyring.`,
        { exitCode: 2, errno: 'EPERM', context: { tokenId } },
      );
    }
    return pass;
  },
};

/** Built-in token handlers keyed by JSON `type` (the `luks2-` prefix is reserved for them). */
export const TOKEN_HANDLERS: Record<string, TokenHandler> = { 'luks2-keyring': keyringToken };

export const VALIDATORS: TypeValidators = {
  keyslot: (t) => handlerFor(KEYSLOT_HANDLERS, t)?.validate,
  token: (t) => handlerFor(TOKEN_HANDLERS, t)?.validate,
};

/**
 * Remove leftover KDF parameters of another KDF type (luks2_keyslot_repair): pbkdf2 keeps type, hash,
 * iterations, salt; argon2 keeps type, time, memory, cpus, salt. Returns true when something changed.
 */
export function repairKeyslotKdf(ks: Obj): boolean {
  if (!isObj(ks) || ks.type !== 'luks2' || !isObj(ks.kdf)) return false;
  const kdf = ks.kdf;
  const keep =
    kdf.type === 'pbkdf2'
      ? ['type', 'hash', 'iterations', 'salt']
      : kdf.type === 'argon2i' || kdf.type === 'argon2id'
        ? ['type', 'time', 'memory', 'cpus', 'salt']
        : null;
  if (!keep) return false;
  let changed = false;
  for (const k of Object.keys(kdf)) {
    if (!keep.includes(k)) {
      delete kdf[k];
      changed = true;
    }
  }
  return changed;
}
