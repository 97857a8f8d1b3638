/**
 * Key service transports. Both carry the JSON messages of service.ts; they differ in how the
 * caller's identity is established:
 *
 * - Unix socket (JSON lines). The socket file itself is the boundary (SO_PEERCRED, read through
 *   the native addon, only names the peer uid in audit lines): it is created with mode 0600 (bound under a private temporary name, chmod-ed, then
 *   renamed into place, so it is never reachable with a wider mode). Only keyd's own uid and root
 *   can connect; such a caller is identity `local`. A request may carry `"token"`: a secret read by
 *   the client from its own 0600 token file; if the token's SHA-256 matches a policy entry the
 *   identity is that entry's `token:<name>`, otherwise the request is refused. This lets several
 *   local clients (all able to reach the socket, e.g. via a shared group or root) have distinct
 *   rights.
 * - HTTPS with client certificates (`POST /v1/key`, body = one request object). The server
 *   requires a certificate signed by the configured CA (`requestCert`, `rejectUnauthorized`); the
 *   identity is `cn:<subject CN>` of the verified certificate.
 */
import { randomBytes } from 'node:crypto';
import { unlinkSync } from 'node:fs';
import { type Server as HttpsServer, createServer as createHttpsServer } from 'node:https';
import { type Server, type Socket, createServer } from 'node:net';
import type { TLSSocket } from 'node:tls';
import { CryptmapError } from '../util/errors.js';
import { peerCredentials } from '../util/peercred.js';
import { listenUnixSocket } from '../util/unix-socket.js';
import { identityForToken } from './policy.js';
import { type KeyResponse, type KeyService, MAX_REQUEST_BYTES } from './service.js';

export interface RunningServer {
  /** Where it listens: the socket path, or `https://host:port`. */
  readonly address: string;
  close(): Promise<void>;
}

function identityOf(service: KeyService, msg: unknown): { identity: string; refused?: string } {
  const token = typeof msg === 'object' && msg !== null ? (msg as Record<string, unknown>).token : undefined;
  if (token === undefined) return { identity: 'local' };
  if (typeof token !== 'string' || token.length === 0 || token.length > 1024)
    return { identity: 'token:?', refused: 'malformed token' };
  const id = identityForToken(service.policy, token);
  return id === undefined ? { identity: 'token:?', refused: 'unknown token' } : { identity: id };
}

/** Serve `service` on a Unix socket at `path` (mode 0600). A stale socket file is replaced. */
export async function listenUnix(service: KeyService, path: string): Promise<RunningServer> {
  const sockets = new Set<Socket>();
  const server: Server = createServer((sock) => {
    sockets.add(sock);
    sock.on('close', () => sockets.delete(sock));
    sock.on('error', () => sock.destroy());
    const cred = peerCredentials(sock); // SO_PEERCRED: who is asking, for the audit log
    const peer = cred ? `uid:${cred.uid}` : undefined;
    let buf = '';
    const send = (r: KeyResponse) => {
      if (!sock.destroyed) sock.write(JSON.stringify(r) + '\n');
    };
    sock.setEncoding('utf8');
    sock.on('data', (chunk: string) => {
      buf += chunk;
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        if (line.trim() === '') continue;
        let msg: unknown;
        try {
          msg = JSON.parse(line);
        } catch {
          send({ id: null, ok: false, code: 'EKEYREQ', message: 'request is not valid JSON' });
          continue;
        }
        const who = identityOf(service, msg);
        if (who.refused) {
          service.refuse('unix', who.identity, who.refused, peer);
          send({
            id: (msg as Record<string, unknown>)?.id,
            ok: false,
            code: 'EACCES',
            message: 'unknown client token',
          });
          continue;
        }
        send(service.handle('unix', who.identity, msg));
      }
      if (buf.length > MAX_REQUEST_BYTES) {
        service.refuse('unix', 'local', 'request too long', peer);
        send({ id: null, ok: false, code: 'EKEYREQ', message: 'request line too long' });
        sock.end();
        buf = '';
      }
    });
  });
  await listenUnixSocket(server, path, 0o600, {
    code: 'EKEYD_LISTEN',
    live: (p) =>
      new CryptmapError('EKEYD_RUNNING', `a key service is already listening on ${p}`, { exitCode: 5, errno: 'EBUSY' }),
    notSocket: (p) =>
      new CryptmapError('EKEYD_SOCKET', `${p} exists and is not a socket; refusing to replace it`, {
        exitCode: 5,
        errno: 'EEXIST',
      }),
  });
  return {
    address: path,
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise<void>((res) => server.close(() => res()));
      try {
        unlinkSync(path);
      } catch {}
    },
  };
}

