/**
 * Running the system tools cryptmap drives (losetup, nbdfuse, nbd-client, mkfs.*, mount, swapon...)
 * and reading /proc/self/mounts. One runner for every layer: argv only (never a shell), never a
 * secret in argv, and a CryptmapError that names the tool and, when it is missing, its Debian package.
 */
import { execFile } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { CryptmapError, type ErrorCode, EXIT_FAILURE } from './errors.js';

/** Debian package of each tool, for "not installed" messages. */
const PACKAGE_OF: Record<string, string> = {
  nbdfuse: 'libnbd-bin',
  'nbd-client': 'nbd-client',
  fusermount3: 'fuse3',
  losetup: 'mount',
  mount: 'mount',
  umount: 'mount',
  'mkfs.ext4': 'e2fsprogs',
  'mkfs.ext3': 'e2fsprogs',
  'mkfs.ext2': 'e2fsprogs',
  'mkfs.xfs': 'xfsprogs',
  'mkfs.btrfs': 'btrfs-progs',
  mkswap: 'util-linux',
  blkid: 'util-linux',
  wipefs: 'util-linux',
  swapon: 'util-linux',
  swapoff: 'util-linux',
};

/** The Debian package that provides `cmd` (for "is not installed" messages); `cmd` itself when not listed. */
export function debianPackage(cmd: string): string {
  return PACKAGE_OF[cmd] ?? cmd;
}

/** `cmd` on PATH, else in /usr/sbin or /sbin (not on an ordinary user's PATH on Debian). */
export function resolveTool(cmd: string): string {
  if (cmd.includes('/')) return cmd;
  for (const d of [...(process.env.PATH ?? '').split(':').filter(Boolean), '/usr/sbin', '/sbin']) {
    if (existsSync(join(d, cmd))) return join(d, cmd);
  }
  return cmd;
}

export interface RunToolOptions {
  /** Error code of the CryptmapError on failure (default ETOOL). */
  code?: ErrorCode;
  /** Default 120 s. */
  timeoutMs?: number;
}

/** execFile with a CryptmapError naming the tool (and its Debian package when it is missing); resolves stdout. */
export function runTool(cmd: string, args: string[], opts: RunToolOptions = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(
      resolveTool(cmd),
      args,
      { encoding: 'utf8', timeout: opts.timeoutMs ?? 120_000 },
      (err, stdout, stderr) => {
        if (!err) return resolve(stdout);
        const missing = (err as NodeJS.ErrnoException).code === 'ENOENT';
        const message = missing
          ? `${cmd} is not installed (Debian package ${debianPackage(cmd)})`
          : `${cmd} ${args.join(' ')} failed: ${(stderr || err.message).trim()}`;
        reject(new CryptmapError(opts.code ?? 'ETOOL', message, { errno: 'EIO', exitCode: EXIT_FAILURE, cause: err }));
      },
    );
  });
}

/** Undo the octal escapes of /proc/self/mounts and /proc/swaps (`\040` = space). */
export function unescapeMount(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(Number.parseInt(o, 8)));
}

/** Lines of /proc/self/mounts as [source, mountpoint], octal escapes undone. */
export function mounts(): [string, string][] {
  try {
    return readFileSync('/proc/self/mounts', 'utf8')
      .split('\n')
      .filter(Boolean)
      .map((l) => {
        const f = l.split(' ');
        return [unescapeMount(f[0] ?? ''), unescapeMount(f[1] ?? '')];
      });
  } catch {
    return [];
  }
}

/** Where `devicePath` is mounted (first match), if anywhere. */
export function mountedAt(devicePath: string): string | undefined {
  return mounts().find(([dev]) => dev === devicePath)?.[1];
}
