/**
 * Plain-mode (no header) key derivation from a passphrase, as `cryptsetup open --type plain --hash H`
 * does it (cryptsetup lib/crypt_plain.c `crypt_plain_hash`, notes C7 "Plain mode key derivation"):
 *
 *   key = H(p) || H("A" || p) || H("AA" || p) || ...   truncated to the key size
 *
 * `--hash H:N` uses only N bytes of that and zero-pads the rest (N <= key size). `--hash plain`
 * copies the passphrase itself, truncated or zero-padded to the key size; `plain:N` copies exactly
 * N bytes and needs a passphrase at least that long. With a key file, cryptsetup (and systemd's
 * crypttab) does not hash at all: that is `plain` here, and the caller reads exactly key-size bytes.
 * Vectors: cryptsetup tests/password-hash-test (see test/activate/plain-key.test.ts).
 */
import { createHash, getHashes } from 'node:crypto';
import { hashAvailable } from '../crypto/kdf/hash.js';
import { CryptmapError } from '../util/errors.js';
import { Secret } from '../util/secret.js';

/** cryptsetup hash names (gcrypt/kernel spelling) that differ from OpenSSL's. */
const HASH_ALIASES: Record<string, string> = { stribog256: 'streebog256', stribog512: 'streebog512' };

export interface PlainHashSpec {
  /** Hash name as cryptsetup spells it, or `plain`. */
  hash: string;
  /** Bytes of hash output used (the rest is zero); undefined = the whole key. */
  limit?: number;
}

/** Parse `H` or `H:N` strictly (cryptsetup fails on `sha256:` and `sha256:xx`). */
export function parsePlainHash(spec: string): PlainHashSpec {
  const i = spec.indexOf(':');
  const hash = i < 0 ? spec : spec.slice(0, i);
  if (!/^[a-z0-9-]+$/i.test(hash)) throw new CryptmapError('EPLAINHASH', `hash '${spec}' is not a hash name`);
  if (i < 0) return { hash };
  const n = spec.slice(i + 1);
  if (!/^[0-9]{1,6}$/.test(n))
    throw new CryptmapError('EPLAINHASH', `hash '${spec}': the length after ':' must be a number of bytes`);
  return { hash, limit: Number(n) };
}

function nodeHashName(hash: string): string {
  const name = HASH_ALIASES[hash.toLowerCase()] ?? hash.toLowerCase();
  // whirlpool: available once the native addon loaded OpenSSL's legacy provider (crypto/kdf/hash.ts).
  if (!getHashes().includes(name) && !hashAvailable(name)) {
    throw new CryptmapError('EPLAINHASH', `hash '${hash}' is not available in this Node.js/OpenSSL build`, {
      errno: 'ENOTSUP',
    });
  }
  return name;
}

/**
 * Derive a plain-mode key of `keyBytes` from `passphrase` with cryptsetup's `--hash` semantics.
 * @example plainKeyFromPassphrase(Buffer.from('xxx'), 'sha256', 32) // cd2eb083...6860
 */
export function plainKeyFromPassphrase(passphrase: Uint8Array, hashSpec: string, keyBytes: number): Secret {
  if (!Number.isInteger(keyBytes) || keyBytes < 1 || keyBytes > 512)
    throw new CryptmapError('EPLAINHASH', `key size ${keyBytes} bytes is out of range`);
  const key = Buffer.alloc(keyBytes);
  const p = Buffer.from(passphrase.buffer, passphrase.byteOffset, passphrase.byteLength);
  if (hashSpec === 'plain') {
    p.copy(key, 0, 0, Math.min(p.length, keyBytes));
    return new Secret(key);
  }
  const { hash, limit } = parsePlainHash(hashSpec);
  const used = limit ?? keyBytes;
  if (used > keyBytes)
    throw new CryptmapError('EPLAINHASH', `hash '${hashSpec}': ${used} bytes is more than the key size (${keyBytes})`);
  if (hash === 'plain') {
    if (p.length < used)
      throw new CryptmapError('EPLAINHASH', `passphrase is shorter than the ${used} bytes '${hashSpec}' copies`);
    p.copy(key, 0, 0, used);
    return new Secret(key);
  }
  const name = nodeHashName(hash);
  let off = 0;
  for (let round = 0; off < used; round++) {
    const h = createHash(name);
    if (round > 0) h.update(Buffer.alloc(round, 0x41)); // "A" x round: hashalot's trick against null bytes
    h.update(p);
    const d = h.digest();
    off += d.copy(key, off, 0, Math.min(d.length, used - off));
    d.fill(0);
  }
  return new Secret(key);
}
