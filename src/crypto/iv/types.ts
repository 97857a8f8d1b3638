/**
 * dm-crypt IV generators as an ops table keyed by the IV mode name (Linux drivers/md/dm-crypt.c,
 * `struct iv_operations` and the "IV modes" comment above `crypt_iv_plain_gen`; cryptsetup's userspace
 * twin lib/crypto_backend/crypto_storage.c `crypt_sector_iv_generate`). One file per generator.
 *
 * IV sectors are unsigned 64-bit numbers carried as two uint32 halves (lo, hi) so the per-sector
 * loop stays in small-integer arithmetic; the engine has already checked that no IV sector of the
 * request passes 2^64 - 1.
 */
import type { CipherSpec } from '../cipher-spec.js';

export const IV_BYTES = 16;

export interface IvInitContext {
  spec: CipherSpec;
  /** The data key (ESSIV hashes it). Not kept. */
  key: Uint8Array;
}

export interface IvInstance {
  /**
   * Write `count` IVs of 16 bytes into `out` (at offset 0) for IV sectors
   * first, first + step, first + 2*step, ... where first = hi * 2^32 + lo.
   */
  generate(out: Uint8Array, count: number, lo: number, hi: number, step: number): void;
  /** Key of the IV cipher a native backend needs (ESSIV: H(key)); undefined when none. */
  readonly nativeKey: Uint8Array | undefined;
  /** Wipe key material held by the generator. Idempotent. */
  dispose(): void;
}

export interface IvOps {
  readonly name: string;
  /** What the mode takes after ':' as the supported list prints it (essiv: '<hash>'); none when undefined. */
  readonly options?: string;
  init(ctx: IvInitContext): IvInstance;
}

const TWO32 = 0x100000000;

/** Call fn(i, lo, hi) for count IV sectors starting at hi * 2^32 + lo, advancing by step (< 2^32). */
export function forEachIvSector(
  count: number,
  lo: number,
  hi: number,
  step: number,
  fn: (i: number, lo: number, hi: number) => void,
): void {
  for (let i = 0; i < count; i++) {
    fn(i, lo, hi);
    lo += step;
    if (lo >= TWO32) {
      lo -= TWO32;
      hi = (hi + 1) >>> 0;
    }
  }
}

export function writeLe32(out: Uint8Array, off: number, v: number): void {
  out[off] = v & 0xff;
  out[off + 1] = (v >>> 8) & 0xff;
  out[off + 2] = (v >>> 16) & 0xff;
  out[off + 3] = (v >>> 24) & 0xff;
}

export function writeBe32(out: Uint8Array, off: number, v: number): void {
  out[off] = (v >>> 24) & 0xff;
  out[off + 1] = (v >>> 16) & 0xff;
  out[off + 2] = (v >>> 8) & 0xff;
  out[off + 3] = v & 0xff;
}

export const NO_STATE = { nativeKey: undefined, dispose(): void {} };

/**
 * A generator whose IV is a function of the sector number alone (plain, plain64, plain64be): the IV
 * is zeroed, then `write(out, at, lo, hi)` writes the sector's part of it at offset `at`.
 */
export function sectorIv(name: string, write: (out: Uint8Array, at: number, lo: number, hi: number) => void): IvOps {
  return {
    name,
    init(): IvInstance {
      return {
        ...NO_STATE,
        generate(out, count, lo, hi, step) {
          out.fill(0, 0, count * IV_BYTES);
          forEachIvSector(count, lo, hi, step, (i, l, h) => write(out, i * IV_BYTES, l, h));
        },
      };
    },
  };
}
