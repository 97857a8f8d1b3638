/**
 * Header-level verbs with cryptsetup's syntax (cryptsetup(8)): luksUUID [--uuid], isLuks [--type],
 * luksHeaderBackup / luksHeaderRestore --header-backup-file, config --label --subsystem --priority,
 * repair, convert --type luks1|luks2, erase (luksErase), token add|remove|import|export|unassign.
 */
import { readFile } from 'node:fs/promises';
import type { BlockDevice } from '../../blockdev/types.js';
import {
  convertLuks1ToLuks2,
  convertLuks2ToLuks1,
  detectLuks,
  headerBackup,
  headerRestore,
  inReencryption,
  Luks1Volume,
  reencryptDigestMissing,
  takeReencryptLock,
  upgradeReencryptMetadata,
  type Luks2Volume,
  type RestorePlan,
  unlockReencryptKeys,
  unmetReencryptRequirement,
  verifyReencryptDigest,
  withDeviceLock,
} from '../../luks/index.js';
import { CryptmapError, isCryptmapError, EXIT_BUSY, EXIT_NO_PERMISSION, EXIT_WRONG_PARAMS } from '../../util/errors.js';
import { openInDaemon } from '../daemon-client.js';
import type { CliIO, VerbMain } from '../types.js';
import {
  closeQuietly,
  headerPath,
  intOpt,
  keyFileSource,
  type LuksArgs,
  needDevice,
  openDevice,
  parseLuksArgs,
} from './luks-common.js';
import { loadLuks, loadLuksForRead, openReencryptKeys, recoverLoaded } from './luks-unlock.js';
import { confirm, getPassphrase } from './terminal-input.js';

function needLuks2<T extends { type: string }>(vol: T, what: string): asserts vol is T & Luks2Volume {
  if (vol.type !== 'luks2')
    throw new CryptmapError('EARGS', `${what} is supported only for LUKS2 devices.`, { exitCode: EXIT_WRONG_PARAMS });
}

async function readStdin(io: CliIO): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const c of io.stdin as AsyncIterable<Buffer | string>)
    chunks.push(typeof c === 'string' ? Buffer.from(c) : c);
  return Buffer.concat(chunks).toString('utf8');
}

