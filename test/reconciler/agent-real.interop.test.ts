import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { copyFile, mkdir, open, readdir, readFile, stat, truncate, writeFile } from 'node:fs/promises';
import { join, relative } from 'node:path';
import { test } from 'node:test';
import { requireTool } from '../helpers/tools.js';
import { prepareLuks } from '../../src/activate/mapping.js';
import { AgentHost } from '../../src/daemon/agent-host.js';
import { main } from '../../src/cli/main.js';
import { memoryAudit } from '../../src/keyservice/audit.js';
import { inprocKeyClient, unixKeyClient } from '../../src/keyservice/client.js';
import { DEFAULT_POLICY, policyFromObject } from '../../src/keyservice/policy.js';
import { listenTls, listenUnix } from '../../src/keyservice/server.js';
import { KeyService } from '../../src/keyservice/service.js';
import { reconcileUntilSettled } from '../../src/reconciler/agent.js';
import { parseManifest } from '../../src/reconciler/manifest.js';
import { desiredVolumes } from '../../src/reconciler/plan.js';
import { statusRows } from '../../src/reconciler/status.js';
import { setLogSink } from '../../src/util/log.js';
import { Secret } from '../../src/util/secret.js';
import { Crash, TestNode } from '../daemon/volume-ports-harness.js';
import { captureIO } from '../daemon/helpers.js';
import { makeTempDir } from '../helpers/tmp.js';
import { dbOnlyManifest, NBD_MANIFEST } from './manifests.js';

const logs: string[] = [];
setLogSink((l) => logs.push(l));

function keyService(seed = 7): KeyService {
  return new KeyService({ root: Secret.copyOf(Buffer.alloc(32, seed)), policy: DEFAULT_POLICY, audit: memoryAudit() });
}

function targetsIn(dir: string, text = NBD_MANIFEST) {
  return desiredVolumes(parseManifest(text), join(dir, 'volumes'));
}

async function filesUnder(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const e of await readdir(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) out.push(...(await filesUnder(p)));
    else if (e.isFile()) out.push(p);
  }
  return out;
}

const EXT4_MAGIC_OFFSET = 1024 + 56;
const MARKER = Buffer.from('cryptmap persistent marker 0123456789');

test('from scratch to converged over the real data path (NBD only); no key in logs, argv or files', async () => {
  const t = makeTempDir('cryptmap-agent-real-');
  const node = await TestNode.start({ dir: t.dir, keys: inprocKeyClient(keyService()) });
  logs.length = 0;
  try {
    const targets = targetsIn(t.dir);
    const r = await node.reconcile(targets, 'boot-1');
    assert.ok(r.converged, JSON.stringify(r.volumes));
    assert.deepEqual(r.volumes.map((v) => [v.id, v.state]).sort(), [
      ['scratch/db/data', 'ready'],
      ['scratch/web/cache', 'ready'],
      ['swap/swap0', 'ready'],
    ]);
    const [cache, db, swap] = [targets[0]!, targets[1]!, targets[2]!];
    assert.deepEqual(
      [...(await node.read(cache, EXT4_MAGIC_OFFSET, 2))],
      [0x53, 0xef],
      'ext4 made on the ephemeral volume',
    );
    assert.equal((await node.read(swap, 4096 - 10, 10)).toString(), 'SWAPSPACE2', 'mkswap made the swap area');
    assert.equal(node.core.statusOf(db.mapping).active, true);
    // The log names each volume with its NBD URI; the status rows carry it too.
    const sock = node.core.nbdSocketPath;
    for (const v of targets) {
      const uri = `nbd+unix:///${encodeURIComponent(v.mapping)}?socket=${sock}`;
      assert.ok(
        logs.some((l) => l.includes('volume served') && l.includes(uri)),
        `log names ${v.id} with ${uri}`,
      );
    }
    const rows = statusRows(await node.store.load());
    assert.ok(rows.every((x) => x.nbdUri?.startsWith('nbd+unix:///') && x.note === 'served over NBD only (test)'));
    // A second run changes nothing.
    const again = await node.reconcile(targets, 'boot-1');
    assert.deepEqual(again.executed, []);
    // No key material anywhere but memory: logs, spawned argv, files (the backing files included).
    assert.ok(node.keysSeen.size >= 3);
    const files = await filesUnder(t.dir);
    for (const hex of node.keysSeen) {
      const raw = Buffer.from(hex, 'hex');
      for (const l of logs) assert.ok(!l.toLowerCase().includes(hex), 'key in a log line');
      for (const a of node.argv) assert.ok(!a.join(' ').toLowerCase().includes(hex), 'key in an argv');
      for (const f of files) {
        const data = await readFile(f);
        assert.ok(!data.includes(raw) && !data.includes(Buffer.from(hex)), `key in ${relative(t.dir, f)}`);
      }
    }
    assert.ok(node.argv.some((a) => a[0] === 'mkfs.ext4') && node.argv.some((a) => a[0] === 'mkswap'));
    const down = await node.stop('boot-1');
    assert.deepEqual(down.volumes.map((v) => [v.id, v.state]).sort(), [
      ['scratch/db/data', 'stopped'],
      ['scratch/web/cache', 'removed'],
      ['swap/swap0', 'removed'],
    ]);
    assert.deepEqual(
      (await readdir(join(t.dir, 'run'))).filter((f) => f.startsWith('mkfs-')),
      [],
      'no temporary mkfs image left',
    );
  } finally {
    await node.core.shutdown();
    await t.cleanup();
  }
});

