/**
 * A real etcd (Debian's etcd-server) for tests: one member on free loopback ports in a private data
 * dir, killed after the file's tests; and a TCP proxy in front of it whose `blackhole()` cuts one
 * node off (a network partition: nothing passes either way, nothing is closed). A missing etcd fails
 * the test with the package to install. Every wait has a deadline.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { makeTempDir } from '../helpers/tmp.js';
import { get as httpsGet } from 'node:https';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { after } from 'node:test';

export interface Etcd {
  url: string;
  proc: ChildProcess;
  /** SIGSTOP / SIGCONT the member (it answers nothing while stopped). */
  pause(): void;
  resume(): void;
  stop(): Promise<void>;
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

function accepts(port: number): Promise<boolean> {
  return new Promise((done) => {
    const c = connect(port, '127.0.0.1');
    c.once('connect', () => {
      c.destroy();
      done(true);
    });
    c.once('error', () => done(false));
  });
}

/** TLS for etcd's client port: its certificate and key, and the CA clients must be signed by (--client-cert-auth). */
export interface EtcdTls {
  certFile: string;
  keyFile: string;
  clientCaFile: string;
  /** A client certificate and key /health is asked with. */
  clientCert: Buffer;
  clientKey: Buffer;
  ca: Buffer;
}

/** /health over https with a client certificate. */
function healthTls(url: string, t: EtcdTls): Promise<boolean> {
  return new Promise((done) => {
    const req = httpsGet(`${url}/health`, { ca: t.ca, cert: t.clientCert, key: t.clientKey, timeout: 2000 }, (res) => {
      let body = '';
      res.on('data', (d: Buffer) => (body += d.toString()));
      res.on('end', () => done(res.statusCode === 200 && /"health":"true"/.test(body)));
    });
    req.on('error', () => done(false));
    req.on('timeout', () => req.destroy());
  });
}

/** Start etcd; resolves once its client port accepts connections and it answers /health. */
export async function startEtcd(tls?: EtcdTls): Promise<Etcd> {
  const { dir, cleanup: removeDir } = makeTempDir('cm-etcd-');
  const client = await freePort();
  const peer = await freePort();
  const url = `${tls ? 'https' : 'http'}://127.0.0.1:${client}`;
  const proc = spawn(
    'etcd',
    [
      '--name',
      'test',
      '--data-dir',
      join(dir, 'data'),
      '--listen-client-urls',
      url,
      '--advertise-client-urls',
      url,
      '--listen-peer-urls',
      `http://127.0.0.1:${peer}`,
      '--initial-advertise-peer-urls',
      `http://127.0.0.1:${peer}`,
      '--initial-cluster',
      `test=http://127.0.0.1:${peer}`,
      '--log-level',
      'error',
      ...(tls
        ? [
            '--cert-file',
            tls.certFile,
            '--key-file',
            tls.keyFile,
            '--trusted-ca-file',
            tls.clientCaFile,
            '--client-cert-auth',
          ]
        : []),
    ],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let err = '';
  let spawnError: Error | undefined;
  proc.on('error', (e) => (spawnError = e));
  proc.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const t0 = Date.now();
  for (;;) {
    if (spawnError)
      throw new Error(
        `etcd cannot be started (${spawnError.message}): install the Debian package etcd-server (scripts/install-deps.sh)`,
      );
    if (proc.exitCode !== null) throw new Error(`etcd exited ${proc.exitCode}: ${err}`);
    if (Date.now() - t0 > 30_000) {
      proc.kill('SIGKILL');
      throw new Error(`etcd did not answer on ${url} within 30 s: ${err}`);
    }
    if (tls && (await accepts(client))) {
      if (await healthTls(url, tls)) break;
    } else if (await accepts(client)) {
      try {
        const r = await fetch(`${url}/health`, { signal: AbortSignal.timeout(2000) });
        if (r.ok && ((await r.json()) as { health?: string }).health === 'true') break;
      } catch {}
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  const stop = async () => {
    if (proc.exitCode === null && proc.signalCode === null) {
      const done = new Promise((r) => proc.once('exit', r));
      proc.kill('SIGCONT');
      proc.kill('SIGKILL');
      await done;
    }
    removeDir();
  };
  after(stop);
  return { url, proc, pause: () => proc.kill('SIGSTOP'), resume: () => proc.kill('SIGCONT'), stop };
}

export interface Proxy {
  url: string;
  /** Stop forwarding both ways (connections stay open, bytes are dropped; new ones hang). */
  blackhole(): void;
  heal(): void;
  close(): Promise<void>;
}

/** A TCP proxy on a free loopback port in front of `target` (an http://127.0.0.1:PORT URL). */
export async function startProxy(target: string): Promise<Proxy> {
  const port = Number(new URL(target).port);
  let cut = false;
  const socks = new Set<Socket>();
  const server: Server = createServer((down) => {
    socks.add(down);
    const up = connect(port, '127.0.0.1');
    socks.add(up);
    down.on('data', (d) => {
      if (!cut) up.write(d);
    });
    up.on('data', (d) => {
      if (!cut) down.write(d);
    });
    const end = () => {
      down.destroy();
      up.destroy();
      socks.delete(down);
      socks.delete(up);
    };
    down.on('error', end).on('close', end);
    up.on('error', end).on('close', end);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const url = `http://127.0.0.1:${(server.address() as { port: number }).port}`;
  const close = async () => {
    for (const s of socks) s.destroy();
    await new Promise((r) => server.close(r));
  };
  after(close);
  return {
    url,
    blackhole: () => {
      cut = true;
    },
    heal: () => {
      // The cut streams lost bytes mid-frame: drop them, clients reconnect.
      for (const s of socks) s.destroy();
      cut = false;
    },
    close,
  };
}
