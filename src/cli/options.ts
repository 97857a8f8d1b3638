/**
 * The one option table of the cryptsetup-style verbs and its parser, as cryptsetup 2.6 parses its
 * command line with popt (src/cryptsetup_arg_list.h, src/cryptsetup.c main): options may come before
 * the action word, between it and its arguments, or after them; `--` ends the options; the action is
 * the first word that is not an option or an option's value, which is why the table must say which
 * options take a value. `--opt=value`, `--opt value`, `-dKEY`, `-d KEY` and grouped flags (`-qv`) all
 * work; a string option given twice keeps the last value, except --key-file (cryptsetup: "Only one
 * --key-file argument is allowed.").
 *
 * A row: `type` ('string' takes a value, 'boolean' does not), an optional one-letter `short`, and
 * `verbs`, the actions that accept it (cryptsetup's "Option --X is not allowed with Y action.");
 * without `verbs` every verb takes it. `alias` stores the value under another row's name
 * (--master-key-file is --volume-key-file), `num` checks a number as popt does ('size': with units). Adding an option is adding one row.
 */
import { CryptmapError, EXIT_WRONG_PARAMS } from '../util/errors.js';

interface OptionRow {
  readonly type: 'string' | 'boolean';
  readonly short?: string;
  readonly verbs?: readonly string[];
  readonly alias?: string;
  /** A number as cryptsetup's popt table types it (CRYPT_ARG_UINT32, INT32, UINT64): anything else is "invalid numeric value". */
  readonly num?: 'u32' | 'i32' | 'u64' | 'size';
}

// cryptsetup's action lists (cryptsetup_args.h), for the rows below.
const KDF_VERBS = ['benchmark', 'luksFormat', 'luksAddKey', 'luksChangeKey', 'luksConvertKey', 'reencrypt'] as const;
const NEW_KEYSLOT_VERBS = ['luksFormat', 'luksAddKey', 'luksChangeKey', 'luksConvertKey', 'reencrypt'] as const;
/** cryptmap's own: the verbs that talk to the daemon. */
const DAEMON_VERBS = [
  'open',
  'close',
  'status',
  'luksSuspend',
  'luksResume',
  'resize',
  'attach',
  'detach',
  'reencrypt',
] as const;

