// Local attacker (issue 11 items 2, 5, 7): keyd's and the agent's state. A root secret, audit log or
// pid file planted by a real second user is never loaded or written through; the agent refuses a
// state dir that user made (so no persistent volume is formatted under their root secret); a flood of
// failed TLS handshakes becomes one audit line per interval.
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import {
  chmodSync,
  existsSync,
  lstatSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { connect, createServer } from 'node:net';
import { join } from 'node:path';
import { test } from 'node:test';
import { AgentHost } from '../../src/daemon/agent-host.js';
import { openAuditFile } from '../../src/keyservice/audit.js';
import { loadOrCreateRootSecret } from '../../src/keyservice/root-secret.js';
import { parseManifest } from '../../src/reconciler/manifest.js';
import { setLogSink } from '../../src/util/log.js';
import { makeTempDir } from '../helpers/tmp.js';
import { ENTRY } from '../load/helpers.js';
import { dbOnlyManifest } from '../reconciler/manifests.js';
import { attack } from './attack.js';
import { attacker, NEEDS_ROOT } from './attacker.js';

setLogSink(() => {});

test('keyd: a root.key planted by another user is never loaded', { skip: NEEDS_ROOT }, async () => {
  const a = attacker();
  const adir = a.dir(0o755);
  await attack('root.key (0600) planted by another user in a 0700 state dir they own', async () => {
    const r = a.sh(`umask 077 && mkdir ${adir}/state && head -c 32 /dev/urandom > ${adir}/state/root.key`);
    assert.equal(r.status, 0, r.stderr);
    await assert.rejects(
      loadOrCreateRootSecret(join(adir, 'state')),
      (e: Error & { code?: string }) => e.code === 'ESTATEDIR' && new RegExp(`belongs to uid ${a.uid}`).test(e.message),
    );
    return 'refused: the state dir belongs to another user';
  });
  const t = makeTempDir('cm-keyd-');
  try {
    await attack("root.key owned by another user moved into root's own 0700 state dir", async () => {
      const sd = join(t.dir, 'state');
      mkdirSync(sd, { mode: 0o700 });
      spawnSync('mv', [join(adir, 'state', 'root.key'), join(sd, 'root.key')]);
      assert.equal(lstatSync(join(sd, 'root.key')).uid, a.uid);
      await assert.rejects(
        loadOrCreateRootSecret(sd),
        (e: Error & { code?: string }) => e.code === 'EROOTSECRET' && /root\.key: it belongs to uid/.test(e.message),
      );
      return 'refused: fstat shows the file belongs to another user';
    });
    await attack('root.key replaced by a symlink to a file the attacker controls', async () => {
      const sd = join(t.dir, 'state2');
      mkdirSync(sd, { mode: 0o700 });
      writeFileSync(join(adir, 'known.key'), Buffer.alloc(32, 1), { mode: 0o600 });
      symlinkSync(join(adir, 'known.key'), join(sd, 'root.key'));
      await assert.rejects(loadOrCreateRootSecret(sd), /root\.key: it is a symbolic link/);
      return 'refused: opened with O_NOFOLLOW';
    });
    await attack('audit.log planted as a symlink to a root-owned file', async () => {
      const target = join(t.dir, 'precious');
      writeFileSync(target, 'precious\n', { mode: 0o600 });
      symlinkSync(target, join(t.dir, 'audit.log'));
      await assert.rejects(openAuditFile(join(t.dir, 'audit.log')), { code: 'EAUDIT' });
      assert.equal(readFileSync(target, 'utf8'), 'precious\n');
      return 'refused (O_NOFOLLOW); the target was not appended to';
    });
  } finally {
    await t.cleanup();
    spawnSync('rm', ['-rf', adir]);
  }
});

test('agent: a state dir another user made (with their root secret in it) is refused; agent.pid is never written through', {
  skip: NEEDS_ROOT,
}, async () => {
  const a = attacker();
  const adir = a.dir(0o755);
  const manifest = parseManifest(dbOnlyManifest('8M'));
  try {
    await attack('agent state dir pre-created by another user with keyd/root.key in it', async () => {
      const r = a.sh(
        `umask 077 && mkdir -p ${adir}/state/keyd && head -c 32 /dev/urandom > ${adir}/state/keyd/root.key`,
      );
      assert.equal(r.status, 0, r.stderr);
      await assert.rejects(
        AgentHost.start({ manifest, stateDir: join(adir, 'state'), bootId: 'b1', serve: 'nbd-only' }),
        { code: 'ESTATEDIR' },
      );
      assert.ok(!existsSync(join(adir, 'state', 'volumes')), 'no volume was created, let alone formatted');
      return 'refused before any volume was made';
    });
  } finally {
    spawnSync('rm', ['-rf', adir]);
  }
  const t = makeTempDir('cm-agent-');
  let host: AgentHost | undefined;
  try {
    await attack('agent.pid planted as a symlink to a root-owned file', async () => {
      const state = join(t.dir, 'state');
      mkdirSync(state, { mode: 0o700 });
      const target = join(t.dir, 'precious');
      writeFileSync(target, 'precious\n', { mode: 0o600 });
      symlinkSync(target, join(state, 'agent.pid'));
      host = await AgentHost.start({ manifest, stateDir: state, bootId: 'b1', serve: 'nbd-only' });
      assert.ok(!lstatSync(join(state, 'agent.pid')).isSymbolicLink());
      assert.equal(readFileSync(join(state, 'agent.pid'), 'utf8').trim(), String(process.pid));
      assert.equal(readFileSync(target, 'utf8'), 'precious\n');
      return 'the link was replaced (rename), the target untouched';
    });
  } finally {
    await host?.stop().catch(() => {});
    await t.cleanup();
  }
});

async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', () => r()));
  const p = (s.address() as { port: number }).port;
  await new Promise<void>((r) => s.close(() => r()));
  return p;
}

