/**
 * Device-mapper tables in dmsetup's syntax (dmsetup(8) TABLE FORMAT; kernel dm-table.c):
 *
 *   <logical_start_sector> <num_sectors> <target_type> <target_args...>
 *
 * one line per target, 512-byte sectors, the first target at sector 0, each next one starting where
 * the previous ended (no gaps, no overlaps), no zero-length targets. Blank lines and lines whose
 * first non-blank character is `#` are skipped, as dmsetup does. Arguments are separated by
 * whitespace. Parsing is strict; every error names the line (and the argument when there is one).
 *
 * `parseTable` gives the syntax; `Table.build` runs the target constructors (all or nothing: a
 * failure disposes what was built and releases every opened device through one cleanup path).
 */
import type { BlockDevice, BlockDeviceLimits } from '../blockdev/types.js';
import { CryptmapError, type ErrorCode } from '../util/errors.js';
import { parseUint } from '../util/bytes.js';
import type { KeyStore, TargetCapabilities, TargetContext, TargetInstance, TargetType } from './types.js';

/** Largest table in sectors: byte offsets must stay safe integers. */
export const MAX_TABLE_SECTORS = Math.floor(Number.MAX_SAFE_INTEGER / 512);

/** One parsed dmsetup table line: where it maps, the target type and its arguments. */
export interface TableLine {
  /** 1-based line number in the source text (for messages). */
  line: number;
  startSectors: number;
  lengthSectors: number;
  target: string;
  args: string[];
}

export function tableError(line: number, message: string, code: ErrorCode = 'ETABLE'): CryptmapError {
  return new CryptmapError(code, `table line ${line}: ${message}`, { context: { line } });
}

/** Parse table text strictly into lines (syntax and layout only; targets check their own args). */
export function parseTable(text: string): TableLine[] {
  const out: TableLine[] = [];
  let next = 0;
  const src = text.split('\n');
  for (let i = 0; i < src.length; i++) {
    const raw = src[i]!.replace(/\r$/, '');
    const trimmed = raw.trim();
    if (trimmed === '' || trimmed.startsWith('#')) continue;
    const line = i + 1;
    const words = trimmed.split(/[ \t]+/);
    if (words.length < 3) throw tableError(line, `expected '<start> <length> <target> [<args>...]', got '${trimmed}'`);
    const [s, l, target, ...args] = words as [string, string, string, ...string[]];
    let startSectors: number;
    let lengthSectors: number;
    try {
      startSectors = parseUint(s, '<start>', MAX_TABLE_SECTORS);
      lengthSectors = parseUint(l, '<length>', MAX_TABLE_SECTORS);
    } catch (e) {
      throw tableError(line, (e as Error).message);
    }
    if (lengthSectors === 0) throw tableError(line, '<length> must not be zero');
    if (startSectors !== next) {
      throw out.length === 0
        ? tableError(line, `<start> ${startSectors}: the first target must start at sector 0`)
        : startSectors > next
          ? tableError(
              line,
              `<start> ${startSectors} leaves a gap after the previous target, which ends at sector ${next}`,
            )
          : tableError(line, `<start> ${startSectors} overlaps the previous target, which ends at sector ${next}`);
    }
    next = startSectors + lengthSectors;
    if (next > MAX_TABLE_SECTORS) throw tableError(line, `the table is larger than ${MAX_TABLE_SECTORS} sectors`);
    if (!/^[A-Za-z0-9_-]+$/.test(target)) throw tableError(line, `<target> '${target}' is not a valid target name`);
    out.push({ line, startSectors, lengthSectors, target, args });
  }
  if (out.length === 0) throw new CryptmapError('ETABLE', 'the table is empty (no target lines)');
  return out;
}

/** One canonical table line (no trailing newline). Params may be empty, as for zero and error. */
export function formatTableLine(startSectors: number, lengthSectors: number, target: string, params: string): string {
  return `${startSectors} ${lengthSectors} ${target} ${params}`;
}

/** A target placed in a table. */
export interface TableEntry {
  readonly line: number;
  readonly startSectors: number;
  readonly lengthSectors: number;
  readonly startBytes: number;
  readonly endBytes: number;
  readonly type: TargetType;
  readonly instance: TargetInstance;
}

/** How the table reaches devices: supplied by the registry. */
export interface TableEnvironment {
  targets: Readonly<Record<string, TargetType>>;
  keyStore: KeyStore | undefined;
  /** Open `<dev>` for a table; returns the device and a release function. */
  openDevice(
    arg: string,
    line: number,
    argDescription: string,
    readOnly?: boolean,
  ): Promise<{ device: BlockDevice; release: () => Promise<void>; mapped?: unknown }>;
  /** The mapped device the table is built for (opaque; handed to targets as TargetContext.owner). */
  owner?: object;
  /** Raise a dm event on that device. */
  event?: () => void;
}

/** A constructed table: targets plus what they hold open. */
export class Table {
  readonly entries: readonly TableEntry[];
  readonly sizeBytes: number;
  readonly capabilities: TargetCapabilities & { fua: boolean; blockStatus: boolean };
  readonly limits: BlockDeviceLimits;
  /** Mapped devices this table uses (opaque here; the registry uses them for loop detection). */
  readonly mappedDeps: ReadonlySet<unknown>;
  /** Start offsets, for binary search. */
  readonly #starts: number[];
  #releases: (() => Promise<void>)[];
  #disposed = false;

