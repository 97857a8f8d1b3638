/**
 * File and block-device backend for the BlockDevice contract (types.ts).
 *
 * - Regular files and block devices, read-write or read-only; `createFileDevice` makes a sparse file.
 * - flush = fdatasync(2); a FUA write = write then fdatasync.
 * - Short reads and writes are retried in a loop; end of file in the middle of a request is a
 *   CryptmapError (`ESHORTIO`), never a silent short transfer.
 * - Block device size: fstat gives 0 for block devices, so the size is read from
 *   /sys/dev/block/MAJ:MIN/size (512-byte sectors), the logical block size from .../queue/.
 * - Discard (FALLOC_FL_PUNCH_HOLE) and SEEK_DATA/SEEK_HOLE are not in Node: they come from the
 *   optional native addon (`src/util/native.ts`, `loadNative()`). They are advertised only when the
 *   addon loads and a probe punch (past end of file, so harmless) succeeds on this file; block
 *   devices never advertise them here.
 * - A regular file whose size is not a multiple of the logical block size is exposed rounded down.
 * - Memory-backed files (tmpfs, ramfs: statfs f_type) take requests up to 64 KiB with synchronous
 *   pread/pwrite on the calling thread: there is no device to wait for, and copying 64 KiB (a few
 *   microseconds) costs less than the hand-off to the libuv thread pool and back (two wake-ups, a
 *   lock, an eventfd; tens of microseconds on a busy machine), which bounded 4 KiB random reads.
 *   Larger requests still go to the pool, where several run in parallel. `inlineIo: false` turns
 *   this off.
 */
import type { FileHandle } from 'node:fs/promises';
import { open, readFile, statfs } from 'node:fs/promises';
import { constants as fsConstants, readSync, writeSync } from 'node:fs';
import { CryptmapError, fromSystemError, isCryptmapError } from '../util/errors.js';
import { type NativeAddon, loadNative } from '../util/native.js';
import { checkNewFileDir, type FileIdentity, unlinkIfSame } from '../util/trusted-path.js';
import type {
  BlockDevice,
  BlockDeviceCapabilities,
  BlockDeviceLimits,
  DirectIo,
  Extent,
  WriteFlags,
  WriteZeroesFlags,
} from './types.js';

/** The part of the native addon this backend uses (src/util/native.ts). */
type NativeHoles = Pick<NativeAddon, 'punchHole' | 'seekData' | 'seekHole'>;

/** How `FileDevice.open` opens a regular file or a block device. */
export interface FileDeviceOptions {
  /** Open O_RDONLY; writes, discards and write-zeroes are refused. */
  readOnly?: boolean;
  /** Logical block size to expose for regular files (default 512). */
  logicalBlockBytes?: number;
  /** Ignore the native addon (tests of the fallback path). */
  noNative?: boolean;
  /**
   * Synchronous pread/pwrite for requests up to 64 KiB. Default: only on memory-backed file
   * systems (tmpfs, ramfs), where they never wait for a device.
   */
  inlineIo?: boolean;
}

const MAX_REQUEST_BYTES = 64 << 20;
const ZERO_CHUNK_BYTES = 1 << 20;
/** Largest request done inline (synchronously) on memory-backed files. */
const INLINE_MAX_BYTES = 64 << 10;
/** statfs f_type of file systems whose pages live in memory (linux/magic.h). */
const TMPFS_MAGIC = 0x01021994;
const RAMFS_MAGIC = 0x858458f6;

async function memoryBacked(path: string): Promise<boolean> {
  try {
    const t = (await statfs(path)).type;
    return t === TMPFS_MAGIC || t === RAMFS_MAGIC;
  } catch {
    return false;
  }
}

/**
 * Linux dev_t split as glibc's `major()`/`minor()` (major: bits 8-19 and 32-63; minor: bits 0-7
 * and 20-43), for the `dev`/`rdev` numbers of `fs.stat` (exact below 2^53). The one place cryptmap
 * splits a device number.
 * @example `/sys/dev/block/${devMajor(st.rdev)}:${devMinor(st.rdev)}/size`
 */
export function devMajor(rdev: number): number {
  const d = BigInt(rdev);
  return Number(((d >> 8n) & 0xfffn) | ((d >> 32n) & ~0xfffn));
}
export function devMinor(rdev: number): number {
  const d = BigInt(rdev);
  return Number((d & 0xffn) | ((d >> 12n) & 0xffffff00n));
}

