/**
 * The byte stream under an NBD client connection: TCP (Nagle off, as proto.md "Protocol phases"
 * asks) or a Unix socket (abstract ones too: a path starting with NUL), and the TLS upgrade after
 * NBD_OPT_STARTTLS with the credentials an NBD URI names (nbd-wire/uri.ts).
 *
 * Credentials are read once, when the device opens, so a reconnect never depends on files that
 * moved since; they are certificates and a private key file's contents, kept only in this object.
 */
import { readFile } from 'node:fs/promises';
import { isIP, type Socket, connect as netConnect } from 'node:net';
import { join } from 'node:path';
import { checkServerIdentity, connect as tlsConnect, type PeerCertificate, type TLSSocket } from 'node:tls';
import type { NbdUriTarget } from '../../nbd-wire/uri.js';
import { enlargeUnixSendBuffer } from '../../util/sockbuf.js';

export interface TlsCredentials {
  ca?: Buffer;
  cert?: Buffer;
  key?: Buffer;
}

async function readIfExists(path: string): Promise<Buffer | undefined> {
  try {
    return await readFile(path);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw e;
  }
}

/**
 * Load the PEM files of `t`: `tls-certificates=DIR` gives `ca-cert.pem`, `client-cert.pem` and
 * `client-key.pem` (the names libnbd, qemu and nbdkit use; each optional), and `x-tls-ca`,
 * `x-tls-cert`, `x-tls-key` name single files (they win over the directory's).
 */
export async function loadTlsCredentials(t: NbdUriTarget): Promise<TlsCredentials> {
  const c: TlsCredentials = {};
  if (!t.tls) return c;
  if (t.tlsCertificatesDir !== undefined) {
    const d = t.tlsCertificatesDir;
    const [ca, cert, key] = await Promise.all(
      ['ca-cert.pem', 'client-cert.pem', 'client-key.pem'].map((f) => readIfExists(join(d, f))),
    );
    if (ca === undefined && cert === undefined) throw new Error(`${d} holds neither ca-cert.pem nor client-cert.pem`);
    if ((cert === undefined) !== (key === undefined))
      throw new Error(`${d} needs both client-cert.pem and client-key.pem, or neither`);
    if (ca !== undefined) c.ca = ca;
    if (cert !== undefined && key !== undefined) {
      c.cert = cert;
      c.key = key;
    }
  }
  if (t.tlsCaFile !== undefined) c.ca = await readFile(t.tlsCaFile);
  if (t.tlsCertFile !== undefined && t.tlsKeyFile !== undefined) {
    c.cert = await readFile(t.tlsCertFile);
    c.key = await readFile(t.tlsKeyFile);
  }
  return c;
}

/** Bytes of the scratch buffer a socket reads into when no destination buffer is offered. */
const SCRATCH_BYTES = 64 << 10;

/**
 * Who says where a socket's bytes land (Node's `onread`: the socket reads into a buffer the caller
 * supplies, asked for again before every read, instead of a fresh chunk per read). Until a
 * transmission-phase connection takes it over, it reads into a scratch buffer and hands copies on
 * as ordinary 'data' events (the handshake's receive queue, and TLS, which takes the socket's handle
 * over and reads on its own, see them as from any socket). `take` gives the reads to one consumer:
 * `next()` names the buffer the next read fills (a READ's destination, or scratch), `got(n, buf)`
 * says that `n` bytes arrived at the start of `buf`.
 */
export class SocketReader {
  readonly scratch = Buffer.allocUnsafe(SCRATCH_BYTES);
  #next: () => Uint8Array = () => this.scratch;
  #got: (n: number, buf: Uint8Array) => void;

  constructor(sock: () => Socket) {
    this.#got = (n, buf) => {
      sock().emit('data', Buffer.from(buf.subarray(0, n)));
    };
  }

  /** The `onread` option of net.connect. */
  get onread(): { buffer: () => Uint8Array; callback: (n: number, buf: Uint8Array) => boolean } {
    return {
      buffer: () => this.#next(),
      callback: (n, buf) => {
        this.#got(n, buf);
        return true;
      },
    };
  }

  take(next: () => Uint8Array, got: (n: number, buf: Uint8Array) => void): void {
    this.#next = next;
    this.#got = got;
  }
}

const readers = new WeakMap<Socket, SocketReader>();

/** The reader of a socket `connectSocket` made (undefined for others). */
export function socketReader(s: Socket): SocketReader | undefined {
  return readers.get(s);
}

/** Connect the raw socket; rejects on a connection error or after `timeoutMs`. */
export function connectSocket(t: NbdUriTarget, timeoutMs: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const reader: SocketReader = new SocketReader((): Socket => s);
    const s: Socket =
      t.transport.kind === 'unix'
        ? netConnect({ path: t.transport.path, onread: reader.onread })
        : netConnect({ host: t.transport.host, port: t.transport.port, noDelay: true, onread: reader.onread });
    readers.set(s, reader);
    const timer = setTimeout(() => {
      s.destroy();
      reject(new Error(`no connection after ${timeoutMs} ms`));
    }, timeoutMs);
    s.once('connect', () => {
      clearTimeout(timer);
      // WRITE payloads of 256 KiB and more leave in fewer, larger writes (util/sockbuf.ts).
      if (t.transport.kind === 'unix') enlargeUnixSendBuffer(s);
      s.off('error', onError);
      resolve(s);
    });
    const onError = (e: Error) => {
      clearTimeout(timer);
      s.destroy();
      reject(e);
    };
    s.once('error', onError);
  });
}

/**
 * Run the TLS client handshake on `raw` (after NBD_REP_ACK to NBD_OPT_STARTTLS). The peer is
 * verified unless `tls-verify-peer=0`: its chain against the CA (or the system's), and its name
 * against `tls-hostname`, else the URI's host; over a Unix socket without `tls-hostname` only the chain.
 */
export function upgradeTls(raw: Socket, t: NbdUriTarget, creds: TlsCredentials, timeoutMs: number): Promise<TLSSocket> {
  const host = t.tlsHostname ?? (t.transport.kind === 'tcp' ? t.transport.host : undefined);
  return new Promise((resolve, reject) => {
    const s = tlsConnect({
      socket: raw,
      ...(creds.ca ? { ca: creds.ca } : {}),
      ...(creds.cert ? { cert: creds.cert, key: creds.key } : {}),
      ...(host !== undefined && isIP(host) === 0 ? { servername: host } : {}),
      rejectUnauthorized: t.tlsVerifyPeer,
      minVersion: 'TLSv1.2',
      checkServerIdentity: (_name: string, cert: PeerCertificate) =>
        host === undefined || !t.tlsVerifyPeer ? undefined : checkServerIdentity(host, cert),
    });
    const timer = setTimeout(() => {
      s.destroy();
      reject(new Error(`TLS handshake did not finish in ${timeoutMs} ms`));
    }, timeoutMs);
    s.once('secureConnect', () => {
      clearTimeout(timer);
      s.off('error', onError);
      // Later errors (a server refusing our certificate after TLS 1.3's handshake) close the stream,
      // which the handshake or the connection reports.
      s.on('error', () => {});
      resolve(s);
    });
    const onError = (e: Error) => {
      clearTimeout(timer);
      s.destroy();
      reject(new Error(`TLS handshake failed: ${e.message}`));
    };
    s.once('error', onError);
  });
}
