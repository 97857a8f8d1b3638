/**
 * A fake machine for the reconciler: backing files, LUKS headers, mappings, NBD attachments, file
 * systems and mounts, as plain data. It checks the order of operations (no close while mounted, no
 * delete while open...) and can crash after (or before) its Nth state-changing call: from then on
 * every call throws, like a dead process. `restart()` then models the process coming back: mappings,
 * attachments and mounts that lived in the process are gone; files stay.
 */
import { CryptmapError } from '../../src/util/errors.js';
import type { Secret } from '../../src/util/secret.js';
import type { AttachInfo, VolumePorts, VolumeProbe, VolumeTarget } from '../../src/reconciler/ports.js';
import type { AgentState } from '../../src/reconciler/state.js';
import type { StatePort } from '../../src/reconciler/apply.js';

export const HEADER_BYTES = 16 << 20;

export class Crash extends Error {
  constructor() {
    super('simulated crash');
  }
}

export interface FakeFile {
  bytes: number;
  luksKey?: string;
  plainKey?: string;
  fs?: string;
  data: string[];
  damage?: string;
  /** Not made by a cryptmap format (someone else's file). */
  foreign?: boolean;
}

export class FakeWorld implements VolumePorts {
  files = new Map<string, FakeFile>();
  mappings = new Map<string, string>();
  attached = new Set<string>();
  mounted = new Set<string>();
  calls: string[] = [];
  mutations = 0;
  crashAt: number | undefined;
  crashMode: 'before' | 'after' = 'after';
  crashed = false;
  /** Make format fail with ENOSPC. */
  diskFull = false;

  restart(): void {
    this.mappings.clear();
    this.attached.clear();
    this.mounted.clear();
    this.crashed = false;
    this.crashAt = undefined;
  }

  async #step<T>(name: string, v: VolumeTarget, fn: () => T): Promise<T> {
    if (this.crashed) throw new Crash();
    this.mutations++;
    this.calls.push(`${name} ${v.id}`);
    if (this.crashAt === this.mutations && this.crashMode === 'before') {
      this.crashed = true;
      throw new Crash();
    }
    const r = fn();
    if (this.crashAt === this.mutations && this.crashMode === 'after') {
      this.crashed = true;
      throw new Crash();
    }
    return r;
  }

  #file(v: VolumeTarget): FakeFile {
    const f = this.files.get(v.path);
    if (!f) throw new CryptmapError('ENODEV', `${v.path} does not exist`, { errno: 'ENOENT' });
    return f;
  }

  async probe(v: VolumeTarget): Promise<VolumeProbe> {
    if (this.crashed) throw new Crash();
    const f = this.files.get(v.path);
    const p: VolumeProbe = {
      fileExists: f !== undefined,
      open: this.mappings.has(v.mapping),
      attached: this.attached.has(v.mapping),
      mounted: this.mounted.has(v.mapping),
    };
    if (f) {
      p.fileBytes = f.bytes;
      p.isLuks = f.luksKey !== undefined;
      if (f.damage) p.damage = f.damage;
    }
    return p;
  }

  createFile(v: VolumeTarget): Promise<void> {
    return this.#step('createFile', v, () => {
      if (this.files.has(v.path)) throw new CryptmapError('EEXIST', `${v.path} exists`, { errno: 'EEXIST' });
      this.files.set(v.path, { bytes: v.sizeBytes + (v.kind === 'scratch' ? HEADER_BYTES : 0), data: [] });
    });
  }

  deleteFile(v: VolumeTarget): Promise<void> {
    return this.#step('deleteFile', v, () => {
      if (this.mappings.has(v.mapping)) throw new Error(`order: delete of ${v.id} while open`);
      this.files.delete(v.path);
    });
  }

  format(v: VolumeTarget, key: Secret): Promise<void> {
    return this.#step('format', v, () => {
      const f = this.#file(v);
      if (this.mappings.has(v.mapping)) throw new Error(`order: format of ${v.id} while open`);
      if (this.diskFull) {
        f.luksKey = 'half-written';
        throw new CryptmapError('EWRITE', `cannot write the LUKS2 header of ${v.path}: No space left on device`, {
          errno: 'ENOSPC',
        });
      }
      f.luksKey = key.expose().toString('hex');
      f.fs = undefined;
      f.data = [];
    });
  }

  open(v: VolumeTarget, key: Secret): Promise<void> {
    return this.#step('open', v, () => {
      const f = this.#file(v);
      const hex = key.expose().toString('hex');
      if (f.luksKey === undefined) throw new CryptmapError('ENOTLUKS', `${v.path} is not LUKS`);
      if (f.luksKey !== hex)
        throw new CryptmapError('EUNLOCK', 'No key available with this passphrase.', { exitCode: 2 });
      this.mappings.set(v.mapping, hex);
    });
  }

  openPlain(v: VolumeTarget, key: Secret): Promise<void> {
    return this.#step('openPlain', v, () => {
      const f = this.#file(v);
      const hex = key.expose().toString('hex');
      if (f.plainKey !== hex) {
        f.fs = undefined; // another key: what was there reads as noise
        f.data = [];
      }
      f.plainKey = hex;
      this.mappings.set(v.mapping, hex);
    });
  }

  close(v: VolumeTarget): Promise<void> {
    return this.#step('close', v, () => {
      if (this.attached.has(v.mapping) || this.mounted.has(v.mapping))
        throw new Error(`order: close of ${v.id} while attached or mounted`);
      this.mappings.delete(v.mapping);
    });
  }

  attach(v: VolumeTarget): Promise<AttachInfo> {
    return this.#step('attach', v, () => {
      if (!this.mappings.has(v.mapping)) throw new Error(`order: attach of ${v.id} while closed`);
      this.attached.add(v.mapping);
      return { nbdUri: `nbd+unix:///${v.mapping}?socket=/fake/nbd.sock` };
    });
  }

  detach(v: VolumeTarget): Promise<void> {
    return this.#step('detach', v, () => {
      if (this.mounted.has(v.mapping)) throw new Error(`order: detach of ${v.id} while mounted`);
      this.attached.delete(v.mapping);
    });
  }

  mkfs(v: VolumeTarget): Promise<void> {
    return this.#step('mkfs', v, () => {
      if (!this.attached.has(v.mapping) || this.mounted.has(v.mapping))
        throw new Error(`order: mkfs of ${v.id} needs attached, unmounted`);
      const f = this.#file(v);
      f.fs = v.filesystem;
      f.data = [];
    });
  }

  mount(v: VolumeTarget): Promise<void> {
    return this.#step('mount', v, () => {
      const f = this.#file(v);
      if (!this.attached.has(v.mapping)) throw new Error(`order: mount of ${v.id} while not attached`);
      if (f.fs !== v.filesystem) throw new CryptmapError('ETOOL', `${v.id}: no ${v.filesystem} file system`);
      this.mounted.add(v.mapping);
    });
  }

  unmount(v: VolumeTarget): Promise<void> {
    return this.#step('unmount', v, () => {
      this.mounted.delete(v.mapping);
    });
  }

  /** The service writes to its mounted volume. */
  write(v: VolumeTarget, s: string): void {
    if (!this.mounted.has(v.mapping)) throw new Error(`${v.id} is not mounted`);
    this.#file(v).data.push(s);
  }
}

/** Wraps a state store so that it dies with the world's crash. */
export function crashingStore(inner: StatePort, world: FakeWorld): StatePort {
  return {
    load: () => inner.load(),
    async save(s: AgentState) {
      if (world.crashed) throw new Crash();
      await inner.save(s);
    },
  };
}
