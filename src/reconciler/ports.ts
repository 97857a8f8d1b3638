/**
 * The ports the apply loop drives: everything that touches files, LUKS, mappings, NBD, file systems
 * and the key service sits behind these interfaces, so the reconciler is tested now with fakes and
 * wired to the real data path (activate, luks, dm, nbd) by the agent later.
 *
 * Contract for implementers (each operation must be idempotent or fail cleanly):
 * - createFile: make the sparse backing file (parent directories too). Fails if the file exists.
 *   A volume on a `device` (an NBD export): fails unless the export is reachable, blank and large enough.
 * - deleteFile: remove the backing file; succeeds if it is already gone.
 * - format: write a LUKS2 header using `key` as the passphrase of keyslot 0 with the cheapest PBKDF
 *   cryptsetup accepts (the key is 256 bits of uniform randomness or HKDF output, so no stretching
 *   is needed: pbkdf2, 1000 iterations), cipher/keySizeBits/sectorSize from the target; data area
 *   `sizeBytes`. On failure nothing must be half-open; the apply loop deletes the file of a new volume.
 * - open: unlock keyslot with `key` and set up the mapping. A key that does not unlock must throw a
 *   CryptmapError with code `EUNLOCK`. Opening an already open mapping succeeds.
 * - openPlain (swap): a plain dm-crypt mapping with `key` (no header, nothing written).
 * - close, detach, unmount: succeed if already done.
 * - attach: serve the mapping (NBD export; kernel device where possible) and say where.
 * - mkfs: make `filesystem` (or mkswap when it is `swap`) on the open mapping.
 * - mount: mount at `mountpoint`, or swapon for swap. swapon is safe only where the block device
 *   cannot need memory to make progress (kernel NBD client with its swap option); through FUSE or a
 *   loop device over FUSE it must throw a CryptmapError (code ESWAPUNSAFE) that explains why, unless
 *   the port was built with a force option. The apply loop reports that volume `failed` with the
 *   message, keeps the swap area open and attached, and tries again on the next run.
 * - probe: what is true right now. `damage` reports a backing file that was altered or truncated
 *   (size smaller than the LUKS data segment, unreadable header): the reconciler refuses it.
 */
import type { DeriveRequest } from '../keyservice/derive.js';
import type { Secret } from '../util/secret.js';
import type { Filesystem, VolumeClass } from './manifest.js';

export type TargetKind = 'scratch' | 'swap';

/**
 * The keyslot KDF for volume keys from the key service or the CSPRNG: 256 uniformly random bits
 * need no stretching, so the cheapest PBKDF cryptsetup 2.6 accepts (pbkdf2 has a floor of 1000
 * iterations; `--pbkdf-force-iterations 999` is refused). Unlocking then costs about a millisecond.
 */
export const VOLUME_KEYSLOT_PBKDF = { type: 'pbkdf2', hash: 'sha256', iterations: 1000 } as const;

/** One volume the manifest asks for, with everything a port needs. */
export interface VolumeTarget {
  /** `scratch/<service>/<volume>` or `swap/<name>`: unique, stable, the state key. */
  id: string;
  kind: TargetKind;
  /** Service name (scratch) or `swap`. */
  service: string;
  /** Volume name (scratch) or the swap entry's name. */
  volume: string;
  class: VolumeClass;
  /** Backing file, or the NBD URI of the export (`device`). */
  path: string;
  /**
   * Shared storage (manifest `device:`): `path` is this NBD URI. The export is never created or
   * deleted: "file exists" means it is not blank, createFile checks that it is blank and large
   * enough, deleteFile zeroes the header of a volume whose creation this agent began, and
   * `sizeBytes` is 0 (the size is the export's).
   */
  device?: string;
  /** Usable size (the data area). */
  sizeBytes: number;
  filesystem: Filesystem | 'swap';
  mountpoint?: string;
  cipher: string;
  keySizeBits: number;
  sectorSize: number;
  /** Name of the mapping and of its NBD export, e.g. `scratch:web:cache`. */
  mapping: string;
  /**
   * A volume in a thin pool (manifest `pool:`): its "file" is thin device `thinId` of the pool,
   * activated as the mapped device `thinMapping` (`thin:<service>:<volume>`, not exported), which
   * holds the LUKS2 header and ciphertext; `sizeBytes` is its virtual size. createFile is the pool's
   * `create_thin`, deleteFile its `delete` (with the volume's snapshots).
   */
  pool?: { name: string; mapping: string; thinMapping: string };
  /** The volume's thin device id in its pool: chosen by the apply loop, kept in the record. */
  thinId?: number;
  /**
   * Size of the thin device when it was made (the record's fileBytes): it stays so when the
   * manifest's `size` changes later (no resize, as for files).
   */
  thinBytes?: number;
}

/** A thin pool the manifest asks for (`pools:`). */
export interface PoolTarget {
  /** `pool/<name>`: the step id. */
  id: string;
  name: string;
  /** The pool's mapped device, `pool:<name>` (not exported). */
  mapping: string;
  metadataPath: string;
  dataPath: string;
  /** The files are the agent's (under the state directory: made when missing); else named devices, never made. */
  ownFiles: boolean;
  /** Data size (0 for devices: theirs, in whole blocks). */
  dataBytes: number;
  metadataBytes: number;
  blockBytes: number;
}

