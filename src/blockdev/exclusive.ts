/**
 * Exclusive use of block devices, as the kernel and cryptsetup 2.6 have it.
 *
 * The kernel: open(2) of a block device with O_EXCL (and no O_CREAT) claims it, and fails with EBUSY
 * while another holder has it claimed: a mounted filesystem, a device-mapper table, another O_EXCL
 * open (each open file is its own holder, so a second O_EXCL open in the same process fails too).
 * Device-mapper claims every device its tables use under one holder shared by all tables, so two
 * mappings of one device are possible while the rest of the system is kept out.
 *
 * cryptsetup (lib/utils_device.c device_info with DEV_EXCL): before it activates a mapping (unless
 * `--shared`) and before it formats a LUKS header, it opens the device O_RDWR|O_EXCL (O_RDONLY|O_EXCL
 * on EROFS) and gives up on EBUSY with "Cannot use device X which is in use (already mapped or
 * mounted)." (exit 5). Only block devices: a regular file is not checked (cryptsetup puts each
 * activation of a file on a loop device of its own).
 *
 * Here: `checkExclusiveAccess` is cryptsetup's check; `ExclusiveClaims` is device-mapper's side, used
 * by the dm registry so that a device its tables use is claimed while any table uses it.
 */
import { constants } from 'node:fs';
import { type FileHandle, open, stat } from 'node:fs/promises';
import { CryptmapError, EXIT_BUSY } from '../util/errors.js';

/** cryptsetup's message (lib/utils_device.c device_info, -EBUSY). */
export function deviceInUseError(path: string): CryptmapError {
  return new CryptmapError('EBUSY', `Cannot use device ${path} which is in use (already mapped or mounted).`, {
    exitCode: EXIT_BUSY,
    errno: 'EBUSY',
    context: { device: path },
  });
}

const errnoOf = (e: unknown): string | undefined => (e as NodeJS.ErrnoException | undefined)?.code;

/** The device number of `path` when it is a block device; undefined for anything else (or nothing). */
async function blockDeviceNumber(path: string): Promise<number | undefined> {
  try {
    const st = await stat(path);
    return st.isBlockDevice() ? st.rdev : undefined;
  } catch {
    return undefined;
  }
}

/** Open `path` O_EXCL (read-write, or read-only on a read-only device); EBUSY becomes cryptsetup's error. */
async function openExclusive(path: string, readWrite: boolean): Promise<FileHandle> {
  try {
    return await open(path, (readWrite ? constants.O_RDWR : constants.O_RDONLY) | constants.O_EXCL);
  } catch (e) {
    if (readWrite && errnoOf(e) === 'EROFS') return openExclusive(path, false);
    if (errnoOf(e) === 'EBUSY') throw deviceInUseError(path);
    throw e;
  }
}

/**
 * cryptsetup's DEV_EXCL check: throws `deviceInUseError` (EBUSY, exit 5) when `path` is a block
 * device that something holds (a mapping, a mount, an exclusive open). Anything that is not a block
 * device passes; other open errors are left to whoever opens the device next.
 */
export async function checkExclusiveAccess(path: string): Promise<void> {
  if ((await blockDeviceNumber(path)) === undefined) return;
  let fh: FileHandle;
  try {
    fh = await openExclusive(path, true);
  } catch (e) {
    if (errnoOf(e) === 'EBUSY' || (e instanceof CryptmapError && e.code === 'EBUSY')) throw e;
    return;
  }
  await fh.close();
}

/** True when `path` is a block device that something else holds exclusively (cryptsetup's check, as a question). */
export async function isDeviceInUse(path: string): Promise<boolean> {
  try {
    await checkExclusiveAccess(path);
    return false;
  } catch (e) {
    if (e instanceof CryptmapError && e.code === 'EBUSY') return true;
    throw e;
  }
}

interface Claim {
  /** Settles once the O_EXCL open did (or failed). */
  readonly handle: Promise<FileHandle>;
  refs: number;
}

/**
 * Device-mapper's claim on the block devices its tables use: one O_EXCL open per device (by device
 * number, so two names of one device are one claim), shared by every user in this process and
 * released when the last one releases it. Paths that are not block devices are not claimed.
 * @example
 *   const claims = new ExclusiveClaims();
 *   const release = await claims.acquire('/dev/loop0'); // EBUSY (exit 5) if mounted or mapped elsewhere
 *   await release();
 */
export class ExclusiveClaims {
  readonly #byDevice = new Map<number, Claim>();

  /** Claim `path` (a no-op for anything but a block device); the returned function releases it once. */
  async acquire(path: string): Promise<() => Promise<void>> {
    const rdev = await blockDeviceNumber(path);
    if (rdev === undefined) return async () => undefined;
    let claim = this.#byDevice.get(rdev);
    if (claim === undefined) {
      const c: Claim = { handle: openExclusive(path, false), refs: 0 };
      claim = c;
      this.#byDevice.set(rdev, c);
      c.handle.catch(() => {
        if (this.#byDevice.get(rdev) === c) this.#byDevice.delete(rdev);
      });
    }
    claim.refs++;
    const c = claim;
    try {
      await c.handle;
    } catch (e) {
      c.refs--;
      throw e;
    }
    let released = false;
    return async () => {
      if (released) return;
      released = true;
      if (--c.refs > 0) return;
      if (this.#byDevice.get(rdev) === c) this.#byDevice.delete(rdev);
      await (await c.handle).close();
    };
  }

  /** How many devices are claimed (tests). */
  get size(): number {
    return this.#byDevice.size;
  }
}
