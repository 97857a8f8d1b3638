// HTTPS transport with client certificates, and the `cryptmap keyd` verb end to end.
// Certificates are made by the openssl CLI (Debian package: openssl).
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { readdir, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { requireTool } from '../helpers/tools.js';
import { fileURLToPath } from 'node:url';
import { memoryAudit } from '../../src/keyservice/audit.js';
import { connectKeyService, httpsKeyClient } from '../../src/keyservice/client.js';
import { policyFromObject } from '../../src/keyservice/policy.js';
import { listenTls } from '../../src/keyservice/server.js';
import { KeyService } from '../../src/keyservice/service.js';
import { Secret } from '../../src/util/secret.js';
import { makeTempDir } from '../helpers/tmp.js';
import { ROOT_A, VECTORS } from './vectors.js';

function ossl(cwd: string, args: string[]): void {
  requireTool('openssl');
  const r = spawnSync('openssl', args, { cwd, encoding: 'utf8' });
  assert.ifError(r.error);
  assert.equal(r.status, 0, `openssl ${args.join(' ')}: ${r.stderr}`);
}

/** A CA, a server certificate for 127.0.0.1, and client certificates (two from the CA, one from a stranger CA). */
async function makePki(dir: string): Promise<void> {
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
  ossl(dir, ['req', '-x509', ...ec, '-keyout', 'ca.key', '-out', 'ca.crt', '-subj', '/CN=test-ca', '-days', '2']);
  ossl(dir, [
    'req',
    '-x509',
    ...ec,
    '-keyout',
    'evil-ca.key',
    '-out',
    'evil-ca.crt',
    '-subj',
    '/CN=evil-ca',
    '-days',
    '2',
  ]);
  await writeFile(join(dir, 'srv.ext'), 'subjectAltName=IP:127.0.0.1,DNS:localhost\n');
  const issue = (name: string, cn: string, ca: string, ext?: string) => {
    ossl(dir, ['req', ...ec, '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${cn}`]);
    ossl(dir, [
      'x509',
      '-req',
      '-in',
      `${name}.csr`,
      '-CA',
      `${ca}.crt`,
      '-CAkey',
      `${ca}.key`,
      '-CAcreateserial',
      '-out',
      `${name}.crt`,
      '-days',
      '2',
      ...(ext ? ['-extfile', ext] : []),
    ]);
  };
  issue('srv', 'localhost', 'ca', 'srv.ext');
  issue('nodeb', 'node-b.example', 'ca');
  issue('nodec', 'node-c.example', 'ca');
  issue('evil', 'node-b.example', 'evil-ca');
}

test('HTTPS: identity is the client certificate CN; others refused', async () => {
  const t = makeTempDir('cryptmap-ks-');
  try {
    await makePki(t.dir);
    const f = (n: string) => readFile(join(t.dir, n));
    const audit = memoryAudit();
    const service = new KeyService({
      root: Secret.copyOf(Buffer.from(ROOT_A, 'hex')),
      policy: policyFromObject({ version: 1, clients: [{ identity: 'cn:node-b.example', services: ['web', 'db'] }] }),
      audit,
    });
    const srv = await listenTls(service, {
      host: '127.0.0.1',
      port: 0,
      cert: await f('srv.crt'),
      key: await f('srv.key'),
      ca: await f('ca.crt'),
    });
    try {
      const client = (n: string) =>
        httpsKeyClient({
          url: srv.address,
          cert: readFileSyncish(t.dir, `${n}.crt`),
          key: readFileSyncish(t.dir, `${n}.key`),
          ca: readFileSyncish(t.dir, 'ca.crt'),
        });
      const b = client('nodeb');
      await b.ping();
      const k = await b.deriveKey({ purpose: 'scratch', service: 'web', volume: 'data' });
      assert.equal(k.expose().toString('hex'), VECTORS[0]!.key);
      await assert.rejects(client('nodec').deriveKey({ purpose: 'scratch', service: 'web', volume: 'data' }), {
        code: 'EKEYD_DENIED',
      });
      // rejectUnauthorized: the TLS layer drops a certificate from another CA; with TLS 1.3 the
      // client sees the connection reset. keyd audits the failed handshake.
      await assert.rejects(client('evil').deriveKey({ purpose: 'scratch', service: 'web', volume: 'data' }), {
        code: 'EKEYD_UNREACHABLE',
      });
      const viaAddress = connectKeyService(srv.address, {
        tlsCert: join(t.dir, 'nodeb.crt'),
        tlsKey: join(t.dir, 'nodeb.key'),
        tlsCa: join(t.dir, 'ca.crt'),
      });
      const k2 = await viaAddress.deriveKey({ purpose: 'scratch', service: 'db', volume: 'pgdata' });
      assert.equal(k2.expose().toString('hex'), VECTORS[1]!.key);
      await viaAddress.close();
    } finally {
      await srv.close();
    }
    const text = audit.lines.join('');
    assert.match(text, /"identity":"cn:node-b.example".*"granted"/);
    assert.match(text, /"identity":"cn:node-c.example".*"denied"/);
    assert.match(text, /"identity":"cn:\?".*"denied".*TLS handshake failed/);
    for (const v of VECTORS) assert.ok(!text.includes(v.key.slice(0, 16)));
  } finally {
    await t.cleanup();
  }
});

function readFileSyncish(dir: string, n: string): Buffer {
  return readFileSync(join(dir, n));
}

test('cryptmap keyd serves unix and https until SIGTERM; no key in files or output', async () => {
  const t = makeTempDir('cryptmap-ks-');
  try {
    await makePki(t.dir);
    const sd = join(t.dir, 'state');
    await writeFile(
      join(t.dir, 'policy.yaml'),
      'version: 1\nclients:\n  - identity: local\n    services: ["*"]\n  - identity: cn:node-b.example\n    services: [web]\n',
    );
    const mainJs = fileURLToPath(new URL('../../src/cli/main.js', import.meta.url));
    const script = `import { main } from ${JSON.stringify(mainJs)}; process.exitCode = await main(process.argv.slice(1), { stdin: process.stdin, stdout: process.stdout, stderr: process.stderr, env: process.env });`;
    const sock = join(t.dir, 'keyd.sock');
    const child = spawn(
      process.execPath,
      [
        '--input-type=module',
        '-e',
        script,
        'keyd',
        '--state-dir',
        sd,
        '--socket',
        sock,
        '--policy',
        join(t.dir, 'policy.yaml'),
        '--listen',
        '127.0.0.1:0',
        '--tls-cert',
        join(t.dir, 'srv.crt'),
        '--tls-key',
        join(t.dir, 'srv.key'),
        '--tls-ca',
        join(t.dir, 'ca.crt'),
      ],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let out = '';
    let err = '';
    child.stderr.on('data', (d) => (err += d));
    const url = await new Promise<string>((res, rej) => {
      child.stdout.on('data', (d) => {
        out += d;
        const m = /listening on (https:\/\/\S+)/.exec(out);
        if (m) res(m[1]!);
      });
      child.on('exit', (c) => rej(new Error(`keyd exited ${c}: ${err}`)));
    });
    const local = connectKeyService(`unix:${sock}`);
    const k1 = await local.deriveKey({ purpose: 'scratch', service: 'db', volume: 'pgdata' });
    const remote = connectKeyService(url, {
      tlsCert: join(t.dir, 'nodeb.crt'),
      tlsKey: join(t.dir, 'nodeb.key'),
      tlsCa: join(t.dir, 'ca.crt'),
    });
    const k2 = await remote.deriveKey({ purpose: 'scratch', service: 'web', volume: 'data' });
    await assert.rejects(remote.deriveKey({ purpose: 'scratch', service: 'db', volume: 'pgdata' }), {
      code: 'EKEYD_DENIED',
    });
    const exited = new Promise<number | null>((res) => child.on('exit', (c) => res(c)));
    child.kill('SIGTERM');
    assert.equal(await exited, 0, err);
    assert.match(out, /root secret created \(raw\)/);
    const root = await readFile(join(sd, 'root.key'));
    assert.equal((await stat(join(sd, 'root.key'))).mode & 0o777, 0o600);
    // Key material appears in no file but the root secret file, and not in the output.
    const hexes = [k1.expose().toString('hex'), k2.expose().toString('hex'), root.toString('hex')];
    for (const name of await readdir(sd)) {
      if (name === 'root.key') continue;
      const content = await readFile(join(sd, name));
      for (const h of hexes)
        assert.ok(
          !content.toString('latin1').includes(h) && !content.includes(Buffer.from(h, 'hex')),
          `${name} holds key material`,
        );
    }
    for (const h of hexes) assert.ok(!out.includes(h) && !err.includes(h));
    const audit = await readFile(join(sd, 'audit.log'), 'utf8');
    assert.equal(audit.trim().split('\n').length, 3);
  } finally {
    await t.cleanup();
  }
});
