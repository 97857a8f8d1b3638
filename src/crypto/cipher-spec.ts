/**
 * dm-crypt cipher specification grammar (Linux drivers/md/dm-crypt.c `crypt_ctr_cipher_old` and
 * `crypt_ctr_cipher_new`; Documentation/admin-guide/device-mapper/dm-crypt.rst "<cipher>").
 *
 * Two syntaxes:
 *   legacy: cipher[:keycount]-chainmode-ivmode[:ivopts]     aes-xts-plain64, aes-cbc-essiv:sha256,
 *           cipher_null-ecb, aes (= aes-cbc-plain), aes-plain (= aes-cbc-plain), aes-ecb
 *   capi:   capi:chainmode(cipher)-ivmode[:ivopts]          capi:xts(aes)-plain64, capi:cbc(aes)-essiv:sha256
 *
 * As in the kernel, `ivmode[:ivopts]` is everything after the second '-' (legacy) or the first '-'
 * after the kernel cipher name (capi), split once at ':'. ECB takes no IV: the kernel ignores an IV
 * mode given with ecb (with a warning); so do we (ivMode becomes undefined).
 *
 * Supported here: cipher `aes` (and `cipher_null` with ecb), chain modes xts, cbc, ecb, the IV modes
 * of the generator table (iv/index.ts: plain, plain64, plain64be, essiv:<hash>, benbi, null), key count 1. Everything else the kernel knows
 * (serpent, twofish, lrw, ctr, gcm, authenc, lmk, tcw, random, eboiv, elephant, keycount > 1, ...)
 * is ECIPHER_UNSUPPORTED naming the part; text that is not a spec at all is ECIPHER_SPEC.
 */
import { getHashes } from 'node:crypto';
import { CryptmapError } from '../util/errors.js';
import { ivGenerator, type IvModeName, supportedIvModes } from './iv/index.js';

export type { IvModeName } from './iv/index.js';
/** Block cipher chaining modes dm-crypt specs name. */
export type ChainMode = 'xts' | 'cbc' | 'ecb';
/** Block ciphers the engine implements. */
export type CipherName = 'aes' | 'cipher_null';

/** A dm-crypt cipher spec taken apart (`parseCipherSpec`): cipher, chaining mode, IV mode and key layout. */
export interface CipherSpec {
  /** The spec as given. */
  readonly spec: string;
  readonly capi: boolean;
  readonly cipher: CipherName;
  /** Legacy `:keycount`; always 1 here (multi-key specs are unsupported). */
  readonly keyCount: number;
  readonly chainMode: ChainMode;
  /** undefined for ecb (no IV). */
  readonly ivMode: IvModeName | undefined;
  /** `essiv:<hash>` hash name, lower case as given. */
  readonly ivOpts: string | undefined;
  /** Allowed key lengths in bytes; empty means any length (cipher_null ignores its key). */
  readonly keyBytesAllowed: readonly number[];
  /** Cipher block size in bytes (16 for aes, 16 used for cipher_null as well). */
  readonly blockBytes: number;
  /** Legacy-syntax spelling: `aes-xts-plain64`, `aes-cbc-essiv:sha256`, `cipher_null-ecb`. */
  readonly canonical: string;
}

