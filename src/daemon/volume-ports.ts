/**
 * The reconciler's VolumePorts (src/reconciler/ports.ts) over the real data path: backing files
 * (reconciler/file-ops), LUKS2 format with the cheapest keyslot PBKDF (luks), unlock and crypt
 * mappings (activate/mapping), mapped devices served over NBD by an in-process DaemonCore, kernel
 * block devices (DaemonCore.attach: nbd-client, or nbdfuse + loop), mkfs/mkswap, mount/swapon.
 *
 * Two serving modes:
 * - `attach` (root, and attach possible): the export becomes /dev/nbdN or /dev/loopN; mkfs, mount
 *   and swapon work on that device.
 * - `nbd-only` (not root, or no way to attach): volumes are served over NBD only. mkfs still runs
 *   (mkfs.ext4/mkswap on a temporary sparse image under the runtime dir, copied into the mapping in
 *   process, then removed: the image holds fresh file-system metadata only, never data or keys);
 *   `mount` records the volume as served and reports the mode in the volume's note.
 *
 * Swap (ports.ts contract): swapon only through the kernel nbd client with its swap option; through
 * FUSE (nbdfuse + loop) it is refused with ESWAPUNSAFE unless `forceSwap`.
 *
 * Spawned tools (mkfs.*, mkswap, mount, umount, swapon, swapoff) get paths only in their argv; keys
 * are handed to the DaemonCore in memory. Nothing here blocks the event loop near a FUSE file or an
 * attached device: the NBD server that answers them runs in this process (see nbd/attach.ts).
 */
