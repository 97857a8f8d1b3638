/**
 * Receive queue for one NBD connection: socket chunks are queued as they arrive and handed out as
 * exact-length messages. A message that lies inside one chunk is returned as a view of it (no copy:
 * request headers, small writes); a message spanning chunks is copied once into a new buffer.
 *
 * Backpressure: when more than `highWaterBytes` are queued the socket is paused, and resumed when
 * the consumer drains below half of it. The consumer pulls only as fast as it is willing to work.
 */
import type { Duplex } from 'node:stream';

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
    await this.#waitFor(n);
    return this.#take(n, alloc);
  }

  /** Discard `n` bytes as they arrive, without buffering them all (oversized payloads). */
  async skip(n: number): Promise<void> {
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
    if (avail >= n) {
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
