/**
 * Passphrase and key-file input as cryptsetup reads it (cryptsetup(8) NOTES ON PASSPHRASE PROCESSING;
 * lib/utils.c crypt_keyfile_device_read, src/utils_password.c tools_get_key): a terminal line without
 * echo; standard input up to the first newline; a key file read whole, newlines included, after
 * --keyfile-offset and up to --keyfile-size; and the YES confirmation.
 *
 * The input of one CliIO is one `TerminalInput` (made on first use, held by the io): standard input
 * is read only as far as asked, so a passphrase line leaves the next line for the next prompt and an
 * endless stream (`-d - < /dev/zero`) is never slurped; bytes read past what was asked wait in that
 * object for the next read, and `dispose()` wipes them. No state outlives the io.
 *
 * @example
 *   const pass = await getPassphrase(io, 'Enter passphrase: ', { keyFile: v['key-file'] });
 *   try { ... } finally { pass.fill(0); }
 */
import { type FileHandle, open } from 'node:fs/promises';
import { CryptmapError, type ErrorCode, EXIT_NO_PERMISSION, EXIT_WRONG_PARAMS } from '../../util/errors.js';
import type { CliIO } from '../types.js';

/** Compiled maximum key file size in cryptsetup (default-keyfile-size-maxkb 8192). */
export const KEYFILE_MAX_BYTES = 8192 * 1024;
export const PASSPHRASE_MAX_BYTES = 512;

export interface PassphraseSource {
  keyFile?: string;
  keyfileOffset?: number;
  keyfileSize?: number;
}

function keyError(message: string, code: ErrorCode = 'EKEYFILE'): CryptmapError {
  return new CryptmapError(code, message, { exitCode: EXIT_WRONG_PARAMS });
}

/** The standard input and prompt output of one CliIO, with what was read ahead of the caller. */
export class TerminalInput {
  readonly #stdin: CliIO['stdin'];
  readonly #stderr: CliIO['stderr'];
  #it: AsyncIterator<Buffer | string> | undefined;
  #pending = Buffer.alloc(0);
  #eof = false;

  constructor(io: Pick<CliIO, 'stdin' | 'stderr'>) {
    this.#stdin = io.stdin;
    this.#stderr = io.stderr;
  }

  /** Wipe the bytes read ahead (the rest of a line after a passphrase, say). */
  dispose(): void {
    this.#pending.fill(0);
    this.#pending = Buffer.alloc(0);
  }

