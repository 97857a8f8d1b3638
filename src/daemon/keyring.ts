/**
 * The daemon's keyring: volume keys by description, in memory only, resolved by the dm crypt target
 * for `:<bytes>:logon:<description>` table keys (the userspace twin of the kernel's logon keys).
 * Entries are wiped when removed and at shutdown.
 */
import type { KeyRef, KeyStore } from '../dm/types.js';
import { CryptmapError } from '../util/errors.js';
import { Secret } from '../util/secret.js';

export class Keyring implements KeyStore {
  readonly #keys = new Map<string, Secret>();

  /** Store a copy of `key` under `description`, replacing (and wiping) any previous one. */
  set(description: string, key: Uint8Array): void {
    this.#keys.get(description)?.dispose();
    this.#keys.set(description, Secret.copyOf(key));
  }

  has(description: string): boolean {
    return this.#keys.has(description);
  }

  delete(description: string): void {
    this.#keys.get(description)?.dispose();
    this.#keys.delete(description);
  }

  async resolve(ref: KeyRef): Promise<Secret> {
    if (ref.type !== 'logon' && ref.type !== 'user') {
      throw new CryptmapError(
        'EKEYTYPE',
        `key type '${ref.type}' is not supported by the cryptmap keyring (logon or user)`,
      );
    }
    const k = this.#keys.get(ref.description);
    if (!k)
      throw new CryptmapError('ENOKEY', `no key '${ref.description}' in the cryptmap keyring`, { errno: 'ENOENT' });
    if (k.length !== ref.keyBytes) {
      throw new CryptmapError(
        'EKEY_SIZE',
        `key '${ref.description}' has ${k.length} bytes, the table asks for ${ref.keyBytes}`,
      );
    }
    return Secret.copyOf(k.expose());
  }

  clear(): void {
    for (const k of this.#keys.values()) k.dispose();
    this.#keys.clear();
  }
}
