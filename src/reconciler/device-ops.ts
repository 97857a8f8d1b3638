/**
 * The backing-file operations of file-ops.ts for a volume on shared storage: a manifest `device:`
 * naming an NBD export (issue 15 item 2). An export cannot be created or deleted by the agent, so:
 *
 * - "exists" means the export holds something: its first BLANK_CHECK_BYTES are not all zero. A
 *   blank export is the only thing the agent ever formats (as it only formats files it made); one
 *   that holds anything else (a file system, another format) is refused, never overwritten.
 * - createDeviceVolume: the export is reachable, large enough and still blank (else EEXIST, so
 *   the apply loop forgets its record without touching it).
 * - blankDeviceHeader: the "delete" of a volume whose creation this agent began and never finished
 *   (its record says so): the header area is zeroed, which makes it blank again.
 * - probeDevice: reachable, size, blank, LUKS magic. An unreachable export reports `unreachable`.
 */
import { openBlockDevice } from '../blockdev/open.js';
import type { BlockDevice } from '../blockdev/types.js';
import { CryptmapError } from '../util/errors.js';
import { LUKS_MAGIC } from './file-ops.js';

/** Bytes read to decide that an export is blank (LUKS, ext4, xfs and swap signatures all lie within it). */
export const BLANK_CHECK_BYTES = 1 << 20;

export interface DeviceProbe {
  reachable: boolean;
  /** Why not (reachable false). */
  unreachable?: string;
  bytes?: number;
  blank?: boolean;
  isLuks?: boolean;
}

/** One connection for one question; closed before returning. Connection problems fail fast. */
async function withDevice<T>(uri: string, readOnly: boolean, fn: (dev: BlockDevice) => Promise<T>): Promise<T> {
  const dev = await openBlockDevice(uri, { readOnly });
  try {
    return await fn(dev);
  } finally {
    await dev.close().catch(() => {});
  }
}

async function head(dev: BlockDevice): Promise<{ blank: boolean; isLuks: boolean }> {
  const n = Math.min(BLANK_CHECK_BYTES, dev.sizeBytes);
  const buf = Buffer.alloc(n);
  await dev.read(0, buf);
  return {
    blank: buf.equals(Buffer.alloc(n)),
    isLuks: n >= LUKS_MAGIC.length && buf.subarray(0, LUKS_MAGIC.length).equals(LUKS_MAGIC),
  };
}

export async function probeDevice(uri: string): Promise<DeviceProbe> {
  try {
    return await withDevice(uri, true, async (dev) => ({
      reachable: true,
      bytes: dev.sizeBytes,
      ...(await head(dev)),
    }));
  } catch (e) {
    return { reachable: false, unreachable: e instanceof Error ? e.message : String(e) };
  }
}

/** Check that the export can take a new volume of `minBytes` (header + data); EEXIST if it holds something. */
export async function createDeviceVolume(uri: string, minBytes: number): Promise<void> {
  await withDevice(uri, false, async (dev) => {
    if (dev.sizeBytes < minBytes) {
      throw new CryptmapError(
        'ECREATE',
        `${uri} is too small: ${dev.sizeBytes} bytes, a volume needs at least ${minBytes}`,
        { errno: 'ENOSPC', exitCode: 5 },
      );
    }
    if (!(await head(dev)).blank) {
      throw new CryptmapError(
        'ECREATE',
        `${uri} is not blank (its first ${BLANK_CHECK_BYTES} bytes hold data); it is never formatted automatically`,
        {
          errno: 'EEXIST',
          exitCode: 5,
        },
      );
    }
  });
}

/** Zero the first `bytes` of the export (a half-made volume's header), flushed. */
export async function blankDeviceHeader(uri: string, bytes: number): Promise<void> {
  await withDevice(uri, false, async (dev) => {
    const n = Math.min(bytes, dev.sizeBytes);
    if (dev.capabilities.writeZeroes) await dev.writeZeroes(0, n);
    else {
      const zero = Buffer.alloc(Math.min(n, 1 << 20));
      for (let off = 0; off < n; off += zero.length)
        await dev.write(off, zero.subarray(0, Math.min(zero.length, n - off)));
    }
    await dev.flush();
  });
}
