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
import type { ActivationFlags } from '../activate/flags.js';
import type { CryptMapping } from '../activate/mapping.js';
import type { DmInfo, DmLines, DmListEntry } from '../dm/control.js';
import type { AttachInfo } from '../nbd/attach.js';
import { CryptmapError } from '../util/errors.js';
import { allocSecretBuffer } from '../util/secret.js';

/** A CryptMapping as JSON: the u64 IV offset as a decimal string (control/args.ts converts). */
export type MappingJson = Omit<CryptMapping, 'ivOffsetSectors'> & { ivOffsetSectors: string };

/** How an export becomes a kernel block device: fuse (built-in FUSE export + loop), nbd (kernel client) or nbdfuse. */
export type Via = 'fuse' | 'nbd' | 'nbdfuse';
export const VIAS: readonly Via[] = ['fuse', 'nbd', 'nbdfuse'];

/** An attachment as the daemon records it: the NBD one, or ours (`via: 'fuse'`). */
export interface Attachment extends AttachInfo {
  via: Via;
}

/** What the daemon says about a volume (`volume.status`, and the result of the volume verbs). */
export interface VolumeStatus {
  name: string;
  active: boolean;
  mapping?: MappingJson;
  nbdUri: string;
  attachedDevice?: string;
  /** How it is attached: fuse (built-in FUSE export + loop), nbd (kernel client) or nbdfuse. */
  attachedVia?: Via;
  suspended: boolean;
  openCount: number;
  nbdConnections: number;
  /** The NBD client under a volume whose device is an NBD URI: ready, reconnecting or failed (then I/O fails with EIO). */
  remote?: { state: string; reconnects: number; lastError?: string };
  /** The volume's online reencryption, while it runs and after it ended (until the volume is closed). */
  reencrypt?: ReencryptStatus;
}

/** An online reencryption the daemon runs or ran on a volume (`cryptmap reencrypt` on an active volume). */
export interface ReencryptStatus {
  state: 'running' | 'finished' | 'stopped' | 'failed';
  /** Data bytes in the new layout (by earlier runs too) and in all. */
  doneBytes: number;
  totalBytes: number;
  /** Why it failed. */
  error?: string;
}

/** Activation flags `refresh` sets (absent = off), as in CryptMapping. */
export type RefreshFlags = ActivationFlags;

type Name = { name: string };
type NoArgs = Record<string, never>;

/**
 * Every control operation: its arguments, its result and whether it carries a volume key (the
 * binary argument `key`, see above; `pair`: `key` and `newKey`, the old and new keys of a reencryption). The client's `call` and the daemon's handlers are typed from
 * this map, so adding an operation is one entry here, one handler (daemon/handlers.ts) and its callers.
 */