  /** Up to `max` bytes of stdin, stopping after a newline when `stopEol` (the newline is consumed, not returned). */
  async #readStdin(max: number, stopEol: boolean): Promise<{ data: Buffer; newline: boolean }> {
    this.#it ??= (this.#stdin as AsyncIterable<Buffer | string>)[Symbol.asyncIterator]();
    for (;;) {
      const nl = stopEol ? this.#pending.indexOf(0x0a) : -1;
      if (nl >= 0 && nl < max) {
        const data = Buffer.from(this.#pending.subarray(0, nl));
        this.#take(nl + 1);
        return { data, newline: true };
      }
      if (this.#pending.length >= max || this.#eof) {
        const n = Math.min(max, this.#pending.length);
        const data = Buffer.from(this.#pending.subarray(0, n));
        this.#take(n);
        return { data, newline: false };
      }
      const r = await this.#it.next();
      if (r.done) this.#eof = true;
      else {
        const chunk = typeof r.value === 'string' ? Buffer.from(r.value) : r.value;
        const joined = Buffer.concat([this.#pending, chunk]);
        this.#pending.fill(0);
        chunk.fill(0);
        this.#pending = joined;
      }
    }
  }

  #take(n: number): void {
    const rest = Buffer.from(this.#pending.subarray(n));
    this.#pending.fill(0);
    this.#pending = rest;
  }

  /**
   * Feed the terminal's input to `onData` until it calls `done` (a value) or `fail`; the end of the
   * input (the terminal closed, Ctrl-D in cooked mode) or a read error fails with `eof` instead of
   * waiting for ever. The listeners are removed however it ends.
   */
  #fromTerminal<T>(
    onData: (d: Buffer | string, done: (v: T) => void, fail: (e: Error) => void) => void,
    eof: string,
  ): Promise<T> {
    const stdin = this.#stdin as NodeJS.ReadStream;
    if (stdin.readableEnded || stdin.destroyed)
      return Promise.reject(new CryptmapError('ETTY', eof, { exitCode: EXIT_WRONG_PARAMS }));
    return new Promise<T>((resolve, reject) => {
      const off = () => {
        stdin.off('data', data);
        stdin.off('end', ended);
        stdin.off('close', ended);
        stdin.off('error', ended);
      };
      const done = (v: T) => {
        off();
        resolve(v);
      };
      const fail = (e: Error) => {
        off();
        reject(e);
      };
      const data = (d: Buffer | string) => onData(d, done, fail);
      const ended = (e?: unknown) =>
        fail(
          new CryptmapError('ETTY', eof, { exitCode: EXIT_WRONG_PARAMS, ...(e instanceof Error ? { cause: e } : {}) }),
        );
      stdin.on('data', data);
      stdin.once('end', ended);
      stdin.once('close', ended);
      stdin.once('error', ended);
      stdin.resume();
    });
  }

  /**
   * One line from a terminal without echo. As cryptsetup's interactive_pass: the end of the input
   * (Ctrl-D on an empty line, the terminal gone) is "Error reading passphrase from terminal." (exit
   * 1) and no newline follows the prompt then; what was typed is wiped however the read ends.
   */
  async #readTtyLine(prompt: string): Promise<Buffer> {
    this.#stderr.write(prompt);
    const stdin = this.#stdin as NodeJS.ReadStream;
    stdin.setRawMode?.(true);
    const bytes: number[] = [];
    let ok = false;
    try {
      await this.#fromTerminal<void>((d, done, fail) => {
        try {
          for (const b of d as Buffer) {
            if (b === 0x0d || b === 0x0a) return done();
            if (b === 0x03)
              return fail(new CryptmapError('EINTR', 'Operation interrupted.', { exitCode: EXIT_WRONG_PARAMS }));
            // Raw mode delivers Ctrl-D as a byte: on an empty line it is the end of input, as in cooked mode.
            if (b === 0x04 && bytes.length === 0)
              return fail(
                new CryptmapError('ETTY', 'Error reading passphrase from terminal.', { exitCode: EXIT_WRONG_PARAMS }),
              );
            if (b === 0x7f || b === 0x08) bytes.pop();
            else bytes.push(b);
          }
        } finally {
          if (Buffer.isBuffer(d)) d.fill(0); // raw terminal input: the passphrase bytes
        }
      }, 'Error reading passphrase from terminal.');
      ok = true;
      return Buffer.from(bytes);
    } finally {
      bytes.fill(0);
      stdin.setRawMode?.(false);
      stdin.pause();
      if (ok) this.#stderr.write('\n');
    }
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
  async #readKeyInput(
    file: string | undefined,
    offset: number,
    size: number | undefined,
    stopEol: boolean,
  ): Promise<Buffer> {
    const limit = size && size > 0 ? size : KEYFILE_MAX_BYTES + 1;
    const unlimited = !(size && size > 0);
    let data: Buffer;
    let regular = false;
    let newline = false;
    if (file === undefined) {
      if (offset > 0) {
        let left = offset;
        while (left > 0) {
          const skipped = await this.#readStdin(Math.min(left, 1 << 16), false);
          skipped.data.fill(0);
          if (skipped.data.length === 0) throw keyError('Cannot seek to requested keyfile offset.');
          left -= skipped.data.length;
        }
      }
      const r = await this.#readStdin(limit, stopEol);
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
    if (data.length === 0 && !regular && !newline)
      throw fail(new CryptmapError('EPIPE', 'Nothing to read on input.', { exitCode: 1 }));
    if (unlimited && data.length === limit) throw fail(keyError('Maximum keyfile size exceeded.'));
    if (!unlimited && data.length !== limit) throw fail(keyError('Cannot read requested amount of data.'));
    return data;
  }

  /** Read a key file (or '-' = stdin, read to its end) after --keyfile-offset, --keyfile-size bytes or up to 8 MiB (cryptsetup semantics). */
  readKeyFile(src: Required<Pick<PassphraseSource, 'keyFile'>> & PassphraseSource): Promise<Buffer> {
    return this.#readKeyInput(
      src.keyFile === '-' ? undefined : src.keyFile,
      src.keyfileOffset ?? 0,
      src.keyfileSize,
      false,
    );
  }