export interface PoolProbe {
  /** Both the metadata and the data file or device exist. */
  exists: boolean;
  /** Some exist, some not (files: an interrupted createPool). */
  partial: boolean;
  open: boolean;
}

/**
 * Thin pools (contract as VolumePorts: idempotent or failing cleanly):
 * - createPool: make the missing sparse files (data first, then metadata; a blank metadata file is
 *   formatted when the pool opens). Never for named devices.
 * - openPool: activate the pool mapping over the metadata and data (opening an open one succeeds);
 *   metadata that is not the kernel's thin format is refused, never formatted over.
 * - closePool: deactivate it (succeeds if closed); refused while a thin device of it is active.
 * - poolDeviceIds: the thin device ids in the open pool's metadata.
 * - snapshot: `create_snap newId originId` with the origin's thin mapping suspended around it
 *   (the kernel's requirement), the volume staying open.
 */
export interface PoolPorts {
  probePool(p: PoolTarget): Promise<PoolProbe>;
  createPool(p: PoolTarget): Promise<void>;
  openPool(p: PoolTarget): Promise<void>;
  closePool(p: PoolTarget): Promise<void>;
  poolDeviceIds(p: PoolTarget): Promise<number[]>;
  snapshot(v: VolumeTarget, newId: number): Promise<void>;
  /** Delete thin device `id` of the open pool (a volume's snapshot). */
  deleteThin(p: PoolTarget, id: number): Promise<void>;
}

export interface VolumeProbe {
  fileExists: boolean;
  fileBytes?: number;
  /** A LUKS header is present (meaningful when fileExists). */
  isLuks?: boolean;
  /** Why the file cannot be trusted (truncated, header damaged), if so. */
  damage?: string;
  open: boolean;
  attached: boolean;
  /** Mounted (swap: swapped on). */
  mounted: boolean;
}

export interface AttachInfo {
  /** e.g. `nbd+unix:///scratch:web:cache?socket=/run/cryptmap/nbd.sock` */
  nbdUri?: string;
  /** A kernel block device, when attached through one (loop over nbdfuse, or /dev/nbdN). */
  device?: string;
  /** A note for the status (e.g. "served over NBD only: not root"). */
  note?: string;
}

export interface VolumePorts {
  probe(v: VolumeTarget): Promise<VolumeProbe>;
  createFile(v: VolumeTarget): Promise<void>;
  deleteFile(v: VolumeTarget): Promise<void>;
  format(v: VolumeTarget, key: Secret): Promise<void>;
  open(v: VolumeTarget, key: Secret): Promise<void>;
  openPlain(v: VolumeTarget, key: Secret): Promise<void>;
  close(v: VolumeTarget): Promise<void>;
  attach(v: VolumeTarget): Promise<AttachInfo>;
  detach(v: VolumeTarget): Promise<void>;
  mkfs(v: VolumeTarget): Promise<void>;
  mount(v: VolumeTarget): Promise<void>;
  unmount(v: VolumeTarget): Promise<void>;
}

/**
 * Single-writer leases of volumes on shared storage (coordination/etcd-leases.ts fits). The apply
 * loop takes a volume's lease before any step that writes its device (createFile, format,
 * deleteFile, open) and gives it back after closing it. Losing it is handled outside the loop
 * (the agent fences the volume: suspend, then close).
 */
export interface LeasePort {
  /** This node's name. */
  readonly node: string;
  /** Take the lease if free or ours; else who holds it. Throws when the service cannot be reached. */
  acquire(id: string): Promise<{ held: true } | { held: false; holder?: { node: string; since: string } }>;
  holds(id: string): boolean;
  release(id: string): Promise<void>;
}

/** The key service as the reconciler sees it (a KeyClient fits). */
export interface KeyPort {
  deriveKey(req: DeriveRequest): Promise<Secret>;
}

/**
 * Per-boot random keys of ephemeral volumes and swap. Held in memory (or on a tmpfs that does not
 * survive reboot); never on persistent storage. Keyed by (volume id, boot id).
 */
export interface EphemeralKeyStore {
  get(id: string, bootId: string): Secret | undefined;
  put(id: string, bootId: string, key: Secret): void;
  drop(id: string): void;
}

/** The default store: process memory only. Keys die with the process or the boot. */
export class MemoryKeyStore implements EphemeralKeyStore {
  readonly #keys = new Map<string, { bootId: string; key: Secret }>();

  get(id: string, bootId: string): Secret | undefined {
    const e = this.#keys.get(id);
    return e && e.bootId === bootId && !e.key.disposed ? e.key : undefined;
  }

  put(id: string, bootId: string, key: Secret): void {
    this.drop(id);
    this.#keys.set(id, { bootId, key });
  }

  drop(id: string): void {
    this.#keys.get(id)?.key.dispose();
    this.#keys.delete(id);
  }

  /** Wipe every key (agent shutdown). */
  clear(): void {
    for (const id of [...this.#keys.keys()]) this.drop(id);
  }
}
