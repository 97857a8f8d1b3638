/**
 * What the LUKS verbs share: cryptsetup's option table, passphrase and key-file input (cryptsetup(8)
 * NOTES ON PASSPHRASE PROCESSING: a terminal line without echo; stdin up to the first newline; a key
 * file read whole, newlines included, after --keyfile-offset and up to --keyfile-size), the YES
 * confirmation, device opening and KDF options; loading a header the way cryptsetup's crypt_load does
 * (with recovery of a damaged LUKS2 copy) and the unlock sequence of `open` (tokens, then passphrase).
 */
import { type FileHandle, open, stat } from 'node:fs/promises';
import { cpus, totalmem } from 'node:os';
import { FileDevice } from '../../blockdev/file.js';
import { isRemoteDevice, openBlockDevice } from '../../blockdev/open.js';
import type { BlockDevice } from '../../blockdev/types.js';
import { inReencryption, type Luks1Volume, type Luks2Volume, type NewKeyslotOptions, openLuks, type UnlockResult, unlockByToken, unlockInReencryption, withDeviceLock } from '../../luks/index.js';
import { CryptmapError, EXIT_NO_PERMISSION, EXIT_WRONG_DEVICE, EXIT_WRONG_PARAMS, isCryptmapError } from '../../util/errors.js';
import { type CliValues, parseCommandLine } from '../options.js';
import { Secret } from '../../util/secret.js';
import type { CliIO } from '../types.js';
import { passphrasePrompt } from '../device-name.js';

/** Compiled maximum key file size in cryptsetup (default-keyfile-size-maxkb 8192). */
export const KEYFILE_MAX_BYTES = 8192 * 1024;
export const PASSPHRASE_MAX_BYTES = 512;

export type LuksArgs = CliValues;

/**
 * The options and arguments of a cryptsetup-style verb from its argv (`[verb, ...]`, as main hands it
 * over): the one option table of options.ts, so every verb takes options before or after its arguments.
 */
export function parseLuksArgs(argv: string[]): { values: CliValues; positionals: string[] } {
  const { values, positionals } = parseCommandLine(argv);
  return { values, positionals };
}

/** Parse a non-negative integer option strictly. */
export function intOpt(v: string | undefined, name: string, min = 0, max = Number.MAX_SAFE_INTEGER): number | undefined {
  if (v === undefined) return undefined;
  if (!/^[0-9]+$/.test(v) || Number(v) < min || Number(v) > max) throw new CryptmapError('EARGS', `Invalid ${name} value ${v}.`, { exitCode: EXIT_WRONG_PARAMS });
  return Number(v);
}

export function needDevice(positionals: string[], usage: string): string {
  const d = positionals[0];
  if (!d) throw new CryptmapError('EARGS', `Command requires device as argument.\nUsage: ${usage}`, { exitCode: EXIT_WRONG_PARAMS });
  return d;
}

/** Open an image, a device or an NBD URI; cryptsetup's message when it is missing. */
export async function openDevice(path: string, write: boolean): Promise<BlockDevice> {
  if (isRemoteDevice(path)) {
    try {
      return await openBlockDevice(path, { readOnly: !write });
    } catch (e) {
      const c = isCryptmapError(e) ? e : undefined;
      throw new CryptmapError('ENODEV', c?.message ?? `Cannot open device ${path}.`, { exitCode: c?.exitCode ?? EXIT_WRONG_DEVICE, cause: e });
    }
  }
  try {
    await stat(path);
  } catch {
    throw new CryptmapError('ENODEV', `Device ${path} does not exist or access denied.`, { exitCode: EXIT_WRONG_DEVICE });
  }
  try {
    return await FileDevice.open(path, { readOnly: !write });
  } catch (e) {
    throw new CryptmapError('ENODEV', `Cannot open device ${path}${write ? ' for read-write access' : ''}.`, { exitCode: EXIT_WRONG_DEVICE, cause: e });
  }
}

// ---- input ----------------------------------------------------------------------------------

/**
 * Standard input read as cryptsetup reads it (lib/utils.c crypt_keyfile_device_read): only as many
 * bytes as asked for, so a passphrase line leaves the next line for the next prompt and an endless
 * stream (`-d - < /dev/zero`) is never slurped. Bytes read past what was asked wait here for the
 * next read from the same stream; they are wiped by resetStdin.
 */