test('reboot: the ephemeral volume is made afresh and the old key cannot open it; the persistent one is intact', async () => {
  const t = makeTempDir('cryptmap-agent-reboot-');
  const node = await TestNode.start({ dir: t.dir, keys: inprocKeyClient(keyService()) });
  try {
    const targets = targetsIn(t.dir);
    const [cache, db] = [targets[0]!, targets[1]!];
    assert.ok((await node.reconcile(targets, 'boot-1')).converged);
    await node.write(db, 4096, MARKER);
    const oldKey = node.formatKey.get(cache.id)!;
    // The machine reboots: the process dies without a teardown, and the boot id changes.
    await node.restart();
    const r = await node.reconcile(targets, 'boot-2');
    assert.ok(r.converged, JSON.stringify(r.volumes));
    const cacheSteps = r.executed.filter((s) => s.id === cache.id).map((s) => s.kind);
    assert.deepEqual(cacheSteps, ['deleteFile', 'createFile', 'format', 'open', 'attach', 'mkfs', 'mount']);
    assert.deepEqual(
      r.executed.filter((s) => s.id === db.id).map((s) => s.kind),
      ['open', 'attach'],
    );
    assert.notEqual(node.formatKey.get(cache.id), oldKey);
    await assert.rejects(prepareLuks({ name: 'old-key', device: cache.path, passphrase: Buffer.from(oldKey, 'hex') }), {
      code: 'ENOKEY',
    });
    assert.deepEqual(await node.read(db, 4096, MARKER.length), MARKER);
    await node.stop('boot-2');
  } finally {
    await node.core.shutdown();
    await t.cleanup();
  }
});

test('a crash after every step, then a rerun, converges with nothing lost', async () => {
  const service = keyService(9);
  let total = 0;
  for (let n = 1; ; n++) {
    const t = makeTempDir('cryptmap-agent-crash-');
    const node = await TestNode.start({ dir: t.dir, keys: inprocKeyClient(service) });
    try {
      const targets = targetsIn(t.dir);
      node.crashAfter = n;
      let crashed = false;
      try {
        const r = await node.reconcile(targets, 'b1');
        crashed = node.crashed;
        if (!crashed) assert.ok(r.converged);
      } catch (e) {
        assert.ok(e instanceof Crash, String(e));
        crashed = true;
      }
      if (!crashed) {
        total = n - 1;
        node.crashAfter = undefined;
        await node.stop('b1');
        break;
      }
      await node.restart();
      const r = await node.reconcile(targets, 'b1');
      assert.ok(r.converged, `crash after call ${n}: ${JSON.stringify(r.volumes)}`);
      assert.ok(
        r.volumes.every((v) => v.state === 'ready'),
        `crash after call ${n}: ${JSON.stringify(r.volumes.map((v) => [v.id, v.state, v.reason]))}`,
      );
      assert.deepEqual([...(await node.read(targets[0]!, EXT4_MAGIC_OFFSET, 2))], [0x53, 0xef]);
      const left = await filesUnder(join(t.dir, 'volumes'));
      assert.deepEqual(left.map((f) => relative(t.dir, f)).sort(), [
        'volumes/scratch/db/data.img',
        'volumes/scratch/web/cache.img',
        'volumes/swap/swap0.img',
      ]);
      await node.stop('b1');
    } finally {
      await node.core.shutdown();
      await t.cleanup();
    }
  }
  assert.ok(total >= 15, `every state-changing call was crashed after (${total})`);
});