async function token(io: CliIO, v: LuksArgs, positionals: string[]): Promise<number> {
  const action = positionals[0];
  const device = positionals[1];
  if (!action || !device)
    throw new CryptmapError(
      'EARGS',
      'Usage: cryptmap token <add|remove|import|export|unassign> <device> [--token-id N] [--key-slot N] [--key-description D] [--json-file FILE]',
      { exitCode: EXIT_WRONG_PARAMS },
    );
  // cryptsetup verify_token: usage errors before the device is looked at.
  const usage = (m: string) => new CryptmapError('EARGS', m, { exitCode: EXIT_WRONG_PARAMS });
  if (!['add', 'remove', 'import', 'export', 'unassign'].includes(action)) throw usage('Invalid token action.');
  if (action === 'add' && v['key-description'] === undefined)
    throw usage('--key-description parameter is mandatory for token add action.');
  if ((action === 'remove' || action === 'export') && v['token-id'] === undefined)
    throw usage('Action requires specific token. Use --token-id parameter.');
  if (v.unbound && action !== 'add') throw usage('Option --unbound is valid only with token add action.');
  if (v.unbound && v['key-slot'] !== undefined) throw usage('Options --key-slot and --unbound cannot be combined.');
  if (action === 'unassign' && v['key-slot'] === undefined)
    throw usage('Action requires specific keyslot. Use --key-slot parameter.');
  if (action === 'unassign' && v['token-id'] === undefined)
    throw usage('Action requires specific token. Use --token-id parameter.');
  const id = action === 'unassign' ? intOpt(v['token-id'], '--token-id') : intOpt(v['token-id'], '--token-id', 0, 31);
  const slot = intOpt(v['key-slot'], '--key-slot');
  const hdr = headerPath(v, device);
  const dev = await openDevice(hdr, action !== 'export');
  try {
    return await withDeviceLock(hdr, async () => {
      const vol = await loadLuks(dev, hdr);
      needLuks2(vol, 'Tokens');
      if (action !== 'export') await recoverLoaded(vol, hdr, false);
      if (action === 'export') {
        if (id === undefined) throw usage('Action requires specific token. Use --token-id parameter.');
        let text: string;
        try {
          text = vol.exportToken(id);
        } catch (e) {
          throw new CryptmapError('ETOKEN', `Failed to get token ${id} for export.`, {
            exitCode: EXIT_WRONG_PARAMS,
            cause: e,
          });
        }
        io.stdout.write(text);
        return 0;
      }
      if (action === 'remove') {
        await vol.removeToken(id!);
        if (v.verbose) io.stdout.write(`Token ${id} removed.\nCommand successful.\n`);
        return 0;
      }
      if (action === 'add') {
        // A luks2-keyring token (cryptsetup _token_add): all keyslots, the one given, or none with --unbound.
        const got = await vol.addKeyringToken(v['key-description']!, {
          ...(id !== undefined ? { tokenId: id } : {}),
          ...(slot !== undefined ? { keySlot: slot } : {}),
          unbound: v.unbound === true,
        });
        if (v.verbose) io.stdout.write(`Token ${got} created.\nCommand successful.\n`);
        return 0;
      }
      if (action === 'unassign') {
        await vol.unassignToken(id!, slot!);
        if (v.verbose) io.stdout.write('Command successful.\n');
        return 0;
      }
      if (action === 'import') {
        const file = v['json-file'];
        const json =
          file && file !== '-'
            ? await readFile(file, 'utf8').catch((e) => {
                throw new CryptmapError('EJSONFILE', `Failed to open file ${file} in read-only mode.`, {
                  exitCode: EXIT_WRONG_PARAMS,
                  cause: e,
                });
              })
            : await readStdin(io);
        const got = await vol.importToken(json.trim(), id);
        if (v.verbose) io.stdout.write(`Token ${got} created.\n`);
        return 0;
      }
      throw new CryptmapError('EARGS', `Invalid token action ${action}.`, { exitCode: EXIT_WRONG_PARAMS });
    });
  } finally {
    await closeQuietly(dev);
  }
}

/**
 * cryptsetup convert --type luks1|luks2 (action_luksConvert): the header is loaded as crypt_load does,
 * the confirmation names the header device, and a volume the daemon has open is refused (exit 5).
 */
async function convert(
  io: CliIO,
  dev: BlockDevice,
  vol: Luks1Volume | Luks2Volume,
  hdr: string,
  v: LuksArgs,
): Promise<number> {
  const to = v.type as 'luks1' | 'luks2';
  if (vol.type === to)
    throw new CryptmapError('ECONVERT', `Device is already ${to.toUpperCase()} type.`, { exitCode: 1 });
  await confirm(io, `This operation will convert ${hdr} to ${to.toUpperCase()} format.\n`, v['batch-mode'], {
    fail: 'Operation aborted, device was NOT converted.\n',
    exitCode: EXIT_NO_PERMISSION,
  });
  // After the format checks, before any write, as cryptsetup's luks_header_in_use.
  const beforeWrite = async () => {
    if (await openInDaemon(io.env, vol.uuid, 'convert'))
      throw new CryptmapError('EBUSY', `Cannot convert device ${hdr} which is still in use.`, {
        exitCode: EXIT_BUSY,
        errno: 'EBUSY',
      });
  };
  if (to === 'luks2') await convertLuks1ToLuks2(dev, { beforeWrite });
  else await convertLuks2ToLuks1(dev, { beforeWrite });
  return 0;
}

/** Messages of LUKS1 repair that cryptsetup prints only with --verbose (the others are errors, always shown). */
const REPAIR_VERBOSE = new Set([
  'Repairing keyslots.',
  'Writing LUKS header to disk.',
  'No known problems detected for LUKS header.',
]);

