/**
 * One NBD client connection: owns the socket (raw, then TLS after STARTTLS), the receive queue, the
 * corked reply writer and the state (see states.ts). It runs the phases in order:
 * handshake.ts (greeting, client flags) -> options.ts (option haggling) -> transmission.ts.
 *
 * Disconnects (proto.md "Terminating the transmission phase"): a soft close ends the stream after
 * the last reply (and TLS close_notify); a hard disconnect destroys the socket at once.
 */
import type { Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { logger } from '../util/log.js';
import { greet } from './handshake.js';
import { negotiate } from './options.js';
import { ConnectionClosed, RecvQueue } from '../nbd-wire/recv.js';
import { type ConnState, canTransition } from './states.js';
import { transmit } from './transmission.js';
import type { ExportEntry, NbdTlsMode, ServerContext } from './types.js';

const log = logger('nbd');

/** A peer broke a MUST of the protocol: the connection ends with a hard disconnect. */
export class ProtocolViolation extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ProtocolViolation';
  }
}

let nextId = 1;

export class Connection {
  readonly id = nextId++;
  readonly server: ServerContext;
  readonly raw: Socket;
  socket: Duplex;
  readonly rx: RecvQueue;
  /** TLS policy of the listener that accepted this connection. */
  readonly tlsMode: NbdTlsMode;
  state: ConnState = 'GREETING';

  // Negotiated in the handshake phase.
  noZeroes = false;
  fixedNewstyle = false;
  tlsActive = false;
  structuredReplies = false;
  /** Metadata contexts selected by the last NBD_OPT_SET_META_CONTEXT. */
  meta: { exportName: string; baseAllocationId: number } | null = null;
  optionCount = 0;

  // Transmission phase.
  export: ExportEntry | null = null;
  transmissionFlags = 0;
  inflightRequests = 0;
  inflightBytes = 0;
  #roomWaiter: (() => void) | null = null;
  #idleWaiters: (() => void)[] = [];
  draining = false;
  /** Allocator for WRITE payloads that span receive chunks. */
  readonly payloadAlloc: (n: number) => Buffer;
  /** A WRITE payload the request loop waits for (transmission.ts), watched by checkStall. */
  payloadWait: { since: number; length: number; received: number; progressAt: number } | null = null;
  /** Server-wide budget bytes held by READ replies queued and not yet taken by the peer. */
  replyBudgetBytes = 0;
  #written = 0;
  #writtenAt = 0;

  #corked = false;
  #handshakeTimer: NodeJS.Timeout | null = null;
  readonly done: Promise<void>;

