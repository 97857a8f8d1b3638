/**
 * Password-based key derivation for LUKS keyslots: PBKDF2 and Argon2i/Argon2id, both off the main
 * thread, plus calibration like cryptsetup's `--iter-time` (lib/utils_pbkdf.c, lib/crypto_backend/
 * pbkdf_check.c): PBKDF2 iterations scaled to the target time (minimum 1000); Argon2 with memory up to
 * 1 GiB capped at half of RAM, lanes capped at 4 and the CPU count, time cost >= 4, memory reduced first when
 * even the minimum time cost is too slow.
 */
import { cpus, totalmem } from 'node:os';
import { CryptmapError } from '../../util/errors.js';
import { ARGON2_MAX_PARALLEL, ARGON2_MIN_MEMORY_KIB, ARGON2_MIN_TIME, type Argon2Type, argon2 } from './argon2.js';
import { pbkdf2 } from './pbkdf2.js';

export {
  argon2,
  ARGON2_MAX_MEMORY_KIB,
  ARGON2_MAX_PARALLEL,
  ARGON2_MIN_MEMORY_KIB,
  ARGON2_MIN_TIME,
} from './argon2.js';
export { digest, hashAvailable, hashDigestBytes, nodeHashName } from './hash.js';
export { pbkdf2 } from './pbkdf2.js';

/** A keyslot's passphrase hashing: PBKDF2 with a hash and iterations, or Argon2 with time, memory and lanes. */
export type KdfParams =
  | { type: 'pbkdf2'; hash: string; iterations: number }
  | { type: Argon2Type; time: number; memoryKiB: number; parallel: number };

export const PBKDF2_MIN_ITERATIONS = 1000;
export const DEFAULT_ITER_TIME_MS = 2000;
export const DEFAULT_ARGON2_MEMORY_KIB = 1024 * 1024;
export const DEFAULT_ARGON2_PARALLEL = 4;

/** Derive `keyBytes` from a passphrase. The caller owns (and wipes) the result. */
export function deriveKey(
  params: KdfParams,
  password: Uint8Array,
  salt: Uint8Array,
  keyBytes: number,
): Promise<Buffer> {
  if (params.type === 'pbkdf2') return pbkdf2(params.hash, password, salt, params.iterations, keyBytes);
  return argon2(params.type, password, salt, params.time, params.memoryKiB, params.parallel, keyBytes);
}

export interface CalibrateOptions {
  type: 'pbkdf2' | Argon2Type;
  /** PBKDF2 hash. */
  hash?: string;
  /** Target unlock time (cryptsetup --iter-time), default 2000 ms. */
  iterTimeMs?: number;
  /** Argon2 memory ceiling (cryptsetup --pbkdf-memory), default 1 GiB, capped at half of RAM. */
  maxMemoryKiB?: number;
  /** Argon2 lanes (cryptsetup --pbkdf-parallel), default 4, capped at 4 and the CPU count. */
  parallel?: number;
  keyBytes: number;
}

/** Half of physical memory in KiB (cryptsetup caps Argon2 memory there). */
export function memoryCapKiB(): number {
  return Math.floor(totalmem() / 1024 / 2);
}

/** Find KDF parameters that take about `iterTimeMs` here. Deterministic inputs, timing-dependent output. */
export async function calibrateKdf(opts: CalibrateOptions): Promise<KdfParams> {
  const target = opts.iterTimeMs ?? DEFAULT_ITER_TIME_MS;
  if (!(target > 0)) throw new CryptmapError('EKDFPARAM', 'Invalid --iter-time.');
  const salt = Buffer.alloc(32, 0x5a);
  const pass = Buffer.from('calibration');
  if (opts.type === 'pbkdf2') {
    const hash = opts.hash ?? 'sha256';
    let iterations = 1 << 14;
    let ms = 0;
    // Grow the sample until it takes long enough to measure reliably.
    for (;;) {
      const t0 = performance.now();
      (await pbkdf2(hash, pass, salt, iterations, opts.keyBytes)).fill(0);
      ms = performance.now() - t0;
      if (ms >= 50 || iterations >= 1 << 24) break;
      iterations *= 4;
    }
    const scaled = Math.floor((iterations * target) / Math.max(ms, 0.001));
    return { type: 'pbkdf2', hash, iterations: Math.max(PBKDF2_MIN_ITERATIONS, Math.min(scaled, 0xffffffff)) };
  }
  const parallel = Math.max(
    1,
    Math.min(opts.parallel ?? DEFAULT_ARGON2_PARALLEL, ARGON2_MAX_PARALLEL, cpus().length || 1),
  );
  let memoryKiB = Math.max(
    ARGON2_MIN_MEMORY_KIB,
    Math.min(opts.maxMemoryKiB ?? DEFAULT_ARGON2_MEMORY_KIB, memoryCapKiB()),
  );
  // Measure the minimum time cost at a sample memory size, then extrapolate (Argon2 is linear in t*m).
  const sampleKiB = Math.min(memoryKiB, 64 * 1024);
  const t0 = performance.now();
  (await argon2(opts.type, pass, salt, ARGON2_MIN_TIME, sampleKiB, parallel, opts.keyBytes)).fill(0);
  const msPerTKiB = Math.max(performance.now() - t0, 0.001) / (ARGON2_MIN_TIME * sampleKiB);
  let time = Math.floor(target / (msPerTKiB * memoryKiB));
  if (time < ARGON2_MIN_TIME) {
    time = ARGON2_MIN_TIME;
    memoryKiB = Math.max(ARGON2_MIN_MEMORY_KIB, Math.floor(target / (msPerTKiB * ARGON2_MIN_TIME)));
  }
  return { type: opts.type, time: Math.min(time, 0xffffffff), memoryKiB, parallel };
}
