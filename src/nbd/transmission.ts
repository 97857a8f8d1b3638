/**
 * Transmission phase, states TRANSMISSION and DRAINING (proto.md "Transmission", "Request types",
 * "Structured reply chunk message", "Error values", "Size constraints").
 *
 * The loop reads one 28-byte request header at a time (a view into the receive queue, no copy),
 * validates it once here (nbdkit `validate_request` style: flags, negotiation, read-only, range,
 * alignment, payload size) and starts the command without waiting for it, so many requests are in
 * flight and replies go out in completion order. Before starting a request the loop waits while the
 * connection's in-flight payload bytes, request count or unsent reply bytes exceed the limits
 * (backpressure). Commands are an ops table keyed by NBD_CMD_*; they trust their validated input.
 *
 * READ replies are built in one buffer (reply header + payload) that the device reads into directly.
 */
import type { BlockDevice, Extent, WriteFlags } from '../blockdev/types.js';
import { CryptmapError, type Errno } from '../util/errors.js';
import { logger } from '../util/log.js';
import {
  COMMAND_NAMES,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EINVAL,
  NBD_EIO,
  NBD_ENOMEM,
  NBD_ENOSPC,
  NBD_ENOTSUP,
  NBD_EOVERFLOW,
  NBD_EPERM,
  NBD_ESHUTDOWN,
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_CACHE,
  NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_REQUEST_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STATE_HOLE,
  NBD_STATE_ZERO,
  NBD_STRUCTURED_REPLY_MAGIC,
  REQUEST_HEADER_BYTES,
  SIMPLE_REPLY_HEADER_BYTES,
  STRUCTURED_REPLY_HEADER_BYTES,
} from '../nbd-wire/constants.js';
import { type Connection, ProtocolViolation } from './connection.js';
import { ConnectionClosed } from '../nbd-wire/recv.js';
import type { ExportEntry } from './types.js';

const log = logger('nbd');

/** proto.md NBD_REPLY_TYPE_BLOCK_STATUS: at most 2^20 descriptors per chunk. */
const MAX_EXTENTS = 1 << 20;
/** Reads shorter than this skip the hole lookup: a hole chunk saves little, the lookup costs a call. */
const SPARSE_READ_MIN_BYTES = 64 * 1024;
/** proto.md NBD_REPLY_TYPE_ERROR: message at most 4096 bytes. */
const MAX_ERROR_MESSAGE_BYTES = 4096;

/**
 * Transmission flags for an export. READ_ONLY, TRIM and MULTI_CONN follow the device capabilities.
 * FLUSH and FUA are advertised on every writable export: a device without a volatile cache
 * (capabilities.flush false) makes every write durable, so both are trivially honoured; FUA on a
 * device with flush but without FUA is emulated as write + flush. WRITE_ZEROES is always offered
 * on writable exports (the BlockDevice contract has writeZeroes); FAST_ZERO fails with ENOTSUP
 * when the device cannot zero faster than writing. DF only once structured replies are negotiated.
 */
export function transmissionFlagsFor(entry: ExportEntry, structuredReplies: boolean): number {
  const c = entry.device.capabilities;
  const writable = c.write && !entry.readOnly;
  let f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_CACHE;
  if (!writable) f |= NBD_FLAG_READ_ONLY;
  else {
    f |= NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
    if (c.discard) f |= NBD_FLAG_SEND_TRIM;
  }
  if (structuredReplies) f |= NBD_FLAG_SEND_DF;
  if (c.multiConn) f |= NBD_FLAG_CAN_MULTI_CONN;
  return f;
}

/** NBD_INFO_BLOCK_SIZE values for an export (proto.md "Size constraints"). */
export function blockSizeFor(
  entry: ExportEntry,
  maxPayloadBytes: number,
): { minimum: number; preferred: number; maximum: number } {
  const l = entry.device.limits;
  const minimum = l.logicalBlockBytes;
  const pow2 = (n: number) => n > 0 && (n & (n - 1)) === 0;
  let preferred = Math.max(l.physicalBlockBytes, minimum, 512);
  if (!pow2(preferred)) preferred = Math.max(4096, minimum);
  let maximum = Math.max(maxPayloadBytes, preferred);
  maximum -= maximum % minimum;
  return { minimum, preferred, maximum };
}

