/**
 * The apply loop: observe (state record + port probes), plan (plan.ts), execute the steps through
 * the ports one by one, saving the record around every step, then observe again to report.
 *
 * - Resumable: the record is saved `creating` before a file is made and updated after each step, so
 *   a crash at any point (even between a step's effect and the save) is repaired by the next run.
 * - Keys: ephemeral volumes and swap get a fresh random key when they are (re)made, kept only in the
 *   EphemeralKeyStore; persistent volumes get their key from the key service (HKDF purpose
 *   `scratch`, 32 bytes, used as the LUKS2 keyslot passphrase) BEFORE anything is created, with retry
 *   and exponential backoff while it is unreachable. A volume whose key cannot be had is reported
 *   `waiting-for-keys` and left as it is: volumes already open keep serving.
 * - Rollback: if creating the file or formatting fails (a full disk...), the new file is deleted and
 *   its record dropped, so nothing half-made confuses the next run.
 * - A step failing on one volume stops that volume only; the others proceed.
 */
import { randomBytes } from 'node:crypto';
import { isNbdUri } from '../nbd-wire/uri.js';
import { CryptmapError, isCryptmapError } from '../util/errors.js';
import { type Logger, logger } from '../util/log.js';
import { Secret } from '../util/secret.js';
import { type ObservedVolume, plan, planPools, planPoolTeardown, poolMapping, type Step } from './plan.js';
import type {
  EphemeralKeyStore,
  KeyPort,
  LeasePort,
  PoolPorts,
  PoolProbe,
  PoolTarget,
  VolumePorts,
  VolumeTarget,
} from './ports.js';
import type { AgentState, StepKind, VolumeRecord } from './state.js';

export interface StatePort {
  load(): Promise<AgentState>;
  save(state: AgentState): Promise<void>;
}

export interface RetryPolicy {
  /** Tries in all (>= 1). */
  attempts: number;
  baseMs: number;
  maxMs: number;
}

export const DEFAULT_RETRY: RetryPolicy = { attempts: 6, baseMs: 250, maxMs: 8000 };

export interface ApplyOptions {
  targets: VolumeTarget[];
  store: StatePort;
  ports: VolumePorts;
  keys: KeyPort;
  ephemeralKeys: EphemeralKeyStore;
  bootId: string;
  retry?: RetryPolicy;
  sleep?: (ms: number) => Promise<void>;
  log?: Logger;
  /** Single-writer leases for volumes on shared storage (`device`); none: no coordination. */
  leases?: LeasePort;
  /** Random bytes for per-boot keys (tests may seed it). */
  random?: (n: number) => Buffer;
  /**
   * `shutdown`: tear everything down as if the manifest were empty, except that persistent volumes
   * are recorded `stopped` (not `retired`); ephemeral and swap files are deleted, their keys wiped.
   */
  mode?: 'reconcile' | 'shutdown';
  /** Thin pools the manifest asks for (`desiredPools`), and their ports (needed when a volume is in a pool). */
  pools?: PoolTarget[];
  poolPorts?: PoolPorts;
  /** Told when each step starts and ends (`ms` its duration; `error` when it failed): the agent's progress lines. */
  onStep?: (step: Step, event: 'start' | 'end', ms: number, error?: unknown) => void;
}

export type VolumeState =
  | 'ready'
  | 'refused'
  | 'failed'
  | 'waiting-for-keys'
  | 'waiting-for-lease'
  | 'retired'
  | 'stopped'
  | 'removed';

export interface VolumeReport {
  id: string;
  state: VolumeState;
  reason?: string;
  code?: string;
  record?: VolumeRecord;
}

export interface PoolReport {
  id: string;
  state: 'open' | 'refused' | 'failed' | 'closed';
  reason?: string;
  code?: string;
}

export interface ApplyReport {
  /** Steps executed, in order (refusals included). */
  executed: Step[];
  volumes: VolumeReport[];
  /** Thin pools: the desired ones and those closed in this run. */
  pools: PoolReport[];
  /** Nothing is left to do except refusals and volumes waiting for keys or failed. */
  converged: boolean;
  /** Some volume waits for the key service or for its lease: run again later. */
  retryLater: boolean;
}

/** Bytes of the LUKS2 keyslot passphrase: derived or random, 256 bits need no stretching. */
export const VOLUME_PASSPHRASE_BYTES = 32;

