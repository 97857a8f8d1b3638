/**
 * Single writer per persistent shared volume (issue 15 item 4): one key per volume in etcd
 * (`<prefix><volume id>`, value `{"node":..., "since":...}`), attached to an etcd lease with a TTL
 * that this node keeps alive. Taking it is one transaction: put the key with our lease only if it
 * does not exist (create revision 0), else read who holds it. When the holder dies its lease
 * expires after the TTL, etcd deletes the key, and the next node's attempt succeeds.
 *
 * Fencing: a renewal sent at time t that etcd answers makes the lease valid until at least
 * t + TTL (etcd restarts the TTL when it receives the keepalive, after we sent it): that is the
 * lease's deadline here. Renewals are timed against the deadline, not against the end of the
 * previous renewal: the next one leaves TTL/4 after the send time of the last one etcd confirmed
 * (deadline - 3/4 TTL), and while none is confirmed one more leaves every TTL/8 (at most two in
 * flight, each with its own deadline), so one slow answer does not delay the next renewal by its
 * own duration. When no renewal has succeeded for FENCE_FRACTION of the TTL (etcd unreachable,
 * partitioned, or the lease expired), `onLost` is called at once, while there is still
 * (1 - FENCE_FRACTION) of the TTL left (passed to it): the agent suspends and closes the volume in
 * that time and cuts its storage off if that does not finish, so the next holder, who can only get
 * the key after the TTL, never races it. Times are monotonic (performance.now), every etcd call has
 * a deadline.
 *
 * The npm `etcd3` client (gRPC) is loaded only when a manifest names an etcd endpoint.
 */
import { performance } from 'node:perf_hooks';
import { CryptmapError } from '../util/errors.js';
import { readTrustedFile } from '../util/trusted-path.js';
import { type Logger, logger } from '../util/log.js';

/** Fraction of the TTL after the last successful renewal at which the volume is fenced. */
export const FENCE_FRACTION = 0.6;
export const DEFAULT_TTL_SECONDS = 10;
export const DEFAULT_PREFIX = '/cryptmap/leases/';

export interface LeaseHolder {
  node: string;
  since: string;
}

export type AcquireResult = { held: true } | { held: false; holder?: LeaseHolder };

export interface EtcdLeaseOptions {
  /** etcd client URLs, e.g. `http://127.0.0.1:2379`. */
  endpoints: string[];
  /** This node's name (shown to the others as the holder). */
  node: string;
  ttlSeconds?: number;
  prefix?: string;
  /** Deadline of one etcd call (default TTL/4, at least 500 ms). */
  callTimeoutMs?: number;
  /**
   * The lease of `volume` is lost (or about to be): stop its I/O now, within `msLeft` (the time until
   * the lease can expire at etcd, after which another node may take it). Called once per loss.
   */
  onLost: (volume: string, why: string, msLeft: number) => void;
  log?: Logger;
  /**
   * TLS to etcd (`https://` endpoints): the CA that signed etcd's certificate, and for etcd's
   * --client-cert-auth this node's certificate and private key (PEM files; the key file must be the
   * caller's own, mode 0600, not a symlink).
   */
  tls?: { caFile: string; certFile?: string; keyFile?: string };
  /** etcd password authentication: the user, and a file holding its password (0600, not a symlink; never in argv). */
  auth?: { user: string; passwordFile: string };
}

/** The etcd3 constructor options used here. */
interface Etcd3Options {
  hosts: string[];
  dialTimeout?: number;
  credentials?: { rootCertificate: Buffer; privateKey?: Buffer; certChain?: Buffer };
  auth?: { username: string; password: string };
}

/** The parts of npm etcd3's Lease used here. */
export interface EtcdLease {
  grant(): Promise<string>;
  keepaliveOnce(options?: { deadline?: Date }): Promise<{ TTL: string }>;
  revoke(options?: { deadline?: Date }): Promise<void>;
  release(): void;
  on(event: 'lost', handler: (err: Error) => void): unknown;
}

export interface TxnResult {
  succeeded: boolean;
  responses: { response_range?: { kvs: { value: Buffer }[] } }[];
}

/** The parts of npm etcd3's Etcd3 client used here (a test stands in for it with `withClient`). */
export interface EtcdClient {
  lease(ttl: number, options?: { autoKeepAlive?: boolean }): EtcdLease;
  if(
    key: string,
    column: 'Create',
    cmp: '==',
    value: number,
  ): {
    then(...ops: unknown[]): { else(...ops: unknown[]): { commit(): Promise<TxnResult> } };
  };
  put(key: string): { value(v: string): { lease(id: string): unknown } };
  get(key: string): { string(): Promise<string | null> };
  delete(): { key(k: string): Promise<unknown> };
  close(): void;
}

