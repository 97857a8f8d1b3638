import assert from 'node:assert/strict';
import { chmod, readdir, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { memoryAudit, openAuditFile } from '../../src/keyservice/audit.js';
import { connectKeyService, inprocKeyClient, unixKeyClient } from '../../src/keyservice/client.js';
import { deriveKey } from '../../src/keyservice/derive.js';
import { policyFromObject, tokenDigest } from '../../src/keyservice/policy.js';
import { listenUnix } from '../../src/keyservice/server.js';
import { KeyService } from '../../src/keyservice/service.js';
import { Secret } from '../../src/util/secret.js';
import { makeTempDir } from '../helpers/tmp.js';
import { ROOT_A, VECTORS } from './vectors.js';

const TOKEN = 'a-client-token-for-tests';

function policy() {
  return policyFromObject({
    version: 1,
    clients: [
      { identity: 'local', services: ['web'] },
      { identity: 'token:backup', tokenSha256: tokenDigest(TOKEN), services: ['db'] },
    ],
  });
}

test('unix socket: 0600, local and token identities, refusals audited without keys', async () => {
  const t = makeTempDir('cryptmap-ks-');
  const auditPath = join(t.dir, 'audit.log');
  const audit = await openAuditFile(auditPath);
  const service = new KeyService({ root: Secret.copyOf(Buffer.from(ROOT_A, 'hex')), policy: policy(), audit });
  const sock = join(t.dir, 'keyd.sock');
  const srv = await listenUnix(service, sock);
  try {
    assert.equal((await stat(sock)).mode & 0o777, 0o600);
    assert.deepEqual(
      (await readdir(t.dir)).filter((n) => n.startsWith('.')),
      [],
      'no temporary bind directory is left behind',
    );
    const local = connectKeyService(`unix:${sock}`);
    await local.ping();
    const k = await local.deriveKey({ purpose: 'scratch', service: 'web', volume: 'data' });
    assert.equal(k.expose().toString('hex'), VECTORS[0]!.key);
    assert.equal(String(k), '[secret 32 bytes]');
    await assert.rejects(
      local.deriveKey({ purpose: 'scratch', service: 'db', volume: 'pgdata' }),
      (e: Error & { code?: string }) => {
        assert.equal(e.code, 'EKEYD_DENIED');
        assert.ok(!e.message.includes(VECTORS[1]!.key));
        return true;
      },
    );
    const tokenClient = unixKeyClient({ socketPath: sock, token: TOKEN });
    const kd = await tokenClient.deriveKey({ purpose: 'scratch', service: 'db', volume: 'pgdata' });
    assert.equal(kd.expose().toString('hex'), VECTORS[1]!.key);
    await assert.rejects(tokenClient.deriveKey({ purpose: 'scratch', service: 'web', volume: 'data' }), {
      code: 'EKEYD_DENIED',
    });
    await assert.rejects(
      unixKeyClient({ socketPath: sock, token: 'forged' }).deriveKey({
        purpose: 'scratch',
        service: 'web',
        volume: 'data',
      }),
      {
        code: 'EKEYD_DENIED',
      },
    );
    // A token file: 0600 works; one readable by others is refused before it is used.
    const tokenFile = join(t.dir, 'client.token');
    await writeFile(tokenFile, `${TOKEN}\n`, { mode: 0o600 });
    const fileClient = unixKeyClient({ socketPath: sock, tokenFile });
    (await fileClient.deriveKey({ purpose: 'scratch', service: 'db', volume: 'pgdata' })).dispose();
    await chmod(tokenFile, 0o644);
    assert.throws(() => unixKeyClient({ socketPath: sock, tokenFile }), { code: 'EKEYD_TOKEN', exitCode: 2 });
    // Something that is not a socket at the socket path is never replaced.
    await assert.rejects(listenUnix(service, tokenFile), { code: 'EKEYD_SOCKET' });
    assert.equal((await readFile(tokenFile, 'utf8')).trim(), TOKEN);
    // A second keyd on the same socket is refused; a malformed request gets an error reply.
    await assert.rejects(listenUnix(service, sock), { code: 'EKEYD_RUNNING' });
    await srv.close();
    await assert.rejects(local.deriveKey({ purpose: 'scratch', service: 'web', volume: 'data' }), {
      code: 'EKEYD_UNREACHABLE',
    });
    await audit.close();
    const log = await readFile(auditPath, 'utf8');
    const lines = log
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as Record<string, unknown>);
    assert.deepEqual(
      lines.map((l) => `${l.identity} ${l.service ?? '-'} ${l.result}`),
      [
        'local web granted',
        'local db denied',
        'token:backup db granted',
        'token:backup web denied',
        'token:? - denied',
        'token:backup db granted',
      ],
    );
    for (const v of VECTORS) assert.ok(!log.includes(v.key.slice(0, 16)), 'no key material in the audit log');
    assert.equal((await stat(auditPath)).mode & 0o777, 0o600);
  } finally {
    await srv.close();
    await t.cleanup();
  }
});

test('in-process client and malformed requests', async () => {
  const audit = memoryAudit();
  const root = Secret.copyOf(Buffer.from(ROOT_A, 'hex'));
  const service = new KeyService({ root, policy: policy(), audit });
  const c = inprocKeyClient(service);
  const k = await c.deriveKey({ purpose: 'scratch', service: 'web', volume: 'data', length: 64 });
  assert.equal(k.expose().toString('hex'), VECTORS[2]!.key);
  assert.equal(service.handle('unix', 'local', { op: 'nope' }).code, 'EKEYREQ');
  assert.equal(
    service.handle('unix', 'local', { op: 'derive', purpose: 'scratch', service: '../x', volume: 'v' }).code,
    'EKEYREQ',
  );
  assert.equal(service.handle('unix', 'local', 'junk').ok, false);
  const expected = deriveKey(root, { purpose: 'scratch', service: 'web', volume: 'data' }).expose().toString('hex');
  for (const l of audit.lines) assert.ok(!l.includes(expected));
  assert.throws(() => connectKeyService('tcp://x'), { code: 'EKEYD_ADDRESS' });
  assert.throws(() => connectKeyService('https://h:1'), { code: 'EKEYD_ADDRESS' });
});

test('unix socket: an oversized request line is refused', async () => {
  const t = makeTempDir('cryptmap-ks-');
  const service = new KeyService({ root: Secret.copyOf(Buffer.alloc(32, 7)), policy: policy(), audit: memoryAudit() });
  const sock = join(t.dir, 'k.sock');
  const srv = await listenUnix(service, sock);
  try {
    const { connect } = await import('node:net');
    const reply = await new Promise<string>((res) => {
      const s = connect(sock);
      let got = '';
      s.setEncoding('utf8');
      s.on('data', (d: string) => (got += d));
      s.on('close', () => res(got));
      s.on('error', () => res(got));
      s.write('x'.repeat(10000));
    });
    assert.match(reply, /too long/);
  } finally {
    await srv.close();
    await t.cleanup();
  }
});
