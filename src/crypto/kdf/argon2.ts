/**
 * Argon2i and Argon2id (RFC 9106) as LUKS2 uses them (cryptsetup lib/crypto_backend/argon2_generic.c):
 * version 0x13, t_cost = time, m_cost = memory in KiB, lanes = threads = cpus, no secret, no
 * associated data, raw output of the requested length. Runs in the native `argon2` package on the
 * libuv thread pool, so the main thread stays free.
 */
import { createRequire } from 'node:module';
import { CryptmapError, EXIT_NOMEM } from '../../util/errors.js';

export type Argon2Type = 'argon2i' | 'argon2id';

interface Argon2Module {
  hash(password: Buffer, options: Record<string, unknown> & { raw: true }): Promise<Buffer>;
}

let mod: Argon2Module | undefined;
function load(): Argon2Module {
  // Lazily loaded: the native addon is only needed when an Argon2 keyslot is used.
  mod ??= createRequire(import.meta.url)('argon2') as Argon2Module;
  return mod;
}

/** Argon2 limits cryptsetup enforces (lib/crypto_backend/pbkdf_check.c, lib/utils_pbkdf.c). */
export const ARGON2_MIN_TIME = 4;
export const ARGON2_MIN_MEMORY_KIB = 32;
export const ARGON2_MAX_MEMORY_KIB = 4 * 1024 * 1024;
export const ARGON2_MAX_PARALLEL = 4;

export async function argon2(
  type: Argon2Type,
  password: Uint8Array,
  salt: Uint8Array,
  time: number,
  memoryKiB: number,
  parallel: number,
  keyBytes: number,
): Promise<Buffer> {
  if (!Number.isInteger(time) || time < 1 || time > 0xffffffff)
    throw new CryptmapError('EKDFPARAM', `Invalid Argon2 time cost ${time}.`);
  // Lanes are threads here (one thread each), so the lane count is bounded first, by cryptsetup's
  // limit (a header may say 2^24-1); then memory is raised to libargon2's 8 KiB per lane (cryptsetup
  // never stores less) and only then held to the 4 GiB cap, which the raise cannot get past.
  if (!Number.isInteger(parallel) || parallel < 1 || parallel > ARGON2_MAX_PARALLEL) {
    throw new CryptmapError(
      'EKDFLIMIT',
      `Argon2 parallel cost ${parallel} is outside cryptsetup's limits (1 to ${ARGON2_MAX_PARALLEL} threads).`,
      { exitCode: 1, errno: 'EINVAL' },
    );
  }
  if (Number.isInteger(memoryKiB) && memoryKiB < 8 * parallel) memoryKiB = 8 * parallel;
  if (!Number.isInteger(memoryKiB) || memoryKiB < 8 || memoryKiB > ARGON2_MAX_MEMORY_KIB) {
    throw new CryptmapError('EKDFPARAM', `Invalid Argon2 memory cost ${memoryKiB} KiB.`);
  }
  try {
    return await load().hash(Buffer.from(password.buffer, password.byteOffset, password.byteLength), {
      raw: true,
      type: type === 'argon2i' ? 1 : 2,
      version: 0x13,
      timeCost: time,
      memoryCost: memoryKiB,
      parallelism: parallel,
      hashLength: keyBytes,
      salt: Buffer.from(salt),
    });
  } catch (e) {
    const msg = e instanceof Error ? e.message : String(e);
    if (/memory/i.test(msg))
      throw new CryptmapError('ENOMEM', 'Not enough memory for Argon2 key derivation.', {
        exitCode: EXIT_NOMEM,
        errno: 'ENOMEM',
        cause: e,
      });
    throw new CryptmapError('EKDF', `Argon2 key derivation failed: ${msg}`, { cause: e });
  }
}
