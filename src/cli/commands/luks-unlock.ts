/**
 * Loading a LUKS header the way cryptsetup's crypt_load does (with recovery of a damaged LUKS2 copy)
 * and the unlock sequence of `open` (cryptsetup src/cryptsetup.c action_open_luks: tokens, then a
 * passphrase, or --volume-key-file).
 */
import { openBlockDevice } from '../../blockdev/open.js';
import type { BlockDevice } from '../../blockdev/types.js';
import {
  inReencryption,
  type Luks1Volume,
  type Luks2Volume,
  openLuks,
  type ReencryptKeys,
  type UnlockResult,
  unlockByToken,
  unlockReencryptKeys,
  verifyReencryptDigest,
  withDeviceLock,
} from '../../luks/index.js';
import { CryptmapError, EXIT_NO_PERMISSION, EXIT_WRONG_PARAMS, isCryptmapError } from '../../util/errors.js';
import { Secret } from '../../util/secret.js';
import { passphrasePrompt } from '../device-name.js';
import type { CliIO } from '../types.js';
import { closeQuietly, headerPath, intOpt, keyFileSource, type LuksArgs, openDevice } from './luks-common.js';
import { getPassphrase, readVolumeKeyFile } from './terminal-input.js';

/** openLuks with cryptsetup's message for a device that is not LUKS. */
export async function loadLuks(dev: BlockDevice, hdr: string): Promise<Luks1Volume | Luks2Volume> {
  return openLuks(dev).catch((e) => {
    if (e instanceof CryptmapError && e.code === 'ENOTLUKS') {
      const why = e.cause instanceof CryptmapError && e.cause.code === 'ELUKS2JSON' ? ` (${e.cause.message})` : '';
      throw new CryptmapError('ENOTLUKS', `Device ${hdr} is not a valid LUKS device${why}.`, { exitCode: 1 });
    }
    // A header whose metadata and keyslots do not fit the device: cryptsetup's two lines, exit 1.
    if (e instanceof CryptmapError && e.code === 'EDEVSIZE') {
      throw new CryptmapError(
        'ENOTLUKS',
        `${e.message.replace(/^Device /, `Device ${hdr} `)}\nDevice ${hdr} is not a valid LUKS device.`,
        { exitCode: 1, cause: e },
      );
    }
    throw e;
  });
}

/**
 * Load-time recovery of a damaged or stale LUKS2 header copy from the good one (Luks2Volume
 * `recoverHeader`), for a volume loaded from a device opened for writing, under the device lock
 * when `lock` is set (callers already holding it pass false). LUKS1 and healthy headers: no-op.
 */
export async function recoverLoaded(vol: Luks1Volume | Luks2Volume, hdr: string, lock = true): Promise<void> {
  if (vol.type !== 'luks2' || !vol.needsRepair) return;
  if (lock) await withDeviceLock(hdr, () => vol.recoverHeader());
  else await vol.recoverHeader();
}

/**
 * Load the header at `hdr` for a verb that only reads it (luksDump, open --test-passphrase, open,
 * luksUUID without --uuid, luksHeaderBackup). The device is opened read-only; when a LUKS2 copy is
 * damaged or stale and neither --readonly nor a read-only device forbids it, a second, writable
 * handle rewrites that copy under the device lock, as cryptsetup does on every load. A device that
 * is not LUKS is never opened for writing. The caller closes `dev`.
 */
export async function loadLuksForRead(
  hdr: string,
  v: LuksArgs,
): Promise<{ dev: BlockDevice; vol: Luks1Volume | Luks2Volume }> {
  const dev = await openDevice(hdr, false);
  try {
    const vol = await loadLuks(dev, hdr);
    if (vol.type === 'luks2' && vol.needsRepair && !v.readonly) {
      const rw = await openBlockDevice(hdr, { readOnly: false }).catch(() => null);
      if (rw) {
        try {
          await withDeviceLock(hdr, async () => {
            const fresh = await loadLuks(rw, hdr);
            if (fresh.type === 'luks2') await fresh.recoverHeader();
          });
        } catch (e) {
          // Recovery is best effort (cryptsetup only logs a failed recovery); the good copy is loaded.
          if (!isCryptmapError(e)) throw e;
        } finally {
          await closeQuietly(rw);
        }
      }
    }
    return { dev, vol };
  } catch (e) {
    await closeQuietly(dev);
    throw e;
  }
}

