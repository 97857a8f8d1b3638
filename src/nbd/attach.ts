/**
 * Attach an NBD export as a kernel block device, and detach it again (INTEROP.md "A real file
 * system on an NBD export").
 *
 * - 'kernel': the kernel nbd client, `nbd-client -unix SOCKET -N NAME /dev/nbdX`, when the nbd module
 *   is loaded (/sys/module/nbd exists).
 * - 'fuse': without the nbd module, `nbdfuse DIR/mnt/disk URI` (libnbd) exposes the export as a file
 *   and `losetup -f --show` turns that file into /dev/loopN.
 *
 * Only paths and the export name appear in the argv of the spawned tools; no secret ever does (the
 * export already serves decrypted data). Detach undoes the steps in reverse order. AttachInfo is
 * plain JSON so a daemon can record it and detach after a restart.
 *
 * The NBD server usually runs in the calling process, so nothing here touches the FUSE file or the
 * block device synchronously: a blocking call would stall the event loop that must answer the NBD
 * requests the kernel makes meanwhile (deadlock). Only fs/promises and spawned tools go near them.
 */
import { spawn } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { loopBound } from '../blockdev/loop.js';
import { CryptmapError } from '../util/errors.js';
import { runTool } from '../util/tools.js';
import { nbdUnixUri } from '../nbd-wire/uri.js';

/** How an export became a kernel block device: the kernel NBD client (`/dev/nbdN`) or nbdfuse + loop. */
export type AttachMethod = 'kernel' | 'fuse';

/** What `attachExport` attaches and how (kernel NBD client or nbdfuse + loop). */
export interface AttachOptions {
  /** Unix socket of the NBD server. */
  socketPath: string;
  exportName: string;
  /** 'auto' (default): kernel client when /sys/module/nbd exists, else nbdfuse + loop. */
  method?: AttachMethod | 'auto';
  /** Where the FUSE work directory is made (mode 0700). Default os.tmpdir(). */
  workDir?: string;
  /** Attach read-only (nbdfuse -r, losetup -r). */
  readOnly?: boolean;
  /** How long to wait for nbdfuse to come up. Default 20 s. */
  timeoutMs?: number;
  /**
   * The export's minimum block size (NBD_INFO_BLOCK_SIZE minimum). The kernel device gets it as its
   * logical block size (losetup --sector-size, nbd-client -b), so the kernel never sends smaller I/O,
   * like /dev/mapper/NAME of a dm-crypt table with sector_size:4096.
   */
  logicalBlockBytes?: number;
  /**
   * The device will hold swap: with the kernel client, nbd-client runs with `-swap` (locks its memory
   * and marks the socket for memory-pressure-safe I/O), recorded in AttachInfo.swap. nbdfuse has no
   * equivalent, so a FUSE attachment never has `swap` set.
   */
  swap?: boolean;
  /** Where sysfs is mounted (the nbd module and /sys/block/nbdN are looked up there). Default /sys; tests use a fake tree. */
  sysRoot?: string;
}

/** An attached export: its block device path and how to detach it. */
export interface AttachInfo {
  method: AttachMethod;
  /** The block device to use: /dev/nbdN or /dev/loopN. */
  devicePath: string;
  exportName: string;
  /** fuse: the work directory (holds `mnt/disk`, the pid file and nbdfuse's log). */
  fuseDir?: string;
  /** fuse: nbdfuse's process id. */
  fusePid?: number;
  /** kernel: attached with nbd-client -swap (safe for swapon). */
  swap?: boolean;
}

const SYS_ROOT = '/sys';
const nbdModuleLoaded = (sysRoot: string) => existsSync(join(sysRoot, 'module', 'nbd'));

const run = (cmd: string, args: string[], timeoutMs = 60_000): Promise<string> =>
  runTool(cmd, args, { code: 'EATTACH', timeoutMs });

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** Attach `exportName` and return where it is. Cleans up after itself when a step fails. */
export async function attachExport(opts: AttachOptions): Promise<AttachInfo> {
  let method = opts.method ?? 'auto';
  if (method === 'auto') method = nbdModuleLoaded(opts.sysRoot ?? SYS_ROOT) ? 'kernel' : 'fuse';
  return method === 'kernel' ? attachKernel(opts) : attachFuse(opts);
}

/** Undo attachExport. Idempotent: steps already undone are skipped. */
export async function detachExport(info: AttachInfo): Promise<void> {
  if (info.method === 'kernel') {
    await run('nbd-client', ['-d', info.devicePath]);
    return;
  }
  const loop = info.devicePath;
  if (loop.startsWith('/dev/loop') && !loopDetached(loop))
    await retry(
      () => run('losetup', ['-d', loop]),
      () => loopDetached(loop),
    );
  const dir = info.fuseDir;
  if (dir) {
    const mnt = join(dir, 'mnt');
    if (isMounted(mnt))
      await retry(
        () => run('fusermount3', ['-u', mnt]),
        () => !isMounted(mnt),
      );
  }
  if (info.fusePid) {
    for (let i = 0; i < 100 && alive(info.fusePid); i++) await sleep(50);
    if (alive(info.fusePid)) process.kill(info.fusePid, 'SIGTERM');
  }
  if (dir) await rm(dir, { recursive: true, force: true });
}

function loopDetached(dev: string): boolean {
  return !loopBound(dev);
}

