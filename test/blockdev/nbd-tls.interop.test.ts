// The NBD client over TLS against nbdkit (GnuTLS) with X.509 certificates made by openssl: a CA, a
// server certificate for localhost, a client certificate nbdkit verifies (--tls-verify-peer), given
// to the client as `tls-certificates=DIR` or as x-tls-* files; and the refusals: no TLS where the
// server demands it, a server without TLS under nbds://, a wrong CA, no client certificate.
import assert from 'node:assert/strict';
import { copyFileSync } from 'node:fs';
import { join } from 'node:path';
import { before, test } from 'node:test';
import { NbdDevice } from '../../src/blockdev/nbd-client/device.js';
import { makeCa, makeCert } from '../helpers/x509.js';
import { requireTool } from '../helpers/tools.js';
import { type RunningServer, useServers } from './nbd-servers.js';

const servers = useServers('cryptmap-nbdtls-');
const d = servers.dir;
const srvDir = join(d, 'server');
const cliDir = join(d, 'client');
const otherDir = join(d, 'other');
let tlsServer: RunningServer;
let port = 0;

before(async () => {
  requireTool('openssl');
  makeCa(srvDir, 'cryptmap test CA');
  makeCert(
    srvDir,
    srvDir,
    'server',
    'localhost',
    'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth',
  );
  makeCert(srvDir, cliDir, 'client', 'cryptmap client', 'extendedKeyUsage=clientAuth');
  copyFileSync(`${srvDir}/ca-cert.pem`, `${cliDir}/ca-cert.pem`);
  makeCa(otherDir, 'another CA');
  port = 20000 + Math.floor(Math.random() * 20000);
  tlsServer = await servers.start('nbdkit', (sock) => [
    '-f',
    '-U',
    sock,
    '--tls=require',
    `--tls-certificates=${srvDir}`,
    '--tls-verify-peer',
    'memory',
    '4M',
  ]);
});

test('nbds+unix with tls-certificates=DIR: verified both ways, data flows', async () => {
  for (const q of [`tls-certificates=${cliDir}&tls-hostname=localhost`, `tls-certificates=${cliDir}`]) {
    const dev = await NbdDevice.open(`nbds+unix:///?socket=${tlsServer.sock}&${q}`);
    const data = Buffer.alloc(1 << 20, 0x42);
    await dev.write(0, data);
    await dev.flush();
    const back = Buffer.alloc(1 << 20);
    await dev.read(0, back);
    assert.ok(back.equals(data));
    await dev.close();
  }
  const files = `x-tls-ca=${cliDir}/ca-cert.pem&x-tls-cert=${cliDir}/client-cert.pem&x-tls-key=${cliDir}/client-key.pem`;
  const dev = await NbdDevice.open(`nbds+unix:///?socket=${tlsServer.sock}&${files}`);
  await dev.read(0, Buffer.alloc(4096));
  await dev.close();
});

test('nbds:// over TCP checks the server name', async () => {
  // Waits for the pid file, which nbdkit writes once it listens.
  const tcp = await servers.start('nbdkit', (pid) => [
    '-f',
    '-P',
    pid,
    '-p',
    String(port),
    '-i',
    '127.0.0.1',
    '--tls=require',
    `--tls-certificates=${srvDir}`,
    'memory',
    '1M',
  ]);
  const dev = await NbdDevice.open(`nbds://localhost:${port}/?tls-certificates=${cliDir}`);
  await dev.read(0, Buffer.alloc(4096));
  await dev.close();
  await assert.rejects(
    NbdDevice.open(`nbds://127.0.0.1:${port}/?tls-certificates=${cliDir}&tls-hostname=storage.example`),
    { code: 'ENBDOPEN', message: /TLS handshake failed.*(altnames|Hostname)/i },
  );
  await tcp.stop();
});

test('TLS refusals are clear errors', async () => {
  await assert.rejects(NbdDevice.open(`nbd+unix:///?socket=${tlsServer.sock}`), {
    code: 'ENBDOPEN',
    exitCode: 4,
    message: /requires TLS: use an nbds/,
  });
  await assert.rejects(
    NbdDevice.open(
      `nbds+unix:///?socket=${tlsServer.sock}&x-tls-ca=${otherDir}/ca-cert.pem&x-tls-cert=${cliDir}/client-cert.pem&x-tls-key=${cliDir}/client-key.pem`,
    ),
    {
      code: 'ENBDOPEN',
      message: /TLS handshake failed/,
    },
  );
  // The server wants a client certificate; verify-peer=0 skips only the client's own check.
  await assert.rejects(NbdDevice.open(`nbds+unix:///?socket=${tlsServer.sock}&tls-verify-peer=0`), {
    code: 'ENBDOPEN',
  });
  const plain = await servers.start('nbdkit', (sock) => ['-f', '-U', sock, 'memory', '1M']);
  await assert.rejects(NbdDevice.open(`nbds+unix:///?socket=${plain.sock}&tls-certificates=${cliDir}`), {
    code: 'ENBDOPEN',
    message: /refused TLS/,
  });
  await plain.stop();
  await assert.rejects(NbdDevice.open(`nbds+unix:///?socket=${tlsServer.sock}&tls-certificates=${d}/nowhere`), {
    code: 'ENBDOPEN',
    message: /neither ca-cert.pem nor client-cert.pem/,
  });
});
