/**
 * Keyslot verbs with cryptsetup's syntax, prompts and exit codes (cryptsetup(8) luksAddKey,
 * luksRemoveKey, luksKillSlot, luksChangeKey):
 *   luksAddKey <device> [<new key file>]     luksRemoveKey <device> [<key file>]
 *   luksKillSlot <device> <key slot>         luksChangeKey <device> [<new key file>]
 *   luksConvertKey <device>                  (LUKS2: the keyslot again under the PBKDF given now)
 * The image is locked while its header changes (luks/lock.ts).
 */
import {
  type Luks1Volume,
  type Luks2Volume,
  TOKEN_HANDLERS,
  type UnlockResult,
  unlockByToken,
  withDeviceLock,
} from '../../luks/index.js';
import { CryptmapError, EXIT_NO_PERMISSION, EXIT_WRONG_PARAMS, isCryptmapError } from '../../util/errors.js';
import { Secret } from '../../util/secret.js';
import type { CliIO, VerbMain } from '../types.js';
import {
  closeQuietly,
  headerPath,
  intOpt,
  keyFileSource,
  keyslotOptions,
  type LuksArgs,
  needDevice,
  openDevice,
  parseLuksArgs,
} from './luks-common.js';
import { loadLuks, recoverLoaded, tokenArgs } from './luks-unlock.js';
import { confirm, getPassphrase, readVolumeKeyFile } from './terminal-input.js';

/** Unlock with one of `slots` only (cryptsetup tries them in order); "No key available with this passphrase." (exit 2) otherwise. */
async function unlockAny(
  vol: Luks1Volume | Luks2Volume,
  passphrase: Uint8Array,
  slots: number[],
): Promise<UnlockResult> {
  for (const keySlot of slots) {
    try {
      return await vol.unlock(passphrase, { keySlot });
    } catch (e) {
      if (!isCryptmapError(e) || !['ENOKEY', 'EKEYSLOT'].includes(e.code)) throw e;
    }
  }
  throw new CryptmapError('ENOKEY', 'No key available with this passphrase.', {
    exitCode: EXIT_NO_PERMISSION,
    errno: 'EPERM',
  });
}

/** The passphrase a token gives (--new-token-id): its handler's, e.g. a luks2-keyring token's key. */
async function tokenPassphrase(vol: Luks1Volume | Luks2Volume, id: number): Promise<Buffer> {
  const tok = vol.type === 'luks2' ? vol.json.tokens[String(id)] : undefined;
  const open = tok ? TOKEN_HANDLERS[tok.type]?.open : undefined;
  if (!tok || !open)
    throw new CryptmapError('ENOTOKEN', `Token ${id} is not usable to get a new passphrase.`, {
      exitCode: 1,
      errno: 'ENOENT',
    });
  return open(tok as unknown as Record<string, unknown>, id);
}

function newSource(v: LuksArgs, positional: string | undefined) {
  return {
    keyFile: v['new-keyfile'] ?? positional,
    keyfileOffset: intOpt(v['new-keyfile-offset'], '--new-keyfile-offset'),
    keyfileSize: intOpt(v['new-keyfile-size'], '--new-keyfile-size'),
  };
}