async function retry(step: () => Promise<unknown>, done: () => boolean, attempts = 20): Promise<void> {
  for (let i = 0; ; i++) {
    try {
      await step();
      return;
    } catch (e) {
      if (done()) return;
      if (i + 1 >= attempts) throw e;
      await sleep(100); // the kernel may still hold the device for a moment (udev, a just-unmounted fs)
    }
  }
}

function isMounted(path: string): boolean {
  try {
    return readFileSync('/proc/self/mounts', 'utf8')
      .split('\n')
      .some((l) => l.split(' ')[1] === path);
  } catch {
    return false;
  }
}

async function attachFuse(opts: AttachOptions): Promise<AttachInfo> {
  const base = opts.workDir ?? tmpdir();
  mkdirSync(base, { recursive: true, mode: 0o700 });
  const dir = mkdtempSync(join(base, 'nbdfuse-'));
  const mnt = join(dir, 'mnt');
  mkdirSync(mnt, { mode: 0o700 });
  const pidFile = join(dir, 'nbdfuse.pid');
  const logFile = join(dir, 'nbdfuse.log');
  const info: AttachInfo = { method: 'fuse', devicePath: '', exportName: opts.exportName, fuseDir: dir };
  try {
    const logFd = openSync(logFile, 'w', 0o600);
    const args = [
      ...(opts.readOnly ? ['-r'] : []),
      '-P',
      pidFile,
      join(mnt, 'disk'),
      nbdUnixUri(opts.exportName, opts.socketPath),
    ];
    const child = spawn('nbdfuse', args, { detached: true, stdio: ['ignore', logFd, logFd] });
    closeSync(logFd);
    let spawnError: Error | null = null;
    let exited = false;
    child.once('error', (e) => {
      spawnError = e;
    });
    child.once('exit', () => {
      exited = true;
    });
    child.unref();
    info.fusePid = child.pid;
    const deadline = Date.now() + (opts.timeoutMs ?? 20_000);
    while (!existsSync(pidFile) || !(await exists(join(mnt, 'disk')))) {
      if (spawnError) {
        const missing = (spawnError as NodeJS.ErrnoException).code === 'ENOENT';
        throw new CryptmapError(
          'EATTACH',
          missing
            ? 'nbdfuse is not installed (Debian package libnbd-bin)'
            : `cannot start nbdfuse: ${(spawnError as Error).message}`,
          {
            errno: 'EIO',
          },
        );
      }
      if (exited) throw new CryptmapError('EATTACH', `nbdfuse exited: ${readLog(logFile)}`, { errno: 'EIO' });
      if (Date.now() > deadline)
        throw new CryptmapError('EATTACH', `nbdfuse did not come up in time: ${readLog(logFile)}`, { errno: 'EIO' });
      await sleep(25);
    }
    const sector =
      opts.logicalBlockBytes !== undefined && opts.logicalBlockBytes > 512
        ? ['--sector-size', String(opts.logicalBlockBytes)]
        : [];
    const out = await run('losetup', ['-f', '--show', ...sector, ...(opts.readOnly ? ['-r'] : []), join(mnt, 'disk')]);
    info.devicePath = out.trim();
    if (!info.devicePath.startsWith('/dev/'))
      throw new CryptmapError('EATTACH', `losetup printed no device: ${JSON.stringify(out)}`, { errno: 'EIO' });
    return info;
  } catch (e) {
    await detachExport(info).catch(() => {});
    throw e;
  }
}

async function exists(path: string): Promise<boolean> {
  try {
    await stat(path);
    return true;
  } catch {
    return false;
  }
}

function readLog(file: string): string {
  try {
    return readFileSync(file, 'utf8').trim().slice(-2000) || '(no output)';
  } catch {
    return '(no output)';
  }
}

/** First /dev/nbdN the kernel is not using (no `pid` attribute, size 0). */
function freeNbdDevice(sysRoot: string): string {
  const block = join(sysRoot, 'block');
  let names: string[] = [];
  try {
    names = readdirSync(block).filter((n) => /^nbd[0-9]+$/.test(n));
  } catch {
    // no sysfs
  }
  names.sort((a, b) => Number(a.slice(3)) - Number(b.slice(3)));
  for (const n of names) {
    if (existsSync(join(block, n, 'pid'))) continue;
    try {
      if (readFileSync(join(block, n, 'size'), 'utf8').trim() !== '0') continue;
    } catch {
      continue;
    }
    return `/dev/${n}`;
  }
  throw new CryptmapError('EATTACH', 'no free /dev/nbdN device (is the nbd module loaded with nbds_max > 0?)', {
    errno: 'EBUSY',
  });
}

async function attachKernel(opts: AttachOptions): Promise<AttachInfo> {
  const sysRoot = opts.sysRoot ?? SYS_ROOT;
  if (!nbdModuleLoaded(sysRoot))
    throw new CryptmapError('EATTACH', 'the nbd kernel module is not loaded (modprobe nbd)', { errno: 'ENOENT' });
  const dev = freeNbdDevice(sysRoot);
  const bs =
    opts.logicalBlockBytes !== undefined && opts.logicalBlockBytes > 512 ? ['-b', String(opts.logicalBlockBytes)] : [];
  await run('nbd-client', [
    '-unix',
    opts.socketPath,
    '-N',
    opts.exportName,
    dev,
    ...bs,
    ...(opts.readOnly ? ['-readonly'] : []),
    ...(opts.swap ? ['-swap'] : []),
  ]);
  return { method: 'kernel', devicePath: dev, exportName: opts.exportName, ...(opts.swap ? { swap: true } : {}) };
}