  private constructor(entries: TableEntry[], releases: (() => Promise<void>)[], mappedDeps: Set<unknown>) {
    this.entries = entries;
    this.#releases = releases;
    this.mappedDeps = mappedDeps;
    this.#starts = entries.map((e) => e.startBytes);
    const last = entries[entries.length - 1]!;
    this.sizeBytes = last.endBytes;
    const all = (f: (c: TargetCapabilities) => boolean) => entries.every((e) => f(e.instance.capabilities));
    const flush = entries.some((e) => e.instance.capabilities.flush);
    this.capabilities = {
      write: all((c) => c.write),
      flush,
      fua: flush,
      discard: all((c) => c.discard),
      writeZeroes: all((c) => c.writeZeroes),
      multiConn: all((c) => c.multiConn),
      blockStatus: entries.every((e) => e.instance.blockStatus !== undefined),
    };
    let lbs = 512;
    let pbs = 512;
    let max = 64 << 20;
    for (const e of entries) {
      lbs = Math.max(lbs, e.instance.limits.logicalBlockBytes);
      pbs = Math.max(pbs, e.instance.limits.physicalBlockBytes);
      max = Math.min(max, e.instance.limits.maxRequestBytes);
    }
    max -= max % lbs;
    this.limits = {
      logicalBlockBytes: lbs,
      physicalBlockBytes: Math.max(pbs, lbs),
      maxRequestBytes: Math.max(max, lbs),
    };
  }

  /** Construct every target (all or nothing). */
  static async build(lines: readonly TableLine[], env: TableEnvironment): Promise<Table> {
    const entries: TableEntry[] = [];
    const releases: (() => Promise<void>)[] = [];
    const mappedDeps = new Set<unknown>();
    const mappedOf = new Map<BlockDevice, unknown>();
    try {
      for (const l of lines) {
        const type = env.targets[l.target];
        if (type === undefined) {
          throw tableError(
            l.line,
            `unknown target type '${l.target}' (known: ${Object.keys(env.targets).sort().join(', ')})`,
            'ETARGET',
          );
        }
        const ctx: TargetContext = {
          line: l.line,
          targetName: l.target,
          startSectors: l.startSectors,
          lengthSectors: l.lengthSectors,
          keyStore: env.keyStore,
          openDevice: async (arg, argName, opts) => {
            const r = await env.openDevice(arg, l.line, `${l.target} <${argName}>`, opts?.readOnly === true);
            releases.push(r.release);
            if (r.mapped !== undefined) {
              mappedDeps.add(r.mapped);
              mappedOf.set(r.device, r.mapped);
            }
            return r.device;
          },
          mappedOf: (d) => mappedOf.get(d) as object | undefined,
          ...(env.owner !== undefined ? { owner: env.owner } : {}),
          ...(env.event !== undefined ? { event: env.event } : {}),
          error: (argName, message, code = 'ETABLE') =>
            tableError(l.line, `${l.target} <${argName}>: ${message}`, code),
        };
        const instance = await type.ctr(l.args, ctx);
        entries.push({
          line: l.line,
          startSectors: l.startSectors,
          lengthSectors: l.lengthSectors,
          startBytes: l.startSectors * 512,
          endBytes: (l.startSectors + l.lengthSectors) * 512,
          type,
          instance,
        });
      }
      const table = new Table(entries, releases, mappedDeps);
      const lbsSectors = table.limits.logicalBlockBytes / 512;
      for (const e of entries) {
        if (e.startSectors % lbsSectors !== 0 || e.lengthSectors % lbsSectors !== 0) {
          throw tableError(
            e.line,
            `${e.type.name}: <start> and <length> must be multiples of the table's logical block size (${table.limits.logicalBlockBytes} bytes = ${lbsSectors} sectors)`,
          );
        }
      }
      return table;
    } catch (e) {
      for (const en of entries) en.instance.dispose();
      for (const r of releases.reverse()) await r().catch(() => {});
      throw e;
    }
  }

  /** Index of the entry holding byte `offsetBytes` (must be < sizeBytes). */
  find(offsetBytes: number): number {
    const s = this.#starts;
    let lo = 0;
    let hi = s.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >>> 1;
      if (s[mid]! <= offsetBytes) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  }

  /** The table as dmsetup prints it (`table` or `status`), one line per target. */
  format(kind: 'table' | 'status', showKeys: boolean): string[] {
    return this.entries.map((e) =>
      formatTableLine(e.startSectors, e.lengthSectors, e.type.name, e.instance.status(kind, showKeys)),
    );
  }

  /** Dispose targets and release devices; idempotent. */
  async dispose(): Promise<void> {
    if (this.#disposed) return;
    this.#disposed = true;
    for (const e of this.entries) e.instance.dispose();
    const rs = this.#releases.reverse();
    this.#releases = [];
    for (const r of rs) await r().catch(() => {});
  }
}
