/**
 * Backing-file operations for a real VolumePorts implementation (the parts that need no LUKS, dm
 * or NBD code): sparse creation, durable deletion, and a probe of size and LUKS magic.
 *
 * - createSparseFile: parent directories 0700, file 0600, created exclusively (O_EXCL), extended
 *   with ftruncate (no blocks allocated), fsynced with its directory. A failure removes the file.
 * - deleteBackingFile: unlink (absent is fine), then fsync the directory.
 * - probeBackingFile: exists, size, and whether a LUKS header magic (`LUKS\xba\xbe`, LUKS1 and
 *   LUKS2 alike, LUKS2 spec §2.1) starts the file.
 */
import { constants, promises as fs } from 'node:fs';
import { dirname } from 'node:path';
import { CryptmapError, fromSystemError } from '../util/errors.js';

export const LUKS_MAGIC = Buffer.from([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]);

async function syncDir(dir: string): Promise<void> {
  const d = await fs.open(dir, constants.O_RDONLY);
  try {
    await d.sync();
  } finally {
    await d.close();
  }
}

/** Make `path` a sparse file of `bytes` bytes; fails with EEXIST if it exists. */
export async function createSparseFile(path: string, bytes: number): Promise<void> {
  try {
    await fs.mkdir(dirname(path), { recursive: true, mode: 0o700 });
  } catch (e) {
    throw fromSystemError('ECREATE', `cannot create the directory of ${path}`, e);
  }
  let fh: fs.FileHandle;
  try {
    fh = await fs.open(path, constants.O_RDWR | constants.O_CREAT | constants.O_EXCL, 0o600);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EEXIST') {
      throw new CryptmapError('ECREATE', `cannot create ${path}: it already exists`, {
        errno: 'EEXIST',
        exitCode: 5,
        cause: e,
      });
    }
    throw fromSystemError('ECREATE', `cannot create ${path}`, e);
  }
  try {
    await fh.truncate(bytes);
    await fh.sync();
    await fh.close();
    await syncDir(dirname(path));
  } catch (e) {
    await fh.close().catch(() => {});
    await fs.unlink(path).catch(() => {});
    throw fromSystemError('ECREATE', `cannot size ${path} to ${bytes} bytes`, e, { bytes });
  }
}

export async function deleteBackingFile(path: string): Promise<void> {
  try {
    await fs.unlink(path);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw fromSystemError('EDELETE', `cannot delete ${path}`, e);
  }
  await syncDir(dirname(path)).catch(() => {});
}

export interface FileProbe {
  exists: boolean;
  bytes?: number;
  isLuks?: boolean;
}

export async function probeBackingFile(path: string): Promise<FileProbe> {
  let fh: fs.FileHandle;
  try {
    fh = await fs.open(path, constants.O_RDONLY | constants.O_NOFOLLOW);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return { exists: false };
    throw fromSystemError('EPROBE', `cannot open ${path}`, e);
  }
  try {
    const st = await fh.stat();
    const head = Buffer.alloc(LUKS_MAGIC.length);
    const { bytesRead } = await fh.read(head, 0, head.length, 0);
    return { exists: true, bytes: st.size, isLuks: bytesRead === head.length && head.equals(LUKS_MAGIC) };
  } finally {
    await fh.close();
  }
}
