/**
 * `cryptmap daemon`: owns mapped devices and serves each over NBD (export name = mapping name) on
 * `<runtime-dir>/nbd.sock`; takes CLI requests on `<runtime-dir>/control.sock`. Foreground by
 * default (systemd style); `--detach` forks a background daemon and returns once it answers.
 *
 *   cryptmap daemon [--runtime-dir DIR] [--detach] [--crypt-threads N] [--metrics [HOST:]PORT [--metrics-token-file F]]
 *                   [--listen HOST:PORT (--tls require --tls-cert PEM --tls-key PEM --tls-ca PEM --tls-verify-client | --insecure-tcp)]
 *
 * NBD over TCP serves decrypted volumes, so it requires TLS with client certificates verified
 * against --tls-ca, loopback included (any local user reaches 127.0.0.1); `--insecure-tcp` opts out
 * and is warned about at every start. The --tls options apply to the TCP listener only: the Unix
 * socket (0600 in the private runtime dir) stays plaintext, so local attach needs no certificate.
 *
 * `--crypt-threads N` sizes the crypt thread pool (dm-crypt's kcryptd; default: the CPU count). Those
 * threads also do the file I/O of crypt requests above 64 KiB (pread + decrypt, encrypt + pwrite in
 * one job), so N is also how many such requests wait on storage at once: raise it for storage with
 * high latency (network or rotating disks).
 *
 * `--metrics [HOST:]PORT` serves Prometheus metrics (daemon/metrics.ts; loopback unless a HOST is
 * given, and then only with --metrics-token-file: docs/operations.md). Under systemd it reports
 * readiness (util/sd-notify.ts) and takes its control socket from socket activation when passed.
 */
import { spawn } from 'node:child_process';
import { closeSync, readFileSync, rmSync } from 'node:fs';
import { isIPv4 } from 'node:net';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { ControlClient } from '../../control/client.js';
import { controlSocketPath, ensureRuntimeDir, nbdSocketPath, runtimeDir } from '../../control/runtime-dir.js';
import { ControlServer } from '../../control/server.js';
import { DaemonCore } from '../../daemon/core.js';
import { setCryptThreads } from '../../engine/index.js';
import { daemonHandlers } from '../../daemon/handlers.js';
import { registerDaemonMetrics } from '../../daemon/metrics.js';
import {
  checkMetricsOptions,
  METRICS_OPTIONS,
  METRICS_USAGE,
  metricsRegistry,
  serveMetricsOption,
} from '../metrics-option.js';
import type { NbdServerOptions, NbdTlsMode } from '../../nbd/types.js';
import { CryptmapError, fromSystemError } from '../../util/errors.js';
import { disableCoreDumps } from '../../util/dumpable.js';
import { logger } from '../../util/log.js';
import { listenFds, sdNotifier } from '../../util/sd-notify.js';
import { openTrustedAppend, writeFileReplacing } from '../../util/trusted-path.js';
import type { VerbMain } from '../types.js';

const log = logger('daemon');

function readTlsFile(flag: string, path: string): Buffer {
  try {
    return readFileSync(path);
  } catch (e) {
    throw fromSystemError('EARGS', `${flag} ${path}`, e);
  }
}

/** A loopback address: localhost, ::1, or an IPv4 address in 127.0.0.0/8 (also IPv4-mapped). Names are not resolved. */
export function isLoopback(host: string): boolean {
  const h = host.toLowerCase().replace(/^::ffff:/, '');
  if (h === 'localhost' || h === '::1' || h === '0:0:0:0:0:0:0:1') return true;
  return isIPv4(h) && h.startsWith('127.');
}

