/**
 * cryptsetup's reencryption lock, taken the same way so that cryptmap and cryptsetup 2.6 never run a
 * reencryption of the same LUKS2 device at once (facts from cryptsetup's lib/utils_device_locking.c
 * and lib/luks2/luks2_reencrypt.c, read, not copied):
 *
 *   - the lock is flock(2) LOCK_EX|LOCK_NB on `/run/cryptsetup/LN_LUKS2-reencryption-<UUID>` (the
 *     header's UUID as the header spells it; the directory is created 0700 when missing);
 *   - held by whoever rewrites data (a reencryption, its resume, a crash recovery, the activation of
 *     a device in reencryption), for as long as it does; a holder that dies loses it (the kernel drops
 *     the flock; the file stays, and is reused);
 *   - after the flock, the file's inode is compared with the path's (another holder may have removed
 *     the file in between: take it again); on release the holder removes the file if it is still the
 *     one it locked, then closes it;
 *   - busy: cryptsetup says "Reencryption process is already running." (resume), "Reencryption
 *     in-progress. Cannot activate device." (open) and exits 5 (EBUSY); `--disable-locks` skips it.
 *
 * Trust: the directory must be root's and not writable by group or others (util/trusted-path.ts; a
 * directory that fails is refused, never repaired); the file is opened with O_NOFOLLOW and checked with
 * fstat (a regular file of root's, one link). Only root takes the lock: cryptsetup's directory is
 * root's 0700, so an unprivileged process can neither take nor see it (an unprivileged cryptsetup
 * cannot reencrypt without --disable-locks either); cryptmap then relies on its own device lock
 * (lock.ts) and the header's seqid check. The addon's flock binding is needed (native/extras.c);
 * without the addon the lock is skipped with a warning. `$CRYPTMAP_CRYPTSETUP_LOCK_DIR` replaces
 * the directory (tests; the same trust rule applies).
 */
import { closeSync, constants, fstatSync, lstatSync, unlinkSync } from 'node:fs';
import { join } from 'node:path';
import { CryptmapError, EXIT_BUSY, EXIT_FAILURE } from '../util/errors.js';
import { logger } from '../util/log.js';
import { FLOCK, loadNative } from '../util/native.js';
import { ensureTrustedDir, openTrustedFile } from '../util/trusted-path.js';

const log = logger('luks');

/** cryptsetup 2.6's compiled-in lock directory (configure --with-luks2-lock-path, Debian's too). */
export const CRYPTSETUP_LOCK_DIR = '/run/cryptsetup';

/** What cryptsetup prints when a reencryption (or resume) finds the lock taken. */
export const REENCRYPT_BUSY = 'Reencryption process is already running.';

/** How `takeReencryptLock` takes the lock. */
export interface ReencryptLockOptions {
  /** Where `CRYPTMAP_CRYPTSETUP_LOCK_DIR` is read (default process.env). */
  env?: NodeJS.ProcessEnv;
  /** `--disable-locks`: take nothing (as cryptsetup). */
  disabled?: boolean;
  /** The refusal when another process holds the lock (default REENCRYPT_BUSY). */
  busyMessage?: string;
}

/** A held reencryption lock; `release()` is idempotent. */
export interface ReencryptLock {
  /** The lock file, or undefined when nothing was taken (disabled, not root, no addon). */
  readonly path: string | undefined;
  /** Unlock and remove the lock file if it is still the one locked; a second call does nothing. */
  release(): void;
}

const NONE: ReencryptLock = { path: undefined, release: () => undefined };

/** The lock file's path for a header UUID (`<dir>/LN_LUKS2-reencryption-<uuid>`). */
export function reencryptLockPath(uuid: string, env: NodeJS.ProcessEnv = process.env): string {
  return join(env.CRYPTMAP_CRYPTSETUP_LOCK_DIR || CRYPTSETUP_LOCK_DIR, `LN_LUKS2-reencryption-${uuid}`);
}

