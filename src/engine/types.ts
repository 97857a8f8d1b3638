/**
 * The dm-crypt sector transform contract (implemented in engine/, used by the dm crypt target,
 * LUKS keyslot areas and benchmarks).
 *
 * A SectorCipher encrypts or decrypts a run of whole crypto sectors. Positions are given in
 * 512-byte units (`sector`), exactly like a dm-crypt bio sector relative to the target start:
 *   ivSector = sector + ivOffsetSectors                  (advances by sectorBytes/512 per crypto sector)
 *   ivSector = (sector + ivOffsetSectors) >> log2(sectorBytes/512)   with ivLargeSectors
 * Data length must be a multiple of sectorBytes and `sector` a multiple of sectorBytes/512.
 */

export type SectorBytes = 512 | 1024 | 2048 | 4096;

/** Options of `createSectorCipher`: the dm-crypt table's cipher, key, sector size and IV settings. */
export interface SectorCipherOptions {
  /** dm-crypt cipher spec: `aes-xts-plain64`, `aes-cbc-essiv:sha256`, `capi:xts(aes)-plain64`, ... */
  spec: string;
  /** Raw key bytes (for multi-key specs, all keys concatenated). Copied; the caller keeps ownership. */
  key: Uint8Array;
  /** Crypto sector size; default 512. */
  sectorBytes?: SectorBytes;
  /** dm-crypt `iv_large_sectors`: count IVs in sectorBytes units instead of 512-byte units. */
  ivLargeSectors?: boolean;
  /** dm-crypt `<iv_offset>`, in 512-byte units; default 0. */
  ivOffsetSectors?: bigint;
  /** Force a backend; default: CRYPTMAP_CRYPTO_BACKEND env, else native when built, else js. */
  backend?: 'native' | 'js';
  /**
   * dm-crypt `same_cpu_crypt`: the async forms run on the calling thread too (no thread pool).
   * Default false: requests of at least `asyncMinBytes` go to the libuv thread pool (native backend).
   */
  sameCpu?: boolean;
  /** Smallest request the async forms send to the pool; smaller ones run inline. Default 65536. */
  asyncMinBytes?: number;
}

/**
 * A dm-crypt sector transform for one key (`createSectorCipher`): sync forms on the calling thread,
 * async forms on the crypt thread pool. `dispose()` wipes the key schedule.
 */
export interface SectorCipher {
  readonly spec: string;
  readonly sectorBytes: SectorBytes;
  readonly keyBytes: number;
  readonly backend: 'native' | 'js';
  /** Encrypt `src` (whole sectors starting at 512-byte sector `sector`) into `dst` (default: in place). */
  encrypt(src: Uint8Array, sector: bigint, dst?: Uint8Array): void;
  /** Decrypt `src` (whole sectors starting at 512-byte sector `sector`) into `dst` (default: in place). */
  decrypt(src: Uint8Array, sector: bigint, dst?: Uint8Array): void;
  /**
   * Same, off the calling thread for large requests (pool of threads); small ones may run inline.
   * `src` and `dst` must not be touched (or detached) until the promise settles.
   */
  encryptAsync(src: Uint8Array, sector: bigint, dst?: Uint8Array): Promise<void>;
  /** `decrypt` off the calling thread for large requests; the buffers stay untouched until it settles. */
  decryptAsync(src: Uint8Array, sector: bigint, dst?: Uint8Array): Promise<void>;
  /**
   * Read `buf.byteLength` bytes of file descriptor `fd` at `fileOffsetBytes` into `buf` and decrypt
   * them in place (whole sectors starting at 512-byte sector `sector`). On the native backend the read
   * and the cipher are one job on a crypt thread: one hand-off instead of two (the libuv pool for
   * the read, then the crypt pool). The caller keeps `fd` open until the promise settles. I/O errors
   * reject with the system error (its `code` is the errno name; ESHORTIO at end of file).
   */
  readDecryptAsync(fd: number, fileOffsetBytes: number, buf: Uint8Array, sector: bigint): Promise<void>;
  /** Encrypt `src` into `dst` (default: in place) and write `dst` to `fd` at `fileOffsetBytes`; as above. */
  encryptWriteAsync(
    fd: number,
    fileOffsetBytes: number,
    src: Uint8Array,
    sector: bigint,
    dst?: Uint8Array,
  ): Promise<void>;
  /** Wipe the key schedule; further use throws. Idempotent. */
  dispose(): void;
}
