/**
 * In-memory block device: a sparse map of fixed-size chunks, so a large device costs memory only
 * for what was written. Discard and write-zeroes drop chunks (reported as holes by blockStatus).
 */
import { CryptmapError } from '../util/errors.js';
import type { BlockDevice, BlockDeviceCapabilities, BlockDeviceLimits, Extent, WriteZeroesFlags } from './types.js';

const CHUNK_SHIFT = 16; // 64 KiB chunks
const CHUNK_BYTES = 1 << CHUNK_SHIFT;

/** Size, logical block size and read-only flag of a `MemoryDevice`. */
export interface MemoryDeviceOptions {
  sizeBytes: number;
  logicalBlockBytes?: number;
  readOnly?: boolean;
}

/** A sparse in-memory block device (64 KiB chunks allocated on first write; discard drops them). */
export class MemoryDevice implements BlockDevice {
  readonly sizeBytes: number;
  readonly capabilities: BlockDeviceCapabilities;
  readonly limits: BlockDeviceLimits;
  readonly #chunks = new Map<number, Buffer>();
  #closed = false;

  constructor(opts: MemoryDeviceOptions) {
    const lbs = opts.logicalBlockBytes ?? 512;
    if (!Number.isSafeInteger(opts.sizeBytes) || opts.sizeBytes < 0 || opts.sizeBytes % lbs !== 0) {
      throw new CryptmapError('EDEVSIZE', `memory device size ${opts.sizeBytes} is not a multiple of ${lbs} bytes`);
    }
    this.sizeBytes = opts.sizeBytes;
    this.capabilities = {
      write: !opts.readOnly,
      flush: false,
      fua: false,
      discard: !opts.readOnly,
      writeZeroes: !opts.readOnly,
      blockStatus: true,
      multiConn: true,
    };
    this.limits = { logicalBlockBytes: lbs, physicalBlockBytes: Math.max(lbs, 4096), maxRequestBytes: 64 << 20 };
  }

  #check(offsetBytes: number, lengthBytes: number, op: string): void {
    if (this.#closed) throw new CryptmapError('ECLOSED', `memory device is closed (${op})`, { errno: 'EIO' });
    if (offsetBytes < 0 || lengthBytes < 0 || offsetBytes + lengthBytes > this.sizeBytes) {
      throw new CryptmapError(
        'ERANGE',
        `${op} of ${lengthBytes} bytes at ${offsetBytes} is past the end of the device (${this.sizeBytes} bytes)`,
        {
          errno: op === 'write' ? 'ENOSPC' : 'EINVAL',
        },
      );
    }
  }

  async read(offsetBytes: number, buf: Uint8Array): Promise<void> {
    this.#check(offsetBytes, buf.length, 'read');
    let done = 0;
    while (done < buf.length) {
      const pos = offsetBytes + done;
      const idx = pos >>> 0 === pos ? pos >>> CHUNK_SHIFT : Math.floor(pos / CHUNK_BYTES);
      const within = pos - idx * CHUNK_BYTES;
      const n = Math.min(CHUNK_BYTES - within, buf.length - done);
      const chunk = this.#chunks.get(idx);
      if (chunk) buf.set(chunk.subarray(within, within + n), done);
      else buf.fill(0, done, done + n);
      done += n;
    }
  }

  async write(offsetBytes: number, data: Uint8Array): Promise<void> {
    if (!this.capabilities.write) throw new CryptmapError('EROFS', 'memory device is read-only', { errno: 'EPERM' });
    this.#check(offsetBytes, data.length, 'write');
    let done = 0;
    while (done < data.length) {
      const pos = offsetBytes + done;
      const idx = Math.floor(pos / CHUNK_BYTES);
      const within = pos - idx * CHUNK_BYTES;
      const n = Math.min(CHUNK_BYTES - within, data.length - done);
      let chunk = this.#chunks.get(idx);
      if (!chunk) {
        chunk = Buffer.alloc(CHUNK_BYTES);
        this.#chunks.set(idx, chunk);
      }
      chunk.set(data.subarray(done, done + n), within);
      done += n;
    }
  }

  async flush(): Promise<void> {
    if (this.#closed) throw new CryptmapError('ECLOSED', 'memory device is closed (flush)', { errno: 'EIO' });
  }

  async discard(offsetBytes: number, lengthBytes: number): Promise<void> {
    await this.writeZeroes(offsetBytes, lengthBytes);
  }

  async writeZeroes(offsetBytes: number, lengthBytes: number, _flags?: WriteZeroesFlags): Promise<void> {
    if (!this.capabilities.write) throw new CryptmapError('EROFS', 'memory device is read-only', { errno: 'EPERM' });
    this.#check(offsetBytes, lengthBytes, 'write');
    let pos = offsetBytes;
    const end = offsetBytes + lengthBytes;
    while (pos < end) {
      const idx = Math.floor(pos / CHUNK_BYTES);
      const within = pos - idx * CHUNK_BYTES;
      const n = Math.min(CHUNK_BYTES - within, end - pos);
      if (n === CHUNK_BYTES) this.#chunks.delete(idx);
      else this.#chunks.get(idx)?.fill(0, within, within + n);
      pos += n;
    }
  }

  async blockStatus(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    this.#check(offsetBytes, lengthBytes, 'block status');
    const out: Extent[] = [];
    let pos = offsetBytes;
    const end = offsetBytes + lengthBytes;
    while (pos < end) {
      const idx = Math.floor(pos / CHUNK_BYTES);
      const n = Math.min((idx + 1) * CHUNK_BYTES, end) - pos;
      const hole = !this.#chunks.has(idx);
      const last = out[out.length - 1];
      if (last && last.hole === hole) last.lengthBytes += n;
      else out.push({ lengthBytes: n, hole, zero: hole });
      pos += n;
    }
    return out;
  }

  async close(): Promise<void> {
    this.#closed = true;
    this.#chunks.clear();
  }
}
