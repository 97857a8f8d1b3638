/**
 * Option haggling, states OPTIONS and TLS_HANDSHAKE (proto.md "Fixed newstyle negotiation",
 * "Option types", "Option reply types", "TLS support", "Metadata querying").
 *
 * Handlers are an ops table keyed by option number; an option missing from the table (including
 * NBD_OPT_PEEK_EXPORT and NBD_OPT_EXTENDED_HEADERS) is answered NBD_REP_ERR_UNSUP and haggling goes on.
 * Option data is capped (ResolvedLimits.maxOptionBytes) before it is read; a client that exceeds the
 * cap, sends a bad magic, or sends too many options gets a hard disconnect.
 */
import { TLSSocket } from 'node:tls';
import {
  BASE_ALLOCATION,
  IHAVEOPT,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_EXPORT,
  NBD_INFO_NAME,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_SHUTDOWN,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_TOO_BIG,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_MAGIC_HI,
  NBD_REP_MAGIC_LO,
  NBD_REP_META_CONTEXT,
  NBD_REP_SERVER,
  OPTION_HEADER_BYTES,
  OPTION_NAMES,
  OPTION_REPLY_HEADER_BYTES,
} from '../nbd-wire/constants.js';
import { type Connection, ProtocolViolation } from './connection.js';
import { ConnectionClosed } from '../nbd-wire/recv.js';
import { blockSizeFor, transmissionFlagsFor } from './transmission.js';
import type { ExportEntry } from './types.js';

const IHAVEOPT_HI = Number(IHAVEOPT >> 32n);
const IHAVEOPT_LO = Number(IHAVEOPT & 0xffffffffn);
/** Context id handed out for base:allocation by NBD_OPT_SET_META_CONTEXT. */
export const BASE_ALLOCATION_ID = 1;
/** Queries accepted in one META_CONTEXT option before NBD_REP_ERR_TOO_BIG. */
const MAX_META_QUERIES = 128;
/** proto.md "strings": at most 4096 bytes. */
const MAX_STRING_BYTES = 4096;

type Outcome = 'continue' | 'transmission' | 'close';
type OptionHandler = (conn: Connection, opt: number, data: Buffer) => Outcome | Promise<Outcome>;

// ---- reply encoding ----

function optionReply(conn: Connection, opt: number, type: number, data?: Uint8Array): Buffer {
  const len = data ? data.length : 0;
  const b = Buffer.allocUnsafe(OPTION_REPLY_HEADER_BYTES + len);
  b.writeUInt32BE(NBD_REP_MAGIC_HI, 0);
  b.writeUInt32BE(NBD_REP_MAGIC_LO, 4);
  b.writeUInt32BE(opt, 8);
  b.writeUInt32BE(type >>> 0, 12);
  b.writeUInt32BE(len, 16);
  if (data) b.set(data, OPTION_REPLY_HEADER_BYTES);
  conn.send(b);
  return b;
}

function replyError(conn: Connection, opt: number, type: number, message: string): Outcome {
  optionReply(conn, opt, type, truncateUtf8(message));
  return 'continue';
}

function truncateUtf8(s: string): Buffer {
  const b = Buffer.from(s, 'utf8');
  return b.length <= MAX_STRING_BYTES ? b : b.subarray(0, MAX_STRING_BYTES);
}

function info(conn: Connection, opt: number, type: number, payload: Buffer): void {
  const b = Buffer.allocUnsafe(2 + payload.length);
  b.writeUInt16BE(type, 0);
  payload.copy(b, 2);
  optionReply(conn, opt, NBD_REP_INFO, b);
}

// ---- the option loop ----

/** Run option haggling; true when the transmission phase was entered, false when the session ends. */
export async function negotiate(conn: Connection): Promise<boolean> {
  const lim = conn.server.limits;
  for (;;) {
    const hdr = await conn.rx.read(OPTION_HEADER_BYTES);
    if (hdr.readUInt32BE(0) !== IHAVEOPT_HI || hdr.readUInt32BE(4) !== IHAVEOPT_LO) {
      throw new ProtocolViolation('bad option magic');
    }
    const opt = hdr.readUInt32BE(8);
    const len = hdr.readUInt32BE(12);
    if (len > lim.maxOptionBytes)
      throw new ProtocolViolation(`option data of ${len} bytes exceeds the limit of ${lim.maxOptionBytes}`);
    if (++conn.optionCount > lim.maxOptions) throw new ProtocolViolation(`more than ${lim.maxOptions} options`);
    const data = len > 0 ? await conn.rx.read(len) : Buffer.alloc(0);
    if (!conn.fixedNewstyle && opt !== NBD_OPT_EXPORT_NAME) {
      throw new ProtocolViolation(`option ${opt} from a client that did not negotiate fixed newstyle`);
    }
    const outcome = await dispatch(conn, opt, data);
    if (outcome === 'transmission') return true;
    if (outcome === 'close') return false;
  }
}