async function readSysNumber(path: string): Promise<number | undefined> {
  try {
    const v = Number((await readFile(path, 'utf8')).trim());
    return Number.isSafeInteger(v) ? v : undefined;
  } catch {
    return undefined;
  }
}

/**
 * A regular file or block device as a BlockDevice (`FileDevice.open(path)`): flush is fdatasync,
 * discard and block status through the native addon when it loads.
 */
export class FileDevice implements BlockDevice {
  readonly path: string;
  #sizeBytes: number;
  readonly capabilities: BlockDeviceCapabilities;
  readonly limits: BlockDeviceLimits;
  /** True for a block device node, false for a regular file. */
  readonly isBlockDevice: boolean;
  #fh: FileHandle | null;
  #native: NativeHoles | null;
  #zeros: Buffer | undefined;
  /** Requests up to this size use synchronous pread/pwrite (0: never). */
  readonly #inlineMax: number;
  /** DirectIo runs in progress; close() waits for them before closing the descriptor. */
  #directRuns = 0;
  #directDrained: (() => void) | null = null;
  /** The identity of the file `createNew` made, for discardCreated. */
  #created: FileIdentity | undefined;
  readonly directIo: DirectIo = { run: (op, o, n, io) => this.#direct(op, o, n, io) };

  private constructor(
    path: string,
    fh: FileHandle,
    sizeBytes: number,
    lbs: number,
    isBlock: boolean,
    readOnly: boolean,
    native: NativeHoles | null,
    inline: boolean,
  ) {
    this.path = path;
    this.#fh = fh;
    this.#inlineMax = inline ? INLINE_MAX_BYTES : 0;
    this.#sizeBytes = sizeBytes;
    this.isBlockDevice = isBlock;
    this.#native = native;
    const holes = native !== null && !readOnly;
    this.capabilities = {
      write: !readOnly,
      flush: true,
      fua: true,
      discard: holes,
      writeZeroes: holes,
      blockStatus: native !== null,
      multiConn: true,
    };
    this.limits = {
      logicalBlockBytes: lbs,
      physicalBlockBytes: Math.max(lbs, 4096),
      maxRequestBytes: MAX_REQUEST_BYTES,
    };
  }

  /** Open an existing file or block device. */
  static async open(path: string, opts: FileDeviceOptions = {}): Promise<FileDevice> {
    const readOnly = opts.readOnly ?? false;
    let fh: FileHandle;
    try {
      fh = await open(path, readOnly ? fsConstants.O_RDONLY : fsConstants.O_RDWR);
    } catch (e) {
      throw fromSystemError('EOPEN', `cannot open ${path}${readOnly ? ' read-only' : ''}`, e, { path });
    }
    try {
      return await FileDevice.#init(path, fh, readOnly, opts);
    } catch (e) {
      await fh.close().catch(() => {});
      throw e;
    }
  }

  /** Create a new sparse file of `sizeBytes` (fails if it exists) and open it read-write. */
  static async create(path: string, sizeBytes: number, opts: FileDeviceOptions = {}): Promise<FileDevice> {
    const lbs = opts.logicalBlockBytes ?? 512;
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes < 0 || sizeBytes % lbs !== 0) {
      throw new CryptmapError('EDEVSIZE', `file device size ${sizeBytes} is not a multiple of ${lbs} bytes`, {
        context: { path },
      });
    }
    let fh: FileHandle;
    try {
      fh = await open(path, fsConstants.O_RDWR | fsConstants.O_CREAT | fsConstants.O_EXCL, 0o600);
    } catch (e) {
      throw fromSystemError('ECREATE', `cannot create ${path}`, e, { path });
    }
    try {
      await fh.truncate(sizeBytes);
      return await FileDevice.#init(path, fh, false, opts);
    } catch (e) {
      await fh.close().catch(() => {});
      throw isCryptmapError(e) ? e : fromSystemError('ECREATE', `cannot size ${path}`, e, { path });
    }
  }

