/**
 * Public and shared types of the NBD server: export definitions, server options, the limits every
 * connection enforces before it allocates anything.
 */
import type { BlockDevice } from '../blockdev/types.js';

/** What an export serves. The server never closes `device`: its owner does, after removeExport. */
export interface NbdExport {
  device: BlockDevice;
  /** Shown by `nbdinfo` (NBD_INFO_DESCRIPTION and NBD_REP_SERVER). */
  description?: string;
  /** Serve read-only even when the device is writable. */
  readOnly?: boolean;
}

/**
 * TLS per proto.md "TLS support": 'off' = NOTLS (STARTTLS answered NBD_REP_ERR_POLICY);
 * 'on' = SELECTIVETLS with no TLS-only export (STARTTLS optional); 'require' = FORCEDTLS (every
 * option but STARTTLS and ABORT answered NBD_REP_ERR_TLS_REQD until TLS is up).
 */
export type NbdTlsMode = 'off' | 'on' | 'require';

/** The server's X.509 key and certificate, and the CA for client certificates. */
export interface NbdTlsCredentials {
  /** PEM server private key. */
  key: string | Buffer;
  /** PEM server certificate (chain). */
  cert: string | Buffer;
  /** PEM CA used to verify client certificates (with verifyClient). */
  ca?: string | Buffer;
  /** Demand a client certificate signed by `ca`. */
  verifyClient?: boolean;
}

/** Server-wide limits and TLS credentials of an `NbdServer`. */
export interface NbdServerOptions {
  /** TLS policy of a listener that names none (listenUnix/listenTcp `tls`). Default 'off'. */
  tls?: NbdTlsMode;
  /** Key and certificate for every listener whose policy is not 'off'. */
  tlsCredentials?: NbdTlsCredentials;
  /** Largest READ/WRITE payload (NBD_INFO_BLOCK_SIZE maximum). Default 32 MiB. */
  maxPayloadBytes?: number;
  /** Bytes of READ/WRITE payload in flight per connection before the server stops reading requests. Default 64 MiB. */
  maxInflightBytes?: number;
  /** Requests in flight per connection. Default 256. */
  maxInflightRequests?: number;
  /** READ/WRITE payload bytes in flight across all connections (budget.ts). Default 256 MiB. */
  maxServerInflightBytes?: number;
  /** Largest option data accepted during the handshake; larger ⇒ hard disconnect. Default 64 KiB. */
  maxOptionBytes?: number;
  /** Options accepted per connection before the server gives up on it. Default 256. */
  maxOptions?: number;
  /** Open connections per listener (each Unix or TCP listener has its own). Default 1024. */
  maxConnections?: number;
  /** TCP: open connections from one peer address per listener. Default 64. */
  maxConnectionsPerPeer?: number;
  /**
   * A client must reach the transmission phase (greeting, options, TLS handshake) within this time
   * (0 = no limit). Default 30 s.
   */
  handshakeTimeoutMs?: number;
  /**
   * A WRITE payload that stops arriving, or READ replies the client stops taking, for this long drop
   * the connection and give its share of the server-wide budget back; a payload must also keep up
   * 1 MiB/s after that (0 = never). Default 10 s.
   */
  stallTimeoutMs?: number;
  /** Export served for the empty name ("default export"). */
  defaultExport?: string;
  /** Answer READ with OFFSET_HOLE chunks where the device reports zero extents. Default true. */
  sparseReads?: boolean;
  /** Idle READ/WRITE buffers kept for reuse across the server (0 disables the pool). Default 64 MiB. */
  bufferPoolBytes?: number;
}

/** Per-listener policy (NbdServer.listenUnix, listenTcp); unset fields take the server's options. */
export interface NbdListenOptions {
  /** TLS policy of this listener: TCP and the local Unix socket usually differ. */
  tls?: NbdTlsMode;
  /** Connections open on this listener at once. */
  maxConnections?: number;
  /** TCP only: connections from one peer address at once. */
  maxConnectionsPerPeer?: number;
}

export interface ResolvedLimits {
  maxPayloadBytes: number;
  maxInflightBytes: number;
  maxInflightRequests: number;
  maxOptionBytes: number;
  maxOptions: number;
  sparseReads: boolean;
}

/** A live export inside the server. */
export interface ExportEntry {
  readonly name: string;
  readonly device: BlockDevice;
  readonly description: string | undefined;
  readonly readOnly: boolean;
  /** Connections in the transmission phase on this export. */
  readonly connections: Set<{ drain(): Promise<void> }>;
  removing: boolean;
}

/** What a connection needs from its server. */
export interface ServerContext {
  readonly limits: ResolvedLimits;
  readonly shuttingDown: boolean;
  lookup(name: string): ExportEntry | undefined;
  list(): ExportEntry[];
  /** Upgrade a raw socket to TLS (STARTTLS); undefined without credentials. */
  readonly secureContext: import('node:tls').SecureContext | undefined;
  readonly verifyClient: boolean;
  readonly pool: import('./pool.js').BufferPool;
  readonly budget: import('./budget.js').PayloadBudget;
}