function dispatch(conn: Connection, opt: number, data: Buffer): Outcome | Promise<Outcome> {
  const name = OPTION_NAMES[opt] ?? `option ${opt}`;
  if (conn.server.shuttingDown && opt !== NBD_OPT_ABORT) {
    if (opt === NBD_OPT_EXPORT_NAME) throw new ProtocolViolation('server shutting down');
    return replyError(conn, opt, NBD_REP_ERR_SHUTDOWN, 'server is shutting down');
  }
  if (conn.tlsMode === 'require' && !conn.tlsActive && opt !== NBD_OPT_STARTTLS && opt !== NBD_OPT_ABORT) {
    // FORCEDTLS: NBD_OPT_EXPORT_NAME cannot be answered with an error, so the session ends.
    if (opt === NBD_OPT_EXPORT_NAME)
      throw new ProtocolViolation('NBD_OPT_EXPORT_NAME before STARTTLS on a TLS-only server');
    return replyError(conn, opt, NBD_REP_ERR_TLS_REQD, `${name}: this server requires TLS (NBD_OPT_STARTTLS) first`);
  }
  const handler = OPTION_HANDLERS[opt];
  if (!handler) return replyError(conn, opt, NBD_REP_ERR_UNSUP, `${name} is not supported`);
  return handler(conn, opt, data);
}

// ---- handlers ----

function lookup(conn: Connection, name: string): ExportEntry | undefined {
  return conn.server.lookup(name);
}

function enterTransmission(conn: Connection, entry: ExportEntry): void {
  conn.export = entry;
  conn.transmissionFlags = transmissionFlagsFor(entry, conn.structuredReplies);
  if (conn.meta && conn.meta.exportName !== entry.name) conn.meta = null;
  entry.connections.add(conn);
  conn.transition('TRANSMISSION');
}

const exportName: OptionHandler = (conn, _opt, data) => {
  const name = data.toString('utf8');
  const entry = lookup(conn, name);
  if (!entry)
    throw new ProtocolViolation(`NBD_OPT_EXPORT_NAME for unknown export ${JSON.stringify(name.slice(0, 256))}`);
  const b = Buffer.alloc(conn.noZeroes ? 10 : 134);
  b.writeBigUInt64BE(BigInt(entry.device.sizeBytes), 0);
  b.writeUInt16BE(transmissionFlagsFor(entry, conn.structuredReplies), 8);
  conn.send(b);
  enterTransmission(conn, entry);
  return 'transmission';
};

const abort: OptionHandler = (conn, opt) => {
  optionReply(conn, opt, NBD_REP_ACK);
  return 'close';
};

const list: OptionHandler = (conn, opt, data) => {
  if (data.length !== 0) return replyError(conn, opt, NBD_REP_ERR_INVALID, 'NBD_OPT_LIST takes no data');
  for (const e of conn.server.list()) {
    const name = Buffer.from(e.name, 'utf8');
    const desc = e.description ? truncateUtf8(e.description) : Buffer.alloc(0);
    const b = Buffer.allocUnsafe(4 + name.length + desc.length);
    b.writeUInt32BE(name.length, 0);
    name.copy(b, 4);
    desc.copy(b, 4 + name.length);
    optionReply(conn, opt, NBD_REP_SERVER, b);
  }
  optionReply(conn, opt, NBD_REP_ACK);
  return 'continue';
};

