/**
 * Client side of the NBD handshake (proto.md "Fixed newstyle negotiation", "Option types",
 * "Size constraints"), one phase after the other:
 *
 *   GREETING    NBDMAGIC + IHAVEOPT + handshake flags; fixed newstyle is required (oldstyle and
 *               plain newstyle servers are refused with a message)
 *   FLAGS       C_FIXED_NEWSTYLE (+ C_NO_ZEROES when offered)
 *   STARTTLS    for nbds:// only, first, so every later option is encrypted; an error reply ends
 *               the session (the URI asked for TLS: no downgrade)
 *   STRUCTURED  NBD_OPT_STRUCTURED_REPLY; NBD_REP_ERR_UNSUP falls back to simple replies
 *   META        NBD_OPT_SET_META_CONTEXT base:allocation (only with structured replies); no context
 *               selected = no block status
 *   GO          NBD_OPT_GO with NBD_INFO_BLOCK_SIZE: from here the client MUST honour the sizes;
 *               NBD_REP_ERR_UNSUP falls back to NBD_OPT_EXPORT_NAME (servers before GO)
 *
 * Every reply length is capped before anything is allocated, and each option takes a bounded
 * number of replies: a hostile server cannot make the client allocate or loop without end.
 */
import type { Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import {
  BASE_ALLOCATION,
  IHAVEOPT,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_NO_ZEROES,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_EXPORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_BLOCK_SIZE_REQD,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_SHUTDOWN,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_MAGIC_HI,
  NBD_REP_MAGIC_LO,
  NBD_REP_META_CONTEXT,
  NBDMAGIC,
  OPTION_NAMES,
} from '../../nbd-wire/constants.js';
import { ConnectionClosed, RecvQueue } from '../../nbd-wire/recv.js';
import type { NbdUriTarget } from '../../nbd-wire/uri.js';
import { type TlsCredentials, upgradeTls } from './transport.js';

/** oldstyle's second magic (proto.md "Oldstyle negotiation"). */
const CLISERV_MAGIC = 0x00420281861253n;
/** Largest option reply payload accepted: strings are at most 4096 bytes, infos a few more. */
const MAX_OPTION_REPLY_BYTES = 16 << 10;
/** Replies one option may take before the server is deemed hostile. */
const MAX_REPLIES_PER_OPTION = 64;

/** What the handshake agreed; the transmission phase works from this. */
export interface Negotiated {
  /** The stream to talk on from now (the TLS socket after STARTTLS). */
  stream: Duplex;
  /** The raw socket underneath (to destroy it). */
  raw: Socket;
  /** Bytes the server already sent past the handshake (none from a correct server). */
  rest: Buffer | null;
  exportSize: bigint;
  transmissionFlags: number;
  /** NBD_INFO_BLOCK_SIZE, when the server sent it. */
  blockSize?: { minimum: number; preferred: number; maximum: number };
  structuredReplies: boolean;
  /** Context id of base:allocation, when selected. */
  allocationContext?: number;
  tls: boolean;
}

/** A handshake failure; `permanent` ones (unknown export, TLS refused) are not worth a retry. */
export class HandshakeError extends Error {
  readonly permanent: boolean;
  constructor(message: string, permanent: boolean) {
    super(message);
    this.name = 'HandshakeError';
    this.permanent = permanent;
  }
}

interface Reply {
  type: number;
  data: Buffer;
}

class OptionChannel {
  stream: Duplex;
  rx: RecvQueue;
  constructor(stream: Duplex) {
    this.stream = stream;
    this.rx = new RecvQueue(1 << 20);
    this.rx.attach(stream);
  }

  send(opt: number, data: Buffer = Buffer.alloc(0)): void {
    const h = Buffer.allocUnsafe(16);
    h.writeBigUInt64BE(IHAVEOPT, 0);
    h.writeUInt32BE(opt, 8);
    h.writeUInt32BE(data.length, 12);
    this.stream.write(data.length > 0 ? Buffer.concat([h, data]) : h);
  }

  async reply(opt: number): Promise<Reply> {
    const h = await this.rx.read(20);
    if (h.readUInt32BE(0) !== NBD_REP_MAGIC_HI || h.readUInt32BE(4) !== NBD_REP_MAGIC_LO)
      throw new HandshakeError('bad option reply magic', false);
    if (h.readUInt32BE(8) !== opt)
      throw new HandshakeError(`reply to option ${h.readUInt32BE(8)} while waiting for ${OPTION_NAMES[opt]}`, false);
    const type = h.readUInt32BE(12);
    const len = h.readUInt32BE(16);
    if (len > MAX_OPTION_REPLY_BYTES)
      throw new HandshakeError(
        `option reply of ${len} bytes to ${OPTION_NAMES[opt]} (at most ${MAX_OPTION_REPLY_BYTES})`,
        false,
      );
    return { type, data: Buffer.from(await this.rx.read(len)) };
  }
}

function optString(s: string): Buffer {
  const n = Buffer.from(s, 'utf8');
  const b = Buffer.allocUnsafe(4 + n.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  return b;
}

function errText(r: Reply): string {
  const names: Record<number, string> = {
    [NBD_REP_ERR_UNSUP]: 'NBD_REP_ERR_UNSUP',
    [NBD_REP_ERR_POLICY]: 'NBD_REP_ERR_POLICY',
    [NBD_REP_ERR_TLS_REQD]: 'NBD_REP_ERR_TLS_REQD',
    [NBD_REP_ERR_UNKNOWN]: 'NBD_REP_ERR_UNKNOWN',
    [NBD_REP_ERR_SHUTDOWN]: 'NBD_REP_ERR_SHUTDOWN',
    [NBD_REP_ERR_BLOCK_SIZE_REQD]: 'NBD_REP_ERR_BLOCK_SIZE_REQD',
  };
  const name = names[r.type] ?? `error 0x${r.type.toString(16)}`;
  const msg = r.data.toString('utf8').replace(/[^\x20-\x7e]/g, '?');
  return msg ? `${name}: ${msg}` : name;
}

function isError(type: number): boolean {
  return type >= 0x80000000;
}

function isPow2(n: number): boolean {
  return n > 0 && (n & (n - 1)) === 0;
}

/**
 * Negotiate an export on a connected socket. Rejects with HandshakeError (or the stream's error);
 * on failure the caller destroys `raw`.
 */
export async function negotiate(
  raw: Socket,
  t: NbdUriTarget,
  creds: TlsCredentials,
  timeoutMs: number,
): Promise<Negotiated> {
  let ch = new OptionChannel(raw);
  try {
    // GREETING
    const g = await ch.rx.read(16);
    if (g.readBigUInt64BE(0) !== NBDMAGIC) throw new HandshakeError('not an NBD server (no NBDMAGIC)', true);
    const second = g.readBigUInt64BE(8);
    if (second === CLISERV_MAGIC)
      throw new HandshakeError('the server speaks the oldstyle handshake, which this client does not support', true);
    if (second !== IHAVEOPT) throw new HandshakeError('not an NBD server (bad handshake magic)', true);
    const hflags = (await ch.rx.read(2)).readUInt16BE(0);
    if ((hflags & NBD_FLAG_FIXED_NEWSTYLE) === 0)
      throw new HandshakeError('the server does not speak fixed newstyle negotiation', true);
    // FLAGS
    const noZeroes = (hflags & NBD_FLAG_NO_ZEROES) !== 0;
    const cflags = Buffer.allocUnsafe(4);
    cflags.writeUInt32BE(NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? NBD_FLAG_C_NO_ZEROES : 0));
    raw.write(cflags);

    // STARTTLS
    let stream: Duplex = raw;
    if (t.tls) {
      ch.send(NBD_OPT_STARTTLS);
      const r = await ch.reply(NBD_OPT_STARTTLS);
      if (r.type !== NBD_REP_ACK)
        throw new HandshakeError(`the server refused TLS (${errText(r)}); the URI requires it`, true);
      const left = ch.rx.detach();
      if (left !== null && left.length > 0)
        throw new HandshakeError('the server sent data after accepting STARTTLS', false);
      stream = await upgradeTls(raw, t, creds, timeoutMs);
      ch = new OptionChannel(stream);
    }

    // STRUCTURED
    ch.send(NBD_OPT_STRUCTURED_REPLY);
    let r = await ch.reply(NBD_OPT_STRUCTURED_REPLY);
    if (r.type === NBD_REP_ERR_TLS_REQD)
      throw new HandshakeError('the server requires TLS: use an nbds:// or nbds+unix:// URI', true);
    const structuredReplies = r.type === NBD_REP_ACK;

    // META
    let allocationContext: number | undefined;
    if (structuredReplies) {
      const q = optString(BASE_ALLOCATION);
      const data = Buffer.concat([optString(t.exportName), Buffer.from([0, 0, 0, 1]), q]);
      ch.send(NBD_OPT_SET_META_CONTEXT, data);
      for (let i = 0; ; i++) {
        if (i >= MAX_REPLIES_PER_OPTION)
          throw new HandshakeError('too many replies to NBD_OPT_SET_META_CONTEXT', false);
        r = await ch.reply(NBD_OPT_SET_META_CONTEXT);
        if (r.type === NBD_REP_META_CONTEXT) {
          if (r.data.length < 4) throw new HandshakeError('short NBD_REP_META_CONTEXT', false);
          if (r.data.subarray(4).toString('utf8') === BASE_ALLOCATION) allocationContext = r.data.readUInt32BE(0);
          continue;
        }
        if (r.type !== NBD_REP_ACK) allocationContext = undefined; // an error drops what was listed
        break;
      }
    }

    // GO
    const go = Buffer.concat([
      optString(t.exportName),
      Buffer.from([0, 1, NBD_INFO_BLOCK_SIZE >> 8, NBD_INFO_BLOCK_SIZE & 0xff]),
    ]);
    ch.send(NBD_OPT_GO, go);
    let exportSize: bigint | undefined;
    let transmissionFlags = 0;
    let blockSize: Negotiated['blockSize'];
    for (let i = 0; ; i++) {
      if (i >= MAX_REPLIES_PER_OPTION) throw new HandshakeError('too many replies to NBD_OPT_GO', false);
      r = await ch.reply(NBD_OPT_GO);
      if (r.type === NBD_REP_INFO) {
        if (r.data.length < 2) throw new HandshakeError('short NBD_REP_INFO', false);
        const info = r.data.readUInt16BE(0);
        if (info === NBD_INFO_EXPORT) {
          if (r.data.length !== 12) throw new HandshakeError('NBD_INFO_EXPORT is not 12 bytes', false);
          exportSize = r.data.readBigUInt64BE(2);
          transmissionFlags = r.data.readUInt16BE(10);
        } else if (info === NBD_INFO_BLOCK_SIZE) {
          if (r.data.length !== 14) throw new HandshakeError('NBD_INFO_BLOCK_SIZE is not 14 bytes', false);
          blockSize = {
            minimum: r.data.readUInt32BE(2),
            preferred: r.data.readUInt32BE(6),
            maximum: r.data.readUInt32BE(10),
          };
        }
        continue; // other infos are ignored, as the spec asks
      }
      if (r.type === NBD_REP_ACK) break;
      if (r.type === NBD_REP_ERR_UNSUP) {
        // A server from before NBD_OPT_GO: EXPORT_NAME, which cannot fail politely.
        ch.send(NBD_OPT_EXPORT_NAME, Buffer.from(t.exportName, 'utf8'));
        const e = await ch.rx.read(10);
        exportSize = e.readBigUInt64BE(0);
        transmissionFlags = e.readUInt16BE(8);
        if (!noZeroes) await ch.rx.read(124);
        break;
      }
      if (r.type === NBD_REP_ERR_UNKNOWN)
        throw new HandshakeError(`the server has no export '${t.exportName}' (${errText(r)})`, true);
      if (r.type === NBD_REP_ERR_TLS_REQD)
        throw new HandshakeError('the server requires TLS for this export: use an nbds:// or nbds+unix:// URI', true);
      if (isError(r.type))
        throw new HandshakeError(
          `the server refused export '${t.exportName}': ${errText(r)}`,
          r.type !== NBD_REP_ERR_SHUTDOWN,
        );
      throw new HandshakeError(`unexpected reply type ${r.type} to NBD_OPT_GO`, false);
    }
    if (exportSize === undefined) throw new HandshakeError('NBD_OPT_GO succeeded without NBD_INFO_EXPORT', false);
    if ((transmissionFlags & NBD_FLAG_HAS_FLAGS) === 0)
      throw new HandshakeError('transmission flags without NBD_FLAG_HAS_FLAGS', false);
    if (blockSize !== undefined) {
      const { minimum, preferred, maximum } = blockSize;
      if (!isPow2(minimum) || minimum > 65536) throw new HandshakeError(`bad minimum block size ${minimum}`, true);
      if (!isPow2(preferred) || preferred < Math.max(minimum, 512))
        throw new HandshakeError(`bad preferred block size ${preferred}`, true);
      if (maximum < preferred)
        throw new HandshakeError(`maximum payload ${maximum} is below the preferred block size ${preferred}`, true);
    }
    const rest = ch.rx.detach();
    const n: Negotiated = { stream, raw, rest, exportSize, transmissionFlags, structuredReplies, tls: t.tls };
    if (blockSize !== undefined) n.blockSize = blockSize;
    if (allocationContext !== undefined) n.allocationContext = allocationContext;
    return n;
  } catch (e) {
    if (e instanceof ConnectionClosed)
      throw new HandshakeError('the server closed the connection during the handshake', false);
    throw e;
  }
}
