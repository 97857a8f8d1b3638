/**
 * Public API of the LUKS layer for the activation layer and the CLI.
 *
 * @example
 *   const dev = await FileDevice.open('disk.img');
 *   const vol = await openLuks(dev);                       // LUKS1 or LUKS2
 *   const { volumeKey, keyslot } = await vol.unlock(Buffer.from('passphrase'));
 *   const seg = vol.dataSegment;                           // offset, size, cipher, sector size, iv tweak
 *   ...; volumeKey.dispose();
 */
import { open as fsOpen } from 'node:fs/promises';
import type { BlockDevice } from '../blockdev/types.js';
import { CryptmapError, EXIT_WRONG_DEVICE } from '../util/errors.js';
import { hasLuks1Magic, Luks1Volume } from './luks1.js';
import { hasLuks2Magic } from './luks2-disk.js';
import { Luks2Volume, readLuks2 } from './luks2.js';
import type { LuksVolume } from './types.js';

export type { Luks1FormatOptions } from './luks1.js';
export { Luks1Volume, validateLuks1, decodeLuks1, encodeLuks1 } from './luks1.js';
export type { Luks2FormatOptions, Luks2ReadResult } from './luks2.js';
export { Luks2Volume, readLuks2, noKeyError } from './luks2.js';
export type { Luks2Json } from './luks2-json.js';
export { CHECK_NAMES, validateLuks2Json, parseJsonArea } from './luks2-json.js';
export { withDeviceLock, lockDir } from './lock.js';
export type { TokenUnlockOptions, TokenUnlockResult } from './token-unlock.js';
export { tokenCandidates, unlockByToken } from './token-unlock.js';
export type * from './types.js';

/** 'luks1', 'luks2' or null, from the first bytes (isLuks; cryptsetup checks the primary magic only). */
export async function detectLuks(dev: BlockDevice): Promise<'luks1' | 'luks2' | null> {
  if (dev.sizeBytes < 512) return null;
  const b = Buffer.alloc(512);
  await dev.read(0, b);
  if (hasLuks1Magic(b)) return 'luks1';
  if (hasLuks2Magic(b) === 'primary') return 'luks2';
  return null;
}

/** Open a LUKS1 or LUKS2 header on `dev` (the header device when detached). */
export async function openLuks(dev: BlockDevice): Promise<Luks1Volume | Luks2Volume> {
  const t = await detectLuks(dev);
  if (t === 'luks1') return Luks1Volume.open(dev);
  if (t === 'luks2') return Luks2Volume.open(dev);
  // A LUKS2 volume with a damaged primary may still have a good secondary copy.
  try {
    await readLuks2(dev);
    return Luks2Volume.open(dev);
  } catch {
    throw new CryptmapError('ENOTLUKS', 'Device is not a valid LUKS device.', { exitCode: 1 });
  }
}

/** Copy the header and keyslot areas into a new file (luksHeaderBackup); fails if the file exists. */
export async function headerBackup(dev: BlockDevice, vol: LuksVolume, file: string): Promise<void> {
  const n = vol.headerBytes;
  const buf = Buffer.alloc(n);
  await dev.read(0, buf);
  let fh: Awaited<ReturnType<typeof fsOpen>>;
  try {
    fh = await fsOpen(file, 'wx', 0o400);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new CryptmapError('EBACKUP', code === 'EEXIST' ? `Requested header backup file ${file} already exists.` : `Cannot create header backup file ${file}.`, { exitCode: 4, cause: e });
  }
  try {
    await fh.writeFile(buf);
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/**
 * Restore a header backup (luksHeaderRestore): the backup must be a valid LUKS header of the same
 * type; keyslot areas are written first, then the header copies (primary, then secondary), so a crash
 * before the final writes leaves the previous header in place.
 */
export async function headerRestore(dev: BlockDevice, backup: BlockDevice): Promise<LuksVolume> {
  const src = await openLuks(backup);
  const n = src.headerBytes;
  if (n > backup.sizeBytes) throw new CryptmapError('EBACKUP', 'Backup file does not contain valid LUKS header.', { exitCode: EXIT_WRONG_DEVICE });
  if (n > dev.sizeBytes) throw new CryptmapError('EBACKUP', 'Device is too small for the header backup.', { exitCode: EXIT_WRONG_DEVICE });
  const buf = Buffer.alloc(n);
  await backup.read(0, buf);
  const hdrBytes = src.type === 'luks2' ? 2 * src.metadataBytes : 4096;
  if (n > hdrBytes) await dev.write(hdrBytes, buf.subarray(hdrBytes));
  await dev.flush();
  if (src.type === 'luks2') {
    const md = src.metadataBytes;
    await dev.write(0, buf.subarray(0, md));
    await dev.flush();
    await dev.write(md, buf.subarray(md, 2 * md));
  } else {
    await dev.write(0, buf.subarray(0, hdrBytes));
  }
  await dev.flush();
  return openLuks(dev);
}