const KNOWN_CIPHERS = new Set([
  'serpent',
  'twofish',
  'camellia',
  'aria',
  'sm4',
  'cast5',
  'cast6',
  'blowfish',
  'des',
  'des3_ede',
  'anubis',
  'khazad',
  'tea',
  'xtea',
  'seed',
  'chacha20',
  'xchacha12',
  'xchacha20',
]);
const KNOWN_CHAIN_MODES = new Set([
  'lrw',
  'ctr',
  'pcbc',
  'cts',
  'cfb',
  'ofb',
  'gcm',
  'ccm',
  'hctr2',
  'adiantum',
  'xctr',
  'essiv',
]);
const KNOWN_IV_MODES = new Set(['lmk', 'tcw', 'random', 'eboiv', 'elephant']);
const AEAD_CAPI = /^(authenc|authencesn|gcm|ccm|rfc4106|rfc4309|rfc4543|rfc7539|rfc7539esp|aegis128|morus)\(/;

const NAME = /^[a-z0-9_]+$/i;

function bad(spec: string, why: string): CryptmapError {
  return new CryptmapError('ECIPHER_SPEC', `invalid cipher specification '${spec}': ${why}`, { context: { spec } });
}

function unsupported(spec: string, part: string, what: string): CryptmapError {
  return new CryptmapError(
    'ECIPHER_UNSUPPORTED',
    `cipher specification '${spec}': ${what} '${part}' is not supported (supported: aes with xts, cbc or ecb; IV modes ${supportedIvModes()}; cipher_null-ecb)`,
    {
      errno: 'ENOTSUP',
      context: { spec, part },
    },
  );
}

/** Split at the first occurrence of `sep` (strsep semantics): [head, rest | undefined]. */
function strsep(s: string, sep: string): [string, string | undefined] {
  const i = s.indexOf(sep);
  return i < 0 ? [s, undefined] : [s.slice(0, i), s.slice(i + 1)];
}

/**
 * Parse a dm-crypt cipher spec strictly.
 * @example parseCipherSpec('aes-xts-plain64') // { cipher: 'aes', chainMode: 'xts', ivMode: 'plain64', ... }
 * @throws CryptmapError ECIPHER_SPEC (malformed) or ECIPHER_UNSUPPORTED (valid for the kernel, not here)
 */
export function parseCipherSpec(spec: string): CipherSpec {
  if (typeof spec !== 'string' || spec.length === 0) throw bad(String(spec), 'empty');
  if (spec.length > 256 || /[\s\0]/.test(spec)) throw bad(spec, 'contains white space or is too long');
  let cipher: string;
  let chain: string;
  let keyCount = 1;
  let ivMode: string | undefined;
  let ivOpts: string | undefined;
  const capi = spec.startsWith('capi:');
  if (capi) {
    const [api, rest] = strsep(spec.slice(5), '-');
    if (api.length === 0) throw bad(spec, 'missing kernel cipher after capi:');
    if (AEAD_CAPI.test(api)) throw unsupported(spec, api, 'AEAD cipher');
    const m = /^([a-z0-9_]+)\(([a-z0-9_]+)\)$/i.exec(api);
    if (!m) {
      if (/^[a-z0-9_]+\(.*\)$/i.test(api) && balanced(api)) throw unsupported(spec, api, 'kernel cipher');
      throw bad(spec, `'${api}' is not of the form chainmode(cipher)`);
    }
    chain = m[1]!;
    cipher = m[2]!;
    if (rest !== undefined) [ivMode, ivOpts] = strsep(rest, ':');
  } else {
    const [head, rest] = strsep(spec, '-');
    const [c, kc] = strsep(head, ':');
    cipher = c;
    if (kc !== undefined) {
      if (!/^[0-9]+$/.test(kc) || Number(kc) === 0 || (Number(kc) & (Number(kc) - 1)) !== 0 || Number(kc) > 64) {
        throw bad(spec, `bad key count '${kc}' (a power of two expected)`);
      }
      keyCount = Number(kc);
    }
    let chainPart: string | undefined;
    let ivPart: string | undefined;
    if (rest !== undefined) [chainPart, ivPart] = strsep(rest, '-');
    if (ivPart !== undefined) [ivMode, ivOpts] = strsep(ivPart, ':');
    // Original dm-crypt format: a lone cipher name, or `cipher-plain`, means cbc-plain.
    if (chainPart === undefined || (chainPart === 'plain' && ivMode === undefined)) {
      chainPart = 'cbc';
      ivMode = 'plain';
    }
    chain = chainPart;
  }
  if (!NAME.test(cipher)) throw bad(spec, `bad cipher name '${cipher}'`);
  if (!NAME.test(chain)) throw bad(spec, `bad chain mode '${chain}'`);
  if (ivMode !== undefined && !NAME.test(ivMode)) throw bad(spec, `bad IV mode '${ivMode}'`);
  if (ivOpts !== undefined && !/^[a-z0-9_-]+$/i.test(ivOpts)) throw bad(spec, `bad IV options '${ivOpts}'`);

  if (cipher !== 'aes' && cipher !== 'cipher_null') {
    if (KNOWN_CIPHERS.has(cipher)) throw unsupported(spec, cipher, 'cipher');
    throw unsupported(spec, cipher, 'unknown cipher');
  }
  if (chain !== 'xts' && chain !== 'cbc' && chain !== 'ecb') {
    if (KNOWN_CHAIN_MODES.has(chain)) throw unsupported(spec, chain, 'chain mode');
    throw unsupported(spec, chain, 'unknown chain mode');
  }
  if (chain !== 'ecb' && ivMode === undefined) throw bad(spec, 'IV mechanism required (chainmode-ivmode)');
  if (chain === 'ecb') {
    // The kernel drops the IV mode for IV-less modes ("Selected cipher does not support IVs").
    ivMode = undefined;
    ivOpts = undefined;
  } else if (ivMode !== undefined && !ivGenerator(ivMode)) {
    if (KNOWN_IV_MODES.has(ivMode)) throw unsupported(spec, ivMode, 'IV mode');
    throw bad(spec, `unknown IV mode '${ivMode}'`);
  }
  if (keyCount !== 1) throw unsupported(spec, `${cipher}:${keyCount}`, 'multi-key');
  if (cipher === 'cipher_null' && chain !== 'ecb') throw unsupported(spec, `${chain}(cipher_null)`, 'chain mode');
  if (ivMode === 'essiv') {
    if (ivOpts === undefined || ivOpts.length === 0) throw bad(spec, 'essiv needs a hash (essiv:sha256)');
    if (!getHashes().includes(ivOpts)) throw unsupported(spec, ivOpts, 'essiv hash');
  } else if (ivOpts !== undefined) {
    throw bad(spec, `IV mode '${ivMode}' takes no options (':${ivOpts}')`);
  }
  let keyBytesAllowed: number[];
  if (cipher === 'cipher_null') keyBytesAllowed = [];
  else if (chain === 'xts') keyBytesAllowed = [32, 48, 64];
  else keyBytesAllowed = [16, 24, 32];
  const ivPart = ivMode === undefined ? '' : `-${ivMode}${ivOpts === undefined ? '' : `:${ivOpts}`}`;
  return {
    spec,
    capi,
    cipher,
    keyCount,
    chainMode: chain,
    ivMode: ivMode as IvModeName | undefined,
    ivOpts,
    keyBytesAllowed,
    blockBytes: 16,
    canonical: `${cipher}-${chain}${ivPart}`,
  };
}

function balanced(s: string): boolean {
  let depth = 0;
  for (const ch of s) {
    if (ch === '(') depth++;
    else if (ch === ')' && --depth < 0) return false;
  }
  return depth === 0;
}

/** Throw EKEY_SIZE unless `keyBytes` fits the spec. */
export function checkKeyBytes(spec: CipherSpec, keyBytes: number): void {
  if (spec.keyBytesAllowed.length === 0 || spec.keyBytesAllowed.includes(keyBytes)) return;
  throw new CryptmapError(
    'EKEY_SIZE',
    `cipher '${spec.spec}' takes a key of ${spec.keyBytesAllowed.join(', ')} bytes, not ${keyBytes} bytes (${keyBytes * 8} bits)`,
    {
      context: { spec: spec.spec, keyBytes },
    },
  );
}
