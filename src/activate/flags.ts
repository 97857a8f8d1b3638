/**
 * The activation flags of a crypt mapping, one row each: what cryptsetup calls the option
 * (cryptsetup-open(8)), the LUKS2 `config.flags` name `open --persistent` stores
 * (lib/luks2/luks2_json_metadata.c persistent_flags), the CryptMapping field, the dm-crypt table
 * word (dm-crypt.rst), what `cryptsetup status` prints on its flags line (src/cryptsetup.c
 * action_status), and the systemd crypttab(5) option. Rows are in cryptsetup's order, which is also
 * the kernel's order for the table words.
 *
 * Every place that handles these flags maps over this table: the CLI (open, refresh, status), the
 * control protocol, the daemon (refresh), the table line and the LUKS2 persistent flags. Adding a
 * flag is one row here, its CLI option row (cli/options.ts: a missing one does not type-check) and a test.
 *
 * Not here: `iv_large_sectors` and `sector_size:` (they change what the data means, not how it is
 * served), and `high_priority` (kept in a LUKS2 header, meaningless in userspace).
 */
import type { CryptFlag } from '../dm/targets/crypt.js';

export interface ActivationFlagRow {
  /** CryptMapping field. */
  readonly field: string;
  /** cryptsetup option, without the dashes. */
  readonly option: string;
  /** LUKS2 config.flags name. */
  readonly luks2: string;
  /** dm-crypt optional table parameter. */
  readonly dm: CryptFlag;
  /** The word on `cryptsetup status`'s flags line. */
  readonly status: string;
  /** systemd crypttab(5) option. */
  readonly crypttab: string;
}

export const ACTIVATION_FLAGS = [
  {
    field: 'allowDiscards',
    option: 'allow-discards',
    luks2: 'allow-discards',
    dm: 'allow_discards',
    status: 'discards',
    crypttab: 'discard',
  },
  {
    field: 'sameCpuCrypt',
    option: 'perf-same_cpu_crypt',
    luks2: 'same-cpu-crypt',
    dm: 'same_cpu_crypt',
    status: 'same_cpu_crypt',
    crypttab: 'same-cpu-crypt',
  },
  {
    field: 'submitFromCryptCpus',
    option: 'perf-submit_from_crypt_cpus',
    luks2: 'submit-from-crypt-cpus',
    dm: 'submit_from_crypt_cpus',
    status: 'submit_from_crypt_cpus',
    crypttab: 'submit-from-crypt-cpus',
  },
  {
    field: 'noReadWorkqueue',
    option: 'perf-no_read_workqueue',
    luks2: 'no-read-workqueue',
    dm: 'no_read_workqueue',
    status: 'no_read_workqueue',
    crypttab: 'no-read-workqueue',
  },
  {
    field: 'noWriteWorkqueue',
    option: 'perf-no_write_workqueue',
    luks2: 'no-write-workqueue',
    dm: 'no_write_workqueue',
    status: 'no_write_workqueue',
    crypttab: 'no-write-workqueue',
  },
] as const satisfies readonly ActivationFlagRow[];

type Row = (typeof ACTIVATION_FLAGS)[number];
export type ActivationFlagField = Row['field'];
/** The cryptsetup options of the flags (keys of the CLI's parsed values). */
export type ActivationFlagOption = Row['option'];
/** LUKS2 persistent flag names. */
export type PersistentFlag = Row['luks2'];
/** Flags as a CryptMapping carries them (absent = off). */
export type ActivationFlags = { [K in ActivationFlagField]?: boolean };

/** Exactly the flags set in `src` (each true, the others absent): from a mapping, JSON, anything. */
export function pickFlags(src: Partial<Record<ActivationFlagField, unknown>>): ActivationFlags {
  const out: ActivationFlags = {};
  for (const f of ACTIVATION_FLAGS) if (src[f.field] === true) out[f.field] = true;
  return out;
}

/** Every flag set to true or false (a refresh replaces all of them: absent = off). */
export function allFlags(src: ActivationFlags): Required<ActivationFlags> {
  return Object.fromEntries(ACTIVATION_FLAGS.map((f) => [f.field, src[f.field] === true])) as Required<ActivationFlags>;
}

/** The flags given on a command line (`values` keyed by cryptsetup option). */
export function flagsFromOptions(values: Partial<Record<ActivationFlagOption, boolean | undefined>>): ActivationFlags {
  const out: ActivationFlags = {};
  for (const f of ACTIVATION_FLAGS) if (values[f.option] === true) out[f.field] = true;
  return out;
}

/** The LUKS2 persistent flag names of the flags set, in cryptsetup's order. */
export function persistentNames(flags: ActivationFlags): PersistentFlag[] {
  return ACTIVATION_FLAGS.filter((f) => flags[f.field] === true).map((f) => f.luks2);
}

/** The row of LUKS2 persistent flag `name`, if it is one of ours. */
export function flagOfPersistent(name: string): Row | undefined {
  return ACTIVATION_FLAGS.find((f) => f.luks2 === name);
}

/** The dm-crypt table words of the flags set, in the kernel's order. */
export function dmWords(flags: ActivationFlags): string[] {
  return ACTIVATION_FLAGS.filter((f) => flags[f.field] === true).map((f) => f.dm);
}

/**
 * `cryptsetup status`'s flags line ('' when none): cryptsetup 2.6 action_status prints each flag
 * with a space after it, except the last of its list (so `discards ` keeps its trailing space).
 */
export function statusFlagsLine(has: (row: Row) => boolean): string {
  const last = ACTIVATION_FLAGS.length - 1;
  return ACTIVATION_FLAGS.map((f, i) => (has(f) ? (i === last ? f.status : `${f.status} `) : '')).join('');
}
