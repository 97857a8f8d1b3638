/**
 * The name cryptsetup's passphrase prompt gives a device (cryptsetup 2.6 tools_get_key): a loop
 * device's backing file ("Enter passphrase for /path/disk.img: "), else the path as given.
 */
import { loopBackingFile } from '../blockdev/loop.js';

/** "Enter passphrase for DEVICE: " with a loop device named by its backing file. */
export function passphrasePrompt(device: string): string {
  return `Enter passphrase for ${loopBackingFile(device) ?? device}: `;
}