function failed(why: string, cause?: unknown): CryptmapError {
  return new CryptmapError('ELOCKDIR', `Failed to acquire reencryption lock (${why}).`, {
    exitCode: EXIT_FAILURE,
    ...(cause !== undefined ? { cause } : {}),
  });
}

/**
 * Take cryptsetup's reencryption lock of the LUKS2 volume `uuid` without waiting: throws EBUSY (exit
 * 5, cryptsetup's message) when another process holds it. The caller releases it when done.
 * @example const lock = takeReencryptLock(vol.uuid); try { ... } finally { lock.release(); }
 */
export function takeReencryptLock(uuid: string, o: ReencryptLockOptions = {}): ReencryptLock {
  if (o.disabled) return NONE;
  // The UUID comes from a header that may be hostile: it names a file, so it must stay one name.
  if (!/^[0-9A-Za-z-]{1,40}$/.test(uuid)) throw failed(`the header's UUID ${JSON.stringify(uuid)} is not a UUID`);
  if ((process.getuid?.() ?? 0) !== 0) {
    log.debug('not root: cryptsetup reencryption lock not taken', { uuid });
    return NONE;
  }
  const flock = loadNative()?.flock;
  if (!flock) {
    log.warn('the native addon has no flock: cryptsetup reencryption lock not taken (build it)', { uuid });
    return NONE;
  }
  const env = o.env ?? process.env;
  const file = reencryptLockPath(uuid, env);
  const dir = ensureTrustedDir(env.CRYPTMAP_CRYPTSETUP_LOCK_DIR || CRYPTSETUP_LOCK_DIR, {
    owners: 'root',
    symlinks: 'refuse',
    mode: 0o700,
    private: false,
    code: 'ELOCKDIR',
  });
  const path = join(dir, `LN_LUKS2-reencryption-${uuid}`);
  // Another holder may unlink the file between our open and our flock: then lock the new one.
  for (let attempt = 0; attempt < 16; attempt++) {
    const fd = openTrustedFile(path, constants.O_RDWR | constants.O_CREAT | constants.O_NONBLOCK, {
      owners: 'root',
      code: 'ELOCKDIR',
    });
    let keep = false;
    try {
      if (!flock(fd, FLOCK.LOCK_EX | FLOCK.LOCK_NB))
        throw new CryptmapError('EBUSY', o.busyMessage ?? REENCRYPT_BUSY, {
          exitCode: EXIT_BUSY,
          errno: 'EBUSY',
          context: { path: file },
        });
      const held = fstatSync(fd);
      const now = lstatSync(path, { throwIfNoEntry: false });
      if (now && now.ino === held.ino && now.dev === held.dev) {
        keep = true;
        return lockHandle(fd, path, flock);
      }
      flock(fd, FLOCK.LOCK_UN);
    } finally {
      if (!keep) closeSync(fd);
    }
  }
  throw failed(`${path} kept changing while it was being locked`);
}

function lockHandle(fd: number, path: string, flock: (fd: number, op: number) => boolean): ReencryptLock {
  let open = true;
  return {
    path,
    release() {
      if (!open) return;
      open = false;
      try {
        // Still the file we locked: remove it, as cryptsetup's release does, before the flock goes.
        const held = fstatSync(fd);
        const now = lstatSync(path, { throwIfNoEntry: false });
        if (now && now.ino === held.ino && now.dev === held.dev) unlinkSync(path);
      } catch (e) {
        log.debug('reencryption lock file not removed', { path, error: String(e) });
      }
      try {
        flock(fd, FLOCK.LOCK_UN);
      } finally {
        closeSync(fd);
      }
    },
  };
}

/** Run `fn` holding cryptsetup's reencryption lock of `uuid` (see takeReencryptLock). */
export async function withReencryptLock<T>(
  uuid: string,
  fn: () => Promise<T>,
  o: ReencryptLockOptions = {},
): Promise<T> {
  const lock = takeReencryptLock(uuid, o);
  try {
    return await fn();
  } finally {
    lock.release();
  }
}
