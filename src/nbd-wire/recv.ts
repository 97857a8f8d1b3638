/**
 * Receive queue for one NBD connection: socket chunks are queued as they arrive and handed out as
 * exact-length messages. A message that lies inside one chunk is returned as a view of it (no copy:
 * request headers, small writes); a message spanning chunks is copied once into a new buffer.
 *
 * Direct reads (`direct`, on a socket `adoptSocket` made): the queue names where each socket read
 * lands (Node's `onread`) instead of taking a fresh 64 KiB chunk per read. A payload of
 * DIRECT_MIN_BYTES or more that is not queued whole is read by the socket straight into the buffer
 * `alloc` made for it, so the kernel's copy out of the socket is the only one (and no fresh pages
 * are faulted in per read); everything else is read into a reused scratch buffer. While payloads
 * stream this way (a run of large WRITEs), the reads between them take exactly one header, so the
 * payload after it is not pulled into scratch; two headers in a row (READs) end that, and reads
 * fill scratch again (many small requests per system call).
 *
 * Backpressure: when more than `highWaterBytes` are queued the socket is paused, and resumed when
 * the consumer drains below half of it. The consumer pulls only as fast as it is willing to work.
 */
import { Socket, type SocketConstructorOpts } from 'node:net';
import type { Duplex } from 'node:stream';

/** Payloads at least this large are read by the socket straight into their buffer (direct mode). */
export const DIRECT_MIN_BYTES = 16 << 10;
/** Bytes of the scratch buffer direct-mode reads fill when no payload is due. */
const SCRATCH_BYTES = 64 << 10;
/** A read after a whole header, before the consumer saw it (the payload's buffer is not known yet). */
const STALE_READ_BYTES = 4096;
/** Where a payload read with its header starts in its buffer (the header just before it). */
const SPEC_HEADROOM_BYTES = 64;
/** Largest payload read with its header (it is allocated before the server's budget is asked). */
const SPEC_MAX_BYTES = 1 << 20;
/** Least room a read into scratch is given behind queued bytes (else the read takes a fresh scratch). */
const SCRATCH_MIN_READ_BYTES = 16 << 10;

/** Who says where an adopted socket's reads land (see adoptSocket). */
interface SocketReader {
  take(next: () => Uint8Array, got: (n: number, buf: Uint8Array) => void): void;
}
const readers = new WeakMap<Duplex, SocketReader>();

/**
 * The same connection as `accepted` (a socket net.Server handed over, which has no `onread`), as a
 * socket whose reads land where a reader says: until a RecvQueue takes it over (`direct`), in a
 * scratch buffer whose bytes are emitted as ordinary 'data' events (copies), so the handshake and a
 * STARTTLS upgrade see it as any socket. Returns `accepted` itself when it has no handle to move.
 */
export function adoptSocket(accepted: Socket): Socket {
  const a = accepted as unknown as { _handle: unknown };
  const handle = a._handle;
  if (handle === null || handle === undefined) return accepted;
  const scratch = Buffer.allocUnsafe(SCRATCH_BYTES);
  let next: () => Uint8Array = () => scratch;
  let got = (n: number, buf: Uint8Array) => {
    s.emit('data', Buffer.from(buf.subarray(0, n)));
  };
  // The old wrapper lets go of the handle; destroying it settles net.Server's connection count.
  a._handle = null;
  accepted.destroy();
  const s: Socket = new Socket({
    handle,
    readable: true,
    writable: true,
    onread: {
      buffer: () => next(),
      callback: (n: number, buf: Uint8Array) => {
        got(n, buf);
        return true;
      },
    },
  } as SocketConstructorOpts);
  readers.set(s, {
    take(nx, g) {
      next = nx;
      got = g;
    },
  });
  return s;
}

/** A payload read with its header (RecvQueue #gotSpeculative): it starts at stream position `at`. */
interface Early {
  buf: Buffer;
  at: number;
  ready: boolean;
}

export class ConnectionClosed extends Error {
  constructor() {
    super('connection closed');
    this.name = 'ConnectionClosed';
  }
}