// ---- requests and replies ----

interface Request {
  flags: number;
  type: number;
  cookieHi: number;
  cookieLo: number;
  offset: number;
  length: number;
  /** Server-wide budget bytes the request holds; a READ hands them to its reply (Connection.send). */
  budget: number;
}

function simpleHeader(b: Buffer, error: number, req: Request): void {
  b.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  b.writeUInt32BE(req.cookieHi, 8);
  b.writeUInt32BE(req.cookieLo, 12);
}

function chunkHeader(b: Buffer, at: number, flags: number, type: number, req: Request, length: number): void {
  b.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, at);
  b.writeUInt16BE(flags, at + 4);
  b.writeUInt16BE(type, at + 6);
  b.writeUInt32BE(req.cookieHi, at + 8);
  b.writeUInt32BE(req.cookieLo, at + 12);
  b.writeUInt32BE(length, at + 16);
}

function writeU64(b: Buffer, at: number, v: number): void {
  b.writeUInt32BE(Math.floor(v / 0x100000000), at);
  b.writeUInt32BE(v >>> 0, at + 4);
}

/** Successful reply without payload. A simple reply is valid even with structured replies negotiated. */
function replyOk(conn: Connection, req: Request): void {
  const b = Buffer.allocUnsafe(SIMPLE_REPLY_HEADER_BYTES);
  simpleHeader(b, 0, req);
  conn.send(b);
}

/** Error reply: an NBD_REPLY_TYPE_ERROR chunk with a message when structured, else a simple reply. */
function replyError(conn: Connection, req: Request, error: number, message: string): void {
  if (conn.structuredReplies) {
    let msg = Buffer.from(message, 'utf8');
    if (msg.length > MAX_ERROR_MESSAGE_BYTES) msg = msg.subarray(0, MAX_ERROR_MESSAGE_BYTES);
    const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_BYTES + 6 + msg.length);
    chunkHeader(b, 0, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, req, 6 + msg.length);
    b.writeUInt32BE(error, 20);
    b.writeUInt16BE(msg.length, 24);
    msg.copy(b, 26);
    conn.send(b);
  } else {
    const b = Buffer.allocUnsafe(SIMPLE_REPLY_HEADER_BYTES);
    simpleHeader(b, error, req);
    conn.send(b);
  }
}

const ERRNO_TO_NBD: Readonly<Record<Errno, number>> = {
  EPERM: NBD_EPERM,
  EIO: NBD_EIO,
  ENOMEM: NBD_ENOMEM,
  EINVAL: NBD_EINVAL,
  ENOSPC: NBD_ENOSPC,
  EOVERFLOW: NBD_EOVERFLOW,
  ENOTSUP: NBD_ENOTSUP,
  ESHUTDOWN: NBD_ESHUTDOWN,
  ENOENT: NBD_EIO,
  EBUSY: NBD_EIO,
  EEXIST: NBD_EIO,
};

const SYSTEM_TO_NBD: Readonly<Record<string, number>> = {
  EPERM: NBD_EPERM,
  EACCES: NBD_EPERM,
  EROFS: NBD_EPERM,
  ENOSPC: NBD_ENOSPC,
  EDQUOT: NBD_ENOSPC,
  EFBIG: NBD_ENOSPC,
  ENOMEM: NBD_ENOMEM,
  EINVAL: NBD_EINVAL,
  EOVERFLOW: NBD_EOVERFLOW,
  ENOTSUP: NBD_ENOTSUP,
  EOPNOTSUPP: NBD_ENOTSUP,
  ESHUTDOWN: NBD_ESHUTDOWN,
};

const NBD_ERROR_TEXT: Readonly<Record<number, string>> = {
  [NBD_EPERM]: 'operation not permitted',
  [NBD_EIO]: 'input/output error',
  [NBD_ENOMEM]: 'cannot allocate memory',
  [NBD_EINVAL]: 'invalid argument',
  [NBD_ENOSPC]: 'no space left on device',
  [NBD_EOVERFLOW]: 'value too large',
  [NBD_ENOTSUP]: 'operation not supported',
  [NBD_ESHUTDOWN]: 'server is shutting down',
};

