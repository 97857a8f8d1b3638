/**
 * cryptsetup 2.6's checks of a whole command line before it acts (src/cryptsetup.c main and its
 * verify_<action> functions): the number of arguments an action needs, option pairs that cannot be
 * combined, options that only make sense for one device type. `--test-args` stops right after
 * them ("No action taken. Invoked with --test-args option.", exit 0), so a script can check a
 * command line without a device; every failure is a usage error (exit 1) with cryptsetup's message.
 *
 * The device type these checks see is cryptsetup's: `--type`, or the one an old action name implies
 * (luksOpen is luks, create/plainOpen plain, tcryptDump tcrypt, ...), "luks" when neither is given,
 * and none for `refresh`/`open --refresh` (which read it from the active mapping).
 */
import { CryptmapError, EXIT_WRONG_PARAMS } from '../util/errors.js';
import type { CliValues } from './options.js';

function usageError(message: string): CryptmapError {
  return new CryptmapError('EARGS', message, { exitCode: EXIT_WRONG_PARAMS });
}

/** Arguments each action needs and how its usage names them (cryptsetup's action table). */
const REQUIRED_ARGS: Readonly<Record<string, readonly [number, string]>> = {
  open: [1, '<device> [--type <type>] [<name>]'],
  close: [1, '<name>'],
  resize: [1, '<name>'],
  status: [1, '<name>'],
  benchmark: [0, '[--cipher <cipher>]'],
  repair: [1, '<device>'],
  reencrypt: [0, '<device>'],
  erase: [1, '<device>'],
  convert: [1, '<device>'],
  config: [1, '<device>'],
  luksFormat: [1, '<device> [<new key file>]'],
  luksAddKey: [1, '<device> [<new key file>]'],
  luksRemoveKey: [1, '<device> [<key file>]'],
  luksChangeKey: [1, '<device> [<key file>]'],
  luksConvertKey: [1, '<device> [<key file>]'],
  luksKillSlot: [2, '<device> <key slot>'],
  luksUUID: [1, '<device>'],
  isLuks: [1, '<device>'],
  luksDump: [1, '<device>'],
  tcryptDump: [1, '<device>'],
  luksSuspend: [1, '<device>'],
  luksResume: [1, '<device>'],
  luksHeaderBackup: [1, '<device>'],
  luksHeaderRestore: [1, '<device>'],
  token: [2, '<add|remove|import|export> <device>'],
};

/**
 * The device type an old action name stands for (cryptsetup main's alias handling; open.ts uses it too:
 * an open alias sets the type over any --type given); undefined: none given.
 */
export const ALIAS_TYPE: Readonly<Record<string, string>> = {
  create: 'plain',
  plainOpen: 'plain',
  luksOpen: 'luks',
  loopaesOpen: 'loopaes',
  tcryptOpen: 'tcrypt',
  bitlkOpen: 'bitlk',
  fvault2Open: 'fvault2',
  tcryptDump: 'tcrypt',
  bitlkDump: 'bitlk',
  fvault2Dump: 'fvault2',
  luksErase: 'luks',
  luksConfig: 'luks2',
};

/** The device type cryptsetup's checks see for `verb` (the word typed) with these options; null: none (refresh). */
export function cliDeviceType(verb: string, values: CliValues): string | null {
  if (verb === 'refresh' || values.refresh) return null;
  return ALIAS_TYPE[verb] ?? values.type ?? 'luks';
}

type Check = (v: CliValues, type: string | null, args: readonly string[]) => string | undefined;

const tcryptChecks: Check = (v, type) => {
  if ((v['tcrypt-hidden'] || v['tcrypt-system'] || v['tcrypt-backup']) && type !== 'tcrypt')
    return 'Option --tcrypt-hidden, --tcrypt-system or --tcrypt-backup is supported only for TCRYPT device.';
  if ((v.veracrypt || v['disable-veracrypt']) && type !== 'tcrypt')
    return 'Option --veracrypt or --disable-veracrypt is supported only for TCRYPT device type.';
  if (v['veracrypt-pim'] !== undefined && v['disable-veracrypt'])
    return 'Option --veracrypt-pim is supported only for VeraCrypt compatible devices.';
  if (v['veracrypt-query-pim']) {
    if (v['disable-veracrypt'])
      return 'Option --veracrypt-query-pim is supported only for VeraCrypt compatible devices.';
    if (v['veracrypt-pim'] !== undefined)
      return 'The options --veracrypt-pim and --veracrypt-query-pim are mutually exclusive.';
  }
  return undefined;
};