const starttls: OptionHandler = async (conn, opt, data) => {
  if (data.length !== 0) return replyError(conn, opt, NBD_REP_ERR_INVALID, 'NBD_OPT_STARTTLS takes no data');
  const ctx = conn.server.secureContext;
  if (conn.tlsMode === 'off' || !ctx)
    return replyError(conn, opt, NBD_REP_ERR_POLICY, 'TLS is not enabled on this server');
  if (conn.tlsActive) return replyError(conn, opt, NBD_REP_ERR_INVALID, 'TLS is already active');
  conn.transition('TLS_HANDSHAKE');
  // The client starts its TLS handshake only after our ACK, so nothing should be queued; if it is,
  // it belongs to TLS and goes back into the socket.
  const rest = conn.rx.detach();
  const ack = Buffer.allocUnsafe(OPTION_REPLY_HEADER_BYTES);
  ack.writeUInt32BE(NBD_REP_MAGIC_HI, 0);
  ack.writeUInt32BE(NBD_REP_MAGIC_LO, 4);
  ack.writeUInt32BE(opt, 8);
  ack.writeUInt32BE(NBD_REP_ACK, 12);
  ack.writeUInt32BE(0, 16);
  await conn.sendNow(ack);
  if (rest) conn.raw.unshift(rest);
  const verify = conn.server.verifyClient;
  const tlsSocket = new TLSSocket(conn.raw, {
    isServer: true,
    secureContext: ctx,
    requestCert: verify,
    rejectUnauthorized: verify,
  });
  tlsSocket.on('error', () => {});
  conn.socket = tlsSocket;
  try {
    await new Promise<void>((resolve, reject) => {
      tlsSocket.once('secure', () => resolve());
      tlsSocket.once('error', reject);
      tlsSocket.once('close', () => reject(new ConnectionClosed()));
    });
  } catch (e) {
    if (e instanceof ConnectionClosed) throw e;
    throw new ProtocolViolation(`TLS handshake failed: ${e instanceof Error ? e.message : String(e)}`);
  }
  conn.tlsActive = true;
  // proto.md NBD_OPT_STARTTLS: no negotiation state survives the upgrade.
  conn.structuredReplies = false;
  conn.meta = null;
  conn.rx.attach(tlsSocket);
  conn.transition('OPTIONS');
  return 'continue';
};

/** NBD_OPT_INFO and NBD_OPT_GO: u32 namelen, name, u16 n, n x u16 info requests. */
const infoOrGo: OptionHandler = (conn, opt, data) => {
  const what = opt === NBD_OPT_GO ? 'NBD_OPT_GO' : 'NBD_OPT_INFO';
  if (data.length < 6) return replyError(conn, opt, NBD_REP_ERR_INVALID, `${what}: option data too short`);
  const nameLen = data.readUInt32BE(0);
  if (nameLen > data.length - 6)
    return replyError(conn, opt, NBD_REP_ERR_INVALID, `${what}: name length ${nameLen} exceeds the option data`);
  const nInfo = data.readUInt16BE(4 + nameLen);
  if (4 + nameLen + 2 + 2 * nInfo !== data.length) {
    return replyError(
      conn,
      opt,
      NBD_REP_ERR_INVALID,
      `${what}: ${nInfo} information requests do not match the option length`,
    );
  }
  const name = data.toString('utf8', 4, 4 + nameLen);
  const entry = lookup(conn, name);
  if (!entry)
    return replyError(conn, opt, NBD_REP_ERR_UNKNOWN, `export ${JSON.stringify(name.slice(0, 256))} not found`);
  const requested = new Set<number>();
  for (let i = 0; i < nInfo; i++) requested.add(data.readUInt16BE(4 + nameLen + 2 + 2 * i));

  const exp = Buffer.allocUnsafe(10);
  exp.writeBigUInt64BE(BigInt(entry.device.sizeBytes), 0);
  exp.writeUInt16BE(transmissionFlagsFor(entry, conn.structuredReplies), 8);
  info(conn, opt, NBD_INFO_EXPORT, exp);
  if (requested.has(NBD_INFO_NAME) || name !== entry.name) info(conn, opt, NBD_INFO_NAME, truncateUtf8(entry.name));
  if (requested.has(NBD_INFO_DESCRIPTION) && entry.description)
    info(conn, opt, NBD_INFO_DESCRIPTION, truncateUtf8(entry.description));
  // Always sent: the server enforces its minimum block size whether or not the client asked.
  const bs = blockSizeFor(entry, conn.server.limits.maxPayloadBytes);
  const b = Buffer.allocUnsafe(12);
  b.writeUInt32BE(bs.minimum, 0);
  b.writeUInt32BE(bs.preferred, 4);
  b.writeUInt32BE(bs.maximum, 8);
  info(conn, opt, NBD_INFO_BLOCK_SIZE, b);
  optionReply(conn, opt, NBD_REP_ACK);
  if (opt === NBD_OPT_GO) {
    enterTransmission(conn, entry);
    return 'transmission';
  }
  return 'continue';
};