interface StdinState {
  it: AsyncIterator<Buffer | string>;
  pending: Buffer;
  eof: boolean;
}
const stdinStates = new WeakMap<object, StdinState>();

function stdinState(io: CliIO): StdinState {
  let st = stdinStates.get(io.stdin);
  if (!st) {
    st = { it: (io.stdin as AsyncIterable<Buffer | string>)[Symbol.asyncIterator](), pending: Buffer.alloc(0), eof: false };
    stdinStates.set(io.stdin, st);
  }
  return st;
}

/** Up to `max` bytes of stdin, stopping after a newline when `stopEol` (the newline is consumed, not returned). */
async function readStdin(io: CliIO, max: number, stopEol: boolean): Promise<{ data: Buffer; newline: boolean }> {
  const st = stdinState(io);
  for (;;) {
    const nl = stopEol ? st.pending.indexOf(0x0a) : -1;
    if (nl >= 0 && nl < max) {
      const data = Buffer.from(st.pending.subarray(0, nl));
      takePending(st, nl + 1);
      return { data, newline: true };
    }
    if (st.pending.length >= max || st.eof) {
      const n = Math.min(max, st.pending.length);
      const data = Buffer.from(st.pending.subarray(0, n));
      takePending(st, n);
      return { data, newline: false };
    }
    const r = await st.it.next();
    if (r.done) st.eof = true;
    else {
      const chunk = typeof r.value === 'string' ? Buffer.from(r.value) : r.value;
      const joined = Buffer.concat([st.pending, chunk]);
      st.pending.fill(0);
      chunk.fill(0);
      st.pending = joined;
    }
  }
}

function takePending(st: StdinState, n: number): void {
  const rest = Buffer.from(st.pending.subarray(n));
  st.pending.fill(0);
  st.pending = rest;
}

/** Wipe what is buffered from a stdin (tests call verbs repeatedly in one process). */
export function resetStdin(io?: CliIO): void {
  const st = io ? stdinStates.get(io.stdin) : undefined;
  st?.pending.fill(0);
  if (io) stdinStates.delete(io.stdin);
}

/** One line from a terminal without echo. */
async function readTtyLine(io: CliIO, prompt: string): Promise<Buffer> {
  io.stderr.write(prompt);
  const stdin = io.stdin as NodeJS.ReadStream;
  stdin.setRawMode?.(true);
  stdin.resume();
  const bytes: number[] = [];
  try {
    await new Promise<void>((resolve, reject) => {
      const onData = (d: Buffer) => {
        try {
          for (const b of d) {
            if (b === 0x0d || b === 0x0a) {
              stdin.off('data', onData);
              resolve();
              return;
            }
            if (b === 0x03) {
              stdin.off('data', onData);
              reject(new CryptmapError('EINTR', 'Operation interrupted.', { exitCode: EXIT_WRONG_PARAMS }));
              return;
            }
            if (b === 0x7f || b === 0x08) bytes.pop();
            else bytes.push(b);
          }
        } finally {
          if (Buffer.isBuffer(d)) d.fill(0); // raw terminal input: the passphrase bytes
        }
      };
      stdin.on('data', onData);
    });
  } finally {
    stdin.setRawMode?.(false);
    stdin.pause();
    io.stderr.write('\n');
  }
  const out = Buffer.from(bytes);
  bytes.fill(0);
  return out;
}

export interface PassphraseSource {
  keyFile?: string;
  keyfileOffset?: number;
  keyfileSize?: number;
}

function keyError(message: string, code = 'EKEYFILE'): CryptmapError {
  return new CryptmapError(code, message, { exitCode: EXIT_WRONG_PARAMS });
}

/**
 * A key file, or standard input, read as cryptsetup's crypt_keyfile_device_read does: skip `keyfileOffset`
 * bytes (read and dropped where the input cannot seek); then exactly `keyfileSize` bytes when it is given
 * ("Cannot read requested amount of data." when fewer come), else everything up to the 8 MiB cap
 * ("Maximum keyfile size exceeded." past it). Nothing is read whole: `/dev/urandom`, `/dev/zero` or an
 * endless pipe cost at most the cap. `file` undefined is standard input with a newline ending the
 * passphrase (`stopEol`); an input other than a regular file that gives nothing is "Nothing to read on
 * input." (code EPIPE, exit 1): an empty passphrase only ever comes from an empty line or an empty file.
 */
