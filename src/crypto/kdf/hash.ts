/**
 * Hash names as LUKS spells them (cryptsetup's crypto backend: "sha1", "sha256", "sha512",
 * "ripemd160", ...) mapped to Node's OpenSSL names, with their digest lengths. Used by PBKDF2, the
 * AF splitter's diffusion and the LUKS2 header checksum.
 */
import { createHash, getHashes } from 'node:crypto';
import { CryptmapError } from '../../util/errors.js';
import { loadNative } from '../../util/native.js';

const DIGEST_BYTES: Record<string, number> = {
  sha1: 20,
  sha224: 28,
  sha256: 32,
  sha384: 48,
  sha512: 64,
  ripemd160: 20,
  'sha3-224': 28,
  'sha3-256': 32,
  'sha3-384': 48,
  'sha3-512': 64,
  blake2b512: 64,
  blake2s256: 32,
  sm3: 32,
  whirlpool: 64,
};

/** Hashes OpenSSL 3 keeps in its legacy provider, which Node loads only for --openssl-legacy-provider. */
const LEGACY = new Set(['whirlpool']);

let available: Set<string> | undefined;

/** Node's name for a LUKS hash name, or throws EHASH (exit 1) when Node lacks it (e.g. whirlpool). */
export function nodeHashName(luksName: string): string {
  const n = luksName.toLowerCase();
  available ??= new Set(getHashes());
  if (DIGEST_BYTES[n] !== undefined && !available.has(n) && LEGACY.has(n) && loadLegacy(n)) available.add(n);
  if (DIGEST_BYTES[n] === undefined || !available.has(n)) {
    throw new CryptmapError('EHASH', `Hash algorithm ${luksName} is not available.`, { context: { hash: luksName } });
  }
  return n;
}

/**
 * Whirlpool (LUKS1 headers made with --hash whirlpool): the native addon loads OpenSSL's legacy
 * provider into Node's own OpenSSL, process-wide. Without the addon the hash stays unavailable.
 */
function loadLegacy(n: string): boolean {
  try {
    if (!loadNative()?.loadLegacyProvider?.()) return false;
    createHash(n).update('').digest();
    return true;
  } catch {
    return false;
  }
}

/** Digest length in bytes of a LUKS hash name. */
export function hashDigestBytes(luksName: string): number {
  return DIGEST_BYTES[nodeHashName(luksName)]!;
}

/** True when the hash can be used here. */
export function hashAvailable(luksName: string): boolean {
  try {
    nodeHashName(luksName);
    return true;
  } catch {
    return false;
  }
}

/** One-shot digest. */
export function digest(luksName: string, ...parts: Uint8Array[]): Buffer {
  const h = createHash(nodeHashName(luksName));
  for (const p of parts) h.update(p);
  return h.digest();
}