  /**
   * Get a passphrase as cryptsetup's tools_get_key: from the key file when given ('-' = all of stdin,
   * or a prompt when stdin is a terminal); else from a terminal (prompt, no echo, and a second prompt
   * when `verify`); else from stdin up to the first newline, at most --keyfile-size bytes when given.
   */
  async getPassphrase(prompt: string, src: PassphraseSource = {}, verify = false): Promise<Buffer> {
    const stdinKey = src.keyFile === undefined || src.keyFile === '-';
    if (!stdinKey || !this.#stdin.isTTY) {
      return this.#readKeyInput(
        stdinKey ? undefined : src.keyFile,
        src.keyfileOffset ?? 0,
        src.keyfileSize,
        src.keyFile === undefined,
      );
    }
    if (src.keyfileOffset) throw keyError('Cannot use offset with terminal input.');
    const p = await this.#readTtyLine(prompt);
    if (verify) {
      const q = await this.#readTtyLine('Verify passphrase: ');
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
   * cryptsetup's yesDialog (src/utils_tools.c): asked only when stdin is a terminal and not in batch
   * mode (elsewhere the answer is yes); anything but "YES" aborts with `fail` on stderr, the end of the
   * input with "Error reading response from terminal.", both with `exitCode`. cryptsetup prints its
   * abort messages with a newline of their own plus the one every error gets, so most end in a blank
   * line (`fail` "Operation aborted.\n", the default); `fail` '' prints nothing (the dialogs cryptsetup
   * gives no message, e.g. luksDump --dump-volume-key).
   */
  async confirm(question: string, batch: boolean | undefined, opts: ConfirmOptions = {}): Promise<void> {
    if (batch || !this.#stdin.isTTY) return;
    const exitCode = opts.exitCode ?? EXIT_WRONG_PARAMS;
    this.#stderr.write(`\nWARNING!\n========\n${question}\n\nAre you sure? (Type 'yes' in capital letters): `);
    const stdin = this.#stdin as NodeJS.ReadStream;
    let acc = '';
    let line: string;
    try {
      line = await this.#fromTerminal<string>((d, done) => {
        acc += d.toString();
        const i = acc.indexOf('\n');
        if (i >= 0) done(acc.slice(0, i).replace(/\r$/, ''));
      }, 'Error reading response from terminal.');
    } catch (e) {
      if (e instanceof CryptmapError && e.code === 'ETTY') throw new CryptmapError('ETTY', e.message, { exitCode });
      throw e;
    } finally {
      stdin.pause();
    }
    if (line !== 'YES') throw new CryptmapError('EABORT', opts.fail ?? 'Operation aborted.\n', { exitCode });
  }
}

/** What a refused confirmation says and its exit code (cryptsetup's caller: -EINVAL is 1, -EPERM 2). */
export interface ConfirmOptions {
  /** The message on stderr (default "Operation aborted.\n"; '' for none). */
  fail?: string;
  /** Exit code of a "no" and of the end of input (default 1). */
  exitCode?: number;
}

/** The terminal input of `io`, made on its first use. */
export function terminalInput(io: CliIO): TerminalInput {
  io.input ??= new TerminalInput(io);
  return io.input;
}

/** `terminalInput(io).getPassphrase(...)`: the form the verbs call. */
export function getPassphrase(io: CliIO, prompt: string, src: PassphraseSource = {}, verify = false): Promise<Buffer> {
  return terminalInput(io).getPassphrase(prompt, src, verify);
}

/** `terminalInput(io).readKeyFile(...)`. */
export function readKeyFile(
  io: CliIO,
  src: Required<Pick<PassphraseSource, 'keyFile'>> & PassphraseSource,
): Promise<Buffer> {
  return terminalInput(io).readKeyFile(src);
}

/** `terminalInput(io).confirm(...)`. */
export function confirm(
  io: CliIO,
  question: string,
  batch: boolean | undefined,
  opts: ConfirmOptions = {},
): Promise<void> {
  return terminalInput(io).confirm(question, batch, opts);
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
