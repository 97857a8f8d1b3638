/**
 * Handshake phase, states GREETING and CLIENT_FLAGS (proto.md "Newstyle negotiation" and "Fixed
 * newstyle negotiation"): the server sends NBDMAGIC, IHAVEOPT and its handshake flags; the client
 * answers with 32 bits of client flags. Unknown client flag bits end the session. A client without
 * NBD_FLAG_C_FIXED_NEWSTYLE may only send NBD_OPT_EXPORT_NAME (options.ts enforces it).
 */
import {
  IHAVEOPT,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES,
  NBDMAGIC,
} from '../nbd-wire/constants.js';
import { type Connection, ProtocolViolation } from './connection.js';

const GREETING = (() => {
  const b = Buffer.alloc(18);
  b.writeBigUInt64BE(NBDMAGIC, 0);
  b.writeBigUInt64BE(IHAVEOPT, 8);
  b.writeUInt16BE(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES, 16);
  return b;
})();

const KNOWN_CLIENT_FLAGS = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;

export async function greet(conn: Connection): Promise<void> {
  conn.send(GREETING);
  conn.transition('CLIENT_FLAGS');
  const flags = (await conn.rx.read(4)).readUInt32BE(0);
  if ((flags & ~KNOWN_CLIENT_FLAGS) !== 0) {
    throw new ProtocolViolation(`unknown client flags 0x${flags.toString(16)}`);
  }
  conn.fixedNewstyle = (flags & NBD_FLAG_C_FIXED_NEWSTYLE) !== 0;
  conn.noZeroes = (flags & NBD_FLAG_C_NO_ZEROES) !== 0;
  conn.transition('OPTIONS');
}
