/**
 * The daemon's state: mapped devices (dm registry), the volume keys they use (keyring), an NBD
 * server exporting every mapped device with a live table under its own name, and kernel block
 * device attachments. The control socket handlers and the agent (in-process) both call this.
 *
 * Lifecycle per name is serialised by a promise chain; data I/O never waits on it.
 */
import { createHmac, randomBytes } from 'node:crypto';
import { allFlags } from '../activate/flags.js';
import type { CryptMapping } from '../activate/mapping.js';
import { cryptTableLine, dmUuid, keyDescription, keyRefArg } from '../activate/mapping.js';
import type { BlockDevice } from '../blockdev/types.js';
import { type DmControl, DeviceRegistry, type InProcessDmControl, type MappedDevice } from '../dm/index.js';
import { NbdServer, nbdUnixUri } from '../nbd/index.js';
import type { NbdServerOptions, NbdTlsMode } from '../nbd/types.js';
import { constantTimeEqual, wipe } from '../util/bytes.js';
import { CryptmapError, EXIT_BUSY, EXIT_FAILURE, EXIT_WRONG_DEVICE } from '../util/errors.js';
import { logger } from '../util/log.js';
import { mountedAt } from '../util/tools.js';
import type { Secret } from '../util/secret.js';
import type { Attachment, RefreshFlags, Via, VolumeStatus } from '../control/protocol.js';
import { FuseExports } from './fuse-export.js';
import { Keyring } from './keyring.js';

const log = logger('daemon');

export interface DaemonCoreOptions {
  /** Unix socket the NBD server listens on (exports are reached through it). */
  nbdSocketPath: string;
  /** Where attach work directories go (0700). */
  attachDir: string;
  nbd?: NbdServerOptions;
}

export class DaemonCore {
  readonly keyring = new Keyring();
  readonly registry: DeviceRegistry;
  readonly nbd: NbdServer;
  readonly #dm: InProcessDmControl;
  readonly #opts: DaemonCoreOptions;
  readonly #handles = new Map<string, BlockDevice>();
  readonly #volumes = new Map<string, CryptMapping>();
  readonly #attachments = new Map<string, Attachment>();
  readonly #fuse: FuseExports;
  readonly #chains = new Map<string, Promise<unknown>>();
  /** luksSuspend'ed volumes: HMAC-SHA256 of the wiped key under a random salt, to check the key resume brings. */
  readonly #suspendedKeyTags = new Map<string, { salt: Buffer; tag: Buffer }>();
  #closing = false;

