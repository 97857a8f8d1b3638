/**
 * The engine's public surface: dm-crypt sector ciphers (see types.ts for the IV numbering contract).
 *   createSectorCipher({ spec, key, sectorBytes?, ivLargeSectors?, ivOffsetSectors?, backend?, sameCpu? })
 *   parseCipherSpec('aes-xts-plain64')     strict dm-crypt spec grammar, both syntaxes
 *   defaultBackend()                        'native' | 'js' as chosen without an explicit backend
 *   setCryptThreads(n)                      size of the native crypt thread pool used by the async forms
 *   cryptPoolStats()                        the crypt pool's threads, busy threads and queue (metrics)
 *   nativeXtsImpl()                         the addon's XTS implementation in use (vaes512|vaes256|aesni|evp)
 *
 * @module cryptmap/engine
 */
export { defaultBackend, type BackendName } from '../crypto/backends/index.js';
export {
  type ChainMode,
  type CipherName,
  type CipherSpec,
  checkKeyBytes,
  parseCipherSpec,
} from '../crypto/cipher-spec.js';
export { nativeAvailable, nativeXtsImpl } from '../crypto/backends/native.js';
export {
  type CryptPoolStats,
  createSectorCipher,
  cryptPoolStats,
  DEFAULT_ASYNC_MIN_BYTES,
  setCryptThreads,
} from './sector-cipher.js';
export type { SectorBytes, SectorCipher, SectorCipherOptions } from './types.js';
export { type BenchmarkOptions, type BenchmarkResult, benchmarkCipher } from './benchmark.js';
