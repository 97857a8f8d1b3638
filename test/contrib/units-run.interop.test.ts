/**
 * The three units as an operator enables them (issue 18 "Done means"): each service's ExecStart= line
 * from contrib/systemd, run the way systemd runs it (NOTIFY_SOCKET set, the unit's directories mapped
 * under a temporary directory, /usr/bin/cryptmap -> this checkout's bin/cryptmap.js), in the units'
 * order: keyd, then the daemon, then the agent (whose manifest takes its keys from that keyd, as
 * cryptmap-agent.service's Wants=cryptmap-keyd.service means). Each must send READY=1, the agent
 * only once its volume is ready; `agent status --json` then shows the volume, checked against
 * docs/json/agent-status.schema.json; SIGTERM (systemctl stop) gives STOPPING=1 and exit 0.
 * The agent's line gets --nbd-only (a drop-in would): the test attaches no kernel block device.
 * systemd-units.interop.test.ts checks the units themselves with systemd-analyze verify.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { makeTempDir } from '../helpers/tmp.js';
import { fileURLToPath } from 'node:url';
import { Ajv } from 'ajv';
import { type NotifySocket, notifySocket } from '../util/notify-socket.js';

const ROOT = fileURLToPath(new URL('../../../', import.meta.url));
const BIN = join(ROOT, 'bin', 'cryptmap.js');
const { dir, cleanup } = makeTempDir('cryptmap-units-run-');
const children: ChildProcess[] = [];
after(() => {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  cleanup();
});

/** The unit's paths, longest first so that /run/cryptmap-keyd is not read as /run/cryptmap + "-keyd". */
const PATHS: [string, string][] = [
  ['/var/lib/cryptmap-keyd', join(dir, 'var-lib-cryptmap-keyd')],
  ['/run/cryptmap-keyd', join(dir, 'run-cryptmap-keyd')],
  ['/etc/cryptmap/manifest.yaml', join(dir, 'etc-cryptmap', 'manifest.yaml')],
  ['/var/lib/cryptmap', join(dir, 'var-lib-cryptmap')],
  ['/run/cryptmap', join(dir, 'run-cryptmap')],
];

/** ExecStart= of a unit as argv, its paths mapped; the directories systemd would create (0700) made. */
function execStart(unit: string): string[] {
  const text = readFileSync(join(ROOT, 'contrib', 'systemd', unit), 'utf8');
  const m = /^ExecStart=(.+)$/m.exec(text);
  assert.ok(m, `${unit} has an ExecStart= line`);
  const argv = m[1]!.trim().split(/\s+/);
  assert.equal(argv[0], '/usr/bin/cryptmap', `${unit} runs /usr/bin/cryptmap`);
  return argv.slice(1).map((a) => {
    for (const [from, to] of PATHS) if (a === from || a.startsWith(`${from}/`)) return to + a.slice(from.length);
    return a;
  });
}
for (const [, to] of PATHS) if (!to.endsWith('.yaml')) mkdirSync(to, { recursive: true, mode: 0o700 });
mkdirSync(join(dir, 'etc-cryptmap'), { mode: 0o700 });

interface Service {
  name: string;
  child: ChildProcess;
  rx: NotifySocket;
  log: () => string;
}

async function startUnit(unit: string, extra: string[] = []): Promise<Service> {
  const rx = await notifySocket(join(dir, `notify-${unit}.sock`));
  const child = spawn(process.execPath, [BIN, ...execStart(unit), ...extra], {
    stdio: ['ignore', 'pipe', 'pipe'],
    // What systemd passes: the notify socket; no terminal. HOME unset as for a system service.
    env: { PATH: process.env.PATH, NOTIFY_SOCKET: rx.address, CRYPTMAP_LOCK_DIR: join(dir, 'locks') },
  });
  children.push(child);
  let log = '';
  child.stdout!.on('data', (d: Buffer) => {
    log += d.toString();
  });
  child.stderr!.on('data', (d: Buffer) => {
    log += d.toString();
  });
  return { name: unit, child, rx, log: () => log };
}

