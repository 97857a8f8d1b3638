/**
 * Test helpers for the NBD server: a server on a MemoryDevice in a private temp dir, a raw socket
 * client that speaks the wire format byte by byte (for malformed input), and a runner for the real
 * client tools that fails with the Debian package name when a tool is missing.
 */
import { readFileSync } from 'node:fs';
import { makeTempDir } from '../helpers/tmp.js';
import { connect, type Socket } from 'node:net';
import { connect as tlsConnect } from 'node:tls';
import type { Duplex } from 'node:stream';
import { join } from 'node:path';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import { NbdServer } from '../../src/nbd/server.js';
import type { NbdServerOptions } from '../../src/nbd/types.js';
import { makeCa } from '../helpers/x509.js';

export const NBDMAGIC = 0x4e42444d41474943n;
export const IHAVEOPT = 0x49484156454f5054n;
export const REP_MAGIC = 0x0003e889045565a9n;

export interface Fixture {
  dir: string;
  sock: string;
  server: NbdServer;
  disk: MemoryDevice;
  uri(name?: string): string;
  close(): Promise<void>;
}

/** A server with export 'disk' (writable, `sizeBytes`) and 'ro' (read-only, 1 MiB). */
export async function startServer(opts: NbdServerOptions = {}, sizeBytes = 16 << 20): Promise<Fixture> {
  const { dir, cleanup: removeDir } = makeTempDir('cryptmap-nbd-');
  const sock = join(dir, 'nbd.sock');
  const server = new NbdServer(opts);
  const disk = new MemoryDevice({ sizeBytes });
  server.addExport('disk', { device: disk, description: 'test disk' });
  server.addExport('ro', { device: new MemoryDevice({ sizeBytes: 1 << 20 }), readOnly: true });
  await server.listenUnix(sock);
  return {
    dir,
    sock,
    server,
    disk,
    uri: (name = 'disk') => `nbd+unix:///${name}?socket=${sock}`,
    async close() {
      await server.close();
      removeDir();
    },
  };
}