  /**
   * A new file root makes where the user asks (a detached LUKS header): the directory rule of
   * checkNewFileDir (util/trusted-path.ts; its refusal is thrown as it is), then created exclusively
   * (O_CREAT|O_EXCL|O_NOFOLLOW, 0600: an existing file or a planted symlink fails with EEXIST) and sized
   * to `sizeBytes`. This one descriptor does every read and write after, so a file put at `path` later
   * is never written; `discardCreated` removes the file again only if `path` still names it.
   * @example const hdr = await FileDevice.createNew('/root/hdr.img', 16 << 20);
   */
  static async createNew(path: string, sizeBytes: number, opts: FileDeviceOptions = {}): Promise<FileDevice> {
    checkNewFileDir(path);
    let fh: FileHandle;
    try {
      fh = await open(
        path,
        fsConstants.O_RDWR | fsConstants.O_CREAT | fsConstants.O_EXCL | fsConstants.O_NOFOLLOW,
        0o600,
      );
    } catch (e) {
      throw fromSystemError('ECREATE', `cannot create ${path}`, e, { path });
    }
    let id: FileIdentity | undefined;
    try {
      const st = await fh.stat();
      id = { dev: st.dev, ino: st.ino };
      await fh.truncate(sizeBytes);
      const d = await FileDevice.#init(path, fh, false, opts);
      d.#created = id;
      return d;
    } catch (e) {
      try {
        if (id) unlinkIfSame(path, id);
      } catch {}
      await fh.close().catch(() => {});
      throw isCryptmapError(e) ? e : fromSystemError('ECREATE', `cannot size ${path}`, e, { path });
    }
  }

  /**
   * Close a device made by `createNew` and remove its file, but only while `path` still names that
   * file (checked with the descriptor still open, so that its inode number cannot have been reused);
   * a file renamed away or put there by someone else is left alone. Not for a device `open` opened.
   */
  async discardCreated(): Promise<void> {
    const id = this.#created;
    if (id === undefined) throw new CryptmapError('EINVAL', `${this.path} was not created by this device`);
    try {
      unlinkIfSame(this.path, id);
    } finally {
      await this.close();
    }
  }

  /** A regular file shorter than `minBytes` grows to it (a block device stays as it is). */
  async growTo(minBytes: number): Promise<void> {
    if (this.isBlockDevice || this.#sizeBytes >= minBytes) return;
    await this.#handle('grow').truncate(minBytes);
    await this.refreshSize();
  }

  /**
   * Open `path` read-write, creating it (O_EXCL, mode 0600: never through a symlink) when absent; a
   * regular file shorter than `minBytes` grows to it (a detached LUKS header file, as cryptsetup makes
   * one). One descriptor does all of it: no second lookup of the path.
   */
  static async openOrCreate(path: string, minBytes: number, opts: FileDeviceOptions = {}): Promise<FileDevice> {
    let fh: FileHandle;
    try {
      fh = await open(path, fsConstants.O_RDWR | fsConstants.O_CREAT | fsConstants.O_EXCL, 0o600);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST')
        throw fromSystemError('ECREATE', `cannot create ${path}`, e, { path });
      return FileDevice.#grown(await FileDevice.open(path, opts), minBytes);
    }
    try {
      return await FileDevice.#grown(await FileDevice.#init(path, fh, false, opts), minBytes);
    } catch (e) {
      await fh.close().catch(() => {});
      throw e;
    }
  }

  static async #grown(d: FileDevice, minBytes: number): Promise<FileDevice> {
    try {
      await d.growTo(minBytes);
      return d;
    } catch (e) {
      await d.close().catch(() => {});
      throw isCryptmapError(e) ? e : fromSystemError('ECREATE', `cannot size ${d.path}`, e, { path: d.path });
    }
  }

