/**
 * cryptmap's command line: a table of verbs, each in its own file under cli/commands/ and loaded
 * lazily so that `cryptmap isLuks` does not pay for the NBD server. Verb names follow cryptsetup
 * (luksFormat, luksDump, ...) and dmsetup (`cryptmap dm create ...`).
 */
import { cryptmapVersion } from '../util/version.js';
import { CryptmapError, EXIT_WRONG_PARAMS, isCryptmapError } from '../util/errors.js';
import { checkOptionsAllowed, parseCommandLine, takesNextValue } from './options.js';
import type { CliIO, VerbMain } from './types.js';
import { refuseNotActedOn, verifyCommandLine } from './verify.js';

/**
 * verb -> its module under ./commands (without .js) and, for the cryptsetup-style verbs, the
 * cryptsetup action it is (aliases such as luksOpen are `open`), which decides the options it
 * accepts (options.ts). Verbs without an action keep their own syntax and parse their own options
 * (dmsetup's for `dm`, the services'): main only moves the verb word to the front for them.
 */
const VERBS: Record<string, { file: string; action?: string }> = {
  benchmark: { file: 'benchmark' },
  dm: { file: 'dm' },
  luksFormat: { file: 'luks-format', action: 'luksFormat' },
  luksDump: { file: 'luks-dump', action: 'luksDump' },
  // No TCRYPT support: the verb is known for cryptsetup's --test-args checks and says it is not implemented.
  tcryptDump: { file: 'tcrypt-dump', action: 'tcryptDump' },
  luksAddKey: { file: 'luks-keys', action: 'luksAddKey' },
  luksRemoveKey: { file: 'luks-keys', action: 'luksRemoveKey' },
  luksKillSlot: { file: 'luks-keys', action: 'luksKillSlot' },
  luksChangeKey: { file: 'luks-keys', action: 'luksChangeKey' },
  luksConvertKey: { file: 'luks-keys', action: 'luksConvertKey' },
  luksUUID: { file: 'luks-misc', action: 'luksUUID' },
  isLuks: { file: 'luks-misc', action: 'isLuks' },
  luksHeaderBackup: { file: 'luks-misc', action: 'luksHeaderBackup' },
  luksHeaderRestore: { file: 'luks-misc', action: 'luksHeaderRestore' },
  config: { file: 'luks-misc', action: 'config' },
  repair: { file: 'luks-misc', action: 'repair' },
  convert: { file: 'luks-misc', action: 'convert' },
  reencrypt: { file: 'reencrypt', action: 'reencrypt' },
  erase: { file: 'luks-misc', action: 'erase' },
  luksErase: { file: 'luks-misc', action: 'erase' },
  token: { file: 'luks-misc', action: 'token' },
  open: { file: 'open', action: 'open' },
  luksOpen: { file: 'open', action: 'open' },
  // cryptsetup's old action names (src/cryptsetup.c main): each is open or close with its type.
  create: { file: 'open', action: 'open' },
  plainOpen: { file: 'open', action: 'open' },
  loopaesOpen: { file: 'open', action: 'open' },
  tcryptOpen: { file: 'open', action: 'open' },
  bitlkOpen: { file: 'open', action: 'open' },
  fvault2Open: { file: 'open', action: 'open' },
  close: { file: 'close', action: 'close' },
  luksClose: { file: 'close', action: 'close' },
  remove: { file: 'close', action: 'close' },
  plainClose: { file: 'close', action: 'close' },
  loopaesClose: { file: 'close', action: 'close' },
  tcryptClose: { file: 'close', action: 'close' },
  bitlkClose: { file: 'close', action: 'close' },
  fvault2Close: { file: 'close', action: 'close' },
  luksConfig: { file: 'luks-misc', action: 'config' },
  status: { file: 'status', action: 'status' },
  luksSuspend: { file: 'suspend', action: 'luksSuspend' },
  luksResume: { file: 'suspend', action: 'luksResume' },
  refresh: { file: 'refresh', action: 'open' },
  resize: { file: 'resize', action: 'resize' },
  daemon: { file: 'daemon' },
  attach: { file: 'attach', action: 'attach' },
  detach: { file: 'attach', action: 'detach' },
  keyd: { file: 'keyd' },
  agent: { file: 'agent' },
  crypttab: { file: 'crypttab' },
  volume: { file: 'volume' },
};

/**
 * `cryptmap <verb> --help` for the verbs that follow cryptsetup (their options and exit codes are
 * cryptsetup 2.6's, see cryptsetup-<verb>(8)); the other verbs print their own help.
 */
