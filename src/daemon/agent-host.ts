/**
 * The agent process (`cryptmap agent`, `npm start`): a DaemonCore in process (runtime dir
 * `<state>/run`, 0700: `nbd.sock` serving every volume, `control.sock` for `cryptmap status` and
 * friends with `--runtime-dir <state>/run`), the key service the manifest names, the real
 * VolumePorts (volume-ports.ts), and the reconciler's loop (reconciler/agent.ts) over them.
 *
 * State directory layout: `agent-state.json` (the record, never keys), `agent.pid` (while running),
 * `volumes/scratch/<service>/<volume>.img`, `volumes/swap/<name>.img`, `keyd/` (embedded key
 * service: root secret, audit log), `run/` (sockets, attach work dirs, temporary mkfs images).
 *
 * Stop: every volume is unmounted, detached and closed (persistent files kept and reopened at the
 * next start; ephemeral and swap files deleted, their per-boot keys wiped), then the core shuts down.
 */
import { promises as fs, readdirSync, readFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { isAbsolute, join, resolve } from 'node:path';
import { boundLoops } from '../blockdev/loop.js';
import { EtcdLeases } from '../coordination/etcd-leases.js';
import { isUint, nameArg, need } from '../control/args.js';
import type { VolumeStatus } from '../control/protocol.js';
import { ControlServer } from '../control/server.js';
import { controlSocketPath, ensureRuntimeDir, nbdSocketPath } from '../control/runtime-dir.js';
import { reconcileUntilSettled, shutdown } from '../reconciler/agent.js';
import { AGENT_PID_FILE, AGENT_RUN_DIR, AGENT_VOLUME_DIR, runningAgentPid } from '../reconciler/agent-dir.js';
import type { ApplyOptions, ApplyReport, RetryPolicy } from '../reconciler/apply.js';
import { keyServiceForManifest } from '../reconciler/keys.js';
import type { Manifest } from '../reconciler/manifest.js';
import { desiredPools, desiredVolumes } from '../reconciler/plan.js';
import {
  type KeyPort,
  type LeasePort,
  MemoryKeyStore,
  type PoolTarget,
  type VolumeTarget,
} from '../reconciler/ports.js';
import { snapshotVolume } from '../reconciler/snapshot.js';
import { StateStore } from '../reconciler/state.js';
import { CryptmapError, EXIT_BUSY } from '../util/errors.js';
import { ensureTrustedDir, writeFileReplacing } from '../util/trusted-path.js';
import { type Logger, logger } from '../util/log.js';
import { DaemonCore } from './core.js';
import { daemonHandlers } from './handlers.js';
import { rewrapVolume, rotateVolumeKey } from './key-rotation.js';
import { DataPathPorts, detectServeMode, type Runner, runTool, type ServeMode } from './volume-ports.js';

export interface AgentHostOptions {
  manifest: Manifest;
  stateDir: string;
  bootId: string;
  /** Relative key-service file paths are resolved against it (default: the manifest's directory). */
  manifestDir?: string;
  /** `auto` (default): attach when root and possible, else NBD only. */
  serve?: 'auto' | 'nbd-only';
  forceSwap?: boolean;
  /** Mount absolute mountpoints under this directory instead of `/` (npm start: `.cryptmap/mnt`). */
  mountRoot?: string;
  /** Instead of the manifest's key service (tests). */
  keys?: KeyPort;
  /** This node's name in single-writer leases (default `<hostname>:<state dir>`). */
  node?: string;
  retry?: RetryPolicy;
  intervalMs?: number;
  /** Progress of the reconcile steps (see ApplyOptions.onStep). */
  onStep?: ApplyOptions['onStep'];
  run?: Runner;
  log?: Logger;
}

export class AgentHost {
  readonly stateDir: string;
  readonly runDir: string;
  readonly core: DaemonCore;
  readonly ports: DataPathPorts;
  #targets: VolumeTarget[];
  #pools: PoolTarget[];
  readonly mode: ServeMode;
  readonly modeReason: string | undefined;
  readonly keyServiceDescription: string;
  /** Set when the key service's root secret is exposed (the embedded default): shown at start. */
  readonly keyServiceWarning: string | undefined;
  readonly #opts: AgentHostOptions;
  readonly #store: StateStore;
  readonly #keys: KeyPort;
  readonly #closeKeys: () => Promise<void>;
  readonly #control: ControlServer;
  readonly #ephemeralKeys = new MemoryKeyStore();
  readonly #log: Logger;
  #stopped = false;
  /** Single-writer leases of shared volumes (manifest `coordination`), if any. */
  readonly leases: (LeasePort & { close(): Promise<void> }) | undefined;
  /** Reconciles run one at a time (start, SIGHUP, after a lease was lost). */
  #busy: Promise<unknown> = Promise.resolve();
  readonly #ac = new AbortController();
  /** The embedded key service reads its root secret files again (a root rotation). */
  readonly #reloadKeys: (() => Promise<void>) | undefined;

  private constructor(init: {
    opts: AgentHostOptions;
    stateDir: string;
    runDir: string;
    core: DaemonCore;
    ports: DataPathPorts;
    targets: VolumeTarget[];
    pools: PoolTarget[];
    mode: { mode: ServeMode; reason?: string };
    keys: KeyPort;
    closeKeys: () => Promise<void>;
    keyDescribe: string;
    keyWarning?: string | undefined;
    control: ControlServer;
    leases?: (LeasePort & { close(): Promise<void> }) | undefined;
    reloadKeys?: (() => Promise<void>) | undefined;
  }) {
    this.#opts = init.opts;
    this.stateDir = init.stateDir;
    this.runDir = init.runDir;
    this.core = init.core;
    this.ports = init.ports;
    this.#targets = init.targets;
    this.#pools = init.pools;
    this.mode = init.mode.mode;
    this.modeReason = init.mode.reason;
    this.#keys = init.keys;
    this.#closeKeys = init.closeKeys;
    this.keyServiceDescription = init.keyDescribe;
    this.keyServiceWarning = init.keyWarning;
    this.#control = init.control;
    this.#store = new StateStore(init.stateDir);
    this.#log = init.opts.log ?? logger('agent');
    this.leases = init.leases;
    this.#reloadKeys = init.reloadKeys;
  }

  /** Make the state and runtime dirs, serve NBD and the control socket, connect the key service. */
  static async start(opts: AgentHostOptions): Promise<AgentHost> {
    const log = opts.log ?? logger('agent');
    const stateDir = resolve(opts.stateDir);
    // Owned by root or us, 0700, and so is every directory above (never tightened: refused).
    ensureTrustedDir(stateDir, { code: 'ESTATEDIR', mode: 0o700, private: true });
    const runDir = join(stateDir, AGENT_RUN_DIR);
    ensureRuntimeDir(runDir);
    const other = runningAgentPid(stateDir);
    if (other !== undefined && other !== process.pid) {
      throw new CryptmapError('EAGENT_RUNNING', `another cryptmap agent (pid ${other}) uses ${stateDir}`, {
        exitCode: EXIT_BUSY,
        errno: 'EBUSY',
      });
    }
    const run = opts.run ?? runTool;
    await cleanStaleAttachments(join(runDir, 'attach'), run, log);
    const mode =
      opts.serve === 'nbd-only'
        ? { mode: 'nbd-only' as const, reason: 'served over NBD only (--nbd-only)' }
        : detectServeMode();
    const targets = desiredVolumes(opts.manifest, join(stateDir, AGENT_VOLUME_DIR)).map((t) =>
      rebaseMount(t, opts.mountRoot),
    );
    const core = new DaemonCore({ nbdSocketPath: nbdSocketPath(runDir), attachDir: join(runDir, 'attach') });
    // `agent.snapshot` is the agent's own operation (the plain daemon refuses it).
    let snapshotOp: (volume: string, name: string) => Promise<{ volume: string; name: string; thinId: number }> =
      async () => {
        throw new CryptmapError('EBUSY', 'the agent is starting', { errno: 'EBUSY' });
      };
    // The agent's own operations need the host (its targets and key service), made below.
    let self: AgentHost | undefined;
    const notYet = () => new CryptmapError('EBUSY', 'the agent is starting', { exitCode: EXIT_BUSY });
    const control = new ControlServer({
      ...daemonHandlers(core),
      'agent.snapshot': (a) =>
        snapshotOp(
          need<string>(a.volume, (x) => typeof x === 'string', 'volume'),
          need<string>(a.name, (x) => typeof x === 'string', 'name'),
        ),
      'agent.rotateKey': async (a) => {
        const id = nameArg(a.id, 'id');
        const hz =
          a.hotzoneBytes === undefined
            ? undefined
            : need<number>(a.hotzoneBytes, (x) => isUint(x) && (x as number) > 0, 'hotzoneBytes');
        if (!self) throw notYet();
        return self.rotateKey(id, hz === undefined ? {} : { hotzoneBytes: hz });
      },
      'agent.rewrapKeys': async () => {
        if (!self) throw notYet();
        return self.rewrapKeys();
      },
    });
    let keys: KeyPort;
    let closeKeys = async () => {};
    let reloadKeys: (() => Promise<void>) | undefined;
    let keyDescribe = 'given by the caller';
    let keyWarning: string | undefined;
    let leases: EtcdLeases | undefined;
    // Set once the host exists: a lease lost before that has nothing open to fence.
    let onLost: (volume: string, why: string, msLeft: number) => void = () => {};
    try {
      const coord = opts.manifest.coordination;
      if (coord) {
        leases = await EtcdLeases.connect({
          endpoints: coord.etcd,
          node: opts.node ?? `${hostname()}:${stateDir}`,
          ...(coord.ttl !== undefined ? { ttlSeconds: coord.ttl } : {}),
          ...(coord.prefix !== undefined ? { prefix: coord.prefix } : {}),
          ...etcdSecurity(coord, opts.manifestDir ?? manifestDirOf(opts.manifest)),
          onLost: (v, why, msLeft) => onLost(v, why, msLeft),
          log,
        });
      } else if (targets.some((t) => t.device !== undefined)) {
        log.warn(
          'volumes on shared storage without coordination: nothing stops two nodes from writing one at once (manifest coordination.etcd)',
        );
      }
      await control.listen(controlSocketPath(runDir));
      await core.listen();
      if (opts.keys) keys = opts.keys;
      else {
        const ks = await keyServiceForManifest(
          opts.manifest.keyService,
          stateDir,
          opts.manifestDir ?? manifestDirOf(opts.manifest),
        );
        keys = ks.keys;
        closeKeys = () => ks.close();
        if (ks.reloadRoots) reloadKeys = () => ks.reloadRoots!();
        keyDescribe = ks.describe;
        keyWarning = ks.warning;
      }
    } catch (e) {
      await control.close().catch(() => {});
      await core.shutdown().catch(() => {});
      await leases?.close().catch(() => {});
      throw e;
    }
    // A fresh file renamed over the name: a planted agent.pid link is replaced, never written through.
    writeFileReplacing(join(stateDir, AGENT_PID_FILE), `${process.pid}\n`, 0o600, { code: 'ESTATEDIR' });
    const portOpts: ConstructorParameters<typeof DataPathPorts>[0] = {
      core,
      mode: mode.mode,
      workDir: runDir,
      run,
      forceSwap: opts.forceSwap ?? false,
    };
    if (mode.reason) portOpts.nbdOnlyReason = mode.reason;
    const ports = new DataPathPorts(portOpts);
    log.info('agent started', {
      state: stateDir,
      nbd: core.nbdSocketPath,
      keys: keyDescribe,
      mode: mode.mode,
      ...(mode.reason ? { why: mode.reason } : {}),
    });
    if (keyWarning) log.warn(keyWarning);
    const host = new AgentHost({
      opts,
      stateDir,
      runDir,
      core,
      ports,
      targets,
      pools: desiredPools(opts.manifest, join(stateDir, AGENT_VOLUME_DIR)),
      mode,
      keys,
      closeKeys,
      keyDescribe,
      keyWarning,
      control,
      leases,
      reloadKeys,
    });
    onLost = (v, why, msLeft) => host.#fence(v, why, msLeft);
    snapshotOp = (v, n) => host.snapshot(v, n);
    self = host;
    return host;
  }

  /**
   * The lease of `id` is lost (etcd unreachable, or the lease expired): stop I/O to the volume now
   * (suspend, then close), then reconcile in the background, which takes the lease again when it is
   * free and waits while another node holds it.
   */
  #fence(id: string, why: string, msLeft: number): void {
    const t = this.#targets.find((x) => x.id === id);
    void (async () => {
      if (t) await this.ports.fence(t, why, msLeft);
      if (this.#stopped) return;
      await this.reconcile(this.#ac.signal).catch((e) =>
        this.#log.error('reconcile after a lost lease failed', { error: (e as Error).message }),
      );
    })();
  }

  /** `cryptmap volume rotate-key SERVICE/VOLUME`: a new volume key, reencrypted online (key-rotation.ts). */
  rotateKey(id: string, o: { hotzoneBytes?: number } = {}): Promise<VolumeStatus> {
    const t = this.#target(id);
    return rotateVolumeKey(this.core, this.#keys, t, o);
  }

  /**
   * `cryptmap volume rewrap-keys`: every persistent volume's keyslot moves to the key service's newest
   * root secret (key-rotation.ts); one failing volume does not stop the others (run it again).
   */
  async rewrapKeys(): Promise<Array<{ id: string; result: string; error?: string }>> {
    await this.#reloadKeys?.();
    const out: Array<{ id: string; result: string; error?: string }> = [];
    for (const t of this.#targets) {
      if (t.kind !== 'scratch' || t.class !== 'persistent') continue;
      try {
        const result = await rewrapVolume(this.#keys, t);
        out.push({ id: t.id, result });
        this.#log.info('volume keyslot rewrapped', { volume: t.id, result });
      } catch (e) {
        out.push({ id: t.id, result: 'failed', error: (e as Error).message });
        this.#log.error('volume keyslot rewrap failed', { volume: t.id, error: (e as Error).message });
      }
    }
    return out;
  }

  #target(id: string): VolumeTarget {
    const want = id.startsWith('scratch/') ? id : `scratch/${id}`;
    const t = this.#targets.find((x) => x.id === want);
    if (!t)
      throw new CryptmapError('ENOVOLUME', `no volume ${id} in the agent's manifest`, { exitCode: 4, errno: 'ENOENT' });
    return t;
  }

  /** The volumes the current manifest asks for. */
  get targets(): VolumeTarget[] {
    return this.#targets;
  }

  /** A snapshot of a volume in a thin pool (reconciler/snapshot.ts), between reconciles. */
  snapshot(volume: string, name: string): Promise<{ volume: string; name: string; thinId: number }> {
    const run = this.#busy.then(() =>
      snapshotVolume({ volume, name, store: this.#store, ports: this.ports, pools: this.#pools }),
    );
    this.#busy = run.catch(() => undefined);
    return run;
  }

  /** Take a new manifest (SIGHUP); the next reconcile applies it. The key service is kept. */
  setManifest(m: Manifest): void {
    this.#pools = desiredPools(m, join(this.stateDir, AGENT_VOLUME_DIR));
    this.#targets = desiredVolumes(m, join(this.stateDir, AGENT_VOLUME_DIR)).map((t) =>
      rebaseMount(t, this.#opts.mountRoot),
    );
  }

  #common() {
    const c = {
      store: this.#store,
      ports: this.ports,
      keys: this.#keys,
      ephemeralKeys: this.#ephemeralKeys,
      bootId: this.#opts.bootId,
      pools: this.#pools,
      poolPorts: this.ports,
      log: this.#log,
      ...(this.leases ? { leases: this.leases } : {}),
      ...(this.#opts.onStep ? { onStep: this.#opts.onStep } : {}),
    };
    return this.#opts.retry ? { ...c, retry: this.#opts.retry } : c;
  }

  /** Reconcile until nothing waits for the key service or a lease (or `signal` aborts); one at a time. */
  reconcile(signal?: AbortSignal): Promise<ApplyReport> {
    const sig = signal ? AbortSignal.any([signal, this.#ac.signal]) : this.#ac.signal;
    const run = this.#busy.then(() =>
      reconcileUntilSettled({
        ...this.#common(),
        targets: this.#targets,
        intervalMs: this.#opts.intervalMs ?? 5000,
        signal: sig,
      }),
    );
    this.#busy = run.catch(() => undefined);
    return run;
  }

  /** Tear every volume down (persistent kept), then stop serving. Idempotent. */
  async stop(): Promise<ApplyReport | undefined> {
    if (this.#stopped) return undefined;
    this.#stopped = true;
    this.#ac.abort();
    await this.#busy;
    let report: ApplyReport | undefined;
    try {
      this.ports.forceClose = true;
      report = await shutdown(this.#common());
    } finally {
      await this.ports.releaseAll();
      await this.#control.close().catch(() => {});
      await this.core.shutdown();
      await this.leases?.close().catch(() => {});
      this.#ephemeralKeys.clear();
      await this.#closeKeys().catch(() => {});
      await fs.rm(join(this.stateDir, AGENT_PID_FILE), { force: true });
      this.#log.info('agent stopped', { state: this.stateDir });
    }
    return report;
  }
}

/** The manifest's etcd TLS files and password file, as EtcdLeases takes them (paths relative to the manifest's directory). */
function etcdSecurity(
  c: NonNullable<Manifest['coordination']>,
  dir: string,
): Pick<Parameters<typeof EtcdLeases.connect>[0], 'tls' | 'auth'> {
  const out: Pick<Parameters<typeof EtcdLeases.connect>[0], 'tls' | 'auth'> = {};
  if (c.tls) {
    out.tls = { caFile: resolve(dir, c.tls.ca) };
    if (c.tls.cert !== undefined) out.tls.certFile = resolve(dir, c.tls.cert);
    if (c.tls.key !== undefined) out.tls.keyFile = resolve(dir, c.tls.key);
  }
  if (c.user !== undefined && c.passwordFile !== undefined)
    out.auth = { user: c.user, passwordFile: resolve(dir, c.passwordFile) };
  return out;
}

function manifestDirOf(m: Manifest): string {
  return m.file.startsWith('(') ? process.cwd() : resolve(m.file, '..');
}

/** `/srv/db` under `root` -> `<root>/srv/db` (npm start keeps everything under ./.cryptmap). */
function rebaseMount(t: VolumeTarget, root: string | undefined): VolumeTarget {
  if (root === undefined || t.mountpoint === undefined) return t;
  const mp = isAbsolute(t.mountpoint) ? t.mountpoint.slice(1) : t.mountpoint;
  return { ...t, mountpoint: join(resolve(root), mp) };
}

/**
 * After a crash the kernel may still hold what the dead agent attached: mounts and swap on loop
 * devices over nbdfuse files in `<run>/attach/nbdfuse-*` or the built-in FUSE export's `fuse-*`. Undo them (lazy unmount: the server they
 * need is gone) so the volumes can be attached again. Best effort; logs what it does.
 */
export async function cleanStaleAttachments(attachDir: string, run: Runner, log: Logger): Promise<void> {
  let dirs: string[];
  try {
    dirs = readdirSync(attachDir).filter((d) => d.startsWith('nbdfuse-') || d.startsWith('fuse-'));
  } catch {
    return;
  }
  if (dirs.length === 0) return;
  const loops = boundLoops();
  const mountLines = (): string[][] => {
    try {
      return readFileSync('/proc/self/mounts', 'utf8')
        .split('\n')
        .filter(Boolean)
        .map((l) => l.split(' '));
    } catch {
      return [];
    }
  };
  for (const d of dirs) {
    const dir = join(attachDir, d);
    for (const l of loops.filter((x) => x.backing.startsWith(`${dir}/`))) {
      for (const m of mountLines().filter((x) => x[0] === l.dev)) {
        log.warn('stale mount from a previous run: lazy unmount', { device: l.dev, mountpoint: m[1] });
        await run('umount', ['-l', m[1] ?? '']).catch(() => {});
      }
      await run('swapoff', [l.dev]).catch(() => {});
      log.warn('stale loop device from a previous run: detaching', { device: l.dev });
      await run('losetup', ['-d', l.dev]).catch(() => {});
    }
    const mnt = join(dir, 'mnt');
    if (mountLines().some((x) => x[1] === mnt)) await run('fusermount3', ['-u', '-z', mnt]).catch(() => {});
    await fs.rm(dir, { recursive: true, force: true }).catch(() => {});
  }
}
