/**
 * The daemon's state: mapped devices (dm registry), the volume keys they use (keyring), an NBD
 * server exporting every mapped device with a live table under its own name, and kernel block
 * device attachments. The control socket handlers and the agent (in-process) both call this.
 *
 * One record per device name (volume-table.ts); the work is in export-sync.ts (exports follow the
 * devices), volume-lifecycle.ts (the cryptsetup verbs) and attachments.ts. Lifecycle per name is
 * serialised by a promise chain here; data I/O never waits on it.
 */
import { type DmControl, DeviceRegistry } from '../dm/index.js';
import { NbdServer, nbdUnixUri } from '../nbd/index.js';
import type { NbdServerOptions, NbdTlsMode } from '../nbd/types.js';
import type { Attachment, RefreshFlags, Via, VolumeStatus } from '../control/protocol.js';
import type { CryptMapping } from '../activate/mapping.js';
import { CryptmapError, EXIT_BUSY } from '../util/errors.js';
import type { Secret } from '../util/secret.js';
import { attach, detach, detachAll } from './attachments.js';
import { syncedDm } from './export-sync.js';
import { FuseExports } from './fuse-export.js';
import { Keyring } from './keyring.js';
import * as lifecycle from './volume-lifecycle.js';
import {
  hotzoneDevices,
  newKeyDescription,
  type OnlineReencryptOptions,
  openMidReencryption,
  startOnlineReencrypt,
  stopOnlineReencrypt,
} from './reencrypt-online.js';
import { type CoreParts, VolumeTable } from './volume-table.js';

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
  readonly #opts: DaemonCoreOptions;
  readonly #parts: CoreParts;
  readonly #chains = new Map<string, Promise<unknown>>();
  #closing = false;

  constructor(opts: DaemonCoreOptions) {
    this.#opts = opts;
    this.registry = new DeviceRegistry({ keyStore: this.keyring });
    const volumes = new VolumeTable();
    const fuse = new FuseExports({
      registry: this.registry,
      keyring: this.keyring,
      mappingOf: (n) => volumes.find(n)?.mapping,
      attachDir: opts.attachDir,
      nbdSocketPath: opts.nbdSocketPath,
    });
    // No OFFSET_HOLE READ replies by default: they cost a block-status query (SEEK_DATA/SEEK_HOLE)
    // per READ, and on tmpfs SEEK_HOLE walks the page cache up to the next hole (milliseconds per READ
    // on a large written file; README has the figure). Crypt targets never report holes anyway; clients
    // that want sparseness ask with NBD_CMD_BLOCK_STATUS (nbdcopy, qemu-img do).
    this.nbd = new NbdServer({ sparseReads: false, ...opts.nbd });
    this.#parts = {
      registry: this.registry,
      keyring: this.keyring,
      nbd: this.nbd,
      // Suspend, resume and remove switch the FUSE export's direct route off and on (fuse-export.ts).
      dm: fuse.dmControl(),
      fuse,
      volumes,
      nbdSocketPath: opts.nbdSocketPath,
    };
  }

  get nbdSocketPath(): string {
    return this.#opts.nbdSocketPath;
  }

  /** Run `fn` after every earlier lifecycle operation on `key` finished. */
  readonly #serial = <T>(key: string, fn: () => Promise<T>): Promise<T> => {
    if (this.#closing)
      return Promise.reject(
        new CryptmapError('ESHUTDOWN', 'the cryptmap daemon is shutting down', {
          errno: 'ESHUTDOWN',
          exitCode: EXIT_BUSY,
        }),
      );
    const prev = this.#chains.get(key) ?? Promise.resolve();
    const next = prev.then(fn, fn);
    const tail = next.catch(() => undefined);
    this.#chains.set(key, tail);
    void tail.then(() => {
      if (this.#chains.get(key) === tail) this.#chains.delete(key);
    });
    return next;
  };

  /** Run a volume verb on `name` in its turn, then report the volume's status. */
  #volumeVerb(name: string, fn: () => Promise<void>): Promise<VolumeStatus> {
    return this.#serial(name, async () => {
      await fn();
      return this.statusOf(name);
    });
  }

  /**
   * A verb that rebuilds or rekeys the table (suspend, resume, refresh, resize) is refused while the
   * volume is mapped by an online reencryption (running, or stopped half-way: two keys, two layouts).
   */
  #notInReencryption(name: string): void {
    const st = this.#parts.volumes.find(name)?.reencrypt?.status.state;
    if (st !== undefined && st !== 'finished')
      throw new CryptmapError(
        'EBUSY',
        st === 'running'
          ? `Reencryption of ${name} is running; wait for it or stop it first.`
          : `Device ${name} is in reencryption (${st}); resume it (cryptmap reencrypt --resume-only) or close it first.`,
        { exitCode: EXIT_BUSY, errno: 'EBUSY' },
      );
  }

  /**
   * Online reencryption (reencrypt-online.ts): start rewriting `name` with the new key while it is
   * served; returns once it runs. Takes copies of the keys.
   */
  reencryptVolume(
    name: string,
    oldKey: Secret | undefined,
    newKey: Secret | undefined,
    opts: OnlineReencryptOptions = {},
  ): Promise<VolumeStatus> {
    return this.#volumeVerb(name, () => startOnlineReencrypt(this.#parts, name, oldKey, newKey, opts));
  }

  /** Open a volume in the middle of its reencryption (reencrypt-online.ts openMidReencryption). Takes copies of the keys. */
  openReencryptingVolume(
    m: CryptMapping,
    oldKey: Secret | undefined,
    newKey: Secret | undefined,
  ): Promise<VolumeStatus> {
    return this.#volumeVerb(m.name, () => openMidReencryption(this.#parts, m, oldKey, newKey));
  }

  /** Stop the online reencryption of `name` after its current hotzone; resolves once it stopped. */
  async stopReencrypt(name: string): Promise<VolumeStatus> {
    await stopOnlineReencrypt(this.#parts, name);
    return this.statusOf(name);
  }

  /** The dmsetup verbs, with NBD exports following the devices. */
  dm(): DmControl {
    return syncedDm(this.#parts, this.#serial);
  }

  /** Create a crypt mapping for an unlocked volume and export it. Takes a copy of the key. */
  openVolume(m: CryptMapping, volumeKey: Secret, opts: lifecycle.OpenOptions = {}): Promise<VolumeStatus> {
    return this.#volumeVerb(m.name, () => lifecycle.openVolume(this.#parts, m, volumeKey, opts));
  }

  /** Close: a running online reencryption stops first (after its current hotzone; resumable). */
  closeVolume(name: string, opts: { force?: boolean } = {}): Promise<void> {
    return this.#serial(name, async () => {
      await stopOnlineReencrypt(this.#parts, name);
      await lifecycle.closeVolume(this.#parts, name, opts.force ?? false);
      // What a reencryption left: the hotzone device of one that failed, the new key.
      for (const h of hotzoneDevices(name))
        if (this.registry.find(h)) await this.#parts.dm.remove(h, { force: true }).catch(() => undefined);
      this.keyring.delete(newKeyDescription(name));
    });
  }

  /** luksSuspend (volume-lifecycle.ts). */
  suspendVolume(name: string): Promise<VolumeStatus> {
    return this.#volumeVerb(name, () => {
      this.#notInReencryption(name);
      return lifecycle.suspendVolume(this.#parts, name);
    });
  }

  /** luksResume with the volume key (volume-lifecycle.ts). Takes a copy of the key. */
  resumeVolume(name: string, volumeKey: Secret, opts: { disableKeyring?: boolean } = {}): Promise<VolumeStatus> {
    return this.#volumeVerb(name, () => {
      this.#notInReencryption(name);
      return lifecycle.resumeVolume(this.#parts, name, volumeKey, opts);
    });
  }

  /** cryptsetup refresh: new activation flags, the running key (volume-lifecycle.ts). */
  refreshVolume(name: string, flags: RefreshFlags, volumeKey: Secret): Promise<VolumeStatus> {
    return this.#volumeVerb(name, () => {
      this.#notInReencryption(name);
      return lifecycle.refreshVolume(this.#parts, name, flags, volumeKey);
    });
  }

  /** cryptsetup resize; LUKS2 needs the running key (volume-lifecycle.ts). */
  resizeVolume(name: string, sizeSectors: number | undefined, volumeKey?: Secret): Promise<VolumeStatus> {
    return this.#volumeVerb(name, () => {
      this.#notInReencryption(name);
      return lifecycle.resizeVolume(this.#parts, name, sizeSectors, volumeKey);
    });
  }

  statusOf(name: string): VolumeStatus {
    const dev = this.registry.find(name);
    const nbdUri = nbdUnixUri(name, this.nbdSocketPath);
    if (!dev) return { name, active: false, nbdUri, suspended: false, openCount: 0, nbdConnections: 0 };
    const rec = this.#parts.volumes.find(name);
    const m = rec?.mapping;
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
    if (h)
      st.remote = {
        state: h.state,
        reconnects: h.reconnects,
        ...(h.lastError !== undefined ? { lastError: h.lastError } : {}),
      };
    if (rec?.reencrypt) st.reencrypt = { ...rec.reencrypt.status };
    const a = rec?.attachment;
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
    return this.#serial(`attach:${name}`, () => attach(this.#parts, name, opts));
  }

  detach(name: string): Promise<void> {
    return this.#serial(`attach:${name}`, () => detach(this.#parts, name));
  }

  /** Request counts of `name`'s FUSE export (tests, status), if it has one. */
  fuseStats(name: string): ReturnType<FuseExports['stats']> {
    return this.#parts.fuse.stats(name);
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
    // Online reencryptions stop after their current hotzone (resumable, online or offline).
    await Promise.allSettled([...this.#parts.volumes.values()].map((r) => stopOnlineReencrypt(this.#parts, r.name)));
    const { dm, volumes } = this.#parts;
    // Suspended devices go first (their data was flushed at suspend): detaching, the NBD server's
    // flush and their queued requests would otherwise wait for a resume that cannot come.
    for (const d of this.registry.list()) {
      if (d.suspended) await dm.remove(d.name, { force: true }).catch(() => undefined);
    }
    for (const r of volumes.values()) delete r.suspendedKeyTag;
    await detachAll(this.#parts);
    await this.nbd.close();
    for (const r of volumes.values()) {
      const h = r.exportHandle;
      delete r.exportHandle;
      if (h) await h.close();
    }
    // Remove until nothing is left: devices used by others (stacks) go after their users.
    for (let round = 0; round < 64 && this.registry.list().length > 0; round++) {
      for (const d of this.registry.list()) {
        try {
          await dm.remove(d.name);
        } catch {
          // still used by another mapped device: next round
        }
      }
    }
    for (const d of this.registry.list()) await dm.remove(d.name, { force: true }).catch(() => undefined);
    volumes.clear();
    this.keyring.clear();
  }
}
