/**
 * Exclusive lock on a LUKS image while its header is updated (cryptsetup "LUKS2 header locking":
 * flock(2) on the device, lock files in /run/cryptsetup for block devices).
 *
 * Node has no flock(2), and spawning `flock` would be a process per change, so cryptmap uses lock
 * files: `<runtime dir>/locks/L_<st_dev>_<st_ino>` created with O_EXCL (`wx`) holding the owner's pid.
 * Keyed by device and inode, so every path to the same image (symlinks, bind mounts) takes the same
 * lock. The runtime dir is `$CRYPTMAP_LOCK_DIR`, else `/run/cryptmap/locks` for root, else
 * `$XDG_RUNTIME_DIR/cryptmap-UID/locks` (or `/tmp/cryptmap-UID/locks`), created 0700 one component at
 * a time and checked by util/trusted-path.ts: another user who created `/tmp/cryptmap-UID` first (to
 * read or remove our locks) is refused, never trusted. Lock files are created with O_EXCL|O_NOFOLLOW.
 * An NBD URI (a remote device: no inode here) is locked by `L_nbd_<sha256 of the URI>`, as cryptsetup's
 * per-device lock would: cryptmap processes on this host serialise their header updates of the same
 * export (spelled the same way; other hosts are not seen). A lock whose pid is gone (a crashed process) is broken. This serialises cryptmap processes; against other tools (cryptsetup)
 * the seqid check in luks2-header.ts detects concurrent updates.
 */
import { createHash } from 'node:crypto';
import { readFile, stat, unlink } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { isNbdUri } from '../nbd-wire/uri.js';
import { CryptmapError, EXIT_BUSY } from '../util/errors.js';
import { createExclusiveFile, ensureTrustedDir } from '../util/trusted-path.js';

/** The directory holding the header update lock files (`$CRYPTMAP_LOCK_DIR`, else per user, see above). */
export function lockDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.CRYPTMAP_LOCK_DIR) return env.CRYPTMAP_LOCK_DIR;
  if (process.getuid?.() === 0) return '/run/cryptmap/locks';
  return join(env.XDG_RUNTIME_DIR ?? tmpdir(), `cryptmap-${process.getuid?.() ?? 0}`, 'locks');
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Run `fn` holding the exclusive update lock of the image or device at `path`. */
export async function withDeviceLock<T>(
  path: string,
  fn: () => Promise<T>,
  opts: { timeoutMs?: number; env?: NodeJS.ProcessEnv } = {},
): Promise<T> {
  let key: string;
  if (isNbdUri(path)) key = `L_nbd_${createHash('sha256').update(path).digest('hex').slice(0, 32)}`;
  else {
    const st = await stat(path).catch(() => null);
    if (!st) return fn(); // nothing to lock yet; opening the device reports the error
    key = `L_${st.dev}_${st.ino}`;
  }
  const dir = lockDir(opts.env);
  ensureTrustedDir(dir, { code: 'ELOCKDIR', mode: 0o700, private: true });
  const file = join(dir, key);
  const deadline = Date.now() + (opts.timeoutMs ?? 30000);
  for (;;) {
    try {
      createExclusiveFile(file, String(process.pid));
      break;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
      const owner = Number((await readFile(file, 'utf8').catch(() => '')).trim());
      if (Number.isInteger(owner) && owner > 0 && !alive(owner)) {
        await unlink(file).catch(() => {});
        continue;
      }
      if (Date.now() > deadline)
        throw new CryptmapError('ELOCKED', `Device ${path} is busy (locked by process ${owner || '?'}).`, {
          exitCode: EXIT_BUSY,
          errno: 'EBUSY',
        });
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  try {
    return await fn();
  } finally {
    await unlink(file).catch(() => {});
  }
}