export const OPTIONS = {
  'align-payload': { type: 'string', num: 'u32', verbs: ['luksFormat'] },
  'active-name': { type: 'string', verbs: ['reencrypt'] },
  'allow-discards': { type: 'boolean', verbs: ['open'] },
  attach: { type: 'boolean', verbs: ['open'] },
  'batch-mode': { type: 'boolean', short: 'q' },
  'cancel-deferred': { type: 'boolean', verbs: ['close'] },
  cipher: { type: 'string', short: 'c' },
  debug: { type: 'boolean' },
  'debug-json': { type: 'boolean' },
  deferred: { type: 'boolean', verbs: ['close'] },
  'device-size': { type: 'string', num: 'size', verbs: ['open', 'resize', 'reencrypt'] },
  'disable-external-tokens': { type: 'boolean' },
  'disable-keyring': { type: 'boolean' },
  'disable-locks': { type: 'boolean' },
  'disable-veracrypt': { type: 'boolean', verbs: ['open', 'tcryptDump'] },
  'dump-json-metadata': { type: 'boolean' },
  'dump-volume-key': { type: 'boolean' },
  'dump-master-key': { type: 'boolean', alias: 'dump-volume-key' },
  force: { type: 'boolean', verbs: ['close'] },
  'force-password': { type: 'boolean' },
  hash: { type: 'string', short: 'h' },
  header: { type: 'string' },
  'header-backup-file': { type: 'string' },
  integrity: { type: 'string', short: 'I', verbs: ['luksFormat', 'reencrypt'] },
  'integrity-legacy-padding': { type: 'boolean' },
  'integrity-no-journal': { type: 'boolean' },
  'integrity-no-wipe': { type: 'boolean', verbs: ['luksFormat', 'reencrypt'] },
  'iter-time': { type: 'string', num: 'u32', short: 'i', verbs: KDF_VERBS },
  'iv-large-sectors': { type: 'boolean', verbs: ['open'] },
  json: { type: 'boolean', verbs: ['status', 'benchmark', 'luksDump', 'isLuks'] },
  'json-file': { type: 'string' },
  'keep-key': { type: 'boolean', verbs: ['reencrypt'] },
  'key-description': { type: 'string' },
  'key-file': { type: 'string', short: 'd' },
  'key-size': {
    type: 'string',
    num: 'u32',
    short: 's',
    verbs: ['open', 'benchmark', 'luksFormat', 'luksAddKey', 'reencrypt'],
  },
  'key-slot': {
    type: 'string',
    num: 'i32',
    short: 'S',
    verbs: ['open', 'config', ...NEW_KEYSLOT_VERBS, 'luksDump', 'token', 'luksResume'],
  },
  'keyfile-offset': { type: 'string', num: 'u64' },
  'keyslot-cipher': { type: 'string', verbs: ['luksFormat', 'luksAddKey', 'luksChangeKey', 'luksConvertKey'] },
  'keyslot-key-size': {
    type: 'string',
    num: 'u32',
    verbs: ['luksFormat', 'luksAddKey', 'luksChangeKey', 'luksConvertKey'],
  },
  'keyfile-size': { type: 'string', num: 'u32', short: 'l' },
  label: { type: 'string', verbs: ['config', 'luksFormat', 'reencrypt'] },
  'luks2-keyslots-size': { type: 'string', num: 'size', verbs: ['luksFormat', 'reencrypt'] },
  'luks2-metadata-size': { type: 'string', num: 'size', verbs: ['luksFormat', 'reencrypt'] },
  'volume-key-file': { type: 'string' },
  'master-key-file': { type: 'string', alias: 'volume-key-file' },
  'new-keyfile': { type: 'string', verbs: ['luksAddKey'] },
  'new-key-slot': { type: 'string', num: 'i32', verbs: ['luksAddKey'] },
  'new-keyfile-offset': { type: 'string', num: 'u64' },
  'new-keyfile-size': { type: 'string', num: 'u32' },
  'new-token-id': { type: 'string', num: 'i32', verbs: ['luksAddKey'] },
  offset: { type: 'string', num: 'u64', short: 'o', verbs: ['open', 'luksFormat', 'reencrypt'] },
  pbkdf: { type: 'string', verbs: KDF_VERBS },
  'pbkdf-force-iterations': { type: 'string', num: 'u32', verbs: NEW_KEYSLOT_VERBS },
  'pbkdf-memory': { type: 'string', num: 'u32' },
  'pbkdf-parallel': { type: 'string', num: 'u32' },
  'perf-no_read_workqueue': { type: 'boolean' },
  'perf-no_write_workqueue': { type: 'boolean' },
  'perf-same_cpu_crypt': { type: 'boolean' },
  'perf-submit_from_crypt_cpus': { type: 'boolean' },
  persistent: { type: 'boolean', verbs: ['open'] },
  priority: { type: 'string', verbs: ['config'] },
  readonly: { type: 'boolean', short: 'r' },
  refresh: { type: 'boolean', verbs: ['open'] },
  'runtime-dir': { type: 'string', verbs: DAEMON_VERBS },
  seconds: { type: 'string', verbs: ['benchmark'] },
  'sector-size': { type: 'string', num: 'u32', verbs: ['open', 'luksFormat', 'benchmark', 'reencrypt'] },
  'serialize-memory-hard-pbkdf': { type: 'boolean', verbs: ['open'] },
  shared: { type: 'boolean', verbs: ['open'] },
  size: { type: 'string', num: 'u64', short: 'b', verbs: ['open', 'resize'] },
  skip: { type: 'string', num: 'u64', short: 'p', verbs: ['open'] },
  subsystem: { type: 'string', verbs: ['config', 'luksFormat'] },
  'tcrypt-backup': { type: 'boolean', verbs: ['open', 'tcryptDump'] },
  'tcrypt-hidden': { type: 'boolean', verbs: ['open', 'tcryptDump'] },
  'tcrypt-system': { type: 'boolean', verbs: ['open', 'tcryptDump'] },
  'test-args': { type: 'boolean' },
  'test-passphrase': { type: 'boolean', verbs: ['open'] },
  threads: { type: 'string', verbs: ['benchmark'] },
  timeout: { type: 'string', num: 'u32', short: 't' },
  'token-id': { type: 'string', num: 'i32' },
  'token-only': { type: 'boolean' },
  'token-replace': { type: 'boolean', verbs: ['token'] },
  'token-type': { type: 'string' },
  tries: { type: 'string', num: 'u32', short: 'T' },
  type: { type: 'string', short: 'M' },
  'use-random': { type: 'boolean', verbs: ['luksFormat'] },
  'use-urandom': { type: 'boolean', verbs: ['luksFormat'] },
  unbound: { type: 'boolean', verbs: ['luksAddKey', 'luksDump', 'open', 'token'] },
  uuid: { type: 'string', verbs: ['luksFormat', 'luksUUID', 'reencrypt'] },
  veracrypt: { type: 'boolean' },
  'veracrypt-pim': { type: 'string', num: 'u32', verbs: ['open', 'tcryptDump'] },
  'veracrypt-query-pim': { type: 'boolean', verbs: ['open', 'tcryptDump'] },
  verbose: { type: 'boolean', short: 'v' },
  'verify-passphrase': { type: 'boolean', short: 'y' },
  via: { type: 'string', verbs: ['attach'] },
  'init-only': { type: 'boolean', verbs: ['reencrypt'] },
  'resume-only': { type: 'boolean', verbs: ['reencrypt'] },
  resilience: { type: 'string', verbs: ['reencrypt'] },
  'resilience-hash': { type: 'string', verbs: ['reencrypt'] },
  'hotzone-size': { type: 'string', num: 'size', verbs: ['reencrypt'] },
  'force-offline-reencrypt': { type: 'boolean', verbs: ['reencrypt'] },
  encrypt: { type: 'boolean', verbs: ['reencrypt'] },
  'progress-frequency': { type: 'string', num: 'u32', verbs: ['reencrypt'] },
  'progress-json': { type: 'boolean', verbs: ['reencrypt'] },
  decrypt: { type: 'boolean', verbs: ['reencrypt'] },
  'reduce-device-size': { type: 'string', num: 'size', verbs: ['reencrypt'] },
  // cryptsetup's legacy LUKS1 reencryption (utils_reencrypt_luks1.c); --keep-key is above.
  'block-size': { type: 'string', num: 'u32', short: 'B' },
  new: { type: 'boolean', short: 'N', alias: 'encrypt' },
  'use-directio': { type: 'boolean' },
  'use-fsync': { type: 'boolean' },
  'write-log': { type: 'boolean' },
} as const satisfies Record<string, OptionRow>;

