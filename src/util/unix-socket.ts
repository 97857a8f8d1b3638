/**
 * Listening on a Unix socket path (control, key service and NBD servers): a socket nobody accepts on
 * is stale and removed; a live one belongs to another server; anything that is not a socket is never
 * removed (a mistyped --socket must not delete a file); the socket appears with its final mode.
 */
import { chmodSync, linkSync, lstatSync, mkdtempSync, rmdirSync, rmSync, unlinkSync } from 'node:fs';
import { createConnection, type Server } from 'node:net';
import { basename, dirname, join } from 'node:path';
import { type CryptmapError, type ErrorCode, fromSystemError } from './errors.js';

/** How long the probe of an existing socket may take before it counts as live (a connect normally settles at once). */
const PROBE_TIMEOUT_MS = 5_000;

/**
 * Make `path` free for listen(): 'free' when nothing was there or a stale socket was removed,
 * 'live' when a server answers on it, 'not-socket' when something else is there (left alone).
 * Only a refused connection (ECONNREFUSED: nobody listens) makes a socket stale; a full backlog
 * (EAGAIN: a busy server), any other failure or no answer within PROBE_TIMEOUT_MS leaves it alone
 * as live, so a server that is slow to accept never loses its socket.
 * @example if ((await clearStaleSocket(p)) !== 'free') throw new CryptmapError('EBUSY', `${p} is taken`);
 */
export async function clearStaleSocket(path: string): Promise<'free' | 'live' | 'not-socket'> {
  let isSocket: boolean;
  try {
    isSocket = lstatSync(path).isSocket();
  } catch {
    return 'free';
  }
  if (!isSocket) return 'not-socket';
  const state = await new Promise<'live' | 'stale' | 'gone'>((resolve) => {
    const s = createConnection(path);
    const settle = (v: 'live' | 'stale' | 'gone') => {
      clearTimeout(timer);
      s.destroy();
      resolve(v);
    };
    const timer = setTimeout(() => settle('live'), PROBE_TIMEOUT_MS);
    s.once('connect', () => settle('live'));
    s.once('error', (e: NodeJS.ErrnoException) =>
      settle(e.code === 'ECONNREFUSED' ? 'stale' : e.code === 'ENOENT' ? 'gone' : 'live'),
    );
  });
  if (state === 'live') return 'live';
  if (state === 'stale') rmSync(path, { force: true });
  return 'free';
}

export interface UnixListenErrors {
  /** Code of a failure to bind or place the socket (with the system error as cause). */
  code: ErrorCode;
  /** Another server answers on the path. */
  live: (path: string) => CryptmapError;
  /** Something that is not a socket is at the path (left alone). */
  notSocket: (path: string) => CryptmapError;
}

/**
 * Listen with `server` on the Unix socket `path`, which gets `mode`: a stale socket is replaced
 * (clearStaleSocket); the socket is bound under a private temporary directory next to `path`,
 * chmod-ed, then linked into place, so it is never reachable under `path` with a wider mode (no
 * umask window); link(2), unlike rename(2), never replaces what another process put at `path` since
 * the check (EEXIST). The caller removes `path` when it closes the server.
 *
 * @example
 *   await listenUnixSocket(createServer(serve), '/run/cryptmap/control.sock', 0o600, errors);
 */
export async function listenUnixSocket(
  server: Server,
  path: string,
  mode: number,
  errors: UnixListenErrors,
): Promise<void> {
  const state = await clearStaleSocket(path);
  if (state === 'live') throw errors.live(path);
  if (state === 'not-socket') throw errors.notSocket(path);
  let tmpDir: string;
  try {
    tmpDir = mkdtempSync(join(dirname(path), `.${basename(path)}-`));
  } catch (e) {
    throw fromSystemError(errors.code, `cannot create the socket next to ${path}`, e);
  }
  const tmpPath = join(tmpDir, 's');
  try {
    await new Promise<void>((res, rej) => {
      server.once('error', rej);
      server.listen(tmpPath, () => {
        server.off('error', rej);
        res();
      });
    });
    chmodSync(tmpPath, mode);
    linkSync(tmpPath, path);
  } catch (e) {
    server.close();
    throw fromSystemError(errors.code, `cannot listen on ${path}`, e);
  } finally {
    try {
      unlinkSync(tmpPath);
    } catch {}
    try {
      rmdirSync(tmpDir);
    } catch {}
  }
}