const SYNOPSIS: Record<string, string> = {
  luksFormat: 'luksFormat [OPTION...] <device> [<key file>]',
  luksDump: 'luksDump [--json | --dump-json-metadata | --dump-volume-key [--volume-key-file F]] [OPTION...] <device>',
  luksAddKey: 'luksAddKey [OPTION...] <device> [<new key file>]',
  luksRemoveKey: 'luksRemoveKey [OPTION...] <device> [<key file>]',
  luksKillSlot: 'luksKillSlot [OPTION...] <device> <key slot>',
  luksChangeKey: 'luksChangeKey [OPTION...] <device> [<new key file>]',
  luksConvertKey: 'luksConvertKey [--pbkdf ...] [--key-slot N] [OPTION...] <device>',
  luksUUID: 'luksUUID [--uuid UUID] <device>',
  isLuks: 'isLuks [--json] [--type luks1|luks2] [-v] <device>',
  luksHeaderBackup: 'luksHeaderBackup --header-backup-file FILE <device>',
  luksHeaderRestore: 'luksHeaderRestore --header-backup-file FILE <device>',
  config: 'config [--label L] [--subsystem S] [--priority ignore|normal|prefer --key-slot N] <device>',
  repair: 'repair <device>',
  convert: 'convert --type luks1|luks2 <device>',
  reencrypt:
    'reencrypt [--encrypt [--reduce-device-size N] | --decrypt] [--init-only | --resume-only] [--resilience checksum|journal|none|datashift] [--hotzone-size N] [--cipher C] [--key-size BITS] [--sector-size N] [--header H] [OPTION...] <device> [<name>]',
  erase: 'erase <device>',
  luksErase: 'luksErase <device>',
  token: 'token add|remove|import|export|unassign [OPTION...] <device>',
  open: 'open [--type luks|luks1|luks2|plain] [OPTION...] [--attach] [--persistent] <device> <name>',
  luksOpen: 'luksOpen [OPTION...] <device> <name>',
  create: 'create [OPTION...] <name> <device>   (open --type plain <device> <name>)',
  plainOpen: 'plainOpen [OPTION...] <device> <name>   (open --type plain)',
  remove: 'remove <name>   (close)',
  plainClose: 'plainClose <name>   (close)',
  luksConfig: 'luksConfig [OPTION...] <device>   (config)',
  close: 'close [--runtime-dir DIR] <name>',
  luksClose: 'luksClose [--runtime-dir DIR] <name>',
  status: 'status [--json] [--runtime-dir DIR] <name>',
  luksSuspend: 'luksSuspend [--runtime-dir DIR] <name>',
  luksResume: 'luksResume [--key-file F] [--key-slot N] [--header H] [--runtime-dir DIR] <name>',
  refresh: 'refresh [--allow-discards] [--perf-*] [--persistent] [--key-file F] [--runtime-dir DIR] <name>',
  resize: 'resize [--size SECTORS | --device-size BYTES] [--key-file F] [--runtime-dir DIR] <name>',
  attach: 'attach [--via fuse|nbd|nbdfuse] [--readonly] [--runtime-dir DIR] <name>',
  detach: 'detach [--runtime-dir DIR] <name>',
};

const USAGE = `usage: cryptmap [OPTION...] <verb> [args]

Verbs (cryptsetup names): luksFormat open close status luksDump luksAddKey luksRemoveKey
  luksKillSlot luksChangeKey luksConvertKey luksUUID isLuks luksHeaderBackup luksHeaderRestore config repair
  convert erase token luksSuspend luksResume refresh resize benchmark
Device mapper (dmsetup syntax): dm create|remove|reload|load|suspend|resume|table|status|info|ls|message|rename
Serving and services: daemon attach detach agent keyd crypttab volume
Old names, as cryptsetup keeps them: create plainOpen luksOpen (open), remove plainClose luksClose (close),
  luksErase (erase), luksConfig (config)

Options may come before or after the verb, as in cryptsetup; '--' ends them.
'cryptmap <verb> --help' describes a verb.`;

/** Index of the verb word in argv: the first word that is neither an option nor an option's value (before `--` or right after it). */
function verbIndex(argv: string[]): number {
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--') return i + 1 < argv.length ? i + 1 : -1;
    if (!a.startsWith('-') || a === '-') return i;
    if (takesNextValue(a)) i++;
  }
  return -1;
}

export async function main(argv: string[], io: CliIO): Promise<number> {
  try {
    return await run(argv, io);
  } catch (e) {
    const code = reportError(e, io);
    // cryptsetup -v (show_status): the failure in words after the error message, on stdout.
    const opts = argv.indexOf('--') < 0 ? argv : argv.slice(0, argv.indexOf('--'));
    if (isCryptmapError(e) && code >= 1 && code <= 5 && (opts.includes('-v') || opts.includes('--verbose'))) {
      const words = [
        'wrong or missing parameters',
        'no permission or bad passphrase',
        'out of memory',
        'wrong device or file specified',
        'device already exists or device is busy',
      ];
      io.stdout.write(`Command failed with code -${code} (${words[code - 1]}).\n`);
    }
    return code;
  }
}

