/**
 * Checking what a control handler receives (protocol.ts ReceivedArgs: untrusted JSON), the mapping's
 * JSON form both sides use, and the one way a handler takes a volume key.
 */
import { pickFlags } from '../activate/flags.js';
import type { CryptMapping } from '../activate/mapping.js';
import { CryptmapError } from '../util/errors.js';
import { Secret } from '../util/secret.js';
import type { MappingJson } from './protocol.js';

/** `v` when `check` accepts it, else EPROTO naming the argument. */
export function need<T>(v: unknown, check: (x: unknown) => boolean, what: string): T {
  if (!check(v)) throw new CryptmapError('EPROTO', `control request: bad or missing '${what}'`);
  return v as T;
}
export const isStr = (x: unknown): boolean => typeof x === 'string' && x.length > 0;
export const isUint = (x: unknown): boolean => typeof x === 'number' && Number.isSafeInteger(x) && x >= 0;
/** A non-empty string argument (a device or volume name). */
export const nameArg = (v: unknown, what = 'name'): string => need<string>(v, isStr, what);

/**
 * Run `fn` with the request's volume key: the raw bytes sent after the request line (protocol.ts
 * `bin`) as a Secret, wiped when `fn` settles, whatever happens (the server wipes the bytes again
 * after the handler). A missing or empty key is EPROTO before `fn` runs. The core copies what it keeps.
 */
export async function withKey<T>(args: { readonly key?: unknown }, fn: (key: Secret) => Promise<T>): Promise<T> {
  const key = new Secret(need<Buffer>(args.key, (x) => Buffer.isBuffer(x) && x.length > 0, 'key (binary)'));
  try {
    return await fn(key);
  } finally {
    key.dispose();
  }
}

/**
 * The keys of a reencryption (`key`: the old volume key, `newKey`: the new one), either absent where
 * that side is plaintext (encryption has no old key, decryption no new one), not both; wiped after `fn`.
 */
export async function withKeyPair<T>(
  args: { readonly key?: unknown; readonly newKey?: unknown },
  fn: (oldKey: Secret | undefined, newKey: Secret | undefined) => Promise<T>,
): Promise<T> {
  const isKey = (x: unknown) => Buffer.isBuffer(x) && x.length > 0;
  const o = args.key === undefined ? undefined : new Secret(need<Buffer>(args.key, isKey, 'key (binary)'));
  try {
    const n = args.newKey === undefined ? undefined : new Secret(need<Buffer>(args.newKey, isKey, 'newKey (binary)'));
    try {
      if (!o && !n) need(undefined, () => false, 'key or newKey (binary)');
      return await fn(o, n);
    } finally {
      n?.dispose();
    }
  } finally {
    o?.dispose();
  }
}

/** Rebuild a CryptMapping from its JSON form, checking every field. */
export function mappingFromJson(v: unknown): CryptMapping {
  const o = need<Record<string, unknown>>(v, (x) => typeof x === 'object' && x !== null, 'mapping');
  const m: CryptMapping = {
    name: need(o.name, isStr, 'mapping.name'),
    type: need(o.type, (x) => x === 'LUKS1' || x === 'LUKS2' || x === 'PLAIN', 'mapping.type'),
    uuid: need(o.uuid, (x) => typeof x === 'string', 'mapping.uuid'),
    device: need(o.device, isStr, 'mapping.device'),
    cipher: need(o.cipher, isStr, 'mapping.cipher'),
    keyBytes: need(o.keyBytes, isUint, 'mapping.keyBytes'),
    sectorBytes: need(o.sectorBytes, (x) => x === 512 || x === 1024 || x === 2048 || x === 4096, 'mapping.sectorBytes'),
    ivOffsetSectors: BigInt(
      need<string>(o.ivOffsetSectors, (x) => typeof x === 'string' && /^[0-9]+$/.test(x), 'mapping.ivOffsetSectors'),
    ),
    offsetSectors: need(o.offsetSectors, isUint, 'mapping.offsetSectors'),
    sizeSectors: need(o.sizeSectors, isUint, 'mapping.sizeSectors'),
    readOnly: o.readOnly === true,
    allowDiscards: o.allowDiscards === true,
  };
  Object.assign(m, pickFlags(o));
  if (o.ivLargeSectors === true) m.ivLargeSectors = true;
  if (typeof o.header === 'string') m.header = o.header;
  if (isUint(o.keyslot)) m.keyslot = o.keyslot as number;
  if (o.keyNotInKeyring === true) m.keyNotInKeyring = true;
  return m;
}

export function mappingToJson(m: CryptMapping): MappingJson {
  return { ...m, ivOffsetSectors: m.ivOffsetSectors.toString() };
}