/** Map a failure from the device to an NBD error value and the message for the server's log. */
export function toNbdError(e: unknown): { error: number; message: string } {
  if (e instanceof CryptmapError) return { error: ERRNO_TO_NBD[e.errno] ?? NBD_EIO, message: e.message };
  const code = (e as NodeJS.ErrnoException | undefined)?.code;
  if (typeof code === 'string' && SYSTEM_TO_NBD[code] !== undefined)
    return { error: SYSTEM_TO_NBD[code], message: code };
  return { error: NBD_EIO, message: 'input/output error' };
}

// ---- device helpers (split at the device's request limit) ----

async function readDevice(dev: BlockDevice, offset: number, buf: Buffer): Promise<void> {
  const max = dev.limits.maxRequestBytes;
  if (buf.length <= max) return dev.read(offset, buf);
  for (let done = 0; done < buf.length; done += max) {
    await dev.read(offset + done, buf.subarray(done, Math.min(buf.length, done + max)));
  }
}

/**
 * A WRITE payload is the server's own buffer: the device may use it as scratch, and keep it past the
 * write (`hold`, the NBD client's replay copy); it goes back to the pool once the write succeeded and
 * every hold was let go (after a failure it is left to the GC: parts of a fanned-out write may still
 * be reading it).
 */
async function writeDevice(
  conn: Connection,
  dev: BlockDevice,
  offset: number,
  data: Buffer,
  fua: boolean,
): Promise<void> {
  const max = dev.limits.maxRequestBytes;
  let holds = 0;
  let written = false;
  const pool = conn.server.pool;
  const flags: WriteFlags = {
    scratch: true,
    hold: () => {
      holds++;
      let held = true;
      return () => {
        if (!held) return;
        held = false;
        if (--holds === 0 && written) pool.release(data);
      };
    },
  };
  if (fua && dev.capabilities.fua) flags.fua = true;
  await writeParts(dev, offset, data, fua, flags, max);
  written = true;
  if (holds === 0) pool.release(data);
}

async function writeParts(
  dev: BlockDevice,
  offset: number,
  data: Buffer,
  fua: boolean,
  flags: WriteFlags,
  max: number,
): Promise<void> {
  if (data.length <= max) await dev.write(offset, data, flags);
  else {
    for (let done = 0; done < data.length; done += max) {
      await dev.write(offset + done, data.subarray(done, Math.min(data.length, done + max)), flags);
    }
  }
  if (fua && !dev.capabilities.fua && dev.capabilities.flush) await dev.flush();
}

async function rangeOp(
  dev: BlockDevice,
  offset: number,
  length: number,
  op: (off: number, len: number) => Promise<void>,
): Promise<void> {
  const max = dev.limits.maxRequestBytes;
  for (let done = 0; done < length; done += max) await op(offset + done, Math.min(max, length - done));
}

// ---- commands ----

interface CommandOps {
  readonly name: string;
  /** Command flags valid for this command besides FUA (valid on all commands once SEND_FUA is advertised). */
  readonly flags: number;
  /** Transmission flag the client must have been offered; 0 = none. */
  readonly needs: number;
  /** Modifies the export: EPERM on a read-only export. */
  readonly writes: boolean;
  /** Error for a range past the end of the export (proto.md "Error values"). */
  readonly pastEnd: number;
  /** Length is a payload size bounded by the advertised maximum. */
  readonly payload: boolean;
  run(conn: Connection, req: Request, data: Buffer | null): Promise<void>;
}

