/**
 * Transmission phase of one NBD client connection (proto.md "Transmission", "Structured reply
 * chunk message", "Structured reply types"): requests go out as they are submitted, many in flight,
 * and replies are parsed as the socket delivers them, in any order.
 *
 * Reply parsing is a push state machine over socket chunks:
 *   MAGIC -> SIMPLE header (16) | CHUNK header (20) -> payload sink -> MAGIC ...
 * READ data (a simple reply's payload, an OFFSET_DATA chunk's data) lands in the caller's buffer with
 * no copy in userspace: over a plain socket (not TLS) the connection tells the socket where its next
 * read goes (transport.ts SocketReader, Node's `onread`), and while a payload of DIRECT_MIN bytes or
 * more is due that is the request's own buffer, at the position the payload has reached; the
 * kernel's copy out of the socket is the only one. While such READs are in flight, headers are read
 * on their own (16 bytes, then what the header still needs), so that a payload after a header is
 * not pulled into the scratch buffer and copied from there. Otherwise (small replies, TLS, whose
 * decryption writes its own buffers) chunks are parsed from scratch and copied. Small payloads (chunk
 * offsets, holes, errors, block status) are gathered in a buffer sized after the length was checked
 * against a cap. Anything the spec calls a violation (unknown cookie, a chunk type that does not fit
 * the command, data outside the request, a simple reply to a structured READ) is a hard disconnect:
 * the connection reports itself closed with the reason, and its requests go back to the device.
 */
import type { Duplex } from 'node:stream';
import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_DISC,
  NBD_CMD_READ,
  NBD_CMD_WRITE,
  NBD_EINVAL,
  NBD_EIO,
  NBD_ENOMEM,
  NBD_ENOSPC,
  NBD_ENOTSUP,
  NBD_EOVERFLOW,
  NBD_EPERM,
  NBD_ESHUTDOWN,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_ERROR_OFFSET,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_REQUEST_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  REQUEST_HEADER_BYTES,
} from '../../nbd-wire/constants.js';
import type { Errno } from '../../util/errors.js';
import type { Negotiated } from './handshake.js';
import { socketReader } from './transport.js';

/** READ payloads at least this large are read by the socket straight into the request's buffer. */
const DIRECT_MIN = 16 << 10;
/** Bytes of a simple reply header, and of a structured chunk header's first part. */
const FIRST_HEADER_READ = 16;
/**
 * With structured replies, the first read of a reply while large READs are in flight: an
 * OFFSET_DATA chunk's header and offset (20 + 8), so its data follows in place after one read, not
 * three. Bytes of a shorter reply beyond it (at most 12) belong to the next one and are parsed from scratch.
 */
const DATA_CHUNK_HEAD = 28;

/** Largest error chunk payload: 4096-byte message + the fixed fields. */
const MAX_ERROR_PAYLOAD = 4096 + 14;
/** Largest block status chunk (proto.md: servers SHOULD NOT send more than 2^20 extents). */
const MAX_STATUS_PAYLOAD = 4 + 8 * (1 << 20);

/** One extent as the server reported it: length and base:allocation flags. */
export interface RawExtent {
  length: number;
  flags: number;
}

/** A request as the device hands it to a connection (and back again after a disconnect). */
export interface WireRequest {
  type: number;
  flags: number;
  offset: number;
  length: number;
  /** READ: the destination; WRITE: the payload. */
  buf?: Uint8Array;
  /** Called once per attempt: null on success, else the server's error. */
  done(err: ServerError | null, extents?: RawExtent[]): void;
  // ---- per-attempt state, owned by the connection ----
  /** Bytes of a structured READ covered so far. */
  covered?: number;
  /** Covered ranges of a READ answered in more than one chunk (overlap check). */
  ranges?: [number, number][];
  error?: ServerError;
  extents?: RawExtent[];
}

/** An error the server reported for one request (the connection stays up). */
export class ServerError extends Error {
  readonly nbdError: number;
  readonly errno: Errno;
  constructor(nbdError: number, message: string) {
    super(message);
    this.name = 'ServerError';
    this.nbdError = nbdError;
    this.errno = errnoOf(nbdError);
  }
}

function errnoOf(e: number): Errno {
  switch (e) {
    case NBD_EPERM:
      return 'EPERM';
    case NBD_EIO:
      return 'EIO';
    case NBD_ENOMEM:
      return 'ENOMEM';
    case NBD_ENOSPC:
      return 'ENOSPC';
    case NBD_EOVERFLOW:
      return 'EOVERFLOW';
    case NBD_ENOTSUP:
      return 'ENOTSUP';
    case NBD_ESHUTDOWN:
      return 'ESHUTDOWN';
    default:
      return e === NBD_EINVAL ? 'EINVAL' : 'EINVAL'; // unexpected values count as NBD_EINVAL (proto.md "Error values")
  }
}

