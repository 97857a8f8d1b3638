/** Shared test settings: cheap KDFs (tests only), memory devices. */
import { MemoryDevice } from '../../src/blockdev/memory.js';
import type { KdfParams } from '../../src/crypto/kdf/index.js';

export const FAST_PBKDF2: KdfParams = { type: 'pbkdf2', hash: 'sha256', iterations: 1000 };
export const FAST_ARGON: KdfParams = { type: 'argon2id', time: 4, memoryKiB: 32768, parallel: 1 };
export const P = (s: string) => Buffer.from(s);

export function memDev(sizeBytes = 20 << 20): MemoryDevice {
  return new MemoryDevice({ sizeBytes });
}