const read: CommandOps = {
  name: 'NBD_CMD_READ',
  flags: NBD_CMD_FLAG_DF,
  needs: 0,
  writes: false,
  pastEnd: NBD_EINVAL,
  payload: true,
  async run(conn, req) {
    const dev = conn.export!.device;
    const len = req.length;
    const pool = conn.server.pool;
    if (!conn.structuredReplies) {
      // A failed read's buffer is not given back to the pool: a device that fans a request out may
      // still be filling it after the first part failed.
      const b = pool.acquire(SIMPLE_REPLY_HEADER_BYTES + len);
      if (len > 0) await readDevice(dev, req.offset, b.subarray(SIMPLE_REPLY_HEADER_BYTES));
      simpleHeader(b, 0, req);
      conn.send(b, true, req.budget);
      req.budget = 0;
      return;
    }
    if (len === 0) {
      const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_BYTES);
      chunkHeader(b, 0, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, req, 0);
      conn.send(b);
      return;
    }
    if (
      len >= SPARSE_READ_MIN_BYTES &&
      conn.server.limits.sparseReads &&
      (req.flags & NBD_CMD_FLAG_DF) === 0 &&
      dev.capabilities.blockStatus &&
      dev.blockStatus
    ) {
      const extents = await dev.blockStatus(req.offset, len);
      if (await sparseRead(conn, dev, req, extents)) return;
    }
    const b = pool.acquire(STRUCTURED_REPLY_HEADER_BYTES + 8 + len);
    await readDevice(dev, req.offset, b.subarray(STRUCTURED_REPLY_HEADER_BYTES + 8));
    chunkHeader(b, 0, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, req, 8 + len);
    writeU64(b, STRUCTURED_REPLY_HEADER_BYTES, req.offset);
    conn.send(b, true, req.budget);
    req.budget = 0;
  },
};

/**
 * Structured READ that answers zero extents with OFFSET_HOLE chunks. Returns false (caller sends
 * one data chunk) when the range has no zero extent or the extents do not tile the range exactly.
 * Everything is read before the first chunk is sent, so an error still becomes one ERROR chunk.
 */
async function sparseRead(conn: Connection, dev: BlockDevice, req: Request, extents: Extent[]): Promise<boolean> {
  let total = 0;
  let anyZero = false;
  for (const e of extents) {
    if (!(e.lengthBytes > 0)) return false;
    total += e.lengthBytes;
    if (e.zero) anyZero = true;
  }
  if (!anyZero || total !== req.length || extents.length > 4096) return false;
  const chunks: Buffer[] = [];
  const reads: Promise<void>[] = [];
  let pos = req.offset;
  for (const e of extents) {
    if (e.zero) {
      const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_BYTES + 12);
      chunkHeader(b, 0, 0, NBD_REPLY_TYPE_OFFSET_HOLE, req, 12);
      writeU64(b, STRUCTURED_REPLY_HEADER_BYTES, pos);
      b.writeUInt32BE(e.lengthBytes, STRUCTURED_REPLY_HEADER_BYTES + 8);
      chunks.push(b);
    } else {
      const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_BYTES + 8 + e.lengthBytes);
      chunkHeader(b, 0, 0, NBD_REPLY_TYPE_OFFSET_DATA, req, 8 + e.lengthBytes);
      writeU64(b, STRUCTURED_REPLY_HEADER_BYTES, pos);
      reads.push(readDevice(dev, pos, b.subarray(STRUCTURED_REPLY_HEADER_BYTES + 8)));
      chunks.push(b);
    }
    pos += e.lengthBytes;
  }
  await Promise.all(reads);
  // The last chunk carries NBD_REPLY_FLAG_DONE.
  chunks[chunks.length - 1]!.writeUInt16BE(NBD_REPLY_FLAG_DONE, 4);
  for (let i = 0; i < chunks.length - 1; i++) conn.send(chunks[i]!);
  // The last chunk goes out after the others: it carries the budget until the peer took them all.
  conn.send(chunks[chunks.length - 1]!, false, req.budget);
  req.budget = 0;
  return true;
}

const write: CommandOps = {
  name: 'NBD_CMD_WRITE',
  flags: 0,
  needs: 0,
  writes: true,
  pastEnd: NBD_ENOSPC,
  payload: true,
  async run(conn, req, data) {
    if (req.length > 0)
      await writeDevice(conn, conn.export!.device, req.offset, data!, (req.flags & NBD_CMD_FLAG_FUA) !== 0);
    else conn.server.pool.release(data!);
    replyOk(conn, req);
  },
};

const flush: CommandOps = {
  name: 'NBD_CMD_FLUSH',
  flags: 0,
  needs: NBD_FLAG_SEND_FLUSH,
  writes: false,
  pastEnd: NBD_EINVAL,
  payload: false,
  async run(conn, req) {
    await conn.export!.device.flush();
    replyOk(conn, req);
  },
};

