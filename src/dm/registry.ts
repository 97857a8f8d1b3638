/**
 * DeviceRegistry: the set of mapped devices (the kernel's dm "name/uuid hash" plus the ioctl verbs),
 * in userspace. Devices are found by name or uuid; `<dev>` table arguments resolve to files, block
 * devices or other mapped devices; loops (a device mapped onto itself, directly or through others)
 * are refused. Every operation either succeeds or leaves the registry as it was.
 *
 * `<dev>` resolution order:
 *   1. `253:MINOR` or `/dev/mapper/NAME`, or a bare word naming a mapped device -> that device
 *   2. `MAJ:MIN` of another major -> the block device /dev/<DEVNAME from /sys/dev/block/MAJ:MIN/uevent>
 *   3. an NBD URI (`nbd://host/export`, `nbd+unix:///export?socket=PATH`, `nbds://`...) -> the NBD
 *      client (blockdev/nbd-client), opened once per URI and mode
 *   4. anything else -> a file or block device path (relative paths against the process's cwd)
 * Files and URIs are opened once per path and mode and shared (reference counted) across tables.
 *
 * @example
 *   const reg = new DeviceRegistry({ keyStore });
 *   await reg.create('s', { table: '0 2048 striped 2 8 /var/lib/a.img 0 /var/lib/b.img 0' });
 *   await reg.create('c', { table: `0 2048 crypt aes-xts-plain64 ${hexKey} 0 s 0` });
 *   const dev = reg.open('c');            // a BlockDevice; dev.close() releases it
 *   await reg.load('c', newTable); await reg.suspend('c'); await reg.resume('c');
 */
import { readFile } from 'node:fs/promises';
import { resolve as resolvePath } from 'node:path';
import { ExclusiveClaims } from '../blockdev/exclusive.js';
import { FileDevice } from '../blockdev/file.js';
import { NbdDevice, type NbdDeviceHealth } from '../blockdev/nbd-client/device.js';
import { isRemoteDevice } from '../blockdev/open.js';
import type { BlockDevice } from '../blockdev/types.js';
import { CryptmapError, EXIT_WRONG_DEVICE, isCryptmapError } from '../util/errors.js';
import { DM_MAJOR, MappedDevice } from './mapped-device.js';
import { Table, type TableEnvironment, parseTable, tableError } from './table.js';
import { BUILTIN_TARGETS } from './targets/index.js';
import type { KeyStore, TargetType } from './types.js';

/** DM_NAME_LEN and DM_UUID_LEN minus the terminating NUL. */
const MAX_NAME = 127;
const MAX_UUID = 128;

/** How a registry resolves keys, target types, files and NBD URIs. */
export interface DeviceRegistryOptions {
  /** Resolves `:<bytes>:<type>:<desc>` crypt keys. */
  keyStore?: KeyStore;
  /** Target types by name (default: the built-in ones). Tests add `trace`/`fault` targets here. */
  targets?: Readonly<Record<string, TargetType>>;
  /** How file paths are opened (default FileDevice.open). */
  openFile?: (path: string, readOnly: boolean) => Promise<BlockDevice>;
  /** How NBD URIs are opened (default NbdDevice.open). */
  openUri?: (uri: string, readOnly: boolean) => Promise<BlockDevice>;
}

/** dmsetup create options: UUID, table text, read-only. */
export interface CreateOptions {
  uuid?: string;
  /** Table text; without it the device is created with no table (dmsetup create --notable). */
  table?: string;
  readOnly?: boolean;
}

function notFound(name: string): CryptmapError {
  return new CryptmapError('ENODEV', `device ${name} does not exist`, {
    errno: 'ENOENT',
    exitCode: EXIT_WRONG_DEVICE,
    context: { device: name },
  });
}