export interface ControlOps {
  'daemon.ping': { args: NoArgs; result: { pid: number; nbdSocket: string } };
  /** `shared`: cryptsetup's --shared, no exclusive-access check of the device (daemon/volume-lifecycle.ts). */
  'volume.open': { args: { mapping: MappingJson; shared?: boolean }; key: 'required'; result: VolumeStatus };
  'volume.suspend': { args: Name; result: VolumeStatus };
  /** `disableKeyring`: cryptsetup luksResume --disable-keyring (the key location becomes dm-crypt; else keyring). */
  'volume.resume': { args: Name & { disableKeyring?: boolean }; key: 'required'; result: VolumeStatus };
  'volume.refresh': { args: Name & { flags: RefreshFlags }; key: 'required'; result: VolumeStatus };
  /** LUKS2 volumes need the key (cryptsetup asks for the passphrase), others not. */
  'volume.resize': { args: Name & { sizeSectors?: number }; key: 'optional'; result: VolumeStatus };
  /**
   * Online reencryption (encryption, decryption) of an active LUKS2 volume whose header is in
   * reencryption: `key` is the volume key it runs with, `newKey` the new one (either absent where
   * that side is plaintext). Returns once it runs (progress: volume.status).
   */
  'volume.reencrypt': { args: Name & { hotzoneBytes?: number }; key: 'pair'; result: VolumeStatus };
  /**
   * Open a LUKS2 volume whose reencryption (encryption, decryption) stopped between hotzones
   * (cryptsetup 2.6 maps each live segment of the header): `mapping` names the volume, its devices and
   * activation flags (the daemon reads the segments from the header); `key` is the old volume key,
   * `newKey` the new one (either absent where that side is plaintext).
   */
  'volume.openReencrypt': {
    args: { mapping: MappingJson };
    key: 'pair';
    result: VolumeStatus;
  };
  /** Stop it after the current hotzone (resumable); returns once it stopped. */
  'volume.reencryptStop': { args: Name; result: VolumeStatus };
  'volume.close': { args: Name & { force?: boolean }; result: null };
  /**
   * The agent's persistent volume `id` (`SERVICE/VOLUME`) gets a new volume key, reencrypted online;
   * returns once it runs (progress: volume.status of the mapping). A plain daemon refuses (ENOTSUP).
   */
  'agent.rotateKey': { args: { id: string; hotzoneBytes?: number }; result: VolumeStatus };
  /** Every persistent volume's keyslot moves to the key service's newest root secret (a root rotation). */
  'agent.rewrapKeys': { args: NoArgs; result: Array<{ id: string; result: string; error?: string }> };
  'volume.status': { args: Name; result: VolumeStatus };
  'volume.list': { args: NoArgs; result: VolumeStatus[] };
  attach: { args: Name & { readOnly?: boolean; via?: Via | 'auto' }; result: Attachment };
  detach: { args: Name; result: null };
  // dmsetup verbs (control/dm-remote.ts)
  'dm.create': { args: Name & { table?: string; uuid?: string; readOnly?: boolean }; result: null };
  'dm.remove': { args: Name & { force?: boolean }; result: null };
  'dm.load': { args: Name & { table: string }; result: null };
  'dm.clear': { args: Name; result: null };
  'dm.suspend': { args: Name & { noflush?: boolean }; result: null };
  'dm.resume': { args: Name; result: null };
  'dm.rename': { args: { oldName: string; newName: string }; result: null };
  'dm.table': { args: { name?: string; showKeys?: boolean }; result: DmLines[] };
  'dm.status': { args: { name?: string }; result: DmLines[] };
  'dm.info': { args: { name?: string }; result: DmInfo[] };
  'dm.ls': { args: NoArgs; result: DmListEntry[] };
  'dm.message': { args: Name & { sector: number; message: string[] }; result: string };
  /** The agent only (`cryptmap volume snapshot`): a snapshot of a volume in a thin pool (reconciler/snapshot.ts). */
  'agent.snapshot': {
    args: { volume: string; name: string };
    result: { volume: string; name: string; thinId: number };
  };
}

export type ControlOp = keyof ControlOps;
export type OpArgs<K extends ControlOp> = ControlOps[K]['args'];
/** A result as it arrives over JSON (a handler's `undefined` is sent as null). */
export type OpResult<K extends ControlOp> = ControlOps[K]['result'];
type KeyMode<K extends ControlOp> = ControlOps[K] extends { key: infer M } ? M : 'none';

/** The binary arguments of a call: `{ key }` where the operation takes a volume key (`{ key, newKey }`: a pair). */
export type OpBin<K extends ControlOp> =
  KeyMode<K> extends 'pair'
    ? [bin: { key?: Uint8Array; newKey?: Uint8Array }]
    : KeyMode<K> extends 'required'
      ? [bin: { key: Uint8Array }]
      : KeyMode<K> extends 'optional'
        ? [bin?: { key: Uint8Array }]
        : [];
/** The arguments of `ControlClient.call` after the op name (args may be left out when none are required). */
export type CallRest<K extends ControlOp> =
  NoArgs extends OpArgs<K> ? [args?: OpArgs<K>, ...OpBin<K>] : [args: OpArgs<K>, ...OpBin<K>];

/**
 * What a handler gets: the request's arguments as sent (untrusted: each is checked before use) and,
 * for a keyed operation, `key`, the key bytes the server wipes after the handler.
 */
export type ReceivedArgs<K extends ControlOp> = {
  readonly [P in keyof OpArgs<K>]?: unknown;
} & (KeyMode<K> extends 'none' ? unknown : { readonly key?: unknown }) &
  (KeyMode<K> extends 'pair' ? { readonly newKey?: unknown } : unknown);
/** A handler of an operation without a result (null) may return nothing: the server sends null. */
// biome-ignore lint/suspicious/noConfusingVoidType: Promise<void> is what DmControl's verbs return
export type OpHandler<K extends ControlOp> = (args: ReceivedArgs<K>) => Promise<OpResult<K> | void>;
/** Handlers for a set of operations (the daemon serves all of ControlOps). */
export type OpHandlers<K extends ControlOp = ControlOp> = { [P in K]: OpHandler<P> };

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

