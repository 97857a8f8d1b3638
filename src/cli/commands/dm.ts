/**
 * `cryptmap dm <verb>`: dmsetup's verbs and argument forms (lvm2 dmsetup(8)) over a DmControl.
 *
 *   create NAME [-u UUID] [-r] [--table 'LINES' | -n | TABLE_FILE]   (table on stdin otherwise)
 *   remove [-f] NAME...        load|reload NAME [--table 'LINES' | TABLE_FILE]   clear NAME
 *   suspend [--noflush] NAME   resume NAME   rename OLD NEW
 *   table [--showkeys] [NAME]  status [NAME]  info [NAME]  ls   message NAME SECTOR MSG...
 *   (table, status, info and ls take --json: docs/json.md)
 *
 * Devices live in the daemon: the CLI talks to it over the control socket; when no daemon runs,
 * the verb reports so and exits 1. Tests call `runDm(argv, io, control)` with an in-process DmControl.
 * In table text given with --table, `;` separates lines, as in dmsetup.
 */
import { readFile } from 'node:fs/promises';
import { type ParseArgsConfig, parseArgs } from 'node:util';
import { DAEMON_NOT_RUNNING } from '../../control/client.js';
import { remoteDmControl } from '../../control/dm-remote.js';
import { type DmControl, type DmLines, formatInfo, formatLines, formatLs } from '../../dm/control.js';
import { CryptmapError, EXIT_WRONG_PARAMS } from '../../util/errors.js';
import { reportError } from '../main.js';
import { connectDaemon } from '../daemon-client.js';
import type { CliIO, VerbMain } from '../types.js';

const USAGE = `usage: cryptmap dm <command> [options] [args]
  create NAME [-u|--uuid UUID] [-r|--readonly] [--table 'TABLE' | -n|--notable | TABLE_FILE]
  remove [-f|--force] NAME...
  load|reload NAME [--table 'TABLE' | TABLE_FILE]
  clear NAME
  suspend [--noflush] NAME
  resume NAME
  rename OLD NEW
  table [--showkeys] [--json] [NAME]
  status [--json] [NAME]
  info [--json] [NAME]
  ls [--json]
  message NAME SECTOR MESSAGE...
Tables are read from standard input when neither --table nor a file is given; in --table text
';' separates lines. Sectors are 512 bytes.`;

export { DAEMON_NOT_RUNNING };

function usageError(message: string): CryptmapError {
  return new CryptmapError('EARGS', `${message}\n${USAGE}`, { exitCode: EXIT_WRONG_PARAMS });
}

async function readStdin(io: CliIO): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const c of io.stdin) chunks.push(Buffer.isBuffer(c) ? c : Buffer.from(String(c)));
  return Buffer.concat(chunks).toString('utf8');
}

/** The table text for create/load: --table, a table file, or stdin. */
async function tableText(io: CliIO, table: string | undefined, file: string | undefined): Promise<string> {
  if (table !== undefined && file !== undefined)
    throw usageError('give the table either with --table or as a file, not both');
  if (table !== undefined) return table.split(';').join('\n');
  if (file !== undefined) {
    try {
      return await readFile(file, 'utf8');
    } catch (e) {
      throw new CryptmapError('EOPEN', `cannot read table file ${file}: ${(e as Error).message}`, { exitCode: 4 });
    }
  }
  return readStdin(io);
}

/**
 * `dm table|status --json`: each device's lines split as dmsetup prints them, `<start> <length>
 * <target type> <params>` (512-byte sectors; params verbatim, keys hidden unless --showkeys).
 */
function linesJson(devs: readonly DmLines[]): string {
  const devices = devs.map((d) => ({
    name: d.name,
    targets: d.lines.map((line) => {
      const m = /^(\d+) (\d+) (\S+) ?(.*)$/.exec(line);
      return m
        ? { start: Number(m[1]), length: Number(m[2]), targetType: m[3]!, params: m[4]! }
        : { start: 0, length: 0, targetType: '', params: line };
    }),
  }));
  return `${JSON.stringify({ devices }, null, 2)}\n`;
}

function parse(args: string[], options: ParseArgsConfig['options'], minPos: number, maxPos: number, what: string) {
  let r: ReturnType<typeof parseArgs>;
  try {
    r = parseArgs({ args, options: options ?? {}, allowPositionals: true, strict: true });
  } catch (e) {
    throw usageError(`${what}: ${(e as Error).message}`);
  }
  if (r.positionals.length < minPos) throw usageError(`${what}: missing argument`);
  if (r.positionals.length > maxPos) throw usageError(`${what}: unexpected argument '${r.positionals[maxPos]}'`);
  return r as { values: Record<string, string | boolean | undefined>; positionals: string[] };
}

/**
 * Run a dm command. `argv[0]` is the verb `dm`, `argv[1]` the dmsetup command. With a null control
 * (no daemon), arguments are still checked, then the daemon-not-running message is printed.
 */
export async function runDm(argv: string[], io: CliIO, control: DmControl | null | DmConnector): Promise<number> {
  let session: { control: DmControl; close(): void } | null = null;
  const need = async (): Promise<DmControl> => {
    if (control !== null && typeof control === 'object' && 'connect' in control) {
      session ??= await control.connect();
      return session.control;
    }
    if (control === null) throw new CryptmapError('EDAEMON_DOWN', DAEMON_NOT_RUNNING, { exitCode: 1 });
    return control;
  };
  try {
    return await dispatch(argv.slice(1), io, need);
  } catch (e) {
    return reportError(e, io);
  } finally {
    (session as { close(): void } | null)?.close();
  }
}

