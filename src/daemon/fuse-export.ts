/**
 * The built-in FUSE block export (issue 14) and the attach transport choice.
 *
 * A mapped device is served as the single regular file `<attachDir>/fuse-XXXX/mnt/disk` on a FUSE
 * mount owned by this process (native/fuse-export.c: threads in the addon speak the FUSE protocol on
 * /dev/fuse; no second process, no NBD hop), and `losetup --direct-io=on --sector-size <volume's>`
 * puts a loop device on it, as qemu-storage-daemon's `--export type=fuse` plus losetup does.
 *
 * Data path. A volume opened through this daemon whose live table is its one crypt target over a
 * regular file gets the direct route: the FUSE threads pread + decrypt, or encrypt + pwrite, and
 * fdatasync for FSYNC, on their own (a native key handle with its own copy of the volume key, and a
 * descriptor of the backing file). Everything else goes through the mapped device on the JS thread
 * (other tables, discards, and every request while the route is off). The route is switched off
 * (and the native key wiped) before the device is suspended or removed, and back on after it is
 * resumed with a table that still qualifies: so `luksSuspend` blocks FUSE requests (they wait at the
 * mapped device's gate) and a reload or resize is seen (the route is rebuilt from the live mapping).
 *
 * Transports (`attach --via`): `nbd` (kernel nbd client; needs the nbd module), `fuse` (this export;
 * needs root, /dev/fuse and the native addon), `nbdfuse` (libnbd's nbdfuse + loop over the NBD
 * export: the fallback). `auto` takes the first present in that order.
 *
 * Unprivileged use would need `fusermount3` to do the mount (it passes the /dev/fuse descriptor back
 * over a socket, `_FUSE_COMMFD`) and `losetup` rights on /dev/loop-control; not supported here: without
 * root `auto` picks nbdfuse.
 *
 * After a crash the kernel aborts the FUSE connection (requests fail with ENOTCONN, nothing hangs);
 * the mount point and the loop device stay until cleanStaleFuse (run before the first attach of a
 * daemon; the agent's cleanStaleAttachments does the same at its start) lazily unmounts what is
 * mounted from their loop devices, detaches those and lazily unmounts the dead FUSE mounts.
 */
import { type Attachment, VIAS, type Via } from '../control/protocol.js';
import {
  existsSync,
  fstatSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  closeSync,
  readdirSync,
  readFileSync,
  statSync,
} from 'node:fs';
import { rm, stat } from 'node:fs/promises';
import { constants as osConstants } from 'node:os';
import { join } from 'node:path';
import { cryptTableLine, type CryptMapping, keyDescription, keyRefArg } from '../activate/mapping.js';
import { devMinor } from '../blockdev/file.js';
import { loopBound, loopsOn } from '../blockdev/loop.js';
import type { BlockDevice } from '../blockdev/types.js';
import { createNativeKey } from '../crypto/backends/native.js';
import { parseCipherSpec } from '../crypto/cipher-spec.js';
import { type DeviceRegistry, InProcessDmControl } from '../dm/index.js';
import { type AttachInfo, attachExport, detachExport } from '../nbd/index.js';
import { CryptmapError, isCryptmapError } from '../util/errors.js';
import { logger } from '../util/log.js';
import { loadNative, type NativeKeyHandle } from '../util/native.js';
import { mounts, runTool } from '../util/tools.js';
import type { Keyring } from './keyring.js';

const log = logger('fuse');

/** Largest FUSE request (bytes): /proc/sys/fs/fuse/max_pages_limit pages, at most 1 MiB. */
function maxRequestBytes(): number {
  try {
    const pages = Number(readFileSync('/proc/sys/fs/fuse/max_pages_limit', 'utf8').trim());
    if (Number.isSafeInteger(pages) && pages >= 32) return Math.min(pages, 256) * 4096;
  } catch {
    // older kernels: 256 pages was the fixed limit
  }
  return 256 * 4096;
}

/** FUSE threads: enough for a deep queue of small requests; each holds one request buffer. */
const THREADS = Math.max(4, Math.min(32, Number(process.env.CRYPTMAP_FUSE_THREADS) || 8));

