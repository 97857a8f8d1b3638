/**
 * DmControl: the dmsetup verbs as an async interface, so the CLI can drive either a registry in
 * this process (tests, the daemon itself) or, later, the daemon over its control socket. Every
 * result is plain JSON-able data; the `format*` functions print it exactly as dmsetup does
 * (lvm2 tools/dmsetup.c: `_display_info_long`, `_display_name`, table and status lines).
 */
import type { DeviceRegistry } from './registry.js';
import type { MappedDevice } from './mapped-device.js';

/** `dmsetup info` fields. */
export interface DmInfo {
  name: string;
  uuid: string;
  suspended: boolean;
  readOnly: boolean;
  /** Read-ahead in sectors (dm's default 256). */
  readAhead: number;
  liveTable: boolean;
  inactiveTable: boolean;
  openCount: number;
  eventNr: number;
  major: number;
  minor: number;
  /** Targets in the live table. */
  targetCount: number;
}

/** The table or status lines of one device (no trailing newlines). */
export interface DmLines {
  name: string;
  lines: string[];
}

/** A `dmsetup ls` row. */
export interface DmListEntry {
  name: string;
  major: number;
  minor: number;
}

/** The dmsetup verbs as data: the daemon serves them over its control socket, `InProcessDmControl` in-process. */
export interface DmControl {
  /** dmsetup create NAME [--table T | -n] [-u UUID] [--readonly]: load and resume when a table is given. */
  create(name: string, opts?: { table?: string; uuid?: string; readOnly?: boolean }): Promise<void>;
  /** dmsetup remove (EBUSY while open, unless `force`). */
  remove(name: string, opts?: { force?: boolean }): Promise<void>;
  /** dmsetup load/reload: the inactive table. */
  load(name: string, table: string): Promise<void>;
  /** dmsetup clear: drop the inactive table. */
  clear(name: string): Promise<void>;
  /** dmsetup suspend [--noflush]. */
  suspend(name: string, opts?: { noflush?: boolean }): Promise<void>;
  /** dmsetup resume: the inactive table goes live if there is one. */
  resume(name: string): Promise<void>;
  /** dmsetup rename. */
  rename(oldName: string, newName: string): Promise<void>;
  /** Live table lines; every device when name is omitted. Keys only with showKeys. */
  table(name?: string, opts?: { showKeys?: boolean }): Promise<DmLines[]>;
  /** dmsetup status: each target's status line; every device when name is omitted. */
  status(name?: string): Promise<DmLines[]>;
  /** dmsetup info; every device when name is omitted. */
  info(name?: string): Promise<DmInfo[]>;
  /** dmsetup ls: names and device numbers. */
  ls(): Promise<DmListEntry[]>;
  /** dmsetup message NAME SECTOR MSG...; returns the target's reply (often empty). */
  message(name: string, sector: number, message: string[]): Promise<string>;
}

/** Read-ahead dmsetup shows for a fresh dm device (sectors). */
export const DM_DEFAULT_READ_AHEAD = 256;

function infoOf(d: MappedDevice): DmInfo {
  return {
    name: d.name,
    uuid: d.uuid,
    suspended: d.suspended,
    readOnly: d.readOnly,
    readAhead: DM_DEFAULT_READ_AHEAD,
    liveTable: d.hasLiveTable,
    inactiveTable: d.hasInactiveTable,
    openCount: d.openCount,
    eventNr: d.eventNr,
    major: d.major,
    minor: d.minor,
    targetCount: d.liveTable?.entries.length ?? 0,
  };
}

/** DmControl over a DeviceRegistry in this process. */
export class InProcessDmControl implements DmControl {
  readonly registry: DeviceRegistry;

  constructor(registry: DeviceRegistry) {
    this.registry = registry;
  }

  async create(name: string, opts: { table?: string; uuid?: string; readOnly?: boolean } = {}): Promise<void> {
    await this.registry.create(name, opts);
  }
  remove(name: string, opts?: { force?: boolean }): Promise<void> {
    return this.registry.remove(name, opts);
  }
  load(name: string, table: string): Promise<void> {
    return this.registry.load(name, table);
  }
  clear(name: string): Promise<void> {
    return this.registry.clear(name);
  }
  suspend(name: string, opts?: { noflush?: boolean }): Promise<void> {
    return this.registry.suspend(name, opts);
  }
  resume(name: string): Promise<void> {
    return this.registry.resume(name);
  }
  rename(oldName: string, newName: string): Promise<void> {
    return this.registry.rename(oldName, newName);
  }
  #select(name?: string): MappedDevice[] {
    return name === undefined ? this.registry.list() : [this.registry.get(name)];
  }
  async table(name?: string, opts: { showKeys?: boolean } = {}): Promise<DmLines[]> {
    return this.#select(name).map((d) => ({
      name: d.name,
      lines: d.liveTable?.format('table', opts.showKeys ?? false) ?? [],
    }));
  }
  async status(name?: string): Promise<DmLines[]> {
    return this.#select(name).map((d) => ({ name: d.name, lines: d.liveTable?.format('status', false) ?? [] }));
  }
  async info(name?: string): Promise<DmInfo[]> {
    return this.#select(name).map(infoOf);
  }
  async ls(): Promise<DmListEntry[]> {
    return this.registry.list().map((d) => ({ name: d.name, major: d.major, minor: d.minor }));
  }
  message(name: string, sector: number, message: string[]): Promise<string> {
    return this.registry.message(name, sector, message);
  }
}

/** One `dmsetup info` block, ending with the blank line dmsetup prints after each device. */
export function formatInfo(i: DmInfo): string {
  const tables =
    !i.liveTable && !i.inactiveTable
      ? 'None'
      : `${i.liveTable ? 'LIVE' : ''}${i.liveTable && i.inactiveTable ? ' & ' : ''}${i.inactiveTable ? 'INACTIVE' : ''}`;
  let s = `Name:              ${i.name}\n`;
  s += `State:             ${i.suspended ? 'SUSPENDED' : 'ACTIVE'}${i.readOnly ? ' (READ-ONLY)' : ''}\n`;
  s += `Read Ahead:        ${i.readAhead}\n`;
  s += `Tables present:    ${tables}\n`;
  s += `Open count:        ${i.openCount}\n`;
  s += `Event number:      ${i.eventNr}\n`;
  s += `Major, minor:      ${i.major}, ${i.minor}\n`;
  s += `Number of targets: ${i.targetCount}\n`;
  if (i.uuid !== '') s += `UUID: ${i.uuid}\n`;
  return s + '\n';
}

/** `dmsetup ls`: `name\t(major:minor)` lines, or "No devices found". */
export function formatLs(list: readonly DmListEntry[]): string {
  if (list.length === 0) return 'No devices found\n';
  return list.map((d) => `${d.name}\t(${d.major}:${d.minor})\n`).join('');
}

/**
 * `dmsetup table|status`: with `prefixNames` (no device named on the command line) every line is
 * prefixed `name: `; a device without a live table prints an empty line, as dmsetup does.
 */
export function formatLines(devs: readonly DmLines[], prefixNames: boolean): string {
  if (prefixNames && devs.length === 0) return 'No devices found\n';
  let s = '';
  for (const d of devs) {
    const prefix = prefixNames ? `${d.name}: ` : '';
    if (d.lines.length === 0) s += `${prefix}\n`;
    for (const l of d.lines) s += `${prefix}${l}\n`;
  }
  return s;
}
