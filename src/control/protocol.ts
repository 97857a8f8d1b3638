/**
 * The control protocol between the CLI (or agent) and the daemon: one JSON object per line over a
 * Unix socket (mode 0600 in a 0700 runtime dir, so only its owner and root can connect).
 *
 *   request:  {"id": 1, "op": "dm.create", "args": {...}}
 *   response: {"id": 1, "ok": true, "result": ...}
 *           | {"id": 1, "ok": false, "error": {"code": "...", "message": "...", "exitCode": 5}}
 *
 * Lines are capped at MAX_LINE_BYTES before parsing; a longer or malformed line gets an error
 * response (id null) and the connection is closed. Requests may carry key material (crypt tables,
 * volume keys): handlers must never log their args.
 */
import { CryptmapError } from '../util/errors.js';

export const MAX_LINE_BYTES = 1 << 20;

export interface ControlRequest {
  id: number;
  op: string;
  args: Record<string, unknown>;
}

export interface ControlErrorBody {
  code: string;
  message: string;
  exitCode: number;
}

export type ControlResponse = { id: number | null; ok: true; result: unknown } | { id: number | null; ok: false; error: ControlErrorBody };

/** Validate a parsed request line; throws CryptmapError EPROTO on anything else. */
export function parseRequest(line: string): ControlRequest {
  let v: unknown;
  try {
    v = JSON.parse(line);
  } catch {
    throw new CryptmapError('EPROTO', 'control request is not valid JSON');
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new CryptmapError('EPROTO', 'control request must be a JSON object');
  const o = v as Record<string, unknown>;
  if (!Number.isSafeInteger(o.id)) throw new CryptmapError('EPROTO', 'control request needs an integer "id"');
  if (typeof o.op !== 'string' || !/^[a-z][a-zA-Z0-9.]{0,63}$/.test(o.op)) throw new CryptmapError('EPROTO', 'control request needs an "op" name');
  const args = o.args ?? {};
  if (typeof args !== 'object' || args === null || Array.isArray(args)) throw new CryptmapError('EPROTO', 'control request "args" must be an object');
  return { id: o.id as number, op: o.op, args: args as Record<string, unknown> };
}

/**
 * Split a stream of bytes into lines without holding more than MAX_LINE_BYTES of an unfinished
 * line. Returns a push function; onLine gets each complete line, onOverflow fires once.
 */
export function lineSplitter(onLine: (line: string) => void, onOverflow: () => void): (chunk: Buffer) => void {
  let pending: Buffer[] = [];
  let pendingBytes = 0;
  let dead = false;
  return (chunk: Buffer) => {
    if (dead) return;
    let start = 0;
    for (;;) {
      const nl = chunk.indexOf(0x0a, start);
      if (nl < 0) break;
      const part = chunk.subarray(start, nl);
      if (pendingBytes + part.length > MAX_LINE_BYTES) {
        dead = true;
        onOverflow();
        return;
      }
      const line = pending.length ? Buffer.concat([...pending, part]).toString('utf8') : part.toString('utf8');
      pending = [];
      pendingBytes = 0;
      onLine(line);
      start = nl + 1;
    }
    const rest = chunk.subarray(start);
    if (rest.length) {
      pendingBytes += rest.length;
      if (pendingBytes > MAX_LINE_BYTES) {
        dead = true;
        onOverflow();
        return;
      }
      pending.push(Buffer.from(rest));
    }
  };
}