async function repairLuks1(io: CliIO, dev: BlockDevice, v: LuksArgs): Promise<number> {
  await confirm(io, 'Really try to repair LUKS device header?', v['batch-mode']);
  const say = (msgs: string[]) => {
    for (const m of msgs) if (v.verbose || !REPAIR_VERBOSE.has(m)) io.stderr.write(`${m}\n`);
  };
  try {
    say((await Luks1Volume.repair(dev)).messages);
  } catch (e) {
    if (e instanceof CryptmapError && Array.isArray(e.context?.messages)) say(e.context.messages as string[]);
    throw e;
  }
  if (v.verbose) io.stdout.write('Command successful.\n');
  return 0;
}

const main: VerbMain = async (argv: string[], io: CliIO) => {
  // luksConfig is cryptsetup's old name for config.
  const verb = argv[0] === 'luksConfig' ? 'config' : argv[0]!;
  const { values: v, positionals } = parseLuksArgs(argv);
  if (verb === 'token') return token(io, v, positionals);
  const device = needDevice(positionals, `cryptmap ${verb} [OPTION...] <device>`);
  const hdr = headerPath(v, device);
  if (verb === 'convert' && v.type !== 'luks1' && v.type !== 'luks2')
    throw new CryptmapError('EARGS', 'Invalid LUKS type, only luks1 and luks2 are supported.', { exitCode: 1 });
  if (verb === 'isLuks') {
    let dev: Awaited<ReturnType<typeof openDevice>> | undefined;
    try {
      dev = await openDevice(hdr, false);
      const t = await detectLuks(dev);
      const code = t === null || (v.type && v.type !== t && v.type !== 'luks') ? 1 : 0;
      // --json (docs/json.md): the answer on stdout as well as in the exit code.
      if (v.json)
        io.stdout.write(
          `${JSON.stringify({ device: hdr, isLuks: t !== null, type: t, ...(v.type ? { typeMatches: code === 0 } : {}) })}\n`,
        );
      if (t === null && v.verbose) io.stderr.write(`Device ${hdr} is not a valid LUKS device.\n`);
      return code;
    } finally {
      await closeQuietly(dev);
    }
  }
  if (verb === 'luksUUID' && v.uuid === undefined) {
    // A read, loaded as cryptsetup's crypt_load does (with load-time recovery of a bad LUKS2 copy).
    const { dev, vol } = await loadLuksForRead(hdr, v);
    try {
      io.stdout.write(`${vol.uuid}\n`);
      return 0;
    } finally {
      await closeQuietly(dev);
    }
  }
  const write = verb !== 'luksHeaderBackup';
  const dev = await openDevice(hdr, write);
  try {
    const run = async (): Promise<number> => {
      if (verb === 'luksHeaderRestore') {
        const file = v['header-backup-file'];
        if (!file)
          throw new CryptmapError('EARGS', 'Option --header-backup-file is required.', { exitCode: EXIT_WRONG_PARAMS });
        const backup = await openDevice(file, false).catch((e) => {
          // cryptsetup says both, and exits 1 (-EINVAL), not 4.
          throw new CryptmapError(
            'EBACKUP',
            `${(e as Error).message}\nHeader backup file does not contain compatible LUKS header.`,
            { exitCode: 1, cause: e },
          );
        });
        try {
          await headerRestore(dev, backup, {
            backupPath: file,
            confirm: (plan) => {
              // cryptsetup's LUKS1 restore reads the device's header as LUKS1 and says what it found.
              if (plan.type === 'luks1' && plan.deviceType === 'luks2')
                io.stderr.write('Unsupported LUKS version 2.\n');
              // It says nothing more when the answer is no (exit 1).
              return confirm(io, restoreQuestion(hdr, plan), v['batch-mode'], { fail: '' });
            },
          });
        } finally {
          await closeQuietly(backup);
        }
        return 0;
      }
      if (verb === 'repair' && (await detectLuks(dev)) === 'luks1') return repairLuks1(io, dev, v);
      const vol = await loadLuks(dev, hdr);
      // Load-time recovery of a damaged LUKS2 copy, as cryptsetup's crypt_load (not for `repair`,
      // which rewrites both copies itself, nor for read-only verbs here).
      if (write && verb !== 'repair') await recoverLoaded(vol, hdr, false);
      switch (verb) {
        case 'luksUUID':
          if (v.uuid !== undefined) {
            await confirm(io, 'Do you really want to change UUID of device?', v['batch-mode'], {
              exitCode: EXIT_NO_PERMISSION,
            });
            await vol.setUuid(v.uuid);
          } else io.stdout.write(`${vol.uuid}\n`);
          return 0;
        case 'luksHeaderBackup': {
          const file = v['header-backup-file'];
          if (!file)
            throw new CryptmapError('EARGS', 'Option --header-backup-file is required.', {
              exitCode: EXIT_WRONG_PARAMS,
            });
          await headerBackup(dev, vol, file);
          return 0;
        }
        case 'config': {
          needLuks2(vol, 'Config');
          if (v.priority !== undefined) {
            const slot = intOpt(v['key-slot'], '--key-slot', 0, 31);
            if (slot === undefined)
              throw new CryptmapError('EARGS', 'Keyslot specification is required.', { exitCode: EXIT_WRONG_PARAMS });
            if (!['ignore', 'normal', 'prefer'].includes(v.priority))
              throw new CryptmapError('EARGS', 'Option --priority can be only ignore/normal/prefer.', {
                exitCode: EXIT_WRONG_PARAMS,
              });
            await vol.setPriority(slot, v.priority as 'ignore' | 'normal' | 'prefer');
          }
          // cryptsetup crypt_set_label(label, subsystem): the one not given is cleared.
          if (v.label !== undefined || v.subsystem !== undefined) await vol.setLabel(v.label ?? '', v.subsystem ?? '');
          return 0;
        }
        case 'repair':
          if (vol.type === 'luks2') {
            const j = (vol as Luks2Volume).jsonSnapshot();
            // A requirement cryptsetup does not know: its reencryption status is "invalid" (exit 1, silently).
            if (unmetReencryptRequirement(j) !== undefined)
              throw new CryptmapError('EREQUIREMENT', '', { exitCode: 1 });
            if (inReencryption(j)) return await repairReencryption(io, vol as Luks2Volume, v);
          }
          // As cryptsetup 2.6: a LUKS2 header that loads gets the load-time recovery only (a bad or
          // stale copy rewritten from the good one) and "No known problems"; the confirmation is
          // asked only to overwrite a damaged primary area that carries another format's signature.
          if (vol.type === 'luks2' && vol.needsRepair && (await vol.recoverHeader()) === null && vol.needsRepair) {
            await confirm(io, 'Really try to repair LUKS device header?', v['batch-mode']);
            await vol.recoverHeader({ force: true });
          }
          if (v.verbose) io.stderr.write('No known problems detected for LUKS header.\n');
          return 0;
        case 'convert':
          return convert(io, dev, vol, hdr, v);
        case 'erase':
        case 'luksErase':
          await confirm(
            io,
            `This operation will erase all keyslots on device ${hdr}.\nDevice will become unusable after this operation.`,
            v['batch-mode'],
            { fail: 'Operation aborted, keyslots were NOT wiped.\n', exitCode: EXIT_NO_PERMISSION },
          );
          {
            const active = vol.keyslots().filter((k) => k.active);
            await vol.erase();
            // cryptsetup -v names each keyslot it wiped.
            if (v.verbose)
              io.stdout.write(`${active.map((k) => `Key slot ${k.id} removed.\n`).join('')}Command successful.\n`);
          }
          return 0;
        default:
          throw new CryptmapError('EARGS', `Unknown verb ${verb}.`, { exitCode: EXIT_WRONG_PARAMS });
      }
    };
    return write ? await withDeviceLock(hdr, run) : await run();
  } finally {
    await closeQuietly(dev);
  }
};

