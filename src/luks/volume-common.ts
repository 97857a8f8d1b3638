/**
 * Keyslot operations that LUKS1 (luks1.ts) and LUKS2 (luks2.ts) perform the same way on top of their
 * own `unlock` and `killSlot` (cryptsetup luksRemoveKey: find the slot the passphrase opens, then
 * destroy it as luksKillSlot does), and the size of a header backup file.
 */
import type { LuksVolume } from './types.js';

/**
 * Remove the keyslot `passphrase` opens (only `opts.keySlot` when given); returns its number. The
 * volume key recovered on the way is wiped before the slot is destroyed.
 *
 * @example
 *   async removeKey(passphrase, opts = {}) { return removeKeyByPassphrase(this, passphrase, opts); }
 */
export async function removeKeyByPassphrase(
  vol: Pick<LuksVolume, 'unlock' | 'killSlot'>,
  passphrase: Uint8Array,
  opts: { keySlot?: number } = {},
): Promise<number> {
  const { volumeKey, keyslot } = await vol.unlock(passphrase, opts);
  volumeKey.dispose();
  await vol.killSlot(keyslot);
  return keyslot;
}

/** Size of a header backup file: the header and keyslot areas (headerBytes), rounded up to 4 KiB as cryptsetup pads it. */
export function backupFileBytes(vol: LuksVolume): number {
  return Math.ceil(vol.headerBytes / 4096) * 4096;
}
