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

const USAGE = `usage: cryptmap <verb> [options] [args]

Verbs (cryptsetup names): luksFormat open close status luksDump luksAddKey luksRemoveKey
  luksKillSlot luksChangeKey luksConvertKey luksUUID isLuks luksHeaderBackup luksHeaderRestore config repair
  erase token luksSuspend luksResume refresh resize benchmark
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