async function readKeyInput(io: CliIO, file: string | undefined, offset: number, size: number | undefined, stopEol: boolean): Promise<Buffer> {
  const limit = size && size > 0 ? size : KEYFILE_MAX_BYTES + 1;
  const unlimited = !(size && size > 0);
  let data: Buffer;
  let regular = false;
  let newline = false;
  if (file === undefined) {
    if (offset > 0) {
      let left = offset;
      while (left > 0) {
        const skipped = await readStdin(io, Math.min(left, 1 << 16), false);
        skipped.data.fill(0);
        if (skipped.data.length === 0) throw keyError('Cannot seek to requested keyfile offset.');
        left -= skipped.data.length;
      }
    }
    const r = await readStdin(io, limit, stopEol);
    data = r.data;
    newline = r.newline;
  } else {
    let fh: FileHandle;
    try {
      fh = await open(file, 'r');
    } catch {
      throw keyError('Failed to open key file.');
    }
    try {
      const st = await fh.stat();
      regular = st.isFile();
      if (regular && offset > st.size) throw keyError('Cannot seek to requested keyfile offset.');
      let pos: number | null = regular ? offset : null;
      if (!regular && offset > 0) {
        const junk = Buffer.alloc(Math.min(offset, 1 << 16));
        for (let left = offset; left > 0; ) {
          const { bytesRead } = await fh.read(junk, 0, Math.min(left, junk.length), null);
          if (bytesRead === 0) throw keyError('Cannot seek to requested keyfile offset.');
          left -= bytesRead;
        }
        junk.fill(0);
      }
      const want = regular ? Math.min(limit, Math.max(0, st.size - offset)) : limit;
      data = Buffer.alloc(want);
      let got = 0;
      // A regular file may still grow or shrink; a device or pipe gives what it gives.
      while (got < data.length) {
        const { bytesRead } = await fh.read(data, got, data.length - got, pos);
        if (bytesRead === 0) break;
        got += bytesRead;
        if (pos !== null) pos += bytesRead;
      }
      if (got < data.length) {
        const short = Buffer.from(data.subarray(0, got));
        data.fill(0);
        data = short;
      }
    } finally {
      await fh.close().catch(() => {});
    }
  }
  const fail = (e: CryptmapError) => {
    data.fill(0);
    return e;
  };
  if (data.length === 0 && !regular && !newline) throw fail(new CryptmapError('EPIPE', 'Nothing to read on input.', { exitCode: 1 }));
  if (unlimited && data.length === limit) throw fail(keyError('Maximum keyfile size exceeded.'));
  if (!unlimited && data.length !== limit) throw fail(keyError('Cannot read requested amount of data.'));
  return data;
}

/** Read a key file (or '-' = stdin, read to its end) after --keyfile-offset, --keyfile-size bytes or up to 8 MiB (cryptsetup semantics). */
export async function readKeyFile(io: CliIO, src: Required<Pick<PassphraseSource, 'keyFile'>> & PassphraseSource): Promise<Buffer> {
  return readKeyInput(io, src.keyFile === '-' ? undefined : src.keyFile, src.keyfileOffset ?? 0, src.keyfileSize, false);
}

/**
 * A volume key from a file (--volume-key-file), as cryptsetup's tools_read_vk: exactly `bytes`
 * bytes from its start, whatever the file is (`/dev/urandom` gives a random key).
 */
export async function readVolumeKeyFile(file: string, bytes: number): Promise<Buffer> {
  let fh: FileHandle;
  try {
    fh = await open(file, 'r');
  } catch {
    throw keyError(`Cannot read keyfile ${file}.`);
  }
  const key = Buffer.alloc(bytes);
  try {
    let got = 0;
    while (got < bytes) {
      const { bytesRead } = await fh.read(key, got, bytes - got, null);
      if (bytesRead === 0) break;
      got += bytesRead;
    }
    if (got !== bytes) {
      key.fill(0);
      throw keyError(`Cannot read ${bytes} bytes from keyfile ${file}.`);
    }
    return key;
  } finally {
    await fh.close().catch(() => {});
  }
}