const structuredReply: OptionHandler = (conn, opt, data) => {
  if (data.length !== 0) return replyError(conn, opt, NBD_REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
  conn.structuredReplies = true;
  optionReply(conn, opt, NBD_REP_ACK);
  return 'continue';
};

interface MetaRequest {
  exportName: string;
  queries: string[];
}

/** u32 namelen, name, u32 nqueries, nqueries x (u32 len, query); null when malformed. */
function parseMetaRequest(data: Buffer): MetaRequest | 'too-big' | null {
  if (data.length < 8) return null;
  const nameLen = data.readUInt32BE(0);
  if (nameLen > data.length - 8) return null;
  const exportName = data.toString('utf8', 4, 4 + nameLen);
  const n = data.readUInt32BE(4 + nameLen);
  let pos = 8 + nameLen;
  if (n > (data.length - pos) / 4) return null;
  if (n > MAX_META_QUERIES) return 'too-big';
  const queries: string[] = [];
  for (let i = 0; i < n; i++) {
    if (pos + 4 > data.length) return null;
    const qlen = data.readUInt32BE(pos);
    pos += 4;
    if (qlen > data.length - pos) return null;
    queries.push(data.toString('utf8', pos, pos + qlen));
    pos += qlen;
  }
  return pos === data.length ? { exportName, queries } : null;
}

function metaContextReply(conn: Connection, opt: number, id: number, name: string): void {
  const n = Buffer.from(name, 'utf8');
  const b = Buffer.allocUnsafe(4 + n.length);
  b.writeUInt32BE(id, 0);
  n.copy(b, 4);
  optionReply(conn, opt, NBD_REP_META_CONTEXT, b);
}

const metaContext: OptionHandler = (conn, opt, data) => {
  const set = opt === NBD_OPT_SET_META_CONTEXT;
  const what = set ? 'NBD_OPT_SET_META_CONTEXT' : 'NBD_OPT_LIST_META_CONTEXT';
  if (set) conn.meta = null; // replaced even when the option fails
  if (!conn.structuredReplies)
    return replyError(conn, opt, NBD_REP_ERR_INVALID, `${what} needs NBD_OPT_STRUCTURED_REPLY first`);
  const req = parseMetaRequest(data);
  if (req === 'too-big')
    return replyError(conn, opt, NBD_REP_ERR_TOO_BIG, `${what}: more than ${MAX_META_QUERIES} queries`);
  if (!req) return replyError(conn, opt, NBD_REP_ERR_INVALID, `${what}: malformed option data`);
  const entry = lookup(conn, req.exportName);
  if (!entry)
    return replyError(
      conn,
      opt,
      NBD_REP_ERR_UNKNOWN,
      `export ${JSON.stringify(req.exportName.slice(0, 256))} not found`,
    );
  let matched: boolean;
  if (set) matched = req.queries.includes(BASE_ALLOCATION);
  else matched = req.queries.length === 0 || req.queries.some((q) => q === BASE_ALLOCATION || q === 'base:');
  if (matched) {
    metaContextReply(conn, opt, set ? BASE_ALLOCATION_ID : 0, BASE_ALLOCATION);
    if (set) conn.meta = { exportName: entry.name, baseAllocationId: BASE_ALLOCATION_ID };
  }
  optionReply(conn, opt, NBD_REP_ACK);
  return 'continue';
};

/** The option ops table (STATES.OPTIONS.accepts lists the same keys). */
export const OPTION_HANDLERS: Readonly<Record<number, OptionHandler>> = {
  [NBD_OPT_EXPORT_NAME]: exportName,
  [NBD_OPT_ABORT]: abort,
  [NBD_OPT_LIST]: list,
  [NBD_OPT_STARTTLS]: starttls,
  [NBD_OPT_INFO]: infoOrGo,
  [NBD_OPT_GO]: infoOrGo,
  [NBD_OPT_STRUCTURED_REPLY]: structuredReply,
  [NBD_OPT_LIST_META_CONTEXT]: metaContext,
  [NBD_OPT_SET_META_CONTEXT]: metaContext,
};