/** --token-id, --token-type, --token-only and --key-slot as `open` takes them. */
export interface TokenArgs {
  tokenId?: number;
  tokenType?: string;
  tokenOnly: boolean;
  keySlot?: number;
}

export function tokenArgs(v: LuksArgs): TokenArgs {
  const tokenId = intOpt(v['token-id'], '--token-id', 0, 31);
  const keySlot = intOpt(v['key-slot'], '--key-slot', 0, 31);
  return {
    ...(tokenId !== undefined ? { tokenId } : {}),
    ...(v['token-type'] !== undefined ? { tokenType: v['token-type'] } : {}),
    ...(keySlot !== undefined ? { keySlot } : {}),
    tokenOnly: v['token-only'] === true,
  };
}

/**
 * The token step of `open` (cryptsetup src/cryptsetup.c action_open_luks): LUKS2 tokens are tried
 * first, always; on failure `null` tells the caller to go on with a passphrase, unless --token-only,
 * where the token's error is thrown (exit 1 no usable token, exit 2 token could not unlock). Messages
 * of failed tokens are printed with --verbose, as cryptsetup does, and the luks2-keyring one also
 * whenever a token option was given (it says why: no kernel keyring in userspace).
 */
export async function tryTokenUnlock(
  io: CliIO,
  vol: Luks1Volume | Luks2Volume,
  v: LuksArgs,
): Promise<UnlockResult | null> {
  const t = tokenArgs(v);
  const explicit = t.tokenOnly || t.tokenId !== undefined || t.tokenType !== undefined;
  if (vol.type !== 'luks2') {
    if (explicit && t.tokenOnly)
      throw new CryptmapError('ETOKENLUKS1', 'Tokens are supported only for LUKS2 devices.', {
        exitCode: EXIT_WRONG_PARAMS,
      });
    return null;
  }
  try {
    const r = await unlockByToken(vol, t);
    if (v.verbose) io.stdout.write(`Key slot ${r.keyslot} unlocked.\n`);
    return r;
  } catch (e) {
    if (!isCryptmapError(e)) throw e;
    if (t.tokenOnly) throw e;
    // A volume without tokens: nothing to say (cryptsetup stays silent too).
    if (v.verbose || (explicit && e.code === 'ETOKENKEYRING')) io.stderr.write(`${e.message}\n`);
    return null;
  }
}

/** How often a wrong passphrase is asked again (cryptsetup's set_tries_tty): --tries (default 3) on a terminal, else once. */
export function passphraseTries(io: CliIO, v: LuksArgs): number {
  return v['key-file'] !== undefined || !io.stdin.isTTY ? 1 : (intOpt(v.tries, '--tries', 1) ?? 3);
}

/**
 * The whole unlock sequence of `open` / `open --test-passphrase`: tokens (tryTokenUnlock), then the
 * passphrase from --key-file or a prompt, with --tries on a terminal (default 3). The caller disposes
 * the volume key. `device` is the name used in the prompt.
 */
export async function unlockForOpen(
  io: CliIO,
  vol: Luks1Volume | Luks2Volume,
  device: string,
  v: LuksArgs,
): Promise<UnlockResult> {
  if (v['volume-key-file'] !== undefined) return unlockByVolumeKeyFile(vol, v['volume-key-file'], v);
  const byToken = await tryTokenUnlock(io, vol, v);
  if (byToken) return byToken;
  const tries = passphraseTries(io, v);
  for (let i = 0; ; i++) {
    const pass = await getPassphrase(io, passphrasePrompt(device), keyFileSource(v));
    try {
      // --test-passphrase with --key-slot or --unbound may test an unbound keyslot (CRYPT_ACTIVATE_ALLOW_UNBOUND_KEY).
      const anySegment = v['test-passphrase'] === true && (v['key-slot'] !== undefined || v.unbound === true);
      const r = await vol.unlock(pass, { keySlot: intOpt(v['key-slot'], '--key-slot'), anySegment });
      if (v.verbose) io.stdout.write(`Key slot ${r.keyslot} unlocked.\n`);
      return r;
    } catch (e) {
      if (!(e instanceof CryptmapError && e.code === 'ENOKEY') || i + 1 >= tries) throw e;
      io.stderr.write(`${e.message}\n`);
    } finally {
      pass.fill(0);
    }
  }
}