test('keyd: a flood of failed TLS handshakes is aggregated in the audit log', { skip: NEEDS_ROOT }, async () => {
  const t = makeTempDir('cm-keyd-flood-');
  try {
    const r = spawnSync(
      'openssl',
      [
        'req',
        '-x509',
        '-newkey',
        'ec',
        '-pkeyopt',
        'ec_paramgen_curve:prime256v1',
        '-nodes',
        '-keyout',
        'k.pem',
        '-out',
        'c.pem',
        '-subj',
        '/CN=localhost',
        '-days',
        '2',
      ],
      { cwd: t.dir, encoding: 'utf8' },
    );
    assert.equal(r.status, 0, `openssl (Debian package openssl) is needed: ${r.error?.message ?? r.stderr}`);
    chmodSync(join(t.dir, 'k.pem'), 0o600);
    const port = await freePort();
    const sd = join(t.dir, 'state');
    const keyd = spawn(
      process.execPath,
      [
        ENTRY,
        'keyd',
        '--state-dir',
        sd,
        '--listen',
        `127.0.0.1:${port}`,
        '--tls-cert',
        join(t.dir, 'c.pem'),
        '--tls-key',
        join(t.dir, 'k.pem'),
        '--tls-ca',
        join(t.dir, 'c.pem'),
      ],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let out = '';
    keyd.stdout.on('data', (d) => (out += d));
    keyd.stderr.on('data', (d) => (out += d));
    for (let i = 0; !out.includes('https://'); i++) {
      assert.ok(i < 200 && keyd.exitCode === null, `keyd did not start: ${out}`);
      await new Promise((res) => setTimeout(res, 50));
    }
    let attempts = 0;
    await attack('one client fails TLS handshakes in a loop for 3 s (garbage instead of a ClientHello)', async () => {
      const until = Date.now() + 3000;
      while (Date.now() < until) {
        await Promise.all(
          Array.from(
            { length: 8 },
            () =>
              new Promise<void>((res) => {
                const c = connect(port, '127.0.0.1', () => c.end('GET / HTTP/1.0\r\n\r\n'));
                c.on('error', () => res());
                c.on('close', () => res());
              }),
          ),
        );
        attempts += 8;
      }
      keyd.kill('SIGTERM');
      await new Promise((res) => keyd.once('exit', res));
      const lines = readFileSync(join(sd, 'audit.log'), 'utf8')
        .trim()
        .split('\n')
        .filter(Boolean)
        .map((l) => JSON.parse(l) as { reason?: string; count?: number; peer?: string });
      const tls = lines.filter((l) => /TLS handshake failed/.test(l.reason ?? ''));
      const total = tls.reduce((n, l) => n + 1 + (l.count ?? 0), 0) - tls.filter((l) => l.count).length;
      assert.ok(tls.length >= 1 && tls.length <= 3, `${tls.length} audit lines for ${attempts} failed handshakes`);
      assert.ok(
        tls.every((l) => l.peer === '127.0.0.1'),
        'the peer is named',
      );
      assert.ok(total >= attempts * 0.9 && total <= attempts, `counted ${total} of ${attempts}`);
      return `${attempts} failed handshakes -> ${tls.length} audit lines (counts add up to ${total})`;
    });
    assert.ok(readdirSync(sd).includes('audit.log'));
  } finally {
    await t.cleanup();
  }
});