  constructor(opts: DaemonCoreOptions) {
    this.#opts = opts;
    this.registry = new DeviceRegistry({ keyStore: this.keyring });
    this.#fuse = new FuseExports({
      registry: this.registry,
      keyring: this.keyring,
      mappingOf: (n) => this.#volumes.get(n),
      attachDir: opts.attachDir,
      nbdSocketPath: opts.nbdSocketPath,
    });
    // Suspend, resume and remove switch the FUSE export's direct route off and on (fuse-export.ts).
    this.#dm = this.#fuse.dmControl();
    // No OFFSET_HOLE READ replies by default: they cost a block-status query (SEEK_DATA/SEEK_HOLE)
    // per READ, and on tmpfs SEEK_HOLE walks the page cache up to the next hole (for a fully
    // written 1 GiB file, 9 ms per READ: 30 MB/s). Crypt targets never report holes anyway; clients
    // that want sparseness ask with NBD_CMD_BLOCK_STATUS (nbdcopy, qemu-img do).
    this.nbd = new NbdServer({ sparseReads: false, ...opts.nbd });
  }

  get nbdSocketPath(): string {
    return this.#opts.nbdSocketPath;
  }

  /** Run `fn` after every earlier lifecycle operation on `name` finished. */
  #serial<T>(name: string, fn: () => Promise<T>): Promise<T> {
    if (this.#closing) return Promise.reject(new CryptmapError('ESHUTDOWN', 'the cryptmap daemon is shutting down', { errno: 'ESHUTDOWN', exitCode: EXIT_BUSY }));
    const prev = this.#chains.get(name) ?? Promise.resolve();
    const next = prev.then(fn, fn);
    const tail = next.catch(() => undefined);
    this.#chains.set(name, tail);
    void tail.then(() => {
      if (this.#chains.get(name) === tail) this.#chains.delete(name);
    });
    return next;
  }

  /** Export `name` over NBD when it has a live table and is not exported yet. */
  #exportIfLive(name: string): void {
    const dev = this.registry.find(name);
    if (!dev?.hasLiveTable || this.#handles.has(name)) return;
    const handle = this.registry.open(name);
    try {
      this.nbd.addExport(name, { device: handle, description: `cryptmap ${name}`, readOnly: dev.readOnly });
    } catch (e) {
      void handle.close();
      throw e;
    }
    this.#handles.set(name, handle);
  }

  /** Stop exporting `name` (refused while NBD clients or an attachment use it, unless forced). */
  async #unexport(name: string, force: boolean): Promise<void> {
    const handle = this.#handles.get(name);
    if (!handle) return;
    const attached = this.#attachments.get(name);
    if (attached) {
      const where = mountedAt(attached.devicePath);
      if (where !== undefined && !force) {
        throw new CryptmapError('EBUSY', `Device ${name} is still in use (${attached.devicePath} is mounted on ${where}).`, { exitCode: EXIT_BUSY, errno: 'EBUSY' });
      }
      await this.#detachNow(name, attached);
    }
    const conns = this.nbd.connectionCount(name);
    if (!force && conns > 0) {
      throw new CryptmapError('EBUSY', `Device ${name} is still in use (${conns} NBD connection${conns === 1 ? '' : 's'}).`, { exitCode: EXIT_BUSY, errno: 'EBUSY' });
    }
    await this.nbd.removeExport(name);
    this.#handles.delete(name);
    // A device whose storage failed (an NBD server gone for good) cannot flush; it still closes, as
    // the kernel removes a mapping over a dead disk. The failure was already reported to the writers.
    await handle.close().catch((e: unknown) => log.warn('flush on close failed', { name, error: e instanceof Error ? e.message : String(e) }));
  }

  /** The dmsetup verbs, with NBD exports following the devices. */
  dm(): DmControl {
    const dm = this.#dm;
    return {
      create: (name, opts) =>
        this.#serial(name, async () => {
          await dm.create(name, opts);
          try {
            this.#exportIfLive(name);
          } catch (e) {
            await dm.remove(name, { force: true });
            throw e;
          }
        }),
      remove: (name, opts) => this.#serial(name, () => this.#remove(name, opts?.force ?? false)),
      load: (name, table) => this.#serial(name, () => dm.load(name, table)),
      clear: (name) => this.#serial(name, () => dm.clear(name)),
      suspend: (name, opts) => this.#serial(name, () => dm.suspend(name, opts)),
      resume: (name) =>
        this.#serial(name, async () => {
          await dm.resume(name);
          this.#exportIfLive(name);
        }),
      rename: (oldName, newName) =>
        this.#serial(oldName, async () => {
          if (this.#volumes.has(oldName)) throw new CryptmapError('EBUSY', `Device ${oldName} is a cryptmap volume; close and reopen it under the new name.`, { exitCode: EXIT_BUSY });
          const exported = this.#handles.has(oldName);
          await this.#unexport(oldName, false);
          try {
            await dm.rename(oldName, newName);
          } finally {
            if (exported) this.#exportIfLive(this.registry.find(newName) ? newName : oldName);
          }
        }),
      table: (name, opts) => dm.table(name, opts),
      status: (name) => dm.status(name),
      info: (name) => dm.info(name),
      ls: () => dm.ls(),
      message: (name, sector, msg) => this.#serial(name, () => dm.message(name, sector, msg)),
    };
  }

  async #remove(name: string, force: boolean): Promise<void> {
    this.registry.get(name);
    const wasExported = this.#handles.has(name);
    await this.#unexport(name, force);
    try {
      await this.#dm.remove(name, { force });
    } catch (e) {
      if (wasExported) this.#exportIfLive(name);
      throw e;
    }
    this.#volumes.delete(name);
    this.#suspendedKeyTags.delete(name);
    this.keyring.delete(keyDescription(name));
  }

  /** Create a crypt mapping for an unlocked volume and export it. Takes a copy of the key. */
  openVolume(m: CryptMapping, volumeKey: Secret): Promise<VolumeStatus> {
    return this.#serial(m.name, async () => {
      if (this.registry.find(m.name)) {
        throw new CryptmapError('EEXIST', `Device ${m.name} already exists.`, { exitCode: EXIT_BUSY, errno: 'EEXIST' });
      }
      if (volumeKey.length !== m.keyBytes) throw new CryptmapError('EKEY_SIZE', `volume key has ${volumeKey.length} bytes, mapping needs ${m.keyBytes}`);
      const desc = keyDescription(m.name);
      this.keyring.set(desc, volumeKey.expose());
      try {
        await this.#dm.create(m.name, { table: cryptTableLine(m, keyRefArg(m)), uuid: dmUuid(m), readOnly: m.readOnly });
        try {
          this.#exportIfLive(m.name);
        } catch (e) {
          await this.#dm.remove(m.name, { force: true });
          throw e;
        }
      } catch (e) {
        this.keyring.delete(desc);
        throw e;
      }
      this.#volumes.set(m.name, m);
      log.info('volume opened', { name: m.name, type: m.type, device: m.device, nbd: nbdUnixUri(m.name, this.nbdSocketPath) });
      return this.statusOf(m.name);
    });
  }

  closeVolume(name: string, opts: { force?: boolean } = {}): Promise<void> {
    return this.#serial(name, async () => {
      const dev = this.registry.find(name);
      if (!dev) throw new CryptmapError('ENODEV', `Device ${name} is not active.`, { exitCode: EXIT_WRONG_DEVICE, errno: 'ENOENT' });
      if (dev.suspended) await this.#removeSuspended(name, opts.force ?? false);
      else await this.#remove(name, opts.force ?? false);
      log.info('volume closed', { name });
    });
  }

  /**
   * Remove a suspended device (as the kernel does, without resuming it). Its data was flushed when it
   * was suspended; the export's flush and any queued NBD request would wait at the closed gate for
   * ever, so the device goes first (queued I/O then fails with EIO), then the export. An attached
   * device is refused: detaching flushes through the kernel client, which would wait too.
   */
  async #removeSuspended(name: string, force: boolean): Promise<void> {
    const attached = this.#attachments.get(name);
    if (attached) {
      throw new CryptmapError('EBUSY', `Device ${name} is still in use (suspended and attached as ${attached.devicePath}; resume it first).`, { exitCode: EXIT_BUSY, errno: 'EBUSY' });
    }
    const conns = this.nbd.connectionCount(name);
    if (!force && conns > 0) {
      throw new CryptmapError('EBUSY', `Device ${name} is still in use (${conns} NBD connection${conns === 1 ? '' : 's'}).`, { exitCode: EXIT_BUSY, errno: 'EBUSY' });
    }
    // Other openers than the export (the kernel's open count check).
    const others = this.registry.get(name).openCount - (this.#handles.has(name) ? 1 : 0);
    if (!force && others > 0) throw new CryptmapError('EBUSY', `Device ${name} is still in use.`, { exitCode: EXIT_BUSY, errno: 'EBUSY' });
    await this.#dm.remove(name, { force: true });
    await this.#unexport(name, true);
    this.#volumes.delete(name);
    this.#suspendedKeyTags.delete(name);
    this.keyring.delete(keyDescription(name));
  }

  /**
   * luksSuspend (cryptsetup lib/setup.c crypt_suspend): suspend the device (new I/O waits, in-flight
   * I/O drains, flush), wipe the crypt target's key (`key wipe` message) and drop the volume key from
   * the keyring. Only LUKS volumes opened through this daemon. Errors as cryptsetup 2.6:
   * not active -> exit 4; not LUKS or already suspended -> exit 1.
   */
  suspendVolume(name: string): Promise<VolumeStatus> {
    return this.#serial(name, async () => {
      const { dev, m } = this.#activeVolume(name, 'This operation is supported only for LUKS device.');
      if (dev.suspended) throw new CryptmapError('ESUSPENDED', `Volume ${name} is already suspended.`, { exitCode: EXIT_FAILURE, errno: 'EINVAL' });
      const desc = keyDescription(name);
      let keyTag: { salt: Buffer; tag: Buffer } | undefined;
      if (this.keyring.has(desc)) {
        const key = await this.keyring.resolve({ type: 'logon', description: desc, keyBytes: m.keyBytes });
        const salt = randomBytes(32);
        keyTag = { salt, tag: createHmac('sha256', salt).update(key.expose()).digest() };
        key.dispose();
      }
      try {
        await this.#dm.suspend(name);
      } catch (e) {
        throw new CryptmapError('ESUSPEND', `Error during suspending device ${name}.`, { exitCode: EXIT_FAILURE, cause: e });
      }
      try {
        await this.#dm.message(name, 0, ['key', 'wipe']);
      } catch (e) {
        await this.#dm.resume(name);
        throw new CryptmapError('ESUSPEND', `Error during suspending device ${name}.`, { exitCode: EXIT_FAILURE, cause: e });
      }
      this.keyring.delete(desc);
      if (keyTag) this.#suspendedKeyTags.set(name, keyTag);
      log.info('volume suspended', { name });
      return this.statusOf(name);
    });
  }

  /**
   * luksResume (cryptsetup lib/setup.c crypt_resume_by_*, libdevmapper.c dm_resume_and_reinstate_key):
   * put the volume key back in the keyring, `key set :<bytes>:logon:cryptmap:<name>` (the reference
   * the table already uses), resume. The caller has unlocked a keyslot with it; the daemon also checks
   * it is the key the volume was suspended with (a keyed hash kept at suspend). Takes a copy of the key.
   * Errors as cryptsetup 2.6: not active -> exit 4; not LUKS, not suspended -> exit 1. On failure the
   * device stays suspended with its key wiped (retryable).
   */
  resumeVolume(name: string, volumeKey: Secret): Promise<VolumeStatus> {
    return this.#serial(name, async () => {
      const { dev, m } = this.#activeVolume(name, `${name} is not active LUKS device name or header is missing.`);
      if (!dev.suspended) throw new CryptmapError('ENOTSUSPENDED', `Volume ${name} is not suspended.`, { exitCode: EXIT_FAILURE, errno: 'EINVAL' });
      if (volumeKey.length !== m.keyBytes) throw new CryptmapError('EKEY_SIZE', `volume key has ${volumeKey.length} bytes, ${name} needs ${m.keyBytes}`);
      const was = this.#suspendedKeyTags.get(name);
      if (was !== undefined) {
        const tag = createHmac('sha256', was.salt).update(volumeKey.expose()).digest();
        const same = constantTimeEqual(tag, was.tag);
        wipe(tag);
        if (!same) throw new CryptmapError('EKEYMISMATCH', `The volume key does not match the key of suspended device ${name}.`, { exitCode: EXIT_FAILURE, errno: 'EINVAL' });
      }
      const desc = keyDescription(name);
      this.keyring.set(desc, volumeKey.expose());
      let keySet = false;
      try {
        await this.#dm.message(name, 0, ['key', 'set', keyRefArg(m)]);
        keySet = true;
        await this.#dm.resume(name);
      } catch (e) {
        if (keySet) await this.#dm.message(name, 0, ['key', 'wipe']).catch(() => undefined);
        this.keyring.delete(desc);
        throw new CryptmapError('ERESUME', `Error during resuming device ${name}.`, { exitCode: EXIT_FAILURE, cause: e });
      }
      this.#suspendedKeyTags.delete(name);
      log.info('volume resumed', { name });
      return this.statusOf(name);
    });
  }

  /**
   * cryptsetup refresh (open --refresh; lib/setup.c with CRYPT_ACTIVATE_REFRESH): reload the active
   * LUKS volume's table with new activation flags and swap it in (dmsetup load, suspend, resume: I/O
   * drains and continues under the new table). The caller unlocked a keyslot; its key must be the one
   * the volume runs with. Errors: not active -> exit 4; not LUKS, suspended, other key -> exit 1; a
   * failed load leaves the old table live.
   */
  refreshVolume(name: string, flags: RefreshFlags, volumeKey: Secret): Promise<VolumeStatus> {
    return this.#serial(name, async () => {
      const { dev, m } = this.#activeVolume(name, `${name} is not active LUKS device name or header is missing.`);
      if (dev.suspended) throw new CryptmapError('ESUSPENDED', `Volume ${name} is suspended (luksResume it first).`, { exitCode: EXIT_FAILURE, errno: 'EINVAL' });
      await this.#checkRunningKey(m, volumeKey);
      const next: CryptMapping = { ...m, ...allFlags(flags) };
      await this.#swapTable(next, 'EREFRESH', 'refresh');
      log.info('volume refreshed', { name });
      return this.statusOf(name);
    });
  }

  /**
   * cryptsetup resize (lib/setup.c crypt_resize): measure the volume's device again, then reload its
   * table with `sizeSectors` (default: all of the device after the data offset, rounded down to the
   * crypto sector) and swap it in. For LUKS2 the caller must bring the volume key (cryptsetup asks for
   * the passphrase, the key being in the keyring); it must be the running one. New NBD connections
   * see the new size. Errors as cryptsetup 2.6: not active -> exit 4; misaligned or too large -> 1.
   */
  resizeVolume(name: string, sizeSectors: number | undefined, volumeKey?: Secret): Promise<VolumeStatus> {
    return this.#serial(name, async () => {
      const { dev, m } = this.#activeVolume(name);
      if (dev.suspended) throw new CryptmapError('ESUSPENDED', `Volume ${name} is suspended (luksResume it first).`, { exitCode: EXIT_FAILURE, errno: 'EINVAL' });
      if (m.type === 'LUKS2') {
        if (volumeKey === undefined) throw new CryptmapError('EKEY', `Resizing LUKS2 volume ${name} needs its volume key (the passphrase).`, { exitCode: EXIT_FAILURE });
        await this.#checkRunningKey(m, volumeKey);
      }
      // A file or block device is measured again; a mapped device below has its live size.
      const deviceBytes = (await this.registry.refreshFileSize(m.device)) ?? this.registry.find(m.device.replace(/^\/dev\/mapper\//, ''))?.sizeBytes ?? 0;
      const availableSectors = Math.floor(deviceBytes / 512) - m.offsetSectors;
      const perSector = m.sectorBytes / 512;
      const size = sizeSectors ?? availableSectors - (availableSectors % perSector);
      if (sizeSectors !== undefined && (!Number.isSafeInteger(sizeSectors) || sizeSectors <= 0)) {
        throw new CryptmapError('EARGS', `Invalid size ${sizeSectors}.`, { exitCode: EXIT_FAILURE });
      }
      if (size % perSector !== 0) throw new CryptmapError('EALIGN', 'Device size is not aligned to requested sector size.', { exitCode: EXIT_FAILURE, errno: 'EINVAL' });
      if (size <= 0 || size > availableSectors) throw new CryptmapError('EDEVSMALL', `Device ${m.device} is too small.`, { exitCode: EXIT_FAILURE, errno: 'EINVAL' });
      if (size === m.sizeSectors) return this.statusOf(name);
      await this.#swapTable({ ...m, sizeSectors: size }, 'ERESIZE', 'resize');
      log.info('volume resized', { name, sizeSectors: size });
      return this.statusOf(name);
    });
  }

  /**
   * The active volume `name` opened through this daemon: cryptsetup's "not active" (exit 4) when
   * there is no such device; with `notLuksMessage`, only LUKS volumes (else that message, exit 1);
   * without it, any volume (a bare dm device gets cryptsetup's "not supported", exit 1).
   */
  #activeVolume(name: string, notLuksMessage?: string): { dev: MappedDevice; m: CryptMapping } {
    const dev = this.registry.find(name);
    if (!dev) throw new CryptmapError('ENODEV', `Device ${name} is not active.`, { exitCode: EXIT_WRONG_DEVICE, errno: 'ENOENT' });
    const m = this.#volumes.get(name);
    if (m === undefined && notLuksMessage === undefined) {
      throw new CryptmapError('ENOTSUP', 'This operation is not supported for this device type.', { exitCode: EXIT_FAILURE, errno: 'ENOTSUP' });
    }
    if (notLuksMessage !== undefined && (m === undefined || (m.type !== 'LUKS1' && m.type !== 'LUKS2'))) {
      throw new CryptmapError('ENOTLUKS', notLuksMessage, { exitCode: EXIT_FAILURE, errno: 'EINVAL' });
    }
    return { dev, m: m! };
  }

  /** The key a caller brings (refresh, resize) must be the one volume `m` runs with (constant-time compare). */
  async #checkRunningKey(m: CryptMapping, volumeKey: Secret): Promise<void> {
    const live = await this.keyring.resolve({ type: 'logon', description: keyDescription(m.name), keyBytes: m.keyBytes });
    const same = volumeKey.length === live.length && constantTimeEqual(volumeKey.expose(), live.expose());
    live.dispose();
    if (!same) throw new CryptmapError('EKEYMISMATCH', 'Volume key does not match the volume.', { exitCode: EXIT_FAILURE, errno: 'EPERM' });
  }

  /** Load `next`'s table for its volume, then swap it in (suspend: I/O drains; resume). A failed load leaves the old table live. */
  async #swapTable(next: CryptMapping, code: string, what: string): Promise<void> {
    try {
      await this.#dm.load(next.name, cryptTableLine(next, keyRefArg(next)));
    } catch (e) {
      await this.#dm.clear(next.name).catch(() => undefined);
      throw new CryptmapError(code, `Cannot ${what} ${next.name}: ${(e as Error).message}`, { exitCode: EXIT_FAILURE, cause: e });
    }
    await this.#dm.suspend(next.name);
    await this.#dm.resume(next.name);
    this.#volumes.set(next.name, next);
  }

  statusOf(name: string): VolumeStatus {
    const dev = this.registry.find(name);
    const nbdUri = nbdUnixUri(name, this.nbdSocketPath);
    if (!dev) return { name, active: false, nbdUri, suspended: false, openCount: 0, nbdConnections: 0 };
    const m = this.#volumes.get(name);
    const st: VolumeStatus = {
      name,
      active: true,
      nbdUri,
      suspended: dev.suspended,
      openCount: dev.openCount,
      nbdConnections: this.nbd.connectionCount(name),
    };
    if (m) st.mapping = { ...m, ivOffsetSectors: m.ivOffsetSectors.toString() };
    const h = m ? this.registry.remoteHealth(m.device) : undefined;
    if (h) st.remote = { state: h.state, reconnects: h.reconnects, ...(h.lastError !== undefined ? { lastError: h.lastError } : {}) };
    const a = this.#attachments.get(name);
    if (a) {
      st.attachedDevice = a.devicePath;
      st.attachedVia = a.via;
    }
    return st;
  }

  volumes(): VolumeStatus[] {
    return this.registry.list().map((d) => this.statusOf(d.name));
  }

  /** Make the export a kernel block device: `via` fuse (built-in FUSE export + loop), nbd (nbd-client) or nbdfuse; default the best present. */
  attach(name: string, opts: { readOnly?: boolean; swap?: boolean; via?: Via | 'auto' } = {}): Promise<Attachment> {
    return this.#serial(`attach:${name}`, async () => {
      if (!this.#handles.has(name)) throw new CryptmapError('ENODEV', `Device ${name} is not active.`, { exitCode: EXIT_WRONG_DEVICE, errno: 'ENOENT' });
      const have = this.#attachments.get(name);
      if (have) return have;
      const dev = this.registry.get(name);
      const info = await this.#fuse.attach(name, this.#handles.get(name)!, {
        via: opts.via,
        readOnly: (opts.readOnly ?? false) || dev.readOnly,
        logicalBlockBytes: dev.limits.logicalBlockBytes,
        swap: opts.swap ?? false,
      });
      this.#attachments.set(name, info);
      log.info('volume attached', { name, device: info.devicePath, via: info.via });
      return info;
    });
  }

  detach(name: string): Promise<void> {
    return this.#serial(`attach:${name}`, async () => {
      const info = this.#attachments.get(name);
      if (!info) throw new CryptmapError('ENOTATTACHED', `Device ${name} is not attached.`, { exitCode: EXIT_WRONG_DEVICE });
      const where = mountedAt(info.devicePath);
      if (where !== undefined) {
        throw new CryptmapError('EBUSY', `Device ${info.devicePath} is mounted on ${where}; unmount it first.`, { exitCode: EXIT_BUSY, errno: 'EBUSY' });
      }
      await this.#detachNow(name, info);
    });
  }

  async #detachNow(name: string, info: Attachment): Promise<void> {
    await this.#fuse.detach(info);
    this.#attachments.delete(name);
    log.info('volume detached', { name });
  }

  /** Request counts of `name`'s FUSE export (tests, status), if it has one. */
  fuseStats(name: string): ReturnType<FuseExports['stats']> {
    return this.#fuse.stats(name);
  }

  /**
   * Listen for NBD clients on the Unix socket (and TCP when asked). The two have separate policies:
   * the Unix socket (0600 in a private directory) is plaintext whatever TCP requires, so local
   * attach needs no certificate; TCP takes `tcp.tls` (the caller demands verified client
   * certificates there, cli/commands/daemon.ts). Each has its own connection cap.
   */
  async listen(tcp?: { host: string; port: number; tls?: NbdTlsMode }): Promise<void> {
    await this.nbd.listenUnix(this.#opts.nbdSocketPath, { mode: 0o600, tls: 'off' });
    if (tcp) await this.nbd.listenTcp(tcp.port, tcp.host, tcp.tls ? { tls: tcp.tls } : {});
  }

  /** Clean shutdown: detach, stop NBD (flushing every export), remove devices (top of stacks first), wipe keys. */
  async shutdown(): Promise<void> {
    if (this.#closing) return;
    this.#closing = true;
    await Promise.allSettled([...this.#chains.values()]);
    // Suspended devices go first (their data was flushed at suspend): detaching, the NBD server's
    // flush and their queued requests would otherwise wait for a resume that cannot come.
    for (const d of this.registry.list()) {
      if (d.suspended) await this.#dm.remove(d.name, { force: true }).catch(() => undefined);
    }
    this.#suspendedKeyTags.clear();
    for (const [name, info] of this.#attachments) {
      try {
        await this.#fuse.detach(info);
      } catch (e) {
        log.error('detach failed at shutdown', { name, error: e instanceof Error ? e.message : String(e) });
      }
    }
    this.#attachments.clear();
    await this.nbd.close();
    for (const h of this.#handles.values()) await h.close();
    this.#handles.clear();
    // Remove until nothing is left: devices used by others (stacks) go after their users.
    for (let round = 0; round < 64 && this.registry.list().length > 0; round++) {
      for (const d of this.registry.list()) {
        try {
          await this.#dm.remove(d.name);
        } catch {
          // still used by another mapped device: next round
        }
      }
    }
    for (const d of this.registry.list()) await this.#dm.remove(d.name, { force: true }).catch(() => undefined);
    this.#volumes.clear();
    this.keyring.clear();
  }
}
