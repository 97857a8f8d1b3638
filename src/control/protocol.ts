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
 *
 * Volume keys travel as raw bytes after the line, never inside the JSON (issue 11 item 8: a JSON
 * string becomes an immutable JS string the daemon cannot wipe). A request with binary arguments
 * names them and their lengths in `bin`, and exactly those bytes follow the newline, in that order:
 *
 *   {"id": 2, "op": "volume.open", "args": {"mapping": {...}}, "bin": {"key": 64}}\n<64 key bytes>
 *
 * The receiver copies them into a Buffer of its own, zeroes the socket's read buffer where they
 * were, and hands them to the handler as args.key (a Buffer it wipes after the request).
 */
import { CryptmapError } from '../util/errors.js';
import { allocSecretBuffer } from '../util/secret.js';

export const MAX_LINE_BYTES = 1 << 20;
/** Largest binary argument (a volume key is at most 512 bytes). */
export const MAX_BIN_BYTES = 4096;

export interface ControlRequest {
  id: number;
  op: string;
  args: Record<string, unknown>;
  /** Binary arguments that follow the line: [arg name, byte count] in order. */
  bin?: [string, number][];
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
  const req: ControlRequest = { id: o.id as number, op: o.op, args: args as Record<string, unknown> };
  if (o.bin !== undefined) {
    const b = o.bin;
    if (typeof b !== 'object' || b === null || Array.isArray(b)) throw new CryptmapError('EPROTO', 'control request "bin" must be an object');
    const entries = Object.entries(b);
    if (entries.length === 0 || entries.length > 4) throw new CryptmapError('EPROTO', 'control request "bin" names 1 to 4 arguments');
    for (const [k, n] of entries) {
      if (!/^[a-z][a-zA-Z0-9]{0,31}$/.test(k) || !Number.isSafeInteger(n) || (n as number) < 1 || (n as number) > MAX_BIN_BYTES) {
        throw new CryptmapError('EPROTO', `control request "bin": each argument is 1 to ${MAX_BIN_BYTES} bytes`);
      }
    }
    req.bin = entries as [string, number][];
  }
  return req;
}

/**
 * The bytes of a request: its JSON line, then each binary argument (copied here; the copies are
 * wiped once written, see ControlClient.call).
 */
export function encodeRequest(id: number, op: string, args: Record<string, unknown>, bin: Record<string, Uint8Array> = {}): { line: string; binary: Buffer[] } {
  const names = Object.keys(bin);
  const head: Record<string, unknown> = { id, op, args };
  if (names.length) head.bin = Object.fromEntries(names.map((k) => [k, bin[k]!.length]));
  return { line: `${JSON.stringify(head)}\n`, binary: names.map((k) => Buffer.from(bin[k]!)) };
}

/**
 * Split a stream of bytes into lines without holding more than MAX_LINE_BYTES of an unfinished
 * line. Returns a push function; onLine gets each complete line, onOverflow fires once. When onLine
 * returns a byte count, that many raw bytes follow the line: they are copied into a new Buffer
 * given to onBinary, and zeroed in the chunks they arrived in (the socket's read buffers).
 */
export function lineSplitter(onLine: (line: string) => unknown, onOverflow: () => void, onBinary?: (bytes: Buffer) => void): (chunk: Buffer) => void {
  let pending: Buffer[] = [];
  let pendingBytes = 0;
  let dead = false;
  let bin: Buffer | null = null;
  let binAt = 0;
  return (chunk: Buffer) => {
    if (dead) return;
    let start = 0;
    while (start < chunk.length) {
      if (bin) {
        const n = Math.min(bin.length - binAt, chunk.length - start);
        chunk.copy(bin, binAt, start, start + n);
        chunk.fill(0, start, start + n);
        binAt += n;
        start += n;
        if (binAt === bin.length) {
          const b = bin;
          bin = null;
          binAt = 0;
          onBinary?.(b);
        }
        continue;
      }
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
      start = nl + 1;
      const want = onLine(line);
      if (typeof want === 'number' && want > 0) {
        bin = allocSecretBuffer(want); // off the V8 heap: a moving GC would leave copies behind
        binAt = 0;
      }
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
