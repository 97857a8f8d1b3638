/**
 * Real NBD servers (nbdkit, qemu-nbd) in the foreground on fresh Unix sockets, for the NBD client
 * tests: started before use, killed after the file's tests, restartable on the same socket.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, rmSync, statSync } from 'node:fs';
import { makeTempDir } from '../helpers/tmp.js';
import { connect } from 'node:net';
import { join } from 'node:path';
import { after } from 'node:test';
import { requireTool } from '../helpers/tools.js';

export interface RunningServer {
  sock: string;
  proc: ChildProcess;
  /** SIGTERM and wait. */
  stop(): Promise<void>;
  /** SIGKILL and wait (a crash: nothing flushed). */
  kill(): Promise<void>;
}

/**
 * A temp dir for this test file and a starter that cleans up every server it started. `start`
 * passes `args` the path it waits for: the Unix socket, or a pid file for a TCP server.
 */
export function useServers(prefix: string): {
  dir: string;
  start(cmd: string, args: (sock: string) => string[], sock?: string): Promise<RunningServer>;
} {
  const { dir, cleanup: removeDir } = makeTempDir(prefix);
  const children = new Set<ChildProcess>();
  let n = 0;
  after(() => {
    for (const c of children) c.kill('SIGKILL');
    removeDir();
  });
  async function start(cmd: string, args: (sock: string) => string[], sockIn?: string): Promise<RunningServer> {
    requireTool(cmd);
    const sock = sockIn ?? join(dir, `s${n++}.sock`);
    rmSync(sock, { force: true });
    const proc = spawn(cmd, args(sock), { stdio: ['ignore', 'ignore', 'pipe'] });
    children.add(proc);
    let err = '';
    proc.stderr!.on('data', (d: Buffer) => (err += d.toString()));
    const t0 = Date.now();
    while (!existsSync(sock)) {
      if (proc.exitCode !== null) throw new Error(`${cmd} exited ${proc.exitCode}: ${err}`);
      if (Date.now() - t0 > 15_000) throw new Error(`${cmd} did not listen on ${sock}: ${err}`);
      await new Promise((r) => setTimeout(r, 20));
    }
    // The socket file appears at bind(), before listen(): a connect in between is refused. Wait
    // until one is accepted (qemu-nbd, seen in CI), so a test never races the server's start. A TCP
    // server is waited for through its pid file, which nbdkit writes once it listens.
    while (statSync(sock).isSocket() && !(await accepts(sock))) {
      if (proc.exitCode !== null) throw new Error(`${cmd} exited ${proc.exitCode}: ${err}`);
      if (Date.now() - t0 > 15_000) throw new Error(`${cmd} did not accept connections on ${sock}: ${err}`);
      await new Promise((r) => setTimeout(r, 20));
    }
    const end = async (sig: NodeJS.Signals) => {
      if (proc.exitCode === null && proc.signalCode === null) {
        const done = new Promise((r) => proc.once('exit', r));
        proc.kill(sig);
        await done;
      }
      children.delete(proc);
    };
    return { sock, proc, stop: () => end('SIGTERM'), kill: () => end('SIGKILL') };
  }
  return { dir, start };
}

/** One connection attempt on a Unix socket: true when the server accepted it (closed at once). */
function accepts(sock: string): Promise<boolean> {
  return new Promise((done) => {
    const c = connect(sock);
    c.once('connect', () => {
      c.destroy();
      done(true);
    });
    c.once('error', () => done(false));
  });
}