test('a second node with its own state dir opens a copy of a persistent volume through the same key service (Unix socket)', async () => {
  const t = makeTempDir('cryptmap-agent-nodes-');
  const service = keyService(11);
  const sock = join(t.dir, 'keyd.sock');
  const keyd = await listenUnix(service, sock);
  const only = dbOnlyManifest();
  const a = await TestNode.start({ dir: join(t.dir, 'a'), keys: unixKeyClient({ socketPath: sock }) });
  let b: TestNode | undefined;
  try {
    const ta = targetsIn(a.dir, only);
    assert.ok((await a.reconcile(ta, 'a1')).converged);
    await a.write(ta[0]!, 8192, MARKER);
    await a.stop('a1');
    const tb = targetsIn(join(t.dir, 'b'), only);
    await mkdir(join(t.dir, 'b', 'volumes', 'scratch', 'db'), { recursive: true, mode: 0o700 });
    await copyFile(ta[0]!.path, tb[0]!.path);
    b = await TestNode.start({ dir: join(t.dir, 'b'), keys: unixKeyClient({ socketPath: sock }) });
    const r = await b.reconcile(tb, 'b1');
    assert.ok(r.converged, JSON.stringify(r.volumes));
    assert.deepEqual(
      r.executed.map((s) => s.kind),
      ['open', 'attach'],
      'adopted: opened, never formatted',
    );
    assert.deepEqual(await b.read(tb[0]!, 8192, MARKER.length), MARKER);
    await b.stop('b1');
    // A node whose key service has another root secret cannot open it: refused, file untouched.
    const c = await TestNode.start({ dir: join(t.dir, 'b'), keys: inprocKeyClient(keyService(12)) });
    try {
      const rc = await c.reconcile(tb, 'b2');
      assert.equal(rc.volumes[0]?.state, 'refused');
      assert.equal(c.core.statusOf(tb[0]!.mapping).active, false);
    } finally {
      await c.core.shutdown();
    }
  } finally {
    await a.core.shutdown();
    await b?.core.shutdown();
    await keyd.close();
    await t.cleanup();
  }
});