export type ControlResponse =
  | { id: number | null; ok: true; result: unknown }
  | { id: number | null; ok: false; error: ControlErrorBody };

/** Validate a parsed request line; throws CryptmapError EPROTO on anything else. */
export function parseRequest(line: string): ControlRequest {
  let v: unknown;
  try {
    v = JSON.parse(line);
  } catch {
    throw new CryptmapError('EPROTO', 'control request is not valid JSON');
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v))
    throw new CryptmapError('EPROTO', 'control request must be a JSON object');
  const o = v as Record<string, unknown>;
  if (!Number.isSafeInteger(o.id)) throw new CryptmapError('EPROTO', 'control request needs an integer "id"');
  if (typeof o.op !== 'string' || !/^[a-z][a-zA-Z0-9.]{0,63}$/.test(o.op))
    throw new CryptmapError('EPROTO', 'control request needs an "op" name');
  const args = o.args ?? {};
  if (typeof args !== 'object' || args === null || Array.isArray(args))
    throw new CryptmapError('EPROTO', 'control request "args" must be an object');
  const req: ControlRequest = { id: o.id as number, op: o.op, args: args as Record<string, unknown> };
  if (o.bin !== undefined) {
    const b = o.bin;
    if (typeof b !== 'object' || b === null || Array.isArray(b))
      throw new CryptmapError('EPROTO', 'control request "bin" must be an object');
    const entries = Object.entries(b);
    if (entries.length === 0 || entries.length > 4)
      throw new CryptmapError('EPROTO', 'control request "bin" names 1 to 4 arguments');
    for (const [k, n] of entries) {
      if (
        !/^[a-z][a-zA-Z0-9]{0,31}$/.test(k) ||
        !Number.isSafeInteger(n) ||
        (n as number) < 1 ||
        (n as number) > MAX_BIN_BYTES
      ) {
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
export function encodeRequest(
  id: number,
  op: string,
  args: Record<string, unknown>,
  bin: Record<string, Uint8Array | undefined> = {},
): { line: string; binary: Buffer[] } {
  // An absent optional argument (one key of a pair) is not sent.
  const names = Object.keys(bin).filter((k) => bin[k] !== undefined);
  const head: Record<string, unknown> = { id, op, args };
  if (names.length) head.bin = Object.fromEntries(names.map((k) => [k, bin[k]!.length]));
  return { line: `${JSON.stringify(head)}\n`, binary: names.map((k) => Buffer.from(bin[k]!)) };
}

/**
 * Split a stream of bytes into lines without holding more than MAX_LINE_BYTES of an unfinished
 * line. Returns a push function; onLine gets each complete line, onOverflow fires once. When onLine
 * returns a byte count, that many raw bytes follow the line: they are copied into a new Buffer
 * given to onBinary, and zeroed in the chunks they arrived in (the socket's read buffers). The
 * unfinished part of a line is copied off the chunk (then zeroed there) and its copies are zeroed
 * once the line is complete. `wipe()` (call it when the connection closes) zeroes what a connection
 * that ended half-way left: the unfinished line and the binary bytes received so far.
 */
export function lineSplitter(
  onLine: (line: string) => unknown,
  onOverflow: () => void,
  onBinary?: (bytes: Buffer) => void,
): ((chunk: Buffer) => void) & { wipe(): void } {
  let pending: Buffer[] = [];
  let pendingBytes = 0;
  let dead = false;
  let bin: Buffer | null = null;
  let binAt = 0;
  const dropPending = () => {
    for (const p of pending) p.fill(0);
    pending = [];
    pendingBytes = 0;
  };
  const overflow = () => {
    dead = true;
    dropPending();
    onOverflow();
  };
  const push = (chunk: Buffer) => {
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
      if (pendingBytes + part.length > MAX_LINE_BYTES) return overflow();
      let line: string;
      if (pending.length) {
        const whole = Buffer.concat([...pending, part]);
        line = whole.toString('utf8');
        whole.fill(0);
        dropPending();
      } else {
        line = part.toString('utf8');
      }
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
      if (pendingBytes > MAX_LINE_BYTES) return overflow();
      const copy = allocSecretBuffer(rest.length); // its own memory (not the shared pool): zeroed later
      rest.copy(copy);
      rest.fill(0);
      pending.push(copy);
    }
  };
  const wipe = () => {
    dead = true;
    dropPending();
    bin?.fill(0);
    bin = null;
    binAt = 0;
  };
  return Object.assign(push, { wipe });
}
