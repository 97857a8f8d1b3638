/**
 * X.509 test certificates made by openssl (P-256, valid 2 days): a CA, and certificates it signs
 * with the extensions a test names (server names, key usages). Shared by the TLS interop tests.
 */
import { execFileSync } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { requireTool } from './tools.js';

function openssl(args: string[]): void {
  execFileSync('openssl', args, { stdio: 'ignore' });
}

/**
 * A CA in `dir` (ca-cert.pem, ca-key.pem): a self-signed certificate, with `addext` (e.g.
 * `subjectAltName=DNS:localhost`) when it is also used as a server's own certificate.
 */
export function makeCa(dir: string, cn: string, addext?: string): void {
  requireTool('openssl');
  mkdirSync(dir, { recursive: true });
  openssl([
    'req',
    '-x509',
    '-newkey',
    'ec',
    '-pkeyopt',
    'ec_paramgen_curve:P-256',
    '-nodes',
    '-keyout',
    `${dir}/ca-key.pem`,
    '-out',
    `${dir}/ca-cert.pem`,
    '-days',
    '2',
    '-subj',
    `/CN=${cn}`,
    ...(addext ? ['-addext', addext] : []),
  ]);
}

/** A certificate signed by the CA in `caDir`: `${dir}/${name}-cert.pem` and `-key.pem`. */
export function makeCert(caDir: string, dir: string, name: string, cn: string, ext: string): void {
  mkdirSync(dir, { recursive: true });
  const key = `${dir}/${name}-key.pem`;
  const csr = `${dir}/${name}.csr`;
  const extFile = `${dir}/${name}.ext`;
  execFileSync('sh', ['-c', `printf '%s\\n' "$1" > "$2"`, 'sh', ext, extFile]);
  openssl([
    'req',
    '-newkey',
    'ec',
    '-pkeyopt',
    'ec_paramgen_curve:P-256',
    '-nodes',
    '-keyout',
    key,
    '-out',
    csr,
    '-subj',
    `/CN=${cn}`,
  ]);
  openssl([
    'x509',
    '-req',
    '-in',
    csr,
    '-CA',
    `${caDir}/ca-cert.pem`,
    '-CAkey',
    `${caDir}/ca-key.pem`,
    '-CAcreateserial',
    '-out',
    `${dir}/${name}-cert.pem`,
    '-days',
    '2',
    '-extfile',
    extFile,
  ]);
}