const trim: CommandOps = {
  name: 'NBD_CMD_TRIM',
  flags: 0,
  needs: NBD_FLAG_SEND_TRIM,
  writes: true,
  pastEnd: NBD_EINVAL,
  payload: false,
  async run(conn, req) {
    const dev = conn.export!.device;
    await rangeOp(dev, req.offset, req.length, (o, l) => dev.discard(o, l));
    if ((req.flags & NBD_CMD_FLAG_FUA) !== 0 && dev.capabilities.flush) await dev.flush();
    replyOk(conn, req);
  },
};

const cache: CommandOps = {
  name: 'NBD_CMD_CACHE',
  flags: 0,
  needs: NBD_FLAG_SEND_CACHE,
  writes: false,
  pastEnd: NBD_EINVAL,
  payload: false,
  // Advisory only (proto.md NBD_CMD_CACHE): the backends keep no cache of their own to fill.
  async run(conn, req) {
    replyOk(conn, req);
  },
};

const writeZeroes: CommandOps = {
  name: 'NBD_CMD_WRITE_ZEROES',
  flags: NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
  needs: NBD_FLAG_SEND_WRITE_ZEROES,
  writes: true,
  pastEnd: NBD_ENOSPC,
  payload: false,
  async run(conn, req) {
    const dev = conn.export!.device;
    if ((req.flags & NBD_CMD_FLAG_FAST_ZERO) !== 0 && !dev.capabilities.writeZeroes) {
      replyError(conn, req, NBD_ENOTSUP, 'fast zeroing is not supported by this export');
      return;
    }
    const fua = (req.flags & NBD_CMD_FLAG_FUA) !== 0;
    const flags = { noHole: (req.flags & NBD_CMD_FLAG_NO_HOLE) !== 0, fua: fua && dev.capabilities.fua };
    await rangeOp(dev, req.offset, req.length, (o, l) => dev.writeZeroes(o, l, flags));
    if (fua && !dev.capabilities.fua && dev.capabilities.flush) await dev.flush();
    replyOk(conn, req);
  },
};

const blockStatus: CommandOps = {
  name: 'NBD_CMD_BLOCK_STATUS',
  flags: NBD_CMD_FLAG_REQ_ONE,
  needs: 0,
  writes: false,
  pastEnd: NBD_EINVAL,
  payload: false,
  async run(conn, req) {
    const dev = conn.export!.device;
    const reqOne = (req.flags & NBD_CMD_FLAG_REQ_ONE) !== 0;
    let extents: Extent[] = [];
    if (dev.capabilities.blockStatus && dev.blockStatus) extents = await dev.blockStatus(req.offset, req.length);
    // Descriptor lengths are u32 and never cross the requested range, which is at most 2^32-1 bytes.
    const descs: number[] = [];
    let covered = 0;
    for (const e of extents) {
      const n = Math.min(e.lengthBytes, req.length - covered);
      if (!(n > 0)) break;
      const flags = (e.hole ? NBD_STATE_HOLE : 0) | (e.zero ? NBD_STATE_ZERO : 0);
      const last = descs.length - 2;
      if (last >= 0 && descs[last + 1] === flags && !reqOne) descs[last] = descs[last]! + n;
      else descs.push(n, flags);
      covered += n;
      if (reqOne || descs.length / 2 >= MAX_EXTENTS || covered >= req.length) break;
    }
    if (descs.length === 0) descs.push(req.length, 0); // unknown: "allocated", always safe
    const count = descs.length / 2;
    const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_BYTES + 4 + 8 * count);
    chunkHeader(b, 0, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, req, 4 + 8 * count);
    b.writeUInt32BE(conn.meta!.baseAllocationId, STRUCTURED_REPLY_HEADER_BYTES);
    for (let i = 0; i < descs.length; i++) b.writeUInt32BE(descs[i]!, STRUCTURED_REPLY_HEADER_BYTES + 4 + 4 * i);
    conn.send(b);
  },
};

