/**
 * Byte helpers shared by every layer: hex, constant-time compare, wiping, alignment checks.
 * On-disk u64 values are `bigint`; in-memory byte offsets are `number` (safe below 2^53).
 */
import { timingSafeEqual } from 'node:crypto';
import { CryptmapError } from './errors.js';

export const SECTOR_SHIFT = 9;
/** The device-mapper sector: every `*Sectors` value counts these. */
export const SECTOR_BYTES = 512;

export function toHex(b: Uint8Array): string {
  return Buffer.from(b.buffer, b.byteOffset, b.byteLength).toString('hex');
}

/** Parse hex strictly (even length, hex digits only). */
export function fromHex(s: string, what = 'hex string'): Buffer {
  if (s.length % 2 !== 0 || !/^[0-9a-fA-F]*$/.test(s)) {
    throw new CryptmapError('EHEX', `${what} is not valid hex (even number of 0-9a-f digits expected)`);
  }
  return Buffer.from(s, 'hex');
}

/** Overwrite with zeros. Node cannot guarantee no copy survives elsewhere (GC moves, strings); see docs/secrets.md. */
export function wipe(...bufs: (Uint8Array | undefined | null)[]): void {
  for (const b of bufs) b?.fill(0);
}

export function constantTimeEqual(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && timingSafeEqual(a, b);
}

export function isPowerOfTwo(n: number): boolean {
  return Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

export function alignUp(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}

export function view(b: Uint8Array): Buffer {
  return Buffer.isBuffer(b) ? b : Buffer.from(b.buffer, b.byteOffset, b.byteLength);
}

/** Parse an unsigned decimal string into bigint, strictly (no sign, no spaces, at most u64). */
export function parseU64(s: string, what: string): bigint {
  if (!/^[0-9]+$/.test(s)) throw new CryptmapError('EU64', `${what}: '${s}' is not an unsigned decimal number`);
  const v = BigInt(s);
  if (v > 0xffffffffffffffffn) throw new CryptmapError('EU64', `${what}: '${s}' does not fit in 64 bits`);
  return v;
}

/** Parse an unsigned decimal string into a safe integer number, strictly. */
export function parseUint(s: string, what: string, max = Number.MAX_SAFE_INTEGER): number {
  if (!/^[0-9]+$/.test(s)) throw new CryptmapError('EUINT', `${what}: '${s}' is not an unsigned decimal number`);
  const v = Number(s);
  if (!Number.isSafeInteger(v) || v > max)
    throw new CryptmapError('EUINT', `${what}: '${s}' is too large (max ${max})`);
  return v;
}
