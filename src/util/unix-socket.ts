/**
 * Taking over a Unix socket path before listening on it (control, key service and NBD servers): a
 * socket nobody accepts on is stale and removed; a live one belongs to another server; anything that
 * is not a socket is never removed (a mistyped --socket must not delete a file).
 */
import { lstatSync, unlinkSync } from 'node:fs';
import { createConnection } from 'node:net';

/**
 * Make `path` free for listen(): 'free' when nothing was there or a stale socket was removed,
 * 'live' when a server answers on it, 'not-socket' when something else is there (left alone).
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
  const live = await new Promise<boolean>((resolve) => {
    const s = createConnection(path);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
  if (live) return 'live';
  unlinkSync(path);
  return 'free';
}
