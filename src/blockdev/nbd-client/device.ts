/**
 * NbdDevice: a BlockDevice over a remote NBD export (proto.md; URIs as nbd-wire/uri.ts parses them).
 *
 * Mapping to the BlockDevice contract (types.ts), from the transmission flags the server sends:
 *   write        !NBD_FLAG_READ_ONLY (and not opened read-only)
 *   flush        NBD_FLAG_SEND_FLUSH -> NBD_CMD_FLUSH
 *   fua          NBD_FLAG_SEND_FUA -> NBD_CMD_FLAG_FUA; without it a FUA write is write + FLUSH
 *   discard      NBD_FLAG_SEND_TRIM -> NBD_CMD_TRIM (else ENOTSUP, as a file without hole punching)
 *   writeZeroes  NBD_FLAG_SEND_WRITE_ZEROES -> NBD_CMD_WRITE_ZEROES (+NO_HOLE); else emulated with writes
 *   blockStatus  base:allocation selected -> NBD_CMD_BLOCK_STATUS
 *   multiConn    NBD_FLAG_CAN_MULTI_CONN; then `connections` sockets carry the requests
 * Block sizes: NBD_INFO_BLOCK_SIZE is requested with NBD_OPT_GO, so its constraints bind: the logical
 * block is max(512, minimum), the physical one the preferred size, and requests are split at the
 * maximum payload (32 MiB when the server gives none, proto.md "Size constraints").
 *
 * Ordering and durability (proto.md "Ordering of messages and writes"): a FLUSH goes out only after
 * every write issued before flush() was called has been acknowledged (on any connection), so it
 * covers them all.
 *
 * Faults. When any connection drops (or a request sees no reply for `requestTimeoutMs`), every
 * connection is closed and the device reconnects with bounded exponential backoff (50 ms doubling to
 * 2 s, for at most `reconnectTimeoutMs`). New requests wait meanwhile. Then:
 *   1. writes, trims and write-zeroes the server acknowledged since the last completed FLUSH are
 *      re-sent in their original order (the server may have lost them from a volatile cache; each is
 *      idempotent at its offset). For that the client keeps a copy of each acknowledged write's data
 *      until a FLUSH covers it, at most `replayBytes` (past that it flushes on its own, and writes
 *      wait while twice that is held). With `replayBytes: 0` nothing is kept, and instead the next
 *      flush() after such a loss fails with EIO.
 *   2. requests that were in flight are sent again: reads, and writes not yet acknowledged (again
 *      idempotent), then flushes (which now cover the re-sent writes).
 * A server that stays away past the deadline, refuses the export, changes its size, or fails a
 * replayed write turns the device to `failed`: every request, waiting or new, fails with EIO and
 * `health` says why. Nothing acknowledged upward is lost silently.
 *
 * @example
 *   const dev = await NbdDevice.open('nbd+unix:///disk?socket=/run/nbdkit.sock');
 *   await dev.write(0, data); await dev.flush(); await dev.close();
 */
import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_ESHUTDOWN,
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_STATE_HOLE,
  NBD_STATE_ZERO,
} from '../../nbd-wire/constants.js';
import { type NbdUriTarget, parseNbdUri } from '../../nbd-wire/uri.js';
import { CryptmapError, EXIT_WRONG_DEVICE, EXIT_WRONG_PARAMS } from '../../util/errors.js';
import type {
  BlockDevice,
  BlockDeviceCapabilities,
  BlockDeviceLimits,
  Extent,
  WriteFlags,
  WriteZeroesFlags,
} from '../types.js';
import { NbdConnection, type RawExtent, type ServerError, type WireRequest } from './connection.js';
import { HandshakeError, type Negotiated, negotiate } from './handshake.js';
import { connectSocket, loadTlsCredentials, type TlsCredentials } from './transport.js';

/** Connection settings of `NbdDevice.open` (the URI carries the address, export and TLS files). */
export interface NbdDeviceOptions {
  /** Never write (the export may still be writable). */
  readOnly?: boolean;
  /** Sockets to use when the server advertises NBD_FLAG_CAN_MULTI_CONN (default 2; else always 1). */
  connections?: number;
  /** One connection attempt, handshake included (default 10 s). */
  connectTimeoutMs?: number;
  /** How long a lost server may take to come back before the device fails (default 30 s, or $CRYPTMAP_NBD_RECONNECT_TIMEOUT_MS). */
  reconnectTimeoutMs?: number;
  /** A connection with requests in flight and no reply for this long is dropped (default 60 s; 0 = never). */
  requestTimeoutMs?: number;
  /** Acknowledged, unflushed write data kept for replay after a reconnect (default 64 MiB; 0 = none). */
  replayBytes?: number;
  /** Requests in flight per connection (default 64). */
  maxInflight?: number;
}

/** The client's connection state: serving, re-establishing a dropped connection, given up, or closed. */
export type NbdDeviceState = 'ready' | 'reconnecting' | 'failed' | 'closed';

