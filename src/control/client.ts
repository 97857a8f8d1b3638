/**
 * Control socket client used by the CLI: connect, send requests, map error responses back to
 * CryptmapError with the daemon's code and exit code.
 *
 * Requests carry volume keys, so before anything is sent the client checks whom it talks to (issue 11
 * item 3): the runtime dir and every directory above it owned by root or us and not writable by
 * others, the socket a socket (not a symlink) owned by root or us (util/trusted-path.ts), and the
 * listening process's uid root or ours (SO_PEERCRED, util/peercred.ts). Otherwise EUNTRUSTED_DAEMON.
 */
import { type Socket, connect } from 'node:net';
import { CryptmapError, isCryptmapError, toErrorCode } from '../util/errors.js';
import { untrustedPeer } from '../util/peercred.js';
import { checkTrustedSocket } from '../util/trusted-path.js';
import {
  type CallRest,
  type ControlErrorBody,
  type ControlOp,
  type ControlResponse,
  encodeRequest,
  lineSplitter,
  type OpResult,
} from './protocol.js';
import { controlSocketPath } from './runtime-dir.js';

export const DAEMON_NOT_RUNNING = "cryptmap: the daemon is not running (start it with 'cryptmap daemon')";

/** The daemon's error reply as a CryptmapError (a code this build does not know becomes EINTERNAL). */
function replyError(body: ControlErrorBody): CryptmapError {
  return new CryptmapError(toErrorCode(body.code, 'EINTERNAL'), body.message, { exitCode: body.exitCode });
}

/**
 * How long a request waits for the daemon's answer by default: long enough for its slowest
 * operation (a suspend that drains I/O, a close that flushes to remote storage riding out its 30 s
 * reconnect), finite so that a daemon that accepts and never answers cannot hold a verb for ever.
 */
export const CONTROL_REQUEST_TIMEOUT_MS = 300_000;

export interface ControlClientOptions {
  /** Deadline of each request unless the call gives its own (default CONTROL_REQUEST_TIMEOUT_MS). */
  requestTimeoutMs?: number;
}

export class ControlClient {
  readonly #sock: Socket;
  readonly #timeoutMs: number;
  #nextId = 1;
  readonly #waiting = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  #closedError: Error | null = null;
  readonly #fail: (e: Error) => void;

  private constructor(sock: Socket, timeoutMs: number) {
    this.#sock = sock;
    this.#timeoutMs = timeoutMs;
    const fail = (e: Error) => {
      this.#closedError ??= e;
      for (const w of this.#waiting.values()) w.reject(e);
      this.#waiting.clear();
    };
    this.#fail = fail;
    sock.on(
      'data',
      lineSplitter(
        (line) => {
          let r: ControlResponse;
          try {
            r = JSON.parse(line) as ControlResponse;
          } catch {
            fail(new CryptmapError('EPROTO', 'daemon sent an invalid response'));
            sock.destroy();
            return;
          }
          const w = r.id === null ? undefined : this.#waiting.get(r.id);
          if (r.id !== null) this.#waiting.delete(r.id);
          if (!w) {
            if (!r.ok) fail(replyError(r.error));
            return;
          }
          if (r.ok) w.resolve(r.result);
          else w.reject(replyError(r.error));
        },
        () => {
          fail(new CryptmapError('EPROTO', 'daemon response too long'));
          sock.destroy();
        },
      ),
    );
    sock.on('error', (e) => fail(e));
    sock.on('close', () =>
      fail(new CryptmapError('EDAEMON_GONE', 'the cryptmap daemon closed the connection', { exitCode: 1 })),
    );
  }

  /** Connect to the daemon in `runtimeDir`; a clear error when it is not running. */
  static async connect(runtimeDir: string, opts: ControlClientOptions = {}): Promise<ControlClient> {
    const path = controlSocketPath(runtimeDir);
    const mapError = (e: NodeJS.ErrnoException): Error => {
      const sys =
        e.code === 'EUNTRUSTED_DAEMON' ? ((e.cause as NodeJS.ErrnoException | undefined)?.code ?? e.code) : e.code;
      if (sys === 'ENOENT' || sys === 'ECONNREFUSED')
        return new CryptmapError('EDAEMON_DOWN', `${DAEMON_NOT_RUNNING} [no daemon at ${path}]`, { exitCode: 1 });
      if (sys === 'EACCES' || sys === 'EPERM')
        return new CryptmapError(
          'EDAEMON_PERM',
          `cryptmap: permission denied on ${path} (the daemon accepts only its owner and root)`,
          { exitCode: 2 },
        );
      return e;
    };
    try {
      checkTrustedSocket(path, { code: 'EUNTRUSTED_DAEMON' });
    } catch (e) {
      throw isCryptmapError(e) && e.cause === undefined ? e : mapError(e as NodeJS.ErrnoException);
    }
    const sock = connect(path);
    await new Promise<void>((res, rej) => {
      sock.once('connect', () => res());
      sock.once('error', (e: NodeJS.ErrnoException) => rej(mapError(e)));
    });
    const bad = untrustedPeer(sock, path, 'EUNTRUSTED_DAEMON');
    if (bad) {
      sock.destroy();
      throw bad;
    }
    return new ControlClient(sock, opts.requestTimeoutMs ?? CONTROL_REQUEST_TIMEOUT_MS);
  }

  /**
   * Run operation `op` (protocol.ts ControlOps: its args, key and result are typed). A volume key
   * travels as raw bytes after the line (protocol.ts), never as a JSON string; the copy made for the
   * socket is wiped once written. The caller still owns and wipes its own key.
   *
   * @example
   *   const st = await c.call('volume.open', { mapping: mappingToJson(m) }, { key: volumeKey.expose() });
   */
  call<K extends ControlOp>(op: K, ...[args, bin]: CallRest<K>): Promise<OpResult<K>> {
    return this.request(
      op,
      (args ?? {}) as Record<string, unknown>,
      bin as Record<string, Uint8Array | undefined> | undefined,
    ) as Promise<OpResult<K>>;
  }

  /**
   * Send any operation, untyped (the transport under `call`; tests of the protocol itself). No answer
   * within `timeoutMs` (default: the client's) rejects with EDAEMON_TIMEOUT and closes the connection
   * (a late answer could no longer be told apart), failing any other request on it the same way.
   */
  request(
    op: string,
    args: Record<string, unknown> = {},
    bin?: Record<string, Uint8Array | undefined>,
    timeoutMs = this.#timeoutMs,
  ): Promise<unknown> {
    if (this.#closedError) return Promise.reject(this.#closedError);
    const id = this.#nextId++;
    return new Promise<unknown>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#fail(
          new CryptmapError(
            'EDAEMON_TIMEOUT',
            `the cryptmap daemon did not answer ${op} within ${timeoutMs / 1000} s (is it stuck? see its log)`,
            { exitCode: 1 },
          ),
        );
        this.#sock.destroy();
      }, timeoutMs);
      const done = () => clearTimeout(timer);
      this.#waiting.set(id, {
        resolve: (v) => {
          done();
          resolve(v);
        },
        reject: (e) => {
          done();
          reject(e);
        },
      });
      const { line, binary } = encodeRequest(id, op, args, bin);
      this.#sock.write(line);
      for (const b of binary) this.#sock.write(b, () => b.fill(0));
    });
  }

  close(): void {
    this.#sock.end();
  }
}