/** The VolumeTarget a record describes (for volumes no longer in the manifest). */
export function targetOfRecord(r: VolumeRecord): VolumeTarget {
  const parts = r.id.split('/');
  const t: VolumeTarget = {
    id: r.id,
    kind: r.kind,
    service: r.kind === 'swap' ? 'swap' : (parts[1] ?? ''),
    volume: parts[parts.length - 1] ?? '',
    class: r.class,
    path: r.path,
    sizeBytes: 0,
    filesystem: r.filesystem,
    cipher: '',
    keySizeBits: 0,
    sectorSize: 0,
    mapping: r.mapping,
  };
  if (r.mountpoint !== undefined) t.mountpoint = r.mountpoint;
  if (isNbdUri(r.path)) t.device = r.path;
  if (r.pool !== undefined) t.pool = r.pool;
  if (r.thinId !== undefined) t.thinId = r.thinId;
  if (r.pool !== undefined && r.fileBytes !== undefined) t.thinBytes = r.fileBytes;
  return t;
}

/** `t` with the thin device id and size its record holds (a volume in a pool). */
export function withThinId(t: VolumeTarget, r: VolumeRecord | undefined): VolumeTarget {
  if (t.pool === undefined || r?.thinId === undefined) return t;
  const out = { ...t, thinId: r.thinId };
  if (r.fileBytes !== undefined) out.thinBytes = r.fileBytes;
  return out;
}

/** Thin device ids the records hold in pool `name` (volumes and their snapshots). */
export function recordedThinIds(state: AgentState, name: string): number[] {
  const ids: number[] = [];
  for (const r of Object.values(state.volumes)) {
    if (r.pool?.name !== name) continue;
    if (r.thinId !== undefined) ids.push(r.thinId);
    for (const s of Object.values(r.snapshots ?? {})) ids.push(s.thinId);
  }
  return ids;
}

/** The lowest thin device id not in `used` (ids are 24 bits). */
export function freeThinId(used: Iterable<number>): number {
  const taken = new Set(used);
  let id = 0;
  while (taken.has(id)) id++;
  if (id > 0xffffff) throw new CryptmapError('ENOSPC', 'the pool has no free thin device id (24 bits)');
  return id;
}

/** The key service could not give a persistent volume's key (unreachable after retries, or refused). */
class KeyUnavailable extends Error {
  readonly keyError: CryptmapError;
  constructor(e: CryptmapError) {
    super(e.message);
    this.keyError = e;
  }
}

/** A volume was refused mid-way (its key does not unlock it). */
class Refused extends Error {}

/** The root generations a persistent volume's key is derived from when the current one's does not open it. */
const ROOT_FALLBACKS = ['next', 'previous'] as const;

/** Another node holds a shared volume's lease, or the coordination service cannot be reached. */
class LeaseWait extends Error {
  readonly holder: { node: string; since: string } | undefined;
  constructor(message: string, holder?: { node: string; since: string }) {
    super(message);
    this.holder = holder;
  }
}

/** A volume was refused mid-way (its key does not unlock it). */

/** Observe every volume the manifest names or the record remembers. */
export async function observe(
  targets: VolumeTarget[],
  state: AgentState,
  ports: VolumePorts,
  ephemeralKeys: EphemeralKeyStore,
  bootId: string,
  unlockFailed: ReadonlyMap<string, string> = new Map(),
): Promise<Map<string, ObservedVolume>> {
  const out = new Map<string, ObservedVolume>();
  const all = new Map<string, VolumeTarget>();
  for (const r of Object.values(state.volumes)) all.set(r.id, targetOfRecord(r));
  for (const t of targets) all.set(t.id, withThinId(t, state.volumes[t.id]));
  for (const [id, t] of all) {
    const o: ObservedVolume = {
      probe: await ports.probe(t),
      keyAvailable: ephemeralKeys.get(id, bootId) !== undefined,
    };
    const rec = state.volumes[id];
    if (rec) o.record = rec;
    const u = unlockFailed.get(id);
    if (u !== undefined) o.unlockFailed = u;
    out.set(id, o);
  }
  return out;
}