const daemon: VerbMain = async (argv, io) => {
  const { values } = parseArgs({
    args: argv.slice(1),
    options: {
      'runtime-dir': { type: 'string' },
      detach: { type: 'boolean' },
      listen: { type: 'string' },
      tls: { type: 'string' },
      'tls-cert': { type: 'string' },
      'tls-key': { type: 'string' },
      'tls-ca': { type: 'string' },
      'tls-verify-client': { type: 'boolean' },
      'insecure-tcp': { type: 'boolean' },
      'crypt-threads': { type: 'string' },
      ...METRICS_OPTIONS,
      help: { type: 'boolean', short: 'h' },
    },
    strict: true,
    allowPositionals: false,
  });
  if (values.help) {
    io.stdout.write(
      `usage: cryptmap daemon [--runtime-dir DIR] [--detach] [--crypt-threads N] [--listen HOST:PORT (--tls require --tls-cert F --tls-key F --tls-ca F --tls-verify-client | --insecure-tcp)] ${METRICS_USAGE}\n`,
    );
    return 0;
  }
  let cryptThreads: number | undefined;
  if (values['crypt-threads'] !== undefined) {
    cryptThreads = Number(values['crypt-threads']);
    if (!/^[0-9]+$/.test(values['crypt-threads']) || cryptThreads < 1 || cryptThreads > 256) {
      throw new CryptmapError(
        'EARGS',
        `--crypt-threads wants a number of threads from 1 to 256 (got '${values['crypt-threads']}')`,
      );
    }
  }
  checkMetricsOptions(values);
  const dir = runtimeDir(values['runtime-dir'], io.env);
  ensureRuntimeDir(dir);

  if (values.detach) return detach(argv, dir, io);

  const nbdOpts: NbdServerOptions = {};
  const tls = (values.tls ?? (values['tls-cert'] ? 'on' : 'off')) as NbdTlsMode;
  if (!['off', 'on', 'require'].includes(tls))
    throw new CryptmapError('EARGS', `--tls must be off, on or require (got '${tls}')`);
  if (tls !== 'off') {
    if (!values['tls-cert'] || !values['tls-key'])
      throw new CryptmapError('EARGS', '--tls needs --tls-cert and --tls-key');
    // Credentials only: the TCP listener takes the --tls policy, the Unix socket stays plaintext.
    nbdOpts.tlsCredentials = {
      cert: readTlsFile('--tls-cert', values['tls-cert']),
      key: readTlsFile('--tls-key', values['tls-key']),
      ...(values['tls-ca'] ? { ca: readTlsFile('--tls-ca', values['tls-ca']) } : {}),
      verifyClient: values['tls-verify-client'] ?? false,
    };
  }
  let tcp: { host: string; port: number; tls: NbdTlsMode } | undefined;
  if (values['insecure-tcp'] && !values.listen)
    throw new CryptmapError('EARGS', '--insecure-tcp only goes with --listen HOST:PORT');
  if (values.listen) {
    const m = /^(?:\[([^\]]+)\]|([^:]+)):([0-9]{1,5})$/.exec(values.listen);
    if (!m) throw new CryptmapError('EARGS', `--listen wants HOST:PORT (got '${values.listen}')`);
    tcp = { host: m[1] ?? m[2] ?? '127.0.0.1', port: Number(m[3]), tls };
    const authenticated = tls === 'require' && values['tls-verify-client'] === true && values['tls-ca'] !== undefined;
    if (!authenticated && !values['insecure-tcp']) {
      // Anyone who reaches the port, loopback included (every local user), would read and write the decrypted volumes.
      throw new CryptmapError(
        'EARGS',
        `--listen ${values.listen} would serve decrypted volumes to whoever connects${isLoopback(tcp.host) ? ' (on loopback: every local user)' : ''}: add --tls require --tls-cert F --tls-key F --tls-ca F --tls-verify-client (clients then show a certificate signed by that CA), or --insecure-tcp to serve without authentication`,
      );
    }
    if (!authenticated) {
      log.warn(
        `NBD over TCP without client authentication (--insecure-tcp): ${isLoopback(tcp.host) ? 'every local user' : 'anyone who reaches the address'} can read and write the decrypted volumes`,
        { listen: values.listen },
      );
    }
  }

  disableCoreDumps('daemon');
  if (cryptThreads !== undefined) setCryptThreads(cryptThreads);
  const core = new DaemonCore({ nbdSocketPath: nbdSocketPath(dir), attachDir: join(dir, 'attach'), nbd: nbdOpts });
  const control = new ControlServer(daemonHandlers(core));
  const sd = sdNotifier(io.env, 'daemon');
  // Socket activation (contrib/systemd/cryptmap-daemon.socket): the control socket systemd holds.
  const fds = listenFds(io.env);
  const activated = fds.find((f) => f.name === 'control') ?? (fds.length === 1 ? fds[0] : undefined);
  if (activated) await control.listenFd(activated.fd);
  else await control.listen(controlSocketPath(dir));
  const registry = metricsRegistry(values, 'daemon');
  if (registry) registerDaemonMetrics(registry, core);
  let metrics: Awaited<ReturnType<typeof serveMetricsOption>>;
  try {
    await core.listen(tcp);
    metrics = await serveMetricsOption(values, registry);
  } catch (e) {
    await control.close();
    await core.shutdown();
    throw e;
  }
  // The signals are handled before the pid file and READY=1 say we are up: a SIGTERM sent on either
  // must shut down cleanly (sockets, mapped devices, pid file), not kill the process by default.
  const stopped = new Promise<void>((resolve) => {
    const stop = (sig: string) => {
      log.info('shutting down', { signal: sig });
      process.off('SIGTERM', onTerm);
      process.off('SIGINT', onInt);
      resolve();
    };
    const onTerm = () => stop('SIGTERM');
    const onInt = () => stop('SIGINT');
    process.on('SIGTERM', onTerm);
    process.on('SIGINT', onInt);
  });
  const pidFile = join(dir, 'daemon.pid');
  // Never through a link someone planted: a new file renamed over the name.
  writeFileReplacing(pidFile, `${process.pid}\n`, 0o600, { code: 'ERUNDIR' });
  log.info('daemon ready', {
    control: controlSocketPath(dir),
    nbd: nbdSocketPath(dir),
    ...(tcp ? { tcp: `${tcp.host}:${tcp.port}` } : {}),
    ...(activated ? { activated: true } : {}),
  });
  sd.ready(
    `serving: control ${controlSocketPath(dir)}${activated ? ' (socket-activated)' : ''}, nbd ${nbdSocketPath(dir)}${tcp ? `, tcp ${tcp.host}:${tcp.port}` : ''}${metrics ? `, metrics ${metrics.url}` : ''}`,
  );

  await stopped;
  sd.stopping('stopping: closing exports and mapped devices');
  await metrics?.close();
  await control.close();
  await core.shutdown();
  rmSync(pidFile, { force: true });
  sd.close();
  log.info('daemon stopped');
  return 0;
};

