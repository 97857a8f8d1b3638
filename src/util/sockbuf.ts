/**
 * A larger kernel send buffer for Unix stream sockets that carry NBD payloads (issue 15 performance).
 *
 * A Unix stream socket's sender is charged for every byte its peer has not read yet, up to its
 * SO_SNDBUF (net.core.wmem_default, 208 KiB by default). With 256 KiB requests many in flight, a
 * writer then moves at most ~214 KiB per write and the three processes of a chain (nbdcopy, cryptmap,
 * the storage server) take turns in lock step, one event loop round each per ~214 KiB: strace of
 * cryptmap under bench:remote showed every writev of queued replies stopping at 219264 bytes. The
 * buffer asked for here lets a writer hand over many payloads per system call. TCP sockets are left
 * alone (the kernel tunes their buffers, and a set SO_SNDBUF would turn that off); without the
 * native addon nothing changes.
 */
import type { Socket } from 'node:net';
import { loadNative } from './native.js';
import { socketFd } from './peercred.js';

/**
 * SO_SNDBUF asked for (the kernel doubles it for its bookkeeping and caps it at net.core.wmem_max):
 * 2 MiB, or CRYPTMAP_UNIX_SNDBUF bytes (0 leaves the kernel's default; for measurements).
 */
export const UNIX_SEND_BUFFER_BYTES = sendBufferBytes(process.env.CRYPTMAP_UNIX_SNDBUF);

function sendBufferBytes(v: string | undefined): number {
  const n = v === undefined || v === '' ? Number.NaN : Number(v);
  return Number.isSafeInteger(n) && n >= 0 && n <= 1 << 30 ? n : 2 << 20;
}

/**
 * Ask for a send buffer of `bytes` on `sock` when it is a Unix socket; returns the SO_SNDBUF the
 * kernel reports, or 0 when nothing was changed (TCP, no addon, no descriptor, an error).
 */
export function enlargeUnixSendBuffer(sock: Socket, bytes = UNIX_SEND_BUFFER_BYTES): number {
  if (bytes === 0) return 0;
  const addon = loadNative();
  if (!addon || typeof addon.unixSendBuffer !== 'function') return 0;
  const fd = socketFd(sock);
  if (fd === undefined) return 0;
  try {
    return addon.unixSendBuffer(fd, bytes);
  } catch {
    return 0;
  }
}
