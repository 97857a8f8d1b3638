/**
 * The key service core, independent of transport: authorize a request by the caller's identity,
 * derive the key, and audit the decision. Transports (server.ts) only establish the identity.
 *
 * Wire messages (JSON objects; over the Unix socket one per line, over HTTPS the POST body):
 *   request:  {"id": any, "op": "derive", "purpose": "scratch"|"swap", "service": S, "volume": V,
 *              "length": 32|64, "generation"?: "current"|"next"|"previous", "token"?: T}
 *              ("token" only on the Unix socket; "generation": which root secret, see RootSecrets)
 *             {"id": any, "op": "ping"}
 *   response: {"id": any, "ok": true, "key": "<hex>"}           (derive)
 *             {"id": any, "ok": true, "version": "v1"}          (ping)
 *             {"id": any, "ok": false, "code": C, "message": M} (C: EKEYREQ, EACCES, ENOROOT, EINTERNAL)
 * Keys travel as hex inside the trust boundary (the 0600 socket, or mutual TLS) and are never logged.
 */
import { toHex } from '../util/bytes.js';
import { isCryptmapError } from '../util/errors.js';
import type { Secret } from '../util/secret.js';
import type { AuditSink } from './audit.js';
import { type DeriveRequest, deriveKey, validateDeriveRequest } from './derive.js';
import { isAllowed, type Policy } from './policy.js';

export const PROTOCOL_VERSION = 'v1';
/** Longest request line accepted (bytes); longer ones are refused before parsing. */
export const MAX_REQUEST_BYTES = 4096;

export interface KeyResponse {
  id?: unknown;
  ok: boolean;
  key?: string;
  version?: string;
  code?: string;
  message?: string;
}

/**
 * The root secrets a key service derives from: `current`, and during a root rotation `next` (begun
 * with `cryptmap keyd rotate-root`, not committed) or, once committed, `previous`.
 */
export interface RootSecrets {
  next?: Secret;
  previous?: Secret;
}

export interface KeyServiceOptions {
  root: Secret;
  /** The other generations of a root rotation, if one is under way or was committed. */
  roots?: RootSecrets;
  policy: Policy;
  audit: AuditSink;
}

export class KeyService {
  #root: Secret;
  #roots: RootSecrets;
  #policy: Policy;
  readonly #audit: AuditSink;

  constructor(opts: KeyServiceOptions) {
    this.#root = opts.root;
    this.#roots = opts.roots ?? {};
    this.#policy = opts.policy;
    this.#audit = opts.audit;
  }

  get policy(): Policy {
    return this.#policy;
  }

  /** Swap the root secrets (a root rotation begun or committed; SIGHUP). The service owns (and disposes) them. */
  setRoots(root: Secret, roots: RootSecrets = {}): void {
    for (const s of [this.#root, this.#roots.next, this.#roots.previous])
      if (s && s !== root && s !== roots.next && s !== roots.previous) s.dispose();
    this.#root = root;
    this.#roots = roots;
  }

  /** The generations it can derive from now. */
  get rootGenerations(): string[] {
    return ['current', ...(this.#roots.next ? ['next'] : []), ...(this.#roots.previous ? ['previous'] : [])];
  }

  /** Swap the policy (e.g. on SIGHUP). */
  setPolicy(p: Policy): void {
    this.#policy = p;
  }

  /**
   * Handle one decoded request from an authenticated `identity`.
   * The returned response holds the key as hex when granted.
   */
  handle(transport: 'unix' | 'https' | 'inproc', identity: string, msg: unknown): KeyResponse {
    const m = (typeof msg === 'object' && msg !== null && !Array.isArray(msg) ? msg : {}) as Record<string, unknown>;
    const id = m.id;
    const op = typeof m.op === 'string' ? m.op : '';
    if (op === 'ping') return { id, ok: true, version: PROTOCOL_VERSION };
    if (op !== 'derive') {
      this.#audit.record({ transport, identity, op: op.slice(0, 32) || '?', result: 'error', reason: 'unknown op' });
      return { id, ok: false, code: 'EKEYREQ', message: "op must be 'derive' or 'ping'" };
    }
    let req: ReturnType<typeof validateDeriveRequest>;
    try {
      req = validateDeriveRequest({
        purpose: m.purpose as DeriveRequest['purpose'],
        service: m.service as string,
        volume: m.volume as string,
        length: m.length === undefined ? undefined : (m.length as number),
        ...(m.generation !== undefined ? { generation: m.generation as DeriveRequest['generation'] } : {}),
      });
    } catch (e) {
      const message = isCryptmapError(e) ? e.message : 'bad request';
      this.#audit.record({ transport, identity, op, result: 'error', reason: message });
      return { id, ok: false, code: 'EKEYREQ', message };
    }
    const rec = {
      transport,
      identity,
      op,
      purpose: req.purpose,
      service: req.service,
      volume: req.volume,
      length: req.length,
    };
    if (!isAllowed(this.#policy, identity, req.purpose, req.service)) {
      this.#audit.record({ ...rec, result: 'denied', reason: 'not allowed by policy' });
      return {
        id,
        ok: false,
        code: 'EACCES',
        message: `${identity} may not have keys of service ${req.service} (${req.purpose})`,
      };
    }
    const gen = req.generation;
    const root = gen === undefined || gen === 'current' ? this.#root : this.#roots[gen];
    if (root === undefined) {
      const why =
        gen === 'next' ? 'no root rotation is in progress' : 'no root rotation was committed (no previous root)';
      this.#audit.record({ ...rec, result: 'error', reason: `no ${gen} root secret` });
      return { id, ok: false, code: 'ENOROOT', message: `no ${gen} root secret: ${why}` };
    }
    const key = deriveKey(root, req);
    try {
      this.#audit.record({ ...rec, result: 'granted' });
      return { id, ok: true, key: toHex(key.expose()) };
    } finally {
      key.dispose();
    }
  }

  /** Record a refusal decided by a transport (unknown token, bad certificate, oversized request). */
  refuse(transport: 'unix' | 'https', identity: string, reason: string, peer?: string): void {
    this.#audit.record({ transport, identity, ...(peer ? { peer } : {}), op: 'connect', result: 'denied', reason });
  }
}