type Table = typeof OPTIONS;
/** Options stored under another row's name. */
type AliasNames = { [K in keyof Table]: Table[K] extends { alias: string } ? K : never }[keyof Table];

/** Parsed option values: a string for options that take one, `true` for flags; absent when not given. */
export type CliValues = {
  -readonly [K in Exclude<keyof Table, AliasNames>]?: Table[K]['type'] extends 'string' ? string : boolean;
};

export interface ParsedCli {
  /** The action word (first non-option word), or undefined when there is none. */
  verb: string | undefined;
  values: CliValues;
  /** The words after the action, in order (options removed). */
  positionals: string[];
  /** --help / -? / --usage / --version / -V. */
  help: boolean;
  usage: boolean;
  version: boolean;
}

const ROWS: ReadonlyMap<string, OptionRow> = new Map(Object.entries(OPTIONS));
const SHORT: ReadonlyMap<string, string> = new Map(
  Object.entries(OPTIONS as Record<string, OptionRow>).flatMap(([name, r]) =>
    r.short ? [[r.short, name] as [string, string]] : [],
  ),
);

function usageError(message: string): CryptmapError {
  return new CryptmapError('EARGS', message, { exitCode: EXIT_WRONG_PARAMS });
}

/**
 * A size with cryptsetup's units (its tools_string_to_size, for --device-size, --hotzone-size,
 * --luks2-metadata-size, --luks2-keyslots-size, --reduce-device-size), in bytes: digits, then
 * nothing, `s`/`S` (512-byte sectors), `K M G T` or `KiB MiB GiB TiB` (1024 base, either case) or
 * `KB MB GB TB` (1000 base). Anything else is cryptsetup's usage error, exit 1.
 */
