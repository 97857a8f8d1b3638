/**
 * Shared by the CLI interop tests: run a command and collect its output, and a `cryptmap daemon`
 * child in a fresh 0700 temp dir that starts before the file's tests and gets SIGTERM after them.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { chmodSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before } from 'node:test';
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
    f.dir = mkdtempSync(join(tmpdir(), prefix));
    chmodSync(f.dir, 0o700);
    f.run = join(f.dir, 'run');
    daemon = spawn(process.execPath, [ENTRY, 'daemon', '--runtime-dir', f.run], { stdio: ['ignore', 'pipe', 'pipe'] });
    daemon.stderr?.on('data', (d) => {
      f.log += d.toString();
    });
    for (let i = 0; i < 100; i++) {
      try {
        (await ControlClient.connect(f.run)).close();
        return;
      } catch {
        await new Promise((r) => setTimeout(r, 100));
      }
    }
    throw new Error(`daemon did not start: ${f.log}`);
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
