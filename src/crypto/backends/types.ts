/**
 * The contract between the engine and a sector-cipher backend (`native` addon or `js` over
 * node:crypto). The engine validates everything (alignment, lengths, overlap, 2^64 range) and hands
 * the backend whole sectors plus the first IV sector as two uint32 halves and the IV step.
 */
import type { CipherSpec } from '../cipher-spec.js';
import type { IvInstance } from '../iv/index.js';

/** The crypto backends: `native` (the addon over OpenSSL) and `js` (node:crypto). */
export type BackendName = 'native' | 'js';

export interface SectorRun {
  encrypt: boolean;
  src: Uint8Array;
  /** Same length as src; either the very same bytes as src (in place) or not overlapping it. */
  dst: Uint8Array;
  count: number;
  /** First IV sector, low and high 32 bits. */
  ivLo: number;
  ivHi: number;
  /** IV sectors per crypto sector (1 with iv_large_sectors, else sectorBytes/512). */
  ivStep: number;
}

export interface SectorTransform {
  run(r: SectorRun): void;
  /** Off the calling thread (native: libuv pool). src/dst must stay untouched until it settles. */
  runAsync(r: SectorRun): Promise<void>;
  /**
   * Optional: runAsync fused with file I/O in the same off-thread job: decrypting, first read
   * src.byteLength bytes of `fd` at `fileOffsetBytes` into src; encrypting, afterwards write dst
   * there. I/O errors reject with an Error whose `code` is the errno name (ESHORTIO at end of file).
   * The caller keeps `fd` open until the promise settles.
   */
  runFileAsync?(r: SectorRun, fd: number, fileOffsetBytes: number): Promise<void>;
  dispose(): void;
  /** Benchmarks and tests only: pick the native XTS implementation (see NativeAddon.setXtsImpl). */
  setXtsImpl?(impl: number): void;
}

export interface BackendOps {
  readonly name: BackendName;
  create(spec: CipherSpec, key: Uint8Array, sectorBytes: number, iv: IvInstance | undefined): SectorTransform;
}
