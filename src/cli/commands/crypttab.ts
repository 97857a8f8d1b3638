/**
 * `cryptmap crypttab open|close [--file F] [--runtime-dir DIR] [NAME...]`: systemd's crypttab(5)
 * (parsed by activate/crypttab.ts) through the daemon, as systemd-cryptsetup does with the kernel.
 *
 * open: for each entry named (default: every entry without `noauto`), resolve the device
 * (`UUID=`, `PARTUUID=`, `LABEL=`, `PARTLABEL=` through /dev/disk/by-*) and the key (key file,
 * `/dev/urandom`, `none` = cryptsetup-keys.d or a typed passphrase), unlock or describe the mapping
 * in this process and send it to the daemon (`volume.open`, like `cryptmap open`). `swap` and `tmp`
 * entries are then attached and get mkswap / mkfs (needs root and a way to attach). An entry that is
 * already active is left alone. `nofail` entries report their errors without failing the command.
 * close: detach (when attached) and close each entry's mapping.
 */
import { runTool } from '../../util/tools.js';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { type CrypttabEntry, parseCrypttab, plainParams, resolveCrypttabKey } from '../../activate/crypttab.js';
import { type CryptMapping, prepareLuks, preparePlain } from '../../activate/mapping.js';
import type { ControlClient } from '../../control/client.js';
import type { SectorBytes } from '../../engine/types.js';
import { CryptmapError, EXIT_WRONG_PARAMS, fromSystemError, isCryptmapError } from '../../util/errors.js';
import { Secret } from '../../util/secret.js';
import { withDaemon } from '../daemon-client.js';
import type { CliIO, VerbMain } from '../types.js';
import { getPassphrase } from './terminal-input.js';
import { sendOpen } from './open.js';

export const DEFAULT_CRYPTTAB = '/etc/crypttab';
const USAGE = 'usage: cryptmap crypttab open|close [--file F] [--runtime-dir DIR] [NAME...]';

const BY_DIR: Record<string, string> = {
  uuid: '/dev/disk/by-uuid',
  partuuid: '/dev/disk/by-partuuid',
  label: '/dev/disk/by-label',
  partlabel: '/dev/disk/by-partlabel',
};

function devicePath(e: CrypttabEntry): string {
  if (e.device.kind === 'path') return e.device.path;
  return join(BY_DIR[e.device.kind]!, e.device.value);
}

async function prepare(e: CrypttabEntry, io: CliIO): Promise<{ mapping: CryptMapping; volumeKey: Secret }> {
  const device = devicePath(e);
  const askPassphrase = async (prompt: string) => new Secret(await getPassphrase(io, prompt));
  const tries = e.key.kind === 'prompt' && io.stdin.isTTY ? e.tries || Number.POSITIVE_INFINITY : 1;
  for (let i = 0; ; i++) {
    const key = await resolveCrypttabKey(e, { askPassphrase });
    if (key.kind === 'passphrase') {
      try {
        const o: Parameters<typeof prepareLuks>[0] = {
          name: e.name,
          device,
          passphrase: key.passphrase.expose(),
          readOnly: e.readonly,
        };
        if (e.header !== undefined) o.header = e.header;
        if (e.keySlot !== undefined) o.keySlot = e.keySlot;
        const r = await prepareLuks(o);
        Object.assign(r.mapping, e.flags);
        return r;
      } catch (err) {
        if (!isCryptmapError(err, 'ENOKEY') || i + 1 >= tries) throw err;
        io.stderr.write(`${err.message}\n`);
      } finally {
        key.passphrase.dispose();
      }
      continue;
    }
    const p = plainParams(e);
    try {
      const mapping = await preparePlain({
        name: e.name,
        device,
        key: key.key,
        cipher: p.cipher,
        sectorBytes: p.sectorSize as SectorBytes,
        offsetSectors: p.offsetSectors,
        skipSectors: p.skipSectors,
        readOnly: e.readonly,
      });
      Object.assign(mapping, e.flags);
      return { mapping, volumeKey: key.key };
    } catch (err) {
      key.key.dispose();
      throw err;
    }
  }
}

async function openEntry(c: ControlClient, e: CrypttabEntry, io: CliIO): Promise<void> {
  const st = await c.call('volume.status', { name: e.name });
  if (st.active) {
    io.stdout.write(`${e.name}: already active\n`);
    return;
  }
  const { mapping, volumeKey } = await prepare(e, io);
  const opened = await sendOpen(c, mapping, volumeKey);
  let where = opened.nbdUri;
  if (e.type === 'swap' || e.type === 'tmp') {
    try {
      const info = await c.call('attach', { name: e.name });
      where = info.devicePath;
      if (e.type === 'swap') await runTool('mkswap', [info.devicePath]);
      else await runTool(`mkfs.${e.tmpFilesystem ?? 'ext4'}`, ['-q', '-F', info.devicePath]);
    } catch (err) {
      await c.call('volume.close', { name: e.name, force: true }).catch(() => {});
      throw err;
    }
  }
  io.stdout.write(`${e.name}: opened (${mapping.type.toLowerCase()}), ${where}\n`);
}

async function closeEntry(c: ControlClient, name: string, io: CliIO): Promise<void> {
  const st = await c.call('volume.status', { name });
  if (!st.active) {
    io.stdout.write(`${name}: not active\n`);
    return;
  }
  if (st.attachedDevice) await c.call('detach', { name });
  await c.call('volume.close', { name });
  io.stdout.write(`${name}: closed\n`);
}

function parse(argv: string[]) {
  try {
    return parseArgs({
      args: argv.slice(1),
      options: { file: { type: 'string' }, 'runtime-dir': { type: 'string' }, help: { type: 'boolean', short: 'h' } },
      allowPositionals: true,
      strict: true,
    });
  } catch (e) {
    throw new CryptmapError('EARGS', `${(e as Error).message}\n${USAGE}`, { exitCode: EXIT_WRONG_PARAMS });
  }
}

const crypttab: VerbMain = async (argv, io) => {
  const parsed = parse(argv);
  const { values: v, positionals } = parsed;
  if (v.help) {
    io.stdout.write(`${USAGE}\n`);
    return 0;
  }
  const [action, ...names] = positionals;
  if (action !== 'open' && action !== 'close') throw new CryptmapError('EARGS', USAGE, { exitCode: EXIT_WRONG_PARAMS });
  const file = v.file ?? DEFAULT_CRYPTTAB;
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (e) {
    throw fromSystemError('ECRYPTTAB', `cannot read ${file}`, e);
  }
  const entries = parseCrypttab(text, file);
  for (const n of names) {
    if (!entries.some((e) => e.name === n))
      throw new CryptmapError('ECRYPTTAB', `${file} has no entry '${n}'`, { exitCode: EXIT_WRONG_PARAMS });
  }
  const chosen = names.length > 0 ? entries.filter((e) => names.includes(e.name)) : entries.filter((e) => !e.noauto);
  let failed = 0;
  await withDaemon(v['runtime-dir'], io.env, async (c) => {
    for (const e of action === 'open' ? chosen : [...chosen].reverse()) {
      try {
        if (action === 'open') await openEntry(c, e, io);
        else await closeEntry(c, e.name, io);
      } catch (err) {
        io.stderr.write(
          `${e.name}: ${err instanceof Error ? err.message : String(err)}${e.nofail ? ' (nofail: ignored)' : ''}\n`,
        );
        if (!e.nofail) failed++;
      }
    }
  });
  return failed > 0 ? 1 : 0;
};

export default crypttab;