/** Throws ENAME for a name dmsetup refuses (empty, too long, `/`, white space, `.` or `..`). */
export function checkDeviceName(name: string): void {
  if (
    name.length === 0 ||
    name.length > MAX_NAME ||
    name.includes('/') ||
    name === '.' ||
    name === '..' ||
    /[\s\0]/.test(name)
  ) {
    throw new CryptmapError(
      'ENAME',
      `invalid device name '${name}' (1 to ${MAX_NAME} characters, no '/', no white space, not '.' or '..')`,
    );
  }
}

interface SharedFile {
  dev: BlockDevice;
  refs: number;
}

/**
 * The set of mapped devices by name and uuid, with dmsetup's verbs (create, load, suspend, resume,
 * remove, rename, message); tables name files, block devices, NBD URIs or other mapped devices.
 * @example
 *   const reg = new DeviceRegistry();
 *   await reg.create('c', { table: `0 2048 crypt aes-xts-plain64 ${hexKey} 0 /var/lib/a.img 0` });
 *   const dev = reg.open('c'); // a BlockDevice; dev.close() releases it
 */
export class DeviceRegistry {
  readonly #devices = new Map<string, MappedDevice>();
  /** Names and minors taken by creates still in progress. */
  readonly #reservedNames = new Set<string>();
  readonly #reservedMinors = new Set<number>();
  readonly #files = new Map<string, SharedFile>();
  /** The block devices tables use, claimed O_EXCL as the kernel's dm claims them (blockdev/exclusive.ts). */
  readonly #claims = new ExclusiveClaims();
  readonly #targets: Readonly<Record<string, TargetType>>;
  readonly #keyStore: KeyStore | undefined;
  readonly #openFile: (path: string, readOnly: boolean) => Promise<BlockDevice>;
  readonly #openUri: (uri: string, readOnly: boolean) => Promise<BlockDevice>;
  #ioStats = false;

  constructor(opts: DeviceRegistryOptions = {}) {
    this.#targets = opts.targets ?? BUILTIN_TARGETS;
    this.#keyStore = opts.keyStore;
    this.#openFile = opts.openFile ?? ((p, ro) => FileDevice.open(p, { readOnly: ro }));
    this.#openUri = opts.openUri ?? ((u, ro) => NbdDevice.open(u, { readOnly: ro }));
  }