/**
 * Get a passphrase as cryptsetup's tools_get_key: from the key file when given ('-' = all of stdin,
 * or a prompt when stdin is a terminal); else from a terminal (prompt, no echo, and a second prompt
 * when `verify`); else from stdin up to the first newline, at most --keyfile-size bytes when given.
 */
export async function getPassphrase(io: CliIO, prompt: string, src: PassphraseSource = {}, verify = false): Promise<Buffer> {
  const stdinKey = src.keyFile === undefined || src.keyFile === '-';
  if (!stdinKey || !io.stdin.isTTY) {
    return readKeyInput(io, stdinKey ? undefined : src.keyFile, src.keyfileOffset ?? 0, src.keyfileSize, src.keyFile === undefined);
  }
  if (src.keyfileOffset) throw keyError('Cannot use offset with terminal input.');
  const p = await readTtyLine(io, prompt);
  if (verify) {
    const q = await readTtyLine(io, 'Verify passphrase: ');
    const same = p.equals(q);
    q.fill(0);
    if (!same) {
      p.fill(0);
      throw new CryptmapError('EVERIFY', 'Passphrases do not match.', { exitCode: EXIT_NO_PERMISSION });
    }
  }
  if (p.length > PASSPHRASE_MAX_BYTES) {
    p.fill(0);
    throw new CryptmapError('EPASS', 'Passphrase is too long.', { exitCode: EXIT_WRONG_PARAMS });
  }
  return p;
}

/**
 * cryptsetup's yesDialog: ask only when stdin is a terminal and not in batch mode; anything but
 * "YES" aborts (exit 1, "Operation aborted.").
 */
export async function confirm(io: CliIO, question: string, batch: boolean | undefined): Promise<void> {
  if (batch || !io.stdin.isTTY) return;
  io.stderr.write(`\nWARNING!\n========\n${question}\n\nAre you sure? (Type 'yes' in capital letters): `);
  const stdin = io.stdin as NodeJS.ReadStream;
  stdin.resume();
  const line = await new Promise<string>((resolve) => {
    let acc = '';
    const onData = (d: Buffer | string) => {
      acc += d.toString();
      const i = acc.indexOf('\n');
      if (i >= 0) {
        stdin.off('data', onData);
        resolve(acc.slice(0, i).replace(/\r$/, ''));
      }
    };
    stdin.on('data', onData);
  });
  stdin.pause();
  if (line !== 'YES') throw new CryptmapError('EABORT', 'Operation aborted.', { exitCode: EXIT_WRONG_PARAMS });
}

