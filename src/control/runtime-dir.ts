/**
 * The daemon's runtime directory: control socket, NBD socket, pid file. Chosen by `--runtime-dir`,
 * else CRYPTMAP_RUNTIME_DIR, else /run/cryptmap. Created 0700 one component at a time; an existing
 * directory is used only when it and every directory above it pass util/trusted-path.ts (owned by
 * root or us, not writable by others; the runtime dir itself 0700): a 0777 or 0755 directory, or one
 * owned by another user, is refused with the fix, never tightened (it may hold what others planted).
 */
import { join, resolve } from 'node:path';
import { ensureTrustedDir } from '../util/trusted-path.js';

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

/**
 * Create (or check) the runtime dir: trusted path, mode 0700. Returns the real path.
 * @example const dir = ensureRuntimeDir(runtimeDir(flag));
 */
export function ensureRuntimeDir(dir: string): string {
  return ensureTrustedDir(dir, { code: 'ERUNDIR', mode: 0o700, private: true });
}