enum St {
  MAGIC,
  SIMPLE,
  CHUNK,
  /** Copy `sinkLeft` bytes into `sinkBuf` at `sinkAt`, then run `onSinkDone`. */
  SINK,
}

export interface ConnectionHooks {
  /** The connection is gone (peer closed, error, violation, timeout); `pending` were unanswered. */
  closed(conn: NbdConnection, reason: string, pending: WireRequest[]): void;
  /** A reply arrived (the device drains its queue). */
  progress(conn: NbdConnection): void;
}

export class NbdConnection {
  readonly n: Negotiated;
  readonly #stream: Duplex;
  readonly #hooks: ConnectionHooks;
  readonly #inflight = new Map<number, WireRequest>();
  #inflightBytes = 0;
  #nextCookie = 1;
  #dead = false;
  /** Set once the server answered NBD_ESHUTDOWN: no new requests, leave when idle. */
  draining = false;
  #lastRx = Date.now();
  #corked = false;
  readonly #timer: NodeJS.Timeout | undefined;

  // reply parser
  #st = St.MAGIC;
  readonly #hdr = Buffer.alloc(20);
  #hdrHave = 0;
  #hdrNeed = 4;
  #sinkBuf: Uint8Array = this.#hdr;
  #sinkAt = 0;
  #sinkLeft = 0;
  #onSinkDone: () => void = () => {};
  #cur: WireRequest | undefined;
  #curCookie = 0;
  #curFlags = 0;
  #curType = 0;
  #curLen = 0;
  // direct reads (plain sockets)
  readonly #scratch: Buffer | undefined;
  /** The destination view the socket was last told to read into. */
  #view: Uint8Array | undefined;
  /** READs of DIRECT_MIN bytes or more in flight. */
  #bigReads = 0;

  constructor(n: Negotiated, hooks: ConnectionHooks, requestTimeoutMs: number) {
    this.n = n;
    this.#stream = n.stream;
    this.#hooks = hooks;
    const reader = n.stream === n.raw ? socketReader(n.raw) : undefined;
    if (reader !== undefined) {
      this.#scratch = reader.scratch;
      reader.take(
        () => this.#nextBuffer(),
        (k, b) => this.#onRead(k, b),
      );
    } else this.#stream.on('data', (c: Buffer) => this.#onData(c));
    this.#stream.on('error', (e: Error) => this.#die(`connection error: ${e.message}`));
    this.#stream.on('close', () => this.#die('the server closed the connection'));
    this.#stream.on('end', () => this.#die('the server closed the connection'));
    if (requestTimeoutMs > 0) {
      this.#timer = setInterval(
        () => {
          if (this.#inflight.size > 0 && Date.now() - this.#lastRx > requestTimeoutMs)
            this.#die(`no reply from the server for ${requestTimeoutMs} ms`);
        },
        Math.min(1000, requestTimeoutMs),
      ).unref();
    }
    if (n.rest !== null && n.rest.length > 0) this.#onData(n.rest);
    this.#stream.resume();
  }

  get inflight(): number {
    return this.#inflight.size;
  }

  get inflightBytes(): number {
    return this.#inflightBytes;
  }

  get alive(): boolean {
    return !this.#dead;
  }

