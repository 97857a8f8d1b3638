/**
 * A real single-node Ceph cluster for tests (issue 15 item 3): scripts/ceph-mini.sh starts
 * ceph-mon + ceph-osd (bluestore on a sparse file) in a private directory and exports RBD images
 * over NBD with qemu-nbd's rbd driver. Missing packages fail the test with the script's message
 * (scripts/install-deps.sh installs them); every call has a deadline.
 */
import { execFile } from 'node:child_process';
import { closeSync, constants, openSync, readFileSync, rmSync, unlinkSync } from 'node:fs';
import { makeTempDir } from '../helpers/tmp.js';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before } from 'node:test';

export const CEPH_SCRIPT = new URL('../../../scripts/ceph-mini.sh', import.meta.url).pathname;

/** Deadline for one script call (`up` from scratch takes 2-10 s; a loaded CI machine more). */
const SCRIPT_TIMEOUT_MS = 180_000;

export interface Ceph {
  /** The cluster's directory (short: it holds the NBD sockets). */
  readonly dir: string;
  /** NBD URI of the 1 GiB image rbd/img. */
  readonly uri: string;
  /** Create (if missing) and export POOL/IMAGE of SIZE (`256M`); resolves its NBD URI. */
  exportImage(spec: string, size: string): Promise<string>;
  /** Restart whatever of the cluster is not running and re-export every image. */
  up(): Promise<void>;
  /** SIGKILL one daemon (`osd.0`, `mon.a`, `nbd.rbd.img`) and wait until it is gone. */
  kill(name: string): Promise<void>;
  /** Stop everything and delete the directory. */
  down(): Promise<void>;
}

/** Run scripts/ceph-mini.sh; its stdout, or a rejection with its stderr. */
export function cephMini(args: string[], timeoutMs = SCRIPT_TIMEOUT_MS): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(
      'bash',
      [CEPH_SCRIPT, ...args],
      { encoding: 'utf8', timeout: timeoutMs, killSignal: 'SIGKILL' },
      (err, stdout, stderr) => {
        if (err)
          reject(
            new Error(
              `ceph-mini.sh ${args.join(' ')} failed (${err.killed ? `no answer in ${timeoutMs} ms` : `exit ${String(err.code)}`}): ${stderr.trim()}`,
            ),
          );
        else resolve(stdout);
      },
    );
  });
}

/** A directory for the cluster: /dev/shm when its tmpfs takes O_DIRECT (bluestore needs it), else the temp dir. */
function clusterDir(prefix: string): string {
  for (const base of ['/dev/shm', tmpdir()]) {
    let probe: string | undefined;
    try {
      const d = makeTempDir(prefix, base).dir;
      probe = join(d, '.odirect');
      closeSync(openSync(probe, constants.O_CREAT | constants.O_WRONLY | constants.O_DIRECT, 0o600));
      unlinkSync(probe);
      return d;
    } catch {
      if (probe) rmSync(join(probe, '..'), { recursive: true, force: true });
    }
  }
  return makeTempDir(prefix).dir;
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.split(') ')[1]?.[0] !== 'Z';
  } catch {
    return false;
  }
}

/** Start a cluster now. */
export async function startCeph(prefix = 'cm-ceph-'): Promise<Ceph> {
  const dir = clusterDir(prefix);
  let uri: string;
  try {
    uri = (await cephMini(['up', dir])).split('\n')[0]!.trim();
  } catch (e) {
    await cephMini(['down', dir], 60_000).catch(() => undefined);
    rmSync(dir, { recursive: true, force: true });
    throw e;
  }
  return {
    dir,
    uri,
    async exportImage(spec, size) {
      return (await cephMini(['export', dir, spec, size])).trim();
    },
    async up() {
      await cephMini(['up', dir]);
    },
    async kill(name) {
      const pid = Number(readFileSync(join(dir, 'run', `${name}.pid`), 'utf8').trim());
      if (!Number.isInteger(pid) || pid <= 1) throw new Error(`no pid for ${name}`);
      process.kill(pid, 'SIGKILL');
      const t0 = Date.now();
      while (pidAlive(pid)) {
        if (Date.now() - t0 > 10_000) throw new Error(`${name} (pid ${pid}) still there 10 s after SIGKILL`);
        await new Promise((r) => setTimeout(r, 20));
      }
    },
    async down() {
      await cephMini(['down', dir], 60_000);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** A cluster for this test file: started before its tests, torn down after them. */
export function useCeph(prefix = 'cm-ceph-'): { readonly c: Ceph } {
  const holder: { c: Ceph } = {} as { c: Ceph };
  before(async () => {
    holder.c = await startCeph(prefix);
  });
  after(async () => {
    await holder.c?.down();
  });
  return holder;
}