export function parseSize(v: string, name: string): number {
  const m = /^([0-9]+)(?:([sS])|([kKmMgGtT])(iB|B)?)?$/.exec(v);
  const bad = () => usageError(`Invalid size specification in parameter ${name}.`);
  if (!m) throw bad();
  let mult = 1;
  if (m[2]) mult = 512;
  else if (m[3]) mult = (m[4] === 'B' ? 1000 : 1024) ** ('kmgt'.indexOf(m[3].toLowerCase()) + 1);
  const n = Number(m[1]) * mult;
  if (!Number.isSafeInteger(n)) throw bad();
  return n;
}

/**
 * cryptsetup's tools_parse_arg_value: a base-10 number (strtoull/strtoll: leading blanks, a sign)
 * that fits the option's type, else popt's "invalid numeric value" (exit 1). A minus sign is the
 * unsigned wrap-around of strtoull: too large for 32 bits, taken as is for 64 (the verb then refuses it).
 */
function checkNumber(name: string, value: string, kind: 'u32' | 'i32' | 'u64' | 'size'): void {
  if (kind === 'size') {
    parseSize(value, `--${name}`);
    return;
  }
  const m = /^\s*([+-]?)([0-9]+)$/.exec(value);
  let ok = m !== null;
  if (m) {
    const n = BigInt(m[2]!) * (m[1] === '-' ? -1n : 1n);
    if (kind === 'u32') ok = n === 0n || (n > 0n && n <= 0xffffffffn);
    else if (kind === 'i32') ok = n >= -0x80000000n && n <= 0x7fffffffn;
    else ok = n >= -0xffffffffffffffffn && n <= 0xffffffffffffffffn;
  }
  if (!ok) throw usageError(`invalid numeric value: --${name} ${value}`);
}

/** cryptsetup's checks of single option values as popt hands them over (src/cryptsetup.c, its "special cases"). */
const VALUE_CHECKS: Readonly<Record<string, (value: string) => void>> = {
  'device-size': (v) => {
    const n = parseSize(v, '--device-size');
    if (n === 0) throw usageError('invalid numeric value: --device-size 0');
    if (n % 512 !== 0) throw usageError('Device size must be multiple of 512 bytes sector.');
  },
  'hotzone-size': (v) => {
    if (parseSize(v, '--hotzone-size') === 0) throw usageError('Invalid max reencryption hotzone size specification.');
  },
  'key-size': (v) => {
    if (Number(v) % 8 !== 0) throw usageError('Key size must be a multiple of 8 bits');
  },
  'key-slot': (v) => {
    if (Number(v) < 0) throw usageError('Key slot is invalid.');
  },
  priority: (v) => {
    if (!['normal', 'prefer', 'ignore'].includes(v))
      throw usageError('Option --priority can be only ignore/normal/prefer.');
  },
  'sector-size': (v) => {
    const n = Number(v);
    if (n < 512 || n > 4096 || (n & (n - 1)) !== 0) throw usageError('Unsupported encryption sector size.');
  },
  'keyslot-key-size': (v) => {
    if (Number(v) === 0) throw usageError('invalid numeric value: --keyslot-key-size 0');
    if (Number(v) % 8 !== 0) throw usageError('Key size must be a multiple of 8 bits');
  },
  'reduce-device-size': (v) => {
    const n = parseSize(v, '--reduce-device-size');
    if (n > 1024 ** 3) throw usageError('Maximum device reduce size is 1 GiB.');
    if (n % 512 !== 0) throw usageError('Reduce size must be multiple of 512 bytes sector.');
  },
};

