/**
 * `cryptmap keyd`: run the key service (docs/keyservice.md).
 *
 *   cryptmap keyd --state-dir DIR [--socket PATH] [--listen HOST:PORT --tls-cert F --tls-key F --tls-ca F]
 *                 [--policy FILE] [--passphrase-file FILE] [--root-secret-file FILE] [--audit-log FILE]
 *                 [--metrics [HOST:]PORT [--metrics-token-file F]]
 *   cryptmap keyd token NAME      print a new client token and its policy entry
 *   cryptmap keyd rotate-root begin|commit --state-dir DIR [--passphrase-file F] [--root-secret-file F]
 *                                 a root rotation (docs/keyservice.md): a next root secret, then it
 *                                 replaces the current one (kept as previous)
 *
 * Serves until SIGINT or SIGTERM; SIGHUP reloads the policy file and the root secrets (a rotation).
 */
import { readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { type AuditSink, openAuditFile, rateLimitedAudit } from '../../keyservice/audit.js';
import { isValidName } from '../../keyservice/derive.js';
import { DEFAULT_POLICY, loadPolicy, tokenDigest } from '../../keyservice/policy.js';
import {
  beginRootRotation,
  commitRootRotation,
  loadOrCreateRootSecret,
  loadRootGenerations,
  readPassphraseFile,
} from '../../keyservice/root-secret.js';
import { listenTls, listenUnix, newClientToken, type RunningServer } from '../../keyservice/server.js';
import { disableCoreDumps } from '../../util/dumpable.js';
import { KeyService } from '../../keyservice/service.js';
import { CryptmapError, fromSystemError } from '../../util/errors.js';
import type { Secret } from '../../util/secret.js';
import { sdNotifier } from '../../util/sd-notify.js';
import type { VerbMain } from '../types.js';
import { countingAudit } from '../../keyservice/metrics.js';
import { checkMetricsOptions, METRICS_OPTIONS, metricsRegistry, serveMetricsOption } from '../metrics-option.js';
import type { MetricsServer } from '../../util/metrics-http.js';

const HELP = `usage: cryptmap keyd --state-dir DIR [options]
       cryptmap keyd token NAME
       cryptmap keyd rotate-root begin|commit --state-dir DIR [--passphrase-file F] [--root-secret-file F]

  --state-dir DIR         root secret (root.key, 0600) and audit log live here (dir 0700)
  --socket PATH           Unix socket (mode 0600; default DIR/keyd.sock)
  --listen HOST:PORT      also serve HTTPS with client certificates (needs the three --tls-*)
  --tls-cert F --tls-key F --tls-ca F   server certificate and key (PEM), CA for client certificates
  --policy FILE           who may have which keys (YAML/JSON; default: local clients, all services)
  --passphrase-file FILE  keep the root secret wrapped by this passphrase (Argon2id; FILE 0600)
  --root-secret-file FILE use the root secret kept in FILE (raw, or wrapped with --passphrase-file;
                          another disk or a removable medium) instead of DIR/root.key; never created
  --audit-log FILE        JSON lines (default DIR/audit.log)
  --metrics [HOST:]PORT   Prometheus metrics on http://HOST:PORT/metrics (default host 127.0.0.1)
  --metrics-token-file F  scrapes must send 'Authorization: Bearer <token in F>' (needed off loopback)
`;

function parseListen(s: string): { host: string; port: number } {
  const m = /^(\[[^\]]+\]|[^:]+):([0-9]{1,5})$/.exec(s);
  const port = m ? Number(m[2]) : Number.NaN;
  if (!m || port > 65535) throw new CryptmapError('EARGS', `--listen '${s}' must be HOST:PORT`);
  return { host: m[1]!.replace(/^\[|\]$/g, ''), port };
}

function readFileArg(flag: string, p: string): Buffer {
  try {
    return readFileSync(p);
  } catch (e) {
    throw fromSystemError('EARGS', `${flag} ${p}`, e);
  }
}

/** Strict flag parsing (unknown flags and positionals are errors). */
function parse(argv: string[], skip = 1) {
  return parseArgs({
    args: argv.slice(skip),
    options: {
      'state-dir': { type: 'string' },
      socket: { type: 'string' },
      listen: { type: 'string' },
      'tls-cert': { type: 'string' },
      'tls-key': { type: 'string' },
      'tls-ca': { type: 'string' },
      policy: { type: 'string' },
      'passphrase-file': { type: 'string' },
      'root-secret-file': { type: 'string' },
      'audit-log': { type: 'string' },
      ...METRICS_OPTIONS,
      help: { type: 'boolean', short: 'h' },
    },
    strict: true,
    allowPositionals: false,
  });
}

