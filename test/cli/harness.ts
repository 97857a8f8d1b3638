/**
 * Shared by the CLI interop tests: run a command and collect its output, and a `cryptmap daemon`
 * child in a fresh 0700 temp dir that starts before the file's tests and gets SIGTERM after them.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { rmSync } from 'node:fs';
import { makeTempDir } from '../helpers/tmp.js';
import { join } from 'node:path';
import { after, before } from 'node:test';
import { pollUntil } from '../helpers/wait.js';
import { ControlClient } from '../../src/control/client.js';
import { type RunResult, runTool } from '../helpers/tools.js';

export const ENTRY = new URL('../../src/cli/entry.js', import.meta.url).pathname;

export type { RunResult as Result } from '../helpers/tools.js';

/** Run `cmd` (stdin: `input`, then EOF) and collect its exit code and output; a missing tool rejects naming its package. */
export function exec(cmd: string, args: string[], input?: string | Buffer): Promise<RunResult> {
  return runTool(cmd, args, { input: input ?? '' });
}

/** `exec` that must succeed; its stdout. */
export async function ok(cmd: string, args: string[]): Promise<string> {
  const r = await exec(cmd, args);
  assert.equal(r.code, 0, `${cmd} ${args.join(' ')} failed: ${r.stderr}`);
  return r.stdout;
}

/** The cryptmap CLI in a child process. */
export function cryptmap(args: string[], input?: string | Buffer): Promise<RunResult> {
  return exec(process.execPath, [ENTRY, ...args], input);
}

export interface DaemonFixture {
  /** The temp dir of this test file (0700), removed afterwards. */
  readonly dir: string;
  /** The daemon's runtime dir (`--runtime-dir`). */
  readonly run: string;
  /** What the daemon wrote to stderr so far. */
  readonly log: string;
}

/** Registers before/after hooks: a temp dir and a `cryptmap daemon` serving from `<dir>/run`. */
export function useDaemon(prefix: string): DaemonFixture {
  const f = { dir: '', run: '', log: '' };
  let daemon: ChildProcess | undefined;
  before(async () => {
    f.dir = makeTempDir(prefix).dir;
    f.run = join(f.dir, 'run');
    daemon = spawn(process.execPath, [ENTRY, 'daemon', '--runtime-dir', f.run], { stdio: ['ignore', 'pipe', 'pipe'] });
    daemon.stderr?.on('data', (d) => {
      f.log += d.toString();
    });
    const c = await pollUntil(() => ControlClient.connect(f.run), {
      deadlineMs: 10_000,
      intervalMs: 100,
      what: 'the daemon to start',
      detail: () => f.log,
    });
    c.close();
  });
  after(async () => {
    if (daemon && daemon.exitCode === null) {
      const d = daemon;
      const exited = new Promise((r) => d.once('exit', r));
      d.kill('SIGTERM');
      await exited;
    }
    if (f.dir) rmSync(f.dir, { recursive: true, force: true });
  });
  return f;
}