async function run(argv: string[], io: CliIO): Promise<number> {
  const at = verbIndex(argv);
  const verb = at < 0 ? undefined : argv[at]!;
  const entry = verb === undefined ? undefined : VERBS[verb];
  // The verb word first, the rest in its order (a verb after `--` leaves the `--` before its arguments).
  const args = at < 0 ? argv : [argv[at]!, ...argv.slice(0, at), ...argv.slice(at + 1)];
  if (entry?.action === undefined) {
    // No verb, an unknown one, or a verb with its own syntax: the table still parses what came before it.
    const before = parseCommandLine(at < 0 ? argv : argv.slice(0, at));
    if (before.version) {
      io.stdout.write(`cryptmap ${cryptmapVersion()}\n`);
      return 0;
    }
    if (verb === undefined || verb === 'help') {
      io.stdout.write(USAGE + '\n');
      return before.help || before.usage || verb === 'help' ? 0 : EXIT_WRONG_PARAMS;
    }
    if (entry === undefined) {
      io.stderr.write(`cryptmap: unknown verb '${verb}'.\n${USAGE}\n`);
      return EXIT_WRONG_PARAMS;
    }
    if (verb === 'benchmark' && parseCommandLine(args).values['test-args']) {
      // benchmark parses its own options; --test-args checks them as cryptsetup's action `benchmark`.
      const cli = parseCommandLine(args);
      checkOptionsAllowed(cli.values, 'benchmark');
      verifyCommandLine(verb, 'benchmark', cli.values, cli.positionals);
      io.stdout.write('No action taken. Invoked with --test-args option.\n');
      return 0;
    }
    return runVerb(verb, entry.file, args, io);
  }
  const cli = parseCommandLine(args);
  if (cli.version) {
    io.stdout.write(`cryptmap ${cryptmapVersion()}\n`);
    return 0;
  }
  if (cli.help || cli.usage) {
    io.stdout.write(
      `usage: cryptmap ${SYNOPSIS[verb!] ?? `${verb} [OPTION...]`}\nOptions, messages and exit codes as cryptsetup 2.6 (see cryptsetup(8)).\n`,
    );
    return 0;
  }
  checkOptionsAllowed(cli.values, entry.action);
  verifyCommandLine(verb!, entry.action, cli.values, cli.positionals);
  if (cli.values['test-args']) {
    io.stdout.write('No action taken. Invoked with --test-args option.\n');
    return 0;
  }
  refuseNotActedOn(cli.values, entry.action);
  return runVerb(verb!, entry.file, args, io);
}

async function runVerb(verb: string, file: string, args: string[], io: CliIO): Promise<number> {
  let mod: { default: VerbMain };
  try {
    mod = (await import(`./commands/${file}.js`)) as { default: VerbMain };
  } catch (e) {
    if (
      (e as NodeJS.ErrnoException).code === 'ERR_MODULE_NOT_FOUND' &&
      String((e as Error).message).includes(`commands/${file}.js`)
    ) {
      io.stderr.write(`cryptmap: verb '${verb}' is not implemented yet.\n`);
      return EXIT_WRONG_PARAMS;
    }
    throw e;
  }
  return mod.default(args, io);
}

/** Print an error the way cryptsetup does (one line, no stack) and give its exit code. */
export function reportError(e: unknown, io: CliIO): number {
  if (isCryptmapError(e)) {
    // An empty message is an error cryptsetup reports by its exit code only (a refused dialog).
    if (e.message !== '') io.stderr.write(`${e.message}\n`);
    if (io.env.CRYPTMAP_DEBUG) io.stderr.write(`(code ${e.code})\n`);
    return e.exitCode;
  }
  const err = e instanceof Error ? e : new CryptmapError('EINTERNAL', String(e));
  // node:util parseArgs (strict) in a verb: an unknown or malformed option is a usage error, not an internal one.
  if (String((err as NodeJS.ErrnoException).code).startsWith('ERR_PARSE_ARGS_')) {
    io.stderr.write(`${err.message}\n`);
    return EXIT_WRONG_PARAMS;
  }
  io.stderr.write(`cryptmap: internal error: ${err.message}\n`);
  if (io.env.CRYPTMAP_DEBUG) io.stderr.write(`${err.stack}\n`);
  return 1;
}