const main: VerbMain = async (argv: string[], io: CliIO) => {
  const verb = argv[0]!;
  const { values: v, positionals } = parseLuksArgs(argv);
  const device = needDevice(
    positionals,
    `cryptmap ${verb} [OPTION...] <device> ${verb === 'luksKillSlot' ? '<key slot>' : '[<key file>]'}`,
  );
  const hdr = headerPath(v, device);
  if (verb === 'luksAddKey' && v.unbound && !Number(v['key-size'] ?? 0))
    throw new CryptmapError('EARGS', 'Key size is required with --unbound option.', { exitCode: EXIT_WRONG_PARAMS });
  if (
    verb === 'luksAddKey' &&
    !v.unbound &&
    v['new-key-slot'] === undefined &&
    v['key-slot'] !== undefined &&
    !v['batch-mode']
  ) {
    io.stdout.write('WARNING: The --key-slot parameter is used for new keyslot number.\n'); // as cryptsetup 2.6, on stdout
  }
  const dev = await openDevice(hdr, true);
  const secrets: Buffer[] = [];
  try {
    return await withDeviceLock(hdr, async () => {
      const vol = await loadLuks(dev, hdr);
      await recoverLoaded(vol, hdr, false);
      const ks = keyslotOptions(v, vol.type);
      // luksAddKey --unbound: the key size is required (cryptsetup verify_addkey).
      const bits = intOpt(v['key-size'], '--key-size', 0, 4096) ?? 0;
      const say = (s: string) => {
        if (v.verbose) io.stdout.write(s);
      };
      if (verb === 'luksAddKey') {
        if (v.unbound) {
          // cryptsetup luksAddUnboundKey: a key of --key-size bits (random, or --volume-key-file),
          // assigned to no segment; only the new passphrase is asked for.
          if (vol.type !== 'luks2')
            throw new CryptmapError('ENOTLUKS', `Device ${hdr} is not a valid LUKS2 device.`, { exitCode: 1 });
          const keyBytes = Math.floor(bits / 8);
          let key: Buffer | undefined;
          if (v['volume-key-file'] !== undefined) {
            key = await readVolumeKeyFile(v['volume-key-file'], keyBytes);
            secrets.push(key);
          }
          const np = await getPassphrase(
            io,
            'Enter new passphrase for key slot: ',
            { ...newSource(v, positionals[1]), keyFile: positionals[1] },
            true,
          );
          secrets.push(np);
          const slot = await vol.addUnboundKeyslot(np, { ...ks, keyBytes, ...(key ? { key } : {}) });
          say(`Key slot ${slot} created.\nCommand successful.\n`);
          return 0;
        }
        // --key-slot names the new keyslot, unless --new-key-slot does; then it names the existing one.
        const newSlotOpt = intOpt(v['new-key-slot'], '--new-key-slot');
        const oldSlot = newSlotOpt !== undefined ? ks.keySlot : undefined;
        const newSlot = newSlotOpt ?? ks.keySlot;
        const byToken = v['token-id'] !== undefined || v['token-type'] !== undefined || v['token-only'] === true;
        const newTokenId = intOpt(v['new-token-id'], '--new-token-id', 0, 31);
        let auth: { passphrase: Uint8Array } | { volumeKey: Secret };
        let tokenPass: Buffer | undefined;
        const vkFile = v['volume-key-file'];
        if (vkFile) {
          // --key-size names the size when no keyslot is left to tell it (after luksErase), as in cryptsetup.
          const vkBytes = v['key-size'] !== undefined ? bits / 8 : vol.dataSegment.keyBytes;
          if (!vkBytes)
            throw new CryptmapError(
              'EARGS',
              'Cannot determine volume key size for LUKS without keyslots, please use --key-size option.',
              { exitCode: EXIT_WRONG_PARAMS },
            );
          const vk = await readVolumeKeyFile(vkFile, vkBytes);
          secrets.push(vk); // wiped in the finally below even when addKey fails
          auth = { volumeKey: new Secret(vk) };
        } else if (byToken && (v['key-file'] === undefined || v['key-file'] === '-')) {
          // Unlocked through a token (crypt_keyslot_context_init_by_token): --token-id/--token-type.
          if (vol.type !== 'luks2')
            throw new CryptmapError('ETOKENLUKS1', 'Tokens are supported only for LUKS2 devices.', {
              exitCode: EXIT_WRONG_PARAMS,
            });
          const t = tokenArgs(v);
          const r = await unlockByToken(vol, {
            ...(t.tokenId !== undefined ? { tokenId: t.tokenId } : {}),
            ...(t.tokenType !== undefined ? { tokenType: t.tokenType } : {}),
            ...(oldSlot !== undefined ? { keySlot: oldSlot } : {}),
          });
          auth = { volumeKey: r.volumeKey };
          secrets.push(r.volumeKey.expose()); // wiped in the finally below even when addKey fails
          say(`Key slot ${r.keyslot} unlocked.\n`);
          if (newTokenId !== undefined && newTokenId === r.tokenId) tokenPass = await tokenPassphrase(vol, newTokenId);
        } else {
          const p = await getPassphrase(io, 'Enter any existing passphrase: ', keyFileSource(v));
          secrets.push(p);
          auth = { passphrase: p };
          // Check the existing passphrase before asking for the new one, as cryptsetup does.
          const r = await vol.unlock(p, { ...(oldSlot !== undefined ? { keySlot: oldSlot } : {}) });
          r.volumeKey.dispose();
          say(`Key slot ${r.keyslot} unlocked.\n`);
        }
        // The new passphrase: the new key file, a token's (--new-token-id: the keyslot is assigned to it), or asked.
        let np: Buffer;
        const newFile = positionals[1] ?? v['new-keyfile'];
        if (newFile === undefined && newTokenId !== undefined) {
          if (vol.type !== 'luks2')
            throw new CryptmapError('ETOKENLUKS1', 'Tokens are supported only for LUKS2 devices.', {
              exitCode: EXIT_WRONG_PARAMS,
            });
          np = tokenPass ?? (await tokenPassphrase(vol, newTokenId));
        } else np = await getPassphrase(io, 'Enter new passphrase for key slot: ', newSource(v, positionals[1]), true);
        secrets.push(np);
        const assign = newFile === undefined && newTokenId !== undefined ? { assignTokens: [newTokenId] } : {};
        const slot = await vol.addKey(auth, np, {
          ...ks,
          ...assign,
          ...(newSlot !== undefined ? { keySlot: newSlot } : { keySlot: undefined }),
        });
        if ('volumeKey' in auth) auth.volumeKey.dispose();
        say(`Key slot ${slot} created.\nCommand successful.\n`);
        return 0;
      }
      if (verb === 'luksConvertKey') {
        // cryptsetup 2.6 action_luksConvertKey: the keyslot is rewritten with the same passphrase and the
        // PBKDF given now (--pbkdf pbkdf2 for bootloaders without Argon2, or back), through the same
        // crash-safe path as luksChangeKey (new material in a free area, one header write, old area wiped).
        if (vol.type !== 'luks2')
          throw new CryptmapError('ENOTLUKS', `Device ${hdr} is not a valid LUKS2 device.`, { exitCode: 1 });
        if (ks.keySlot !== undefined && vol.json.keyslots[String(ks.keySlot)] === undefined) {
          throw new CryptmapError('EKEYSLOT', `Keyslot ${ks.keySlot} is not active.`, { exitCode: 1 });
        }
        const p = await getPassphrase(io, 'Enter passphrase for keyslot to be converted: ', keyFileSource(v));
        secrets.push(p);
        const slot = await vol.changeKey(p, p, ks);
        say(`Key slot ${slot} created.\nCommand successful.\n`);
        return 0;
      }
      if (verb === 'luksChangeKey') {
        const p = await getPassphrase(io, 'Enter passphrase to be changed: ', keyFileSource(v));
        secrets.push(p);
        // Any segment: an unbound keyslot's passphrase can be changed too (CRYPT_ACTIVATE_ALLOW_UNBOUND_KEY).
        const { volumeKey, keyslot } = await vol.unlock(p, { keySlot: ks.keySlot, anySegment: true });
        volumeKey.dispose();
        say(`Key slot ${keyslot} unlocked.\n`);
        const np = await getPassphrase(io, 'Enter new passphrase: ', newSource(v, positionals[1]), true);
        secrets.push(np);
        const slot = await vol.changeKey(p, np, ks); // -S (ks.keySlot): that keyslot changes in place, as in cryptsetup
        // cryptsetup names the keyslot that now holds the key (LUKS1 moves it to a free one).
        say(`Key slot ${slot} created.\nCommand successful.\n`);
        return 0;
      }
      if (verb === 'luksRemoveKey') {
        const p = await getPassphrase(io, 'Enter passphrase to be deleted: ', {
          ...keyFileSource(v),
          keyFile: v['key-file'] ?? positionals[1],
        });
        secrets.push(p);
        const { volumeKey, keyslot } = await vol.unlock(p);
        volumeKey.dispose();
        say(`Key slot ${keyslot} selected for deletion.\n`);
        if (vol.keyslots().filter((k) => k.active).length === 1) {
          await confirm(
            io,
            'This is the last keyslot. Device will become unusable after purging this key.',
            v['batch-mode'],
            { fail: 'Operation aborted, the keyslot was NOT wiped.\n', exitCode: EXIT_NO_PERMISSION },
          );
        }
        await vol.killSlot(keyslot);
        say('Command successful.\n');
        return 0;
      }
      if (verb === 'luksKillSlot') {
        // cryptsetup 2.6 action_luksKillSlot + verify_keyslot: unless in batch mode on a terminal without
        // a key file, a passphrase must prove access first: for the last keyslot, that keyslot's own;
        // else one of the OTHER keyslots' (the doomed slot's passphrase does not count, so a typo
        // cannot destroy the last way in). Input that ends before giving anything (`</dev/null`) skips
        // the check, as cryptsetup does when reading stdin.
        const slot = intOpt(positionals[1], 'key slot', 0, vol.type === 'luks1' ? 7 : 31);
        if (slot === undefined)
          throw new CryptmapError('EARGS', 'Command requires key slot as argument.', { exitCode: EXIT_WRONG_PARAMS });
        const info = vol.keyslots().find((k) => k.id === slot);
        if (!info?.active)
          throw new CryptmapError('EKEYSLOT', `Keyslot ${slot} is not active.`, { exitCode: EXIT_WRONG_PARAMS });
        say(`Keyslot ${slot} is selected for deletion.\n`);
        const others = vol.keyslots().filter((k) => k.active && k.id !== slot);
        if (!v['batch-mode'] || v['key-file'] !== undefined || !io.stdin.isTTY) {
          if (others.length === 0 && v['key-file'] === undefined) {
            await confirm(
              io,
              'This is the last keyslot. Device will become unusable after purging this key.',
              v['batch-mode'],
              { fail: 'Operation aborted, the keyslot was NOT wiped.\n', exitCode: EXIT_NO_PERMISSION },
            );
          }
          let p: Buffer | undefined;
          try {
            p = await getPassphrase(io, 'Enter any remaining passphrase: ', keyFileSource(v));
          } catch (e) {
            const fromStdin = v['key-file'] === undefined || v['key-file'] === '-';
            if (!(isCryptmapError(e, 'EPIPE') && fromStdin)) throw e;
            io.stderr.write(`${e.message}\n`);
          }
          if (p) {
            secrets.push(p);
            const unlocked =
              others.length === 0
                ? await vol.unlock(p, { keySlot: slot })
                : await unlockAny(
                    vol,
                    p,
                    others.map((k) => k.id),
                  );
            unlocked.volumeKey.dispose();
            say(`Key slot ${unlocked.keyslot} unlocked.\n`);
          }
        }
        await vol.killSlot(slot);
        say(`Key slot ${slot} removed.\nCommand successful.\n`);
        return 0;
      }
      throw new CryptmapError('EARGS', `Unknown verb ${verb}.`, { exitCode: EXIT_WRONG_PARAMS });
    });
  } finally {
    for (const s of secrets) s.fill(0);
    await closeQuietly(dev);
  }
};

export default main;
