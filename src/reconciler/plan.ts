/**
 * Planning: a pure function from (desired volumes, observed state, boot id) to an ordered list of
 * steps. Each step is idempotent; after a crash at any point, planning again from what is then
 * observed gives the steps still missing (test/reconciler/apply.test.ts proves it step by step).
 *
 * Rules:
 * - Volumes no longer in the manifest are torn down first (unmount, detach, close); ephemeral and
 *   swap files are deleted, persistent ones kept (record `retired`; `cryptmap volume delete` removes them).
 * - Ephemeral volumes and swap are made afresh (teardown, delete, create...) after a new boot id, or
 *   when their per-boot key is no longer in memory; otherwise they are reopened where they stopped.
 * - Persistent volumes are reopened, never reformatted: a file that exists but is not LUKS, is
 *   damaged or truncated, went missing after it was made, or does not unlock gives a `refuse` step
 *   with a reason. An ephemeral volume altered within its boot is refused too (remade next boot).
 *   A file this agent was still creating (record `creating`) holds no data: it is deleted and remade.
 * - mkfs runs only on a file this agent made and formatted itself, and only once.
 * - A file at a volume's path that no record explains is refused, never deleted.
 * - Thin pools (`planPools`) come before every volume step: made when their files are missing (never
 *   for named devices: refused), opened when closed; pools no longer asked for are closed after the
 *   volumes (`planPoolTeardown`), their files never deleted. A volume in a pool is planned as a
 *   volume on a file, its thin device standing for the file.
 */
import { join } from 'node:path';
import type { Manifest } from './manifest.js';
import type { PoolProbe, PoolTarget, VolumeProbe, VolumeTarget } from './ports.js';
import type { StepKind, VolumeRecord } from './state.js';

export interface Step {
  kind: StepKind;
  /** VolumeTarget.id (or a record id, for removed volumes). */
  id: string;
  /** Why (refuse), or what triggered a rebuild. */
  reason?: string;
}

export interface ObservedVolume {
  record?: VolumeRecord;
  probe: VolumeProbe;
  /** The per-boot key of an ephemeral volume or swap is in memory for this boot. */
  keyAvailable: boolean;
  /** Opening failed in this run with a key that does not unlock it (reason). */
  unlockFailed?: string;
}

/** The volumes a manifest asks for, in manifest order (services, then swap). */
export function desiredVolumes(m: Manifest, volumeDir: string): VolumeTarget[] {
  const out: VolumeTarget[] = [];
  for (const s of m.services) {
    for (const v of s.volumes) {
      const t: VolumeTarget = {
        id: `scratch/${s.name}/${v.name}`,
        kind: 'scratch',
        service: s.name,
        volume: v.name,
        class: v.class,
        path: v.device ?? join(volumeDir, 'scratch', s.name, `${v.name}.img`),
        sizeBytes: v.sizeBytes,
        filesystem: v.filesystem,
        cipher: v.cipher,
        keySizeBits: v.keySizeBits,
        sectorSize: v.sectorSize,
        mapping: `scratch:${s.name}:${v.name}`,
      };
      if (v.mountpoint !== undefined) t.mountpoint = v.mountpoint;
      if (v.device !== undefined) t.device = v.device;
      if (v.pool !== undefined) {
        const thinMapping = `thin:${s.name}:${v.name}`;
        t.pool = { name: v.pool, mapping: poolMapping(v.pool), thinMapping };
        t.path = `/dev/mapper/${thinMapping}`;
      }
      out.push(t);
    }
  }
  for (const w of m.swap) {
    out.push({
      id: `swap/${w.name}`,
      kind: 'swap',
      service: 'swap',
      volume: w.name,
      class: 'ephemeral',
      path: join(volumeDir, 'swap', `${w.name}.img`),
      sizeBytes: w.sizeBytes,
      filesystem: 'swap',
      cipher: w.cipher,
      keySizeBits: w.keySizeBits,
      sectorSize: w.sectorSize,
      mapping: `swap:${w.name}`,
    });
  }
  return out;
}

/** The mapped device of pool `name`. */
export function poolMapping(name: string): string {
  return `pool:${name}`;
}

/** The pools a manifest asks for: files `VOLUME_DIR/pools/<name>/{metadata,data}`, or the named devices. */
export function desiredPools(m: Manifest, volumeDir: string): PoolTarget[] {
  return m.pools.map((p) => ({
    id: `pool/${p.name}`,
    name: p.name,
    mapping: poolMapping(p.name),
    metadataPath: p.metadataDevice ?? join(volumeDir, 'pools', p.name, 'metadata'),
    dataPath: p.dataDevice ?? join(volumeDir, 'pools', p.name, 'data'),
    ownFiles: p.dataDevice === undefined,
    dataBytes: p.sizeBytes,
    metadataBytes: p.metadataBytes,
    blockBytes: p.blockBytes,
  }));
}

