/**
 * Control socket server: a table of handlers keyed by op name ("dm.create", "volume.open", ...).
 * Requests on one connection run concurrently; the daemon serialises lifecycle per device below.
 */
import { existsSync, unlinkSync } from 'node:fs';
import { type Server, type Socket, createServer } from 'node:net';
import { wipeFreedMemoryScope } from '../util/freed-memory.js';
import { CryptmapError, isCryptmapError } from '../util/errors.js';
import { logger } from '../util/log.js';
import { peerCredentials } from '../util/peercred.js';
import { listenUnixSocket } from '../util/unix-socket.js';
import { type ControlRequest, type ControlResponse, lineSplitter, parseRequest } from './protocol.js';

export type ControlHandler = (args: Record<string, unknown>) => Promise<unknown>;
export type ControlHandlers = Record<string, ControlHandler>;

const log = logger('control');

export class ControlServer {
  readonly #handlers: ControlHandlers;
  #server: Server | null = null;
  #path = '';
  readonly #sockets = new Set<Socket>();

  constructor(handlers: ControlHandlers) {
    this.#handlers = handlers;
  }

  /** Listen on `path` (mode 0600). A stale socket file is replaced; a live one means another daemon runs. */
  async listen(path: string): Promise<void> {
    const server = createServer((s) => this.#serve(s));
    await listenUnixSocket(server, path, 0o600, {
      code: 'ECONTROL_SOCKET',
      live: (p) =>
        new CryptmapError('EDAEMON_RUNNING', `another cryptmap daemon is already listening on ${p}`, {
          exitCode: 5,
          errno: 'EBUSY',
        }),
      notSocket: (p) =>
        new CryptmapError('ECONTROL_SOCKET', `${p} exists and is not a socket; refusing to replace it`, {
          exitCode: 5,
          errno: 'EEXIST',
        }),
    });
    this.#server = server;
    this.#path = path;
  }

  /**
   * Serve on a listening socket systemd passed (socket activation: the unit's ListenStream= sets the
   * path and SocketMode=0600). The socket file is systemd's: close() leaves it in place.
   */
  async listenFd(fd: number): Promise<void> {
    const server = createServer((s) => this.#serve(s));
    await new Promise<void>((res, rej) => {
      server.once('error', rej);
      server.listen({ fd }, () => {
        server.off('error', rej);
        res();
      });
    });
    this.#server = server;
  }

  #serve(sock: Socket): void {
    this.#sockets.add(sock);
    // Keys arrive on this socket: freed heap chunks (Node's read buffers) are overwritten until it closes.
    const wipeScope = wipeFreedMemoryScope();
    sock.on('close', () => {
      this.#sockets.delete(sock);
      wipeScope();
    });
    sock.on('error', () => sock.destroy());
    const send = (r: ControlResponse) => {
      if (!sock.destroyed) sock.write(JSON.stringify(r) + '\n');
    };
    // The socket is 0600 in a 0700 dir; SO_PEERCRED checks again that the client is root or our uid.
    const who = peerCredentials(sock);
    const me = process.getuid?.() ?? 0;
    if (who && who.uid !== 0 && who.uid !== me) {
      log.warn('control client refused: not root and not the daemon user', { pid: who.pid, uid: who.uid });
      send({
        id: null,
        ok: false,
        error: {
          code: 'EDAEMON_PERM',
          message: `uid ${who.uid} may not use this daemon (only root and uid ${me})`,
          exitCode: 2,
        },
      });
      sock.end();
      return;
    }
    const run = (req: ControlRequest, bytes?: Buffer) => {
      const handler = Object.hasOwn(this.#handlers, req.op) ? this.#handlers[req.op] : undefined;
      if (!handler) {
        bytes?.fill(0);
        send({
          id: req.id,
          ok: false,
          error: { code: 'EUNKNOWN_OP', message: `unknown control operation '${req.op}'`, exitCode: 1 },
        });
        return;
      }
      // A handler may throw synchronously (argument checks): that must become a response, not an
      // uncaught exception that takes the daemon down.
      Promise.resolve()
        .then(() => handler(req.args))
        .then(
          (result) => send({ id: req.id, ok: true, result: result ?? null }),
          (e) => {
            if (!isCryptmapError(e))
              log.error('control operation failed', { op: req.op, error: e instanceof Error ? e.message : String(e) });
            send({ id: req.id, ok: false, error: errorBody(e) });
          },
        )
        // Binary arguments (keys) are wiped once the handler is done with them, whatever it did.
        .finally(() => bytes?.fill(0));
    };
    let awaiting: ControlRequest | null = null;
    const push = lineSplitter(
      (line) => {
        if (line.trim() === '') return;
        let req: ControlRequest;
        try {
          req = parseRequest(line);
        } catch (e) {
          send({ id: null, ok: false, error: errorBody(e) });
          sock.end();
          return;
        }
        if (!req.bin) {
          run(req);
          return undefined;
        }
        awaiting = req;
        return req.bin.reduce((a, [, n]) => a + n, 0);
      },
      () => {
        send({ id: null, ok: false, error: { code: 'EPROTO', message: 'control request line too long', exitCode: 1 } });
        sock.end();
      },
      (bytes) => {
        const req = awaiting!;
        awaiting = null;
        let at = 0;
        for (const [name, n] of req.bin!) {
          req.args[name] = bytes.subarray(at, at + n);
          at += n;
        }
        run(req, bytes);
      },
    );
    sock.on('data', push);
    // A connection that ends half-way through a request may leave part of a key behind: zero it.
    sock.on('close', push.wipe);
  }

  async close(): Promise<void> {
    const server = this.#server;
    this.#server = null;
    for (const s of this.#sockets) s.destroy();
    if (server) await new Promise<void>((res) => server.close(() => res()));
    if (this.#path && existsSync(this.#path)) unlinkSync(this.#path);
  }
}

function errorBody(e: unknown): { code: string; message: string; exitCode: number } {
  if (isCryptmapError(e)) return { code: e.code, message: e.message, exitCode: e.exitCode };
  return { code: 'EINTERNAL', message: `internal error: ${e instanceof Error ? e.message : String(e)}`, exitCode: 1 };
}
