/**
 * The daemon's runtime directory: control socket, NBD socket, pid file. Chosen by `--runtime-dir`,
 * else CRYPTMAP_RUNTIME_DIR, else /run/cryptmap. Created 0700; an existing directory that others can
 * read or write is tightened, one owned by another user is refused.
 */
import { chmodSync, lstatSync, mkdirSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { CryptmapError, EXIT_NO_PERMISSION } from '../util/errors.js';

export const DEFAULT_RUNTIME_DIR = '/run/cryptmap';

export function runtimeDir(flag?: string, env: NodeJS.ProcessEnv = process.env): string {
  return resolve(flag ?? env.CRYPTMAP_RUNTIME_DIR ?? DEFAULT_RUNTIME_DIR);
}

export function controlSocketPath(dir: string): string {
  return join(dir, 'control.sock');
}

export function nbdSocketPath(dir: string): string {
  return join(dir, 'nbd.sock');
}

/** Create (or check) the runtime dir with mode 0700. */
export function ensureRuntimeDir(dir: string): void {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const st = lstatSync(dir);
  if (!st.isDirectory()) throw new CryptmapError('ERUNDIR', `runtime dir ${dir} is not a directory`, { exitCode: EXIT_NO_PERMISSION });
  const uid = process.getuid?.();
  if (uid !== undefined && st.uid !== uid) {
    throw new CryptmapError('ERUNDIR', `runtime dir ${dir} belongs to uid ${st.uid}, not to us (uid ${uid}); refusing to use it`, {
      exitCode: EXIT_NO_PERMISSION,
    });
  }
  if ((st.mode & 0o077) !== 0) chmodSync(dir, 0o700);
}
