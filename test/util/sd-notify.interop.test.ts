/**
 * systemd readiness (issue 18 item 1): the datagrams util/sd-notify.ts sends, checked on a fake
 * NOTIFY_SOCKET and against what systemd's own `systemd-notify` sends; `cryptmap daemon` and
 * `cryptmap keyd` as processes (READY=1 once they answer, STOPPING=1 on SIGTERM); the daemon's control
 * socket passed by `systemd-socket-activate` (socket activation as the .socket unit does it).
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, lstatSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { pollUntil } from '../helpers/wait.js';
import { makeTempDir } from '../helpers/tmp.js';
import { runTool } from '../helpers/tools.js';
import { ControlClient } from '../../src/control/client.js';
import { listenFds, sdNotifier, sdNotifyMessage } from '../../src/util/sd-notify.js';
import { type NotifySocket, notifySocket } from './notify-socket.js';

const ENTRY = new URL('../../src/cli/entry.js', import.meta.url).pathname;
const { dir, cleanup } = makeTempDir('cryptmap-sdnotify-');
const children: ChildProcess[] = [];
after(() => {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  cleanup();
});

function exitOf(c: ChildProcess, ms = 60_000): Promise<number | null> {
  if (c.exitCode !== null || c.signalCode !== null) return Promise.resolve(c.exitCode);
  return new Promise((res, rej) => {
    const t = setTimeout(() => rej(new Error(`process ${c.pid} did not exit in ${ms} ms`)), ms);
    c.once('exit', (code) => {
      clearTimeout(t);
      res(code);
    });
  });
}

/** A datagram `pred` accepts; fails at once with the process's output when the process exits first. */
function expectFrom(
  rx: NotifySocket,
  p: { child: ChildProcess; log: () => string },
  pred: (m: string) => boolean,
  from = 0,
): Promise<string> {
  const died = new Promise<never>((_, rej) => {
    p.child.once('exit', (code) =>
      rej(
        new Error(
          `process exited (${code}) before the datagram; its output:\n${p.log()}\ndatagrams: ${JSON.stringify(rx.messages)}`,
        ),
      ),
    );
  });
  died.catch(() => undefined);
  return Promise.race([rx.next(pred, 60_000, from), died]);
}

function start(cmd: string, args: string[], env: NodeJS.ProcessEnv): { child: ChildProcess; log: () => string } {
  const child = spawn(cmd, args, {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, CRYPTMAP_RUNTIME_DIR: join(dir, 'unused-run'), ...env },
  });
  children.push(child);
  let log = '';
  child.stdout!.on('data', (d: Buffer) => {
    log += d.toString();
  });
  child.stderr!.on('data', (d: Buffer) => {
    log += d.toString();
  });
  return { child, log: () => log };
}

test('without NOTIFY_SOCKET every call is a no-op; LISTEN_FDS for another pid is not ours', () => {
  const sd = sdNotifier({});
  assert.equal(sd.enabled, false);
  assert.equal(sd.watchdogMs, 0);
  sd.ready('x');
  sd.status('y');
  sd.stopping();
  sd.close();
  const env: NodeJS.ProcessEnv = { LISTEN_PID: String(process.pid + 1), LISTEN_FDS: '1', LISTEN_FDNAMES: 'control' };
  assert.deepEqual(listenFds(env), []);
  assert.equal(env.LISTEN_FDS, undefined, 'the LISTEN_* variables are removed so children do not inherit them');
});

test('datagrams on a path socket: READY=1 with STATUS= and MAINPID=, one-line STATUS, RELOADING, STOPPING', async () => {
  const rx = await notifySocket(join(dir, 'notify-path.sock'));
  try {
    const sd = sdNotifier({ NOTIFY_SOCKET: rx.address });
    assert.equal(sd.enabled, true);
    sd.ready('serving 2 volumes');
    sd.status('line one\nline two');
    sd.reloading('reloading');
    sd.stopping('bye');
    sd.ready('ignored after STOPPING');
    await rx.next((m) => m.startsWith('STOPPING=1'));
    assert.deepEqual(rx.messages, [
      `READY=1\nSTATUS=serving 2 volumes\nMAINPID=${process.pid}`,
      'STATUS=line one line two',
      'RELOADING=1\nSTATUS=reloading',
      'STOPPING=1\nSTATUS=bye',
    ]);
  } finally {
    rx.close();
  }
});

test('an @abstract NOTIFY_SOCKET and the watchdog pings every half WATCHDOG_USEC', async () => {
  const rx = await notifySocket(`@cryptmap-test-${process.pid}-${Date.now()}`);
  try {
    const sd = sdNotifier({ NOTIFY_SOCKET: rx.address, WATCHDOG_USEC: '200000', WATCHDOG_PID: String(process.pid) });
    assert.equal(sd.watchdogMs, 200);
    sd.ready();
    await rx.next((m) => m === 'WATCHDOG=1');
    const first = rx.messages.indexOf('WATCHDOG=1');
    await rx.next((m) => m === 'WATCHDOG=1', 60_000, first + 1);
    sd.stopping();
    const n = rx.messages.length;
    // No timer keeps the process alive or pings after STOPPING: a test that ends here proves the first.
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(rx.messages.slice(n).filter((m) => m === 'WATCHDOG=1').length, 0, 'no WATCHDOG=1 after STOPPING=1');
    assert.equal(
      sdNotifier({ NOTIFY_SOCKET: rx.address, WATCHDOG_USEC: '200000', WATCHDOG_PID: '1' }).watchdogMs,
      0,
      'a watchdog for another pid is not ours',
    );
  } finally {
    rx.close();
  }
});

