/**
 * The contract between the engine and a sector-cipher backend (`native` addon or `js` over
 * node:crypto). The engine validates everything (alignment, lengths, overlap, 2^64 range) and hands
 * the backend whole sectors plus the first IV sector as two uint32 halves and the IV step.
 */
import type { CipherSpec } from '../cipher-spec.js';
import type { IvInstance } from '../iv/index.js';

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
  dispose(): void;
  /** Benchmarks and tests only: pick the native XTS implementation (see NativeAddon.setXtsImpl). */
  setXtsImpl?(impl: number): void;
}

export interface BackendOps {
  readonly name: BackendName;
  create(spec: CipherSpec, key: Uint8Array, sectorBytes: number, iv: IvInstance | undefined): SectorTransform;
}