  /** Send `r`; its `done` is called when the reply is complete (or never, if the connection dies: see hooks.closed). */
  submit(r: WireRequest): void {
    let cookie = this.#nextCookie;
    while (this.#inflight.has(cookie)) cookie = cookie >= 0xffffffff ? 1 : cookie + 1;
    this.#nextCookie = cookie >= 0xffffffff ? 1 : cookie + 1;
    r.covered = 0;
    r.ranges = undefined;
    r.error = undefined;
    r.extents = undefined;
    // The reply clock starts with the first request after an idle spell, not at the last reply.
    if (this.#inflight.size === 0) this.#lastRx = Date.now();
    this.#inflight.set(cookie, r);
    this.#inflightBytes += r.length;
    if (r.type === NBD_CMD_READ && r.length >= DIRECT_MIN) this.#bigReads++;
    const h = Buffer.allocUnsafe(REQUEST_HEADER_BYTES);
    h.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
    h.writeUInt16BE(r.flags, 4);
    h.writeUInt16BE(r.type, 6);
    h.writeUInt32BE(0, 8);
    h.writeUInt32BE(cookie, 12);
    writeU64(h, 16, r.offset);
    h.writeUInt32BE(r.length, 24);
    // Requests submitted in one tick leave in one writev (a burst of 64 READs is one system call).
    if (!this.#corked) {
      this.#corked = true;
      this.#stream.cork();
      process.nextTick(this.#uncork);
    }
    this.#stream.write(h);
    if (r.type === NBD_CMD_WRITE && r.buf !== undefined) {
      const b = r.buf;
      this.#stream.write(Buffer.isBuffer(b) ? b : Buffer.from(b.buffer, b.byteOffset, b.byteLength));
    }
  }

  readonly #uncork = () => {
    this.#corked = false;
    if (!this.#dead) this.#stream.uncork();
  };

  /** Soft disconnect (NBD_CMD_DISC) then close; requests still in flight go back through hooks.closed. */
  close(): void {
    if (this.#dead) return;
    const h = Buffer.alloc(REQUEST_HEADER_BYTES);
    h.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
    h.writeUInt16BE(NBD_CMD_DISC, 6);
    this.#stream.end(h);
    this.#die('closed by the client');
  }

  /** Hard disconnect. */
  destroy(reason: string): void {
    this.#die(reason);
  }

  #die(reason: string): void {
    if (this.#dead) return;
    this.#dead = true;
    if (this.#timer) clearInterval(this.#timer);
    this.n.stream.destroy();
    this.n.raw.destroy();
    const pending = [...this.#inflight.values()];
    this.#inflight.clear();
    this.#inflightBytes = 0;
    this.#bigReads = 0;
    this.#view = undefined;
    this.#hooks.closed(this, reason, pending);
  }

  #violation(what: string): void {
    this.#die(`protocol violation by the server: ${what}`);
  }

  // ---- reply parser ----

  /** Where the socket's next read goes (asked before every read on a plain socket). */
  #nextBuffer(): Uint8Array {
    const scratch = this.#scratch!;
    if (this.#dead) return scratch;
    if (this.#st === St.SINK) {
      // A payload's tail goes in place too while large READs are in flight (the header reads that
      // follow are exact): only small replies between idle spells are batched through scratch.
      if (this.#sinkBuf !== this.#hdr && (this.#sinkLeft >= DIRECT_MIN || this.#bigReads > 0)) {
        this.#view = this.#sinkBuf.subarray(this.#sinkAt, this.#sinkAt + this.#sinkLeft);
        return this.#view;
      }
      return this.#bigReads > 0 ? scratch.subarray(0, Math.min(this.#sinkLeft, scratch.length)) : scratch;
    }
    if (this.#bigReads === 0) return scratch;
    if (this.#st === St.MAGIC && this.#hdrHave === 0)
      return scratch.subarray(0, this.n.structuredReplies ? DATA_CHUNK_HEAD : FIRST_HEADER_READ);
    // A data chunk's offset follows its header: both in one read.
    const more =
      this.#st === St.CHUNK && this.#hdrHave >= 8 && this.#hdr.readUInt16BE(6) === NBD_REPLY_TYPE_OFFSET_DATA ? 8 : 0;
    return scratch.subarray(0, this.#hdrNeed - this.#hdrHave + more);
  }

  /** `n` bytes arrived at the start of `buf` (a buffer #nextBuffer named). */
  #onRead(n: number, buf: Uint8Array): void {
    if (buf === this.#view) {
      // In place already: only the sink's position moves.
      this.#view = undefined;
      this.#lastRx = Date.now();
      this.#sinkAt += n;
      this.#sinkLeft -= n;
      if (this.#sinkLeft === 0) this.#onSinkDone();
      return;
    }
    this.#onData((buf as Buffer).subarray(0, n));
  }

  #onData(chunk: Buffer): void {
    this.#lastRx = Date.now();
    let pos = 0;
    const end = chunk.length;
    while (pos < end && !this.#dead) {
      if (this.#st === St.SINK) {
        const n = Math.min(this.#sinkLeft, end - pos);
        this.#sinkBuf.set(chunk.subarray(pos, pos + n), this.#sinkAt);
        pos += n;
        this.#sinkAt += n;
        this.#sinkLeft -= n;
        if (this.#sinkLeft === 0) this.#onSinkDone();
        continue;
      }
      const n = Math.min(this.#hdrNeed - this.#hdrHave, end - pos);
      chunk.copy(this.#hdr, this.#hdrHave, pos, pos + n);
      pos += n;
      this.#hdrHave += n;
      if (this.#hdrHave < this.#hdrNeed) break;
      if (this.#st === St.MAGIC) {
        const magic = this.#hdr.readUInt32BE(0);
        if (magic === NBD_SIMPLE_REPLY_MAGIC) {
          this.#st = St.SIMPLE;
          this.#hdrNeed = 16;
        } else if (magic === NBD_STRUCTURED_REPLY_MAGIC && this.n.structuredReplies) {
          this.#st = St.CHUNK;
          this.#hdrNeed = 20;
        } else {
          this.#violation(`bad reply magic 0x${magic.toString(16)}`);
        }
        continue;
      }
      if (this.#st === St.SIMPLE) this.#simpleHeader();
      else this.#chunkHeader();
    }
  }

  #nextMessage(): void {
    this.#st = St.MAGIC;
    this.#hdrHave = 0;
    this.#hdrNeed = 4;
    this.#cur = undefined;
  }

  #lookup(hiAt: number): WireRequest | undefined {
    const hi = this.#hdr.readUInt32BE(hiAt);
    const lo = this.#hdr.readUInt32BE(hiAt + 4);
    const r = hi === 0 ? this.#inflight.get(lo) : undefined;
    if (r === undefined) this.#violation(`reply for unknown cookie ${hi}:${lo}`);
    this.#curCookie = lo;
    return r;
  }

  #sink(buf: Uint8Array, at: number, n: number, then: () => void): void {
    this.#st = St.SINK;
    this.#sinkBuf = buf;
    this.#sinkAt = at;
    this.#sinkLeft = n;
    this.#onSinkDone = then;
    if (n === 0) then();
  }

  #simpleHeader(): void {
    const error = this.#hdr.readUInt32BE(4);
    const r = this.#lookup(8);
    if (r === undefined) return;
    this.#cur = r;
    if (r.type === NBD_CMD_READ && this.n.structuredReplies && error === 0) {
      this.#violation('a simple reply to a READ after structured replies were negotiated');
      return;
    }
    if (error !== 0) {
      r.error = new ServerError(error, `the server failed the request with error ${error}`);
      this.#finish();
      return;
    }
    if (r.type === NBD_CMD_READ) {
      this.#sink(r.buf!, 0, r.length, () => {
        r.covered = r.length;
        this.#finish();
      });
      return;
    }
    this.#finish();
  }

  #chunkHeader(): void {
    const flags = this.#hdr.readUInt16BE(4);
    const type = this.#hdr.readUInt16BE(6);
    const r = this.#lookup(8);
    if (r === undefined) return;
    const len = this.#hdr.readUInt32BE(16);
    this.#cur = r;
    this.#curFlags = flags;
    this.#curType = type;
    this.#curLen = len;
    const bad = (what: string) => this.#violation(what);
    if (type === NBD_REPLY_TYPE_NONE) {
      if (len !== 0 || (flags & NBD_REPLY_FLAG_DONE) === 0) bad('NBD_REPLY_TYPE_NONE with a payload or without DONE');
      else this.#chunkDone();
    } else if (type === NBD_REPLY_TYPE_OFFSET_DATA) {
      if (r.type !== NBD_CMD_READ || len < 9) bad('bad NBD_REPLY_TYPE_OFFSET_DATA');
      else this.#sink(this.#hdr, 0, 8, () => this.#offsetData());
    } else if (type === NBD_REPLY_TYPE_OFFSET_HOLE) {
      if (r.type !== NBD_CMD_READ || len !== 12) bad('bad NBD_REPLY_TYPE_OFFSET_HOLE');
      else this.#sink(this.#hdr, 0, 12, () => this.#offsetHole());
    } else if (type === NBD_REPLY_TYPE_BLOCK_STATUS) {
      if (r.type !== NBD_CMD_BLOCK_STATUS || len < 12 || (len - 4) % 8 !== 0 || len > MAX_STATUS_PAYLOAD)
        bad('bad NBD_REPLY_TYPE_BLOCK_STATUS');
      else {
        const b = Buffer.allocUnsafe(len);
        this.#sink(b, 0, len, () => this.#blockStatus(b));
      }
    } else if ((type & 0x8000) === 0) {
      bad(`unknown reply chunk type ${type}`);
    } else if (len < 6 || len > MAX_ERROR_PAYLOAD) {
      bad(`error chunk of ${len} bytes`);
    } else {
      const b = Buffer.allocUnsafe(len);
      this.#sink(b, 0, len, () => this.#errorChunk(b));
    }
  }

  #offsetData(): void {
    const r = this.#cur!;
    const at = readU64(this.#hdr, 0);
    const n = this.#curLen - 8;
    if (!this.#cover(r, at, n)) return;
    this.#sink(r.buf!, at - r.offset, n, () => this.#chunkDone());
  }

  #offsetHole(): void {
    const r = this.#cur!;
    const at = readU64(this.#hdr, 0);
    const n = this.#hdr.readUInt32BE(8);
    if (n === 0) {
      this.#violation('empty hole');
      return;
    }
    if (!this.#cover(r, at, n)) return;
    r.buf!.fill(0, at - r.offset, at - r.offset + n);
    this.#chunkDone();
  }

  /** Record a content chunk of a READ; false (and a hard disconnect) if it is out of bounds or overlaps. */
  #cover(r: WireRequest, at: number, n: number): boolean {
    if (at < r.offset || at + n > r.offset + r.length) {
      this.#violation('a READ chunk outside the request');
      return false;
    }
    if (r.covered! > 0) {
      r.ranges ??= [];
      for (const [s, e] of r.ranges) {
        if (at < e && at + n > s) {
          this.#violation('overlapping READ chunks');
          return false;
        }
      }
    }
    (r.ranges ??= []).push([at, at + n]);
    r.covered! += n;
    return true;
  }

  #blockStatus(b: Buffer): void {
    const r = this.#cur!;
    const ctx = b.readUInt32BE(0);
    if (ctx === this.n.allocationContext) {
      const ext: RawExtent[] = [];
      for (let p = 4; p < b.length; p += 8) {
        const length = b.readUInt32BE(p);
        if (length === 0) {
          this.#violation('a block status extent of length 0');
          return;
        }
        ext.push({ length, flags: b.readUInt32BE(p + 4) });
      }
      r.extents = ext;
    }
    this.#chunkDone();
  }

  #errorChunk(b: Buffer): void {
    const r = this.#cur!;
    const error = b.readUInt32BE(0);
    const mlen = b.readUInt16BE(4);
    if (mlen > b.length - 6) {
      this.#violation('error message longer than its chunk');
      return;
    }
    if (this.#curType === NBD_REPLY_TYPE_ERROR_OFFSET && b.length < 14 + mlen) {
      this.#violation('short NBD_REPLY_TYPE_ERROR_OFFSET');
      return;
    }
    const msg = b
      .subarray(6, 6 + mlen)
      .toString('utf8')
      .replace(/[^\x20-\x7e]/g, '?');
    if (error === 0) {
      this.#violation('an error chunk with error 0');
      return;
    }
    const where = this.#curType === NBD_REPLY_TYPE_ERROR_OFFSET ? ` at offset ${readU64(b, 6 + mlen)}` : '';
    // Unknown error chunk types (bit 15 set) count as errors too; the stream stays usable (proto.md).
    r.error ??= new ServerError(
      error,
      `the server failed the request with error ${error}${where}${msg ? `: ${msg}` : ''}`,
    );
    this.#chunkDone();
  }

  #chunkDone(): void {
    if ((this.#curFlags & NBD_REPLY_FLAG_DONE) !== 0) this.#finish();
    else this.#nextMessage();
  }

  #finish(): void {
    const r = this.#cur!;
    this.#inflight.delete(this.#curCookie);
    this.#inflightBytes -= r.length;
    if (r.type === NBD_CMD_READ && r.length >= DIRECT_MIN) this.#bigReads--;
    this.#nextMessage();
    let err = r.error ?? null;
    if (err === null && r.type === NBD_CMD_READ && r.covered !== r.length) {
      err = new ServerError(
        NBD_EIO,
        `the server answered a READ of ${r.length} bytes with ${r.covered} (no error chunk)`,
      );
    }
    if (err === null && r.type === NBD_CMD_BLOCK_STATUS && r.extents === undefined) {
      err = new ServerError(NBD_EIO, 'the server answered BLOCK_STATUS without base:allocation extents');
    }
    if (err !== null && err.nbdError === NBD_ESHUTDOWN) this.draining = true;
    r.done(err, r.extents);
    this.#hooks.progress(this);
  }
}

function writeU64(b: Buffer, at: number, v: number): void {
  b.writeUInt32BE(Math.floor(v / 0x100000000), at);
  b.writeUInt32BE(v >>> 0, at + 4);
}

function readU64(b: Buffer, at: number): number {
  return b.readUInt32BE(at) * 0x100000000 + b.readUInt32BE(at + 4);
}
