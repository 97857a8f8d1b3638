/**
 * What the LUKS verbs share: cryptsetup's option table, strict integer options, device opening and
 * KDF options. Passphrase and key-file input: terminal-input.ts; loading a header and the unlock
 * sequence of `open`: luks-unlock.ts.
 */
import { lstat, stat } from 'node:fs/promises';
import { cpus, totalmem } from 'node:os';
import { FileDevice } from '../../blockdev/file.js';
import { isRemoteDevice, openBlockDevice } from '../../blockdev/open.js';
import type { BlockDevice } from '../../blockdev/types.js';
import type { NewKeyslotOptions } from '../../luks/index.js';
import {
  CryptmapError,
  EXIT_FAILURE,
  EXIT_NO_PERMISSION,
  EXIT_WRONG_DEVICE,
  EXIT_WRONG_PARAMS,
  isCryptmapError,
} from '../../util/errors.js';
import { type CliValues, parseCommandLine, parseSize } from '../options.js';
import { Progress } from '../progress.js';
import type { CliIO } from '../types.js';
import { confirm, type PassphraseSource } from './terminal-input.js';

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
export function intOpt(
  v: string | undefined,
  name: string,
  min = 0,
  max = Number.MAX_SAFE_INTEGER,
): number | undefined {
  if (v === undefined) return undefined;
  if (!/^[0-9]+$/.test(v) || Number(v) < min || Number(v) > max)
    throw new CryptmapError('EARGS', `Invalid ${name} value ${v}.`, { exitCode: EXIT_WRONG_PARAMS });
  return Number(v);
}

/** A size option in bytes, with cryptsetup's units (options.ts parseSize; checked once more here for callers with their own values). */
export function sizeOpt(v: string | undefined, name: string): number | undefined {
  return v === undefined ? undefined : parseSize(v, name);
}

export function needDevice(positionals: string[], usage: string): string {
  const d = positionals[0];
  if (!d)
    throw new CryptmapError('EARGS', `Command requires device as argument.\nUsage: ${usage}`, {
      exitCode: EXIT_WRONG_PARAMS,
    });
  return d;
}

/** cryptsetup's "Device X does not exist or access denied." (exit 4) when a local `path` is missing. */
export async function requireDevice(path: string): Promise<void> {
  if (isRemoteDevice(path)) return;
  try {
    await stat(path);
  } catch {
    throw new CryptmapError('ENODEV', `Device ${path} does not exist or access denied.`, {
      exitCode: EXIT_WRONG_DEVICE,
    });
  }
}

/** Open an image, a device or an NBD URI; cryptsetup's message when it is missing. */
export async function openDevice(path: string, write: boolean): Promise<BlockDevice> {
  if (isRemoteDevice(path)) {
    try {
      return await openBlockDevice(path, { readOnly: !write });
    } catch (e) {
      const c = isCryptmapError(e) ? e : undefined;
      throw new CryptmapError('ENODEV', c?.message ?? `Cannot open device ${path}.`, {
        exitCode: c?.exitCode ?? EXIT_WRONG_DEVICE,
        cause: e,
      });
    }
  }
  try {
    await stat(path);
  } catch {
    throw new CryptmapError('ENODEV', `Device ${path} does not exist or access denied.`, {
      exitCode: EXIT_WRONG_DEVICE,
    });
  }
  try {
    return await FileDevice.open(path, { readOnly: !write });
  } catch (e) {
    throw new CryptmapError('ENODEV', `Cannot open device ${path}${write ? ' for read-write access' : ''}.`, {
      exitCode: EXIT_WRONG_DEVICE,
      cause: e,
    });
  }
}

/**
 * A detached header (--header): opened once, created when absent (0600, O_EXCL: never through a link
 * planted at the path) and grown to `needBytes` when a shorter regular file, as cryptsetup makes one.
 */
export async function openHeaderFile(path: string, needBytes: number): Promise<BlockDevice> {
  if (isRemoteDevice(path)) return openDevice(path, true);
  try {
    return await FileDevice.openOrCreate(path, needBytes);
  } catch (e) {
    throw new CryptmapError('ENODEV', `Cannot use ${path} as on-disk header.`, {
      exitCode: EXIT_WRONG_DEVICE,
      cause: e,
    });
  }
}

/**
 * cryptsetup 2.6's header file creation (action_luksFormat, also reencrypt --encrypt's): when `path` does not exist, ask "Header
 * file does not exist, do you want to create it?" (a terminal only, not with -q; no or the end of input
 * is exit 2), then make it exclusively, mode 0600, 4 KiB ("Cannot create header file X.", exit 1), in a
 * directory no other user can rewrite (FileDevice.createNew; its refusal is exit 2). The device returned
 * is what the format writes: a file put at `path` meanwhile is never written. Undefined when it exists
 * (or is an NBD URI).
 */
export async function createHeaderFile(
  io: CliIO,
  path: string,
  batch: boolean | undefined,
): Promise<FileDevice | undefined> {
  if (isRemoteDevice(path)) return undefined;
  const missing = await lstat(path).then(
    () => false,
    (e: NodeJS.ErrnoException) => e.code === 'ENOENT',
  );
  if (!missing) return undefined;
  await confirm(io, 'Header file does not exist, do you want to create it?', batch, { exitCode: EXIT_NO_PERMISSION });
  return FileDevice.createNew(path, 4096).catch((e: unknown) => {
    if (isCryptmapError(e) && e.code === 'EUNTRUSTED_PATH') throw e;
    throw new CryptmapError('ECREATE', `Cannot create header file ${path}.`, { exitCode: EXIT_FAILURE, cause: e });
  });
}