interface FuseAddon {
  fuseStart(
    mnt: string,
    sizeBytes: number,
    blockBytes: number,
    maxWrite: number,
    readOnly: boolean,
    buffers: Buffer[],
    onRequest: (t: number, op: number, off: number, len: number, payload: number) => void,
  ): object;
  fuseComplete(h: object, thread: number, errno: number): void;
  fuseSetDirect(
    h: object,
    key: NativeKeyHandle | null,
    fd?: number,
    fileBase?: number,
    ivLo?: number,
    ivHi?: number,
    ivLarge?: boolean,
  ): void;
  fuseSetSize(h: object, sizeBytes: number): void;
  fuseInvalidate(h: object): void;
  fuseStats(h: object): { threads: number; direct: number; js: number; fsync: number; directOn: boolean };
  fuseDestroy(h: object): void;
}

function fuseAddon(): FuseAddon | null {
  const a = loadNative() as unknown as Partial<FuseAddon> | null;
  return a && typeof a.fuseStart === 'function' ? (a as FuseAddon) : null;
}

/** Why the FUSE export cannot run here, or undefined when it can. */
export function fuseUnavailable(): string | undefined {
  if (process.getuid?.() !== 0) return 'the FUSE export needs root (mount(2) of /dev/fuse)';
  if (!existsSync('/dev/fuse')) return 'no /dev/fuse (FUSE is not available in this kernel or container)';
  if (fuseAddon() === null) return 'the native addon is not built (node scripts/build-native.mjs)';
  return undefined;
}

/** The transport `auto` picks: the kernel nbd client, else the FUSE export, else nbdfuse. */
export function bestVia(sysRoot = '/sys'): Via {
  if (existsSync(join(sysRoot, 'module', 'nbd'))) return 'nbd';
  return fuseUnavailable() === undefined ? 'fuse' : 'nbdfuse';
}