  static async #init(path: string, fh: FileHandle, readOnly: boolean, opts: FileDeviceOptions): Promise<FileDevice> {
    const st = await fh.stat();
    let sizeBytes: number;
    let lbs = opts.logicalBlockBytes ?? 512;
    const isBlock = st.isBlockDevice();
    if (isBlock) {
      const sys = `/sys/dev/block/${devMajor(st.rdev)}:${devMinor(st.rdev)}`;
      const sectors = await readSysNumber(`${sys}/size`);
      if (sectors === undefined)
        throw new CryptmapError('EDEVSIZE', `cannot read the size of block device ${path} from ${sys}/size`, {
          context: { path },
        });
      sizeBytes = sectors * 512;
      lbs = (await readSysNumber(`${sys}/queue/logical_block_size`)) ?? 512;
    } else if (st.isFile()) {
      sizeBytes = st.size;
    } else {
      throw new CryptmapError('ENOTBLK', `${path} is neither a regular file nor a block device`, { context: { path } });
    }
    sizeBytes -= sizeBytes % lbs;
    let native = opts.noNative || isBlock ? null : loadNative();
    if (native !== null && !readOnly) {
      try {
        // Probe past the end of the file: harmless, and fails where the file system cannot punch holes.
        native.punchHole(fh.fd, Math.max(st.size, sizeBytes) + 4096, 4096);
      } catch {
        native = null;
      }
    }
    const inline = opts.inlineIo ?? (!isBlock && (await memoryBacked(path)));
    return new FileDevice(path, fh, sizeBytes, lbs, isBlock, readOnly, native, inline);
  }

  get sizeBytes(): number {
    return this.#sizeBytes;
  }

  /**
   * Measure the file or block device again (after it grew or shrank underneath, as before
   * `cryptsetup resize`) and return the new size; later range checks use it.
   */
  async refreshSize(): Promise<number> {
    const fh = this.#handle('refresh size');
    const st = await fh.stat();
    let size: number;
    if (this.isBlockDevice) {
      const sectors = await readSysNumber(`/sys/dev/block/${devMajor(st.rdev)}:${devMinor(st.rdev)}/size`);
      if (sectors === undefined)
        throw new CryptmapError('EDEVSIZE', `cannot read the size of block device ${this.path}`, {
          context: { path: this.path },
        });
      size = sectors * 512;
    } else size = st.size;
    this.#sizeBytes = size - (size % this.limits.logicalBlockBytes);
    return this.#sizeBytes;
  }

  #handle(op: string): FileHandle {
    if (this.#fh === null) throw new CryptmapError('ECLOSED', `${this.path} is closed (${op})`, { errno: 'EIO' });
    return this.#fh;
  }

  #check(offsetBytes: number, lengthBytes: number, op: string): void {
    if (offsetBytes < 0 || lengthBytes < 0 || offsetBytes + lengthBytes > this.sizeBytes) {
      throw new CryptmapError(
        'ERANGE',
        `${op} of ${lengthBytes} bytes at ${offsetBytes} is past the end of ${this.path} (${this.sizeBytes} bytes)`,
        {
          errno: op === 'write' ? 'ENOSPC' : 'EINVAL',
          context: { path: this.path, offsetBytes, lengthBytes },
        },
      );
    }
  }

  #writable(op: string): void {
    if (!this.capabilities.write)
      throw new CryptmapError('EROFS', `${this.path} is open read-only (${op})`, { errno: 'EPERM', exitCode: 2 });
  }

  async read(offsetBytes: number, buf: Uint8Array): Promise<void> {
    const fh = this.#handle('read');
    this.#check(offsetBytes, buf.length, 'read');
    const inline = buf.length <= this.#inlineMax;
    let done = 0;
    while (done < buf.length) {
      let n: number;
      try {
        if (inline) n = readSync(fh.fd, buf, done, buf.length - done, offsetBytes + done);
        else ({ bytesRead: n } = await fh.read(buf, done, buf.length - done, offsetBytes + done));
      } catch (e) {
        throw fromSystemError('EREAD', `read of ${buf.length} bytes at ${offsetBytes} from ${this.path} failed`, e, {
          path: this.path,
        });
      }
      if (n === 0) {
        throw new CryptmapError('ESHORTIO', `unexpected end of file reading ${this.path} at ${offsetBytes + done}`, {
          errno: 'EIO',
          context: { path: this.path },
        });
      }
      done += n;
    }
  }

  async write(offsetBytes: number, data: Uint8Array, flags?: WriteFlags): Promise<void> {
    const fh = this.#handle('write');
    this.#writable('write');
    this.#check(offsetBytes, data.length, 'write');
    const inline = data.length <= this.#inlineMax;
    let done = 0;
    while (done < data.length) {
      let n: number;
      try {
        if (inline) n = writeSync(fh.fd, data, done, data.length - done, offsetBytes + done);
        else ({ bytesWritten: n } = await fh.write(data, done, data.length - done, offsetBytes + done));
      } catch (e) {
        throw fromSystemError('EWRITE', `write of ${data.length} bytes at ${offsetBytes} to ${this.path} failed`, e, {
          path: this.path,
        });
      }
      if (n === 0) {
        throw new CryptmapError('ESHORTIO', `${this.path} accepted no bytes at ${offsetBytes + done}`, {
          errno: 'EIO',
          context: { path: this.path },
        });
      }
      done += n;
    }
    if (flags?.fua) await this.flush();
  }

  async #direct(
    op: 'read' | 'write',
    offsetBytes: number,
    lengthBytes: number,
    io: (fd: number, fileOffsetBytes: number) => Promise<void>,
  ): Promise<void> {
    const fh = this.#handle(op);
    if (op === 'write') this.#writable('write');
    this.#check(offsetBytes, lengthBytes, op);
    this.#directRuns++;
    try {
      await io(fh.fd, offsetBytes);
    } catch (e) {
      if (isCryptmapError(e)) throw e;
      if ((e as { code?: unknown }).code === 'ESHORTIO') {
        const what = op === 'read' ? `unexpected end of file reading ${this.path}` : `${this.path} accepted no bytes`;
        throw new CryptmapError('ESHORTIO', `${what} in ${lengthBytes} bytes at ${offsetBytes}`, {
          errno: 'EIO',
          context: { path: this.path },
        });
      }
      throw op === 'read'
        ? fromSystemError('EREAD', `read of ${lengthBytes} bytes at ${offsetBytes} from ${this.path} failed`, e, {
            path: this.path,
          })
        : fromSystemError('EWRITE', `write of ${lengthBytes} bytes at ${offsetBytes} to ${this.path} failed`, e, {
            path: this.path,
          });
    } finally {
      if (--this.#directRuns === 0) this.#directDrained?.();
    }
  }

  async flush(): Promise<void> {
    const fh = this.#handle('flush');
    try {
      await fh.datasync();
    } catch (e) {
      throw fromSystemError('EFLUSH', `flush of ${this.path} failed`, e, { path: this.path });
    }
  }

  async discard(offsetBytes: number, lengthBytes: number): Promise<void> {
    const fh = this.#handle('discard');
    this.#writable('discard');
    if (!this.capabilities.discard || this.#native === null) {
      throw new CryptmapError('ENOTSUP', `${this.path} does not support discard`, { errno: 'ENOTSUP' });
    }
    this.#check(offsetBytes, lengthBytes, 'discard');
    if (lengthBytes === 0) return;
    try {
      this.#native.punchHole(fh.fd, offsetBytes, lengthBytes);
    } catch (e) {
      throw fromSystemError('EDISCARD', `discard of ${lengthBytes} bytes at ${offsetBytes} on ${this.path} failed`, e, {
        path: this.path,
      });
    }
  }

  async writeZeroes(offsetBytes: number, lengthBytes: number, flags?: WriteZeroesFlags): Promise<void> {
    this.#handle('write zeroes');
    this.#writable('write zeroes');
    this.#check(offsetBytes, lengthBytes, 'write');
    if (lengthBytes === 0) return;
    if (this.capabilities.discard && !flags?.noHole) {
      // A punched hole in a regular file reads back as zeros.
      await this.discard(offsetBytes, lengthBytes);
      if (flags?.fua) await this.flush();
      return;
    }
    this.#zeros ??= Buffer.alloc(ZERO_CHUNK_BYTES);
    for (let pos = 0; pos < lengthBytes; pos += ZERO_CHUNK_BYTES) {
      const n = Math.min(ZERO_CHUNK_BYTES, lengthBytes - pos);
      await this.write(offsetBytes + pos, this.#zeros.subarray(0, n));
    }
    if (flags?.fua) await this.flush();
  }

  async blockStatus(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    const fh = this.#handle('block status');
    this.#check(offsetBytes, lengthBytes, 'block status');
    const end = offsetBytes + lengthBytes;
    if (this.#native === null) return lengthBytes === 0 ? [] : [{ lengthBytes, hole: false, zero: false }];
    const out: Extent[] = [];
    const push = (n: number, hole: boolean) => {
      if (n <= 0) return;
      const last = out[out.length - 1];
      if (last && last.hole === hole) last.lengthBytes += n;
      else out.push({ lengthBytes: n, hole, zero: hole });
    };
    let pos = offsetBytes;
    while (pos < end) {
      const data = this.#native.seekData(fh.fd, pos);
      if (data < 0 || data >= end) {
        push(end - pos, true);
        break;
      }
      push(data - pos, true);
      const hole = this.#native.seekHole(fh.fd, data);
      const dataEnd = hole < 0 ? end : Math.min(hole, end);
      push(dataEnd - data, false);
      pos = dataEnd;
    }
    return out;
  }

  async close(): Promise<void> {
    const fh = this.#fh;
    if (fh === null) return;
    this.#fh = null;
    // A DirectIo run holds the raw descriptor: closing under it could let the number be reused.
    if (this.#directRuns > 0) {
      await new Promise<void>((resolve) => {
        this.#directDrained = resolve;
      });
      this.#directDrained = null;
    }
    try {
      if (this.capabilities.write) await fh.datasync().catch(() => {});
    } finally {
      await fh.close();
    }
  }
}
