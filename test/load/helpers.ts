/**
 * Helpers for the load and secret-hygiene suites: run the compiled CLI (`<dist>/src/cli/entry.js`)
 * as child processes, start/kill a `cryptmap daemon`, read a process's peak RSS, check tools.
 * Every spawned argv is recorded in `spawnedArgv` so the secrets suite can grep it.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { ControlClient } from '../../src/control/client.js';

export const ENTRY = new URL('../../src/cli/entry.js', import.meta.url).pathname;

/** Every argv this helper spawned (the command and its arguments). */
export const spawnedArgv: string[][] = [];
/** Every byte of stdout/stderr the CLIs and daemons printed. */
export const spawnedOutput: string[] = [];

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Run `cryptmap ARGS...`; resolves with its exit code and output. */
export function cli(args: string[], opts: { env?: NodeJS.ProcessEnv; input?: string } = {}): Promise<CliResult> {
  const argv = [process.execPath, ENTRY, ...args];
  spawnedArgv.push(argv);
  return new Promise((resolve, reject) => {
    const child = spawn(argv[0] as string, argv.slice(1), {
      env: { ...process.env, ...opts.env },
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code) => {
      spawnedOutput.push(stdout, stderr);
      resolve({ code: code ?? 1, stdout, stderr });
    });
    child.stdin.end(opts.input ?? '');
  });
}

/** `cli` that must succeed. */
export async function cliOk(
  args: string[],
  opts: { env?: NodeJS.ProcessEnv; input?: string } = {},
): Promise<CliResult> {
  const r = await cli(args, opts);
  if (r.code !== 0) throw new Error(`cryptmap ${args[0]} exited ${r.code}: ${r.stderr}`);
  return r;
}

export interface Daemon {
  child: ChildProcess;
  pid: number;
  output(): string;
  /** SIGTERM and wait for a clean exit. */
  stop(): Promise<number | null>;
  /** SIGKILL (no cleanup) and wait. */
  kill(): Promise<void>;
}

/** Start `cryptmap daemon --runtime-dir DIR` and wait until it answers a ping. */
export async function startDaemon(dir: string, env: NodeJS.ProcessEnv = {}): Promise<Daemon> {
  const argv = [process.execPath, ENTRY, 'daemon', '--runtime-dir', dir];
  spawnedArgv.push(argv);
  const child = spawn(argv[0] as string, argv.slice(1), {
    env: { ...process.env, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  child.stdout?.on('data', (d) => (out += d));
  child.stderr?.on('data', (d) => (out += d));
  const exited = new Promise<number | null>((r) => child.on('exit', (code) => r(code)));
  for (let i = 0; ; i++) {
    if (child.exitCode !== null) throw new Error(`daemon exited ${child.exitCode}: ${out}`);
    try {
      const c = await ControlClient.connect(dir);
      await c.call('daemon.ping');
      c.close();
      break;
    } catch (e) {
      if (i > 200) throw new Error(`daemon did not answer within 20 s: ${String(e)} ${out}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  return {
    child,
    pid: child.pid as number,
    output: () => out,
    async stop() {
      child.kill('SIGTERM');
      const c = await exited;
      spawnedOutput.push(out);
      return c;
    },
    async kill() {
      child.kill('SIGKILL');
      await exited;
      spawnedOutput.push(out);
    },
  };
}

/** Peak resident set size of a live process (VmHWM), in bytes. */
export function peakRssBytes(pid: number): number {
  const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) * 1024 : 0;
}

/** `volume.status` of `name` from the daemon at runtime dir `run`. */
export async function volumeStatus(run: string, name: string) {
  const c = await ControlClient.connect(run);
  try {
    return await c.call('volume.status', { name });
  } finally {
    c.close();
  }
}

/** The whole of volume `name` (`bytes` long) as an NBD client reads it (nbdcopy of its export). */
export async function readVolume(run: string, name: string, bytes: number): Promise<Buffer> {
  const st = await volumeStatus(run, name);
  const r = spawnSync('nbdcopy', [st.nbdUri, '-'], { maxBuffer: 2 * bytes, timeout: 120_000 });
  assert.equal(r.status, 0, String(r.stderr));
  return r.stdout;
}