export class RecvQueue {
  #chunks: Buffer[] = [];
  #head = 0; // read position inside #chunks[0]
  #queued = 0;
  #received = 0;
  #need = 0; // bytes the pending reader waits for (0: none)
  #wake: (() => void) | null = null;
  #closed = false;
  #paused = false;
  #source: Duplex | null = null;
  readonly #highWaterBytes: number;
  readonly #onData = (chunk: Buffer) => this.push(chunk);
  // direct mode (see the module comment)
  #scratch: Buffer | undefined;
  /** The payload being read in place: its buffer, how far it is filled, and who waits for it. */
  #sink: { buf: Buffer; at: number; done: () => void } | undefined;
  /** The view of #sink the socket was last told to read into. */
  #view: Uint8Array | undefined;
  /** Bytes of one header: while payloads stream, the reads between them take only this much. */
  #headerBytes = 0;
  #streaming = false;
  /** The last message taken was a header (no payload after it yet). */
  #afterHeader = false;
  /** Payload bytes announced by a header (0: none follows), for reads that take both at once. */
  #payloadOf: ((header: Buffer) => number) | undefined;
  #alloc: ((n: number) => Buffer) | undefined;
  /** Bytes of the last payload read in place: the next header is expected to announce as many. */
  #lastPayload = 0;
  /** The buffer the socket was told to read a header and its payload into (see #nextBuffer). */
  #spec: Buffer | undefined;
  /** A payload that arrived with its header, before the consumer asked for it (claimed by read()). */
  #early: Early | undefined;
  /** Bytes taken out of the queue so far (where in the stream the consumer is). */
  #taken = 0;
  readonly #onEnd = () => this.close();

  constructor(highWaterBytes: number) {
    this.#highWaterBytes = highWaterBytes;
  }