/** What `status` shows about the remote device. */
export interface NbdDeviceHealth {
  uri: string;
  state: NbdDeviceState;
  connections: number;
  reconnects: number;
  /** Why the last connection was lost, or why the device failed. */
  lastError?: string;
}

/** Largest TRIM / WRITE_ZEROES / BLOCK_STATUS effect length sent in one request. */
const EFFECT_MAX_BYTES = 1 << 30;
/** Largest READ/WRITE payload when the server names no maximum (proto.md "Size constraints"). */
const DEFAULT_MAX_PAYLOAD = 32 << 20;
const MAX_INFLIGHT_BYTES = 64 << 20;
const ZERO_CHUNK_BYTES = 1 << 20;
/** Reconnects in a row with no request completing in between before the device fails. */
const MAX_FRUITLESS_RECONNECTS = 8;

interface Req extends WireRequest {
  /** Write order (writes, trims, write-zeroes); 0 for others. */
  seq: number;
  resolve(extents: RawExtent[] | undefined): void;
  reject(e: Error): void;
  /** An internal replay of a retained write (not a caller's request). */
  replay?: boolean;
  /** The caller's WriteFlags.hold: keep `buf` for replay instead of copying it. */
  hold?: () => () => void;
}

interface Retained {
  seq: number;
  type: number;
  flags: number;
  offset: number;
  length: number;
  data?: Buffer;
  /** `data` is the caller's buffer, held (WriteFlags.hold): let go of it with this. */
  release?: () => void;
}

const isWriteType = (t: number): boolean => t === NBD_CMD_WRITE || t === NBD_CMD_TRIM || t === NBD_CMD_WRITE_ZEROES;

