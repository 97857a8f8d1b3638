/**
 * The name cryptsetup's passphrase prompt gives a device (cryptsetup 2.6 tools_get_key): a loop
 * device's backing file ("Enter passphrase for /path/disk.img: "), else the path as given.
 */
import { readFileSync, statSync } from 'node:fs';

const LOOP_MAJOR = 7;

/** The file a loop device is backed by (sysfs, as losetup shows it), or undefined for anything else. */
export function loopBackingFile(device: string): string | undefined {
  try {
    const st = statSync(device);
    if (!st.isBlockDevice()) return undefined;
    // Linux dev_t: major in bits 8-19 (and 32-43), minor in bits 0-7 and 20-31.
    const major = Number((BigInt(st.rdev) >> 8n) & 0xfffn);
    const minor = Number((BigInt(st.rdev) & 0xffn) | ((BigInt(st.rdev) >> 12n) & 0xfff00n));
    if (major !== LOOP_MAJOR) return undefined;
    const f = readFileSync(`/sys/dev/block/${major}:${minor}/loop/backing_file`, 'utf8').trim();
    return f || undefined;
  } catch {
    return undefined;
  }
}

/** "Enter passphrase for DEVICE: " with a loop device named by its backing file. */
export function passphrasePrompt(device: string): string {
  return `Enter passphrase for ${loopBackingFile(device) ?? device}: `;
}