/** A byte-level client: send raw bytes, read exact counts, see the server hang up. */
export class RawClient {
  readonly socket: Duplex;
  #chunks: Buffer[] = [];
  #len = 0;
  #ended = false;
  #waiter: (() => void) | null = null;
  readonly #onData = (d: Buffer) => {
    this.#chunks.push(d);
    this.#len += d.length;
    this.#waiter?.();
  };
  readonly #onEnd = () => {
    this.#ended = true;
    this.#waiter?.();
  };

  private constructor(socket: Duplex) {
    this.socket = socket;
    socket.on('data', this.#onData);
    socket.on('end', this.#onEnd);
    socket.on('close', this.#onEnd);
    socket.on('error', this.#onEnd);
  }

  /** After an NBD_OPT_STARTTLS ACK: run a TLS client handshake on this socket; talk through the result. */
  async startTls(ca: Buffer): Promise<RawClient> {
    this.socket.off('data', this.#onData);
    this.socket.off('end', this.#onEnd);
    this.socket.off('close', this.#onEnd);
    const t = tlsConnect({ socket: this.socket as Socket, ca, servername: 'localhost' });
    await new Promise<void>((resolve, reject) => {
      t.once('secureConnect', () => resolve());
      t.once('error', reject);
    });
    return new RawClient(t);
  }

  /** Connect to a Unix socket path, or to `{ port, host }` over TCP. */
  static connect(path: string | { port: number; host?: string }): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const s = typeof path === 'string' ? connect(path) : connect(path.port, path.host ?? '127.0.0.1');
      s.once('connect', () => resolve(new RawClient(s)));
      s.once('error', reject);
    });
  }

  send(...parts: (Buffer | number[])[]): void {
    for (const p of parts) this.socket.write(Buffer.isBuffer(p) ? p : Buffer.from(p));
  }

  async read(n: number, timeoutMs = 10_000): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (this.#len < n) {
      if (this.#ended) throw new Error(`connection closed after ${this.#len} of ${n} bytes`);
      await this.#wait(deadline - Date.now());
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${n} bytes (have ${this.#len})`);
    }
    // Take exactly n bytes from the front of the chunk list (no quadratic re-concatenation).
    const parts: Buffer[] = [];
    let need = n;
    while (need > 0) {
      const c = this.#chunks[0]!;
      if (c.length <= need) {
        parts.push(c);
        this.#chunks.shift();
        need -= c.length;
      } else {
        parts.push(c.subarray(0, need));
        this.#chunks[0] = c.subarray(need);
        need = 0;
      }
    }
    this.#len -= n;
    return parts.length === 1 ? parts[0]! : Buffer.concat(parts, n);
  }

  /** Resolves true when the server closes the connection (after any bytes still queued). */
  async closedByServer(timeoutMs = 10_000): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (!this.#ended) {
      if (Date.now() > deadline) return false;
      await this.#wait(deadline - Date.now());
    }
    return true;
  }

  #wait(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const t = setTimeout(
        () => {
          this.#waiter = null;
          resolve();
        },
        Math.max(1, ms),
      );
      this.#waiter = () => {
        clearTimeout(t);
        this.#waiter = null;
        resolve();
      };
    });
  }

  close(): void {
    this.socket.destroy();
  }

  // ---- protocol helpers ----

  /** Read the greeting and send client flags. */
  async handshake(clientFlags = 3): Promise<number> {
    const g = await this.read(18);
    if (g.readBigUInt64BE(0) !== NBDMAGIC || g.readBigUInt64BE(8) !== IHAVEOPT) throw new Error('bad greeting');
    const u = Buffer.alloc(4);
    u.writeUInt32BE(clientFlags);
    this.send(u);
    return g.readUInt16BE(16);
  }

  sendOption(opt: number, data: Buffer = Buffer.alloc(0), lengthOverride?: number): void {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(IHAVEOPT, 0);
    h.writeUInt32BE(opt, 8);
    h.writeUInt32BE(lengthOverride ?? data.length, 12);
    this.send(h, data);
  }

  async readOptionReply(): Promise<{ opt: number; type: number; data: Buffer }> {
    const h = await this.read(20);
    if (h.readBigUInt64BE(0) !== REP_MAGIC) throw new Error('bad option reply magic');
    const len = h.readUInt32BE(16);
    const data = Buffer.from(await this.read(len));
    return { opt: h.readUInt32BE(8), type: h.readUInt32BE(12), data };
  }

  /** Option replies up to and including the first non-INFO/SERVER/META_CONTEXT reply. */
  async readOptionReplies(): Promise<{ opt: number; type: number; data: Buffer }[]> {
    const out = [];
    for (;;) {
      const r = await this.readOptionReply();
      out.push(r);
      if (r.type !== 2 && r.type !== 3 && r.type !== 4) return out;
    }
  }

  /** NBD_OPT_GO on `name`; returns the export size and transmission flags. */
  async go(name: string, infos: number[] = [3]): Promise<{ size: bigint; flags: number }> {
    this.sendOption(7, goData(name, infos));
    const replies = await this.readOptionReplies();
    const last = replies[replies.length - 1]!;
    if (last.type !== 1)
      throw new Error(`GO failed with reply type 0x${last.type.toString(16)}: ${last.data.toString()}`);
    const exp = replies.find((r) => r.type === 3 && r.data.readUInt16BE(0) === 0)!;
    return { size: exp.data.readBigUInt64BE(2), flags: exp.data.readUInt16BE(10) };
  }

  sendRequest(
    type: number,
    offset: bigint | number,
    length: number,
    opts: { flags?: number; cookie?: bigint; data?: Buffer } = {},
  ): void {
    const h = Buffer.alloc(28);
    h.writeUInt32BE(0x25609513, 0);
    h.writeUInt16BE(opts.flags ?? 0, 4);
    h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(opts.cookie ?? 1n, 8);
    h.writeBigUInt64BE(BigInt(offset), 16);
    h.writeUInt32BE(length, 24);
    this.send(h);
    if (opts.data) this.send(opts.data);
  }

  /** A simple reply: error and cookie (payload, if any, is left for the caller to read). */
  async readSimpleReply(): Promise<{ error: number; cookie: bigint }> {
    const h = await this.read(16);
    if (h.readUInt32BE(0) !== 0x67446698) throw new Error(`not a simple reply: 0x${h.readUInt32BE(0).toString(16)}`);
    return { error: h.readUInt32BE(4), cookie: h.readBigUInt64BE(8) };
  }

  /** Any reply: simple (no payload read) or one structured chunk (payload read). */
  async readReply(): Promise<
    | { kind: 'simple'; error: number; cookie: bigint }
    | { kind: 'chunk'; flags: number; type: number; cookie: bigint; payload: Buffer }
  > {
    const m = (await this.read(4)).readUInt32BE(0);
    if (m === 0x67446698) {
      const h = await this.read(12);
      return { kind: 'simple', error: h.readUInt32BE(0), cookie: h.readBigUInt64BE(4) };
    }
    if (m !== 0x668e33ef) throw new Error(`bad reply magic 0x${m.toString(16)}`);
    const h = await this.read(16);
    const len = h.readUInt32BE(12);
    return {
      kind: 'chunk',
      flags: h.readUInt16BE(0),
      type: h.readUInt16BE(2),
      cookie: h.readBigUInt64BE(4),
      payload: Buffer.from(await this.read(len)),
    };
  }

  /** Error value of a reply (simple, or an error chunk) for a command without payload. */
  async readError(): Promise<number> {
    const r = await this.readReply();
    if (r.kind === 'simple') return r.error;
    if (r.type >= 0x8000) return r.payload.readUInt32BE(0);
    return 0;
  }
}

export function goData(name: string, infos: number[] = []): Buffer {
  const n = Buffer.from(name);
  const b = Buffer.alloc(4 + n.length + 2 + 2 * infos.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  b.writeUInt16BE(infos.length, 4 + n.length);
  for (const [i, t] of infos.entries()) b.writeUInt16BE(t, 6 + n.length + 2 * i);
  return b;
}

export function metaData(name: string, queries: string[]): Buffer {
  const parts: Buffer[] = [];
  const n = Buffer.from(name);
  const h = Buffer.alloc(4);
  h.writeUInt32BE(n.length);
  parts.push(h, n);
  const c = Buffer.alloc(4);
  c.writeUInt32BE(queries.length);
  parts.push(c);
  for (const q of queries) {
    const qb = Buffer.from(q);
    const l = Buffer.alloc(4);
    l.writeUInt32BE(qb.length);
    parts.push(l, qb);
  }
  return Buffer.concat(parts);
}

/** Connect, handshake, optionally negotiate structured replies, GO on `name`. */
export async function openClient(f: Fixture, name = 'disk', structured = false): Promise<RawClient> {
  const c = await RawClient.connect(f.sock);
  await c.handshake();
  if (structured) {
    c.sendOption(8);
    const r = await c.readOptionReply();
    if (r.type !== 1) throw new Error('structured replies refused');
  }
  await c.go(name);
  return c;
}

/** A self-signed EC certificate for CN=localhost (openssl), as PEM key and cert. */
export function selfSignedCert(dir: string): { key: Buffer; cert: Buffer } {
  makeCa(dir, 'localhost', 'subjectAltName=DNS:localhost');
  return { key: readFileSync(`${dir}/ca-key.pem`), cert: readFileSync(`${dir}/ca-cert.pem`) };
}
