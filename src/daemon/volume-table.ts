/**
 * What the daemon knows about each mapped device it serves, one record per name (the device itself
 * is in the dm registry): its crypt mapping when it was opened as a volume, the handle its NBD export
 * serves, its kernel attachment, and the key check of a luksSuspend. The parts of the core
 * (export-sync.ts, attachments.ts, volume-lifecycle.ts) share this table and the `CoreParts` below.
 */
import type { CryptMapping } from '../activate/mapping.js';
import type { BlockDevice } from '../blockdev/types.js';
import type { Attachment } from '../control/protocol.js';
import type { DeviceRegistry, InProcessDmControl } from '../dm/index.js';
import type { NbdServer } from '../nbd/index.js';
import type { FuseExports } from './fuse-export.js';
import type { ReencryptJob } from './reencrypt-online.js';
import type { Keyring } from './keyring.js';

export interface VolumeRecord {
  readonly name: string;
  /** The crypt mapping of a volume opened through the daemon; absent for a device made with `dm create`. */
  mapping?: CryptMapping;
  /** The handle the NBD export serves, while the device is exported. */
  exportHandle?: BlockDevice;
  /** The kernel block device, while attached. */
  attachment?: Attachment;
  /** luksSuspend'ed: HMAC-SHA256 of the wiped key under a random salt, to check the key resume brings. */
  suspendedKeyTag?: { salt: Buffer; tag: Buffer };
  /** Its online reencryption (reencrypt-online.ts), while it runs and after it ended. */
  reencrypt?: ReencryptJob;
}

/** The records by name; a record goes when its device is removed. */
export class VolumeTable {
  readonly #byName = new Map<string, VolumeRecord>();

  find(name: string): VolumeRecord | undefined {
    return this.#byName.get(name);
  }

  /** The record of `name`, made empty when there is none. */
  get(name: string): VolumeRecord {
    let r = this.#byName.get(name);
    if (r === undefined) {
      r = { name };
      this.#byName.set(name, r);
    }
    return r;
  }

  delete(name: string): void {
    this.#byName.delete(name);
  }

  /** Drop the record of `name` when nothing is left in it (a device that is no longer exported or attached). */
  prune(name: string): void {
    const r = this.#byName.get(name);
    if (
      r &&
      r.mapping === undefined &&
      r.exportHandle === undefined &&
      r.attachment === undefined &&
      r.suspendedKeyTag === undefined
    )
      this.#byName.delete(name);
  }

  values(): IterableIterator<VolumeRecord> {
    return this.#byName.values();
  }

  clear(): void {
    this.#byName.clear();
  }
}

/** The daemon's parts, as the files of the core share them. */
export interface CoreParts {
  readonly registry: DeviceRegistry;
  readonly keyring: Keyring;
  readonly nbd: NbdServer;
  /** The dmsetup verbs on the registry, switching FUSE direct routes (fuse-export.ts); exports are not synced here. */
  readonly dm: InProcessDmControl;
  readonly fuse: FuseExports;
  readonly volumes: VolumeTable;
  readonly nbdSocketPath: string;
}
