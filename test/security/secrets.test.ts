// Secret hygiene: representative flows run with known passphrases and keys, everything they print
// or log is captured, and every spawned process's argv is recorded; none may contain a secret in
// raw, hex or base64 form. Also: runtime and state directories are 0700, sockets and key files 0600.
// Flows: luksFormat (known volume key) / luksAddKey / luksDump / wrong-passphrase open through the
// CLI functions in-process; open/status/close against a `cryptmap daemon` child over the control
// socket (in-process CLI and a spawned CLI); `cryptmap keyd` child with a key derived over its socket.
// See docs/secrets.md for what Node cannot wipe and what is done about it.
import assert from 'node:assert/strict';
import * as childProcess from 'node:child_process';
import { readFileSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { makeTempDir } from '../helpers/tmp.js';
import { createRequire, syncBuiltinESMExports } from 'node:module';
import { join } from 'node:path';
import { Readable, Writable } from 'node:stream';
import { test } from 'node:test';
import { main } from '../../src/cli/main.js';
import type { CliIO } from '../../src/cli/types.js';
import { unixKeyClient } from '../../src/keyservice/client.js';
import { setLogLevel, setLogSink } from '../../src/util/log.js';
import { report } from '../fuzz/harness.js';
import { cliOk, ENTRY, spawnedArgv, spawnedOutput, startDaemon } from '../load/helpers.js';
import { FAST_PBKDF } from '../helpers/luks.js';

// ---- record every process spawned from this test process, whoever spawns it ----
const cp = createRequire(import.meta.url)('node:child_process') as Record<string, unknown>;
const patchedArgv: string[][] = [];
for (const fn of ['spawn', 'spawnSync', 'execFile', 'execFileSync', 'fork', 'exec', 'execSync'] as const) {
  const orig = cp[fn] as (...a: unknown[]) => unknown;
  cp[fn] = (...a: unknown[]) => {
    const cmd = String(a[0]);
    const args = Array.isArray(a[1]) ? (a[1] as unknown[]).map(String) : [];
    patchedArgv.push([cmd, ...args]);
    return orig.apply(cp, a);
  };
}
syncBuiltinESMExports();
assert.notEqual(childProcess.spawn, undefined);

const PASS1 = 'correct horse battery staple 0x5e';
const PASS2 = 'second passphrase, Zx9!q';
const WRONG = 'not the passphrase at all';
const VOLUME_KEY = Buffer.from(Array.from({ length: 64 }, (_, i) => (i * 37 + 11) & 0xff));

/** The forms a secret could leak in. Short needles (< 8 bytes of text) would match by chance. */
function forms(secret: Buffer): string[] {
  return [
    secret.toString('latin1'),
    secret.toString('hex'),
    secret.toString('hex').toUpperCase(),
    secret.toString('base64'),
    secret.toString('base64url'),
    JSON.stringify(secret.toString('latin1')).slice(1, -1),
  ]
    .concat(secret.length >= 16 ? [secret.subarray(0, 16).toString('hex')] : [])
    .filter((s) => s.length >= 8);
}

function leaks(haystacks: string[], secrets: Record<string, Buffer>): string[] {
  const found: string[] = [];
  for (const [name, s] of Object.entries(secrets)) {
    for (const f of forms(s)) {
      for (const h of haystacks) if (h.includes(f)) found.push(`${name} (${f.slice(0, 12)}...) in: ${h.slice(0, 200)}`);
    }
  }
  return found;
}

function captureIO(dir: string): { io: CliIO; out: string[] } {
  const out: string[] = [];
  const sink = () =>
    new Writable({
      write(chunk, _enc, cb) {
        out.push(String(chunk));
        cb();
      },
    });
  const io = {
    stdin: Readable.from([]),
    stdout: sink(),
    stderr: sink(),
    env: { ...process.env, CRYPTMAP_RUNTIME_DIR: join(dir, 'run') },
  } as unknown as CliIO;
  return { io, out };
}

function mode(p: string): number {
  return statSync(p).mode & 0o777;
}

test('no secret reaches logs, output, error messages or spawned argv; private modes on runtime files', {
  timeout: 240_000,
}, async () => {
  const { dir, cleanup: removeDir } = makeTempDir('cryptmap-secrets-');
  const logs: string[] = [];
  setLogSink((l) => logs.push(l));
  setLogLevel('debug');
  let daemon: Awaited<ReturnType<typeof startDaemon>> | undefined;
  let keyd: childProcess.ChildProcess | undefined;
  try {
    const img = join(dir, 'a.img');
    writeFileSync(img, '');
    truncateSync(img, 32 << 20);
    const p1 = join(dir, 'p1');
    const p2 = join(dir, 'p2');
    const pw = join(dir, 'pw');
    const vk = join(dir, 'vk');
    writeFileSync(p1, PASS1, { mode: 0o600 });
    writeFileSync(p2, PASS2, { mode: 0o600 });
    writeFileSync(pw, WRONG, { mode: 0o600 });
    writeFileSync(vk, VOLUME_KEY, { mode: 0o600 });
    const { io, out } = captureIO(dir);
    const run = async (args: string[], expect = 0) => {
      const code = await main(args, io).catch((e: Error) => {
        out.push(e.message);
        return (e as { exitCode?: number }).exitCode ?? 1;
      });
      assert.equal(code, expect, `cryptmap ${args.join(' ')} exited ${code}: ${out.slice(-3).join('')}`);
    };
    const fast = [...FAST_PBKDF];

    // in-process CLI: header operations
    await run([
      'luksFormat',
      '--type',
      'luks2',
      '--batch-mode',
      '--key-file',
      p1,
      '--volume-key-file',
      vk,
      ...fast,
      img,
    ]);
    await run(['luksAddKey', '--key-file', p1, ...fast, img, p2]);
    await run(['luksDump', img]);
    await run(['open', '--test-passphrase', '--key-file', pw, img], 2);
    await run(['open', '--test-passphrase', '--key-file', p2, img]);

    // daemon child; open/status/close in-process and through a spawned CLI
    const rundir = join(dir, 'run');
    daemon = await startDaemon(rundir, { CRYPTMAP_LOG: 'debug' });
    assert.equal(mode(rundir), 0o700, 'runtime dir');
    assert.equal(mode(join(rundir, 'control.sock')), 0o600, 'control socket');
    assert.equal(mode(join(rundir, 'nbd.sock')), 0o600, 'NBD socket');
    assert.equal(mode(join(rundir, 'daemon.pid')), 0o600, 'pid file');
    await run(['open', '--type', 'luks2', '--key-file', p2, '--runtime-dir', rundir, img, 'sec']);
    await run(['open', '--type', 'luks2', '--key-file', pw, '--runtime-dir', rundir, img, 'sec2'], 2);
    await run(['status', '--runtime-dir', rundir, 'sec']);
    await run(['dm', 'table', '--runtime-dir', rundir, 'sec']);
    await run(['close', '--runtime-dir', rundir, 'sec']);
    await cliOk(['open', '--type', 'luks2', '--key-file', p1, '--runtime-dir', rundir, img, 'sec3']);
    await cliOk(['close', '--runtime-dir', rundir, 'sec3']);
    await daemon.stop();
    daemon = undefined;

    // keyd child: root secret raw on disk (so the test knows it), a key derived over the socket
    const state = join(dir, 'keyd');
    const argv = [process.execPath, ENTRY, 'keyd', '--state-dir', state];
    spawnedArgv.push(argv);
    keyd = childProcess.spawn(argv[0] as string, argv.slice(1), {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, CRYPTMAP_LOG: 'debug' },
    });
    let keydOut = '';
    keyd.stdout?.on('data', (d) => (keydOut += d));
    keyd.stderr?.on('data', (d) => (keydOut += d));
    const sock = join(state, 'keyd.sock');
    const client = unixKeyClient({ socketPath: sock });
    for (let i = 0; ; i++) {
      try {
        await client.ping();
        break;
      } catch (e) {
        if (i > 100) throw new Error(`keyd did not start: ${String(e)} ${keydOut}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    }
    const derived = await client.deriveKey({ purpose: 'scratch', service: 'db', volume: 'data', length: 64 });
    const derivedBytes = Buffer.from(derived.expose());
    derived.dispose();
    await client.deriveKey({ purpose: 'scratch', service: '../bad', volume: 'x' }).then(
      () => assert.fail('a bad request was served'),
      () => undefined,
    );
    await client.close();
    assert.equal(mode(state), 0o700, 'keyd state dir');
    assert.equal(mode(join(state, 'root.key')), 0o600, 'root secret file');
    assert.equal(mode(sock), 0o600, 'keyd socket');
    const root = readFileSync(join(state, 'root.key'));
    keyd.kill('SIGTERM');
    await new Promise((r) => keyd?.once('exit', r));
    keyd = undefined;
    const audit = readFileSync(join(state, 'audit.log'), 'utf8');

    const haystacks = [
      ...logs,
      ...out,
      ...spawnedOutput,
      keydOut,
      audit,
      ...spawnedArgv.map((a) => a.join(' ')),
      ...patchedArgv.map((a) => a.join(' ')),
    ];
    const secrets: Record<string, Buffer> = {
      passphrase1: Buffer.from(PASS1),
      passphrase2: Buffer.from(PASS2),
      wrongPassphrase: Buffer.from(WRONG),
      volumeKey: VOLUME_KEY,
      derivedKey: derivedBytes,
      rootSecret: root,
    };
    if (root.length !== 32) secrets.rootSecretText = Buffer.from(root.toString('utf8').trim());
    const found = leaks(haystacks, secrets);
    report({
      kind: 'secrets',
      flows: 12,
      haystacks: haystacks.length,
      spawned: spawnedArgv.length + patchedArgv.length,
      logLines: logs.length,
      leaked: found.length,
    });
    assert.deepEqual(found, [], 'secrets leaked');
    // The flows really ran and were captured.
    assert.ok(spawnedArgv.length >= 4, 'spawned processes recorded');
    assert.ok(out.join('').includes('LUKS header'), `luksDump output captured: ${out.join('').slice(0, 300)}`);
    assert.ok(spawnedOutput.join('').includes('volume opened'), 'daemon debug log captured');
  } finally {
    setLogSink((l) => process.stderr.write(`${l}\n`));
    setLogLevel('info');
    keyd?.kill('SIGKILL');
    if (daemon) await daemon.kill();
    removeDir();
  }
});

test('the leak detector finds a planted secret in every form it checks', () => {
  const s = Buffer.from(PASS1);
  for (const planted of [
    `x ${PASS1} y`,
    `key=${s.toString('hex')}`,
    `k=${s.toString('base64')}`,
    `"${s.toString('hex').toUpperCase()}"`,
  ]) {
    assert.equal(leaks([planted], { p: s }).length > 0, true, planted);
  }
  assert.deepEqual(leaks(['nothing to see'], { p: s, k: VOLUME_KEY }), []);
});
