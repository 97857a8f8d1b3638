/**
 * The device-mapper target contract, modelled on Linux `struct target_type`
 * (include/linux/device-mapper.h): a target type is a plain ops table {name, version, ctr}; the
 * constructor parses its own table arguments strictly and returns an instance with the data hooks
 * it implements. The core (mapped-device.ts) supplies the defaults: it splits I/O at target edges,
 * validates range and alignment once, emulates write-zeroes with writes, and intersects capabilities.
 *
 * Offsets handed to a target are bytes relative to the target's start; they are already validated
 * (inside the target, multiples of the table's logical block size).
 */
import type { BlockDevice, BlockDeviceLimits, Extent, WriteFlags, WriteZeroesFlags } from '../blockdev/types.js';
import type { CryptmapError, ErrorCode } from '../util/errors.js';
import type { Secret } from '../util/secret.js';

/** A kernel-keyring style key reference from a crypt table: `:<bytes>:<type>:<description>`. */
export interface KeyRef {
  keyBytes: number;
  /** `logon`, `user`, `encrypted` or `trusted`. */
  type: string;
  description: string;
}

/** Resolves key references for the crypt target (the daemon's key service implements it). */
export interface KeyStore {
  /** The key bytes for `ref`; the caller owns (and disposes) the returned Secret. */
  resolve(ref: KeyRef): Promise<Secret>;
}

/** What a target can do; the mapped device intersects these across its table. */
export interface TargetCapabilities {
  /** Writes are accepted (false when a lower device is read-only). */
  write: boolean;
  /** flush() makes writes durable somewhere below. */
  flush: boolean;
  /** Discards are accepted. */
  discard: boolean;
  /** writeZeroes is efficient (otherwise the core writes zero buffers through write()). */
  writeZeroes: boolean;
  /** Safe with several NBD connections. */
  multiConn: boolean;
}

/** Handed to a constructor: where it sits in the table and how to reach devices and keys. */
export interface TargetContext {
  /** 1-based line of the table text, for messages. */
  readonly line: number;
  readonly targetName: string;
  readonly startSectors: number;
  readonly lengthSectors: number;
  /** Key store for `:<bytes>:<type>:<desc>` crypt keys (undefined: none configured). */
  readonly keyStore: KeyStore | undefined;
  /**
   * Open a `<dev>` argument: a file path, a block device (`/dev/x` or `MAJ:MIN`) or another mapped
   * device (by name, `/dev/mapper/NAME` or `253:MINOR`). Released by the table on dispose.
   */
  openDevice(arg: string, argName: string, opts?: { readOnly?: boolean }): Promise<BlockDevice>;
  /** A CryptmapError naming the table line, the target and the argument. */
  error(argName: string, message: string, code?: ErrorCode): CryptmapError;
  /**
   * The mapped device behind a device this constructor opened (an opaque identity), or undefined
   * for files and block devices. The thin target finds its pool this way (the kernel's
   * dm_get_md + pool table lookup).
   */
  mappedOf?(dev: BlockDevice): object | undefined;
  /** Opaque identity of the mapped device this table belongs to (the kernel's dm_table_get_md). */
  readonly owner?: object;
  /** Raise a dm event on the owning device (bumps its event number; the thin pool's low-water mark). */
  event?(): void;
}

/** A constructed target: the I/O of its table line's range (offsets relative to its start) and its status. */
export interface TargetInstance {
  readonly capabilities: TargetCapabilities;
  readonly limits: BlockDeviceLimits;
  /** Fill `buf` from `offsetBytes` (relative to the target's start). */
  read(offsetBytes: number, buf: Uint8Array): Promise<void>;
  /** Write `data` at `offsetBytes` (relative to the target's start). */
  write(offsetBytes: number, data: Uint8Array, flags?: WriteFlags): Promise<void>;
  /** Make completed writes durable on the devices below. */
  flush(): Promise<void>;
  /** Only called when capabilities.discard. */
  discard?(offsetBytes: number, lengthBytes: number): Promise<void>;
  /** Allocation status (NBD base:allocation); the mapped device offers it only when every target has it. */
  blockStatus?(offsetBytes: number, lengthBytes: number): Promise<Extent[]>;
  /** Optional: when absent the core writes zero buffers through write(). */
  writeZeroes?(offsetBytes: number, lengthBytes: number, flags?: WriteZeroesFlags): Promise<void>;
  /**
   * `table`: the arguments exactly as the constructor accepts them (canonical form); keys only with
   * showKeys. `status`: the STATUSTYPE_INFO text (often empty).
   */
  status(kind: 'table' | 'status', showKeys: boolean): string;
  /** dmsetup message; `suspended` tells whether the device is suspended. Returns text to print. */
  message?(args: string[], suspended: boolean): Promise<string>;
  /** Called before the table goes live on resume; throw to refuse (crypt without a key). */
  preresume?(): void;
  /** Called when the table is live and I/O flows again (after every resume), e.g. to (re)start background work. */
  resume?(): void;
  /**
   * Called once the device is suspended, its I/O drained and flushed: background work that writes
   * (mirror resync) must stop here, as the kernel's postsuspend; the suspend completes when it settles.
   */
  postsuspend?(): Promise<void> | void;
  /** Release what the constructor acquired (keys, ciphers); idempotent, copes with half-built state. */
  dispose(): void;
}

/** A target type as an ops table: its table name, version and constructor (the instance carries the hooks). */
export interface TargetType {
  /** The table name: `linear`, `crypt`, ... */
  readonly name: string;
  readonly version: readonly [number, number, number];
  /** Parse `args` strictly and build the instance; on failure release everything and throw ctx.error(...). */
  ctr(args: readonly string[], ctx: TargetContext): Promise<TargetInstance>;
}