  constructor(server: ServerContext, raw: Socket, handshakeTimeoutMs: number, tlsMode: NbdTlsMode) {
    this.server = server;
    this.raw = raw;
    this.tlsMode = tlsMode;
    this.socket = raw;
    this.payloadAlloc = (n) => server.pool.acquire(n);
    // Small: a reader that needs more (a large WRITE payload) is let through past the mark.
    this.rx = new RecvQueue(2 << 20);
    raw.on('error', (e) => log.debug('socket error', { conn: this.id, error: e.message }));
    if (typeof raw.setNoDelay === 'function') raw.setNoDelay(true);
    if (handshakeTimeoutMs > 0) {
      this.#handshakeTimer = setTimeout(() => {
        log.info('handshake timed out, disconnecting', { conn: this.id, state: this.state });
        this.hardDisconnect();
      }, handshakeTimeoutMs);
      this.#handshakeTimer.unref();
    }
    this.rx.attach(raw);
    this.done = this.#run();
  }

  async #run(): Promise<void> {
    try {
      await greet(this);
      const entered = await negotiate(this);
      if (entered) {
        this.clearHandshakeTimer();
        await transmit(this);
      }
    } catch (e) {
      if (e instanceof ProtocolViolation) {
        log.info('protocol violation, disconnecting', { conn: this.id, state: this.state, reason: e.message });
        this.hardDisconnect();
      } else if (!(e instanceof ConnectionClosed)) {
        log.error('connection failed', {
          conn: this.id,
          state: this.state,
          error: e instanceof Error ? e.message : String(e),
        });
        this.hardDisconnect();
      }
    } finally {
      this.clearHandshakeTimer();
      this.export?.connections.delete(this);
      this.rx.close();
      this.state = 'CLOSED';
      this.#endSocket();
    }
  }

  clearHandshakeTimer(): void {
    if (this.#handshakeTimer) {
      clearTimeout(this.#handshakeTimer);
      this.#handshakeTimer = null;
    }
  }

  /** Move to `to`; an edge missing from the STATES table is a bug, so it throws. */
  transition(to: ConnState): void {
    if (!canTransition(this.state, to)) throw new Error(`nbd: illegal state transition ${this.state} -> ${to}`);
    this.state = to;
  }

  get writable(): boolean {
    return !this.socket.destroyed && this.socket.writable;
  }

  /**
   * Queue bytes for the peer. Writes within one event-loop turn go out in one writev (cork, then uncork in setImmediate). With `pooled`,
   * `buf` goes back to the server's buffer pool once the socket is done with it; `budgetBytes` of the
   * server-wide budget stay held until then (a READ reply the peer does not take keeps its share).
   */
  send(buf: Uint8Array, pooled = false, budgetBytes = 0): void {
    if (!this.writable) {
      if (pooled) this.server.pool.release(buf);
      this.server.budget.release(budgetBytes);
      return;
    }
    if (!this.#corked) {
      this.#corked = true;
      this.socket.cork();
      setImmediate(this.#uncork);
    }
    if (pooled || budgetBytes !== 0) {
      this.replyBudgetBytes += budgetBytes;
      // Called once the bytes are handed to the kernel, or with an error when the socket is destroyed.
      this.socket.write(buf, () => {
        if (pooled) this.server.pool.release(buf);
        if (budgetBytes !== 0) {
          this.replyBudgetBytes -= budgetBytes;
          this.server.budget.release(budgetBytes);
        }
      });
    } else this.socket.write(buf);
  }

  /**
   * Called by the server's sweep (server.ts) every fraction of `stallMs`: drop the connection when
   * the WRITE payload it waits for stopped arriving (or arrives slower than 1 MiB/s after `stallMs`),
   * or when READ replies holding budget were not taken by the peer for `stallMs`. Dropping closes
   * the receive queue, so the request loop gives the payload's budget back; destroyed writes give
   * back the replies'.
   */
  checkStall(now: number, stallMs: number): void {
    const p = this.payloadWait;
    if (p) {
      const got = this.rx.receivedBytes;
      if (got !== p.received) {
        p.received = got;
        p.progressAt = now;
      }
      if (now - p.progressAt > stallMs || now - p.since > stallMs + p.length / 1048.576) {
        log.info('WRITE payload stalled, disconnecting', {
          conn: this.id,
          length: p.length,
          waitedMs: Math.round(now - p.since),
        });
        this.hardDisconnect();
        return;
      }
    }
    const written = this.raw.bytesWritten;
    if (this.replyBudgetBytes === 0 || written !== this.#written) {
      this.#written = written;
      this.#writtenAt = now;
    } else if (now - this.#writtenAt > stallMs) {
      log.info('client does not take its replies, disconnecting', {
        conn: this.id,
        queuedBytes: this.replyBudgetBytes,
      });
      this.hardDisconnect();
    }
  }

  readonly #uncork = (): void => {
    this.#corked = false;
    if (!this.socket.destroyed) this.socket.uncork();
  };

  /** Send and wait until the bytes were handed to the kernel (before STARTTLS takes the socket over). */
  sendNow(buf: Uint8Array): Promise<void> {
    return new Promise((resolve) => {
      if (!this.writable) return resolve();
      if (this.#corked) this.#uncork();
      this.socket.write(buf, () => resolve());
    });
  }

  /** Bytes the socket still holds for the peer (write backpressure). */
  get pendingWriteBytes(): number {
    return this.socket.writableLength;
  }

  hardDisconnect(): void {
    this.rx.close();
    this.state = 'CLOSED';
    this.socket.destroy();
    if (this.socket !== this.raw) this.raw.destroy();
  }

  /** Soft close: end the stream after queued replies (TLS sends close_notify first). */
  #endSocket(): void {
    if (this.socket.destroyed) return;
    this.socket.end();
    // A peer that never reads must not keep the socket forever.
    const t = setTimeout(() => {
      this.socket.destroy();
      this.raw.destroy();
    }, 5000);
    t.unref();
    this.socket.once('close', () => clearTimeout(t));
  }

  // ---- in-flight accounting (transmission.ts) ----

  /**
   * Resolve once `cost` more bytes fit within the per-connection limits: replies the peer has not
   * taken yet stay under maxInflightBytes, and so do the requests being served (one request is always
   * let through when none is in flight, whatever its size). Null when there is room already.
   */
  waitForRoom(cost: number): Promise<void> | null {
    const lim = this.server.limits;
    // Devices often complete in a microtask, so "nothing in flight" says nothing about the peer
    // keeping up: unsent reply bytes are checked on their own.
    const fits = () =>
      this.pendingWriteBytes <= lim.maxInflightBytes &&
      (this.inflightRequests === 0 ||
        (this.inflightBytes + cost <= lim.maxInflightBytes && this.inflightRequests < lim.maxInflightRequests));
    if (fits()) return null;
    const socket = this.socket;
    return new Promise<void>((resolve) => {
      // Woken by a finished request, the socket draining or closing, or drain() (server shutdown).
      const check = () => {
        if (fits() || !this.writable || this.draining) {
          socket.off('drain', check);
          socket.off('close', check);
          this.#roomWaiter = null;
          resolve();
        }
      };
      this.#roomWaiter = check;
      socket.on('drain', check);
      socket.on('close', check);
    });
  }

  /** The request loop waits in waitForRoom (the peer is not taking its replies, or an in-flight limit is reached). */
  get waitingForRoom(): boolean {
    return this.#roomWaiter !== null;
  }

  started(cost: number): void {
    this.inflightRequests++;
    this.inflightBytes += cost;
  }

  finished(cost: number): void {
    this.inflightRequests--;
    this.inflightBytes -= cost;
    this.#roomWaiter?.();
    if (this.inflightRequests === 0) {
      const ws = this.#idleWaiters;
      this.#idleWaiters = [];
      for (const w of ws) w();
    }
  }

  /** Resolve when no request is in flight. */
  idle(): Promise<void> {
    if (this.inflightRequests === 0) return Promise.resolve();
    return new Promise((resolve) => this.#idleWaiters.push(resolve));
  }

  /**
   * Server shutdown or export removal: stop reading requests, let in-flight ones finish and reply,
   * then close. During the handshake the connection is simply closed.
   */
  async drain(): Promise<void> {
    this.draining = true;
    if (this.state === 'TRANSMISSION' || this.state === 'DRAINING') {
      this.rx.close();
      this.#roomWaiter?.();
    } else if (this.state !== 'CLOSED') {
      this.hardDisconnect();
    }
    await this.done;
  }
}