/** The command ops table (STATES.TRANSMISSION.accepts lists the same keys plus NBD_CMD_DISC). */
export const COMMANDS: Readonly<Record<number, CommandOps>> = {
  [NBD_CMD_READ]: read,
  [NBD_CMD_WRITE]: write,
  [NBD_CMD_FLUSH]: flush,
  [NBD_CMD_TRIM]: trim,
  [NBD_CMD_CACHE]: cache,
  [NBD_CMD_WRITE_ZEROES]: writeZeroes,
  [NBD_CMD_BLOCK_STATUS]: blockStatus,
};

// ---- validation at the edge ----

/** 0 when the request may run, else the NBD error (and `why` says what is wrong). */
function validate(
  conn: Connection,
  ops: CommandOps,
  req: Request,
  offsetHi: number,
): { error: number; why: string } | null {
  const tf = conn.transmissionFlags;
  const entry = conn.export!;
  let allowed = ops.flags | ((tf & NBD_FLAG_SEND_FUA) !== 0 ? NBD_CMD_FLAG_FUA : 0);
  if ((tf & NBD_FLAG_SEND_DF) === 0) allowed &= ~NBD_CMD_FLAG_DF;
  if ((tf & NBD_FLAG_SEND_FAST_ZERO) === 0) allowed &= ~NBD_CMD_FLAG_FAST_ZERO;
  if ((req.flags & ~allowed) !== 0)
    return { error: NBD_EINVAL, why: `${ops.name}: invalid command flags 0x${req.flags.toString(16)}` };
  if (ops.writes && (tf & NBD_FLAG_READ_ONLY) !== 0)
    return { error: NBD_EPERM, why: `${ops.name} on a read-only export` };
  if (ops.needs !== 0 && (tf & ops.needs) === 0)
    return { error: NBD_EINVAL, why: `${ops.name} was not negotiated for this export` };
  if (ops === flush) {
    if (req.offset !== 0 || req.length !== 0 || offsetHi !== 0)
      return { error: NBD_EINVAL, why: 'NBD_CMD_FLUSH: offset and length must be zero' };
    return null;
  }
  if (ops === blockStatus) {
    if (!conn.meta)
      return { error: NBD_EINVAL, why: 'NBD_CMD_BLOCK_STATUS without a metadata context (NBD_OPT_SET_META_CONTEXT)' };
    if (req.length === 0) return { error: NBD_EINVAL, why: 'NBD_CMD_BLOCK_STATUS of length 0' };
  }
  if (ops.payload && req.length > conn.server.limits.maxPayloadBytes) {
    return {
      error: NBD_EINVAL,
      why: `${ops.name} of ${req.length} bytes exceeds the maximum payload of ${conn.server.limits.maxPayloadBytes}`,
    };
  }
  const size = entry.device.sizeBytes;
  // offsetHi above 2^21 means an offset beyond 2^53: past the end of any export.
  if (offsetHi >= 0x200000 || req.offset + req.length > size) {
    return {
      error: ops.pastEnd,
      why: `${ops.name} of ${req.length} bytes at offset ${offsetHi >= 0x200000 ? '>2^53' : req.offset} is past the end of the export (${size} bytes)`,
    };
  }
  const min = entry.device.limits.logicalBlockBytes;
  if (req.offset % min !== 0 || req.length % min !== 0) {
    return {
      error: NBD_EINVAL,
      why: `${ops.name} at ${req.offset} length ${req.length} is not aligned to the ${min}-byte block size`,
    };
  }
  return null;
}

// ---- the loop ----

async function execute(
  conn: Connection,
  ops: CommandOps,
  req: Request,
  data: Buffer | null,
  cost: number,
): Promise<void> {
  try {
    // A WRITE payload goes back to the pool in writeDevice.
    await ops.run(conn, req, data);
  } catch (e) {
    const { error, message } = toNbdError(e);
    if (e instanceof CryptmapError)
      log.debug('request failed', {
        conn: conn.id,
        cmd: ops.name,
        offset: req.offset,
        length: req.length,
        error: message,
      });
    else
      log.error('request failed', {
        conn: conn.id,
        cmd: ops.name,
        offset: req.offset,
        length: req.length,
        error: e instanceof Error ? e.message : String(e),
      });
    // The client gets the errno's text only: device messages may name server-side paths.
    replyError(conn, req, error, `${ops.name} failed: ${NBD_ERROR_TEXT[error] ?? 'error'}`);
  } finally {
    conn.finished(cost);
    // What a READ reply did not take over (a failed request, a WRITE) goes back now.
    conn.server.budget.release(req.budget);
  }
}

