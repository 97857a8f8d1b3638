/**
 * cryptmap's command line: a table of verbs, each in its own file under cli/commands/ and loaded
 * lazily so that `cryptmap isLuks` does not pay for the NBD server. Verb names follow cryptsetup
 * (luksFormat, luksDump, ...) and dmsetup (`cryptmap dm create ...`).
 */
import { CryptmapError, EXIT_WRONG_PARAMS, isCryptmapError } from '../util/errors.js';
import type { CliIO, VerbMain } from './types.js';

/** verb -> module under ./commands (without .js); aliases point at the same module. */
const VERBS: Record<string, string> = {
  benchmark: 'benchmark',
  dm: 'dm',
  luksFormat: 'luks-format',
  luksDump: 'luks-dump',
  luksAddKey: 'luks-keys',
  luksRemoveKey: 'luks-keys',
  luksKillSlot: 'luks-keys',
  luksChangeKey: 'luks-keys',
  luksConvertKey: 'luks-keys',
  luksUUID: 'luks-misc',
  isLuks: 'luks-misc',
  luksHeaderBackup: 'luks-misc',
  luksHeaderRestore: 'luks-misc',
  config: 'luks-misc',
  repair: 'luks-misc',
  convert: 'luks-misc',
  erase: 'luks-misc',
  luksErase: 'luks-misc',
  token: 'luks-misc',
  open: 'open',
  luksOpen: 'open',
  close: 'close',
  luksClose: 'close',
  status: 'status',
  luksSuspend: 'suspend',
  luksResume: 'suspend',
  refresh: 'refresh',
  resize: 'resize',
  daemon: 'daemon',
  attach: 'attach',
  detach: 'attach',
  keyd: 'keyd',
  agent: 'agent',
  crypttab: 'crypttab',
  volume: 'volume',
};

/**
 * `cryptmap <verb> --help` for the verbs that follow cryptsetup (their options and exit codes are
 * cryptsetup 2.6's, see cryptsetup-<verb>(8)); the other verbs print their own help.
 */
const SYNOPSIS: Record<string, string> = {
  luksFormat: 'luksFormat [OPTION...] <device> [<key file>]',
  luksDump: 'luksDump [--dump-json-metadata | --dump-volume-key [--volume-key-file F]] [OPTION...] <device>',
  luksAddKey: 'luksAddKey [OPTION...] <device> [<new key file>]',
  luksRemoveKey: 'luksRemoveKey [OPTION...] <device> [<key file>]',
  luksKillSlot: 'luksKillSlot [OPTION...] <device> <key slot>',
  luksChangeKey: 'luksChangeKey [OPTION...] <device> [<new key file>]',
  luksConvertKey: 'luksConvertKey [--pbkdf ...] [--key-slot N] [OPTION...] <device>',
  luksUUID: 'luksUUID [--uuid UUID] <device>',
  isLuks: 'isLuks [--type luks1|luks2] [-v] <device>',
  luksHeaderBackup: 'luksHeaderBackup --header-backup-file FILE <device>',
  luksHeaderRestore: 'luksHeaderRestore --header-backup-file FILE <device>',
  config: 'config [--label L] [--subsystem S] [--priority ignore|normal|prefer --key-slot N] <device>',
  repair: 'repair <device>',
  convert: 'convert --type luks1|luks2 <device>',
  erase: 'erase <device>',
  luksErase: 'luksErase <device>',
  token: 'token add|remove|import|export [OPTION...] <device>',
  open: 'open [--type luks|luks1|luks2|plain] [OPTION...] [--attach] [--persistent] <device> <name>',
  luksOpen: 'luksOpen [OPTION...] <device> <name>',
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

const USAGE = `usage: cryptmap <verb> [options] [args]

Verbs (cryptsetup names): luksFormat open close status luksDump luksAddKey luksRemoveKey
  luksKillSlot luksChangeKey luksConvertKey luksUUID isLuks luksHeaderBackup luksHeaderRestore config repair
  convert erase token luksSuspend luksResume refresh resize benchmark
Device mapper (dmsetup syntax): dm create|remove|reload|load|suspend|resume|table|status|info|ls|message|rename
Serving and services: daemon attach detach agent keyd crypttab volume

'cryptmap <verb> --help' describes a verb.`;

export async function main(argv: string[], io: CliIO): Promise<number> {
  const verb = argv[0];
  if (verb === undefined || verb === '--help' || verb === '-h' || verb === 'help') {
    io.stdout.write(USAGE + '\n');
    return verb === undefined ? EXIT_WRONG_PARAMS : 0;
  }
  if (verb === '--version' || verb === '-V') {
    io.stdout.write('cryptmap 0.1.0\n');
    return 0;
  }
  const file = VERBS[verb];
  if (file === undefined) {
    io.stderr.write(`cryptmap: unknown verb '${verb}'.\n${USAGE}\n`);
    return EXIT_WRONG_PARAMS;
  }
  const synopsis = SYNOPSIS[verb];
  if (synopsis !== undefined && argv.slice(1).some((a) => a === '--help' || a === '-h')) {
    io.stdout.write(`usage: cryptmap ${synopsis}\nOptions, messages and exit codes as cryptsetup 2.6 (see cryptsetup(8)).\n`);
    return 0;
  }
  let mod: { default: VerbMain };
  try {
    mod = (await import(`./commands/${file}.js`)) as { default: VerbMain };
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ERR_MODULE_NOT_FOUND' && String((e as Error).message).includes(`commands/${file}.js`)) {
      io.stderr.write(`cryptmap: verb '${verb}' is not implemented yet.\n`);
      return EXIT_WRONG_PARAMS;
    }
    throw e;
  }
  try {
    return await mod.default(argv, io);
  } catch (e) {
    return reportError(e, io);
  }
}

/** Print an error the way cryptsetup does (one line, no stack) and give its exit code. */
export function reportError(e: unknown, io: CliIO): number {
  if (isCryptmapError(e)) {
    io.stderr.write(`${e.message}\n`);
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