const ERRNO = osConstants.errno as Record<string, number>;
function errnoOf(e: unknown): number {
  const name = isCryptmapError(e) ? e.errno : (e as { code?: unknown }).code;
  const n = typeof name === 'string' ? ERRNO[name] : undefined;
  return n !== undefined && n > 0 ? n : ERRNO.EIO!;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

const OP_READ = 1;
const OP_WRITE = 2;
const OP_FSYNC = 3;
const OP_DISCARD = 4;
const OP_ZERO = 5;

/** The route of a crypt volume over a regular file (what the FUSE threads need), with what to release. */
interface DirectRoute {
  key: { handle: NativeKeyHandle; dispose(): void };
  fd: number;
}

/** One FUSE export: the mount, the native threads and their buffers. */
export class FuseExport {
  readonly mountPoint: string;
  readonly filePath: string;
  readonly #addon: FuseAddon;
  readonly #h: object;
  readonly #device: BlockDevice;
  /** One request buffer per FUSE thread (plaintext passes through them: wiped at stop). */
  readonly #bufs: Buffer[];
  #route: DirectRoute | null = null;
  #size: number;
  #stopped = false;

  private constructor(addon: FuseAddon, device: BlockDevice, mountPoint: string, readOnly: boolean) {
    this.#addon = addon;
    this.#device = device;
    this.mountPoint = mountPoint;
    this.filePath = join(mountPoint, 'disk');
    const maxWrite = maxRequestBytes();
    const bufs = Array.from({ length: THREADS }, () => Buffer.allocUnsafeSlow(maxWrite + 4096));
    this.#bufs = bufs;
    const onRequest = (t: number, op: number, off: number, len: number, payload: number): void => {
      const buf = bufs[t]!;
      let p: Promise<void>;
      try {
        p =
          op === OP_READ
            ? device.read(off, buf.subarray(0, len))
            : op === OP_WRITE
              ? device.write(off, buf.subarray(payload, payload + len), { scratch: true })
              : op === OP_FSYNC
                ? device.flush()
                : op === OP_DISCARD
                  ? device.capabilities.discard
                    ? device.discard(off, len)
                    : Promise.reject(new CryptmapError('ENOTSUP', 'no discard', { errno: 'ENOTSUP' }))
                  : op === OP_ZERO
                    ? device.writeZeroes(off, len, { noHole: true })
                    : Promise.reject(new CryptmapError('ENOTSUP', `FUSE op ${op}`, { errno: 'ENOTSUP' }));
      } catch (e) {
        p = Promise.reject(e);
      }
      p.then(
        () => addon.fuseComplete(this.#h, t, 0),
        (e: unknown) => addon.fuseComplete(this.#h, t, errnoOf(e)),
      );
    };
    this.#size = device.sizeBytes;
    this.#h = addon.fuseStart(
      mountPoint,
      device.sizeBytes,
      device.limits.logicalBlockBytes,
      maxWrite,
      readOnly,
      bufs,
      onRequest,
    );
  }

  /** Mount `device` as `<mountPoint>/disk` (mountPoint: an empty directory). */
  static start(device: BlockDevice, mountPoint: string, opts: { readOnly?: boolean } = {}): FuseExport {
    const addon = fuseAddon();
    const why = fuseUnavailable();
    if (addon === null || why !== undefined)
      throw new CryptmapError('EATTACH', `cannot export over FUSE: ${why}`, { errno: 'ENOTSUP' });
    try {
      return new FuseExport(addon, device, mountPoint, opts.readOnly === true || !device.capabilities.write);
    } catch (e) {
      throw new CryptmapError('EATTACH', `cannot mount the FUSE export on ${mountPoint}: ${(e as Error).message}`, {
        errno: 'EIO',
        cause: e,
      });
    }
  }

  stats(): { threads: number; direct: number; js: number; fsync: number; directOn: boolean } {
    return this.#addon.fuseStats(this.#h);
  }

  /** Switch the direct route off (waits for the threads inside it) and release its key and descriptor. */
  directOff(): void {
    if (this.#stopped) return;
    this.#addon.fuseSetDirect(this.#h, null);
    const r = this.#route;
    this.#route = null;
    if (r) {
      r.key.dispose();
      closeSync(r.fd);
    }
  }

  /**
   * The device's size changed (resize): the FUSE file follows, and so does every loop device on it
   * (the kernel's cached attributes are invalidated, then `losetup -c`).
   */
  async followSize(): Promise<void> {
    if (this.#stopped || this.#size === this.#device.sizeBytes) return;
    this.#size = this.#device.sizeBytes;
    this.#addon.fuseSetSize(this.#h, this.#size);
    this.#addon.fuseInvalidate(this.#h);
    await stat(this.filePath); // a fresh GETATTR: the inode's size is the new one
    for (const loop of loopsOn(this.filePath)) await runTool('losetup', ['-c', loop], { code: 'EATTACH' });
  }

  /** Switch the direct route on for crypt mapping `m` with `key` (copied); the size follows the device. */
  directOn(m: CryptMapping, key: Uint8Array): boolean {
    this.directOff();
    if (this.#stopped) return false;
    let nk: DirectRoute['key'] | null = null;
    let fd = -1;
    try {
      nk = createNativeKey(parseCipherSpec(m.cipher), key, m.sectorBytes);
      if (nk === null) return false;
      fd = openSync(m.device, m.readOnly ? 'r' : 'r+');
      if (!fstatSync(fd).isFile()) throw new Error('not a regular file');
      const iv = m.ivOffsetSectors;
      this.#addon.fuseSetDirect(
        this.#h,
        nk.handle,
        fd,
        m.offsetSectors * 512,
        Number(iv & 0xffffffffn),
        Number(iv >> 32n),
        m.ivLargeSectors === true,
      );
      this.#route = { key: nk, fd };
      return true;
    } catch (e) {
      nk?.dispose();
      if (fd >= 0) closeSync(fd);
      log.info('FUSE export without the direct route', { device: m.device, reason: (e as Error).message });
      return false;
    }
  }

  /** Unmount (the loop device must be gone), wait for the threads, free everything. */
  async stop(): Promise<void> {
    if (this.#stopped) return;
    this.directOff();
    this.#stopped = true;
    try {
      if (isMounted(this.mountPoint)) {
        try {
          await runTool('umount', [this.mountPoint], { code: 'EATTACH' });
        } catch (e) {
          if (isMounted(this.mountPoint))
            await runTool('umount', ['-l', this.mountPoint], { code: 'EATTACH' }).catch(() => undefined);
          if (isMounted(this.mountPoint)) throw e;
        }
      }
      for (let i = 0; i < 200 && this.stats().threads > 0; i++) await sleep(10);
      if (this.stats().threads > 0) abortConnection(this.mountPoint);
      for (let i = 0; i < 200 && this.stats().threads > 0; i++) await sleep(10);
      this.#addon.fuseDestroy(this.#h);
    } finally {
      // Plaintext passed through the request buffers: wiped on every way out, once no FUSE thread
      // can be inside one (a thread still serving a request would write the zeros to the device).
      if (this.stats().threads === 0) for (const b of this.#bufs) b.fill(0);
    }
  }
}

/** /sys/fs/fuse/connections/<minor of the mount's device>/abort (a FUSE mount nobody answers). */
function abortConnection(mountPoint: string): void {
  try {
    const minor = devMinor(statSync(mountPoint).dev);
    runTool('sh', ['-c', `echo 1 > /sys/fs/fuse/connections/${minor}/abort`]).catch(() => undefined);
  } catch {
    // already gone
  }
}

function isMounted(path: string): boolean {
  return mounts().some(([, at]) => at === path);
}

/** Where `device` is mounted (/proc/self/mounts). */
function mountsOf(device: string): string[] {
  return mounts()
    .filter(([src]) => src === device)
    .map(([, at]) => at);
}

/** Loop devices whose backing file is `file` (sysfs). */
async function detachLoop(dev: string): Promise<void> {
  for (let i = 0; ; i++) {
    try {
      await runTool('losetup', ['-d', dev], { code: 'EATTACH' });
      return;
    } catch (e) {
      if (!loopBound(dev)) return;
      if (i >= 20) throw e;
      await sleep(100); // udev or a just-unmounted file system may hold it for a moment
    }
  }
}

/**
 * Undo what a dead daemon left in `attachDir`: every `fuse-*` directory not in `live` has its loop
 * devices detached and its mount point lazily unmounted, then goes. Best effort, logged.
 */
export async function cleanStaleFuse(attachDir: string, live: ReadonlySet<string> = new Set()): Promise<void> {
  let dirs: string[] = [];
  try {
    dirs = readdirSync(attachDir).filter((d) => d.startsWith('fuse-'));
  } catch {
    return;
  }
  for (const d of dirs) {
    const dir = join(attachDir, d);
    if (live.has(dir)) continue;
    const mnt = join(dir, 'mnt');
    for (const loop of loopsOn(join(mnt, 'disk'))) {
      // A file system still mounted from the dead device only returns errors: lazily unmount it.
      for (const at of mountsOf(loop)) {
        log.warn('stale mount of a dead FUSE export: lazy unmount', { device: loop, mountpoint: at });
        await runTool('umount', ['-l', at]).catch(() => undefined);
      }
      await detachLoop(loop).catch((e: unknown) =>
        log.error('cannot detach a stale loop device', { loop, error: (e as Error).message }),
      );
    }
    if (isMounted(mnt))
      await runTool('umount', ['-l', mnt]).catch((e: unknown) =>
        log.error('cannot unmount a stale FUSE export', { mnt, error: (e as Error).message }),
      );
    await rm(dir, { recursive: true, force: true }).catch(() => undefined);
    log.info('cleaned a stale FUSE export', { dir });
  }
}

export interface FuseExportsOptions {
  registry: DeviceRegistry;
  keyring: Keyring;
  /** The volume opened through the daemon under `name`, if any (direct route candidates). */
  mappingOf: (name: string) => CryptMapping | undefined;
  attachDir: string;
  nbdSocketPath: string;
}

/** The daemon's FUSE exports by volume name, attach/detach for every transport, and the dm hooks. */
export class FuseExports {
  readonly #o: FuseExportsOptions;
  readonly #live = new Map<string, { exp: FuseExport; dir: string }>();
  #cleaned = false;

  constructor(o: FuseExportsOptions) {
    this.#o = o;
  }

  /** A DmControl whose suspend/remove switch the direct route off first and whose resume rebuilds it. */
  dmControl(): InProcessDmControl {
    const fx = this;
    return new (class extends InProcessDmControl {
      override async suspend(name: string, opts?: { noflush?: boolean }): Promise<void> {
        fx.#live.get(name)?.exp.directOff();
        try {
          await super.suspend(name, opts);
        } catch (e) {
          await fx.refresh(name);
          throw e;
        }
      }
      override async resume(name: string): Promise<void> {
        await super.resume(name);
        await fx.refresh(name);
      }
      override async remove(name: string, opts?: { force?: boolean }): Promise<void> {
        fx.#live.get(name)?.exp.directOff();
        await super.remove(name, opts);
      }
    })(this.#o.registry);
  }

  /** Rebuild the direct route of `name`'s export from its live table (off when it does not qualify). */
  async refresh(name: string): Promise<void> {
    const e = this.#live.get(name);
    if (!e) return;
    const dev = this.#o.registry.find(name);
    if (dev !== undefined && !dev.suspended) await e.exp.followSize();
    const m = this.#o.mappingOf(name);
    const t = dev?.liveTable;
    const entry = t?.entries.length === 1 ? t.entries[0] : undefined;
    const qualifies =
      dev !== undefined &&
      !dev.suspended &&
      m !== undefined &&
      entry !== undefined &&
      entry.type.name === 'crypt' &&
      cryptTableLine(m, keyRefArg(m)).endsWith(` crypt ${entry.instance.status('table', false)}`) &&
      process.env.CRYPTMAP_CRYPTO_BACKEND !== 'js' &&
      process.env.CRYPTMAP_FUSE_DIRECT !== '0';
    if (!qualifies) {
      e.exp.directOff();
      return;
    }
    const key = await this.#o.keyring.resolve({
      type: 'logon',
      description: keyDescription(name),
      keyBytes: m.keyBytes,
    });
    try {
      e.exp.directOn(m, key.expose());
    } finally {
      key.dispose();
    }
  }

  stats(name: string): ReturnType<FuseExport['stats']> | undefined {
    return this.#live.get(name)?.exp.stats();
  }

  /** Attach `device` (mapped device `name`, opened by the caller) through `via` ('auto': bestVia()). */
  async attach(
    name: string,
    device: BlockDevice,
    opts: { via?: Via | 'auto'; readOnly: boolean; logicalBlockBytes: number; swap: boolean },
  ): Promise<Attachment> {
    const via = opts.via === undefined || opts.via === 'auto' ? bestVia() : opts.via;
    if (!VIAS.includes(via))
      throw new CryptmapError('EARGS', `unknown transport '${String(via)}' (fuse, nbd or nbdfuse)`);
    if (via !== 'fuse') {
      const info = await attachExport({
        socketPath: this.#o.nbdSocketPath,
        exportName: name,
        method: via === 'nbd' ? 'kernel' : 'fuse',
        workDir: this.#o.attachDir,
        readOnly: opts.readOnly,
        logicalBlockBytes: opts.logicalBlockBytes,
        swap: opts.swap,
      });
      return { ...info, via };
    }
    const why = fuseUnavailable();
    if (why !== undefined)
      throw new CryptmapError('EATTACH', `cannot attach ${name} over FUSE: ${why}`, { errno: 'ENOTSUP' });
    mkdirSync(this.#o.attachDir, { recursive: true, mode: 0o700 });
    if (!this.#cleaned) {
      this.#cleaned = true;
      await cleanStaleFuse(this.#o.attachDir, new Set([...this.#live.values()].map((e) => e.dir)));
    }
    const dir = mkdtempSync(join(this.#o.attachDir, 'fuse-'));
    const mnt = join(dir, 'mnt');
    mkdirSync(mnt, { mode: 0o700 });
    let exp: FuseExport | undefined;
    const info: Attachment = { method: 'fuse', via: 'fuse', devicePath: '', exportName: name, fuseDir: dir };
    try {
      exp = FuseExport.start(device, mnt, { readOnly: opts.readOnly });
      this.#live.set(name, { exp, dir });
      await this.refresh(name);
      const sector = opts.logicalBlockBytes > 512 ? ['--sector-size', String(opts.logicalBlockBytes)] : [];
      const out = await runTool(
        'losetup',
        ['-f', '--show', '--direct-io=on', ...sector, ...(opts.readOnly ? ['-r'] : []), exp.filePath],
        { code: 'EATTACH' },
      );
      info.devicePath = out.trim();
      if (!info.devicePath.startsWith('/dev/'))
        throw new CryptmapError('EATTACH', `losetup printed no device: ${JSON.stringify(out)}`, { errno: 'EIO' });
      return info;
    } catch (e) {
      await this.detach(info).catch(() => undefined);
      throw e;
    }
  }

  /** Undo attach (any transport). Idempotent. */
  async detach(info: AttachInfo & { via?: Via }): Promise<void> {
    if (info.via !== 'fuse') {
      await detachExport(info);
      return;
    }
    const dir = info.fuseDir!;
    const mnt = join(dir, 'mnt');
    for (const loop of new Set([...(info.devicePath ? [info.devicePath] : []), ...loopsOn(join(mnt, 'disk'))]))
      await detachLoop(loop);
    const e = this.#live.get(info.exportName);
    if (e && e.dir === dir) {
      await e.exp.stop();
      this.#live.delete(info.exportName);
    } else if (isMounted(mnt)) {
      await runTool('umount', ['-l', mnt], { code: 'EATTACH' });
    }
    await rm(dir, { recursive: true, force: true });
  }
}
