/**
 * The agent's observed-state record, kept in its state directory as `agent-state.json` and written
 * atomically (temporary file, fsync, rename, fsync of the directory), so a crash leaves either the
 * old or the new record. For each volume it holds what the agent did: the step it reached, whether
 * it made the file itself (only then may it run mkfs), whether the format completed, and the boot it
 * was made in. It never holds keys.
 *
 * Invariants the planner relies on: the record is saved as `creating` BEFORE the file is created,
 * `formatted` only AFTER the format completed, `mkfsDone` only AFTER mkfs completed.
 */
import { randomBytes } from 'node:crypto';
import { constants, promises as fs } from 'node:fs';
import { join } from 'node:path';
import { CryptmapError, fromSystemError } from '../util/errors.js';
import type { Filesystem, VolumeClass } from './manifest.js';
import type { AttachInfo, TargetKind } from './ports.js';

export const STATE_FILE = 'agent-state.json';
export const STATE_VERSION = 1;

export type StepKind =
  | 'createFile'
  | 'format'
  | 'open'
  | 'attach'
  | 'mkfs'
  | 'mount'
  | 'unmount'
  | 'detach'
  | 'close'
  | 'deleteFile'
  | 'createPool'
  | 'openPool'
  | 'closePool'
  | 'refuse';

/**
 * `stopped`: closed by an agent shutdown (reopened at the next start); `retired`: no longer in the
 * manifest; `waiting-for-lease`: a shared volume this node has not opened yet and whose lease another
 * node holds (a volume that got further keeps its phase and shows the wait in `leaseWait`).
 */
export type VolumePhase = 'creating' | 'formatted' | 'ready' | 'refused' | 'retired' | 'stopped' | 'waiting-for-lease';

export interface VolumeRecord {
  id: string;
  kind: TargetKind;
  class: VolumeClass;
  path: string;
  filesystem: Filesystem | 'swap';
  mountpoint?: string;
  mapping: string;
  /** Boot id when the file was made (ephemeral, swap) or last opened (persistent). */
  bootId: string;
  phase: VolumePhase;
  /** This agent made the file (so it may put a file system on it). */
  created: boolean;
  formatted: boolean;
  mkfsDone: boolean;
  /** Size of the backing file when this agent made or adopted it: a smaller file was truncated. */
  fileBytes?: number;
  reached?: StepKind;
  refused?: string;
  /** The last step that failed on this volume and why (cleared when it is ready). */
  failed?: string;
  attach?: AttachInfo;
  /** A volume in a thin pool: the pool and mappings (VolumeTarget.pool) and its thin device id. */
  pool?: { name: string; mapping: string; thinMapping: string };
  thinId?: number;
  /** Snapshots of a volume in a pool, by name: their thin device ids (`cryptmap volume snapshot`). */
  snapshots?: Record<string, { thinId: number; createdAt: string }>;
  /** Shared storage: who holds the volume's single-writer lease, as last seen (`self`: this node). */
  lease?: { holder: string; self: boolean; since?: string };
  /** Shared storage: why the volume waits for its lease (another node holds it, etcd unreachable); its phase is kept. */
  leaseWait?: string;
  updatedAt: string;
}

export interface AgentState {
  version: 1;
  volumes: Record<string, VolumeRecord>;
}

export function emptyState(): AgentState {
  return { version: STATE_VERSION, volumes: {} };
}

/** Load and save the record; `save` is atomic and durable. */
export class StateStore {
  readonly dir: string;
  readonly path: string;

  constructor(dir: string) {
    this.dir = dir;
    this.path = join(dir, STATE_FILE);
  }

  async load(): Promise<AgentState> {
    let text: string;
    try {
      text = await fs.readFile(this.path, 'utf8');
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return emptyState();
      throw fromSystemError('ESTATE', `cannot read ${this.path}`, e);
    }
    let doc: unknown;
    try {
      doc = JSON.parse(text);
    } catch {
      throw new CryptmapError(
        'ESTATE',
        `${this.path} is not valid JSON; move it aside to start afresh (volume files are kept)`,
      );
    }
    const d = doc as Partial<AgentState>;
    if (d.version !== STATE_VERSION || typeof d.volumes !== 'object' || d.volumes === null) {
      throw new CryptmapError('ESTATE', `${this.path}: unsupported state version ${String(d.version)}`);
    }
    return { version: STATE_VERSION, volumes: d.volumes };
  }

  async save(state: AgentState): Promise<void> {
    const tmp = join(this.dir, `.${STATE_FILE}.${process.pid}.${randomBytes(4).toString('hex')}`);
    try {
      const fh = await fs.open(tmp, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, 0o600);
      try {
        await fh.writeFile(JSON.stringify(state, null, 2) + '\n');
        await fh.sync();
      } finally {
        await fh.close();
      }
      await fs.rename(tmp, this.path);
      const d = await fs.open(this.dir, constants.O_RDONLY);
      try {
        await d.sync();
      } finally {
        await d.close();
      }
    } catch (e) {
      await fs.unlink(tmp).catch(() => {});
      throw fromSystemError('ESTATE', `cannot write ${this.path}`, e);
    }
  }
}