/** Steps that make every desired pool exist and be open, in manifest order. */
export function planPools(desired: PoolTarget[], observed: ReadonlyMap<string, PoolProbe>): Step[] {
  const steps: Step[] = [];
  for (const p of desired) {
    const o = observed.get(p.id) ?? { exists: false, partial: false, open: false };
    if (o.open) continue;
    if (!o.exists) {
      if (!p.ownFiles) {
        steps.push({
          kind: 'refuse',
          id: p.id,
          reason: `${o.partial ? 'a device of the pool is missing' : 'the pool devices are missing'} (${p.metadataPath}, ${p.dataPath}); named devices are never created`,
        });
        continue;
      }
      steps.push({ kind: 'createPool', id: p.id, ...(o.partial ? { reason: 'creation was interrupted' } : {}) });
    }
    steps.push({ kind: 'openPool', id: p.id });
  }
  return steps;
}

/** Close the open pools no longer asked for (after the volumes' teardown; files kept). */
export function planPoolTeardown(desired: PoolTarget[], openPools: readonly string[]): Step[] {
  const wanted = new Set(desired.map((p) => p.id));
  return openPools.filter((id) => !wanted.has(id)).map((id) => ({ kind: 'closePool', id }));
}

/** Unmount, detach, close: whatever of it is currently up. */
function volatileTeardown(id: string, p: VolumeProbe, steps: Step[]): void {
  if (p.mounted) steps.push({ kind: 'unmount', id });
  if (p.attached) steps.push({ kind: 'detach', id });
  if (p.open) steps.push({ kind: 'close', id });
}

/** Everything from an empty path to a mounted volume. */
function build(v: VolumeTarget, steps: Step[], reason?: string): void {
  steps.push({ kind: 'createFile', id: v.id, ...(reason ? { reason } : {}) });
  if (v.kind === 'scratch') steps.push({ kind: 'format', id: v.id });
  steps.push({ kind: 'open', id: v.id }, { kind: 'attach', id: v.id });
  if (v.filesystem !== 'none') steps.push({ kind: 'mkfs', id: v.id });
  if (wantsMount(v)) steps.push({ kind: 'mount', id: v.id });
}

/** From an existing, usable file: whatever is not up yet. */
function bringUp(v: VolumeTarget, o: ObservedVolume, steps: Step[]): void {
  const p = o.probe;
  const r = o.record;
  // mkfs only on a file this agent made, once, and never under a mounted file system.
  const mayMkfs = v.filesystem !== 'none' && r !== undefined && r.created && !r.mkfsDone && !p.mounted;
  if (!p.open) steps.push({ kind: 'open', id: v.id });
  if (!p.attached) steps.push({ kind: 'attach', id: v.id });
  if (mayMkfs) steps.push({ kind: 'mkfs', id: v.id });
  if (wantsMount(v) && !p.mounted) steps.push({ kind: 'mount', id: v.id });
}

function wantsMount(v: VolumeTarget): boolean {
  return v.kind === 'swap' || v.mountpoint !== undefined;
}

function rebuild(v: VolumeTarget, o: ObservedVolume, steps: Step[], reason: string): void {
  volatileTeardown(v.id, o.probe, steps);
  if (o.probe.fileExists) steps.push({ kind: 'deleteFile', id: v.id, reason });
  build(v, steps, reason);
}

/** The file is smaller than when it was made or adopted. */
function truncation(r: VolumeRecord | undefined, p: VolumeProbe): string | undefined {
  if (r?.fileBytes === undefined || p.fileBytes === undefined || p.fileBytes >= r.fileBytes) return undefined;
  return `file is truncated (${p.fileBytes} bytes, was ${r.fileBytes})`;
}

/**
 * The checks ephemeral volumes and swap open with. Returns the record when planning goes on with it;
 * undefined when these checks settled the volume (their steps are pushed). A formatted persistent
 * volume is refused here, before anything could delete, reformat or open it as volatile.
 */
function volatilePrelude(v: VolumeTarget, o: ObservedVolume, bootId: string, steps: Step[]): VolumeRecord | undefined {
  const p = o.probe;
  const r = o.record;
  if (!p.fileExists) {
    if (p.open || p.attached || p.mounted) volatileTeardown(v.id, p, steps);
    build(v, steps);
    return undefined;
  }
  if (!r) {
    steps.push({
      kind: 'refuse',
      id: v.id,
      reason: `${v.path} exists but this agent did not make it; move it away (it is never deleted automatically)`,
    });
    return undefined;
  }
  if (r.class === 'persistent' && r.formatted) {
    steps.push({
      kind: 'refuse',
      id: v.id,
      reason:
        'this volume was persistent; making it ephemeral would destroy its data. Delete it explicitly (cryptmap volume delete) first',
    });
    return undefined;
  }
  if (r.bootId !== bootId) {
    rebuild(v, o, steps, 'new boot');
    return undefined;
  }
  if (!o.keyAvailable) {
    rebuild(v, o, steps, 'per-boot key no longer in memory');
    return undefined;
  }
  return r;
}