/** The first datagram `pred` accepts; fails at once with the output when the process exits first. */
function expect(s: Service, pred: (m: string) => boolean, from = 0): Promise<string> {
  const died = new Promise<never>((_, rej) => {
    s.child.once('exit', (code) =>
      rej(new Error(`${s.name} exited (${code}) first:\n${s.log()}\ndatagrams: ${JSON.stringify(s.rx.messages)}`)),
    );
  });
  died.catch(() => undefined);
  return Promise.race([s.rx.next(pred, 120_000, from), died]);
}

async function stop(s: Service): Promise<void> {
  const exited = new Promise<number | null>((res, rej) => {
    if (s.child.exitCode !== null || s.child.signalCode !== null) return res(s.child.exitCode);
    const t = setTimeout(() => rej(new Error(`${s.name} did not exit 60 s after SIGTERM:\n${s.log()}`)), 60_000);
    s.child.once('exit', (code) => {
      clearTimeout(t);
      res(code);
    });
  });
  s.child.kill('SIGTERM');
  const code = await exited;
  s.rx.close();
  assert.equal(code, 0, `${s.name} exit code:\n${s.log()}`);
  assert.ok(
    s.rx.messages.some((m) => m.startsWith('STOPPING=1')),
    `${s.name} sent STOPPING=1: ${JSON.stringify(s.rx.messages)}`,
  );
}

test('keyd, daemon and agent start from their units ExecStart= lines, report READY=1 and stop on SIGTERM', async () => {
  const started: Service[] = [];
  try {
    const keyd = await startUnit('cryptmap-keyd.service');
    started.push(keyd);
    const keydSock = join(dir, 'run-cryptmap-keyd', 'keyd.sock');
    assert.match(await expect(keyd, (m) => m.startsWith('READY=1')), new RegExp(`STATUS=serving: unix:${keydSock}`));

    const daemon = await startUnit('cryptmap-daemon.service');
    started.push(daemon);
    await expect(daemon, (m) => m.startsWith('READY=1'));

    writeFileSync(
      PATHS[2]![1],
      `version: 1\nkeyService:\n  address: unix:${keydSock}\nservices:\n  - name: db\n    volumes:\n      - name: data\n        size: 8M\n        class: persistent\n        filesystem: none\n`,
      { mode: 0o600 },
    );
    const agent = await startUnit('cryptmap-agent.service', ['--nbd-only']);
    started.push(agent);
    assert.match(await expect(agent, (m) => m.startsWith('READY=1')), /STATUS=1 of 1 volumes ready/);

    // Scripting against JSON: agent status --json on the running agent, as the schema says.
    const out = await new Promise<string>((res, rej) => {
      execFile(
        process.execPath,
        [BIN, 'agent', 'status', '--json', '--state-dir', PATHS[3]![1]],
        { timeout: 60_000, encoding: 'utf8' },
        (e, stdout, stderr) => (e ? rej(new Error(`agent status --json: ${e.message}\n${stderr}`)) : res(stdout)),
      );
    });
    const status = JSON.parse(out) as {
      running: boolean;
      pid: number | null;
      volumes: { id?: string; state?: string }[];
    };
    const schema = JSON.parse(readFileSync(join(ROOT, 'docs', 'json', 'agent-status.schema.json'), 'utf8')) as object;
    const ajv = new Ajv({ allErrors: true, strict: false });
    const validate = ajv.compile(schema);
    assert.ok(validate(status), `agent-status: ${ajv.errorsText(validate.errors)}\n${out}`);
    assert.equal(status.running, true, out);
    assert.equal(status.pid, agent.child.pid, out);
    assert.equal(status.volumes.length, 1, out);

    for (const s of [...started].reverse()) await stop(s);
    started.length = 0;
  } finally {
    for (const s of started) {
      s.child.kill('SIGKILL');
      s.rx.close();
    }
  }
});