/** Whether `type` differs from `want`; no type (refresh) differs from nothing, as cryptsetup's strcmp_or_null. */
const differs = (type: string | null, want: string) => type !== null && type !== want;

const VERIFY: Readonly<Record<string, Check>> = {
  open: (v, type, args) => {
    if (v.persistent && v['test-passphrase']) return 'Option --persistent is not allowed with --test-passphrase.';
    if (v.refresh && v['test-passphrase']) return 'Options --refresh and --test-passphrase are mutually exclusive.';
    if (v.shared && differs(type, 'plain')) return 'Option --shared is allowed only for open of plain device.';
    if (v.skip !== undefined && differs(type, 'plain') && type !== 'loopaes')
      return 'Option --skip is supported only for open of plain and loopaes devices.';
    if (v.offset !== undefined && differs(type, 'plain') && type !== 'loopaes')
      return 'Option --offset with open action is only supported for plain and loopaes devices.';
    if (v['tcrypt-hidden'] && v['allow-discards'])
      return 'Option --tcrypt-hidden cannot be combined with --allow-discards.';
    if (v['sector-size'] !== undefined && type !== 'plain')
      return 'Sector size option with open action is supported only for plain devices.';
    if (v['iv-large-sectors'] && (type !== 'plain' || Number(v['sector-size'] ?? 0) <= 512))
      return 'Large IV sectors option is supported only for opening plain type device with sector size larger than 512 bytes.';
    if (
      v['test-passphrase'] &&
      (type === null || (!type.startsWith('luks') && !['tcrypt', 'bitlk', 'fvault2'].includes(type)))
    )
      return 'Option --test-passphrase is allowed only for open of LUKS, TCRYPT, BITLK and FVAULT2 devices.';
    if (v['device-size'] !== undefined && v.size !== undefined)
      return 'Options --device-size and --size cannot be combined.';
    if (v.unbound && type !== null && !type.startsWith('luks'))
      return 'Option --unbound is allowed only for open of luks device.';
    if (v.unbound && !v['test-passphrase']) return 'Option --unbound cannot be used without --test-passphrase.';
    return tcryptChecks(v, type, args);
  },
  tcryptDump: tcryptChecks,
  close: (v) =>
    v['cancel-deferred'] && v.deferred
      ? 'Options --cancel-deferred and --deferred cannot be used at the same time.'
      : undefined,
  resize: (v) =>
    v['device-size'] !== undefined && v.size !== undefined
      ? 'Options --device-size and --size cannot be combined.'
      : undefined,
  reencrypt: (v, type) => {
    if (v['reduce-device-size'] !== undefined && v['device-size'] !== undefined)
      return 'Options --reduce-device-size and --data-size cannot be combined.';
    if (type === 'luks1' && v['active-name'] !== undefined)
      return 'Option --active-name can be set only for LUKS2 device.';
    if (v['active-name'] !== undefined && v['force-offline-reencrypt'])
      return 'Options --active-name and --force-offline-reencrypt cannot be combined.';
    return undefined;
  },
  config: (v) =>
    v.priority !== undefined && v['key-slot'] === undefined ? 'Keyslot specification is required.' : undefined,
  luksFormat: (v) => {
    if (v['align-payload'] !== undefined && v.offset !== undefined)
      return 'Options --align-payload and --offset cannot be combined.';
    if (v['integrity-no-wipe'] && v.integrity === undefined)
      return 'Option --integrity-no-wipe can be used only for format action with integrity extension.';
    if (v['use-random'] && v['use-urandom']) return 'Only one of --use-[u]random options is allowed.';
    return undefined;
  },
  luksAddKey: (v) =>
    v.unbound && !Number(v['key-size'] ?? 0) ? 'Key size is required with --unbound option.' : undefined,
  luksDump: (v) => (v.unbound && v['key-slot'] === undefined ? 'Keyslot specification is required.' : undefined),
  token: (v, _type, args) => {
    const what = args[0]!;
    if (!['add', 'remove', 'import', 'export', 'unassign'].includes(what)) return 'Invalid token action.';
    if (v['key-description'] === undefined && what === 'add')
      return '--key-description parameter is mandatory for token add action.';
    if (v['token-id'] === undefined && (what === 'remove' || what === 'export'))
      return 'Action requires specific token. Use --token-id parameter.';
    if (v.unbound) {
      if (what !== 'add') return 'Option --unbound is valid only with token add action.';
      if (v['key-slot'] !== undefined) return 'Options --key-slot and --unbound cannot be combined.';
    }
    if (what === 'unassign') {
      if (v['key-slot'] === undefined) return 'Action requires specific keyslot. Use --key-slot parameter.';
      if (v['token-id'] === undefined) return 'Action requires specific token. Use --token-id parameter.';
    }
    return undefined;
  },
};

