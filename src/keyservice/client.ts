/**
 * Key service clients: Unix socket, HTTPS with a client certificate, and in-process (the agent's
 * embedded key service). All return the key as an owned `Secret`; the hex string received on the
 * wire is turned into bytes at once and never logged.
 *
 * Failures have stable codes the reconciler acts on:
 *   EKEYD_UNREACHABLE  cannot connect / no answer (retry with backoff)
 *   EKEYD_DENIED       the policy refused this client (do not retry)
 *   EKEYREQ            the request was malformed
 *   EKEYD_PROTO        the answer made no sense
 */
import { readFileSync } from 'node:fs';
import { request as httpsRequest } from 'node:https';
import { connect } from 'node:net';
import { fromHex, wipe } from '../util/bytes.js';
import { CryptmapError, EXIT_NO_PERMISSION, fromSystemError, isCryptmapError } from '../util/errors.js';
import { untrustedPeer } from '../util/peercred.js';
import { checkTrustedSocket, readTrustedFile } from '../util/trusted-path.js';
import { Secret } from '../util/secret.js';
import { type DeriveRequest, validateDeriveRequest } from './derive.js';
import type { KeyResponse, KeyService } from './service.js';

export interface KeyClient {
  /** Ask for the key of (purpose, service, volume). The caller disposes the Secret. */
  deriveKey(req: DeriveRequest): Promise<Secret>;
  /** Cheap liveness check; throws EKEYD_UNREACHABLE when the service cannot be reached. */
  ping(): Promise<void>;
  close(): Promise<void>;
}

const DEFAULT_TIMEOUT_MS = 5000;

function unreachable(where: string, e: unknown): CryptmapError {
  const err = fromSystemError('EKEYD_UNREACHABLE', `key service ${where} is unreachable`, e);
  return new CryptmapError('EKEYD_UNREACHABLE', err.message, {
    errno: 'ESHUTDOWN',
    exitCode: 1,
    cause: e,
    context: { address: where },
  });
}

function keyFromResponse(where: string, r: KeyResponse, length: number): Secret {
  if (!r.ok) {
    const msg = typeof r.message === 'string' ? r.message : 'request refused';
    if (r.code === 'EACCES')
      throw new CryptmapError('EKEYD_DENIED', `key service ${where} refused: ${msg}`, {
        exitCode: EXIT_NO_PERMISSION,
        errno: 'EPERM',
      });
    throw new CryptmapError(
      r.code === 'EKEYREQ' || r.code === 'ENOROOT' ? r.code : 'EKEYD_PROTO',
      `key service ${where}: ${msg}`,
    );
  }
  if (typeof r.key !== 'string' || r.key.length !== length * 2)
    throw new CryptmapError('EKEYD_PROTO', `key service ${where} sent no key of ${length} bytes`);
  return new Secret(fromHex(r.key, 'key'));
}

export interface UnixClientOptions {
  socketPath: string;
  /** A client token (see server.ts); or `tokenFile` to read it from a 0600 file. */
  token?: string;
  tokenFile?: string;
  timeoutMs?: number;
}

/** One request over a fresh connection: robust to keyd restarts, cheap enough for a boot. */
function unixCall(path: string, msg: Record<string, unknown>, timeoutMs: number): Promise<KeyResponse> {
  // Whom we talk to (issue 11 item 3): keys come back on this socket and a token goes out on it.
  try {
    checkTrustedSocket(path, { code: 'EKEYD_UNTRUSTED' });
  } catch (e) {
    if (isCryptmapError(e) && e.cause === undefined) return Promise.reject(e);
    return Promise.reject(unreachable(path, (e as Error).cause ?? e));
  }
  return new Promise((resolve, reject) => {
    const sock = connect(path);
    let buf = '';
    let done = false;
    const finish = (f: () => void) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      sock.destroy();
      f();
    };
    const timer = setTimeout(
      () => finish(() => reject(unreachable(path, new Error(`no answer within ${timeoutMs} ms`)))),
      timeoutMs,
    );
    sock.setEncoding('utf8');
    sock.on('connect', () => {
      const bad = untrustedPeer(sock, path, 'EKEYD_UNTRUSTED');
      if (bad) finish(() => reject(bad));
      else sock.write(JSON.stringify(msg) + '\n');
    });
    sock.on('data', (c: string) => {
      buf += c;
      const nl = buf.indexOf('\n');
      if (nl < 0) {
        if (buf.length > 65536)
          finish(() => reject(new CryptmapError('EKEYD_PROTO', `key service ${path} sent an overlong answer`)));
        return;
      }
      const line = buf.slice(0, nl);
      buf = '';
      finish(() => {
        try {
          resolve(JSON.parse(line) as KeyResponse);
        } catch {
          reject(new CryptmapError('EKEYD_PROTO', `key service ${path} sent invalid JSON`));
        }
      });
    });
    sock.on('error', (e) => finish(() => reject(unreachable(path, e))));
    sock.on('close', () => finish(() => reject(unreachable(path, new Error('connection closed without an answer')))));
  });
}

