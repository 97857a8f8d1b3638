/**
 * A test node: an in-process DaemonCore with the real DataPathPorts, wrapped to record every key a
 * port receives and the argv of every spawned tool, and to crash after the Nth state-changing call
 * (from then on every call throws, like a dead process). `kill()` models the process dying: the core
 * goes away with its mappings and exports; files, the state record and the key service stay.
 */
import { join } from 'node:path';
import { nbdSocketPath } from '../../src/control/runtime-dir.js';
import { DaemonCore } from '../../src/daemon/core.js';
import { DataPathPorts, runTool, type ServeMode } from '../../src/daemon/volume-ports.js';
import { reconcileUntilSettled, shutdown } from '../../src/reconciler/agent.js';
import type { ApplyReport } from '../../src/reconciler/apply.js';
import { type KeyPort, MemoryKeyStore, type VolumePorts, type VolumeTarget } from '../../src/reconciler/ports.js';
import { StateStore } from '../../src/reconciler/state.js';
import type { Secret } from '../../src/util/secret.js';

const BLOCK = 4096;

export class Crash extends Error {
  constructor() {
    super('simulated crash');
  }
}

export interface NodeOptions {
  dir: string;
  keys: KeyPort;
  mode?: ServeMode;
}

export class TestNode {
  readonly dir: string;
  readonly store: StateStore;
  readonly keys: KeyPort;
  readonly mode: ServeMode;
  core!: DaemonCore;
  real!: DataPathPorts;
  ephemeralKeys = new MemoryKeyStore();
  /** Hex of every key handed to format/open/openPlain. */
  keysSeen = new Set<string>();
  argv: string[][] = [];
  crashAfter: number | undefined;
  mutations = 0;
  crashed = false;
  /** format keys per volume id (last one). */
  formatKey = new Map<string, string>();

  private constructor(o: NodeOptions) {
    this.dir = o.dir;
    this.store = new StateStore(o.dir);
    this.keys = o.keys;
    this.mode = o.mode ?? 'nbd-only';
  }

  static async start(o: NodeOptions): Promise<TestNode> {
    const n = new TestNode(o);
    await n.#boot();
    return n;
  }

  async #boot(): Promise<void> {
    const run = join(this.dir, 'run');
    this.core = new DaemonCore({ nbdSocketPath: nbdSocketPath(run), attachDir: join(run, 'attach') });
    const { mkdirSync } = await import('node:fs');
    mkdirSync(run, { recursive: true, mode: 0o700 });
    await this.core.listen();
    this.real = new DataPathPorts({
      core: this.core,
      mode: this.mode,
      workDir: run,
      nbdOnlyReason: 'served over NBD only (test)',
      run: (cmd, args) => {
        this.argv.push([cmd, ...args]);
        return runTool(cmd, args);
      },
    });
    this.crashed = false;
  }

  /** The process dies (mappings, exports and in-memory keys go) and comes back. */
  async restart(): Promise<void> {
    await this.core.shutdown();
    this.ephemeralKeys = new MemoryKeyStore();
    this.crashAfter = undefined;
    this.mutations = 0;
    await this.#boot();
  }

  get ports(): VolumePorts {
    const real = this.real;
    const step = async <T>(fn: () => Promise<T>): Promise<T> => {
      if (this.crashed) throw new Crash();
      this.mutations++;
      const r = await fn();
      if (this.crashAfter === this.mutations) {
        this.crashed = true;
        throw new Crash();
      }
      return r;
    };
    const seen = (k: Secret) => this.keysSeen.add(k.expose().toString('hex'));
    return {
      probe: (v) => {
        if (this.crashed) throw new Crash();
        return real.probe(v);
      },
      createFile: (v) => step(() => real.createFile(v)),
      deleteFile: (v) => step(() => real.deleteFile(v)),
      format: (v, k) => {
        seen(k);
        this.formatKey.set(v.id, k.expose().toString('hex'));
        return step(() => real.format(v, k));
      },
      open: (v, k) => {
        seen(k);
        return step(() => real.open(v, k));
      },
      openPlain: (v, k) => {
        seen(k);
        return step(() => real.openPlain(v, k));
      },
      close: (v) => step(() => real.close(v)),
      attach: (v) => step(() => real.attach(v)),
      detach: (v) => step(() => real.detach(v)),
      mkfs: (v) => step(() => real.mkfs(v)),
      mount: (v) => step(() => real.mount(v)),
      unmount: (v) => step(() => real.unmount(v)),
    };
  }

  #common() {
    const store = {
      load: () => this.store.load(),
      save: (st: Parameters<StateStore['save']>[0]) =>
        this.crashed ? Promise.reject(new Crash()) : this.store.save(st),
    };
    return {
      store,
      ports: this.ports,
      keys: this.keys,
      ephemeralKeys: this.ephemeralKeys,
      retry: { attempts: 1, baseMs: 1, maxMs: 1 },
    };
  }

  reconcile(targets: VolumeTarget[], bootId: string): Promise<ApplyReport> {
    return reconcileUntilSettled({ ...this.#common(), targets, bootId, intervalMs: 1 });
  }

  /** Clean stop (agent shutdown), then the core. */
  async stop(bootId: string): Promise<ApplyReport> {
    this.real.forceClose = true;
    try {
      return await shutdown({ ...this.#common(), bootId });
    } finally {
      this.real.forceClose = false;
      await this.core.shutdown();
    }
  }

  /** Read `len` bytes at `off` of an open volume, through its mapping (any alignment). */
  async read(t: VolumeTarget, off: number, len: number): Promise<Buffer> {
    const dev = this.core.registry.open(t.mapping);
    try {
      const start = off - (off % BLOCK);
      const b = Buffer.alloc(Math.ceil((off + len - start) / BLOCK) * BLOCK);
      await dev.read(start, b);
      return b.subarray(off - start, off - start + len);
    } finally {
      await dev.close();
    }
  }

  /** Write `data` at `off` (read-modify-write of whole 4 KiB blocks). */
  async write(t: VolumeTarget, off: number, data: Buffer): Promise<void> {
    const start = off - (off % BLOCK);
    const b = await this.read(t, start, Math.ceil((off + data.length - start) / BLOCK) * BLOCK);
    data.copy(b, off - start);
    const dev = this.core.registry.open(t.mapping);
    try {
      await dev.write(start, b);
      await dev.flush();
    } finally {
      await dev.close();
    }
  }
}