test('the datagram is what systemd-notify sends for the same assignments', async () => {
  const rx = await notifySocket(join(dir, 'notify-oracle.sock'));
  try {
    const r = await runTool('systemd-notify', ['--no-block', '--ready', '--status=serving 1 volume'], {
      env: { ...process.env, NOTIFY_SOCKET: rx.address },
    });
    assert.equal(r.code, 0, r.stderr);
    const theirs = await rx.next((m) => m.startsWith('READY=1'));
    assert.equal(sdNotifyMessage({ READY: 1, STATUS: 'serving 1 volume' }), theirs);
  } finally {
    rx.close();
  }
});

test('cryptmap daemon: READY=1 once the control socket answers, STOPPING=1 on SIGTERM', async () => {
  const rx = await notifySocket(join(dir, 'notify-daemon.sock'));
  const run = join(dir, 'run-daemon');
  try {
    const d = start(process.execPath, [ENTRY, 'daemon', '--runtime-dir', run], { NOTIFY_SOCKET: rx.address });
    const ready = await expectFrom(rx, d, (m) => m.startsWith('READY=1'));
    assert.match(
      ready,
      new RegExp(
        `^READY=1\\nSTATUS=serving: control ${run}/control\\.sock, nbd ${run}/nbd\\.sock\\nMAINPID=${d.child.pid}$`,
      ),
    );
    const c = await ControlClient.connect(run);
    await c.call('daemon.ping');
    c.close();
    d.child.kill('SIGTERM');
    await rx.next((m) => m.startsWith('STOPPING=1')); // the process may exit before the receiver prints it
    assert.equal(await exitOf(d.child), 0, d.log());
  } finally {
    rx.close();
  }
});

test('cryptmap daemon under systemd-socket-activate: serves the control socket it is passed, and leaves the socket file', async () => {
  const rx = await notifySocket(join(dir, 'notify-activate.sock'));
  const run = join(dir, 'run-activated');
  mkdirSync(run, { mode: 0o700 });
  const sock = join(run, 'control.sock');
  try {
    // As a .socket unit with FileDescriptorName=control: systemd binds, the daemon starts on the first connection.
    const d = start(
      'systemd-socket-activate',
      [
        '-l',
        sock,
        '--fdname=control',
        '-E',
        `NOTIFY_SOCKET=${rx.address}`,
        process.execPath,
        ENTRY,
        'daemon',
        '--runtime-dir',
        run,
      ],
      {},
    );
    const c = await pollUntil(
      async () => {
        if (d.child.exitCode !== null) return 'exited';
        return ControlClient.connect(run);
      },
      { deadlineMs: 30_000, intervalMs: 100, what: 'the activated control socket to accept', detail: d.log },
    );
    if (c === 'exited') assert.fail(`systemd-socket-activate exited (${d.child.exitCode}): ${d.log()}`);
    await c.call('daemon.ping');
    c.close();
    const ready = await expectFrom(rx, d, (m) => m.startsWith('READY=1'));
    assert.match(ready, /\(socket-activated\)/);
    assert.match(
      ready,
      new RegExp(`MAINPID=${d.child.pid}$`),
      'systemd-socket-activate execs the daemon in its own pid',
    );
    d.child.kill('SIGTERM');
    await rx.next((m) => m.startsWith('STOPPING=1')); // the process may exit before the receiver prints it
    assert.equal(await exitOf(d.child), 0, d.log());
    assert.ok(existsSync(sock) && lstatSync(sock).isSocket(), 'the socket file belongs to the service manager: kept');
  } finally {
    rx.close();
  }
});

test('cryptmap keyd: READY=1 once its socket listens, RELOADING=1 and READY=1 around SIGHUP, STOPPING=1 on SIGTERM', async () => {
  const rx = await notifySocket(join(dir, 'notify-keyd.sock'));
  const state = join(dir, 'keyd');
  try {
    const policy = join(dir, 'policy.yaml');
    writeFileSync(policy, 'version: 1\nclients:\n  - identity: local\n    services: ["*"]\n', { mode: 0o600 });
    const k = start(process.execPath, [ENTRY, 'keyd', '--state-dir', state, '--policy', policy], {
      NOTIFY_SOCKET: rx.address,
    });
    const ready = await expectFrom(rx, k, (m) => m.startsWith('READY=1'));
    assert.match(ready, new RegExp(`STATUS=serving: unix:${state}/keyd\\.sock\\nMAINPID=${k.child.pid}$`));
    const n = rx.messages.length;
    k.child.kill('SIGHUP');
    await expectFrom(rx, k, (m) => m.startsWith('RELOADING=1'), n);
    await expectFrom(rx, k, (m) => m.startsWith('READY=1'), n);
    k.child.kill('SIGTERM');
    await rx.next((m) => m.startsWith('STOPPING=1')); // the process may exit before the receiver prints it
    assert.equal(await exitOf(k.child), 0, k.log());
  } finally {
    rx.close();
  }
});