const keyd: VerbMain = async (argv, io) => {
  if (argv[1] === 'token') {
    const name = argv[2];
    if (name === undefined || !isValidName(name))
      throw new CryptmapError('EARGS', 'usage: cryptmap keyd token NAME (NAME: letters, digits, . _ -)');
    const token = newClientToken();
    io.stdout.write(`token: ${token}\n# policy entry (store the token in the client's 0600 token file, not here):\n`);
    io.stdout.write(`- identity: token:${name}\n  tokenSha256: ${tokenDigest(token)}\n  services: []\n`);
    return 0;
  }
  if (argv[1] === 'rotate-root') return rotateRoot(argv, io);
  let values: ReturnType<typeof parse>['values'];
  try {
    ({ values } = parse(argv));
  } catch (e) {
    throw new CryptmapError('EARGS', `cryptmap keyd: ${(e as Error).message}\n${HELP}`);
  }
  if (values.help) {
    io.stdout.write(HELP);
    return 0;
  }
  if (!values['state-dir']) throw new CryptmapError('EARGS', `--state-dir is required\n${HELP}`);
  checkMetricsOptions(values);
  disableCoreDumps('keyd');
  const stateDir = resolve(values['state-dir']);
  const tls = [values['tls-cert'], values['tls-key'], values['tls-ca']];
  if (values.listen && tls.some((x) => !x))
    throw new CryptmapError('EARGS', '--listen needs --tls-cert, --tls-key and --tls-ca');
  if (!values.listen && tls.some((x) => x)) throw new CryptmapError('EARGS', '--tls-* options need --listen HOST:PORT');
  const listen = values.listen ? parseListen(values.listen) : undefined;
  const policyPath = values.policy ? resolve(values.policy) : undefined;
  let policy = policyPath ? await loadPolicy(policyPath) : DEFAULT_POLICY;

  let passphrase: Secret | undefined;
  // A trailing newline from `echo` is dropped; the file must be ours and 0600 (O_NOFOLLOW, fstat).
  if (values['passphrase-file']) passphrase = readPassphraseFile(resolve(values['passphrase-file']));
  let root: Awaited<ReturnType<typeof loadOrCreateRootSecret>>;
  let gens: Awaited<ReturnType<typeof loadRootGenerations>>;
  const rootFile = values['root-secret-file'] ? resolve(values['root-secret-file']) : undefined;
  const passphraseFile = values['passphrase-file'] ? resolve(values['passphrase-file']) : undefined;
  const loadRoots = async (pass: Secret | undefined) => {
    const r = await loadOrCreateRootSecret(stateDir, {
      ...(pass ? { passphrase: pass } : {}),
      ...(rootFile ? { rootFile } : {}),
    });
    try {
      return { r, g: await loadRootGenerations(r, pass) };
    } catch (e) {
      r.secret.dispose();
      throw e;
    }
  };
  try {
    ({ r: root, g: gens } = await loadRoots(passphrase));
  } finally {
    passphrase?.dispose(); // also when unwrapping fails (wrong passphrase, damaged file)
  }
  let audit: AuditSink | undefined;
  const sd = sdNotifier(io.env, 'keyd');
  const servers: RunningServer[] = [];
  let tlsKey: Buffer | undefined;
  let metrics: MetricsServer | undefined;
  try {
    audit = rateLimitedAudit(
      await openAuditFile(values['audit-log'] ? resolve(values['audit-log']) : join(stateDir, 'audit.log')),
    );
    const registry = metricsRegistry(values, 'keyd');
    if (registry) audit = countingAudit(audit, registry);
    const service = new KeyService({ root: root.secret, roots: gens, policy, audit });
    io.stdout.write(
      `keyd: root secret ${root.created ? 'created' : 'loaded'} (${root.wrapped ? 'wrapped' : 'raw'}) at ${root.path}\n`,
    );
    const socketPath = resolve(values.socket ?? join(stateDir, 'keyd.sock'));
    servers.push(await listenUnix(service, socketPath));
    io.stdout.write(`keyd: listening on unix:${socketPath}\n`);
    if (listen) {
      tlsKey = readFileArg('--tls-key', tls[1]!);
      const s = await listenTls(service, {
        host: listen.host,
        port: listen.port,
        cert: readFileArg('--tls-cert', tls[0]!),
        key: tlsKey,
        ca: readFileArg('--tls-ca', tls[2]!),
      });
      servers.push(s);
      io.stdout.write(`keyd: listening on ${s.address}\n`);
    }
    metrics = await serveMetricsOption(values, registry);
    if (metrics) io.stdout.write(`keyd: metrics on ${metrics.url}\n`);
    const serving = `serving: unix:${socketPath}${servers[1] ? `, ${servers[1].address}` : ''}${metrics ? `, metrics ${metrics.url}` : ''}`;
    await new Promise<void>((res) => {
      const stop = () => {
        process.off('SIGINT', stop);
        process.off('SIGTERM', stop);
        process.off('SIGHUP', reload);
        res();
      };
      const reload = () => {
        // A root rotation begun or committed since the start: the root secret files again.
        const pass = passphraseFile ? readPassphraseFile(passphraseFile) : undefined;
        loadRoots(pass)
          .then(
            ({ r, g }) => {
              service.setRoots(r.secret, g);
              io.stdout.write(`keyd: root secrets reloaded (${service.rootGenerations.join(', ')})\n`);
            },
            (e) => io.stderr.write(`keyd: root secrets not reloaded: ${(e as Error).message}\n`),
          )
          .finally(() => pass?.dispose());
        if (!policyPath) return;
        sd.reloading('reloading the policy');
        loadPolicy(policyPath).then(
          (p) => {
            policy = p;
            service.setPolicy(p);
            io.stdout.write('keyd: policy reloaded\n');
            sd.ready(serving);
          },
          (e) => {
            io.stderr.write(`keyd: policy not reloaded: ${(e as Error).message}\n`);
            sd.ready(`${serving}; last policy reload failed: ${(e as Error).message}`);
          },
        );
      };
      process.on('SIGINT', stop);
      process.on('SIGTERM', stop);
      process.on('SIGHUP', reload);
      // READY=1 only once the signals are handled: a SIGHUP right after it must reload, not kill keyd.
      sd.ready(serving);
    });
    io.stdout.write('keyd: stopping\n');
    sd.stopping('stopping');
    return 0;
  } finally {
    sd.close();
    await metrics?.close();
    for (const s of servers) await s.close();
    tlsKey?.fill(0);
    await audit?.close();
    root.secret.dispose();
  }
};

