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
import { prepareLuks, preparePlain } from '../activate/mapping.js';
import { openBlockDevice } from '../blockdev/open.js';
import type { BlockDevice } from '../blockdev/types.js';
import { openLuks } from '../luks/index.js';
import { Luks2Volume } from '../luks/luks2.js';
import { blankDeviceHeader, createDeviceVolume, probeDevice } from '../reconciler/device-ops.js';
import { createSparseFile, deleteBackingFile, probeBackingFile } from '../reconciler/file-ops.js';
import {
  type AttachInfo,
  VOLUME_KEYSLOT_PBKDF,
  type VolumePorts,
  type VolumeProbe,
  type VolumeTarget,
} from '../reconciler/ports.js';
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

export class DataPathPorts implements VolumePorts {
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

  async createFile(v: VolumeTarget): Promise<void> {
    if (v.device !== undefined) return createDeviceVolume(v.device, VOLUME_HEADER_BYTES + (1 << 20));
    await createSparseFile(v.path, v.sizeBytes + (v.kind === 'scratch' ? VOLUME_HEADER_BYTES : 0));
  }

  async deleteFile(v: VolumeTarget): Promise<void> {
    if (this.core.registry.find(v.mapping))
      throw new CryptmapError('EBUSY', `${v.id} is still open; close it first`, { errno: 'EBUSY' });
    // An export is never deleted; the planner deletes only a volume whose creation this agent began.
    if (v.device !== undefined) return blankDeviceHeader(v.device, VOLUME_HEADER_BYTES);
    await deleteBackingFile(v.path);
  }

  async format(v: VolumeTarget, key: Secret): Promise<void> {
    const dev = await openBlockDevice(v.path, { readOnly: false });
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
  }

  async open(v: VolumeTarget, key: Secret): Promise<void> {
    if (this.core.registry.find(v.mapping)) return;
    let prepared: Awaited<ReturnType<typeof prepareLuks>>;
    try {
      prepared = await prepareLuks({ name: v.mapping, device: v.path, passphrase: key.expose() });
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
    if (!this.core.registry.find(v.mapping)) return;
    this.#served.delete(v.mapping);
    await this.core.closeVolume(v.mapping, { force: this.forceClose });
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