/** Payload bytes that follow a request header: a WRITE's length, else 0. */
function writePayloadBytes(h: Buffer): number {
  return h.readUInt32BE(0) === NBD_REQUEST_MAGIC && h.readUInt16BE(6) === NBD_CMD_WRITE ? h.readUInt32BE(24) : 0;
}

export async function transmit(conn: Connection): Promise<void> {
  const rx = conn.rx;
  // A plain socket reads large WRITE payloads straight into their buffers (TLS decrypts into its own).
  // A run of WRITEs reads each header together with its payload (one system call, not three).
  if (!conn.tlsActive)
    rx.direct(conn.socket, REQUEST_HEADER_BYTES, { of: writePayloadBytes, alloc: conn.payloadAlloc });
  try {
    for (;;) {
      if (conn.draining) break;
      const hdr = rx.tryRead(REQUEST_HEADER_BYTES) ?? (await rx.read(REQUEST_HEADER_BYTES));
      if (hdr.readUInt32BE(0) !== NBD_REQUEST_MAGIC)
        throw new ProtocolViolation(`bad request magic 0x${hdr.readUInt32BE(0).toString(16)}`);
      const offsetHi = hdr.readUInt32BE(16);
      const req: Request = {
        flags: hdr.readUInt16BE(4),
        type: hdr.readUInt16BE(6),
        cookieHi: hdr.readUInt32BE(8),
        cookieLo: hdr.readUInt32BE(12),
        offset: offsetHi * 0x100000000 + hdr.readUInt32BE(20),
        length: hdr.readUInt32BE(24),
        budget: 0,
      };
      if (req.type === NBD_CMD_DISC) break;
      const ops = COMMANDS[req.type];
      const bad = ops
        ? validate(conn, ops, req, offsetHi)
        : { error: NBD_EINVAL, why: `unknown command ${COMMAND_NAMES[req.type] ?? req.type}` };
      const cost = !bad && ops?.payload ? req.length : 0;
      // Refused requests wait too: their error replies must not pile up for a peer that does not read.
      const room = conn.waitForRoom(cost);
      if (room) {
        await room;
        if (conn.draining || !conn.writable) break;
      }
      if (bad) {
        // The payload of a refused WRITE is consumed without being buffered whole.
        if (req.type === NBD_CMD_WRITE) await rx.skip(req.length);
        log.debug('request refused', { conn: conn.id, why: bad.why });
        replyError(conn, req, bad.error, bad.why);
        continue;
      }
      // Server-wide budget before the payload is read (the receive queue pauses while we wait).
      const grant = conn.server.budget.acquire(cost);
      if (grant) await grant;
      let data: Buffer | null = null;
      try {
        if (conn.draining || !conn.writable) throw new ConnectionClosed();
        if (req.type === NBD_CMD_WRITE) {
          data = rx.tryRead(req.length, conn.payloadAlloc);
          if (!data) {
            // Not all here yet: the server's sweep drops the connection if the rest stalls (checkStall).
            const now = performance.now();
            conn.payloadWait = { since: now, length: req.length, received: rx.receivedBytes, progressAt: now };
            try {
              data = await rx.read(req.length, conn.payloadAlloc);
            } finally {
              conn.payloadWait = null;
            }
          }
        }
      } catch (e) {
        conn.server.budget.release(cost);
        throw e;
      }
      req.budget = cost;
      conn.started(cost);
      void execute(conn, ops!, req, data, cost);
    }
  } catch (e) {
    // The client went away (possibly mid-request): finish what is in flight, then close.
    if (!(e instanceof ConnectionClosed)) {
      if (e instanceof ProtocolViolation) {
        conn.transition('DRAINING');
        await conn.idle();
      }
      throw e;
    }
  }
  // A stalled connection was dropped (Connection.checkStall): already CLOSED, nothing to drain to.
  if (conn.state !== 'CLOSED') conn.transition('DRAINING');
  await conn.idle();
}