export interface TlsListenOptions {
  host: string;
  port: number;
  /** PEM server certificate, private key, and the CA that signs client certificates. */
  cert: string | Buffer;
  key: string | Buffer;
  ca: string | Buffer;
}

/** Serve `service` over HTTPS with mandatory client certificates: `POST /v1/key`. */
export async function listenTls(service: KeyService, opts: TlsListenOptions): Promise<RunningServer> {
  const server: HttpsServer = createHttpsServer(
    { cert: opts.cert, key: opts.key, ca: opts.ca, requestCert: true, rejectUnauthorized: true, minVersion: 'TLSv1.2' },
    (req, res) => {
      const reply = (status: number, body: KeyResponse) => {
        res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store' });
        res.end(JSON.stringify(body));
      };
      const sock = req.socket as TLSSocket;
      const cn = sock.authorized ? sock.getPeerCertificate()?.subject?.CN : undefined;
      const cnStr = Array.isArray(cn) ? cn[0] : cn;
      if (!cnStr) {
        service.refuse('https', 'cn:?', 'no verified client certificate', sock.remoteAddress);
        reply(401, {
          ok: false,
          code: 'EACCES',
          message: 'a client certificate signed by the key service CA is required',
        });
        return;
      }
      const identity = `cn:${cnStr}`;
      if (req.method !== 'POST' || req.url !== '/v1/key') {
        reply(404, { ok: false, code: 'EKEYREQ', message: 'POST /v1/key' });
        return;
      }
      let body = '';
      let tooLong = false;
      req.setEncoding('utf8');
      req.on('data', (c: string) => {
        if (tooLong) return;
        body += c;
        if (body.length > MAX_REQUEST_BYTES) {
          tooLong = true;
          service.refuse('https', identity, 'request too long');
          reply(413, { ok: false, code: 'EKEYREQ', message: 'request too long' });
          req.destroy();
        }
      });
      req.on('end', () => {
        if (tooLong) return;
        let msg: unknown;
        try {
          msg = JSON.parse(body);
        } catch {
          reply(400, { ok: false, code: 'EKEYREQ', message: 'request is not valid JSON' });
          return;
        }
        if (typeof msg === 'object' && msg !== null && 'token' in msg) {
          reply(400, {
            ok: false,
            code: 'EKEYREQ',
            message: 'tokens are for the Unix socket; HTTPS clients are identified by their certificate',
          });
          return;
        }
        const r = service.handle('https', identity, msg);
        reply(r.ok ? 200 : r.code === 'EACCES' ? 403 : 400, r);
      });
    },
  );
  server.on('tlsClientError', (_e, sock) => {
    // Aggregated per peer by the audit sink (audit.ts rateLimitedAudit): a handshake loop is one line per interval.
    service.refuse(
      'https',
      'cn:?',
      'TLS handshake failed (client certificate missing or not trusted)',
      sock.remoteAddress,
    );
  });
  await new Promise<void>((res, rej) => {
    server.once('error', rej);
    server.listen(opts.port, opts.host, () => {
      server.off('error', rej);
      res();
    });
  });
  const a = server.address();
  const port = typeof a === 'object' && a !== null ? a.port : opts.port;
  const host = opts.host.includes(':') ? `[${opts.host}]` : opts.host;
  return {
    address: `https://${host}:${port}`,
    async close() {
      server.closeAllConnections();
      await new Promise<void>((res) => server.close(() => res()));
    },
  };
}

/** A random client token (hex, 32 bytes of entropy) for a `token:<name>` policy entry. */
export function newClientToken(): string {
  return randomBytes(32).toString('hex');
}