/** createFile failed because the file already exists (EEXIST from the port or its cause). */
function fileExisted(e: unknown): boolean {
  const x = e as { errno?: unknown; code?: unknown; cause?: { code?: unknown } } | undefined;
  return x?.errno === 'EEXIST' || x?.code === 'EEXIST' || x?.cause?.code === 'EEXIST';
}

function errText(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/** Run one reconciliation. Never throws for a single volume's failure; see the report. */
export async function apply(opts: ApplyOptions): Promise<ApplyReport> {
  const log = opts.log ?? logger('reconciler');
  const retry = opts.retry ?? DEFAULT_RETRY;
  const sleep = opts.sleep ?? ((ms: number) => new Promise<void>((r) => setTimeout(r, ms)));
  const random = opts.random ?? randomBytes;
  const { ports, ephemeralKeys, bootId } = opts;
  const state = await opts.store.load();
  const shutdown = opts.mode === 'shutdown';
  const wantedTargets = shutdown ? [] : opts.targets;
  const kept = shutdown ? ('stopped' as const) : ('retired' as const);
  const targets = new Map(wantedTargets.map((t) => [t.id, t]));
  const desired = new Set(targets.keys());
  const outcome = new Map<string, VolumeReport>();
  const unlockFailed = new Map<string, string>();
  const derived = new Map<string, Secret>();
  const executed: Step[] = [];
  const now = () => new Date().toISOString();
  const save = () => opts.store.save(state);

  const targetOf = (id: string): VolumeTarget => {
    const t = targets.get(id);
    return t === undefined ? targetOfRecord(state.volumes[id]!) : withThinId(t, state.volumes[id]);
  };
  const desiredPools = shutdown ? [] : (opts.pools ?? []);
  const poolReports = new Map<string, PoolReport>();
  const poolPorts = (): PoolPorts => {
    if (opts.poolPorts === undefined) throw new CryptmapError('EINTERNAL', 'thin pools need pool ports');
    return opts.poolPorts;
  };
  const leases = opts.leases;
  const needsLease = (t: VolumeTarget): boolean => leases !== undefined && t.device !== undefined;

  /** Hold the single-writer lease of a shared volume before writing to its device. */
  const ensureLease = async (t: VolumeTarget): Promise<void> => {
    if (!needsLease(t) || leases!.holds(t.id)) return;
    let res: Awaited<ReturnType<LeasePort['acquire']>>;
    try {
      res = await leases!.acquire(t.id);
    } catch (e) {
      throw new LeaseWait(`the coordination service cannot be reached: ${errText(e)}`);
    }
    if (!res.held) {
      const who = res.holder ? `${res.holder.node} (since ${res.holder.since})` : 'another node';
      throw new LeaseWait(`waiting for the single-writer lease, held by ${who}`, res.holder);
    }
    const r = state.volumes[t.id];
    if (r) {
      r.lease = { holder: leases!.node, self: true };
      delete r.leaseWait;
    }
  };

  /** The persistent volume's key, from the key service, with backoff while it is unreachable. */
  const derivedKey = async (t: VolumeTarget): Promise<Secret> => {
    const have = derived.get(t.id);
    if (have) return have;
    for (let attempt = 1; ; attempt++) {
      try {
        const k = await opts.keys.deriveKey({
          purpose: 'scratch',
          service: t.service,
          volume: t.volume,
          length: VOLUME_PASSPHRASE_BYTES,
        });
        derived.set(t.id, k);
        return k;
      } catch (e) {
        const unreachable = isCryptmapError(e, 'EKEYD_UNREACHABLE');
        if (!unreachable || attempt >= retry.attempts) {
          throw new KeyUnavailable(isCryptmapError(e) ? e : new CryptmapError('EKEYD_PROTO', errText(e)));
        }
        const delay = Math.min(retry.maxMs, retry.baseMs * 2 ** (attempt - 1));
        log.warn('key service unreachable; retrying', { volume: t.id, attempt, delayMs: delay });
        await sleep(delay);
      }
    }
  };

  /**
   * Open persistent volume `t` with the key derived from another root generation, after the current
   * root's key opened no keyslot: a root rotation left it half-way (docs/keyservice.md "Rotating
   * keys"): `next` (begun, this volume rewrapped already, the commit not done yet) or `previous`
   * (committed before this volume was rewrapped). False when neither exists or opens it.
   */
  const openWithOtherRoot = async (t: VolumeTarget): Promise<boolean> => {
    for (const generation of ROOT_FALLBACKS) {
      let k: Secret;
      try {
        k = await opts.keys.deriveKey({
          purpose: 'scratch',
          service: t.service,
          volume: t.volume,
          length: VOLUME_PASSPHRASE_BYTES,
          generation,
        });
      } catch (e) {
        // No such generation (ENOROOT), or a key service that does not know generations (EKEYREQ).
        if (isCryptmapError(e, 'ENOROOT') || isCryptmapError(e, 'EKEYREQ')) continue;
        throw e;
      }
      try {
        await ports.open(t, k);
        log.warn(`opened with the ${generation} root secret's key: run cryptmap volume rewrap-keys`, {
          volume: t.id,
        });
        return true;
      } catch (e) {
        if (!isCryptmapError(e, 'EUNLOCK')) throw e;
      } finally {
        k.dispose();
      }
    }
    return false;
  };

  const newRecord = (t: VolumeTarget): VolumeRecord => {
    const r: VolumeRecord = {
      id: t.id,
      kind: t.kind,
      class: t.class,
      path: t.path,
      filesystem: t.filesystem,
      mapping: t.mapping,
      bootId,
      phase: 'creating',
      created: true,
      formatted: false,
      mkfsDone: false,
      updatedAt: now(),
    };
    if (t.mountpoint !== undefined) r.mountpoint = t.mountpoint;
    if (t.pool !== undefined) r.pool = t.pool;
    return r;
  };

  /** Adopt a persistent volume found without a record (a copy from another node). */
  const recordFor = async (t: VolumeTarget): Promise<VolumeRecord> => {
    let r = state.volumes[t.id];
    if (!r) {
      r = { ...newRecord(t), phase: 'formatted', created: false, formatted: true };
      const bytes = (await ports.probe(t)).fileBytes;
      if (bytes !== undefined) r.fileBytes = bytes;
      state.volumes[t.id] = r;
    }
    return r;
  };

  const execute = async (step: Step): Promise<void> => {
    const t = targetOf(step.id);
    const isDesired = desired.has(t.id);
    const touch = (kind: StepKind) => {
      const r = state.volumes[t.id];
      if (r) {
        r.reached = kind;
        r.updatedAt = now();
      }
    };
    switch (step.kind) {
      case 'refuse': {
        const r = state.volumes[t.id];
        if (r) {
          r.phase = 'refused';
          r.refused = step.reason;
          touch('refuse');
          await save();
        }
        log.error('volume refused', { volume: t.id, reason: step.reason });
        outcome.set(t.id, { id: t.id, state: 'refused', reason: step.reason ?? 'refused' });
        return;
      }
      case 'createFile': {
        // Persistent: have the key before anything exists, so an unreachable key service leaves nothing behind.
        if (t.kind === 'scratch' && t.class === 'persistent') await derivedKey(t);
        await ensureLease(t);
        state.volumes[t.id] = newRecord(t);
        if (needsLease(t)) state.volumes[t.id]!.lease = { holder: leases!.node, self: true };
        let made = t;
        if (t.pool !== undefined) {
          // The id is recorded before the thin device is made: a crash in between leaves a record
          // `creating` whose (maybe made) thin device the next run deletes and makes again.
          const pt = poolTargetOf(t.pool.name);
          const used = [...(await poolPorts().poolDeviceIds(pt)), ...recordedThinIds(state, t.pool.name)];
          const thinId = freeThinId(used);
          state.volumes[t.id]!.thinId = thinId;
          made = { ...t, thinId };
        }
        await save();
        try {
          await ports.createFile(made);
        } catch (e) {
          // A file that appeared meanwhile is not ours: forget the record, never delete that file.
          if (fileExisted(e)) {
            delete state.volumes[t.id];
            await save();
          } else await rollback(made);
          throw e;
        }
        const rec = state.volumes[t.id]!;
        const bytes = (await ports.probe(made)).fileBytes;
        if (bytes !== undefined) rec.fileBytes = bytes;
        touch('createFile');
        await save();
        return;
      }
      case 'format': {
        let key: Secret;
        if (t.class === 'persistent') key = await derivedKey(t);
        else {
          key = new Secret(random(VOLUME_PASSPHRASE_BYTES));
          ephemeralKeys.put(t.id, bootId, key);
        }
        await ensureLease(t);
        try {
          await ports.format(t, key);
        } catch (e) {
          await rollback(t);
          throw e;
        }
        const r = state.volumes[t.id]!;
        r.formatted = true;
        r.phase = 'formatted';
        touch('format');
        await save();
        return;
      }
      case 'open': {
        if (t.kind === 'swap') {
          let key = ephemeralKeys.get(t.id, bootId);
          if (!key) {
            key = new Secret(random(t.keySizeBits / 8));
            ephemeralKeys.put(t.id, bootId, key);
          }
          await ports.openPlain(t, key);
        } else if (t.class === 'persistent') {
          const key = await derivedKey(t);
          await ensureLease(t);
          try {
            await ports.open(t, key);
          } catch (e) {
            if (!isCryptmapError(e, 'EUNLOCK')) throw e;
            if (!(await openWithOtherRoot(t))) {
              unlockFailed.set(t.id, e.message);
              const reason = `${t.path} does not unlock with the service's key`;
              await execute({ kind: 'refuse', id: t.id, reason });
              throw new Refused(reason);
            }
          }
          const r = await recordFor(t);
          r.bootId = bootId;
          if (needsLease(t)) r.lease = { holder: leases!.node, self: true };
          if (r.phase === 'waiting-for-lease') {
            r.phase = 'formatted';
            r.formatted = true;
          }
        } else {
          const key = ephemeralKeys.get(t.id, bootId);
          if (!key)
            throw new CryptmapError('EKEYLOST', `the per-boot key of ${t.id} is gone; the volume will be remade`);
          await ports.open(t, key);
        }
        touch('open');
        await save();
        return;
      }
      case 'attach': {
        const info = await ports.attach(t);
        const r = state.volumes[t.id];
        if (r) r.attach = info;
        touch('attach');
        await save();
        if (info.nbdUri)
          log.info('volume served', {
            volume: t.id,
            nbd: info.nbdUri,
            ...(info.device ? { device: info.device } : {}),
          });
        return;
      }
      case 'mkfs': {
        await ports.mkfs(t);
        const r = state.volumes[t.id];
        if (r) r.mkfsDone = true;
        touch('mkfs');
        await save();
        return;
      }
      case 'mount': {
        await ports.mount(t);
        const r = state.volumes[t.id];
        if (r) {
          r.phase = 'ready';
          // The manifest may have moved the mountpoint since the volume was made.
          if (t.mountpoint === undefined) delete r.mountpoint;
          else r.mountpoint = t.mountpoint;
        }
        touch('mount');
        await save();
        return;
      }
      case 'unmount':
      case 'detach':
      case 'close': {
        await ports[step.kind](t);
        const r = state.volumes[t.id];
        if (step.kind === 'close' && needsLease(t)) {
          await leases!.release(t.id);
          if (r) delete r.lease;
        }
        if (step.kind === 'detach' && r) delete r.attach;
        if (step.kind === 'close' && r && !isDesired && r.class === 'persistent') r.phase = kept;
        touch(step.kind);
        await save();
        return;
      }
      case 'deleteFile': {
        await ensureLease(t);
        await ports.deleteFile(t);
        ephemeralKeys.drop(t.id);
        delete state.volumes[t.id];
        await save();
        if (!isDesired) outcome.set(t.id, { id: t.id, state: 'removed' });
        return;
      }
    }
  };

  /** Undo a half-made volume: delete its file and forget it. Best effort. */
  const rollback = async (t: VolumeTarget): Promise<void> => {
    ephemeralKeys.drop(t.id);
    try {
      await ports.deleteFile(t);
    } catch (e) {
      // Keep the `creating` record: the next run knows the file is ours and half-made, and remakes it.
      log.error('rollback could not delete the file', { volume: t.id, error: errText(e) });
      return;
    }
    delete state.volumes[t.id];
    try {
      await save();
    } catch (e) {
      log.error('rollback could not save the state', { volume: t.id, error: errText(e) });
    }
  };

  /** The PoolTarget of pool `name`: the manifest's, or (no longer in it) rebuilt from its mapping name. */
  const poolTargetOf = (name: string): PoolTarget =>
    desiredPools.find((p) => p.name === name) ??
    (opts.pools ?? []).find((p) => p.name === name) ?? {
      id: `pool/${name}`,
      name,
      mapping: poolMapping(name),
      metadataPath: '',
      dataPath: '',
      ownFiles: false,
      dataBytes: 0,
      metadataBytes: 0,
      blockBytes: 0,
    };

  /** Pool steps: make, open and close thin pools (before and after the volume steps). */
  const runPoolStep = async (step: Step): Promise<void> => {
    const name = step.id.slice('pool/'.length);
    const p = poolTargetOf(name);
    executed.push(step);
    const t0 = performance.now();
    opts.onStep?.(step, 'start', 0);
    try {
      if (step.kind === 'refuse') {
        log.error('pool refused', { pool: p.id, reason: step.reason });
        poolReports.set(p.id, { id: p.id, state: 'refused', reason: step.reason ?? 'refused' });
      } else if (step.kind === 'createPool') await poolPorts().createPool(p);
      else if (step.kind === 'openPool') {
        await poolPorts().openPool(p);
        poolReports.set(p.id, { id: p.id, state: 'open' });
      } else if (step.kind === 'closePool') {
        await poolPorts().closePool(p);
        poolReports.set(p.id, { id: p.id, state: 'closed' });
      }
      opts.onStep?.(step, 'end', performance.now() - t0);
    } catch (e) {
      opts.onStep?.(step, 'end', performance.now() - t0, e);
      log.error(`step ${step.kind} failed`, { pool: p.id, error: errText(e) });
      poolReports.set(p.id, {
        id: p.id,
        state: 'failed',
        reason: `${step.kind}: ${errText(e)}`,
        code: isCryptmapError(e) ? e.code : 'EINTERNAL',
      });
    }
  };

  /** Every pool this run knows of: the desired ones, and those the records name. */
  const knownPools = (): PoolTarget[] => {
    const names = new Set(desiredPools.map((p) => p.name));
    for (const r of Object.values(state.volumes)) if (r.pool !== undefined) names.add(r.pool.name);
    return [...names].map(poolTargetOf);
  };

  try {
    if (desiredPools.length > 0) {
      const seen = new Map<string, PoolProbe>();
      for (const p of desiredPools) seen.set(p.id, await poolPorts().probePool(p));
      for (const step of planPools(desiredPools, seen)) {
        const prev = poolReports.get(step.id);
        if (prev?.state === 'failed' || prev?.state === 'refused') continue;
        await runPoolStep(step);
      }
    }
    const steps = plan(wantedTargets, await observe(wantedTargets, state, ports, ephemeralKeys, bootId), bootId);
    const stopped = new Set<string>();
    // A volume whose pool could not be made or opened is left as it is.
    for (const t of wantedTargets) {
      const pr = t.pool === undefined ? undefined : poolReports.get(`pool/${t.pool.name}`);
      if (pr === undefined || pr.state === 'open') continue;
      stopped.add(t.id);
      outcome.set(t.id, {
        id: t.id,
        state: 'failed',
        reason: `its pool ${t.pool!.name} is not open (${pr.reason ?? pr.state})`,
        code: pr.code ?? 'EPOOL',
      });
    }
    for (const step of steps) {
      if (stopped.has(step.id)) continue;
      try {
        executed.push(step);
        const t0 = performance.now();
        opts.onStep?.(step, 'start', 0);
        try {
          await execute(step);
        } catch (e) {
          opts.onStep?.(step, 'end', performance.now() - t0, e);
          throw e;
        }
        opts.onStep?.(step, 'end', performance.now() - t0);
        if (step.kind === 'refuse') stopped.add(step.id);
      } catch (e) {
        stopped.add(step.id);
        if (e instanceof Refused) continue;
        if (e instanceof LeaseWait) {
          log.warn('volume waits for its lease', { volume: step.id, reason: e.message });
          let r = state.volumes[step.id];
          if (!r) {
            // Adopted later (open) or made (createFile) once the lease is ours; shown in status meanwhile.
            const t = targetOf(step.id);
            r = { ...newRecord(t), phase: 'waiting-for-lease', created: false };
            state.volumes[step.id] = r;
          }
          // The phase stays (formatted, ready, stopped...): the wait is shown beside it, not over it.
          r.leaseWait = e.message;
          if (e.holder) r.lease = { holder: e.holder.node, self: false, since: e.holder.since };
          else delete r.lease;
          r.updatedAt = now();
          await save().catch(() => {});
          outcome.set(step.id, { id: step.id, state: 'waiting-for-lease', reason: e.message, code: 'ELEASE_HELD' });
          continue;
        }
        if (e instanceof KeyUnavailable) {
          const waiting = e.keyError.code === 'EKEYD_UNREACHABLE';
          log.error(waiting ? 'key service unreachable; volume left as it is' : 'key service refused the key', {
            volume: step.id,
            error: e.message,
          });
          outcome.set(step.id, {
            id: step.id,
            state: waiting ? 'waiting-for-keys' : 'failed',
            reason: e.message,
            code: e.keyError.code,
          });
          continue;
        }
        log.error(`step ${step.kind} failed`, { volume: step.id, error: errText(e) });
        const fr = state.volumes[step.id];
        if (fr) {
          fr.failed = `${step.kind}: ${errText(e)}`;
          await save().catch(() => {});
        }
        outcome.set(step.id, {
          id: step.id,
          state: 'failed',
          reason: `${step.kind}: ${errText(e)}`,
          code: isCryptmapError(e) ? e.code : 'EINTERNAL',
        });
      }
    }
    // Housekeeping: forget removed volumes whose files are gone; retire removed persistent ones.
    const after = await observe(wantedTargets, state, ports, ephemeralKeys, bootId, unlockFailed);
    let dirty = false;
    for (const [id, o] of after) {
      const r = o.record;
      // A lease is held while the volume is open: a step that failed (or was refused) before the
      // open took it for nothing, and kept it would lock every other node out until this agent exits.
      if (leases?.holds(id) && !o.probe.open) {
        await leases.release(id);
        if (r?.lease?.self) delete r.lease;
        dirty = true;
      }
      if (!r || desired.has(id) || o.probe.open || o.probe.attached || o.probe.mounted) continue;
      if (r.class === 'persistent' && r.formatted) {
        if (r.phase !== kept) {
          r.phase = kept;
          dirty = true;
        }
        if (!outcome.has(id))
          outcome.set(id, {
            id,
            state: kept,
            reason: shutdown ? 'closed; file kept' : 'not in the manifest; file kept',
          });
      } else if (!o.probe.fileExists || !r.created) {
        delete state.volumes[id];
        dirty = true;
        if (!outcome.has(id)) outcome.set(id, { id, state: 'removed' });
      }
    }
    for (const [id, o] of after) {
      if (!desired.has(id) || outcome.has(id)) continue;
      const r = state.volumes[id];
      if (o.probe.open && o.probe.attached && r) {
        if (r.phase !== 'ready' || r.failed !== undefined || r.leaseWait !== undefined) {
          r.phase = 'ready';
          delete r.failed;
          delete r.leaseWait;
          dirty = true;
        }
        outcome.set(id, { id, state: 'ready' });
      }
    }
    if (dirty) await save();
    // Pools no longer asked for (all of them at shutdown) close once their volumes are closed.
    const known = knownPools();
    if (known.length > 0 && opts.poolPorts !== undefined) {
      const open: string[] = [];
      for (const p of known) if ((await opts.poolPorts.probePool(p)).open) open.push(p.id);
      for (const step of planPoolTeardown(desiredPools, open)) await runPoolStep(step);
    }
    const remaining = plan(wantedTargets, after, bootId).filter((s) => s.kind !== 'refuse');
    const volumes: VolumeReport[] = [];
    for (const id of new Set([...desired, ...outcome.keys()])) {
      const rep = outcome.get(id) ?? { id, state: 'failed' as const, reason: 'not converged' };
      const r = state.volumes[id];
      volumes.push(r ? { ...rep, record: r } : rep);
    }
    for (const p of desiredPools) if (!poolReports.has(p.id)) poolReports.set(p.id, { id: p.id, state: 'open' });
    return {
      executed,
      volumes,
      pools: [...poolReports.values()],
      converged: remaining.length === 0,
      retryLater: volumes.some((v) => v.state === 'waiting-for-keys' || v.state === 'waiting-for-lease'),
    };
  } finally {
    for (const k of derived.values()) k.dispose();
  }
}