export function unixKeyClient(opts: UnixClientOptions): KeyClient {
  const timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  let token = opts.token;
  if (token === undefined && opts.tokenFile !== undefined) {
    // The token is a credential: O_NOFOLLOW, ours or root's, and refused when others may have read it.
    const raw = readTrustedFile(opts.tokenFile, { code: 'EKEYD_TOKEN', private: true, maxBytes: 4096 });
    token = raw.toString('utf8').trim();
    raw.fill(0);
  }
  let seq = 0;
  return {
    async deriveKey(req) {
      const r = validateDeriveRequest(req);
      const msg: Record<string, unknown> = { id: ++seq, op: 'derive', ...r };
      if (token !== undefined) msg.token = token;
      const resp = await unixCall(opts.socketPath, msg, timeoutMs);
      try {
        return keyFromResponse(opts.socketPath, resp, r.length);
      } finally {
        resp.key = undefined;
      }
    },
    async ping() {
      const resp = await unixCall(opts.socketPath, { id: ++seq, op: 'ping' }, timeoutMs);
      if (!resp.ok) throw new CryptmapError('EKEYD_PROTO', `key service ${opts.socketPath} did not answer ping`);
    },
    async close() {},
  };
}

export interface HttpsClientOptions {
  /** `https://host:port` */
  url: string;
  /** PEM client certificate and key, and the CA that signed the server's certificate. */
  cert: string | Buffer;
  key: string | Buffer;
  ca: string | Buffer;
  /** Expected server name when it differs from the URL host (tests with 127.0.0.1). */
  servername?: string;
  timeoutMs?: number;
}

function httpsCall(opts: HttpsClientOptions, msg: Record<string, unknown>): Promise<KeyResponse> {
  const u = new URL('/v1/key', opts.url);
  const body = JSON.stringify(msg);
  return new Promise((resolve, reject) => {
    const req = httpsRequest(
      {
        method: 'POST',
        host: u.hostname.replace(/^\[|\]$/g, ''),
        port: u.port || 443,
        path: u.pathname,
        cert: opts.cert,
        key: opts.key,
        ca: opts.ca,
        servername: opts.servername,
        agent: false,
        timeout: opts.timeoutMs ?? DEFAULT_TIMEOUT_MS,
        headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) },
      },
      (res) => {
        let data = '';
        res.setEncoding('utf8');
        res.on('data', (c: string) => {
          data += c;
          if (data.length > 65536)
            req.destroy(new CryptmapError('EKEYD_PROTO', `key service ${opts.url} sent an overlong answer`));
        });
        res.on('end', () => {
          try {
            resolve(JSON.parse(data) as KeyResponse);
          } catch {
            reject(
              new CryptmapError('EKEYD_PROTO', `key service ${opts.url} answered HTTP ${res.statusCode} without JSON`),
            );
          }
        });
        res.on('error', (e) => reject(unreachable(opts.url, e)));
      },
    );
    req.on('timeout', () => req.destroy(new Error('timed out')));
    req.on('error', (e) => reject(e instanceof CryptmapError ? e : unreachable(opts.url, e)));
    req.end(body);
  });
}

export function httpsKeyClient(opts: HttpsClientOptions): KeyClient {
  let seq = 0;
  return {
    async deriveKey(req) {
      const r = validateDeriveRequest(req);
      const resp = await httpsCall(opts, { id: ++seq, op: 'derive', ...r });
      try {
        return keyFromResponse(opts.url, resp, r.length);
      } finally {
        resp.key = undefined;
      }
    },
    async ping() {
      const resp = await httpsCall(opts, { id: ++seq, op: 'ping' });
      if (!resp.ok) throw new CryptmapError('EKEYD_PROTO', `key service ${opts.url} did not answer ping`);
    },
    async close() {},
  };
}

/** A client for a key service in this process (the agent's embedded default). */
export function inprocKeyClient(service: KeyService, identity = 'local'): KeyClient {
  return {
    async deriveKey(req) {
      const r = validateDeriveRequest(req);
      const resp = service.handle('inproc', identity, { op: 'derive', ...r });
      try {
        return keyFromResponse('(in-process)', resp, r.length);
      } finally {
        resp.key = undefined;
      }
    },
    async ping() {},
    async close() {},
  };
}

export interface ConnectOptions {
  /** Unix socket only: the client token, or a 0600 file holding it. */
  token?: string;
  tokenFile?: string;
  tlsCert?: string;
  tlsKey?: string;
  tlsCa?: string;
  servername?: string;
  timeoutMs?: number;
}

/**
 * A client for an address as written in a manifest: `unix:/path/keyd.sock` (or a bare absolute
 * path) or `https://host:port` (then tlsCert, tlsKey and tlsCa are file paths).
 */
export function connectKeyService(address: string, opts: ConnectOptions = {}): KeyClient {
  if (address.startsWith('unix:') || address.startsWith('/')) {
    const socketPath = address.startsWith('unix:') ? address.slice(5) : address;
    return unixKeyClient({ socketPath, token: opts.token, tokenFile: opts.tokenFile, timeoutMs: opts.timeoutMs });
  }
  if (address.startsWith('https://')) {
    if (!opts.tlsCert || !opts.tlsKey || !opts.tlsCa) {
      throw new CryptmapError(
        'EKEYD_ADDRESS',
        `key service ${address} needs a client certificate, key and CA (tls.cert, tls.key, tls.ca)`,
      );
    }
    const read = (p: string) => {
      try {
        return readFileSync(p);
      } catch (e) {
        throw fromSystemError('EKEYD_TLS', `cannot read ${p}`, e);
      }
    };
    const key = read(opts.tlsKey);
    const client = httpsKeyClient({
      url: address,
      cert: read(opts.tlsCert),
      key,
      ca: read(opts.tlsCa),
      servername: opts.servername,
      timeoutMs: opts.timeoutMs,
    });
    return {
      ...client,
      async close() {
        wipe(key);
      },
    };
  }
  throw new CryptmapError('EKEYD_ADDRESS', `key service address '${address}' must be unix:/path or https://host:port`);
}