/** `cryptmap keyd rotate-root begin|commit` (root-secret.ts beginRootRotation, commitRootRotation). */
async function rotateRoot(argv: string[], io: Parameters<VerbMain>[1]): Promise<number> {
  const step = argv[2];
  let values: ReturnType<typeof parse>['values'];
  try {
    ({ values } = parse(argv, 3));
  } catch (e) {
    throw new CryptmapError('EARGS', `cryptmap keyd rotate-root: ${(e as Error).message}\n${HELP}`);
  }
  if ((step !== 'begin' && step !== 'commit') || !values['state-dir'])
    throw new CryptmapError(
      'EARGS',
      `usage: cryptmap keyd rotate-root begin|commit --state-dir DIR [--passphrase-file F] [--root-secret-file F]`,
    );
  const stateDir = resolve(values['state-dir']);
  const rootFile = values['root-secret-file'] ? resolve(values['root-secret-file']) : undefined;
  const passphrase = values['passphrase-file'] ? readPassphraseFile(resolve(values['passphrase-file'])) : undefined;
  try {
    // The current one must load (right passphrase) before a rotation begins or commits.
    const cur = await loadOrCreateRootSecret(stateDir, {
      ...(passphrase ? { passphrase } : {}),
      ...(rootFile ? { rootFile } : {}),
    });
    cur.secret.dispose();
    if (step === 'begin') {
      const made = await beginRootRotation(cur, passphrase);
      io.stdout.write(
        made
          ? `keyd: root rotation begun (${cur.path}.next); rewrap every volume (cryptmap volume rewrap-keys), then commit\n`
          : `keyd: a root rotation was begun already (${cur.path}.next kept)\n`,
      );
    } else {
      await commitRootRotation(cur.path);
      io.stdout.write(`keyd: root rotation committed (the old root secret is kept as ${cur.path}.previous)\n`);
    }
    io.stdout.write('keyd: a running keyd reads the root secrets again on SIGHUP\n');
    return 0;
  } finally {
    passphrase?.dispose();
  }
}
export default keyd;
