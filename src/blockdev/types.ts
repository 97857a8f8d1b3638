/**
 * The block device contract every layer speaks: backends (file, memory), mapped devices (dm/) and
 * NBD exports (nbd/) all implement or consume it.
 *
 * Offsets and lengths are in bytes (`number`, safe below 2^53 = 8 PiB). Callers (the NBD edge, the
 * mapped device) validate range and alignment once; implementations may assert.
 * Reads fill the caller's buffer completely or throw a CryptmapError (never a short read).
 */

export interface BlockDeviceCapabilities {
  /** Writes allowed (false = read-only device). */
  write: boolean;
  /** flush() makes completed writes durable (false: flush is a no-op, e.g. memory). */
  flush: boolean;
  /** write(..., {fua:true}) makes that write durable before it resolves. */
  fua: boolean;
  /** discard() releases space (hole punching). */
  discard: boolean;
  /** writeZeroes() is efficient (otherwise the core emulates it with writes). */
  writeZeroes: boolean;
  /** blockStatus() can tell holes and zero ranges (NBD base:allocation). */
  blockStatus: boolean;
  /** Safe to serve over several NBD connections at once (flush visible across all). */
  multiConn: boolean;
}

/** I/O size rules of a device (NBD_INFO_BLOCK_SIZE; the kernel's queue limits). */
export interface BlockDeviceLimits {
  /** Smallest unit of I/O; offsets and lengths are multiples of it. 512..4096. */
  logicalBlockBytes: number;
  /** Preferred unit (4096 for files). */
  physicalBlockBytes: number;
  /** Largest single request the device accepts; the core splits larger ones. */
  maxRequestBytes: number;
}

/** Per-write options. */
export interface WriteFlags {
  /** Force unit access: durable before the promise resolves. */
  fua?: boolean;
  /**
   * The caller never reads `data` again: the device may overwrite it (the crypt target encrypts in
   * place instead of into a copy). The NBD server sets it for WRITE payloads it owns.
   */
  scratch?: boolean;
  /**
   * With `scratch`: the device may keep `data` (or part of it) after the write settled, as the NBD
   * client keeps acknowledged writes until a FLUSH covers them, instead of copying it. It calls
   * `hold()` before the write settles and the function that returns once it lets go (at most once
   * each); the caller reuses the buffer only after every hold was let go. A device that passes
   * `data` itself down may pass `hold` with it; one that writes another buffer must not.
   */
  hold?: () => () => void;
}

/** Options of writeZeroes (NBD_CMD_WRITE_ZEROES flags). */
export interface WriteZeroesFlags extends WriteFlags {
  /** Do not punch a hole: allocate and write zeros (NBD_CMD_FLAG_NO_HOLE). */
  noHole?: boolean;
}

/** One extent from blockStatus: NBD base:allocation flags. */
export interface Extent {
  lengthBytes: number;
  /** NBD_STATE_HOLE */
  hole: boolean;
  /** NBD_STATE_ZERO */
  zero: boolean;
}

/**
 * Direct access to the file that holds a device's bytes, for a layer that does its own I/O off the
 * event loop together with other work (the crypt target reads and decrypts, or encrypts and writes, in
 * one crypt-thread job). Only devices whose bytes are exactly a file range offer it (the file
 * backend); wrappers that change what reads and writes do (fault injection, mapped devices) do not.
 */
export interface DirectIo {
  /**
   * Check the range and access as read()/write() would, then run `io` with the file descriptor and
   * the file offset of `offsetBytes`; `io` must transfer exactly `lengthBytes`. The device stays open
   * until `io` settles (close() waits). A rejection with a system error (`code` = errno name, or
   * ESHORTIO) is reported as a read or write error of this device, with the same codes read() and
   * write() use. FUA is the caller's business (flush() afterwards).
   */
  run(
    op: 'read' | 'write',
    offsetBytes: number,
    lengthBytes: number,
    io: (fd: number, fileOffsetBytes: number) => Promise<void>,
  ): Promise<void>;
}

/**
 * The block device contract every layer speaks (file, memory, NBD client, mapped devices):
 * byte offsets and lengths, whole-buffer reads and writes or a thrown CryptmapError, optional
 * discard, write-zeroes and block status as `capabilities` says.
 */
export interface BlockDevice {
  readonly sizeBytes: number;
  readonly capabilities: BlockDeviceCapabilities;
  readonly limits: BlockDeviceLimits;
  /** See DirectIo; absent on most devices. */
  readonly directIo?: DirectIo;

  /** Fill `buf` with the bytes at `offsetBytes`. */
  read(offsetBytes: number, buf: Uint8Array): Promise<void>;
  /** Write all of `data` at `offsetBytes`. */
  write(offsetBytes: number, data: Uint8Array, flags?: WriteFlags): Promise<void>;
  /** Make every completed write durable. */
  flush(): Promise<void>;
  /** Release a range (contents afterwards are unspecified unless the device says zero). */
  discard(offsetBytes: number, lengthBytes: number): Promise<void>;
  /** Make a range read back as zeros. */
  writeZeroes(offsetBytes: number, lengthBytes: number, flags?: WriteZeroesFlags): Promise<void>;
  /** Allocation status of a range (only when capabilities.blockStatus). */
  blockStatus?(offsetBytes: number, lengthBytes: number): Promise<Extent[]>;
  /** Release resources; idempotent. Flushes first when the device is writable. */
  close(): Promise<void>;
}