import { constants, existsSync, promises as fs, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { prepareLoadedLuks, prepareLuks, preparePlain } from '../activate/mapping.js';
import { openBlockDevice } from '../blockdev/open.js';
import type { BlockDevice } from '../blockdev/types.js';
import { openLuks } from '../luks/index.js';
import { Luks2Volume } from '../luks/luks2.js';
import { blankDeviceHeader, createDeviceVolume, probeDevice } from '../reconciler/device-ops.js';
import { createSparseFile, deleteBackingFile, probeBackingFile } from '../reconciler/file-ops.js';
import {
  type AttachInfo,
  type PoolPorts,
  type PoolProbe,
  type PoolTarget,
  VOLUME_KEYSLOT_PBKDF,
  type VolumePorts,
  type VolumeProbe,
  type VolumeTarget,
} from '../reconciler/ports.js';
import { poolOf } from '../dm/index.js';
import { CryptmapError, isCryptmapError } from '../util/errors.js';
import { logger } from '../util/log.js';
import { mounts, resolveTool, runTool as runUtilTool, unescapeMount } from '../util/tools.js';
import { ensureMountpoint } from '../util/trusted-path.js';
import type { Secret } from '../util/secret.js';
import type { DaemonCore } from './core.js';
import { fuseUnavailable } from './fuse-export.js';

const log = logger('volumes');

/** LUKS2 data offset of the volumes the agent formats (cryptsetup's default, 16 MiB). */
export const VOLUME_HEADER_BYTES = 16 << 20;
/** LUKS2 digest iterations: cryptsetup's floor (the passphrase is 256 uniform bits). */
const DIGEST_ITERATIONS = 1000;
const COPY_CHUNK_BYTES = 1 << 20;

export type ServeMode = 'attach' | 'nbd-only';

/** Spawns a tool with `args` (never a secret) and gives its stdout. */
export type Runner = (cmd: string, args: string[]) => Promise<string>;

export interface DataPathPortsOptions {
  core: DaemonCore;
  mode: ServeMode;
  /** Why volumes are served over NBD only (for the volume note). */
  nbdOnlyReason?: string;
  /** swapon through FUSE anyway (`--force-swap`). */
  forceSwap?: boolean;
  /** Temporary mkfs images (nbd-only mode); a 0700 directory, e.g. the agent's runtime dir. */
  workDir: string;
  /** Spawner (tests capture the argv). */
  run?: Runner;
}

/** The system-tool runner (util/tools.ts), as the ports' default Runner. */
export const runTool: Runner = (cmd, args) => runUtilTool(cmd, args);

/** Devices swapped on (/proc/swaps). */
function swaps(): string[] {
  try {
    return readFileSync('/proc/swaps', 'utf8')
      .split('\n')
      .slice(1)
      .filter(Boolean)
      .map((l) => unescapeMount(l.split(/\s+/)[0] ?? ''));
  } catch {
    return [];
  }
}

/** Whether this process can attach exports as kernel block devices, and why not. */
export function detectServeMode(): { mode: ServeMode; reason?: string } {
  if (process.getuid?.() !== 0) return { mode: 'nbd-only', reason: 'served over NBD only: not root' };
  if (existsSync('/sys/module/nbd')) {
    if (resolveTool('nbd-client') !== 'nbd-client') return { mode: 'attach' };
    return {
      mode: 'nbd-only',
      reason: 'served over NBD only: nbd-client is not installed (Debian package nbd-client)',
    };
  }
  // The built-in FUSE export needs no nbdfuse or fusermount3 (fuse-export.ts), only losetup.
  if (fuseUnavailable() === undefined && existsSync('/dev/loop-control') && resolveTool('losetup') !== 'losetup')
    return { mode: 'attach' };
  for (const p of ['/dev/fuse', '/dev/loop-control']) {
    if (!existsSync(p)) return { mode: 'nbd-only', reason: `served over NBD only: no nbd kernel module and no ${p}` };
  }
  for (const [tool, pkg] of [
    ['nbdfuse', 'libnbd-bin'],
    ['losetup', 'mount'],
    ['fusermount3', 'fuse3'],
  ]) {
    if (resolveTool(tool!) === tool)
      return { mode: 'nbd-only', reason: `served over NBD only: ${tool} is not installed (Debian package ${pkg})` };
  }
  return { mode: 'attach' };
}

/** Thin pool tables the agent makes: error_if_no_space (a full pool fails writes at once, ENOSPC, not after 60 s). */
const POOL_FEATURES = '1 error_if_no_space';

async function exists(path: string): Promise<boolean> {
  try {
    await fs.stat(path);
    return true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw e;
  }
}

export class DataPathPorts implements VolumePorts, PoolPorts {
  readonly core: DaemonCore;
  readonly mode: ServeMode;
  readonly #opts: DataPathPortsOptions;
  readonly #run: Runner;
  /** nbd-only: volumes whose export was handed out (attach) and "mounted" (served). */
  readonly #served = new Set<string>();
  /** Mappings attached through the kernel client with its swap option (swapon is safe there). */
  readonly #swapSafe = new Set<string>();
  readonly #pseudoMounted = new Set<string>();
  /** Close even while NBD clients are connected (agent shutdown). */
  forceClose = false;

  constructor(opts: DataPathPortsOptions) {
    this.core = opts.core;
    this.mode = opts.mode;
    this.#opts = opts;
    this.#run = opts.run ?? runTool;
  }

  #device(v: VolumeTarget): string | undefined {
    return this.core.statusOf(v.mapping).attachedDevice;
  }

  #mountpoint(v: VolumeTarget): string | undefined {
    return v.mountpoint === undefined ? undefined : resolve(v.mountpoint);
  }

  #isMounted(v: VolumeTarget): boolean {
    if (this.mode === 'nbd-only') return this.#pseudoMounted.has(v.mapping);
    const dev = this.#device(v);
    if (!dev) return false;
    if (v.kind === 'swap') return swaps().includes(dev);
    return this.#mountedAt(dev).length > 0;
  }

  /** Where the attached device (ours alone) is mounted, wherever the record thinks it is. */
  #mountedAt(dev: string): string[] {
    return mounts()
      .filter(([src]) => src === dev)
      .map(([, at]) => at);
  }

  async probe(v: VolumeTarget): Promise<VolumeProbe> {
    const open = this.core.registry.find(v.mapping) !== undefined;
    if (v.device !== undefined) return this.#probeDevice(v, open);
    if (v.pool !== undefined) return this.#probeThin(v, open);
    const f = await probeBackingFile(v.path);
    const attached = open && (this.mode === 'nbd-only' ? this.#served.has(v.mapping) : this.#device(v) !== undefined);
    const p: VolumeProbe = { fileExists: f.exists, open, attached, mounted: attached && this.#isMounted(v) };
    if (f.exists) {
      p.fileBytes = f.bytes ?? 0;
      p.isLuks = f.isLuks ?? false;
      if (p.isLuks && !open && v.kind === 'scratch') {
        const damage = await luksDamage(v.path, p.fileBytes);
        if (damage) p.damage = damage;
      }
    }
    return p;
  }

  /** A volume on an NBD export: "exists" when the export is not blank; an open one is not probed again. */
  async #probeDevice(v: VolumeTarget, open: boolean): Promise<VolumeProbe> {
    const attached = open && (this.mode === 'nbd-only' ? this.#served.has(v.mapping) : this.#device(v) !== undefined);
    const p: VolumeProbe = { fileExists: true, open, attached, mounted: attached && this.#isMounted(v) };
    if (open) return { ...p, isLuks: true };
    const d = await probeDevice(v.device!);
    if (!d.reachable) return { ...p, damage: `unreachable (${d.unreachable})` };
    p.fileBytes = d.bytes ?? 0;
    if (d.blank) return { ...p, fileExists: false };
    p.isLuks = d.isLuks ?? false;
    if (p.isLuks) {
      const damage = await luksDamage(v.path, p.fileBytes);
      if (damage) p.damage = damage;
    }
    return p;
  }

  // ------------------------------------------------------------------ volumes in a thin pool

  /** The open pool of `v`, or a clear error. */
  #poolOf(name: string, mapping: string) {
    const dev = this.core.registry.find(mapping);
    const pool = dev === undefined ? undefined : poolOf(dev);
    if (pool === undefined)
      throw new CryptmapError('EPOOL', `thin pool ${name} is not open`, { errno: 'ENOENT', exitCode: 4 });
    return pool;
  }

  #thinId(v: VolumeTarget): number {
    if (v.thinId === undefined) throw new CryptmapError('EINTERNAL', `${v.id} has no thin device id`);
    return v.thinId;
  }

  async #probeThin(v: VolumeTarget, open: boolean): Promise<VolumeProbe> {
    const pr = v.pool!;
    const poolDev = this.core.registry.find(pr.mapping);
    const pool = poolDev === undefined ? undefined : poolOf(poolDev);
    const attached = open && (this.mode === 'nbd-only' ? this.#served.has(v.mapping) : this.#device(v) !== undefined);
    const p: VolumeProbe = { fileExists: false, open, attached, mounted: attached && this.#isMounted(v) };
    // A closed pool cannot tell: the volume is taken to exist (nothing is made or deleted over it).
    if (pool === undefined) return { ...p, fileExists: true, damage: `its thin pool ${pr.name} is not open` };
    if (v.thinId === undefined || !pool.md.devices.has(v.thinId)) return p;
    p.fileExists = true;
    const thin = this.core.registry.find(pr.thinMapping);
    if (thin?.liveTable) p.fileBytes = thin.liveTable.sizeBytes;
    else if (v.thinBytes !== undefined) p.fileBytes = v.thinBytes;
    else if (v.sizeBytes > 0) p.fileBytes = v.sizeBytes + VOLUME_HEADER_BYTES;
    const head = Buffer.alloc(6);
    await pool.read(v.thinId, 0, head);
    p.isLuks = head.equals(Buffer.from([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]));
    return p;
  }

  /** Activate the thin device of `v` (`thin:<service>:<volume>`, not exported) if it is not. */
  async #ensureThin(v: VolumeTarget): Promise<void> {
    const pr = v.pool!;
    if (this.core.registry.find(pr.thinMapping)) return;
    this.#poolOf(pr.name, pr.mapping);
    // The size it was made with (the record's), not a later manifest size: no resize, as for files.
    const sectors = (v.thinBytes ?? v.sizeBytes + VOLUME_HEADER_BYTES) / 512;
    await this.core.registry.create(pr.thinMapping, {
      table: `0 ${sectors} thin /dev/mapper/${pr.mapping} ${this.#thinId(v)}`,
    });
  }

  async #removeThin(v: VolumeTarget): Promise<void> {
    if (this.core.registry.find(v.pool!.thinMapping)) await this.core.registry.remove(v.pool!.thinMapping);
  }

  /** A pool's errors name the pool (e.g. `thin pool main: the thin pool is out of data space`). */
  async #inPool<T>(name: string, fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (e) {
      if (isCryptmapError(e) && !e.message.startsWith('thin pool '))
        throw new CryptmapError(e.code, `thin pool ${name}: ${e.message}`, {
          exitCode: e.exitCode,
          ...(e.errno !== undefined ? { errno: e.errno } : {}),
          cause: e,
        });
      throw e;
    }
  }

  async probePool(p: PoolTarget): Promise<PoolProbe> {
    const [m, d] = [await exists(p.metadataPath), await exists(p.dataPath)];
    return { exists: m && d, partial: m !== d, open: this.core.registry.find(p.mapping) !== undefined };
  }

  async createPool(p: PoolTarget): Promise<void> {
    if (!p.ownFiles) throw new CryptmapError('EINTERNAL', `pool ${p.name} is on named devices: never created`);
    // Data first: a metadata file exists only beside its data file (blank: formatted at open).
    if (!(await exists(p.dataPath))) await createSparseFile(p.dataPath, p.dataBytes);
    if (!(await exists(p.metadataPath))) await createSparseFile(p.metadataPath, p.metadataBytes);
  }

  async openPool(p: PoolTarget): Promise<void> {
    if (this.core.registry.find(p.mapping)) return;
    let dataBytes = p.dataBytes;
    if (!p.ownFiles) {
      const d = await openBlockDevice(p.dataPath, { readOnly: true });
      dataBytes = d.sizeBytes;
      await d.close();
    }
    const blocks = Math.floor(dataBytes / p.blockBytes);
    if (blocks === 0)
      throw new CryptmapError('EDEVSIZE', `thin pool ${p.name}: ${p.dataPath} is smaller than one block`, {
        exitCode: 1,
      });
    const blockSectors = p.blockBytes / 512;
    const lowWater = Math.floor(blocks / 10);
    await this.#inPool(p.name, () =>
      this.core.registry.create(p.mapping, {
        table: `0 ${blocks * blockSectors} thin-pool ${p.metadataPath} ${p.dataPath} ${blockSectors} ${lowWater} ${POOL_FEATURES}`,
      }),
    );
  }

  async closePool(p: PoolTarget): Promise<void> {
    if (!this.core.registry.find(p.mapping)) return;
    await this.#inPool(p.name, () => this.core.registry.remove(p.mapping));
  }

  async poolDeviceIds(p: PoolTarget): Promise<number[]> {
    return [...this.#poolOf(p.name, p.mapping).md.devices.keys()];
  }

  async snapshot(v: VolumeTarget, newId: number): Promise<void> {
    const pr = v.pool!;
    const origin = this.#thinId(v);
    this.#poolOf(pr.name, pr.mapping);
    if (!this.core.registry.find(pr.thinMapping))
      throw new CryptmapError('ENODEV', `${v.id} is not open: its thin device is not active`, { errno: 'ENOENT' });
    // The kernel requires the origin suspended: its I/O in flight drains, the pool commits, new I/O waits.
    await this.core.registry.suspend(pr.thinMapping);
    try {
      await this.#inPool(pr.name, () =>
        this.core.registry.message(pr.mapping, 0, ['create_snap', String(newId), String(origin)]),
      );
    } finally {
      await this.core.registry.resume(pr.thinMapping);
    }
  }

  async deleteThin(p: PoolTarget, id: number): Promise<void> {
    const pool = this.#poolOf(p.name, p.mapping);
    if (!pool.md.devices.has(id)) return;
    await this.#inPool(p.name, () => this.core.registry.message(p.mapping, 0, ['delete', String(id)]));
  }

  async createFile(v: VolumeTarget): Promise<void> {
    if (v.pool !== undefined) {
      await this.#inPool(v.pool.name, async () => {
        this.#poolOf(v.pool!.name, v.pool!.mapping);
        await this.core.registry.message(v.pool!.mapping, 0, ['create_thin', String(this.#thinId(v))]);
      });
      await this.#ensureThin(v);
      return;
    }
    if (v.device !== undefined) return createDeviceVolume(v.device, VOLUME_HEADER_BYTES + (1 << 20));
    await createSparseFile(v.path, v.sizeBytes + (v.kind === 'scratch' ? VOLUME_HEADER_BYTES : 0));
  }

  async deleteFile(v: VolumeTarget): Promise<void> {
    if (this.core.registry.find(v.mapping))
      throw new CryptmapError('EBUSY', `${v.id} is still open; close it first`, { errno: 'EBUSY' });
    // An export is never deleted; the planner deletes only a volume whose creation this agent began.
    if (v.device !== undefined) return blankDeviceHeader(v.device, VOLUME_HEADER_BYTES);
    if (v.pool !== undefined) {
      await this.#removeThin(v);
      if (v.thinId === undefined) return;
      const pool = this.#poolOf(v.pool.name, v.pool.mapping);
      if (pool.md.devices.has(v.thinId))
        await this.#inPool(v.pool.name, () =>
          this.core.registry.message(v.pool!.mapping, 0, ['delete', String(v.thinId)]),
        );
      return;
    }
    await deleteBackingFile(v.path);
  }

  async format(v: VolumeTarget, key: Secret): Promise<void> {
    const run = async (dev: BlockDevice): Promise<void> => {
      try {
        const vol = await Luks2Volume.format(dev, key.expose(), {
          cipher: v.cipher,
          keyBytes: v.keySizeBits / 8,
          sectorBytes: v.sectorSize as 512 | 1024 | 2048 | 4096,
          offsetBytes: VOLUME_HEADER_BYTES,
          subsystem: 'cryptmap',
          keyslot: { kdf: { ...VOLUME_KEYSLOT_PBKDF } },
          digestIterations: DIGEST_ITERATIONS,
        });
        await vol.close();
        await dev.flush();
      } finally {
        await dev.close();
      }
    };
    if (v.pool === undefined) return run(await openBlockDevice(v.path, { readOnly: false }));
    await this.#ensureThin(v);
    await this.#inPool(v.pool.name, () => run(this.core.registry.open(v.pool!.thinMapping)));
  }

  /** prepareLuks over the volume's thin device (a mapped device: read through the registry). */
  async #prepareThin(v: VolumeTarget, passphrase: Buffer): ReturnType<typeof prepareLuks> {
    await this.#ensureThin(v);
    const dev = this.core.registry.open(v.pool!.thinMapping);
    try {
      const vol = await openLuks(dev);
      try {
        return await prepareLoadedLuks(vol, dev, { name: v.mapping, device: v.path, passphrase });
      } finally {
        await vol.close();
      }
    } finally {
      await dev.close();
    }
  }

  async open(v: VolumeTarget, key: Secret): Promise<void> {
    if (this.core.registry.find(v.mapping)) return;
    let prepared: Awaited<ReturnType<typeof prepareLuks>>;
    try {
      prepared =
        v.pool !== undefined
          ? await this.#prepareThin(v, key.expose())
          : await prepareLuks({ name: v.mapping, device: v.path, passphrase: key.expose() });
    } catch (e) {
      if (isCryptmapError(e, 'ENOKEY'))
        throw new CryptmapError('EUNLOCK', `${v.path}: no keyslot unlocks with this volume's key`, {
          exitCode: 2,
          errno: 'EPERM',
        });
      throw e;
    }
    try {
      await this.core.openVolume(prepared.mapping, prepared.volumeKey);
    } finally {
      prepared.volumeKey.dispose();
    }
  }

  async openPlain(v: VolumeTarget, key: Secret): Promise<void> {
    if (this.core.registry.find(v.mapping)) return;
    const m = await preparePlain({
      name: v.mapping,
      device: v.path,
      key,
      cipher: v.cipher,
      sectorBytes: v.sectorSize as 512 | 1024 | 2048 | 4096,
    });
    await this.core.openVolume(m, key);
  }

  async close(v: VolumeTarget): Promise<void> {
    if (this.core.registry.find(v.mapping)) {
      this.#served.delete(v.mapping);
      await this.core.closeVolume(v.mapping, { force: this.forceClose });
    }
    if (v.pool !== undefined) await this.#removeThin(v);
  }

  /**
   * Single-writer fencing (the volume's lease is lost): suspend the mapping (new I/O waits, in-flight
   * I/O drains and is flushed, the key is wiped), then close it (waiting I/O fails). A volume still
   * attached to a kernel device stays suspended with its key wiped until it is detached: either way
   * nothing more reaches the shared device. The fence has a deadline, half of `msLeft` (the time
   * before the lease can expire and another node take over): a volume on shared storage whose
   * suspend has not finished by then (the export unreachable, requests waiting for a reconnect) has
   * its NBD client cut off (NbdDevice.fence): its I/O fails with EIO at once, nothing is re-sent
   * later, and the suspend and close finish.
   */
  async fence(v: VolumeTarget, why: string, msLeft?: number): Promise<void> {
    if (!this.core.registry.find(v.mapping)) return;
    log.error('fencing: stopping I/O to the volume', { volume: v.id, why });
    let cut: NodeJS.Timeout | undefined;
    const cutOff = () => {
      if (v.device !== undefined && this.core.registry.fenceRemote(v.device, why))
        log.error('fencing: storage cut off (I/O to it fails with EIO)', { volume: v.id });
    };
    if (v.device !== undefined) {
      if (msLeft === undefined || msLeft <= 0) cutOff();
      else cut = setTimeout(cutOff, msLeft / 2);
    }
    try {
      await this.core.suspendVolume(v.mapping);
    } catch (e) {
      log.warn('fencing: suspend failed', { volume: v.id, error: e instanceof Error ? e.message : String(e) });
    }
    clearTimeout(cut);
    this.#served.delete(v.mapping);
    this.#pseudoMounted.delete(v.mapping);
    try {
      await this.core.closeVolume(v.mapping, { force: true });
      log.info('fenced: volume closed', { volume: v.id });
    } catch (e) {
      // Still open (attached): never let it reach the export again.
      cutOff();
      log.warn('fenced: volume stays suspended', { volume: v.id, error: e instanceof Error ? e.message : String(e) });
    }
  }

  async attach(v: VolumeTarget): Promise<AttachInfo> {
    const st = this.core.statusOf(v.mapping);
    if (!st.active) throw new CryptmapError('ENODEV', `${v.id} is not open`, { errno: 'ENOENT' });
    if (this.mode === 'nbd-only') {
      this.#served.add(v.mapping);
      const info: AttachInfo = { nbdUri: st.nbdUri };
      if (this.#opts.nbdOnlyReason) info.note = this.#opts.nbdOnlyReason;
      return info;
    }
    const a = await this.core.attach(v.mapping, { swap: v.kind === 'swap' });
    if (a.swap) this.#swapSafe.add(v.mapping);
    return { nbdUri: st.nbdUri, device: a.devicePath };
  }

  async detach(v: VolumeTarget): Promise<void> {
    this.#served.delete(v.mapping);
    this.#pseudoMounted.delete(v.mapping);
    this.#swapSafe.delete(v.mapping);
    if (this.mode === 'nbd-only' || this.#device(v) === undefined) return;
    await this.core.detach(v.mapping);
  }

  async mkfs(v: VolumeTarget): Promise<void> {
    if (v.filesystem === 'none') return;
    if (v.pool !== undefined) return this.#inPool(v.pool.name, () => this.#mkfs(v));
    return this.#mkfs(v);
  }

  async #mkfs(v: VolumeTarget): Promise<void> {
    const tool = v.filesystem === 'swap' ? 'mkswap' : `mkfs.${v.filesystem}`;
    // 4 KiB blocks: never smaller than the mapping's logical block size (mkfs on an image cannot see it).
    const toolArgs = (target: string) =>
      v.filesystem === 'swap'
        ? ['-L', v.volume, target]
        : ['-q', '-F', '-b', '4096', '-E', 'nodiscard', '-L', v.volume.slice(0, 16), target];
    if (this.mode === 'attach') {
      const dev = this.#device(v);
      if (!dev) throw new CryptmapError('ENOTATTACHED', `${v.id} is not attached`);
      await this.#run(tool, toolArgs(dev));
      return;
    }
    // nbd-only: make the file system in a plaintext scratch image, then copy it through the mapping.
    const st = this.core.statusOf(v.mapping);
    if (!st.mapping) throw new CryptmapError('ENODEV', `${v.id} is not open`, { errno: 'ENOENT' });
    const bytes = st.mapping.sizeSectors * 512;
    await fs.mkdir(this.#opts.workDir, { recursive: true, mode: 0o700 });
    const img = join(this.#opts.workDir, `mkfs-${v.mapping.replace(/[^A-Za-z0-9_.-]/g, '_')}.img`);
    await fs.rm(img, { force: true });
    const fh0 = await fs.open(img, constants.O_RDWR | constants.O_CREAT | constants.O_EXCL, 0o600);
    try {
      await fh0.truncate(bytes);
    } finally {
      await fh0.close();
    }
    try {
      await this.#run(tool, toolArgs(img));
      await this.#copyInto(v.mapping, img, bytes);
    } finally {
      await fs.rm(img, { force: true });
    }
  }

  /** Copy the whole image (zeros too: the fresh mapping reads as noise) into the mapped device. */
  async #copyInto(name: string, img: string, bytes: number): Promise<void> {
    const dev = this.core.registry.open(name);
    const fh = await fs.open(img, 'r');
    const buf = Buffer.alloc(COPY_CHUNK_BYTES);
    try {
      for (let off = 0; off < bytes; off += COPY_CHUNK_BYTES) {
        const n = Math.min(COPY_CHUNK_BYTES, bytes - off);
        const chunk = buf.subarray(0, n);
        const { bytesRead } = await fh.read(chunk, 0, n, off);
        if (bytesRead < n) chunk.fill(0, bytesRead);
        await dev.write(off, chunk);
      }
      await dev.flush();
    } finally {
      await fh.close();
      await dev.close();
    }
  }

  async mount(v: VolumeTarget): Promise<void> {
    if (this.mode === 'nbd-only') {
      this.#pseudoMounted.add(v.mapping);
      return;
    }
    if (this.#isMounted(v)) return;
    const dev = this.#device(v);
    if (!dev) throw new CryptmapError('ENOTATTACHED', `${v.id} is not attached`);
    if (v.kind === 'swap') {
      if (!this.#opts.forceSwap && !this.#swapSafe.has(v.mapping)) {
        // Safe only through the kernel client attached with nbd-client -swap (memory-pressure-safe
        // socket, locked client memory); a loop device over nbdfuse (FUSE) never is.
        const how = dev.startsWith('/dev/nbd')
          ? `${dev} was attached by nbd-client without its -swap option`
          : `${dev} is a loop device over nbdfuse (FUSE)`;
        throw new CryptmapError(
          'ESWAPUNSAFE',
          `swapon refused for ${v.id}: ${how}. Paging out would need this userspace NBD server (and nbdfuse) to run, and they may need memory to do so: under memory pressure that deadlocks. Swap is safe only through the kernel nbd client with its swap option (modprobe nbd); --force-swap overrides.`,
          { errno: 'EPERM' },
        );
      }
      await this.#run('swapon', [dev]);
      return;
    }
    const mp = this.#mountpoint(v);
    if (mp === undefined) return;
    // Component by component, no symlinks, root-owned all the way, never /etc and friends (issue 11 item 4).
    const at = ensureMountpoint(mp);
    await this.#run('mount', ['-t', v.filesystem, dev, at]);
  }

  async unmount(v: VolumeTarget): Promise<void> {
    if (this.mode === 'nbd-only') {
      this.#pseudoMounted.delete(v.mapping);
      return;
    }
    if (!this.#isMounted(v)) return;
    const dev = this.#device(v);
    if (v.kind === 'swap') {
      if (dev) await this.#run('swapoff', [dev]);
      return;
    }
    if (!dev) return;
    for (const mp of this.#mountedAt(dev).reverse()) {
      for (let i = 0; ; i++) {
        try {
          await this.#run('umount', [mp]);
          break;
        } catch (e) {
          if (!this.#mountedAt(dev).includes(mp)) break;
          if (i >= 20) throw e;
          await new Promise((r) => setTimeout(r, 100)); // a process leaving the mountpoint
        }
      }
    }
  }

  /** Last resort at shutdown: lazily unmount and swap off whatever is still on our devices. */
  async releaseAll(): Promise<void> {
    if (this.mode === 'nbd-only') return;
    for (const st of this.core.volumes()) {
      const dev = st.attachedDevice;
      if (!dev) continue;
      if (swaps().includes(dev)) await this.#run('swapoff', [dev]).catch(() => {});
      for (const mp of this.#mountedAt(dev).reverse()) {
        log.warn('lazy unmount at shutdown', { device: dev, mountpoint: mp });
        await this.#run('umount', ['-l', mp]).catch(() => {});
      }
    }
  }

  /** Volumes this port set up (for the agent's summary). */
  describe(v: VolumeTarget): { nbdUri: string; device?: string; mountpoint?: string; mode: ServeMode } {
    const st = this.core.statusOf(v.mapping);
    const out: { nbdUri: string; device?: string; mountpoint?: string; mode: ServeMode } = {
      nbdUri: st.nbdUri,
      mode: this.mode,
    };
    if (st.attachedDevice) out.device = st.attachedDevice;
    if (st.attachedDevice && this.mode === 'attach' && v.kind === 'scratch') {
      const at = this.#mountedAt(st.attachedDevice)[0];
      if (at !== undefined) out.mountpoint = at;
    }
    return out;
  }
}

/** Why a LUKS file cannot be trusted (header unreadable, data segment past the end), if so. */
async function luksDamage(path: string, fileBytes: number): Promise<string | undefined> {
  let dev: BlockDevice;
  try {
    dev = await openBlockDevice(path, { readOnly: true });
  } catch (e) {
    return `cannot open: ${e instanceof Error ? e.message : String(e)}`;
  }
  try {
    const vol = await openLuks(dev);
    try {
      const seg = vol.dataSegment;
      const end = seg.sizeBytes === 'dynamic' ? seg.offsetBytes + seg.sectorBytes : seg.offsetBytes + seg.sizeBytes;
      if (fileBytes < end) return `truncated: ${fileBytes} bytes, the LUKS data segment needs ${end}`;
      return undefined;
    } finally {
      await vol.close();
    }
  } catch (e) {
    log.warn('LUKS header unreadable', { path, error: e instanceof Error ? e.message : String(e) });
    return `LUKS header unreadable: ${e instanceof Error ? e.message : String(e)}`;
  } finally {
    await dev.close();
  }
}
