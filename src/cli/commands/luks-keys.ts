/**
 * Keyslot verbs with cryptsetup's syntax, prompts and exit codes (cryptsetup(8) luksAddKey,
 * luksRemoveKey, luksKillSlot, luksChangeKey):
 *   luksAddKey <device> [<new key file>]     luksRemoveKey <device> [<key file>]
 *   luksKillSlot <device> <key slot>         luksChangeKey <device> [<new key file>]
 *   luksConvertKey <device>                  (LUKS2: the keyslot again under the PBKDF given now)
 * The image is locked while its header changes (luks/lock.ts).
 */
import { type Luks1Volume, type Luks2Volume, type UnlockResult, withDeviceLock } from '../../luks/index.js';
import { CryptmapError, EXIT_NO_PERMISSION, EXIT_WRONG_PARAMS, isCryptmapError } from '../../util/errors.js';
import { Secret } from '../../util/secret.js';
import type { CliIO, VerbMain } from '../types.js';
import {
  closeQuietly,
  confirm,
  getPassphrase,
  headerPath,
  intOpt,
  keyslotOptions,
  type LuksArgs,
  loadLuks,
  needDevice,
  openDevice,
  parseLuksArgs,
  readVolumeKeyFile,
  recoverLoaded,
} from './luks-common.js';

/** Unlock with one of `slots` only (cryptsetup tries them in order); "No key available with this passphrase." (exit 2) otherwise. */
async function unlockAny(vol: Luks1Volume | Luks2Volume, passphrase: Uint8Array, slots: number[]): Promise<UnlockResult> {
  for (const keySlot of slots) {
    try {
      return await vol.unlock(passphrase, { keySlot });
    } catch (e) {
      if (!isCryptmapError(e) || !['ENOKEY', 'EKEYSLOT'].includes(e.code)) throw e;
    }
  }
  throw new CryptmapError('ENOKEY', 'No key available with this passphrase.', { exitCode: EXIT_NO_PERMISSION, errno: 'EPERM' });
}