/** Whether `word` is an option that takes its value from the next word (for finding the verb). */
export function takesNextValue(word: string): boolean {
  if (word.startsWith('--')) return !word.includes('=') && ROWS.get(word.slice(2))?.type === 'string';
  if (!word.startsWith('-') || word.length < 2) return false;
  // -qvd KEY: the last letter of a group takes the next word when it wants a value and none follows it.
  for (let i = 1; i < word.length; i++) {
    const name = SHORT.get(word[i]!);
    if (name && ROWS.get(name)!.type === 'string') return i === word.length - 1;
  }
  return false;
}

/**
 * Parse a whole command line: options anywhere, `--` ends them, the first other word is the verb.
 * Unknown options and missing values are usage errors (exit 1).
 */
export function parseCommandLine(argv: readonly string[]): ParsedCli {
  const values: Record<string, string | boolean> = {};
  const words: string[] = [];
  const out: ParsedCli = {
    verb: undefined,
    values: values as CliValues,
    positionals: words,
    help: false,
    usage: false,
    version: false,
  };
  let keyFiles = 0;
  const set = (name: string, value: string | boolean) => {
    const row = ROWS.get(name)!;
    if (row.num !== undefined && typeof value === 'string') checkNumber(name, value, row.num);
    if (typeof value === 'string') VALUE_CHECKS[name]?.(value);
    const key = row.alias ?? name;
    if (key === 'key-file') keyFiles++;
    values[key] = value;
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--') {
      words.push(...argv.slice(i + 1));
      break;
    }
    if (a.startsWith('--')) {
      const eq = a.indexOf('=');
      const name = eq < 0 ? a.slice(2) : a.slice(2, eq);
      if (name === 'help') out.help = true;
      else if (name === 'usage') out.usage = true;
      else if (name === 'version') out.version = true;
      else {
        const row = ROWS.get(name);
        if (!row) throw usageError(`Unknown option '--${name}'.`);
        if (row.type === 'boolean') {
          if (eq >= 0) throw usageError(`Option '--${name}' does not take a value.`);
          set(name, true);
        } else if (eq >= 0) set(name, a.slice(eq + 1));
        else {
          if (i + 1 >= argv.length) throw usageError(`Option '--${name}' requires an argument.`);
          set(name, argv[++i]!);
        }
      }
      continue;
    }
    if (a.startsWith('-') && a.length > 1) {
      for (let j = 1; j < a.length; j++) {
        const c = a[j]!;
        if (c === '?') {
          out.help = true;
          continue;
        }
        if (c === 'V') {
          out.version = true;
          continue;
        }
        const name = SHORT.get(c);
        if (!name) throw usageError(`Unknown option '-${c}'.`);
        if (ROWS.get(name)!.type === 'boolean') {
          set(name, true);
          continue;
        }
        if (j + 1 < a.length) set(name, a.slice(j + 1));
        else if (i + 1 < argv.length) set(name, argv[++i]!);
        else throw usageError(`Option '-${c}' requires an argument.`);
        break;
      }
      continue;
    }
    words.push(a);
  }
  out.verb = words.shift();
  // TCRYPT takes several keyfiles (cryptsetup: every other device type one).
  const tcrypt = out.verb === 'tcryptOpen' || out.verb === 'tcryptDump' || values.type === 'tcrypt';
  if (keyFiles > 1 && !tcrypt) throw usageError('Only one --key-file argument is allowed.');
  return out;
}

/**
 * cryptsetup's tools_check_args: every option given must be one the action accepts.
 * `action` is the canonical action (luksOpen and refresh are `open`, luksClose is `close`, ...).
 */
export function checkOptionsAllowed(values: CliValues, action: string): void {
  // In the table's order (near enough cryptsetup's), so that two refused options name the same one.
  for (const [name, row] of ROWS) {
    if (!(name in values) || row.verbs === undefined) continue;
    if (!row.verbs.includes(action)) throw usageError(`Option --${name} is not allowed with ${action} action.`);
  }
}
