/**
 * The dm-crypt sector transform (Linux drivers/md/dm-crypt.c `crypt_convert`, `crypt_ctr`
 * `sector_size:` / `iv_large_sectors` handling): validates once at the edge, then hands whole runs
 * of sectors to a backend in one call.
 *
 * IV numbering: ivSector = sector + ivOffsetSectors in 512-byte units, advancing by sectorBytes/512
 * per crypto sector; with ivLargeSectors it is shifted right by log2(sectorBytes/512) and advances
 * by 1. The kernel wraps silently at 2^64; we refuse (ERANGE) a request whose IV sectors would.
 */
import { read, write } from 'node:fs';
import { parseCipherSpec, checkKeyBytes } from '../crypto/cipher-spec.js';
import {
  BACKENDS,
  type BackendName,
  defaultBackend,
  type SectorRun,
  type SectorTransform,
} from '../crypto/backends/index.js';
import { IV_GENERATORS, type IvInstance } from '../crypto/iv/index.js';
import { CryptmapError } from '../util/errors.js';
import { loadNative } from '../util/native.js';
import type { SectorBytes, SectorCipher, SectorCipherOptions } from './types.js';

const U64_MAX = 0xffffffffffffffffn;
const SECTOR_SIZES = [512, 1024, 2048, 4096];
/** Default `asyncMinBytes`: smaller requests of the async forms run on the calling thread. */
export const DEFAULT_ASYNC_MIN_BYTES = 65536;

/** Read or write all of `buf` at `pos` of `fd` (short transfers continued); ESHORTIO at end of file. */
async function fileIo(op: 'read' | 'write', fd: number, buf: Uint8Array, pos: number): Promise<void> {
  let done = 0;
  while (done < buf.byteLength) {
    const n = await new Promise<number>((resolve, reject) => {
      const cb = (e: NodeJS.ErrnoException | null, k: number) => (e ? reject(e) : resolve(k));
      if (op === 'read') read(fd, buf, done, buf.byteLength - done, pos + done, cb);
      else write(fd, buf, done, buf.byteLength - done, pos + done, cb);
    });
    if (n === 0) {
      throw Object.assign(
        new Error(`end of file ${op === 'read' ? 'reading' : 'writing'} ${buf.byteLength} bytes at ${pos}`),
        { code: 'ESHORTIO' },
      );
    }
    done += n;
  }
}

function alignError(what: string, context: Record<string, unknown>): CryptmapError {
  return new CryptmapError('EALIGN', what, { context });
}

function overlaps(a: Uint8Array, b: Uint8Array): boolean {
  return (
    a.buffer === b.buffer && a.byteOffset < b.byteOffset + b.byteLength && b.byteOffset < a.byteOffset + a.byteLength
  );
}

class Engine implements SectorCipher {
  readonly spec: string;
  readonly sectorBytes: SectorBytes;
  readonly keyBytes: number;
  readonly backend: BackendName;
  readonly #ivOffset: bigint;
  readonly #ivLarge: boolean;
  readonly #spb: number;
  readonly #spbShift: bigint;
  readonly #spbMask: bigint;
  /** Requests whose last IV sector stays below this need no 2^64 check (2^64 - 2^33, see #prepare). */
  readonly #safeFirst: bigint;
  readonly #sameCpu: boolean;
  readonly #asyncMin: number;
  #iv: IvInstance | undefined;
  #t: SectorTransform | undefined;
  #disposed = false;