/** KDF options from --pbkdf, --pbkdf-force-iterations, --pbkdf-memory, --pbkdf-parallel, --iter-time, --hash. */
export function keyslotOptions(v: LuksArgs, type: 'luks1' | 'luks2'): NewKeyslotOptions {
  const pbkdf = (v.pbkdf ?? (type === 'luks1' ? 'pbkdf2' : 'argon2id')) as 'pbkdf2' | 'argon2i' | 'argon2id';
  if (!['pbkdf2', 'argon2i', 'argon2id'].includes(pbkdf)) throw new CryptmapError('EARGS', `Unknown PBKDF type ${pbkdf}.`, { exitCode: EXIT_WRONG_PARAMS });
  if (type === 'luks1' && pbkdf !== 'pbkdf2') throw new CryptmapError('EARGS', 'Only PBKDF2 is supported in LUKS1.', { exitCode: EXIT_WRONG_PARAMS });
  const hash = v.hash ?? 'sha256';
  const forced = intOpt(v['pbkdf-force-iterations'], '--pbkdf-force-iterations', 1, 0xffffffff);
  const memory = intOpt(v['pbkdf-memory'], '--pbkdf-memory', 32, 4 * 1024 * 1024);
  const parallel = intOpt(v['pbkdf-parallel'], '--pbkdf-parallel', 1, 4);
  const iterTime = intOpt(v['iter-time'], '--iter-time', 1);
  const keySlot = intOpt(v['key-slot'], '--key-slot', 0, type === 'luks1' ? 7 : 31);
  const o: NewKeyslotOptions = { pbkdf, hash, ...(keySlot !== undefined ? { keySlot } : {}), ...(iterTime !== undefined ? { iterTimeMs: iterTime } : {}) };
  if (memory !== undefined) o.pbkdfMemoryKiB = memory;
  if (parallel !== undefined) o.pbkdfParallel = parallel;
  // --keyslot-cipher / --keyslot-key-size (cryptsetup _set_keyslot_encryption_params).
  if ((v['keyslot-cipher'] === undefined) !== (v['keyslot-key-size'] === undefined)) {
    throw new CryptmapError('EARGS', 'Options --keyslot-cipher and --keyslot-key-size must be used together.', { exitCode: EXIT_WRONG_PARAMS });
  }
  if (v['keyslot-cipher'] !== undefined) {
    if (type !== 'luks2') throw new CryptmapError('EARGS', 'Keyslot encryption parameters can be set only for LUKS2 device.', { exitCode: EXIT_WRONG_PARAMS });
    o.keyslotCipher = v['keyslot-cipher'];
    o.keyslotKeyBytes = Math.floor((intOpt(v['keyslot-key-size'], '--keyslot-key-size', 0, 0xffffffff) ?? 0) / 8);
  }
  if (forced !== undefined) {
    if (pbkdf === 'pbkdf2') {
      if (forced < 1000) throw new CryptmapError('EARGS', 'Forced iteration count is too low for pbkdf2 (minimum is 1000).', { exitCode: EXIT_WRONG_PARAMS });
      o.kdf = { type: 'pbkdf2', hash, iterations: forced };
    } else {
      if (forced < 4) throw new CryptmapError('EARGS', 'Forced iteration count is too low for argon2 (minimum is 4).', { exitCode: EXIT_WRONG_PARAMS });
      o.kdf = { type: pbkdf, time: forced, memoryKiB: Math.min(memory ?? 1024 * 1024, Math.floor(totalmem() / 2048)), parallel: Math.min(parallel ?? 4, cpus().length || 1) };
    }
  }
  return o;
}

/** Where the header lives: --header (detached) or the device itself. */
export function headerPath(v: LuksArgs, device: string): string {
  return v.header ?? device;
}

/** Secret-safe close of a device, ignoring errors after a failure. */
export async function closeQuietly(dev: { close(): Promise<void> } | undefined): Promise<void> {
  await dev?.close().catch(() => {});
}

// ---- loading and unlocking -------------------------------------------------------------------

/** openLuks with cryptsetup's message for a device that is not LUKS. */
export async function loadLuks(dev: BlockDevice, hdr: string): Promise<Luks1Volume | Luks2Volume> {
  return openLuks(dev).catch((e) => {
    if (e instanceof CryptmapError && e.code === 'ENOTLUKS') {
      const why = e.cause instanceof CryptmapError && e.cause.code === 'ELUKS2JSON' ? ` (${e.cause.message})` : '';
      throw new CryptmapError('ENOTLUKS', `Device ${hdr} is not a valid LUKS device${why}.`, { exitCode: 1 });
    }
    // A header whose metadata and keyslots do not fit the device: cryptsetup's two lines, exit 1.
    if (e instanceof CryptmapError && e.code === 'EDEVSMALL') {
      throw new CryptmapError('ENOTLUKS', `${e.message.replace(/^Device /, `Device ${hdr} `)}\nDevice ${hdr} is not a valid LUKS device.`, { exitCode: 1, cause: e });
    }
    throw e;
  });
}

/**
 * Load-time recovery of a damaged or stale LUKS2 header copy from the good one (Luks2Volume
 * `recoverHeader`), for a volume loaded from a device opened for writing, under the device lock
 * when `lock` is set (callers already holding it pass false). LUKS1 and healthy headers: no-op.
 */
export async function recoverLoaded(vol: Luks1Volume | Luks2Volume, hdr: string, lock = true): Promise<void> {
  if (vol.type !== 'luks2' || !vol.needsRepair) return;
  if (lock) await withDeviceLock(hdr, () => vol.recoverHeader());
  else await vol.recoverHeader();
}

