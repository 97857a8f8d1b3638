/**
 * Leases in an etcd that demands TLS with client certificates (--client-cert-auth) and password
 * authentication (issue 15 item 4, "etcd security"): the lease client reaches it only with the CA,
 * its certificate and key, and the user's password read from a 0600 file (never argv); without the
 * client certificate, with the wrong password, or with a password file others can read, it does not.
 */
import assert from 'node:assert/strict';
import { chmodSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { fileTempDir } from '../helpers/tmp.js';
import { EtcdLeases } from '../../src/coordination/etcd-leases.js';
import { isCryptmapError } from '../../src/util/errors.js';
import { makeCa, makeCert } from '../helpers/x509.js';
import { requireTool } from '../helpers/tools.js';
import { startEtcd } from './etcd.js';

const dir = fileTempDir('cm-etcdtls-');

interface AdminClient {
  role(name: string): { create(): Promise<unknown>; grant(p: unknown): Promise<unknown> };
  user(name: string): { create(pw: string): Promise<unknown>; addRole(r: string): Promise<unknown> };
  range(r: { prefix: string }): unknown;
  auth: { authEnable(): Promise<unknown> };
  close(): void;
}

test('TLS with client certificates and password auth: leases work only with the right credentials', async () => {
  requireTool('openssl');
  const ca = join(dir, 'ca');
  makeCa(ca, 'etcd test CA');
  makeCert(ca, ca, 'server', '127.0.0.1', 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth');
  makeCert(ca, join(dir, 'client'), 'client', 'node-a', 'extendedKeyUsage=clientAuth');
  const caFile = join(ca, 'ca-cert.pem');
  const certFile = join(dir, 'client', 'client-cert.pem');
  const keyFile = join(dir, 'client', 'client-key.pem');
  chmodSync(keyFile, 0o600);
  const etcd = await startEtcd({
    certFile: join(ca, 'server-cert.pem'),
    keyFile: join(ca, 'server-key.pem'),
    clientCaFile: caFile,
    ca: readFileSync(caFile),
    clientCert: readFileSync(certFile),
    clientKey: readFileSync(keyFile),
  });
  // Users, a role for the lease prefix, then auth on (etcd3 as the administrator, before auth).
  const { Etcd3 } = (await import('etcd3')) as unknown as { Etcd3: new (o: unknown) => AdminClient };
  const admin = new Etcd3({
    hosts: [etcd.url],
    credentials: {
      rootCertificate: readFileSync(caFile),
      certChain: readFileSync(certFile),
      privateKey: readFileSync(keyFile),
    },
  });
  try {
    await admin.role('root').create();
    await admin.user('root').create('root secret');
    await admin.user('root').addRole('root');
    await admin.role('cryptmap').create();
    await admin.role('cryptmap').grant({ permission: 'Readwrite', range: admin.range({ prefix: '/cryptmap/' }) });
    await admin.user('cryptmap').create('lease secret');
    await admin.user('cryptmap').addRole('cryptmap');
    await admin.auth.authEnable();
  } finally {
    admin.close();
  }
  const pw = join(dir, 'password');
  writeFileSync(pw, 'lease secret\n', { mode: 0o600 });
  const base = { endpoints: [etcd.url], node: 'node-a', ttlSeconds: 4, callTimeoutMs: 3000, onLost: () => {} };
  const good = await EtcdLeases.connect({
    ...base,
    tls: { caFile, certFile, keyFile },
    auth: { user: 'cryptmap', passwordFile: pw },
  });
  try {
    assert.deepEqual(await good.acquire('scratch/db/data'), { held: true });
    assert.equal((await good.holder('scratch/db/data'))?.node, 'node-a');
    await good.release('scratch/db/data');
  } finally {
    await good.close();
  }

  // No client certificate: the TLS handshake is refused.
  const noCert = await EtcdLeases.connect({ ...base, tls: { caFile }, auth: { user: 'cryptmap', passwordFile: pw } });
  await assert.rejects(noCert.acquire('scratch/db/data'), (e) => isCryptmapError(e));
  await noCert.close().catch(() => {});
  // The wrong password.
  const bad = join(dir, 'bad-password');
  writeFileSync(bad, 'not it', { mode: 0o600 });
  const wrong = await EtcdLeases.connect({
    ...base,
    tls: { caFile, certFile, keyFile },
    auth: { user: 'cryptmap', passwordFile: bad },
  });
  await assert.rejects(wrong.acquire('scratch/db/data'), (e) => isCryptmapError(e));
  await wrong.close().catch(() => {});

  // A password file others can read, or a symlink to it, is refused before anything is sent.
  const open = join(dir, 'open-password');
  writeFileSync(open, 'lease secret', { mode: 0o644 });
  chmodSync(open, 0o644);
  await assert.rejects(
    EtcdLeases.connect({ ...base, tls: { caFile, certFile, keyFile }, auth: { user: 'cryptmap', passwordFile: open } }),
    (e) => isCryptmapError(e) && /accessible by group or others/.test(e.message),
  );
  const link = join(dir, 'link-password');
  symlinkSync(pw, link);
  await assert.rejects(
    EtcdLeases.connect({ ...base, tls: { caFile, certFile, keyFile }, auth: { user: 'cryptmap', passwordFile: link } }),
    (e) => isCryptmapError(e) && /symbolic link/.test(e.message),
  );
  // https endpoints without a CA are refused.
  await assert.rejects(EtcdLeases.connect(base), (e) => isCryptmapError(e) && /need a CA file/.test(e.message));
});