function planEphemeral(v: VolumeTarget, o: ObservedVolume, bootId: string, steps: Step[]): void {
  const r = volatilePrelude(v, o, bootId, steps);
  if (r === undefined) return;
  const p = o.probe;
  if (r.phase === 'creating' || !r.formatted) {
    rebuild(v, o, steps, 'creation was interrupted');
    return;
  }
  const damage = p.damage ?? truncation(r, p) ?? (p.isLuks === false ? 'not a LUKS volume any more' : undefined);
  if (damage !== undefined) {
    steps.push({
      kind: 'refuse',
      id: v.id,
      reason: `${v.path}: ${damage} (altered by someone else?); it will be remade after the next boot`,
    });
    return;
  }
  bringUp(v, o, steps);
}

function planSwap(v: VolumeTarget, o: ObservedVolume, bootId: string, steps: Step[]): void {
  const r = volatilePrelude(v, o, bootId, steps);
  if (r === undefined) return;
  if (r.phase === 'creating') {
    rebuild(v, o, steps, 'creation was interrupted');
    return;
  }
  bringUp(v, o, steps);
}

function planPersistent(v: VolumeTarget, o: ObservedVolume, steps: Step[]): void {
  const p = o.probe;
  const r = o.record;
  const creating = r?.created === true && (r.phase === 'creating' || !r.formatted);
  if (!p.fileExists) {
    if (r?.formatted && r.class === 'persistent') {
      steps.push({
        kind: 'refuse',
        id: v.id,
        reason: `${v.path} has disappeared; restore it, or run cryptmap volume delete to start afresh`,
      });
      return;
    }
    if (p.open || p.attached || p.mounted) volatileTeardown(v.id, p, steps);
    build(v, steps);
    return;
  }
  if (r !== undefined && r.class !== 'persistent' && r.created) {
    rebuild(v, o, steps, 'was ephemeral');
    return;
  }
  if (creating) {
    rebuild(v, o, steps, 'creation was interrupted');
    return;
  }
  if (p.isLuks === false) {
    steps.push({
      kind: 'refuse',
      id: v.id,
      reason: `${v.path} is not a LUKS volume (altered?); a persistent volume is never reformatted automatically`,
    });
    return;
  }
  const damage = p.damage ?? truncation(r, p);
  if (damage !== undefined) {
    steps.push({
      kind: 'refuse',
      id: v.id,
      reason: `${v.path}: ${damage}; a persistent volume is never reformatted automatically`,
    });
    return;
  }
  if (o.unlockFailed !== undefined) {
    steps.push({
      kind: 'refuse',
      id: v.id,
      reason: `${v.path} does not unlock with the service's key (${o.unlockFailed})`,
    });
    return;
  }
  bringUp(v, o, steps);
}

/** Teardown of a volume the manifest no longer names. */
function planRemoved(r: VolumeRecord, p: VolumeProbe, steps: Step[]): void {
  volatileTeardown(r.id, p, steps);
  // Only files this agent made, and never persistent ones.
  if (r.class !== 'persistent' && r.created && p.fileExists)
    steps.push({ kind: 'deleteFile', id: r.id, reason: 'removed from the manifest' });
}

/**
 * The steps that make `observed` match `desired`, in order: removed volumes first (so their
 * mountpoints are free), then the desired ones in manifest order.
 * @example plan(desiredVolumes(m, dir), observed, bootId) // [{kind:'createFile', id:'scratch/web/cache'}, ...]
 */
export function plan(desired: VolumeTarget[], observed: ReadonlyMap<string, ObservedVolume>, bootId: string): Step[] {
  const steps: Step[] = [];
  const wanted = new Set(desired.map((v) => v.id));
  for (const [id, o] of observed) {
    if (wanted.has(id) || o.record === undefined) continue;
    planRemoved(o.record, o.probe, steps);
  }
  for (const v of desired) {
    const o = observed.get(v.id) ?? {
      probe: { fileExists: false, open: false, attached: false, mounted: false },
      keyAvailable: false,
    };
    if (v.kind === 'swap') planSwap(v, o, bootId, steps);
    else if (v.class === 'ephemeral') planEphemeral(v, o, bootId, steps);
    else planPersistent(v, o, steps);
  }
  return steps;
}