function existingSource(v: LuksArgs) {
  return { keyFile: v['key-file'], keyfileOffset: intOpt(v['keyfile-offset'], '--keyfile-offset'), keyfileSize: intOpt(v['keyfile-size'], '--keyfile-size') };
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
  const device = needDevice(positionals, `cryptmap ${verb} [OPTION...] <device> ${verb === 'luksKillSlot' ? '<key slot>' : '[<key file>]'}`);
  const hdr = headerPath(v, device);
  const dev = await openDevice(hdr, true);
  const secrets: Buffer[] = [];
  try {
    return await withDeviceLock(hdr, async () => {
      const vol = await loadLuks(dev, hdr);
      await recoverLoaded(vol, hdr, false);
      const ks = keyslotOptions(v, vol.type);
      const say = (s: string) => {
        if (v.verbose) io.stdout.write(s);
      };
      if (verb === 'luksAddKey') {
        const newSlot = intOpt(v['new-key-slot'], '--new-key-slot') ?? ks.keySlot;
        let auth: { passphrase: Uint8Array } | { volumeKey: Secret };
        const vkFile = v['volume-key-file'];
        if (vkFile) {
          const vk = await readVolumeKeyFile(vkFile, vol.dataSegment.keyBytes);
          secrets.push(vk); // wiped in the finally below even when addKey fails
          auth = { volumeKey: new Secret(vk) };
        } else {
          const p = await getPassphrase(io, 'Enter any existing passphrase: ', existingSource(v));
          secrets.push(p);
          auth = { passphrase: p };
        }
        // Check the existing passphrase before asking for the new one, as cryptsetup does.
        if ('passphrase' in auth) (await vol.unlock(auth.passphrase)).volumeKey.dispose();
        const np = await getPassphrase(io, 'Enter new passphrase for key slot: ', newSource(v, positionals[1]), true);
        secrets.push(np);
        const slot = await vol.addKey(auth, np, { ...ks, ...(newSlot !== undefined ? { keySlot: newSlot } : { keySlot: undefined }) });
        if ('volumeKey' in auth) auth.volumeKey.dispose();
        say(`Key slot ${slot} created.\nCommand successful.\n`);
        return 0;
      }
      if (verb === 'luksConvertKey') {
        // cryptsetup 2.6 action_luksConvertKey: the keyslot is rewritten with the same passphrase and the
        // PBKDF given now (--pbkdf pbkdf2 for bootloaders without Argon2, or back), through the same
        // crash-safe path as luksChangeKey (new material in a free area, one header write, old area wiped).
        if (vol.type !== 'luks2') throw new CryptmapError('ENOTLUKS', `Device ${hdr} is not a valid LUKS2 device.`, { exitCode: 1 });
        if (ks.keySlot !== undefined && vol.json.keyslots[String(ks.keySlot)] === undefined) {
          throw new CryptmapError('EKEYSLOT', `Keyslot ${ks.keySlot} is not active.`, { exitCode: 1 });
        }
        const p = await getPassphrase(io, 'Enter passphrase for keyslot to be converted: ', existingSource(v));
        secrets.push(p);
        const slot = await vol.changeKey(p, p, ks);
        say(`Key slot ${slot} created.\nCommand successful.\n`);
        return 0;
      }
      if (verb === 'luksChangeKey') {
        const p = await getPassphrase(io, 'Enter passphrase to be changed: ', existingSource(v));
        secrets.push(p);
        const { volumeKey, keyslot } = await vol.unlock(p, { keySlot: ks.keySlot });
        volumeKey.dispose();
        say(`Key slot ${keyslot} unlocked.\n`);
        const np = await getPassphrase(io, 'Enter new passphrase: ', newSource(v, positionals[1]), true);
        secrets.push(np);
        const slot = await vol.changeKey(p, np, { ...ks, keySlot: keyslot });
        say(`Key slot ${keyslot} changed.\n`);
        void slot;
        say('Command successful.\n');
        return 0;
      }
      if (verb === 'luksRemoveKey') {
        const p = await getPassphrase(io, 'Enter passphrase to be deleted: ', {
          ...existingSource(v),
          keyFile: v['key-file'] ?? positionals[1],
        });
        secrets.push(p);
        const { volumeKey, keyslot } = await vol.unlock(p);
        volumeKey.dispose();
        say(`Key slot ${keyslot} selected for deletion.\n`);
        if (vol.keyslots().filter((k) => k.active).length === 1) {
          await confirm(io, 'This is the last keyslot. Device will become unusable after purging this key.', v['batch-mode']);
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
        if (slot === undefined) throw new CryptmapError('EARGS', 'Command requires key slot as argument.', { exitCode: EXIT_WRONG_PARAMS });
        const info = vol.keyslots().find((k) => k.id === slot);
        if (!info?.active) throw new CryptmapError('EKEYSLOT', `Keyslot ${slot} is not active.`, { exitCode: EXIT_WRONG_PARAMS });
        say(`Keyslot ${slot} is selected for deletion.\n`);
        const others = vol.keyslots().filter((k) => k.active && k.id !== slot);
        if (!v['batch-mode'] || v['key-file'] !== undefined || !io.stdin.isTTY) {
          if (others.length === 0 && v['key-file'] === undefined) {
            await confirm(io, 'This is the last keyslot. Device will become unusable after purging this key.', v['batch-mode']).catch((e: unknown) => {
              throw isCryptmapError(e, 'EABORT') ? new CryptmapError('EABORT', 'Operation aborted, the keyslot was NOT wiped.', { exitCode: EXIT_NO_PERMISSION }) : e;
            });
          }
          let p: Buffer | undefined;
          try {
            p = await getPassphrase(io, 'Enter any remaining passphrase: ', existingSource(v));
          } catch (e) {
            const fromStdin = v['key-file'] === undefined || v['key-file'] === '-';
            if (!(isCryptmapError(e, 'EPIPE') && fromStdin)) throw e;
            io.stderr.write(`${e.message}\n`);
          }
          if (p) {
            secrets.push(p);
            const unlocked = others.length === 0 ? await vol.unlock(p, { keySlot: slot }) : await unlockAny(vol, p, others.map((k) => k.id));
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
