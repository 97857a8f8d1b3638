/**
 * The `--metrics HOST:PORT` endpoint of `cryptmap daemon`, `agent` and `keyd`: plain HTTP, `GET
 * /metrics` in the Prometheus text format (util/metrics.ts). Off unless asked for; a bare PORT means
 * 127.0.0.1. Trust (docs/operations.md): metrics carry no key, but they do carry device and volume
 * names and I/O volumes, so any address other than loopback needs `--metrics-token-file F`, whose
 * token every scrape then shows as `Authorization: Bearer <token>` (Prometheus:
 * `authorization: { credentials_file: F }`); on loopback the token is optional. The server caps its
 * connections and times out slow requests, so a local user cannot hold it.
 */
import { type IncomingMessage, type Server, type ServerResponse, createServer } from 'node:http';
import { isIPv4 } from 'node:net';
import { constantTimeEqual } from './bytes.js';
import { CryptmapError } from './errors.js';
import { logger } from './log.js';
import type { MetricsRegistry } from './metrics.js';
import { readTrustedFile } from './trusted-path.js';

const log = logger('metrics');

export interface MetricsListen {
  readonly host: string;
  readonly port: number;
}

/** A loopback address: localhost, ::1, or an IPv4 address in 127.0.0.0/8 (names are not resolved). */
export function isLoopbackHost(host: string): boolean {
  const h = host.toLowerCase().replace(/^::ffff:/, '');
  if (h === 'localhost' || h === '::1' || h === '0:0:0:0:0:0:0:1') return true;
  return isIPv4(h) && h.startsWith('127.');
}

/**
 * Parse `--metrics`: `PORT` (on 127.0.0.1), `HOST:PORT` or `[IPv6]:PORT`; port 0 picks a free one.
 * @example parseMetricsListen('9464') // { host: '127.0.0.1', port: 9464 }
 */
export function parseMetricsListen(s: string): MetricsListen {
  const m = /^(?:(?:\[([^\]]+)\]|([^:[\]]+)):)?([0-9]{1,5})$/.exec(s);
  const port = m ? Number(m[3]) : Number.NaN;
  if (!m || port > 65535) throw new CryptmapError('EARGS', `--metrics wants PORT or HOST:PORT (got '${s}')`);
  return { host: m[1] ?? m[2] ?? '127.0.0.1', port };
}

/** Read the bearer token (a 0600 file of ours, no link; surrounding whitespace dropped; at least 16 characters). */
export function readMetricsToken(path: string): Buffer {
  const raw = readTrustedFile(path, { code: 'EARGS', private: true, maxBytes: 4096 });
  const token = Buffer.from(raw.toString('utf8').trim(), 'utf8');
  raw.fill(0);
  if (token.length < 16)
    throw new CryptmapError('EARGS', `--metrics-token-file ${path}: the token must have at least 16 characters`);
  return token;
}

export interface MetricsServer {
  /** `http://host:port/metrics` as bound (the real port when 0 was asked for). */
  readonly url: string;
  close(): Promise<void>;
}

/**
 * Serve `registry` on `listen`. Refuses a non-loopback address without a token (EARGS).
 * @example const m = await serveMetrics(registry, parseMetricsListen('9464'));
 */
export async function serveMetrics(
  registry: MetricsRegistry,
  listen: MetricsListen,
  token?: Buffer,
): Promise<MetricsServer> {
  if (!isLoopbackHost(listen.host) && !token) {
    throw new CryptmapError(
      'EARGS',
      `--metrics ${listen.host}:${listen.port} would publish device names and I/O to whoever reaches it: add --metrics-token-file F (scrapes then send 'Authorization: Bearer <token>'), or listen on loopback`,
    );
  }
  // Bytes only: a JS string of the token could not be wiped.
  const expected = token ? Buffer.concat([Buffer.from('Bearer ', 'utf8'), token]) : undefined;
  const handle = (req: IncomingMessage, res: ServerResponse) => {
    const path = (req.url ?? '').split('?')[0];
    if (path !== '/metrics') {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found: try /metrics\n');
      return;
    }
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { allow: 'GET, HEAD', 'content-type': 'text/plain' }).end('method not allowed\n');
      return;
    }
    if (expected) {
      const got = Buffer.from(req.headers.authorization ?? '', 'utf8');
      if (got.length !== expected.length || !constantTimeEqual(got, expected)) {
        res
          .writeHead(401, { 'www-authenticate': 'Bearer realm="cryptmap"', 'content-type': 'text/plain' })
          .end('unauthorized\n');
        return;
      }
    }
    let body: string;
    try {
      body = registry.render();
    } catch (e) {
      log.error('metrics collection failed', { error: e instanceof Error ? e.message : String(e) });
      res.writeHead(500, { 'content-type': 'text/plain' }).end('metrics collection failed\n');
      return;
    }
    res.writeHead(200, {
      'content-type': 'text/plain; version=0.0.4; charset=utf-8',
      'content-length': Buffer.byteLength(body),
    });
    res.end(req.method === 'HEAD' ? undefined : body);
  };
  const server: Server = createServer(
    { requestTimeout: 10_000, headersTimeout: 10_000, keepAliveTimeout: 5_000 },
    handle,
  );
  server.maxConnections = 64;
  server.maxHeadersCount = 32;
  await new Promise<void>((res, rej) => {
    server.once('error', (e: NodeJS.ErrnoException) => {
      rej(
        new CryptmapError(
          'EARGS',
          `--metrics ${listen.host}:${listen.port}: ${e.code === 'EADDRINUSE' ? 'address in use' : e.message}`,
        ),
      );
    });
    server.listen(listen.port, listen.host, () => res());
  });
  server.on('error', (e) => log.warn('metrics server error', { error: e.message }));
  const addr = server.address();
  const port = typeof addr === 'object' && addr ? addr.port : listen.port;
  const host = listen.host.includes(':') ? `[${listen.host}]` : listen.host;
  const url = `http://${host}:${port}/metrics`;
  log.info('metrics served', { url, auth: expected ? 'bearer token' : 'none (loopback)' });
  return {
    url,
    close: () =>
      new Promise<void>((res) => {
        server.close(() => res());
        server.closeAllConnections();
      }),
  };
}
