/**
 * The credentials of the process at the other end of a connected Unix socket (SO_PEERCRED, socket(7)),
 * through the native addon (native/peercred.c): Node has no API for them.
 *
 * Without the addon (not built) the answer is `undefined` and callers rely on the path checks alone
 * (util/trusted-path.ts checkTrustedSocket: every directory up to the socket owned by root or the
 * caller and not writable by others, the socket itself owned by root or the caller). Those establish
 * the same thing under our threat model: only a process running as root or as the caller can bind a
 * socket in such a directory, and nobody else can rename one into it. SO_PEERCRED is the second,
 * independent check (it also covers a socket inherited by a process that changed uid). Decided
 * against a /proc/net/unix + /proc/PID/fd scan: without privileges it cannot see root's processes,
 * so it could not tell a root daemon from an absent one.
 */
import type { Socket } from 'node:net';
import { CryptmapError, type ErrorCode, EXIT_NO_PERMISSION } from './errors.js';
import { loadNative } from './native.js';

export interface PeerCred {
  pid: number;
  uid: number;
  gid: number;
}

/** The file descriptor behind a connected net.Socket (Unix socket), when Node exposes it. */
export function socketFd(sock: Socket): number | undefined {
  const fd = (sock as unknown as { _handle?: { fd?: number } })._handle?.fd;
  return typeof fd === 'number' && fd >= 0 ? fd : undefined;
}

/**
 * The peer's pid, uid and gid, or undefined when they cannot be read (no addon, no descriptor).
 * @example const who = peerCredentials(sock); if (who && who.uid !== 0) sock.destroy();
 */
export function peerCredentials(sock: Socket): PeerCred | undefined {
  const addon = loadNative();
  if (!addon || typeof addon.peerCred !== 'function') return undefined;
  const fd = socketFd(sock);
  if (fd === undefined) return undefined;
  try {
    return addon.peerCred(fd);
  } catch {
    return undefined;
  }
}

/** True when SO_PEERCRED can be read in this process (the addon has peerCred). */
export function peerCredAvailable(): boolean {
  return typeof loadNative()?.peerCred === 'function';
}

/**
 * For a client about to send a secret: a refusal when the peer's uid is neither root nor ours
 * (undefined when it is, or when SO_PEERCRED cannot be read: see the file comment).
 */
export function untrustedPeer(sock: Socket, path: string, code: ErrorCode): CryptmapError | undefined {
  const who = peerCredentials(sock);
  if (!who) return undefined;
  const me = process.getuid?.() ?? 0;
  if (who.uid === 0 || who.uid === me) return undefined;
  return new CryptmapError(
    code,
    `refusing ${path}: the process listening there (pid ${who.pid}) runs as uid ${who.uid}, not as root or uid ${me}; nothing was sent`,
    {
      exitCode: EXIT_NO_PERMISSION,
      errno: 'EPERM',
      context: { path, peerUid: who.uid },
    },
  );
}
