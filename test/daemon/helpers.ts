/**
 * Test helpers shared by the daemon and reconciler (agent) tests: a CliIO that captures output, and
 * the cleanup of kernel state (mounts, loop devices) a failed root test may leave under its dir.
 */
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { PassThrough } from 'node:stream';

/** A CliIO whose stdout and stderr are collected (stdin never ends). */
export function captureIO() {
  const out: string[] = [];
  const err: string[] = [];
  const sink = (arr: string[]) => {
    const s = new PassThrough();
    s.on('data', (c: Buffer) => arr.push(c.toString()));
    return s;
  };
  return {
    io: { stdin: new PassThrough(), stdout: sink(out), stderr: sink(err), env: {} },
    out: () => out.join(''),
    err: () => err.join(''),
  };
}

/** Whatever a failed test left under `dir`: lazy unmounts (deepest first), then loop devices. */
export function cleanupKernelState(dir: string): void {
  const mounts = readFileSync('/proc/self/mounts', 'utf8')
    .split('\n')
    .map((l) => l.split(' '))
    .filter((f) => f[1]?.startsWith(dir));
  for (const m of mounts.reverse()) {
    try {
      execFileSync('umount', ['-l', m[1]!]);
    } catch {}
  }
  for (const l of execFileSync('losetup', ['-a'], { encoding: 'utf8' })
    .split('\n')
    .filter((x) => x.includes(dir))) {
    try {
      execFileSync('losetup', ['-d', l.split(':')[0]!]);
    } catch {}
  }
}