/**
 * `repair` of a LUKS2 header in reencryption (cryptsetup 2.6 luks2_reencrypt_repair). Metadata without a
 * reencryption digest (legacy `online-reencrypt`, or the digest deleted) is upgraded once the user
 * confirms it is genuine: the passphrase must open both keys (their errors, with cryptsetup's words),
 * the digest is made and the requirement set to online-reencrypt-v2/v3, and the passphrase is then
 * checked against what was written. Otherwise the passphrase must open the keys of the reencryption
 * (else exit 2 or 1, silently) and the metadata must match its digest, else exit 2 ("Reencryption
 * metadata is invalid."); nothing is written. A crashed hotzone is recovered by `reencrypt
 * --resume-only` (cryptmap's resume recovers first).
 */
async function repairReencryption(io: CliIO, vol: Luks2Volume, v: LuksArgs): Promise<number> {
  const j = vol.jsonSnapshot();
  const passphrase = (prompt: string) => getPassphrase(io, prompt, keyFileSource(v));
  if (reencryptDigestMissing(j)) {
    await confirm(
      io,
      'Unprotected LUKS2 reencryption metadata detected. Please verify the reencryption operation is desirable (see luksDump output)\nand continue (upgrade metadata) only if you acknowledge the operation as genuine.',
      v['batch-mode'],
      { fail: 'Operation aborted.\n' },
    );
    const pass = await passphrase('Enter passphrase to protect and upgrade reencryption metadata: ');
    try {
      const lock = takeReencryptLock(vol.uuid, { env: io.env, disabled: v['disable-locks'] === true });
      try {
        await upgradeReencryptMetadata(vol, pass);
      } finally {
        lock.release();
      }
      const keys = await openReencryptKeys(vol, pass, v);
      keys.oldKey?.fill(0);
      keys.newKey?.fill(0);
    } finally {
      pass.fill(0);
    }
    return 0;
  }
  const crashed = Object.values(j.segments).some((s) => s.flags?.includes('in-reencryption'));
  if (crashed)
    await confirm(io, 'Really proceed with LUKS2 reencryption recovery?', v['batch-mode'], {
      fail: 'Operation aborted.\n',
    });
  const pass = await passphrase(
    crashed
      ? 'Enter passphrase for reencryption recovery: '
      : 'Enter passphrase to verify reencryption metadata digest: ',
  );
  try {
    // A passphrase that does not open both keys: cryptsetup 2.6's repair exits as the key lookup
    // answers (2 for a wrong passphrase, 1 for a keyslot it could not use), saying nothing.
    const keys = await unlockReencryptKeys(vol, pass).catch((e: unknown) => {
      if (isCryptmapError(e, 'ENOKEY') || isCryptmapError(e, 'EKEYSLOT'))
        throw new CryptmapError(e.code, '', { exitCode: e.exitCode, errno: e.errno, cause: e });
      throw e;
    });
    try {
      await verifyReencryptDigest(vol, keys);
    } finally {
      keys.oldKey?.fill(0);
      keys.newKey?.fill(0);
    }
  } finally {
    pass.fill(0);
  }
  return 0;
}

export default main;

/** cryptsetup 2.6's question before a header restore: what the device holds, then its warnings. */
function restoreQuestion(device: string, p: RestorePlan): string {
  const type = p.type === 'luks1' ? 'LUKS' : 'LUKS2';
  const lines = [
    p.replacesHeader
      ? `Device ${device} already contains ${type} header. Replacing header will destroy existing keyslots.`
      : `Device ${device} does not contain ${type} header. Replacing header can destroy data on that device.`,
  ];
  if (p.otherUuid) lines.push('WARNING: real device header has different UUID than backup!');
  if (p.unknownRequirements)
    lines.push(
      'WARNING: unknown LUKS2 requirements detected in real device header!',
      'Replacing header with backup may corrupt the data on that device!',
    );
  if (p.reencryption)
    lines.push(
      'WARNING: Unfinished offline reencryption detected on the device!',
      'Replacing header with backup may corrupt data.',
    );
  return lines.join('\n');
}
