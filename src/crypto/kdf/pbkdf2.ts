/**
 * PBKDF2 (RFC 8018 §5.2) via Node's `crypto.pbkdf2`, which runs on the libuv thread pool (off the
 * main thread). Hash names are LUKS spellings (see hash.ts).
 */
import { pbkdf2 as nodePbkdf2 } from 'node:crypto';
import { CryptmapError } from '../../util/errors.js';
import { nodeHashName } from './hash.js';

export async function pbkdf2(
  hash: string,
  password: Uint8Array,
  salt: Uint8Array,
  iterations: number,
  keyBytes: number,
): Promise<Buffer> {
  const name = nodeHashName(hash);
  if (!Number.isSafeInteger(iterations) || iterations < 1 || iterations > 0xffffffff) {
    throw new CryptmapError('EKDFPARAM', `Invalid PBKDF2 iteration count ${iterations}.`);
  }
  return new Promise((resolve, reject) => {
    nodePbkdf2(password, salt, iterations, keyBytes, name, (err, key) => (err ? reject(err) : resolve(key)));
  });
}