interface Held {
  lease: EtcdLease;
  /** performance.now() until which the lease is certainly ours. */
  validUntil: number;
  timer?: NodeJS.Timeout;
  /** Renewals sent and not yet answered. */
  renewing: number;
  stopped: boolean;
  lastError?: string;
}

function withDeadline<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let t: NodeJS.Timeout | undefined;
  return Promise.race([
    p.finally(() => clearTimeout(t)),
    new Promise<never>((_, reject) => {
      t = setTimeout(
        () =>
          reject(new CryptmapError('ECOORD_TIMEOUT', `${what}: no answer from etcd within ${ms} ms`, { errno: 'EIO' })),
        ms,
      );
    }),
  ]);
}

export class EtcdLeases {
  readonly node: string;
  readonly ttlSeconds: number;
  readonly prefix: string;
  readonly endpoints: string[];
  readonly #client: EtcdClient;
  readonly #opts: EtcdLeaseOptions;
  readonly #held = new Map<string, Held>();
  readonly #callMs: number;
  readonly #log: Logger;
  #watchdog: NodeJS.Timeout | undefined;
  #closed = false;

  private constructor(client: EtcdClient, opts: EtcdLeaseOptions) {
    this.#client = client;
    this.#opts = opts;
    this.node = opts.node;
    this.endpoints = opts.endpoints;
    this.ttlSeconds = opts.ttlSeconds ?? DEFAULT_TTL_SECONDS;
    this.prefix = opts.prefix ?? DEFAULT_PREFIX;
    this.#callMs = opts.callTimeoutMs ?? Math.max(500, (this.ttlSeconds * 1000) / 4);
    this.#log = opts.log ?? logger('lease');
  }

  /** A client for `endpoints` (no connection is made until the first call). */
  static async connect(opts: EtcdLeaseOptions): Promise<EtcdLeases> {
    if (opts.endpoints.length === 0) throw new CryptmapError('ECOORD', 'no etcd endpoint given');
    if ((opts.ttlSeconds ?? DEFAULT_TTL_SECONDS) < 2)
      throw new CryptmapError('ECOORD', 'the lease TTL must be at least 2 seconds');
    const tlsEndpoints = opts.endpoints.filter((e) => e.startsWith('https://')).length;
    if (tlsEndpoints > 0 && tlsEndpoints < opts.endpoints.length)
      throw new CryptmapError('ECOORD', 'etcd endpoints must all be https:// or all http://');
    if (tlsEndpoints > 0 && opts.tls === undefined)
      throw new CryptmapError('ECOORD', 'https:// etcd endpoints need a CA file (coordination.tls.ca)');
    if (tlsEndpoints === 0 && opts.tls !== undefined)
      throw new CryptmapError('ECOORD', 'coordination.tls applies to https:// etcd endpoints only');
    if (opts.tls && (opts.tls.certFile === undefined) !== (opts.tls.keyFile === undefined))
      throw new CryptmapError('ECOORD', 'an etcd client certificate needs both its certificate and its key file');
    const o: Etcd3Options = {
      hosts: opts.endpoints,
      dialTimeout: Math.max(500, ((opts.ttlSeconds ?? DEFAULT_TTL_SECONDS) * 1000) / 4),
    };
    const secrets: Buffer[] = [];
    try {
      if (opts.tls) {
        o.credentials = { rootCertificate: readTrustedFile(opts.tls.caFile, { code: 'ECOORD' }) };
        if (opts.tls.certFile !== undefined && opts.tls.keyFile !== undefined) {
          o.credentials.certChain = readTrustedFile(opts.tls.certFile, { code: 'ECOORD' });
          const key = readTrustedFile(opts.tls.keyFile, { code: 'ECOORD', private: true, maxBytes: 64 << 10 });
          secrets.push(key);
          o.credentials.privateKey = key;
        }
      }
      if (opts.auth) {
        const raw = readTrustedFile(opts.auth.passwordFile, { code: 'ECOORD', private: true, maxBytes: 4096 });
        secrets.push(raw);
        // etcd3 takes the password as a string (sent at each token refresh): the file's bytes are wiped.
        const password = raw.toString('utf8').replace(/\r?\n$/, '');
        if (password === '') throw new CryptmapError('ECOORD', `${opts.auth.passwordFile} is empty`);
        o.auth = { username: opts.auth.user, password };
      }
    } catch (e) {
      for (const b of secrets) b.fill(0);
      throw e;
    }
    let mod: { Etcd3: new (o: Etcd3Options) => unknown };
    try {
      mod = (await import('etcd3')) as unknown as typeof mod;
    } catch (e) {
      for (const b of secrets) b.fill(0);
      throw new CryptmapError(
        'ECOORD',
        `the etcd client (npm package etcd3) cannot be loaded: ${(e as Error).message}`,
        { cause: e },
      );
    }
    let client: EtcdClient;
    try {
      // grpc builds its TLS credentials from the buffers here (copied into OpenSSL).
      client = new mod.Etcd3(o) as EtcdClient;
    } finally {
      for (const b of secrets) b.fill(0);
    }
    return new EtcdLeases(client, opts);
  }