  constructor(opts: SectorCipherOptions) {
    const spec = parseCipherSpec(opts.spec);
    if (!(opts.key instanceof Uint8Array)) throw new CryptmapError('EKEY_SIZE', 'key must be a Uint8Array');
    checkKeyBytes(spec, opts.key.length);
    const sb = opts.sectorBytes ?? 512;
    if (!SECTOR_SIZES.includes(sb)) {
      throw new CryptmapError('ESECTOR_SIZE', `sector size ${sb} is not one of 512, 1024, 2048, 4096`, {
        context: { sectorBytes: sb },
      });
    }
    const ivOffset = opts.ivOffsetSectors ?? 0n;
    if (typeof ivOffset !== 'bigint' || ivOffset < 0n || ivOffset > U64_MAX) {
      throw new CryptmapError('ERANGE', `iv offset ${String(ivOffset)} is not an unsigned 64-bit number`, {
        errno: 'EOVERFLOW',
      });
    }
    this.#spb = sb / 512;
    this.#spbShift = BigInt(Math.log2(this.#spb));
    this.#spbMask = BigInt(this.#spb - 1);
    this.#safeFirst = U64_MAX - (1n << 33n);
    if (ivOffset % BigInt(this.#spb) !== 0n) {
      throw alignError(`iv offset ${ivOffset} is not a multiple of the sector size (${this.#spb} x 512 bytes)`, {
        ivOffsetSectors: ivOffset,
        sectorBytes: sb,
      });
    }
    const asyncMin = opts.asyncMinBytes ?? DEFAULT_ASYNC_MIN_BYTES;
    if (!Number.isSafeInteger(asyncMin) || asyncMin < 0)
      throw new CryptmapError('EINVAL', `asyncMinBytes ${asyncMin} is not a non-negative integer`);
    const backend = opts.backend ?? defaultBackend();
    if (backend !== 'native' && backend !== 'js')
      throw new CryptmapError('EBACKEND', `unknown crypto backend '${String(backend)}'`);
    this.spec = opts.spec;
    this.sectorBytes = sb;
    this.keyBytes = opts.key.length;
    this.backend = backend;
    this.#ivOffset = ivOffset;
    this.#ivLarge = opts.ivLargeSectors === true;
    this.#sameCpu = opts.sameCpu === true;
    this.#asyncMin = asyncMin;
    try {
      this.#iv = spec.ivMode === undefined ? undefined : IV_GENERATORS[spec.ivMode].init({ spec, key: opts.key });
      this.#t = BACKENDS[backend].create(spec, opts.key, sb, this.#iv);
    } catch (e) {
      this.dispose();
      throw e;
    }
  }

  #prepare(encrypt: boolean, src: Uint8Array, sector: bigint, dst: Uint8Array | undefined): SectorRun | null {
    if (this.#disposed || this.#t === undefined)
      throw new CryptmapError('EDISPOSED', 'sector cipher used after dispose');
    if (!(src instanceof Uint8Array)) throw new CryptmapError('EINVAL', 'data must be a Uint8Array');
    const out = dst ?? src;
    if (!(out instanceof Uint8Array)) throw new CryptmapError('EINVAL', 'destination must be a Uint8Array');
    if (typeof sector !== 'bigint') throw new CryptmapError('EINVAL', `sector must be a bigint, not ${typeof sector}`);
    const len = src.byteLength;
    if (len % this.sectorBytes !== 0) {
      throw alignError(`length ${len} is not a multiple of the ${this.sectorBytes}-byte sector size`, {
        length: len,
        sectorBytes: this.sectorBytes,
      });
    }
    if (out.byteLength !== len) {
      throw new CryptmapError('EINVAL', `destination is ${out.byteLength} bytes, source ${len}`, {
        context: { length: len, dstLength: out.byteLength },
      });
    }
    if (out !== src && overlaps(src, out) && !(src.byteOffset === out.byteOffset)) {
      throw new CryptmapError(
        'EOVERLAP',
        'source and destination overlap partially (use the same buffer for in place)',
      );
    }
    if (sector < 0n || sector > U64_MAX) {
      throw new CryptmapError('ERANGE', `sector ${sector} is not an unsigned 64-bit number`, {
        errno: 'EOVERFLOW',
        context: { sector },
      });
    }
    if ((sector & this.#spbMask) !== 0n) {
      throw alignError(`sector ${sector} is not aligned to the ${this.sectorBytes}-byte sector size`, {
        sector,
        sectorBytes: this.sectorBytes,
      });
    }
    const count = len / this.sectorBytes;
    const first = sector + this.#ivOffset;
    // A request spans at most 2^33 512-byte sectors (lengths are below 2^42 bytes), so only a first
    // IV sector near the top of the range needs the exact check.
    if (count > 0 && first > this.#safeFirst && first + BigInt(count * this.#spb) - 1n > U64_MAX) {
      throw new CryptmapError(
        'ERANGE',
        `IV sectors of the request (sector ${sector}, ${count} sectors, iv offset ${this.#ivOffset}) pass 2^64`,
        {
          errno: 'EOVERFLOW',
          context: { sector, count, ivOffsetSectors: this.#ivOffset },
        },
      );
    }
    if (count === 0) return null;
    const iv = this.#ivLarge ? first >> this.#spbShift : first;
    return {
      encrypt,
      src,
      dst: out,
      count,
      ivLo: Number(iv & 0xffffffffn),
      ivHi: Number(iv >> 32n),
      ivStep: this.#ivLarge ? 1 : this.#spb,
    };
  }

  encrypt(src: Uint8Array, sector: bigint, dst?: Uint8Array): void {
    const r = this.#prepare(true, src, sector, dst);
    if (r !== null) this.#t!.run(r);
  }

  decrypt(src: Uint8Array, sector: bigint, dst?: Uint8Array): void {
    const r = this.#prepare(false, src, sector, dst);
    if (r !== null) this.#t!.run(r);
  }

  encryptAsync(src: Uint8Array, sector: bigint, dst?: Uint8Array): Promise<void> {
    return this.#async(true, src, sector, dst);
  }

  decryptAsync(src: Uint8Array, sector: bigint, dst?: Uint8Array): Promise<void> {
    return this.#async(false, src, sector, dst);
  }

  /** Errors (validation included) become rejections, never synchronous throws. */
  #async(encrypt: boolean, src: Uint8Array, sector: bigint, dst: Uint8Array | undefined): Promise<void> {
    try {
      const r = this.#prepare(encrypt, src, sector, dst);
      if (r === null) return Promise.resolve();
      if (this.#sameCpu || r.src.byteLength < this.#asyncMin) {
        this.#t!.run(r);
        return Promise.resolve();
      }
      return this.#t!.runAsync(r);
    } catch (e) {
      return Promise.reject(e);
    }
  }

  readDecryptAsync(fd: number, fileOffsetBytes: number, buf: Uint8Array, sector: bigint): Promise<void> {
    return this.#file(false, fd, fileOffsetBytes, buf, sector, undefined);
  }

  encryptWriteAsync(
    fd: number,
    fileOffsetBytes: number,
    src: Uint8Array,
    sector: bigint,
    dst?: Uint8Array,
  ): Promise<void> {
    return this.#file(true, fd, fileOffsetBytes, src, sector, dst);
  }

  #file(
    encrypt: boolean,
    fd: number,
    fileOffsetBytes: number,
    src: Uint8Array,
    sector: bigint,
    dst: Uint8Array | undefined,
  ): Promise<void> {
    try {
      if (!Number.isSafeInteger(fd) || fd < 0)
        throw new CryptmapError('EINVAL', `file descriptor ${fd} is not a non-negative integer`);
      if (!Number.isSafeInteger(fileOffsetBytes) || fileOffsetBytes < 0) {
        throw new CryptmapError('EINVAL', `file offset ${fileOffsetBytes} is not a non-negative integer`);
      }
      const r = this.#prepare(encrypt, src, sector, dst);
      if (r === null) return Promise.resolve();
      const t = this.#t!;
      if (!this.#sameCpu && t.runFileAsync !== undefined) return t.runFileAsync(r, fd, fileOffsetBytes);
      // Generic form: the I/O on the libuv pool, the cipher as the async forms do it.
      if (encrypt) return this.#async(true, src, sector, dst).then(() => fileIo('write', fd, r.dst, fileOffsetBytes));
      return fileIo('read', fd, r.src, fileOffsetBytes).then(() => this.#async(false, src, sector, dst));
    } catch (e) {
      return Promise.reject(e);
    }
  }

  /** Benchmarks and tests only (not part of SectorCipher): native XTS path, 0 auto, 1 EVP, 2 own, 3 AES-NI. */
  setXtsImplForBench(impl: number): void {
    this.#t?.setXtsImpl?.(impl);
  }

  dispose(): void {
    this.#disposed = true;
    this.#t?.dispose();
    this.#iv?.dispose();
    this.#t = undefined;
    this.#iv = undefined;
  }

  [Symbol.dispose](): void {
    this.dispose();
  }

  toJSON(): Record<string, unknown> {
    return { spec: this.spec, sectorBytes: this.sectorBytes, keyBytes: this.keyBytes, backend: this.backend };
  }
}

/**
 * Set how many threads of the native crypt pool take async requests (default: the CPU count).
 * Process-wide, like dm-crypt's kcryptd workqueue. Returns the previous value, or 0 when the native
 * addon is not loaded (the js backend runs async requests inline).
 */
export function setCryptThreads(n: number): number {
  if (!Number.isSafeInteger(n) || n < 1 || n > 256)
    throw new CryptmapError('EINVAL', `crypt threads must be 1..256, not ${n}`);
  const addon = loadNative();
  return addon === null ? 0 : addon.setPoolThreads(n);
}

/** The crypt pool's state (see NativeAddon.poolStats); null without the addon (no pool: the js backend runs inline). */
export interface CryptPoolStats {
  threads: number;
  busy: number;
  queued: number;
  queuedBytes: number;
  /** Counters since the pool started (0 from an older addon): jobs run, wake-ups of the JS thread, thread sleeps for want of work. */
  jobs: number;
  wakeups: number;
  sleeps: number;
  /** Jobs run on another CPU than the one that last ran a job on their buffer (its data in that CPU's caches). */
  remoteJobs: number;
  /** Jobs the JS thread ran itself while it had queued jobs and nothing else to do. */
  callerJobs: number;
}

/** The native crypt pool's threads, busy threads and queue (metrics); null when there is no pool. */
export function cryptPoolStats(): CryptPoolStats | null {
  const addon = loadNative();
  if (addon === null || typeof addon.poolStats !== 'function') return null;
  const s = addon.poolStats();
  return {
    threads: s.threads,
    busy: s.busy,
    queued: s.queued,
    queuedBytes: s.queuedBytes,
    jobs: s.jobs ?? 0,
    wakeups: s.wakeups ?? 0,
    sleeps: s.sleeps ?? 0,
    remoteJobs: s.remoteJobs ?? 0,
    callerJobs: s.callerJobs ?? 0,
  };
}

/**
 * Create a dm-crypt sector cipher.
 * @example
 *   const c = createSectorCipher({ spec: 'aes-xts-plain64', key, sectorBytes: 4096 });
 *   c.decrypt(buf, 2048n);   // buf holds whole 4096-byte sectors starting at 512-byte sector 2048
 *   c.dispose();
 * @throws CryptmapError ECIPHER_SPEC, ECIPHER_UNSUPPORTED, EKEY_SIZE, ESECTOR_SIZE, EALIGN, ERANGE, ENATIVE
 */
export function createSectorCipher(opts: SectorCipherOptions): SectorCipher {
  return new Engine(opts);
}
