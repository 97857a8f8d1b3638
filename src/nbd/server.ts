/**
 * NbdServer: serves a runtime-changeable set of exports (name -> BlockDevice) over Unix and TCP
 * sockets, with optional TLS through NBD_OPT_STARTTLS (proto.md "TLS support"). Each accepted socket
 * becomes a Connection (connection.ts) that runs the protocol state machine.
 *
 * Shutdown (proto.md "Terminating the transmission phase"): stop accepting, let every connection
 * finish its in-flight requests and close, then flush every writable device. The server never
 * closes devices: their owner does after `removeExport` or `close` resolves.
 *
 * @example
 * const server = new NbdServer();
 * server.addExport('disk', { device: new MemoryDevice({ sizeBytes: 1 << 30 }) });
 * await server.listenUnix('/run/cryptmap/nbd.sock');
 * // nbdinfo 'nbd+unix:///disk?socket=/run/cryptmap/nbd.sock'
 * await server.close();
 */
import { unlinkSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { createSecureContext, type SecureContext } from 'node:tls';
import { CryptmapError, EXIT_BUSY, fromSystemError } from '../util/errors.js';
import { logger } from '../util/log.js';
import { enlargeUnixSendBuffer } from '../util/sockbuf.js';
import { listenUnixSocket } from '../util/unix-socket.js';
import { adoptSocket } from '../nbd-wire/recv.js';
import { Connection } from './connection.js';
import { PayloadBudget } from './budget.js';
import { BufferPool } from './pool.js';
import type {
  ExportEntry,
  NbdExport,
  NbdListenOptions,
  NbdServerOptions,
  NbdTlsMode,
  ResolvedLimits,
  ServerContext,
} from './types.js';

const log = logger('nbd');
const MAX_NAME_BYTES = 4096;
const TLS_MODES: readonly NbdTlsMode[] = ['off', 'on', 'require'];

/**
 * One listening socket and its own policy: TLS mode and connection caps. Unix and TCP listeners
 * never share a cap, so a flood on one (TCP) cannot lock the other (local attach) out.
 */
interface Listener {
  server: Server;
  path?: string;
  tls: NbdTlsMode;
  maxConnections: number;
  /** TCP only: cap per peer address (0 for Unix sockets, where every peer is local). */
  maxPerPeer: number;
  connections: Set<Connection>;
  perPeer: Map<string, number>;
  refused: number;
}

/**
 * An NBD server (fixed newstyle) for any number of exports over Unix and TCP listeners.
 * @example
 *   const server = new NbdServer();
 *   server.addExport('disk', { device });
 *   await server.listenUnix('/run/x/nbd.sock');
 *   // ... nbd+unix:///disk?socket=/run/x/nbd.sock
 *   await server.close();
 */
export class NbdServer {
  readonly #exports = new Map<string, ExportEntry>();
  readonly #listeners: Listener[] = [];
  readonly #connections = new Set<Connection>();
  readonly #limits: ResolvedLimits;
  readonly #tlsMode: NbdTlsMode;
  readonly #secureContext: SecureContext | undefined;
  readonly #verifyClient: boolean;
  readonly #maxConnections: number;
  readonly #maxConnectionsPerPeer: number;
  readonly #handshakeTimeoutMs: number;
  readonly #stallTimeoutMs: number;
  #sweepTimer: NodeJS.Timeout | null = null;
  readonly #defaultExport: string | undefined;
  #shuttingDown = false;
  #closed: Promise<void> | null = null;
  readonly #ctx: ServerContext;

  constructor(opts: NbdServerOptions = {}) {
    const num = (v: number | undefined, def: number, min: number, max: number, what: string) => {
      const n = v ?? def;
      if (!Number.isSafeInteger(n) || n < min || n > max)
        throw new CryptmapError('ENBDOPT', `NBD server option ${what}=${n} is out of range ${min}..${max}`);
      return n;
    };
    this.#limits = {
      maxPayloadBytes: num(opts.maxPayloadBytes, 32 << 20, 4096, 0x7fffffff, 'maxPayloadBytes'),
      maxInflightBytes: num(opts.maxInflightBytes, 64 << 20, 1 << 20, 2 ** 40, 'maxInflightBytes'),
      maxInflightRequests: num(opts.maxInflightRequests, 256, 1, 65536, 'maxInflightRequests'),
      maxOptionBytes: num(opts.maxOptionBytes, 64 << 10, 4096 + 32, 16 << 20, 'maxOptionBytes'),
      maxOptions: num(opts.maxOptions, 256, 8, 1 << 20, 'maxOptions'),
      sparseReads: opts.sparseReads ?? true,
    };
    this.#maxConnections = num(opts.maxConnections, 1024, 1, 1 << 20, 'maxConnections');
    this.#maxConnectionsPerPeer = num(opts.maxConnectionsPerPeer, 64, 1, 1 << 20, 'maxConnectionsPerPeer');
    this.#handshakeTimeoutMs = num(opts.handshakeTimeoutMs, 30_000, 0, 2 ** 31 - 1, 'handshakeTimeoutMs');
    this.#stallTimeoutMs = num(opts.stallTimeoutMs, 10_000, 0, 2 ** 31 - 1, 'stallTimeoutMs');
    this.#tlsMode = opts.tls ?? 'off';
    if (!TLS_MODES.includes(this.#tlsMode))
      throw new CryptmapError('ENBDTLS', `NBD TLS mode '${this.#tlsMode}' is not off, on or require`);
    if (this.#tlsMode !== 'off' && !opts.tlsCredentials)
      throw new CryptmapError('ENBDTLS', `NBD TLS mode '${this.#tlsMode}' needs tlsCredentials (key and cert)`);
    if (opts.tlsCredentials) {
      const c = opts.tlsCredentials;
      try {
        this.#secureContext = createSecureContext({ key: c.key, cert: c.cert, ca: c.ca, minVersion: 'TLSv1.2' });
      } catch (e) {
        throw new CryptmapError(
          'ENBDTLS',
          `cannot load the NBD TLS key or certificate: ${e instanceof Error ? e.message : String(e)}`,
          { cause: e },
        );
      }
      this.#verifyClient = c.verifyClient ?? false;
      if (this.#verifyClient && !c.ca)
        throw new CryptmapError('ENBDTLS', 'NBD TLS verifyClient needs a CA certificate (tlsCredentials.ca)');
    } else {
      this.#verifyClient = false;
    }
    this.#defaultExport = opts.defaultExport;
    const self = this;
    this.#ctx = {
      limits: this.#limits,
      get shuttingDown() {
        return self.#shuttingDown;
      },
      lookup: (name) => {
        const e = this.#exports.get(name === '' && this.#defaultExport !== undefined ? this.#defaultExport : name);
        return e && !e.removing ? e : undefined;
      },
      list: () => [...this.#exports.values()].filter((e) => !e.removing),
      secureContext: this.#secureContext,
      verifyClient: this.#verifyClient,
      pool: new BufferPool(num(opts.bufferPoolBytes, 64 << 20, 0, 2 ** 40, 'bufferPoolBytes')),
      budget: new PayloadBudget(
        num(opts.maxServerInflightBytes, 256 << 20, 1 << 20, 2 ** 40, 'maxServerInflightBytes'),
      ),
    };
  }

  /** Serve `exp.device` as `name`. Throws EEXIST when the name is taken. */
  addExport(name: string, exp: NbdExport): void {
    if (this.#shuttingDown)
      throw new CryptmapError('ENBDSHUTDOWN', 'NBD server is shutting down', { errno: 'ESHUTDOWN' });
    if (Buffer.byteLength(name, 'utf8') > MAX_NAME_BYTES || name.includes('\0')) {
      throw new CryptmapError('ENBDNAME', `NBD export name is longer than ${MAX_NAME_BYTES} bytes or contains NUL`);
    }
    if (this.#exports.has(name))
      throw new CryptmapError('ENBDEXISTS', `NBD export '${name}' already exists`, {
        errno: 'EEXIST',
        exitCode: EXIT_BUSY,
      });
    const lbs = exp.device.limits.logicalBlockBytes;
    if (!(lbs > 0 && (lbs & (lbs - 1)) === 0 && lbs <= 65536)) {
      throw new CryptmapError(
        'ENBDBLOCK',
        `NBD export '${name}': logical block size ${lbs} is not a power of two up to 64 KiB`,
      );
    }
    this.#exports.set(name, {
      name,
      device: exp.device,
      description: exp.description,
      readOnly: exp.readOnly ?? false,
      connections: new Set(),
      removing: false,
    });
  }

  /**
   * Stop serving `name`: new clients no longer see it, connected clients finish their in-flight
   * requests and are disconnected, then the device is flushed. Resolves when it is no longer used.
   */
  async removeExport(name: string): Promise<void> {
    const e = this.#exports.get(name);
    if (!e) throw new CryptmapError('ENBDNOEXPORT', `NBD export '${name}' does not exist`, { errno: 'ENOENT' });
    if (e.removing)
      throw new CryptmapError('ENBDBUSY', `NBD export '${name}' is already being removed`, {
        errno: 'EBUSY',
        exitCode: EXIT_BUSY,
      });
    e.removing = true;
    try {
      await Promise.all([...e.connections].map((c) => c.drain()));
      await flushQuietly(e);
    } finally {
      this.#exports.delete(name);
    }
  }

  /** READ/WRITE payload bytes in flight across all connections (bounded by maxServerInflightBytes). */
  get payloadBytesInFlight(): number {
    return this.#ctx.budget.usedBytes;
  }

  /** Of payloadBytesInFlight, the READ replies queued for peers that have not taken them yet. */
  get replyBytesQueued(): number {
    let n = 0;
    for (const c of this.#connections) n += c.replyBudgetBytes;
    return n;
  }

  /**
   * Connections whose request loop is held back by the per-connection limits: their peer is not
   * taking its replies, or too much is in flight on them. With payloadBytesInFlight equal to
   * replyBytesQueued (no request being served), such a connection stays as it is until its peer
   * reads, or until stallTimeoutMs drops it.
   */
  get connectionsWaitingForRoom(): number {
    let n = 0;
    for (const c of this.#connections) if (c.waitingForRoom) n++;
    return n;
  }

  /** True when an export is called `name`. */
  hasExport(name: string): boolean {
    return this.#exports.has(name);
  }

  /** The export names (what NBD_OPT_LIST answers). */
  exportNames(): string[] {
    return [...this.#exports.keys()];
  }

  /** Clients in the transmission phase on `name` (for "device busy" decisions). */
  connectionCount(name?: string): number {
    if (name === undefined) return this.#connections.size;
    return this.#exports.get(name)?.connections.size ?? 0;
  }

  /**
   * Listen on a Unix socket. A stale socket file (nobody accepting) is replaced; a live one is EBUSY.
   * The socket gets `mode` (default 0600: root or the daemon's user only).
   */
  async listenUnix(path: string, opts: { mode?: number } & NbdListenOptions = {}): Promise<void> {
    const l = this.#listener(opts, false);
    await listenUnixSocket(l.server, path, opts.mode ?? 0o600, {
      code: 'ENBDLISTEN',
      live: (p) =>
        new CryptmapError('ENBDLISTEN', `${p} is in use by another server`, { errno: 'EBUSY', exitCode: EXIT_BUSY }),
      notSocket: (p) => new CryptmapError('ENBDLISTEN', `${p} exists and is not a socket`, { errno: 'EEXIST' }),
    });
    l.path = path;
    this.#listeners.push(l);
    this.#startSweep();
  }

  /** Listen on TCP; port 0 picks a free port. Returns the bound address. */
  async listenTcp(
    port: number,
    host = '127.0.0.1',
    opts: NbdListenOptions = {},
  ): Promise<{ host: string; port: number }> {
    const l = this.#listener(opts, true);
    await listen(l.server, () => l.server.listen(port, host), `listen on ${host}:${port}`);
    this.#listeners.push(l);
    this.#startSweep();
    const a = l.server.address();
    if (!a || typeof a === 'string') throw new CryptmapError('ENBDLISTEN', 'TCP listener has no address');
    return { host: a.address, port: a.port };
  }

  #listener(opts: NbdListenOptions, tcp: boolean): Listener {
    const tls = opts.tls ?? this.#tlsMode;
    if (!TLS_MODES.includes(tls)) throw new CryptmapError('ENBDTLS', `NBD TLS mode '${tls}' is not off, on or require`);
    if (tls !== 'off' && !this.#secureContext)
      throw new CryptmapError('ENBDTLS', `NBD TLS mode '${tls}' needs tlsCredentials (key and cert)`);
    const cap = (v: number | undefined, def: number, what: string) => {
      const n = v ?? def;
      if (!Number.isSafeInteger(n) || n < 1 || n > 1 << 20)
        throw new CryptmapError('ENBDOPT', `NBD listener option ${what}=${n} is out of range 1..${1 << 20}`);
      return n;
    };
    const l: Listener = {
      server: createServer({ pauseOnConnect: true, noDelay: true }, (sock) => this.#accept(l, sock)),
      tls,
      maxConnections: cap(opts.maxConnections, this.#maxConnections, 'maxConnections'),
      maxPerPeer: tcp ? cap(opts.maxConnectionsPerPeer, this.#maxConnectionsPerPeer, 'maxConnectionsPerPeer') : 0,
      connections: new Set(),
      perPeer: new Map(),
      refused: 0,
    };
    l.server.on('error', (e) => log.error('listener error', { error: e.message }));
    return l;
  }

  #accept(l: Listener, sock: Socket): void {
    // The peer's address, for the per-peer cap ("::ffff:127.0.0.1" and "127.0.0.1" are one peer).
    const peer = l.maxPerPeer > 0 ? (sock.remoteAddress ?? '?').replace(/^::ffff:/, '') : '';
    const reason = this.#shuttingDown
      ? 'shutting down'
      : l.connections.size >= l.maxConnections
        ? 'too many connections on this listener'
        : l.maxPerPeer > 0 && (l.perPeer.get(peer) ?? 0) >= l.maxPerPeer
          ? 'too many connections from this peer'
          : null;
    if (reason) {
      // One line for the first refusal and then one per 1000: a flood must not flood the log.
      if (l.refused++ % 1000 === 0)
        log.info('refusing connection', { reason, ...(peer ? { peer } : {}), refusedSoFar: l.refused });
      sock.on('error', () => {});
      sock.destroy();
      return;
    }
    // Re-wrapped so that WRITE payloads can be read straight into their buffers (RecvQueue.direct).
    const adopted = adoptSocket(sock);
    // Replies of 256 KiB and more leave in fewer, larger writes (util/sockbuf.ts; Unix sockets only).
    enlargeUnixSendBuffer(adopted);
    const conn = new Connection(this.#ctx, adopted, this.#handshakeTimeoutMs, l.tls);
    this.#connections.add(conn);
    l.connections.add(conn);
    if (l.maxPerPeer > 0) l.perPeer.set(peer, (l.perPeer.get(peer) ?? 0) + 1);
    void conn.done.finally(() => {
      this.#connections.delete(conn);
      l.connections.delete(conn);
      if (l.maxPerPeer > 0) {
        const n = (l.perPeer.get(peer) ?? 1) - 1;
        if (n === 0) l.perPeer.delete(peer);
        else l.perPeer.set(peer, n);
      }
    });
  }

  /**
   * One timer for the whole server checks every connection for a stalled WRITE payload or replies
   * nobody takes (Connection.checkStall): nothing is armed per request.
   */
  #startSweep(): void {
    if (this.#sweepTimer || this.#stallTimeoutMs === 0) return;
    const every = Math.max(20, Math.min(1000, Math.floor(this.#stallTimeoutMs / 4)));
    this.#sweepTimer = setInterval(() => {
      const now = performance.now();
      for (const c of this.#connections) c.checkStall(now, this.#stallTimeoutMs);
    }, every);
    this.#sweepTimer.unref();
  }

  /** Clean shutdown: stop accepting, drain every connection, flush writable devices. Idempotent. */
  close(): Promise<void> {
    if (!this.#closed) this.#closed = this.#close();
    return this.#closed;
  }

  async #close(): Promise<void> {
    this.#shuttingDown = true;
    if (this.#sweepTimer) clearInterval(this.#sweepTimer);
    this.#sweepTimer = null;
    const closing = this.#listeners.map(
      (l) =>
        new Promise<void>((resolve) => {
          l.server.close(() => resolve());
        }),
    );
    await Promise.all([...this.#connections].map((c) => c.drain()));
    await Promise.all(closing);
    for (const l of this.#listeners) {
      if (l.path) {
        try {
          unlinkSync(l.path);
        } catch {
          // already gone
        }
      }
    }
    await Promise.all([...this.#exports.values()].map((e) => flushQuietly(e)));
  }
}

async function flushQuietly(e: ExportEntry): Promise<void> {
  if (!e.device.capabilities.write || e.readOnly) return;
  try {
    await e.device.flush();
  } catch (err) {
    log.error('flush failed while closing export', {
      export: e.name,
      error: err instanceof Error ? err.message : String(err),
    });
  }
}

function listen(server: Server, start: () => void, what: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (e: Error) => reject(fromSystemError('ENBDLISTEN', `NBD server cannot ${what}`, e));
    server.once('error', onError);
    server.once('listening', () => {
      server.off('error', onError);
      resolve();
    });
    start();
  });
}