/**
 * Load the header at `hdr` for a verb that only reads it (luksDump, open --test-passphrase, open,
 * luksUUID without --uuid, luksHeaderBackup). The device is opened read-only; when a LUKS2 copy is
 * damaged or stale and neither --readonly nor a read-only device forbids it, a second, writable
 * handle rewrites that copy under the device lock, as cryptsetup does on every load. A device that
 * is not LUKS is never opened for writing. The caller closes `dev`.
 */
export async function loadLuksForRead(hdr: string, v: LuksArgs): Promise<{ dev: BlockDevice; vol: Luks1Volume | Luks2Volume }> {
  const dev = await openDevice(hdr, false);
  try {
    const vol = await loadLuks(dev, hdr);
    if (vol.type === 'luks2' && vol.needsRepair && !v.readonly) {
      const rw = await openBlockDevice(hdr, { readOnly: false }).catch(() => null);
      if (rw) {
        try {
          await withDeviceLock(hdr, async () => {
            const fresh = await loadLuks(rw, hdr);
            if (fresh.type === 'luks2') await fresh.recoverHeader();
          });
        } catch (e) {
          // Recovery is best effort (cryptsetup only logs a failed recovery); the good copy is loaded.
          if (!isCryptmapError(e)) throw e;
        } finally {
          await closeQuietly(rw);
        }
      }
    }
    return { dev, vol };
  } catch (e) {
    await closeQuietly(dev);
    throw e;
  }
}

/** --token-id, --token-type, --token-only and --key-slot as `open` takes them. */
export interface TokenArgs {
  tokenId?: number;
  tokenType?: string;
  tokenOnly: boolean;
  keySlot?: number;
}

export function tokenArgs(v: LuksArgs): TokenArgs {
  const tokenId = intOpt(v['token-id'], '--token-id', 0, 31);
  const keySlot = intOpt(v['key-slot'], '--key-slot', 0, 31);
  return {
    ...(tokenId !== undefined ? { tokenId } : {}),
    ...(v['token-type'] !== undefined ? { tokenType: v['token-type'] } : {}),
    ...(keySlot !== undefined ? { keySlot } : {}),
    tokenOnly: v['token-only'] === true,
  };
}

/**
 * The token step of `open` (cryptsetup src/cryptsetup.c action_open_luks): LUKS2 tokens are tried
 * first, always; on failure `null` tells the caller to go on with a passphrase, unless --token-only,
 * where the token's error is thrown (exit 1 no usable token, exit 2 token could not unlock). Messages
 * of failed tokens are printed with --verbose, as cryptsetup does, and the luks2-keyring one also
 * whenever a token option was given (it says why: no kernel keyring in userspace).
 */
export async function tryTokenUnlock(io: CliIO, vol: Luks1Volume | Luks2Volume, v: LuksArgs): Promise<UnlockResult | null> {
  const t = tokenArgs(v);
  const explicit = t.tokenOnly || t.tokenId !== undefined || t.tokenType !== undefined;
  if (vol.type !== 'luks2') {
    if (explicit && t.tokenOnly) throw new CryptmapError('ETOKENLUKS1', 'Tokens are supported only for LUKS2 devices.', { exitCode: EXIT_WRONG_PARAMS });
    return null;
  }
  try {
    const r = await unlockByToken(vol, t);
    if (v.verbose) io.stdout.write(`Key slot ${r.keyslot} unlocked.\n`);
    return r;
  } catch (e) {
    if (!isCryptmapError(e)) throw e;
    if (t.tokenOnly) throw e;
    // A volume without tokens: nothing to say (cryptsetup stays silent too).
    if (v.verbose || (explicit && e.code === 'ETOKENKEYRING')) io.stderr.write(`${e.message}\n`);
    return null;
  }
}

/**
 * The whole unlock sequence of `open` / `open --test-passphrase`: tokens (tryTokenUnlock), then the
 * passphrase from --key-file or a prompt, with --tries on a terminal (default 3). The caller disposes
 * the volume key. `device` is the name used in the prompt.
 */