/** Start the same command without --detach in the background; return once it answers a ping. */
async function detach(argv: string[], dir: string, io: Parameters<VerbMain>[1]): Promise<number> {
  const args = argv.filter((a) => a !== '--detach');
  const logFile = join(dir, 'daemon.log');
  // O_NOFOLLOW and an fstat owner check: a planted link or another user's file is refused.
  const out = openTrustedAppend(logFile, { code: 'ERUNDIR' });
  const entry = process.argv[1] ?? new URL('../entry.js', import.meta.url).pathname;
  const child = spawn(process.execPath, [entry, ...args], { detached: true, stdio: ['ignore', out, out], env: io.env });
  child.unref();
  closeSync(out);
  // About 10 s for the child to answer a ping; each ping has its own short deadline (a process that
  // accepts on the socket and never answers must not hold `--detach` for ever).
  const deadline = Date.now() + 10_000;
  while (Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 100));
    try {
      const c = await ControlClient.connect(dir, { requestTimeoutMs: 2_000 });
      try {
        await c.call('daemon.ping');
      } finally {
        c.close();
      }
      io.stdout.write(`${child.pid}\n`);
      return 0;
    } catch {
      if (child.exitCode !== null) break;
    }
  }
  throw new CryptmapError('EDAEMON_START', `the daemon did not start; see ${logFile}`, { exitCode: 1 });
}

export default daemon;