/**
 * cryptsetup's checks between parsing and acting, in its order: the action's arguments, PBKDF
 * options, the keyslot cipher pair, then the action's own (verify_<action>). `verb` is the word
 * typed (an alias such as luksOpen), `action` the action it is, `args` the words after it.
 */
export function verifyCommandLine(verb: string, action: string, values: CliValues, args: readonly string[]): void {
  const req = REQUIRED_ARGS[action];
  if (req && args.length < req[0]) throw usageError(`${action}: requires ${req[1]} as arguments`);
  if (values.pbkdf !== undefined && !['pbkdf2', 'argon2i', 'argon2id'].includes(values.pbkdf.toLowerCase()))
    throw usageError('Password-based key derivation function (PBKDF) can be only pbkdf2 or argon2i/argon2id.');
  if (values['pbkdf-force-iterations'] !== undefined && values['iter-time'] !== undefined)
    throw usageError('PBKDF forced iterations cannot be combined with iteration time option.');
  if ((values['keyslot-cipher'] !== undefined) !== (values['keyslot-key-size'] !== undefined))
    throw usageError('Options --keyslot-cipher and --keyslot-key-size must be used together.');
  const message = VERIFY[action]?.(
    { ...values, refresh: values.refresh || verb === 'refresh' },
    cliDeviceType(verb, values),
    args,
  );
  if (message !== undefined) throw usageError(message);
}

/**
 * Options cryptmap takes so that a command line cryptsetup accepts passes `--test-args` and the
 * checks above, but does not act on: a verb that would act with one of them fails instead of
 * ignoring it (exit 1). The value says why; `action:option` rows apply to that action only.
 * (--serialize-memory-hard-pbkdf is taken and ignored: with it cryptsetup makes concurrent Argon2
 * unlocks of several processes take turns, which cryptmap does not.)
 */
const NOT_ACTED_ON: Readonly<Record<string, string>> = {
  integrity: 'dm-integrity (authenticated encryption) is not supported by cryptmap',
  'integrity-no-wipe': 'dm-integrity (authenticated encryption) is not supported by cryptmap',
  'integrity-no-journal': 'dm-integrity (authenticated encryption) is not supported by cryptmap',
  'integrity-legacy-padding': 'dm-integrity (authenticated encryption) is not supported by cryptmap',
  'tcrypt-hidden': 'TCRYPT (TrueCrypt/VeraCrypt) devices are not supported by cryptmap',
  'tcrypt-system': 'TCRYPT (TrueCrypt/VeraCrypt) devices are not supported by cryptmap',
  'tcrypt-backup': 'TCRYPT (TrueCrypt/VeraCrypt) devices are not supported by cryptmap',
  veracrypt: 'TCRYPT (TrueCrypt/VeraCrypt) devices are not supported by cryptmap',
  'disable-veracrypt': 'TCRYPT (TrueCrypt/VeraCrypt) devices are not supported by cryptmap',
  'veracrypt-pim': 'TCRYPT (TrueCrypt/VeraCrypt) devices are not supported by cryptmap',
  'veracrypt-query-pim': 'TCRYPT (TrueCrypt/VeraCrypt) devices are not supported by cryptmap',
  refresh: "use 'cryptmap refresh <name>' to refresh an active mapping",
  'cancel-deferred': 'cryptmap has no deferred removal to cancel (its close is immediate unless the volume is in use)',
  'active-name': 'reencrypt --active-name is not supported by cryptmap (name the device; the daemon finds its mapping)',
  'token-replace': 'token import --token-replace is not supported by cryptmap (remove the token first)',
  'reencrypt:device-size': 'reencrypt --device-size is not supported by cryptmap',
};

/** Refuse, before `action` acts, an option cryptmap only accepts for cryptsetup's checks (NOT_ACTED_ON). */
export function refuseNotActedOn(values: CliValues, action: string): void {
  for (const name of Object.keys(values)) {
    const why = NOT_ACTED_ON[name] ?? NOT_ACTED_ON[`${action}:${name}`];
    if (why !== undefined) throw usageError(`Option --${name}: ${why}.`);
  }
}