function envMs(name: string, dflt: number): number {
  const v = Number(process.env[name]);
  return Number.isSafeInteger(v) && v > 0 ? v : dflt;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/**
 * A BlockDevice over a remote NBD export (`NbdDevice.open(uri)`): nbd://, nbds://, nbd+unix://;
 * reconnects after a dropped connection and replays unflushed writes.
 */
export class NbdDevice implements BlockDevice {
  readonly uri: string;
  readonly sizeBytes: number;
  readonly capabilities: BlockDeviceCapabilities;
  readonly limits: BlockDeviceLimits;
  readonly #target: NbdUriTarget;
  readonly #creds: TlsCredentials;
  readonly #opts: Required<Omit<NbdDeviceOptions, 'readOnly'>>;
  readonly #flags: number;
  readonly #exportSize: bigint;
  readonly #connCount: number;
  readonly #replayLimit: number;
  #conns: NbdConnection[] = [];
  #state: NbdDeviceState = 'ready';
  #lastError: string | undefined;
  #failure: CryptmapError | undefined;
  #reconnects = 0;
  /** Reconnects since a request last succeeded: a server that answers every connection with a violation is given up on. */
  #fruitless = 0;
  /** Requests waiting for a connection (reconnecting, or every connection full). */
  #queue: Req[] = [];
  /** Requests handed back by a dropped connection, sent again after the reconnect. */
  #returned: Req[] = [];
  #writeSeq = 0;
  /** Writes not yet acknowledged, in seq order (a Set keeps insertion order). */
  readonly #unacked = new Set<Req>();
  /** flush() calls waiting for every write up to `barrier` to be acknowledged. */
  #flushWaiters: { barrier: number; resolve: () => void }[] = [];
  #retained: Retained[] = [];
  #retainedBytes = 0;
  /** Released replay copies by size, reused for the next writes (kept and idle together at most 2 x replayBytes). */
  readonly #freeCopies = new Map<number, Buffer[]>();
  #freeCopyBytes = 0;
  #autoFlush: Promise<void> | null = null;
  /** replayBytes 0: acknowledged writes were lost with a connection; the next flush reports it. */
  #lostWrites = false;
  /** Highest write seq the server acknowledged, and the highest barrier a completed FLUSH covered. */
  #ackedUpTo = 0;
  #flushedUpTo = 0;
  #closing: Promise<void> | null = null;

  private constructor(target: NbdUriTarget, creds: TlsCredentials, first: Negotiated, opts: NbdDeviceOptions) {
    this.uri = target.uri;
    this.#target = target;
    this.#creds = creds;
    this.#opts = {
      connections: opts.connections ?? 2,
      connectTimeoutMs: opts.connectTimeoutMs ?? 10_000,
      reconnectTimeoutMs: opts.reconnectTimeoutMs ?? envMs('CRYPTMAP_NBD_RECONNECT_TIMEOUT_MS', 30_000),
      requestTimeoutMs: opts.requestTimeoutMs ?? 60_000,
      replayBytes: opts.replayBytes ?? 64 << 20,
      maxInflight: opts.maxInflight ?? 64,
    };
    const f = first.transmissionFlags;
    this.#flags = f;
    this.#exportSize = first.exportSize;
    const bs = first.blockSize;
    const lbs = Math.max(512, bs?.minimum ?? 1);
    if (lbs > 4096) {
      throw new CryptmapError(
        'ENOTSUP',
        `${target.uri}: the export's minimum block size ${lbs} is above 4096 bytes, which cryptmap cannot address`,
        { exitCode: EXIT_WRONG_DEVICE, errno: 'ENOTSUP' },
      );
    }
    const maxPayload =
      bs === undefined || bs.maximum === 0xffffffff ? DEFAULT_MAX_PAYLOAD : Math.min(bs.maximum, 64 << 20);
    const maxReq = Math.floor(maxPayload / lbs) * lbs;
    if (maxReq < lbs)
      throw new CryptmapError('ENOTSUP', `${target.uri}: maximum payload ${maxPayload} is below one block`, {
        exitCode: EXIT_WRONG_DEVICE,
        errno: 'ENOTSUP',
      });
    if (first.exportSize > BigInt(Number.MAX_SAFE_INTEGER))
      throw new CryptmapError('EDEVSIZE', `${target.uri}: export size ${first.exportSize} is above 2^53 bytes`, {
        exitCode: EXIT_WRONG_DEVICE,
      });
    this.sizeBytes = Math.floor(Number(first.exportSize) / lbs) * lbs;
    this.limits = {
      logicalBlockBytes: lbs,
      physicalBlockBytes: Math.min(Math.max(lbs, bs?.preferred ?? 4096), 1 << 20),
      maxRequestBytes: maxReq,
    };
    const writable = !opts.readOnly && (f & NBD_FLAG_READ_ONLY) === 0;
    this.capabilities = {
      write: writable,
      flush: (f & NBD_FLAG_SEND_FLUSH) !== 0,
      fua: (f & NBD_FLAG_SEND_FUA) !== 0,
      discard: writable && (f & NBD_FLAG_SEND_TRIM) !== 0,
      writeZeroes: writable && (f & NBD_FLAG_SEND_WRITE_ZEROES) !== 0,
      blockStatus: first.allocationContext !== undefined,
      multiConn: (f & NBD_FLAG_CAN_MULTI_CONN) !== 0,
    };
    this.#connCount = this.capabilities.multiConn ? Math.max(1, Math.min(16, this.#opts.connections)) : 1;
    // Replay needs FLUSH to ever let go of what it keeps.
    this.#replayLimit = writable && this.capabilities.flush ? this.#opts.replayBytes : 0;
  }

  /**
   * Connect to the export `uri` names. Errors: EURI (a bad URI, exit 1), ENBDOPEN (no server, no
   * such export, TLS refused: exit 4, as a missing device), EROFS (a read-only export opened for writing).
   */
  static async open(uri: string, opts: NbdDeviceOptions = {}): Promise<NbdDevice> {
    let target: NbdUriTarget;
    try {
      target = parseNbdUri(uri);
    } catch (e) {
      throw new CryptmapError('EURI', (e as Error).message, { exitCode: EXIT_WRONG_PARAMS });
    }
    let creds: TlsCredentials;
    try {
      creds = await loadTlsCredentials(target);
    } catch (e) {
      throw new CryptmapError('ENBDOPEN', `cannot open ${uri}: TLS credentials: ${(e as Error).message}`, {
        exitCode: EXIT_WRONG_DEVICE,
        errno: 'EIO',
        cause: e,
      });
    }
    const timeout = opts.connectTimeoutMs ?? 10_000;
    let first: Negotiated;
    try {
      first = await connectOnce(target, creds, timeout);
    } catch (e) {
      throw new CryptmapError('ENBDOPEN', `cannot open ${uri}: ${(e as Error).message}`, {
        exitCode: EXIT_WRONG_DEVICE,
        errno: 'EIO',
        cause: e,
      });
    }
    let dev: NbdDevice;
    try {
      dev = new NbdDevice(target, creds, first, opts);
      if (!opts.readOnly && (first.transmissionFlags & NBD_FLAG_READ_ONLY) !== 0) {
        throw new CryptmapError(
          'EROFS',
          `cannot open ${uri} for writing: the export is read-only (open it read-only)`,
          { exitCode: EXIT_WRONG_DEVICE, errno: 'EPERM' },
        );
      }
    } catch (e) {
      first.raw.destroy();
      throw e;
    }
    dev.#conns.push(dev.#wrap(first));
    try {
      const more = await connectMany(dev.#connCount - 1, target, creds, timeout);
      for (const n of more) dev.#conns.push(dev.#wrap(n));
    } catch (e) {
      await dev.close().catch(() => {});
      throw new CryptmapError('ENBDOPEN', `cannot open ${uri}: extra connection: ${(e as Error).message}`, {
        exitCode: EXIT_WRONG_DEVICE,
        errno: 'EIO',
        cause: e,
      });
    }
    return dev;
  }

  get health(): NbdDeviceHealth {
    const h: NbdDeviceHealth = {
      uri: this.uri,
      state: this.#state,
      connections: this.#conns.filter((c) => c.alive).length,
      reconnects: this.#reconnects,
    };
    if (this.#lastError !== undefined) h.lastError = this.#lastError;
    return h;
  }

  // ---- BlockDevice ----

  async read(offsetBytes: number, buf: Uint8Array): Promise<void> {
    this.#check(offsetBytes, buf.length, 'read');
    const max = this.limits.maxRequestBytes;
    if (buf.length <= max) {
      await this.#run(NBD_CMD_READ, 0, offsetBytes, buf.length, buf);
      return;
    }
    const parts: Promise<unknown>[] = [];
    for (let at = 0; at < buf.length; at += max) {
      parts.push(
        this.#run(NBD_CMD_READ, 0, offsetBytes + at, Math.min(max, buf.length - at), buf.subarray(at, at + max)),
      );
    }
    await Promise.all(parts);
  }

  async write(offsetBytes: number, data: Uint8Array, flags?: WriteFlags): Promise<void> {
    this.#writable('write');
    this.#check(offsetBytes, data.length, 'write');
    const fua = flags?.fua === true;
    const wireFua = fua && this.capabilities.fua ? NBD_CMD_FLAG_FUA : 0;
    const max = this.limits.maxRequestBytes;
    // A buffer the caller hands over (scratch) and lets us hold is kept for replay without a copy.
    const hold = flags?.scratch === true ? flags.hold : undefined;
    if (this.#throttled()) await this.#throttle();
    if (data.length <= max) {
      await this.#run(NBD_CMD_WRITE, wireFua, offsetBytes, data.length, data, hold);
    } else {
      const parts: Promise<unknown>[] = [];
      for (let at = 0; at < data.length; at += max) {
        parts.push(
          this.#run(
            NBD_CMD_WRITE,
            wireFua,
            offsetBytes + at,
            Math.min(max, data.length - at),
            data.subarray(at, at + max),
            hold,
          ),
        );
      }
      await Promise.all(parts);
    }
    if (fua && !this.capabilities.fua && this.capabilities.flush) await this.flush();
  }

  async flush(): Promise<void> {
    this.#usable('flush');
    await this.#flush();
  }

  async #flush(): Promise<void> {
    const barrier = this.#writeSeq;
    await this.#acked(barrier);
    if (this.capabilities.flush) await this.#run(NBD_CMD_FLUSH, 0, 0, 0);
    if (this.#lostWrites) {
      this.#lostWrites = false;
      throw new CryptmapError(
        'ENBDLOST',
        `${this.uri}: the connection was lost after the server acknowledged writes that no FLUSH covered; they may be lost`,
        { errno: 'EIO' },
      );
    }
    this.#flushedUpTo = Math.max(this.#flushedUpTo, barrier);
    this.#release(barrier);
  }

  async discard(offsetBytes: number, lengthBytes: number): Promise<void> {
    this.#writable('discard');
    if (!this.capabilities.discard)
      throw new CryptmapError('ENOTSUP', `${this.uri} does not support discard (no NBD_FLAG_SEND_TRIM)`, {
        errno: 'ENOTSUP',
      });
    this.#check(offsetBytes, lengthBytes, 'discard');
    if (this.#throttled()) await this.#throttle();
    await this.#effect(NBD_CMD_TRIM, 0, offsetBytes, lengthBytes);
  }

  async writeZeroes(offsetBytes: number, lengthBytes: number, flags?: WriteZeroesFlags): Promise<void> {
    this.#writable('write');
    this.#check(offsetBytes, lengthBytes, 'write');
    if (this.#throttled()) await this.#throttle();
    if (this.capabilities.writeZeroes) {
      const f =
        (flags?.noHole ? NBD_CMD_FLAG_NO_HOLE : 0) | (flags?.fua && this.capabilities.fua ? NBD_CMD_FLAG_FUA : 0);
      await this.#effect(NBD_CMD_WRITE_ZEROES, f, offsetBytes, lengthBytes);
      if (flags?.fua && !this.capabilities.fua && this.capabilities.flush) await this.flush();
      return;
    }
    const zeros = Buffer.alloc(Math.min(ZERO_CHUNK_BYTES, this.limits.maxRequestBytes, lengthBytes));
    const parts: Promise<unknown>[] = [];
    for (let at = 0; at < lengthBytes; at += zeros.length) {
      parts.push(
        this.#run(
          NBD_CMD_WRITE,
          0,
          offsetBytes + at,
          Math.min(zeros.length, lengthBytes - at),
          zeros.subarray(0, lengthBytes - at),
        ),
      );
    }
    await Promise.all(parts);
    if (flags?.fua && this.capabilities.flush) await this.flush();
  }

  async blockStatus(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    if (!this.capabilities.blockStatus)
      throw new CryptmapError('ENOTSUP', `${this.uri} gives no block status (base:allocation not negotiated)`, {
        errno: 'ENOTSUP',
      });
    this.#check(offsetBytes, lengthBytes, 'block status');
    const out: Extent[] = [];
    let pos = offsetBytes;
    const end = offsetBytes + lengthBytes;
    while (pos < end) {
      const ext = (await this.#run(NBD_CMD_BLOCK_STATUS, 0, pos, Math.min(end - pos, EFFECT_MAX_BYTES))) ?? [];
      for (const e of ext) {
        const n = Math.min(e.length, end - pos);
        const hole = (e.flags & NBD_STATE_HOLE) !== 0;
        const zero = (e.flags & NBD_STATE_ZERO) !== 0;
        const last = out[out.length - 1];
        if (last && last.hole === hole && last.zero === zero) last.lengthBytes += n;
        else out.push({ lengthBytes: n, hole, zero });
        pos += n;
        if (pos >= end) break;
      }
    }
    return out;
  }

  /**
   * Single-writer fencing (the lease of a shared volume is lost): cut the device off from the export
   * at once. Requests queued, held for a reconnect or in flight fail with EIO; nothing is sent again
   * or replayed later (a reconnect under way gives up, the replay copies are dropped), and every
   * later request fails too, so no write of this node reaches the export after another node may
   * have taken it over. `health` shows the device failed with the reason. Idempotent.
   */
  fence(why: string): void {
    if (this.#state === 'closed' || this.#failure !== undefined) return;
    this.#dropRetained();
    this.#retainedBytes = 0;
    this.#freeCopies.clear();
    this.#freeCopyBytes = 0;
    this.#fail(`fenced: ${why}`);
  }

  close(): Promise<void> {
    this.#closing ??= this.#close();
    return this.#closing;
  }

  async #close(): Promise<void> {
    if (this.#state === 'ready' && this.capabilities.write) await this.#flush().catch(() => {});
    this.#state = 'closed';
    const gone = new CryptmapError('ECLOSED', `${this.uri}: the device is closed`, { errno: 'EIO' });
    for (const r of [...this.#queue, ...this.#returned]) r.reject(gone);
    this.#queue = [];
    this.#returned = [];
    for (const c of this.#conns) c.close();
    this.#conns = [];
    this.#dropRetained();
    this.#retainedBytes = 0;
    this.#freeCopies.clear();
    this.#freeCopyBytes = 0;
  }

  // ---- checks ----

  #usable(op: string): void {
    if (this.#state === 'closed' || this.#closing !== null)
      throw new CryptmapError('ECLOSED', `${this.uri}: the device is closed (${op})`, { errno: 'EIO' });
    if (this.#failure !== undefined) throw this.#failure;
  }

  #writable(op: string): void {
    if (!this.capabilities.write)
      throw new CryptmapError('EROFS', `${this.uri} is read-only (${op})`, { errno: 'EPERM' });
  }

  #check(offsetBytes: number, lengthBytes: number, op: string): void {
    this.#usable(op);
    const lbs = this.limits.logicalBlockBytes;
    if (offsetBytes < 0 || lengthBytes < 0 || offsetBytes + lengthBytes > this.sizeBytes) {
      throw new CryptmapError(
        'ERANGE',
        `${op} of ${lengthBytes} bytes at ${offsetBytes} is past the end of ${this.uri} (${this.sizeBytes} bytes)`,
        {
          errno: op === 'write' ? 'ENOSPC' : 'EINVAL',
        },
      );
    }
    if (offsetBytes % lbs !== 0 || lengthBytes % lbs !== 0) {
      throw new CryptmapError(
        'EALIGN',
        `${op} of ${lengthBytes} bytes at ${offsetBytes} is not aligned to ${lbs} bytes (${this.uri})`,
        { errno: 'EINVAL' },
      );
    }
  }

  // ---- requests ----

  /** TRIM or WRITE_ZEROES over a range, split into effect lengths a server accepts. */
  async #effect(type: number, flags: number, offsetBytes: number, lengthBytes: number): Promise<void> {
    const step = Math.floor(EFFECT_MAX_BYTES / this.limits.logicalBlockBytes) * this.limits.logicalBlockBytes;
    const parts: Promise<unknown>[] = [];
    for (let at = 0; at < lengthBytes; at += step)
      parts.push(this.#run(type, flags, offsetBytes + at, Math.min(step, lengthBytes - at)));
    await Promise.all(parts);
  }

  #run(
    type: number,
    flags: number,
    offset: number,
    length: number,
    buf?: Uint8Array,
    hold?: () => () => void,
  ): Promise<RawExtent[] | undefined> {
    return new Promise((resolve, reject) => {
      const r: Req = {
        type,
        flags,
        offset,
        length,
        seq: 0,
        resolve,
        reject,
        done: (err, ext) => this.#done(r, err, ext),
      };
      if (buf !== undefined) r.buf = buf;
      if (hold !== undefined) r.hold = hold;
      if (isWriteType(type)) {
        r.seq = ++this.#writeSeq;
        this.#unacked.add(r);
      }
      this.#dispatch(r);
    });
  }

  #dispatch(r: Req): void {
    if (this.#failure !== undefined) {
      this.#settleFailed(r, this.#failure);
      return;
    }
    if (this.#state === 'closed') {
      this.#settleFailed(r, new CryptmapError('ECLOSED', `${this.uri}: the device is closed`, { errno: 'EIO' }));
      return;
    }
    const c = this.#state === 'ready' && this.#queue.length === 0 ? this.#pick() : undefined;
    if (c === undefined) this.#queue.push(r);
    else c.submit(r);
  }

  /** The connection with the fewest requests in flight that can take one more. */
  #pick(): NbdConnection | undefined {
    let best: NbdConnection | undefined;
    for (const c of this.#conns) {
      if (!c.alive || c.draining || c.inflight >= this.#opts.maxInflight || c.inflightBytes >= MAX_INFLIGHT_BYTES)
        continue;
      if (best === undefined || c.inflight < best.inflight) best = c;
    }
    return best;
  }

  #drain(): void {
    while (this.#queue.length > 0 && this.#state === 'ready') {
      const c = this.#pick();
      if (c === undefined) return;
      c.submit(this.#queue.shift()!);
    }
  }

  #settleFailed(r: Req, e: Error): void {
    if (isWriteType(r.type)) this.#writeSettled(r);
    r.reject(e);
  }

  #done(r: Req, err: ServerError | null, ext: RawExtent[] | undefined): void {
    if (err !== null && err.nbdError === NBD_ESHUTDOWN) {
      // The server is going away: this request goes again after the reconnect.
      this.#returned.push(r);
      return;
    }
    if (err !== null) {
      this.#settleFailed(
        r,
        new CryptmapError(
          'ENBDIO',
          `${this.uri}: ${opName(r.type)} of ${r.length} bytes at ${r.offset}: ${err.message}`,
          { errno: err.errno, cause: err },
        ),
      );
      return;
    }
    this.#fruitless = 0;
    if (isWriteType(r.type)) {
      if (r.seq > this.#ackedUpTo) this.#ackedUpTo = r.seq;
      if (this.#replayLimit > 0) {
        const kept: Retained = {
          seq: r.seq,
          type: r.type,
          flags: r.flags & ~NBD_CMD_FLAG_FUA,
          offset: r.offset,
          length: r.length,
        };
        if (r.type === NBD_CMD_WRITE) {
          const b = r.buf!;
          if (r.hold !== undefined) {
            kept.release = r.hold();
            kept.data = Buffer.isBuffer(b) ? b : Buffer.from(b.buffer, b.byteOffset, b.byteLength);
          } else kept.data = this.#copyOut(b);
          this.#retainedBytes += r.length;
        }
        this.#retained.push(kept);
        if (this.#retainedBytes > this.#replayLimit && this.#autoFlush === null) {
          this.#autoFlush = this.#flush()
            .catch(() => {})
            .finally(() => {
              this.#autoFlush = null;
            });
        }
      }
      this.#writeSettled(r);
    }
    r.resolve(ext);
  }

  /**
   * Writes wait while twice the replay limit is held and a flush is on its way to release it. The
   * check is synchronous so that an unthrottled write takes its place in the write order (and under
   * a later flush()) the moment it is called.
   */
  #throttled(): boolean {
    return this.#replayLimit > 0 && this.#retainedBytes >= 2 * this.#replayLimit && this.#autoFlush !== null;
  }

  async #throttle(): Promise<void> {
    while (this.#throttled()) await this.#autoFlush;
  }

  #writeSettled(r: Req): void {
    if (!this.#unacked.delete(r)) return;
    const first = this.#unacked.values().next();
    const min = first.done ? Number.POSITIVE_INFINITY : first.value.seq;
    while (this.#flushWaiters.length > 0 && this.#flushWaiters[0]!.barrier < min) this.#flushWaiters.shift()!.resolve();
  }

  /** Resolves once every write with seq <= barrier was answered. */
  #acked(barrier: number): Promise<void> {
    const first = this.#unacked.values().next();
    if (first.done || first.value.seq > barrier) return Promise.resolve();
    return new Promise((resolve) => {
      this.#flushWaiters.push({ barrier, resolve });
      this.#flushWaiters.sort((a, b) => a.barrier - b.barrier);
    });
  }

  /** A copy of a write's data for replay, in a reused buffer when one of that size is free. */
  #copyOut(src: Uint8Array): Buffer {
    const b = this.#freeCopies.get(src.length)?.pop();
    if (b !== undefined) this.#freeCopyBytes -= b.length;
    const out = b ?? (src.length < 4096 ? Buffer.allocUnsafe(src.length) : Buffer.allocUnsafeSlow(src.length));
    out.set(src);
    return out;
  }

  /** Forget every replay copy (held buffers are let go: the caller may reuse them). */
  #dropRetained(): void {
    for (const k of this.#retained) k.release?.();
    this.#retained = [];
  }

  /** A FLUSH covering every write up to `barrier` succeeded: their copies are no longer needed. */
  #release(barrier: number): void {
    if (this.#retained.length === 0) return;
    const keep: Retained[] = [];
    const done: Buffer[] = [];
    let bytes = 0;
    for (const k of this.#retained) {
      if (k.seq > barrier) {
        keep.push(k);
        bytes += k.data?.length ?? 0;
      } else if (k.release !== undefined) {
        k.release();
      } else if (k.data !== undefined && k.data.length >= 4096) {
        done.push(k.data);
      }
    }
    this.#retained = keep;
    this.#retainedBytes = bytes;
    // Keep released buffers for the next copies (fresh ones cost page faults and GC, more than the
    // copy itself), as long as kept and idle copies stay within twice the replay limit.
    for (const d of done) {
      if (this.#freeCopyBytes + bytes + d.length > 2 * this.#replayLimit) break;
      let list = this.#freeCopies.get(d.length);
      if (list === undefined) this.#freeCopies.set(d.length, (list = []));
      list.push(d);
      this.#freeCopyBytes += d.length;
    }
  }

  // ---- connections and faults ----

  #wrap(n: Negotiated): NbdConnection {
    return new NbdConnection(
      n,
      {
        closed: (c, reason, pending) => this.#connectionClosed(c, reason, pending as Req[]),
        progress: (c) => {
          if (c.draining && c.inflight === 0) c.close();
          this.#drain();
        },
      },
      this.#opts.requestTimeoutMs,
    );
  }

  #connectionClosed(_c: NbdConnection, reason: string, pending: Req[]): void {
    for (const r of pending) {
      if (r.replay) r.reject(new Error(`the connection dropped during replay: ${reason}`));
      else this.#returned.push(r);
    }
    if (this.#state === 'closed' || this.#closing !== null) {
      const gone = new CryptmapError('ECLOSED', `${this.uri}: the device is closed`, { errno: 'EIO' });
      for (const r of this.#returned) this.#settleFailed(r, gone);
      this.#returned = [];
      return;
    }
    if (this.#state === 'ready') void this.#reconnect(reason);
  }

  async #reconnect(reason: string): Promise<void> {
    this.#state = 'reconnecting';
    this.#lastError = reason;
    this.#reconnects++;
    if (++this.#fruitless > MAX_FRUITLESS_RECONNECTS) {
      this.#fail(
        `the connection failed ${MAX_FRUITLESS_RECONNECTS} times in a row without a request completing (last: ${reason})`,
      );
      return;
    }
    // Without replay copies, writes acknowledged since the last FLUSH may be gone with the server.
    if (this.#replayLimit === 0 && this.#ackedUpTo > this.#flushedUpTo) this.#lostWrites = true;
    for (const c of this.#conns) c.destroy(`reconnecting after: ${reason}`);
    this.#conns = [];
    const deadline = Date.now() + this.#opts.reconnectTimeoutMs;
    let delay = 50;
    let last = reason;
    for (;;) {
      if (this.#closing !== null || this.#failure !== undefined) return;
      const left = deadline - Date.now();
      if (left <= 0) {
        this.#fail(`the server did not come back within ${this.#opts.reconnectTimeoutMs} ms (last: ${last})`);
        return;
      }
      await sleep(Math.min(delay, left));
      delay = Math.min(delay * 2, 2000);
      let fresh: NbdConnection[] = [];
      try {
        const ns = await connectMany(
          this.#connCount,
          this.#target,
          this.#creds,
          Math.min(this.#opts.connectTimeoutMs, Math.max(1000, deadline - Date.now())),
        );
        const bad = ns.map((n) => this.#incompatible(n)).find((m) => m !== undefined);
        if (bad !== undefined) {
          for (const n of ns) n.raw.destroy();
          this.#fail(bad);
          return;
        }
        fresh = ns.map((n) => this.#wrap(n));
        if (this.#closing !== null || this.#failure !== undefined) {
          for (const c of fresh) c.close();
          return;
        }
        this.#conns = fresh;
        await this.#replay(fresh[0]!);
        if (this.#failure !== undefined) return; // fenced during the replay
        break;
      } catch (e) {
        if (this.#failure !== undefined) return;
        if (e instanceof HandshakeError && e.permanent) {
          this.#fail(`reconnecting: ${e.message}`);
          return;
        }
        if (e instanceof ReplayFailed) {
          this.#fail(e.message);
          return;
        }
        last = (e as Error).message;
        this.#conns = [];
        for (const c of fresh) c.destroy('reconnect attempt failed');
      }
    }
    this.#state = 'ready';
    const again = this.#returned;
    this.#returned = [];
    again.sort((a, b) => a.seq - b.seq);
    this.#queue = [...again, ...this.#queue];
    this.#drain();
  }

  /** Why a fresh connection cannot stand in for the old ones, if it cannot. */
  #incompatible(n: Negotiated): string | undefined {
    if (n.exportSize !== this.#exportSize)
      return `the export changed size from ${this.#exportSize} to ${n.exportSize} bytes across a reconnect`;
    const must =
      NBD_FLAG_READ_ONLY |
      NBD_FLAG_SEND_FLUSH |
      NBD_FLAG_SEND_FUA |
      NBD_FLAG_SEND_TRIM |
      NBD_FLAG_SEND_WRITE_ZEROES |
      NBD_FLAG_CAN_MULTI_CONN;
    if ((n.transmissionFlags & must) !== (this.#flags & must))
      return `the export's transmission flags changed across a reconnect (0x${this.#flags.toString(16)} -> 0x${n.transmissionFlags.toString(16)})`;
    if (this.capabilities.blockStatus && n.allocationContext === undefined)
      return 'the server no longer offers base:allocation';
    const lbs = Math.max(512, n.blockSize?.minimum ?? 1);
    if (lbs > this.limits.logicalBlockBytes) return `the export's minimum block size grew to ${lbs} across a reconnect`;
    return undefined;
  }

  /** Send the retained writes again in their order, overlapping ones one after the other. */
  async #replay(c: NbdConnection): Promise<void> {
    if (this.#retained.length === 0) return;
    const list = [...this.#retained].sort((a, b) => a.seq - b.seq);
    let batch: Promise<void>[] = [];
    let spans: [number, number][] = [];
    for (const k of list) {
      const s = k.offset;
      const e = k.offset + k.length;
      if (batch.length >= this.#opts.maxInflight || spans.some(([a, b]) => s < b && e > a)) {
        await Promise.all(batch);
        batch = [];
        spans = [];
      }
      if (!c.alive) throw new Error('the connection dropped during replay');
      spans.push([s, e]);
      batch.push(
        new Promise<void>((resolve, reject) => {
          const r: Req = {
            type: k.type,
            flags: k.flags,
            offset: k.offset,
            length: k.length,
            seq: 0,
            replay: true,
            resolve: () => resolve(),
            reject,
            done: (err) =>
              err === null
                ? resolve()
                : reject(
                    new ReplayFailed(
                      `${this.uri}: re-sending an acknowledged ${opName(k.type)} of ${k.length} bytes at ${k.offset} failed: ${err.message}`,
                    ),
                  ),
          };
          if (k.data !== undefined) r.buf = k.data;
          c.submit(r);
        }),
      );
    }
    await Promise.all(batch);
  }

  #fail(why: string): void {
    this.#state = 'failed';
    this.#lastError = why;
    this.#failure = new CryptmapError('ENBDGONE', `${this.uri}: ${why}`, { errno: 'EIO' });
    for (const c of this.#conns) c.destroy('device failed');
    this.#conns = [];
    const all = [...this.#returned, ...this.#queue];
    this.#returned = [];
    this.#queue = [];
    for (const r of all) this.#settleFailed(r, this.#failure);
    for (const w of this.#flushWaiters) w.resolve();
    this.#flushWaiters = [];
  }
}

class ReplayFailed extends Error {}

function opName(type: number): string {
  return ['READ', 'WRITE', 'DISC', 'FLUSH', 'TRIM', 'CACHE', 'WRITE_ZEROES', 'BLOCK_STATUS'][type] ?? `command ${type}`;
}

/** `count` connections, all or none (the ones that did connect are closed when another fails). */
async function connectMany(
  count: number,
  t: NbdUriTarget,
  creds: TlsCredentials,
  timeoutMs: number,
): Promise<Negotiated[]> {
  const all = await Promise.allSettled(Array.from({ length: count }, () => connectOnce(t, creds, timeoutMs)));
  const failed = all.find((r) => r.status === 'rejected');
  if (failed === undefined) return all.map((r) => (r as PromiseFulfilledResult<Negotiated>).value);
  for (const r of all) if (r.status === 'fulfilled') r.value.raw.destroy();
  throw failed.reason;
}

/** Connect and negotiate one connection, within `timeoutMs` for the whole handshake. */
async function connectOnce(t: NbdUriTarget, creds: TlsCredentials, timeoutMs: number): Promise<Negotiated> {
  const raw = await connectSocket(t, timeoutMs);
  raw.on('error', () => {}); // reported through the handshake or the connection
  const timer = setTimeout(() => raw.destroy(new Error(`handshake did not finish in ${timeoutMs} ms`)), timeoutMs);
  try {
    return await negotiate(raw, t, creds, timeoutMs);
  } catch (e) {
    raw.destroy();
    throw e;
  } finally {
    clearTimeout(timer);
  }
}