test('CLI: manifest errors with file and line; agent --once, agent status --json, volume delete', async () => {
  const t = makeTempDir('cryptmap-agent-cli-');
  try {
    const bad = join(t.dir, 'bad.yaml');
    await writeFile(
      bad,
      'version: 1\nservices:\n  - name: db\n    volumes:\n      - name: data\n        size: lots\n        colour: blue\n',
    );
    const c1 = captureIO();
    const code1 = await main(['agent', '--manifest', bad, '--state-dir', join(t.dir, 'st')], c1.io);
    assert.notEqual(code1, 0);
    assert.match(c1.err(), new RegExp(`${bad}:6: services\\[0\\]\\.volumes\\[0\\]\\.size: `));
    assert.match(c1.err(), new RegExp(`${bad}:7: services\\[0\\]\\.volumes\\[0\\]\\.colour: is not a known field`));

    const good = join(t.dir, 'good.yaml');
    await writeFile(good, dbOnlyManifest('4M'));
    const st = join(t.dir, 'st');
    const c2 = captureIO();
    assert.equal(
      await main(['agent', '--manifest', good, '--state-dir', st, '--once', '--nbd-only', '--boot-id', 'b1'], c2.io),
      0,
      c2.err(),
    );
    assert.match(
      c2.out(),
      /scratch\/db\/data \(persistent, none\): ready\n {4}nbd: {4}nbd\+unix:\/\/\/scratch%3Adb%3Adata\?socket=/,
    );
    const c3 = captureIO();
    assert.equal(await main(['agent', 'status', '--json', '--state-dir', st], c3.io), 0);
    const status = JSON.parse(c3.out()) as { running: boolean; volumes: { id: string; state: string }[] };
    assert.equal(status.running, false);
    assert.deepEqual(
      status.volumes.map((v) => [v.id, v.state]),
      [['scratch/db/data', 'stopped']],
    );
    // Still named by the manifest: refused; with a manifest that no longer names it: deleted.
    const c4 = captureIO();
    assert.equal(await main(['volume', 'delete', 'scratch/db/data', '--state-dir', st], c4.io), 5);
    assert.match(c4.err(), /still in the agent's manifest/);
    const none = join(t.dir, 'none.yaml');
    await writeFile(none, 'version: 1\nservices: []\n');
    const c5 = captureIO();
    assert.equal(
      await main(['volume', 'delete', 'scratch/db/data', '--state-dir', st, '--manifest', none], c5.io),
      0,
      c5.err(),
    );
    await assert.rejects(stat(join(st, 'volumes', 'scratch', 'db', 'data.img')), { code: 'ENOENT' });
  } finally {
    await t.cleanup();
  }
});

test('a persistent volume file truncated or overwritten by someone else is refused, never reformatted', async () => {
  const t = makeTempDir('cryptmap-agent-altered-');
  const node = await TestNode.start({ dir: t.dir, keys: inprocKeyClient(keyService(13)) });
  const only = dbOnlyManifest();
  try {
    const targets = targetsIn(t.dir, only);
    const db = targets[0]!;
    assert.ok((await node.reconcile(targets, 'b1')).converged);
    await node.stop('b1');
    const full = (await stat(db.path)).size;
    await truncate(db.path, full - (1 << 20));
    await node.restart();
    const r1 = await node.reconcile(targets, 'b1');
    assert.equal(r1.volumes[0]?.state, 'refused');
    assert.match(r1.volumes[0]?.reason ?? '', /truncated|smaller/);
    assert.equal((await stat(db.path)).size, full - (1 << 20), 'file left as it is');
    await truncate(db.path, full);
    const fh = await open(db.path, 'r+');
    await fh.write(Buffer.alloc(1 << 20), 0, 1 << 20, 0);
    await fh.close();
    await node.restart();
    const r2 = await node.reconcile(targets, 'b1');
    assert.equal(r2.volumes[0]?.state, 'refused');
    assert.ok(!r2.executed.some((s) => s.kind === 'format' || s.kind === 'createFile' || s.kind === 'deleteFile'));
    assert.equal(node.core.statusOf(db.mapping).active, false);
  } finally {
    await node.core.shutdown();
    await t.cleanup();
  }
});

function ossl(cwd: string, args: string[]): void {
  requireTool('openssl');
  const r = spawnSync('openssl', args, { cwd, encoding: 'utf8' });
  assert.ifError(r.error);
  assert.equal(r.status, 0, `openssl ${args.join(' ')}: ${r.stderr}`);
}

test('agents on two nodes share a persistent volume through keyd: node A over its Unix socket, node B over HTTPS with a client certificate', async () => {
  const t = makeTempDir('cryptmap-agent-mtls-');
  const pki = join(t.dir, 'pki');
  await mkdir(pki, { mode: 0o700 });
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
  ossl(pki, ['req', '-x509', ...ec, '-keyout', 'ca.key', '-out', 'ca.crt', '-subj', '/CN=agent-test-ca', '-days', '2']);
  await writeFile(join(pki, 'srv.ext'), 'subjectAltName=IP:127.0.0.1\n');
  for (const [name, cn, ext] of [
    ['srv', 'keyd', 'srv.ext'],
    ['nodeb', 'node-b.example', undefined],
  ] as const) {
    ossl(pki, ['req', ...ec, '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${cn}`]);
    ossl(pki, [
      'x509',
      '-req',
      '-in',
      `${name}.csr`,
      '-CA',
      'ca.crt',
      '-CAkey',
      'ca.key',
      '-CAcreateserial',
      '-out',
      `${name}.crt`,
      '-days',
      '2',
      ...(ext ? ['-extfile', ext] : []),
    ]);
  }
  const service = new KeyService({
    root: Secret.copyOf(Buffer.alloc(32, 21)),
    policy: policyFromObject({
      version: 1,
      clients: [
        { identity: 'local', services: ['db'] },
        { identity: 'cn:node-b.example', services: ['db'] },
      ],
    }),
    audit: memoryAudit(),
  });
  const sock = join(t.dir, 'keyd.sock');
  const unixSrv = await listenUnix(service, sock);
  const f = (n: string) => readFile(join(pki, n));
  const tlsSrv = await listenTls(service, {
    host: '127.0.0.1',
    port: 0,
    cert: await f('srv.crt'),
    key: await f('srv.key'),
    ca: await f('ca.crt'),
  });
  const manA = parseManifest(dbOnlyManifest('8M', `keyService:\n  address: unix:${sock}\n`), join(t.dir, 'a.yaml'));
  const manB = parseManifest(
    dbOnlyManifest(
      '8M',
      `keyService:\n  address: ${tlsSrv.address}\n  tls: {cert: pki/nodeb.crt, key: pki/nodeb.key, ca: pki/ca.crt}\n`,
    ),
    join(t.dir, 'b.yaml'),
  );
  let host: AgentHost | undefined;
  try {
    host = await AgentHost.start({ manifest: manA, stateDir: join(t.dir, 'a'), bootId: 'a1', serve: 'nbd-only' });
    assert.equal(host.keyServiceDescription, `unix:${sock}`);
    assert.ok((await host.reconcile()).converged);
    const dev = host.core.registry.open('scratch:db:data');
    const block = Buffer.alloc(4096);
    MARKER.copy(block);
    await dev.write(0, block);
    await dev.close();
    await host.stop();
    host = undefined;
    await mkdir(join(t.dir, 'b', 'volumes', 'scratch', 'db'), { recursive: true, mode: 0o700 });
    await copyFile(
      join(t.dir, 'a', 'volumes', 'scratch', 'db', 'data.img'),
      join(t.dir, 'b', 'volumes', 'scratch', 'db', 'data.img'),
    );
    host = await AgentHost.start({ manifest: manB, stateDir: join(t.dir, 'b'), bootId: 'b1', serve: 'nbd-only' });
    const r = await host.reconcile();
    assert.ok(r.converged, JSON.stringify(r.volumes));
    const devB = host.core.registry.open('scratch:db:data');
    const got = Buffer.alloc(4096);
    await devB.read(0, got);
    await devB.close();
    assert.deepEqual(got.subarray(0, MARKER.length), MARKER);
    await host.stop();
    host = undefined;
  } finally {
    await host?.stop().catch(() => {});
    await tlsSrv.close();
    await unixSrv.close();
    await t.cleanup();
  }
});

test('key service unreachable: the persistent volume waits (nothing made), the ephemeral one serves; once keyd is up it converges', async () => {
  const t = makeTempDir('cryptmap-agent-keywait-');
  const sock = join(t.dir, 'keyd.sock');
  const node = await TestNode.start({
    dir: join(t.dir, 'n'),
    keys: unixKeyClient({ socketPath: sock, timeoutMs: 2000 }),
  });
  let keyd: Awaited<ReturnType<typeof listenUnix>> | undefined;
  try {
    const targets = targetsIn(node.dir).filter((x) => x.kind === 'scratch');
    const [cache, db] = [targets[0]!, targets[1]!];
    const ac = new AbortController();
    const r1 = await reconcileUntilSettled({
      targets,
      store: node.store,
      ports: node.ports,
      keys: node.keys,
      ephemeralKeys: node.ephemeralKeys,
      bootId: 'b1',
      retry: { attempts: 2, baseMs: 1, maxMs: 1 },
      intervalMs: 1,
      signal: ac.signal,
      onReport: () => ac.abort(),
    });
    assert.equal(r1.volumes.find((v) => v.id === db.id)?.state, 'waiting-for-keys');
    assert.equal(r1.volumes.find((v) => v.id === cache.id)?.state, 'ready');
    await assert.rejects(stat(db.path), { code: 'ENOENT' }, 'nothing made for the volume without its key');
    assert.equal(node.core.statusOf(cache.mapping).active, true, 'the ephemeral volume serves meanwhile');
    keyd = await listenUnix(keyService(31), sock);
    const r2 = await node.reconcile(targets, 'b1');
    assert.ok(r2.converged, JSON.stringify(r2.volumes));
    assert.deepEqual(
      r2.executed.map((s) => `${s.kind} ${s.id}`),
      ['createFile scratch/db/data', 'format scratch/db/data', 'open scratch/db/data', 'attach scratch/db/data'],
    );
    await node.stop('b1');
  } finally {
    await node.core.shutdown();
    await keyd?.close();
    await t.cleanup();
  }
});
