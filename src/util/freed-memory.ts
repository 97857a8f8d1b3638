/**
 * Freed heap memory overwritten while secrets may pass through buffers this process does not own.
 * Node copies a socket read that came in shorter than its 64 KiB read buffer into a buffer of the
 * right size and frees the first one as it is (stream_base.cc); a volume key read from the control
 * socket then stays in that freed chunk until malloc reuses it, beyond the reach of any wipe in
 * JavaScript. While at least one scope is open, glibc's M_PERTURB makes free() overwrite every chunk
 * it releases (native/dumpable.c). Scopes are short (one control connection), so the data path pays
 * the extra fill only while the CLI talks to the daemon.
 */
import { logger } from './log.js';
import { loadNative } from './native.js';

let open = 0;
let warned = false;

/**
 * Open a scope; the returned function closes it (idempotent). Where free() cannot be made to
 * overwrite (no glibc or no addon) a warning says so once.
 * @example const done = wipeFreedMemoryScope(); sock.once('close', done);
 */
export function wipeFreedMemoryScope(): () => void {
  const addon = loadNative();
  const set = (on: boolean): boolean => {
    try {
      return addon?.wipeFreedMemory?.(on) === true;
    } catch {
      return false;
    }
  };
  if (open++ === 0 && !set(true) && !warned) {
    warned = true;
    logger('secrets').warn(
      'freed heap memory is not overwritten (needs glibc and the native addon): a key read from the control socket may stay in freed memory until it is reused',
    );
  }
  let closed = false;
  return () => {
    if (closed) return;
    closed = true;
    if (--open === 0) set(false);
  };
}