  /** Leases over an already made client (tests: a stand-in with scripted answers and delays). */
  static withClient(client: EtcdClient, opts: EtcdLeaseOptions): EtcdLeases {
    return new EtcdLeases(client, opts);
  }

  #key(volume: string): string {
    return `${this.prefix}${volume}`;
  }

  /** This node holds `volume`'s lease (and has not been fenced). */
  holds(volume: string): boolean {
    const h = this.#held.get(volume);
    return h !== undefined && !h.stopped;
  }

  /**
   * Take `volume`'s lease if nobody holds it; `{held: false, holder}` when another node (or an
   * earlier life of this one, until its TTL ends) does. Throws ECOORD_* when etcd cannot be reached.
   */
  async acquire(volume: string): Promise<AcquireResult> {
    if (this.#closed) throw new CryptmapError('ECOORD', 'the lease client is closed');
    if (this.holds(volume)) return { held: true };
    const lease = this.#client.lease(this.ttlSeconds, { autoKeepAlive: false });
    lease.on('lost', () => undefined); // reported through keepaliveOnce's rejection
    const t0 = performance.now();
    let id: string;
    try {
      id = await withDeadline(lease.grant(), this.#callMs * 2, 'granting a lease');
    } catch (e) {
      lease.release();
      throw this.#unreachable(e);
    }
    const key = this.#key(volume);
    const value = JSON.stringify({ node: this.node, since: new Date().toISOString() } satisfies LeaseHolder);
    let r: TxnResult;
    try {
      r = await withDeadline(
        this.#client
          .if(key, 'Create', '==', 0)
          .then(this.#client.put(key).value(value).lease(id))
          .else(this.#client.get(key))
          .commit(),
        this.#callMs * 2,
        `taking ${key}`,
      );
    } catch (e) {
      void lease.revoke({ deadline: new Date(Date.now() + this.#callMs) }).catch(() => undefined);
      throw this.#unreachable(e);
    }
    if (!r.succeeded) {
      void lease.revoke({ deadline: new Date(Date.now() + this.#callMs) }).catch(() => undefined);
      const raw = r.responses[0]?.response_range?.kvs[0]?.value;
      return { held: false, ...(raw ? { holder: parseHolder(raw.toString('utf8')) } : {}) };
    }
    const h: Held = { lease, validUntil: t0 + this.ttlSeconds * 1000, renewing: 0, stopped: false };
    this.#held.set(volume, h);
    this.#log.info('lease taken', { volume, node: this.node, ttl: this.ttlSeconds });
    this.#schedule(volume, h);
    this.#startWatchdog();
    return { held: true };
  }

  /** Who holds `volume`'s lease now (undefined: nobody). */
  async holder(volume: string): Promise<LeaseHolder | undefined> {
    let v: string | null;
    try {
      v = await withDeadline(this.#client.get(this.#key(volume)).string(), this.#callMs * 2, 'reading a lease');
    } catch (e) {
      throw this.#unreachable(e);
    }
    return v === null ? undefined : parseHolder(v);
  }

  /** Give `volume`'s lease back (after the volume was closed): the next node need not wait for the TTL. */
  async release(volume: string): Promise<void> {
    const h = this.#held.get(volume);
    if (!h) return;
    this.#stop(volume, h);
    try {
      await withDeadline(
        h.lease.revoke({ deadline: new Date(Date.now() + this.#callMs) }),
        this.#callMs * 2,
        'revoking a lease',
      );
      this.#log.info('lease released', { volume, node: this.node });
    } catch (e) {
      this.#log.warn('lease not revoked; it ends with its TTL', { volume, error: (e as Error).message });
    }
  }

  /** Release every lease and close the client. */
  async close(): Promise<void> {
    if (this.#closed) return;
    for (const v of [...this.#held.keys()]) await this.release(v);
    this.#closed = true;
    if (this.#watchdog) clearInterval(this.#watchdog);
    this.#client.close();
  }

  /** Renewal status of a held lease (for status output). */
  describe(volume: string): { node: string; secondsLeft: number; lastError?: string } | undefined {
    const h = this.#held.get(volume);
    if (!h || h.stopped) return undefined;
    return {
      node: this.node,
      secondsLeft: Math.max(0, (h.validUntil - performance.now()) / 1000),
      ...(h.lastError ? { lastError: h.lastError } : {}),
    };
  }

  /**
   * The renewal clock: renew when the deadline is 3/4 TTL away (TTL/4 after the send time of the
   * last confirmed renewal); while that renewal is unanswered or failed, send another every TTL/8
   * (at most two in flight). Never waits for a renewal to finish before timing the next.
   */
  #schedule(volume: string, h: Held): void {
    if (h.stopped) return;
    const ttlMs = this.ttlSeconds * 1000;
    const now = performance.now();
    const due = h.validUntil - ttlMs * 0.75;
    const wait = due > now ? due - now : Math.max(100, ttlMs / 8);
    if (h.timer) clearTimeout(h.timer);
    h.timer = setTimeout(() => this.#tick(volume, h), wait);
    h.timer.unref?.();
  }

  #tick(volume: string, h: Held): void {
    if (h.stopped) return;
    const due = h.validUntil - this.ttlSeconds * 1000 * 0.75;
    if (performance.now() >= due - 1 && h.renewing < 2) void this.#renew(volume, h);
    this.#schedule(volume, h);
  }

  async #renew(volume: string, h: Held): Promise<void> {
    const t0 = performance.now();
    h.renewing++;
    try {
      const res = await withDeadline(
        h.lease.keepaliveOnce({ deadline: new Date(Date.now() + this.#callMs) }),
        this.#callMs,
        'renewing a lease',
      );
      if (h.stopped) return;
      const ttl = Number(res.TTL);
      if (!(ttl > 0)) {
        this.#lose(volume, h, 'the lease expired at etcd');
        return;
      }
      h.validUntil = Math.max(h.validUntil, t0 + ttl * 1000);
      delete h.lastError;
      // The deadline moved: time the next renewal from it.
      this.#schedule(volume, h);
    } catch (e) {
      if (h.stopped) return;
      if ((e as Error).name === 'EtcdLeaseInvalidError') {
        this.#lose(volume, h, 'etcd no longer knows the lease (expired or revoked)');
        return;
      }
      h.lastError = (e as Error).message;
      this.#log.warn('lease renewal failed', { volume, error: h.lastError });
    } finally {
      h.renewing--;
    }
    this.#check(volume, h);
  }

  #startWatchdog(): void {
    if (this.#watchdog) return;
    this.#watchdog = setInterval(() => {
      for (const [v, h] of this.#held) this.#check(v, h);
    }, 100);
    this.#watchdog.unref?.();
  }

  #check(volume: string, h: Held): void {
    if (h.stopped) return;
    const fenceAt = h.validUntil - this.ttlSeconds * 1000 * (1 - FENCE_FRACTION);
    if (performance.now() >= fenceAt)
      this.#lose(
        volume,
        h,
        `no lease renewal for ${(FENCE_FRACTION * this.ttlSeconds).toFixed(1)} s${h.lastError ? ` (${h.lastError})` : ''}`,
      );
  }

  #stop(volume: string, h: Held): void {
    h.stopped = true;
    if (h.timer) clearTimeout(h.timer);
    this.#held.delete(volume);
  }

  #lose(volume: string, h: Held, why: string): void {
    if (h.stopped) return;
    this.#stop(volume, h);
    h.lease.release();
    this.#log.error('lease lost: stopping I/O to the volume', { volume, node: this.node, why });
    try {
      this.#opts.onLost(volume, why, Math.max(0, h.validUntil - performance.now()));
    } catch (e) {
      this.#log.error('fencing failed', { volume, error: (e as Error).message });
    }
  }

  #unreachable(e: unknown): CryptmapError {
    if (e instanceof CryptmapError) return e;
    return new CryptmapError(
      'ECOORD_UNREACHABLE',
      `etcd (${this.endpoints.join(', ')}) cannot be reached: ${(e as Error).message}`,
      { errno: 'EIO', cause: e },
    );
  }
}

function parseHolder(s: string): LeaseHolder {
  try {
    const o = JSON.parse(s) as Partial<LeaseHolder>;
    return { node: String(o.node ?? '?'), since: String(o.since ?? '?') };
  } catch {
    return { node: s.slice(0, 200), since: '?' };
  }
}