export async function unlockForOpen(io: CliIO, vol: Luks1Volume | Luks2Volume, device: string, v: LuksArgs): Promise<UnlockResult> {
  if (v['volume-key-file'] !== undefined) return unlockByVolumeKeyFile(vol, v['volume-key-file'], v);
  const byToken = await tryTokenUnlock(io, vol, v);
  if (byToken) return byToken;
  const tries = v['key-file'] !== undefined || !io.stdin.isTTY ? 1 : (intOpt(v.tries, '--tries', 1) ?? 3);
  for (let i = 0; ; i++) {
    const pass = await getPassphrase(io, passphrasePrompt(device), {
      keyFile: v['key-file'],
      keyfileOffset: intOpt(v['keyfile-offset'], '--keyfile-offset'),
      keyfileSize: intOpt(v['keyfile-size'], '--keyfile-size'),
    });
    try {
      // --test-passphrase with --key-slot or --unbound may test an unbound keyslot (CRYPT_ACTIVATE_ALLOW_UNBOUND_KEY).
      const anySegment = v['test-passphrase'] === true && (v['key-slot'] !== undefined || v.unbound === true);
      const r = await vol.unlock(pass, { keySlot: intOpt(v['key-slot'], '--key-slot'), anySegment });
      if (v.verbose) io.stdout.write(`Key slot ${r.keyslot} unlocked.\n`);
      return r;
    } catch (e) {
      if (!(e instanceof CryptmapError && e.code === 'ENOKEY') || i + 1 >= tries) throw e;
      io.stderr.write(`${e.message}\n`);
    } finally {
      pass.fill(0);
    }
  }
}

/**
 * `open --volume-key-file F` (cryptsetup's recovery path, crypt_activate_by_volume_key): the key is
 * read from F (exactly the volume key size: of the keyslots, or --key-size when none is left, as
 * after luksErase) and checked against the digest; no passphrase. keyslot -1: none was used.
 */
async function unlockByVolumeKeyFile(vol: Luks1Volume | Luks2Volume, file: string, v: LuksArgs): Promise<UnlockResult> {
  const bits = intOpt(v['key-size'], '--key-size');
  const bytes = bits !== undefined ? bits / 8 : vol.dataSegment.keyBytes;
  if (!bytes) throw new CryptmapError('EARGS', 'Cannot determine volume key size for LUKS without keyslots, please use --key-size option.', { exitCode: EXIT_WRONG_PARAMS });
  const vk = await readVolumeKeyFile(file, bytes);
  if (!(await vol.verifyVolumeKey(vk))) {
    vk.fill(0);
    throw new CryptmapError('EVOLUMEKEY', 'Volume key does not match the volume.', { exitCode: EXIT_NO_PERMISSION, errno: 'EPERM' });
  }
  return { volumeKey: new Secret(vk), keyslot: -1 };
}

/**
 * `open --test-passphrase` complete (what open.ts calls): load the header (with load-time recovery),
 * check --type, run the unlock sequence, report; exit 0, or the error's exit code.
 */
export async function testPassphrase(io: CliIO, device: string, v: LuksArgs): Promise<number> {
  if (v.type && !['luks', 'luks1', 'luks2'].includes(v.type)) throw new CryptmapError('EARGS', `Device type ${v.type} is not supported with --test-passphrase.`, { exitCode: EXIT_WRONG_PARAMS });
  const hdr = headerPath(v, device);
  const { dev, vol } = await loadLuksForRead(hdr, v);
  try {
    if (v.type && v.type !== 'luks' && v.type !== vol.type) throw new CryptmapError('ENOTLUKS', `Device ${hdr} is not a valid ${v.type.toUpperCase()} device.`, { exitCode: 1 });
    if (vol.type === 'luks2' && inReencryption(vol.jsonSnapshot())) {
      // A keyslot of the old or the new volume key will do (segment 0 may have no key in the middle of --encrypt).
      const pass = await getPassphrase(io, `Enter passphrase for ${device}: `, { keyFile: v['key-file'], keyfileOffset: intOpt(v['keyfile-offset'], '--keyfile-offset'), keyfileSize: intOpt(v['keyfile-size'], '--keyfile-size') });
      try {
        await unlockInReencryption(vol, pass, intOpt(v['key-slot'], '--key-slot', 0, 31));
      } finally {
        pass.fill(0);
      }
      if (v.verbose) io.stdout.write('Command successful.\n');
      return 0;
    }
    const r = await unlockForOpen(io, vol, device, v);
    r.volumeKey.dispose();
    if (v.verbose) io.stdout.write('Command successful.\n');
    return 0;
  } finally {
    await closeQuietly(dev);
  }
}