  /** Start taking data from `source` (a net or TLS socket). */
  attach(source: Duplex): void {
    this.#source = source;
    source.on('data', this.#onData);
    source.on('end', this.#onEnd);
    source.on('close', this.#onEnd);
    if (this.#paused) source.pause();
  }

  /**
   * Stop taking data from the current source (STARTTLS hands the raw socket to TLS). Bytes already
   * queued are returned so the caller can give them back to the stream (`unshift`).
   */
  detach(): Buffer | null {
    const src = this.#source;
    if (src) {
      src.off('data', this.#onData);
      src.off('end', this.#onEnd);
      src.off('close', this.#onEnd);
      src.pause();
    }
    this.#source = null;
    const rest = this.#queued > 0 ? this.#take(this.#queued) : null;
    this.#paused = false;
    return rest;
  }

  /**
   * Switch to direct reads if `source` (the attached source) is a socket adoptSocket made; `headerBytes`
   * is the size of the messages between payloads. False (nothing changes) for other streams (TLS).
   */
  direct(
    source: Duplex,
    headerBytes: number,
    payload?: { of: (header: Buffer) => number; alloc: (n: number) => Buffer },
  ): boolean {
    const reader = readers.get(source);
    if (reader === undefined || source !== this.#source) return false;
    this.#headerBytes = headerBytes;
    this.#payloadOf = payload?.of;
    this.#alloc = payload?.alloc;
    this.#scratch = Buffer.allocUnsafe(SCRATCH_BYTES);
    reader.take(
      () => this.#nextBuffer(),
      (n, buf) => this.#got(n, buf),
    );
    return true;
  }

  /** Where the socket's next read goes (direct mode). */
  #nextBuffer(): Uint8Array {
    const sink = this.#sink;
    if (sink !== undefined && !this.#closed) {
      this.#view = sink.buf.subarray(sink.at);
      return this.#view;
    }
    if (
      this.#streaming &&
      this.#queued === 0 &&
      this.#early === undefined &&
      this.#lastPayload > 0 &&
      this.#lastPayload <= SPEC_MAX_BYTES &&
      this.#alloc !== undefined &&
      !this.#closed
    ) {
      // A run of large payloads: the next header most likely announces one of the same size, so
      // one read takes both, the header just before the payload in one pooled buffer (which puts the
      // payload at a 64-byte offset). #got checks the header; if it announces something else, the
      // bytes are queued as any others.
      const spec = this.#alloc(SPEC_HEADROOM_BYTES + this.#lastPayload);
      this.#spec = spec;
      return spec.subarray(SPEC_HEADROOM_BYTES - this.#headerBytes);
    }
    let scratch = this.#scratch!;
    // Queued bytes still in scratch must not be overwritten: the next read lands after the last of
    // them (a header waiting for the consumer is 28 bytes), or in a fresh buffer when too little of
    // scratch is left. A fresh 64 KiB buffer per request cost an allocation, page faults and GC work.
    let start = 0;
    for (const c of this.#chunks) {
      if (c.buffer === scratch.buffer) start = Math.max(start, c.byteOffset - scratch.byteOffset + c.length);
    }
    if (start > SCRATCH_BYTES - SCRATCH_MIN_READ_BYTES) {
      scratch = this.#scratch = Buffer.allocUnsafe(SCRATCH_BYTES);
      start = 0;
    }
    if (this.#streaming) {
      // Exactly the rest of the next header; once it is here and not taken yet (the consumer runs
      // after this read), a short read, so that little of the payload after it lands in scratch.
      if (this.#queued < this.#headerBytes) return scratch.subarray(start, start + this.#headerBytes - this.#queued);
      if (this.#queued < this.#headerBytes + STALE_READ_BYTES) return scratch.subarray(start, start + STALE_READ_BYTES);
    }
    return start === 0 ? scratch : scratch.subarray(start);
  }

  /**
   * `n` bytes arrived at the start of `buf` (direct mode). Node asks for the next buffer right after
   * this callback, before the consumer ran, so a read chosen before a payload was due may still land
   * in scratch: its bytes are copied into the payload, and what follows the payload is queued.
   */
  #got(n: number, buf: Uint8Array): void {
    const spec = this.#spec;
    this.#spec = undefined;
    if (this.#closed || n <= 0) return;
    if (spec !== undefined && buf.buffer === spec.buffer) {
      this.#gotSpeculative(n, spec);
      return;
    }
    const sink = this.#sink;
    if (sink === undefined) {
      this.push((buf as Buffer).subarray(0, n));
      return;
    }
    let m = n;
    if (buf === this.#view) this.#view = undefined;
    else {
      m = Math.min(n, sink.buf.length - sink.at);
      sink.buf.set(buf.subarray(0, m), sink.at);
    }
    sink.at += m;
    this.#received += m;
    if (sink.at === sink.buf.length) {
      this.#sink = undefined;
      sink.done();
    }
    if (m < n) this.push((buf as Buffer).subarray(m, n));
  }

  /** `n` bytes of a read into `spec` (a header and the payload it was expected to announce). */
  #gotSpeculative(n: number, spec: Buffer): void {
    const h = this.#headerBytes;
    const at = SPEC_HEADROOM_BYTES - h;
    const header = spec.subarray(at, SPEC_HEADROOM_BYTES);
    if (n < h || this.#payloadOf!(header) !== spec.length - SPEC_HEADROOM_BYTES) {
      this.push(spec.subarray(at, at + n));
      return;
    }
    const payload = spec.subarray(SPEC_HEADROOM_BYTES);
    const early: Early = { buf: payload, at: this.#taken + this.#queued + h, ready: false };
    this.#early = early;
    this.#received += n - h;
    this.#sink = {
      buf: payload,
      at: n - h,
      done: () => {
        early.ready = true;
      },
    };
    if (n - h === payload.length) {
      this.#sink = undefined;
      early.ready = true;
    }
    // The header goes to the consumer as any message; the payload waits for its read().
    this.push(header);
  }

  get queuedBytes(): number {
    return this.#queued;
  }

  /** Bytes taken from the source so far (progress of a payload being received). */
  get receivedBytes(): number {
    return this.#received;
  }

  get closed(): boolean {
    return this.#closed;
  }

  push(chunk: Buffer): void {
    if (this.#closed || chunk.length === 0) return;
    this.#chunks.push(chunk);
    this.#queued += chunk.length;
    this.#received += chunk.length;
    // Pause only when nobody waits for more than is queued (a large WRITE payload may exceed the mark).
    if (this.#queued > this.#highWaterBytes && !this.#paused && this.#queued >= this.#need) {
      this.#paused = true;
      this.#source?.pause();
    }
    if (this.#wake && this.#queued >= this.#need) {
      const w = this.#wake;
      this.#wake = null;
      w();
    }
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#wake) {
      const w = this.#wake;
      this.#wake = null;
      w();
    }
  }

  /** Exactly `n` bytes, or null when they are not queued yet. */
  tryRead(n: number, alloc?: (n: number) => Buffer): Buffer | null {
    const early = this.#early;
    if (early !== undefined && this.#taken === early.at) {
      if (alloc !== undefined && early.buf.length === n) {
        if (!early.ready) return null;
        this.#early = undefined;
        this.#afterHeader = false;
        this.#lastPayload = n;
        return early.buf;
      }
      this.#early = undefined;
      this.#unclaim(early);
    }
    if (this.#queued < n) return null;
    return this.#take(n, alloc);
  }

  /**
   * Exactly `n` bytes; rejects with ConnectionClosed when the peer goes away first. `alloc` makes
   * the buffer when the bytes span several chunks (a view of one chunk needs none).
   */
  async read(n: number, alloc?: (n: number) => Buffer): Promise<Buffer> {
    const b = this.tryRead(n, alloc);
    if (b) return b;
    if (alloc !== undefined && this.#scratch !== undefined && n >= DIRECT_MIN_BYTES && !this.#closed)
      return this.#readInPlace(n, alloc);
    await this.#waitFor(n);
    return this.#take(n, alloc);
  }

  /** A payload read by the socket straight into its buffer, after what is queued already. */
  #readInPlace(n: number, alloc: (n: number) => Buffer): Promise<Buffer> {
    const early = this.#early;
    if (early !== undefined) {
      this.#early = undefined;
      if (this.#taken === early.at && early.buf.length === n && this.#sink?.buf === early.buf) {
        // The payload is arriving in the buffer its header came in: wait for the rest of it.
        this.#afterHeader = false;
        this.#lastPayload = n;
        const sink = this.#sink;
        return new Promise<Buffer>((resolve, reject) => {
          sink.done = () => {
            this.#wake = null;
            resolve(early.buf);
          };
          this.#wake = () => {
            if (this.#sink !== undefined && this.#closed) {
              this.#sink = undefined;
              reject(new ConnectionClosed());
            }
          };
          this.#maybeResume(true);
        });
      }
      this.#unclaim(early);
    }
    const out = alloc(n);
    const have = this.#queued;
    if (have > 0) {
      const head = this.#take(have);
      out.set(head, 0);
    }
    this.#afterHeader = false;
    this.#streaming = true;
    this.#lastPayload = n;
    return new Promise<Buffer>((resolve, reject) => {
      this.#sink = {
        buf: out,
        at: have,
        done: () => {
          this.#wake = null;
          resolve(out);
        },
      };
      // close() wakes the waiter: a sink not filled by then fails.
      this.#wake = () => {
        if (this.#sink !== undefined && this.#closed) {
          this.#sink = undefined;
          reject(new ConnectionClosed());
        }
      };
      this.#maybeResume(true);
    });
  }

  /**
   * A payload read with its header that the consumer does not take as one (skip, a read of another
   * length): its bytes go to the front of the queue, where they are in the stream.
   */
  #unclaim(early: Early): void {
    let have = early.buf.length;
    if (this.#sink?.buf === early.buf) {
      have = this.#sink.at;
      this.#sink = undefined;
    }
    if (have === 0) return;
    if (this.#head > 0) {
      this.#chunks[0] = this.#chunks[0]!.subarray(this.#head);
      this.#head = 0;
    }
    this.#chunks.unshift(early.buf.subarray(0, have));
    this.#queued += have;
  }

  /** Discard `n` bytes as they arrive, without buffering them all (oversized payloads). */
  async skip(n: number): Promise<void> {
    const early = this.#early;
    if (early !== undefined) {
      this.#early = undefined;
      this.#unclaim(early);
    }
    while (n > 0) {
      if (this.#queued === 0) await this.#waitFor(1);
      const first = this.#chunks[0]!;
      const m = Math.min(n, first.length - this.#head);
      this.#advance(m);
      n -= m;
    }
  }

  #waitFor(n: number): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const check = () => {
        if (this.#queued >= n) {
          this.#need = 0;
          resolve();
        } else if (this.#closed) {
          this.#need = 0;
          reject(new ConnectionClosed());
        } else {
          this.#need = n;
          this.#wake = check;
          // A consumer waiting for more than the high-water mark must still get data.
          this.#maybeResume(true);
        }
      };
      check();
    });
  }

  #take(n: number, alloc?: (n: number) => Buffer): Buffer {
    const first = this.#chunks[0];
    if (n === 0 || !first) return Buffer.alloc(0);
    const avail = first.length - this.#head;
    let out: Buffer;
    if (this.#scratch !== undefined) {
      // Direct mode: two headers in a row end a payload stream; a payload never stays a view of
      // scratch (the device may keep it past the next read).
      if (alloc === undefined) {
        if (this.#afterHeader) this.#streaming = false;
        this.#afterHeader = true;
      } else this.#afterHeader = false;
    }
    if (avail >= n && (alloc === undefined || this.#scratch === undefined)) {
      out = first.subarray(this.#head, this.#head + n);
      this.#advance(n);
    } else {
      out = alloc ? alloc(n) : Buffer.allocUnsafe(n);
      let done = 0;
      while (done < n) {
        const c = this.#chunks[0]!;
        const m = Math.min(n - done, c.length - this.#head);
        c.copy(out, done, this.#head, this.#head + m);
        done += m;
        this.#advance(m);
      }
    }
    return out;
  }

  #advance(m: number): void {
    this.#taken += m;
    this.#head += m;
    this.#queued -= m;
    if (this.#head === this.#chunks[0]!.length) {
      this.#chunks.shift();
      this.#head = 0;
    }
    this.#maybeResume(false);
  }

  #maybeResume(force: boolean): void {
    if (this.#paused && (force || this.#queued <= this.#highWaterBytes >>> 1)) {
      this.#paused = false;
      this.#source?.resume();
    }
  }
}