/** Where an existing passphrase comes from: --key-file with --keyfile-offset and --keyfile-size, else a prompt. */
export function keyFileSource(v: LuksArgs): PassphraseSource {
  return {
    keyFile: v['key-file'],
    keyfileOffset: intOpt(v['keyfile-offset'], '--keyfile-offset'),
    keyfileSize: intOpt(v['keyfile-size'], '--keyfile-size'),
  };
}

/** KDF options from --pbkdf, --pbkdf-force-iterations, --pbkdf-memory, --pbkdf-parallel, --iter-time, --hash. */
export function keyslotOptions(v: LuksArgs, type: 'luks1' | 'luks2'): NewKeyslotOptions {
  const pbkdf = (v.pbkdf ?? (type === 'luks1' ? 'pbkdf2' : 'argon2id')) as 'pbkdf2' | 'argon2i' | 'argon2id';
  if (!['pbkdf2', 'argon2i', 'argon2id'].includes(pbkdf))
    throw new CryptmapError('EARGS', `Unknown PBKDF type ${pbkdf}.`, { exitCode: EXIT_WRONG_PARAMS });
  if (type === 'luks1' && pbkdf !== 'pbkdf2')
    throw new CryptmapError('EARGS', 'Only PBKDF2 is supported in LUKS1.', { exitCode: EXIT_WRONG_PARAMS });
  const hash = v.hash ?? 'sha256';
  const forced = intOpt(v['pbkdf-force-iterations'], '--pbkdf-force-iterations', 1, 0xffffffff);
  const memory = intOpt(v['pbkdf-memory'], '--pbkdf-memory', 32, 4 * 1024 * 1024);
  const parallel = intOpt(v['pbkdf-parallel'], '--pbkdf-parallel', 1, 4);
  const iterTime = intOpt(v['iter-time'], '--iter-time', 1);
  const keySlot = intOpt(v['key-slot'], '--key-slot', 0, type === 'luks1' ? 7 : 31);
  const o: NewKeyslotOptions = {
    pbkdf,
    hash,
    ...(keySlot !== undefined ? { keySlot } : {}),
    ...(iterTime !== undefined ? { iterTimeMs: iterTime } : {}),
  };
  if (memory !== undefined) o.pbkdfMemoryKiB = memory;
  if (parallel !== undefined) o.pbkdfParallel = parallel;
  // --keyslot-cipher / --keyslot-key-size (cryptsetup _set_keyslot_encryption_params).
  if ((v['keyslot-cipher'] === undefined) !== (v['keyslot-key-size'] === undefined)) {
    throw new CryptmapError('EARGS', 'Options --keyslot-cipher and --keyslot-key-size must be used together.', {
      exitCode: EXIT_WRONG_PARAMS,
    });
  }
  if (v['keyslot-cipher'] !== undefined) {
    if (type !== 'luks2')
      throw new CryptmapError('EARGS', 'Keyslot encryption parameters can be set only for LUKS2 device.', {
        exitCode: EXIT_WRONG_PARAMS,
      });
    o.keyslotCipher = v['keyslot-cipher'];
    o.keyslotKeyBytes = Math.floor((intOpt(v['keyslot-key-size'], '--keyslot-key-size', 0, 0xffffffff) ?? 0) / 8);
  }
  if (forced !== undefined) {
    if (pbkdf === 'pbkdf2') {
      if (forced < 1000)
        throw new CryptmapError('EARGS', 'Forced iteration count is too low for pbkdf2 (minimum is 1000).', {
          exitCode: EXIT_WRONG_PARAMS,
        });
      o.kdf = { type: 'pbkdf2', hash, iterations: forced };
    } else {
      if (forced < 4)
        throw new CryptmapError('EARGS', 'Forced iteration count is too low for argon2 (minimum is 4).', {
          exitCode: EXIT_WRONG_PARAMS,
        });
      o.kdf = {
        type: pbkdf,
        time: forced,
        memoryKiB: Math.min(memory ?? 1024 * 1024, Math.floor(totalmem() / 2048)),
        parallel: Math.min(parallel ?? 4, cpus().length || 1),
      };
    }
  }
  return o;
}

/**
 * `-c/--cipher` as cryptsetup 2.6 reads it (lib/utils_crypt.c crypt_parse_name_and_mode): `null` or
 * `cipher_null` is `cipher_null-ecb`, a cipher without a mode gets `cbc-plain`, and a `plain` mode is
 * `cbc-plain`; anything else as given.
 */
export function cipherOption(spec: string): string {
  if (spec === 'null' || spec === 'cipher_null') return 'cipher_null-ecb';
  const dash = spec.indexOf('-');
  if (dash < 0) return `${spec}-cbc-plain`;
  return spec.slice(dash + 1) === 'plain' ? `${spec.slice(0, dash)}-cbc-plain` : spec;
}

/** Where the header lives: --header (detached) or the device itself. */
export function headerPath(v: LuksArgs, device: string): string {
  return v.header ?? device;
}

/** Secret-safe close of a device, ignoring errors after a failure. */
export async function closeQuietly(dev: { close(): Promise<void> } | undefined): Promise<void> {
  await dev?.close().catch(() => {});
}

/** The progress lines of a long operation on `device` as --progress-frequency, --progress-json and --batch-mode ask. */
export function progressFromOptions(io: CliIO, device: string, v: LuksArgs): Progress {
  return new Progress({
    device,
    frequency: intOpt(v['progress-frequency'], '--progress-frequency', 0, 0xffffffff) ?? 0,
    batch: v['batch-mode'] === true,
    json: v['progress-json'] === true,
    write: (s) => io.stdout.write(s),
  });
}