/**
 * `open --volume-key-file F` (cryptsetup's recovery path, crypt_activate_by_volume_key): the key is
 * read from F (exactly the volume key size: of the keyslots, or --key-size when none is left, as
 * after luksErase) and checked against the digest; no passphrase. keyslot -1: none was used.
 */
async function unlockByVolumeKeyFile(vol: Luks1Volume | Luks2Volume, file: string, v: LuksArgs): Promise<UnlockResult> {
  const bits = intOpt(v['key-size'], '--key-size');
  const bytes = bits !== undefined ? bits / 8 : vol.dataSegment.keyBytes;
  if (!bytes)
    throw new CryptmapError(
      'EARGS',
      'Cannot determine volume key size for LUKS without keyslots, please use --key-size option.',
      { exitCode: EXIT_WRONG_PARAMS },
    );
  const vk = await readVolumeKeyFile(file, bytes);
  if (!(await vol.verifyVolumeKey(vk))) {
    vk.fill(0);
    throw new CryptmapError('EVOLUMEKEY', 'Volume key does not match the volume.', {
      exitCode: EXIT_NO_PERMISSION,
      errno: 'EPERM',
    });
  }
  return { volumeKey: new Secret(vk), keyslot: -1 };
}

/**
 * The old and new volume keys of `vol` (in reencryption) that `pass` opens, checked against the
 * reencryption digest, as cryptsetup 2.6's open and open --test-passphrase take them (_open_all_keys,
 * LUKS2_reencrypt_digest_verify; with --test-passphrase and --key-slot or --unbound one keyslot only)
 * and report a failure (tools_passphrase_msg after "Reencryption metadata is invalid.": "No key
 * available with this passphrase.", exit 2, or with no digest at all "No usable keyslot is
 * available.", exit 1). The caller wipes the keys.
 */
export async function openReencryptKeys(vol: Luks2Volume, pass: Uint8Array, v: LuksArgs): Promise<ReencryptKeys> {
  const keySlot = intOpt(v['key-slot'], '--key-slot', 0, 31);
  const anySegment = v['test-passphrase'] === true && (keySlot !== undefined || v.unbound === true);
  const keys = await unlockReencryptKeys(vol, pass, { keySlot, anySegment });
  try {
    await verifyReencryptDigest(vol, keys);
  } catch (e) {
    keys.oldKey?.fill(0);
    keys.newKey?.fill(0);
    if (!isCryptmapError(e, 'EREENCRYPT') || e.message === '' || (e.errno !== 'EPERM' && e.errno !== 'ENOENT')) throw e;
    const msg = e.errno === 'EPERM' ? 'No key available with this passphrase.' : 'No usable keyslot is available.';
    throw new CryptmapError(e.code, `${e.message}\n${msg}`, { exitCode: e.exitCode, errno: e.errno, cause: e });
  }
  return keys;
}

/**
 * `open --test-passphrase` complete (what open.ts calls): load the header (with load-time recovery),
 * check --type, run the unlock sequence, report; exit 0, or the error's exit code.
 */
export async function testPassphrase(io: CliIO, device: string, v: LuksArgs): Promise<number> {
  if (v.type && !['luks', 'luks1', 'luks2'].includes(v.type))
    throw new CryptmapError('EARGS', `Device type ${v.type} is not supported with --test-passphrase.`, {
      exitCode: EXIT_WRONG_PARAMS,
    });
  const hdr = headerPath(v, device);
  const { dev, vol } = await loadLuksForRead(hdr, v);
  try {
    if (v.type && v.type !== 'luks' && v.type !== vol.type)
      throw new CryptmapError('ENOTLUKS', `Device ${hdr} is not a valid ${v.type.toUpperCase()} device.`, {
        exitCode: 1,
      });
    if (vol.type === 'luks2' && inReencryption(vol.jsonSnapshot())) {
      const pass = await getPassphrase(io, `Enter passphrase for ${device}: `, keyFileSource(v));
      try {
        const keys = await openReencryptKeys(vol as Luks2Volume, pass, v);
        keys.oldKey?.fill(0);
        keys.newKey?.fill(0);
      } finally {
        pass.fill(0);
      }
      if (v.verbose) io.stdout.write('Command successful.\n');
      return 0;
    }
    const r = await unlockForOpen(io, vol, device, v);
    r.volumeKey.dispose();
    if (v.verbose) io.stdout.write('Command successful.\n');
    return 0;
  } finally {
    await closeQuietly(dev);
  }
}
