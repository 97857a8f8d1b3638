/**
 * A hostile second local user for the local-attacker tests (issue 11): a real account
 * (`cryptmap-attacker`, created with useradd when absent) whose commands run through
 * `setpriv --reuid --regid --clear-groups`, so the kernel, not the test, decides what it may do.
 * The tests need root (CI runs as root); elsewhere they are skipped with this printed reason.
 */
import { type ChildProcess, spawn, spawnSync, type SpawnSyncReturns } from 'node:child_process';
import { chmodSync, chownSync } from 'node:fs';
import { makeTempDir } from '../helpers/tmp.js';

export const ATTACKER = 'cryptmap-attacker';

/** `skip` option for tests that need root: a reason outside CI, never a silent skip. */
export const NEEDS_ROOT: string | false =
  process.getuid?.() !== 0 && !process.env.CI ? 'needs root to act as a second local user (CI runs as root)' : false;

export interface Attacker {
  uid: number;
  gid: number;
  /** Run a shell script as the attacker; returns its result (never throws). */
  sh(script: string): SpawnSyncReturns<string>;
  /** Run `node -e script` as the attacker in the background. */
  node(script: string, args?: string[]): ChildProcess;
  /** A fresh directory under /tmp owned by the attacker (mode 0755 unless given). */
  dir(mode?: number): string;
}

function idOf(flag: '-u' | '-g'): number | undefined {
  const r = spawnSync('id', [flag, ATTACKER], { encoding: 'utf8' });
  return r.status === 0 ? Number(r.stdout.trim()) : undefined;
}

let cached: Attacker | undefined;

/** The attacker account (created on first use). Throws when it cannot be made. */
export function attacker(): Attacker {
  if (cached) return cached;
  for (let i = 0; idOf('-u') === undefined; i++) {
    // Another test file may be creating it at the same moment: retry while /etc/passwd is locked.
    const r = spawnSync(
      'useradd',
      [
        '--system',
        '--no-create-home',
        '--home-dir',
        '/nonexistent',
        '--shell',
        '/usr/sbin/nologin',
        '--user-group',
        ATTACKER,
      ],
      { encoding: 'utf8' },
    );
    if (r.error || (r.status !== 0 && i > 20))
      throw new Error(`useradd ${ATTACKER} failed: ${r.error?.message ?? r.stderr}`);
    if (r.status !== 0) spawnSync('sleep', ['0.2']);
  }
  const uid = idOf('-u') as number;
  const gid = idOf('-g') as number;
  const priv = ['--reuid', String(uid), '--regid', String(gid), '--clear-groups'];
  cached = {
    uid,
    gid,
    sh(script) {
      return spawnSync('setpriv', [...priv, '/bin/sh', '-c', script], { encoding: 'utf8', timeout: 20_000, cwd: '/' });
    },
    node(script, args = []) {
      return spawn('setpriv', [...priv, process.execPath, '-e', script, ...args], {
        stdio: ['ignore', 'pipe', 'pipe'],
        cwd: '/',
      });
    },
    dir(mode = 0o755) {
      const d = makeTempDir('cm-attacker-').dir;
      chownSync(d, uid, gid);
      chmodSync(d, mode);
      return d;
    },
  };
  return cached;
}

/** Wait until `child` prints `line` on stdout (e.g. LISTENING). */
export function waitForLine(child: ChildProcess, line: string, timeoutMs = 10_000): Promise<void> {
  return new Promise((resolve, reject) => {
    let out = '';
    const t = setTimeout(() => reject(new Error(`no '${line}' within ${timeoutMs} ms: ${out}`)), timeoutMs);
    child.stdout?.on('data', (d) => {
      out += d;
      if (out.includes(line)) {
        clearTimeout(t);
        resolve();
      }
    });
    child.stderr?.on('data', (d) => (out += d));
    child.on('exit', (c) => {
      clearTimeout(t);
      reject(new Error(`attacker process exited ${c} before '${line}': ${out}`));
    });
  });
}
