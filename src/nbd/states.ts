/**
 * The NBD connection state machine (proto.md "Protocol phases"), as a table: each state names its
 * phase (the file that implements it), the states it may move to, and the messages it accepts.
 * `Connection.transition` refuses any edge not listed here, so a bug cannot skip a phase.
 *
 *   GREETING -> CLIENT_FLAGS -> OPTIONS <-> TLS_HANDSHAKE
 *                                  |  \-> CLOSED (ABORT, hard disconnect)
 *                                  v
 *                             TRANSMISSION -> DRAINING -> CLOSED
 */
import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_DISC,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
} from '../nbd-wire/constants.js';

export type ConnState =
  | 'GREETING'
  | 'CLIENT_FLAGS'
  | 'OPTIONS'
  | 'TLS_HANDSHAKE'
  | 'TRANSMISSION'
  | 'DRAINING'
  | 'CLOSED';

export interface StateSpec {
  /** Source file implementing the state. */
  readonly phase: 'handshake' | 'options' | 'transmission' | 'connection';
  readonly next: readonly ConnState[];
  /** Option or command numbers handled; anything else gets NBD_REP_ERR_UNSUP / NBD_EINVAL. */
  readonly accepts: readonly number[];
}

export const STATES: Readonly<Record<ConnState, StateSpec>> = {
  GREETING: { phase: 'handshake', next: ['CLIENT_FLAGS', 'CLOSED'], accepts: [] },
  CLIENT_FLAGS: { phase: 'handshake', next: ['OPTIONS', 'CLOSED'], accepts: [] },
  OPTIONS: {
    phase: 'options',
    next: ['TLS_HANDSHAKE', 'TRANSMISSION', 'CLOSED'],
    accepts: [
      NBD_OPT_EXPORT_NAME,
      NBD_OPT_ABORT,
      NBD_OPT_LIST,
      NBD_OPT_STARTTLS,
      NBD_OPT_INFO,
      NBD_OPT_GO,
      NBD_OPT_STRUCTURED_REPLY,
      NBD_OPT_LIST_META_CONTEXT,
      NBD_OPT_SET_META_CONTEXT,
    ],
  },
  TLS_HANDSHAKE: { phase: 'options', next: ['OPTIONS', 'CLOSED'], accepts: [] },
  TRANSMISSION: {
    phase: 'transmission',
    next: ['DRAINING', 'CLOSED'],
    accepts: [
      NBD_CMD_READ,
      NBD_CMD_WRITE,
      NBD_CMD_DISC,
      NBD_CMD_FLUSH,
      NBD_CMD_TRIM,
      NBD_CMD_CACHE,
      NBD_CMD_WRITE_ZEROES,
      NBD_CMD_BLOCK_STATUS,
    ],
  },
  DRAINING: { phase: 'transmission', next: ['CLOSED'], accepts: [] },
  CLOSED: { phase: 'connection', next: [], accepts: [] },
};

/** True when `to` is a legal next state of `from`. */
export function canTransition(from: ConnState, to: ConnState): boolean {
  return STATES[from].next.includes(to);
}
