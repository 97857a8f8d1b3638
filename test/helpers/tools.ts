/**
 * External tools in tests: `requireTool` fails (never skips) when one is missing, naming the Debian
 * package; `runTool` / `mustRun` run one with its output captured and a deadline (asynchronously: a
 * server under test may live in this process, so never spawnSync it).
 */
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { constants } from 'node:os';
import { debianPackage } from '../../src/util/tools.js';

/** Packages of the tools only the tests run (the tools cryptmap itself runs are in src/util/tools.ts). */
const TEST_PACKAGES: Record<string, string> = {
  cryptsetup: 'cryptsetup-bin',
  nbdinfo: 'libnbd-bin',
  nbdcopy: 'libnbd-bin',
  nbdsh: 'python3-libnbd',
  'qemu-io': 'qemu-utils',
  'qemu-img': 'qemu-utils',
  'qemu-nbd': 'qemu-utils',
  fio: 'fio',
  openssl: 'openssl',
  nbdkit: 'nbdkit',
  'nbd-server': 'nbd-server',
  python3: 'python3',
  'systemd-notify': 'systemd',
  'systemd-analyze': 'systemd',
  thin_check: 'thin-provisioning-tools',
  thin_dump: 'thin-provisioning-tools',
  thin_restore: 'thin-provisioning-tools',
};

/** The Debian package that provides `tool`. */
export function packageOf(tool: string): string {
  return TEST_PACKAGES[tool] ?? debianPackage(tool);
}

/** The failure message for a missing tool. */
export function missingTool(tool: string): string {
  return `${tool} is not installed: install the Debian package ${packageOf(tool)} (scripts/install-deps.sh)`;
}

const found = new Set<string>();

/** Throws (never skips) when `tool` is not on PATH, naming its Debian package. Looked up once a process. */
export function requireTool(tool: string): void {
  if (found.has(tool)) return;
  const r = spawnSync('sh', ['-c', 'command -v "$1"', 'sh', tool], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(missingTool(tool));
  found.add(tool);
}

export interface RunResult {
  /** The exit code; 128 + the signal's number when a signal ended it (as a shell says), so a kill is never 0. */
  code: number;
  /** The signal that ended it (the deadline's SIGKILL among them), or null. */
  signal: NodeJS.Signals | null;
  stdout: string;
  /** stdout as bytes (binary output: nbdcopy to `-`). */
  stdoutBytes: Buffer;
  stderr: string;
}

export interface RunOptions {
  /** Written to its stdin, which is then closed (closed at once without). */
  input?: Buffer | string;
  /** Killed (SIGKILL) after this many milliseconds (default 120 s). */
  timeoutMs?: number;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
}

/**
 * The one way tests run a tool: asynchronously (a server under test may live in this process), its
 * output captured, with a deadline; rejects naming the Debian package when `cmd` is not installed.
 */
export async function runTool(cmd: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  if (!cmd.includes('/')) requireTool(cmd);
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      stdio: ['pipe', 'pipe', 'pipe'],
      env: opts.env ?? process.env,
      ...(opts.cwd !== undefined ? { cwd: opts.cwd } : {}),
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (d: Buffer) => out.push(d));
    child.stderr.on('data', (d: Buffer) => err.push(d));
    const t = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 120_000);
    child.on('error', (e) => {
      clearTimeout(t);
      reject(e);
    });
    child.on('close', (code, signal) => {
      clearTimeout(t);
      const stdoutBytes = Buffer.concat(out);
      resolve({
        code: code ?? 128 + (signal ? (constants.signals[signal] ?? 0) : 0),
        signal,
        stdout: stdoutBytes.toString('utf8'),
        stdoutBytes,
        stderr: Buffer.concat(err).toString('utf8'),
      });
    });
    child.stdin.on('error', () => {});
    if (opts.input !== undefined) child.stdin.end(opts.input);
    else child.stdin.end();
  });
}

/** Run and assert exit 0, returning stdout. */
export async function mustRun(cmd: string, args: string[], opts: RunOptions = {}): Promise<string> {
  const r = await runTool(cmd, args, opts);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.code}: ${r.stderr}${r.stdout}`);
  return r.stdout;
}

/** What `cryptsetupSync` returns: the exit status (null when a signal or the deadline ended it) and stdout + stderr. */
export interface CryptsetupResult {
  status: number | null;
  out: string;
}

/**
 * Real cryptsetup (the oracle), run synchronously with stdout and stderr together, for tests whose
 * server or daemon under test runs in another process (in-process servers need `runTool`). Fails,
 * naming the Debian package, when cryptsetup does not run; killed after `timeoutMs` (default 120 s).
 */
export function cryptsetupSync(args: string[], opts: { cwd?: string; timeoutMs?: number } = {}): CryptsetupResult {
  requireTool('cryptsetup');
  const r = spawnSync('cryptsetup', args, {
    encoding: 'utf8',
    timeout: opts.timeoutMs ?? 120_000,
    ...(opts.cwd !== undefined ? { cwd: opts.cwd } : {}),
  });
  if (r.error) throw new Error(`cryptsetup ${args.join(' ')} did not run: ${r.error.message}`);
  return { status: r.status, out: `${r.stdout}${r.stderr}` };
}

/**
 * Real cryptsetup's `reencrypt --force-offline-reencrypt -q` (on files, without device-mapper) with
 * `args`, which must succeed (exit 0, else its output is the failure).
 */
export function cryptsetupReencrypt(args: string[], opts: { timeoutMs?: number } = {}): void {
  const r = cryptsetupSync(['reencrypt', '--force-offline-reencrypt', '-q', ...args], opts);
  assert.equal(r.status, 0, r.out);
}

/**
 * The volume key real cryptsetup dumps (`luksDump --dump-volume-key --batch-mode --key-file KEY ... DEVICE`);
 * `extra` goes before the device (e.g. `--header H`). Fails with cryptsetup's output when it dumps none.
 */
export function cryptsetupVolumeKey(keyFile: string, device: string, extra: string[] = []): Buffer {
  const r = cryptsetupSync(['luksDump', '--dump-volume-key', '--batch-mode', '--key-file', keyFile, ...extra, device]);
  const m = /MK dump:\t([\s\S]*)$/.exec(r.out);
  if (r.status !== 0 || !m) throw new Error(`cryptsetup dumped no volume key (exit ${r.status}):\n${r.out}`);
  return Buffer.from(m[1]!.replace(/\s/g, ''), 'hex');
}

/**
 * Real cryptsetup started with `args` (a reencryption, say) and killed -9 as soon as `luksDump HEADER`
 * matches `progress`: a crash mid-way, as far as the header shows. Looks every 20 ms, 600 times at the
 * most; the caller checks that the header still shows the work unfinished (it may have finished first).
 */
export async function cryptsetupKilledWhen(args: string[], header: string, progress: RegExp): Promise<void> {
  requireTool('cryptsetup');
  const child = spawn('cryptsetup', args, { stdio: 'ignore' });
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  for (let i = 0; i < 600; i++) {
    if (progress.test(cryptsetupSync(['luksDump', header]).out)) break;
    await new Promise((r) => setTimeout(r, 20));
  }
  child.kill('SIGKILL');
  await exited;
}
