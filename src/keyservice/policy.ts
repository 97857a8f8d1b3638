/**
 * Authorization policy: which client identity may ask for which services' keys.
 *
 * File (YAML or JSON, chosen by content; YAML is a superset):
 *   version: 1
 *   clients:
 *     - identity: local            # any process that can connect to the Unix socket (mode 0600:
 *       services: ["*"]            #   keyd's own uid, and root)
 *     - identity: cn:node-b.example  # an HTTPS client whose verified certificate has this subject CN
 *       services: [web, "db-*"]
 *       purposes: [scratch]        # optional, default: all purposes
 *     - identity: token:backup     # a Unix socket client presenting a token whose SHA-256 is:
 *       tokenSha256: 5e884898...   #   (hex, 64 digits; the token itself is never stored here)
 *       services: [db]
 * A service pattern is an exact name, or a prefix followed by `*`. Anything not granted is refused.
 * Identity forms: `local`, `cn:<subject CN>`, `token:<name>`.
 */
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { parse as parseYaml } from 'yaml';
import { constantTimeEqual, fromHex } from '../util/bytes.js';
import { CryptmapError, fromSystemError } from '../util/errors.js';
import { KEY_PURPOSES, type KeyPurpose } from './derive.js';

export interface PolicyClient {
  identity: string;
  services: string[];
  purposes: KeyPurpose[];
  tokenSha256?: Buffer;
}

export interface Policy {
  clients: PolicyClient[];
}

/** The policy used when none is given: local (same-uid) clients may ask for every service. */
export const DEFAULT_POLICY: Policy = {
  clients: [{ identity: 'local', services: ['*'], purposes: [...KEY_PURPOSES] }],
};

const IDENTITY_RE = /^(local|cn:[^\s]{1,255}|token:[A-Za-z0-9][A-Za-z0-9._-]{0,63})$/;
const PATTERN_RE = /^(\*|[A-Za-z0-9][A-Za-z0-9._-]{0,63}\*?)$/;

function bad(where: string, msg: string): never {
  throw new CryptmapError('EPOLICY', `${where}: ${msg}`);
}

/** Validate a parsed policy document (strict: unknown keys are errors). */
export function policyFromObject(doc: unknown, where = 'policy'): Policy {
  if (typeof doc !== 'object' || doc === null || Array.isArray(doc))
    bad(where, 'must be a mapping with version and clients');
  const d = doc as Record<string, unknown>;
  for (const k of Object.keys(d)) if (k !== 'version' && k !== 'clients') bad(where, `unknown key '${k}'`);
  if (d.version !== 1) bad(where, 'version must be 1');
  if (!Array.isArray(d.clients)) bad(where, 'clients must be a list');
  const clients: PolicyClient[] = [];
  const seen = new Set<string>();
  d.clients.forEach((c: unknown, i: number) => {
    const at = `${where}: clients[${i}]`;
    if (typeof c !== 'object' || c === null || Array.isArray(c)) bad(at, 'must be a mapping');
    const o = c as Record<string, unknown>;
    for (const k of Object.keys(o))
      if (!['identity', 'services', 'purposes', 'tokenSha256'].includes(k)) bad(at, `unknown key '${k}'`);
    if (typeof o.identity !== 'string' || !IDENTITY_RE.test(o.identity))
      bad(`${at}.identity`, "must be 'local', 'cn:<name>' or 'token:<name>'");
    if (seen.has(o.identity)) bad(`${at}.identity`, `'${o.identity}' is listed twice`);
    seen.add(o.identity);
    if (!Array.isArray(o.services) || o.services.some((s) => typeof s !== 'string' || !PATTERN_RE.test(s))) {
      bad(`${at}.services`, "must be a list of service names or prefixes ending in '*'");
    }
    let purposes: KeyPurpose[] = [...KEY_PURPOSES];
    if (o.purposes !== undefined) {
      if (!Array.isArray(o.purposes) || o.purposes.some((p) => !(KEY_PURPOSES as readonly unknown[]).includes(p))) {
        bad(`${at}.purposes`, `must be a list of ${KEY_PURPOSES.join(', ')}`);
      }
      purposes = o.purposes as KeyPurpose[];
    }
    const client: PolicyClient = { identity: o.identity, services: o.services as string[], purposes };
    if (o.identity.startsWith('token:')) {
      if (typeof o.tokenSha256 !== 'string' || !/^[0-9a-fA-F]{64}$/.test(o.tokenSha256))
        bad(`${at}.tokenSha256`, 'a token client needs tokenSha256 (64 hex digits)');
      client.tokenSha256 = fromHex(o.tokenSha256);
    } else if (o.tokenSha256 !== undefined) {
      bad(`${at}.tokenSha256`, 'only token:<name> identities take a tokenSha256');
    }
    clients.push(client);
  });
  return { clients };
}

export async function loadPolicy(path: string): Promise<Policy> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (e) {
    throw fromSystemError('EPOLICY', `cannot read policy ${path}`, e);
  }
  let doc: unknown;
  try {
    doc = parseYaml(text);
  } catch (e) {
    throw new CryptmapError('EPOLICY', `${path}: not valid YAML/JSON: ${(e as Error).message}`);
  }
  return policyFromObject(doc, path);
}

function matches(pattern: string, service: string): boolean {
  return pattern.endsWith('*') ? service.startsWith(pattern.slice(0, -1)) : pattern === service;
}

/** May `identity` have the key of (purpose, service)? */
export function isAllowed(policy: Policy, identity: string, purpose: KeyPurpose, service: string): boolean {
  const c = policy.clients.find((x) => x.identity === identity);
  return c?.purposes.includes(purpose) === true && c.services.some((p) => matches(p, service));
}

/** The identity a Unix-socket token belongs to, or undefined. Compares SHA-256 digests in constant time. */
export function identityForToken(policy: Policy, token: string): string | undefined {
  const h = createHash('sha256').update(token, 'utf8').digest();
  let found: string | undefined;
  for (const c of policy.clients) if (c.tokenSha256 && constantTimeEqual(c.tokenSha256, h)) found = c.identity;
  return found;
}

/** The hex SHA-256 of a token, for writing a policy entry. */
export function tokenDigest(token: string): string {
  return createHash('sha256').update(token, 'utf8').digest('hex');
}