  /**
   * Turn on per-device I/O accounting (MappedDevice.ioStats) for the devices there are and every
   * later one; called when a metrics registry is attached. Off by default: the accounting reads the
   * clock and adds a promise reaction per request.
   */
  enableIoStats(): void {
    this.#ioStats = true;
    for (const d of this.#devices.values()) d.enableIoStats();
  }

  /**
   * Measure again the file or block device at `path` that live tables use (after it grew or shrank
   * underneath, before a reload that resizes a mapping: `cryptsetup resize`). Devices without
   * `refreshSize` (memory, test doubles) keep their size. Returns the new size of the read-write
   * share (else the read-only one), or undefined when no table uses the path.
   */
  async refreshFileSize(path: string): Promise<number | undefined> {
    const abs = resolvePath(path);
    let size: number | undefined;
    for (const mode of ['ro', 'rw']) {
      const dev = this.#files.get(`${mode}:${abs}`)?.dev as
        | (BlockDevice & { refreshSize?: () => Promise<number> })
        | undefined;
      if (dev === undefined) continue;
      size = dev.refreshSize ? await dev.refreshSize() : dev.sizeBytes;
    }
    return size;
  }

  /** How the NBD client behind `uri` fares (ready, reconnecting, failed), when a live table uses it. */
  remoteHealth(uri: string): NbdDeviceHealth | undefined {
    for (const mode of ['rw', 'ro']) {
      const dev = this.#files.get(`${mode}:${uri}`)?.dev;
      if (dev instanceof NbdDevice) return dev.health;
    }
    return undefined;
  }

  /**
   * Cut the NBD client behind `uri` off from its export (NbdDevice.fence: its I/O fails with EIO and
   * is never sent again). False when no live table uses it.
   */
  fenceRemote(uri: string, why: string): boolean {
    let found = false;
    for (const mode of ['rw', 'ro']) {
      const dev = this.#files.get(`${mode}:${uri}`)?.dev;
      if (dev instanceof NbdDevice) {
        dev.fence(why);
        found = true;
      }
    }
    return found;
  }

  /** Target types this registry knows. */
  get targets(): Readonly<Record<string, TargetType>> {
    return this.#targets;
  }

  /** The device called `name`, or throws ENODEV. */
  get(name: string): MappedDevice {
    const d = this.#devices.get(name);
    if (d === undefined) throw notFound(name);
    return d;
  }

  /** The device called `name`, or undefined. */
  find(name: string): MappedDevice | undefined {
    return this.#devices.get(name);
  }

  /** The device with `uuid`, or undefined. */
  findByUuid(uuid: string): MappedDevice | undefined {
    for (const d of this.#devices.values()) if (d.uuid !== '' && d.uuid === uuid) return d;
    return undefined;
  }

  /** All devices, sorted by name (dmsetup ls order). */
  list(): MappedDevice[] {
    return [...this.#devices.values()].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  }

  /** Open a mapped device for I/O (counted in its open count; close the handle to release). */
  open(name: string): BlockDevice {
    return this.get(name).open();
  }

  /** dmsetup create: a new device, with its table loaded and resumed when one is given. */
  async create(name: string, opts: CreateOptions = {}): Promise<MappedDevice> {
    checkDeviceName(name);
    const uuid = opts.uuid ?? '';
    if (uuid.length > MAX_UUID || /[\s\0]/.test(uuid))
      throw new CryptmapError('EUUID', `invalid uuid '${uuid}' (at most ${MAX_UUID} characters, no white space)`);
    if (this.#devices.has(name) || this.#reservedNames.has(name)) {
      throw new CryptmapError('EEXIST', `device ${name} already exists`, {
        errno: 'EEXIST',
        context: { device: name },
      });
    }
    if (uuid !== '' && this.findByUuid(uuid) !== undefined) {
      throw new CryptmapError('EEXIST', `a device with uuid ${uuid} already exists`, { errno: 'EEXIST' });
    }
    let minor = 0;
    const used = new Set([...this.#devices.values()].map((d) => d.minor));
    while (used.has(minor) || this.#reservedMinors.has(minor)) minor++;
    const dev = new MappedDevice({ name, uuid, minor, readOnly: opts.readOnly ?? false });
    if (this.#ioStats) dev.enableIoStats();
    this.#reservedNames.add(name);
    this.#reservedMinors.add(minor);
    try {
      if (opts.table !== undefined) {
        const table = await this.#build(dev, opts.table);
        await dev.load(table);
        try {
          await dev.resume();
        } catch (e) {
          await dev.teardown();
          throw e;
        }
      }
      this.#devices.set(name, dev);
      return dev;
    } finally {
      this.#reservedNames.delete(name);
      this.#reservedMinors.delete(minor);
    }
  }

  /** dmsetup load/reload: parse and construct `text` as the inactive table of `name`. */
  async load(name: string, text: string): Promise<void> {
    const dev = this.get(name);
    await dev.lifecycle(async () => {
      this.#alive(dev);
      const table = await this.#build(dev, text);
      // Re-check for loops now: another device's load may have finished meanwhile.
      try {
        this.#checkNoLoop(dev, table);
      } catch (e) {
        await table.dispose();
        throw e;
      }
      await dev.load(table);
    });
  }

  /** dmsetup clear: drop the inactive table. */
  async clear(name: string): Promise<void> {
    const dev = this.get(name);
    await dev.lifecycle(async () => {
      this.#alive(dev);
      await dev.clear();
    });
  }

  /** dmsetup suspend: hold new I/O, wait for in-flight I/O (flushing unless `noflush`). */
  async suspend(name: string, opts: { noflush?: boolean } = {}): Promise<void> {
    const dev = this.get(name);
    await dev.lifecycle(async () => {
      this.#alive(dev);
      await dev.suspend(opts);
    });
  }

  /** dmsetup resume: swap in the inactive table if one is loaded, then release held I/O. */
  async resume(name: string): Promise<void> {
    const dev = this.get(name);
    await dev.lifecycle(async () => {
      this.#alive(dev);
      await dev.resume();
    });
  }

  /** dmsetup remove: refused while open unless forced (then open handles fail with EIO). */
  async remove(name: string, opts: { force?: boolean } = {}): Promise<void> {
    const dev = this.get(name);
    await dev.lifecycle(async () => {
      this.#alive(dev);
      dev.checkRemovable(opts.force ?? false);
      this.#devices.delete(dev.name);
      await dev.teardown();
    });
  }

  /** dmsetup rename. */
  async rename(oldName: string, newName: string): Promise<void> {
    const dev = this.get(oldName);
    checkDeviceName(newName);
    await dev.lifecycle(async () => {
      this.#alive(dev);
      if (newName === dev.name) return;
      if (this.#devices.has(newName) || this.#reservedNames.has(newName)) {
        throw new CryptmapError('EEXIST', `cannot rename ${dev.name} to ${newName}: a device with that name exists`, {
          errno: 'EEXIST',
        });
      }
      this.#devices.delete(dev.name);
      dev.name = newName;
      this.#devices.set(newName, dev);
    });
  }

  /** dmsetup message NAME SECTOR MSG... (serialised with the device's lifecycle). */
  async message(name: string, sector: number, args: string[]): Promise<string> {
    const dev = this.get(name);
    return dev.lifecycle(async () => {
      this.#alive(dev);
      return dev.message(sector, args);
    });
  }

  /** Remove every device, top of the stacks first (forced). For daemon shutdown and tests. */
  async closeAll(): Promise<void> {
    for (let guard = 0; this.#devices.size > 0 && guard < 10000; guard++) {
      const devs = this.list();
      const unused = devs.find((d) => d.openCount === 0) ?? devs[0]!;
      await this.remove(unused.name, { force: true });
    }
  }

  #alive(dev: MappedDevice): void {
    if (dev.removed || this.#devices.get(dev.name) !== dev) throw notFound(dev.name);
  }

  async #build(self: MappedDevice, text: string): Promise<Table> {
    const lines = parseTable(text);
    const env: TableEnvironment = {
      targets: this.#targets,
      keyStore: this.#keyStore,
      openDevice: (arg, line, what, readOnly) => this.#openDevice(self, arg, line, what, readOnly === true),
      owner: self,
      event: () => {
        self.eventNr++;
      },
    };
    return Table.build(lines, env);
  }

  /** True when `from` reaches `to` through live or inactive tables. */
  #reaches(from: MappedDevice, to: MappedDevice, seen = new Set<MappedDevice>()): boolean {
    if (from === to) return true;
    if (seen.has(from)) return false;
    seen.add(from);
    for (const t of [from.liveTable, from.inactiveTable]) {
      if (t === null) continue;
      for (const d of t.mappedDeps) if (this.#reaches(d as MappedDevice, to, seen)) return true;
    }
    return false;
  }

  #checkNoLoop(self: MappedDevice, table: Table): void {
    for (const d of table.mappedDeps) {
      const m = d as MappedDevice;
      if (this.#reaches(m, self)) {
        throw tableError(
          table.entries[0]!.line,
          `mapping ${self.name} onto ${m.name} would make a loop (${m.name} already depends on ${self.name})`,
          'ELOOP',
        );
      }
    }
  }

  #mappedByArg(self: MappedDevice, arg: string): MappedDevice | undefined | 'self' {
    let m: MappedDevice | undefined;
    const mm = /^([0-9]+):([0-9]+)$/.exec(arg);
    if (mm !== null && Number(mm[1]) === DM_MAJOR) {
      const minor = Number(mm[2]);
      if (self.minor === minor) return 'self';
      m = [...this.#devices.values()].find((d) => d.minor === minor);
      if (m === undefined)
        throw new CryptmapError('ENODEV', `no mapped device has number ${arg}`, {
          errno: 'ENOENT',
          exitCode: EXIT_WRONG_DEVICE,
        });
      return m;
    }
    const name = arg.startsWith('/dev/mapper/')
      ? arg.slice('/dev/mapper/'.length)
      : arg.includes('/')
        ? undefined
        : arg;
    if (name === undefined) return undefined;
    if (name === self.name) return 'self';
    m = this.#devices.get(name);
    if (m === undefined && arg.startsWith('/dev/mapper/')) throw notFound(name);
    return m;
  }

  async #openDevice(
    self: MappedDevice,
    arg: string,
    line: number,
    what: string,
    readOnlyArg = false,
  ): Promise<{ device: BlockDevice; release: () => Promise<void>; mapped?: unknown }> {
    const wrap = (e: unknown): CryptmapError => {
      const c = isCryptmapError(e)
        ? e
        : new CryptmapError('EOPEN', `cannot open ${arg}: ${e instanceof Error ? e.message : String(e)}`, {
            exitCode: EXIT_WRONG_DEVICE,
          });
      return new CryptmapError(c.code, `table line ${line}: ${what}: ${c.message}`, {
        exitCode: c.exitCode,
        errno: c.errno,
        cause: e,
        context: { line, arg },
      });
    };
    let m: MappedDevice | undefined | 'self';
    try {
      m = this.#mappedByArg(self, arg);
    } catch (e) {
      throw wrap(e);
    }
    if (m === 'self') throw tableError(line, `${what}: ${self.name} cannot be mapped onto itself`, 'ELOOP');
    if (m !== undefined) {
      if (this.#reaches(m, self)) {
        throw tableError(
          line,
          `${what}: mapping ${self.name} onto ${m.name} would make a loop (${m.name} already depends on ${self.name})`,
          'ELOOP',
        );
      }
      const handle = m.open();
      return { device: handle, release: () => handle.close(), mapped: m };
    }
    const remote = isRemoteDevice(arg);
    let path = arg;
    const mm = remote ? null : /^([0-9]+):([0-9]+)$/.exec(arg);
    if (mm !== null) {
      try {
        const uevent = await readFile(`/sys/dev/block/${mm[1]}:${mm[2]}/uevent`, 'utf8');
        const devname = /^DEVNAME=(.+)$/m.exec(uevent)?.[1];
        if (devname === undefined) throw new Error('no DEVNAME');
        path = `/dev/${devname}`;
      } catch {
        throw tableError(line, `${what}: no block device has number ${arg}`, 'ENODEV');
      }
    }
    const abs = remote ? arg : resolvePath(path);
    const readOnly = self.readOnly || readOnlyArg;
    const key = `${readOnly ? 'ro' : 'rw'}:${abs}`;
    // A block device is claimed for as long as a table uses it: mounting it, formatting it or
    // mapping it from outside now fails with EBUSY, as with the kernel's device-mapper; tables of
    // this registry share the claim (cryptsetup open --shared).
    let unclaim: () => Promise<void> = async () => undefined;
    if (!remote) {
      try {
        unclaim = await this.#claims.acquire(abs);
      } catch (e) {
        throw wrap(e);
      }
    }
    let shared = this.#files.get(key);
    if (shared === undefined) {
      let dev: BlockDevice;
      try {
        dev = await (remote ? this.#openUri(abs, readOnly) : this.#openFile(abs, readOnly));
      } catch (e) {
        await unclaim();
        throw wrap(e);
      }
      // Another load may have opened it while we awaited.
      const again = this.#files.get(key);
      if (again !== undefined) {
        await dev.close();
        shared = again;
      } else {
        shared = { dev, refs: 0 };
        this.#files.set(key, shared);
      }
    }
    shared.refs++;
    const s = shared;
    let released = false;
    return {
      device: s.dev,
      release: async () => {
        if (released) return;
        released = true;
        try {
          if (--s.refs === 0) {
            this.#files.delete(key);
            await s.dev.close();
          }
        } finally {
          await unclaim();
        }
      },
    };
  }
}