/** Connects to a DmControl only when a command needs one (usage errors never connect). */
export interface DmConnector {
  connect(): Promise<{ control: DmControl; close(): void }>;
}

async function dispatch(args: string[], io: CliIO, need: () => Promise<DmControl>): Promise<number> {
  const cmd = args[0];
  const rest = args.slice(1);
  if (cmd === undefined || cmd === '--help' || cmd === '-h' || cmd === 'help') {
    io.stdout.write(USAGE + '\n');
    return cmd === undefined ? EXIT_WRONG_PARAMS : 0;
  }
  switch (cmd) {
    case 'create': {
      const { values, positionals } = parse(
        rest,
        {
          uuid: { type: 'string', short: 'u' },
          table: { type: 'string' },
          notable: { type: 'boolean', short: 'n' },
          readonly: { type: 'boolean', short: 'r' },
        },
        1,
        2,
        'create',
      );
      const [name, file] = positionals as [string, string | undefined];
      if (values.notable && (values.table !== undefined || file !== undefined))
        throw usageError('create: --notable excludes a table');
      const c = await need();
      const table = values.notable ? undefined : await tableText(io, values.table as string | undefined, file);
      await c.create(name, { table, uuid: values.uuid as string | undefined, readOnly: values.readonly === true });
      return 0;
    }
    case 'remove': {
      const { values, positionals } = parse(
        rest,
        { force: { type: 'boolean', short: 'f' } },
        1,
        Number.POSITIVE_INFINITY,
        'remove',
      );
      const c = await need();
      for (const n of positionals) await c.remove(n, { force: values.force === true });
      return 0;
    }
    case 'load':
    case 'reload': {
      const { values, positionals } = parse(rest, { table: { type: 'string' } }, 1, 2, cmd);
      const [name, file] = positionals as [string, string | undefined];
      const c = await need();
      await c.load(name, await tableText(io, values.table as string | undefined, file));
      return 0;
    }
    case 'clear':
    case 'resume': {
      const { positionals } = parse(rest, {}, 1, 1, cmd);
      const c = await need();
      await (cmd === 'clear' ? c.clear(positionals[0]!) : c.resume(positionals[0]!));
      return 0;
    }
    case 'suspend': {
      const { values, positionals } = parse(rest, { noflush: { type: 'boolean' } }, 1, 1, 'suspend');
      await (await need()).suspend(positionals[0]!, { noflush: values.noflush === true });
      return 0;
    }
    case 'rename': {
      const { positionals } = parse(rest, {}, 2, 2, 'rename');
      await (await need()).rename(positionals[0]!, positionals[1]!);
      return 0;
    }
    case 'table': {
      const { values, positionals } = parse(
        rest,
        { showkeys: { type: 'boolean' }, json: { type: 'boolean' } },
        0,
        1,
        'table',
      );
      const name = positionals[0];
      const devs = await (await need()).table(name, { showKeys: values.showkeys === true });
      io.stdout.write(values.json ? linesJson(devs) : formatLines(devs, name === undefined));
      return 0;
    }
    case 'status': {
      const { values, positionals } = parse(rest, { json: { type: 'boolean' } }, 0, 1, 'status');
      const name = positionals[0];
      const devs = await (await need()).status(name);
      io.stdout.write(values.json ? linesJson(devs) : formatLines(devs, name === undefined));
      return 0;
    }
    case 'info': {
      const { values, positionals } = parse(rest, { json: { type: 'boolean' } }, 0, 1, 'info');
      const list = await (await need()).info(positionals[0]);
      if (values.json) io.stdout.write(`${JSON.stringify({ devices: list }, null, 2)}\n`);
      else io.stdout.write(list.length === 0 ? 'No devices found\n' : list.map(formatInfo).join(''));
      return 0;
    }
    case 'ls': {
      const { values } = parse(rest, { json: { type: 'boolean' } }, 0, 0, 'ls');
      const list = await (await need()).ls();
      io.stdout.write(values.json ? `${JSON.stringify({ devices: list }, null, 2)}\n` : formatLs(list));
      return 0;
    }
    case 'message': {
      // Raw positionals: message words may start with '-'.
      if (rest.length < 3) throw usageError('message: expected NAME SECTOR MESSAGE...');
      const [name, sectorArg, ...msg] = rest as [string, string, ...string[]];
      if (!/^[0-9]+$/.test(sectorArg) || !Number.isSafeInteger(Number(sectorArg)))
        throw usageError(`message: SECTOR '${sectorArg}' is not an unsigned decimal number`);
      const reply = await (await need()).message(name, Number(sectorArg), msg);
      if (reply !== '') io.stdout.write(reply.endsWith('\n') ? reply : reply + '\n');
      return 0;
    }
    default:
      throw usageError(`unknown dm command '${cmd}'`);
  }
}

/**
 * The CLI entry: commands go to the daemon's registry over its control socket (runtime dir from
 * `--runtime-dir DIR` anywhere on the line, else CRYPTMAP_RUNTIME_DIR, else /run/cryptmap). Without a
 * daemon: the daemon-not-running message, exit 1. Paths in tables are opened by the daemon, so give
 * absolute paths.
 */
const dmMain: VerbMain = (argv, io) => {
  let dirFlag: string | undefined;
  const args: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--runtime-dir' && i + 1 < argv.length) dirFlag = argv[++i];
    else if (a.startsWith('--runtime-dir=')) dirFlag = a.slice('--runtime-dir='.length);
    else args.push(a);
  }
  return runDm(args, io, {
    async connect() {
      const c = await connectDaemon(dirFlag, io.env);
      return { control: remoteDmControl(c), close: () => c.close() };
    },
  });
};
export default dmMain;
