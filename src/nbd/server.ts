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
import { chmodSync, unlinkSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { createSecureContext, type SecureContext } from 'node:tls';
import { CryptmapError, EXIT_BUSY, fromSystemError } from '../util/errors.js';
import { logger } from '../util/log.js';
import { clearStaleSocket } from '../util/unix-socket.js';
import { Connection } from './connection.js';
import { PayloadBudget } from './budget.js';
import { BufferPool } from './pool.js';
import type { ExportEntry, NbdExport, NbdServerOptions, NbdTlsMode, ResolvedLimits, ServerContext } from './types.js';

const log = logger('nbd');
const MAX_NAME_BYTES = 4096;

export class NbdServer {
  readonly #exports = new Map<string, ExportEntry>();
  readonly #listeners: { server: Server; path?: string }[] = [];
  readonly #connections = new Set<Connection>();
  readonly #limits: ResolvedLimits;
  readonly #tlsMode: NbdTlsMode;
  readonly #secureContext: SecureContext | undefined;
  readonly #verifyClient: boolean;
  readonly #maxConnections: number;
  readonly #handshakeTimeoutMs: number;
  readonly #defaultExport: string | undefined;
  #shuttingDown = false;
  #closed: Promise<void> | null = null;
  readonly #ctx: ServerContext;

  constructor(opts: NbdServerOptions = {}) {
    const num = (v: number | undefined, def: number, min: number, max: number, what: string) => {
      const n = v ?? def;
      if (!Number.isSafeInteger(n) || n < min || n > max) throw new CryptmapError('ENBDOPT', `NBD server option ${what}=${n} is out of range ${min}..${max}`);
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
    this.#handshakeTimeoutMs = num(opts.handshakeTimeoutMs, 30_000, 0, 2 ** 31 - 1, 'handshakeTimeoutMs');
    this.#tlsMode = opts.tls ?? 'off';
    if (this.#tlsMode !== 'off') {
      const c = opts.tlsCredentials;
      if (!c) throw new CryptmapError('ENBDTLS', `NBD TLS mode '${this.#tlsMode}' needs tlsCredentials (key and cert)`);
      try {
        this.#secureContext = createSecureContext({ key: c.key, cert: c.cert, ca: c.ca, minVersion: 'TLSv1.2' });
      } catch (e) {
        throw new CryptmapError('ENBDTLS', `cannot load the NBD TLS key or certificate: ${e instanceof Error ? e.message : String(e)}`, { cause: e });
      }
      this.#verifyClient = c.verifyClient ?? false;
      if (this.#verifyClient && !c.ca) throw new CryptmapError('ENBDTLS', 'NBD TLS verifyClient needs a CA certificate (tlsCredentials.ca)');
    } else {
      this.#verifyClient = false;
    }
    this.#defaultExport = opts.defaultExport;
    const self = this;
    this.#ctx = {
      limits: this.#limits,
      tlsMode: this.#tlsMode,
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
      budget: new PayloadBudget(num(opts.maxServerInflightBytes, 256 << 20, 1 << 20, 2 ** 40, 'maxServerInflightBytes')),
    };
  }

  /** Serve `exp.device` as `name`. Throws EEXIST when the name is taken. */
  addExport(name: string, exp: NbdExport): void {
    if (this.#shuttingDown) throw new CryptmapError('ENBDSHUTDOWN', 'NBD server is shutting down', { errno: 'ESHUTDOWN' });
    if (Buffer.byteLength(name, 'utf8') > MAX_NAME_BYTES || name.includes('\0')) {
      throw new CryptmapError('ENBDNAME', `NBD export name is longer than ${MAX_NAME_BYTES} bytes or contains NUL`);
    }
    if (this.#exports.has(name)) throw new CryptmapError('ENBDEXISTS', `NBD export '${name}' already exists`, { errno: 'EEXIST', exitCode: EXIT_BUSY });
    const lbs = exp.device.limits.logicalBlockBytes;
    if (!(lbs > 0 && (lbs & (lbs - 1)) === 0 && lbs <= 65536)) {
      throw new CryptmapError('ENBDBLOCK', `NBD export '${name}': logical block size ${lbs} is not a power of two up to 64 KiB`);
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
    if (e.removing) throw new CryptmapError('ENBDBUSY', `NBD export '${name}' is already being removed`, { errno: 'EBUSY', exitCode: EXIT_BUSY });
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

  /**
   * Connections whose request loop is held back by the per-connection limits: their peer is not
   * taking its replies, or too much is in flight on them. With payloadBytesInFlight at 0, such a
   * connection stays as it is until its peer reads.
   */
  get connectionsWaitingForRoom(): number {
    let n = 0;
    for (const c of this.#connections) if (c.waitingForRoom) n++;
    return n;
  }

  hasExport(name: string): boolean {
    return this.#exports.has(name);
  }

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
  async listenUnix(path: string, opts: { mode?: number } = {}): Promise<void> {
    await removeStaleSocket(path);
    const server = this.#makeServer();
    await listen(server, () => server.listen(path), `listen on ${path}`);
    try {
      chmodSync(path, opts.mode ?? 0o600);
    } catch (e) {
      server.close();
      throw fromSystemError('ENBDLISTEN', `cannot set the mode of ${path}`, e);
    }
    this.#listeners.push({ server, path });
  }

  /** Listen on TCP; port 0 picks a free port. Returns the bound address. */
  async listenTcp(port: number, host = '127.0.0.1'): Promise<{ host: string; port: number }> {
    const server = this.#makeServer();
    await listen(server, () => server.listen(port, host), `listen on ${host}:${port}`);
    this.#listeners.push({ server });
    const a = server.address();
    if (!a || typeof a === 'string') throw new CryptmapError('ENBDLISTEN', 'TCP listener has no address');
    return { host: a.address, port: a.port };
  }

  #makeServer(): Server {
    const server = createServer({ pauseOnConnect: false, noDelay: true }, (sock) => this.#accept(sock));
    server.on('error', (e) => log.error('listener error', { error: e.message }));
    return server;
  }

  #accept(sock: Socket): void {
    if (this.#shuttingDown || this.#connections.size >= this.#maxConnections) {
      log.info('refusing connection', { reason: this.#shuttingDown ? 'shutting down' : 'too many connections' });
      sock.on('error', () => {});
      sock.destroy();
      return;
    }
    const conn = new Connection(this.#ctx, sock, this.#handshakeTimeoutMs);
    this.#connections.add(conn);
    void conn.done.finally(() => this.#connections.delete(conn));
  }

  /** Clean shutdown: stop accepting, drain every connection, flush writable devices. Idempotent. */
  close(): Promise<void> {
    if (!this.#closed) this.#closed = this.#close();
    return this.#closed;
  }

  async #close(): Promise<void> {
    this.#shuttingDown = true;
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
    log.error('flush failed while closing export', { export: e.name, error: err instanceof Error ? err.message : String(err) });
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

async function removeStaleSocket(path: string): Promise<void> {
  const state = await clearStaleSocket(path);
  if (state === 'not-socket') throw new CryptmapError('ENBDLISTEN', `${path} exists and is not a socket`, { errno: 'EEXIST' });
  if (state === 'live') throw new CryptmapError('ENBDLISTEN', `${path} is in use by another server`, { errno: 'EBUSY', exitCode: EXIT_BUSY });
}
