/**
 * Attachments: an exported device made a kernel block device (fuse-export.ts: the built-in FUSE
 * export + loop, the kernel NBD client, or nbdfuse), recorded in the device's VolumeRecord.
 */
import type { Attachment, Via } from '../control/protocol.js';
import { CryptmapError, EXIT_BUSY, EXIT_WRONG_DEVICE } from '../util/errors.js';
import { logger } from '../util/log.js';
import { mountedAt } from '../util/tools.js';
import type { CoreParts, VolumeRecord } from './volume-table.js';

const log = logger('daemon');

/** Attach exported device `name` (again: its attachment). `via` default: the best transport present. */
export async function attach(
  p: CoreParts,
  name: string,
  opts: { readOnly?: boolean; swap?: boolean; via?: Via | 'auto' },
): Promise<Attachment> {
  const rec = p.volumes.find(name);
  const handle = rec?.exportHandle;
  if (!rec || !handle)
    throw new CryptmapError('ENODEV', `Device ${name} is not active.`, {
      exitCode: EXIT_WRONG_DEVICE,
      errno: 'ENOENT',
    });
  if (rec.attachment) return rec.attachment;
  const dev = p.registry.get(name);
  const info = await p.fuse.attach(name, handle, {
    via: opts.via,
    readOnly: (opts.readOnly ?? false) || dev.readOnly,
    logicalBlockBytes: dev.limits.logicalBlockBytes,
    swap: opts.swap ?? false,
  });
  rec.attachment = info;
  log.info('volume attached', { name, device: info.devicePath, via: info.via });
  return info;
}

/** Detach `name`; refused while its block device is mounted. */
export async function detach(p: CoreParts, name: string): Promise<void> {
  const rec = p.volumes.find(name);
  const info = rec?.attachment;
  if (!rec || !info)
    throw new CryptmapError('ENOTATTACHED', `Device ${name} is not attached.`, { exitCode: EXIT_WRONG_DEVICE });
  const where = mountedAt(info.devicePath);
  if (where !== undefined) {
    throw new CryptmapError('EBUSY', `Device ${info.devicePath} is mounted on ${where}; unmount it first.`, {
      exitCode: EXIT_BUSY,
      errno: 'EBUSY',
    });
  }
  await detachNow(p, rec);
}

/** Detach without asking (the caller checked, or is removing the device). */
export async function detachNow(p: CoreParts, rec: VolumeRecord): Promise<void> {
  if (!rec.attachment) return;
  await p.fuse.detach(rec.attachment);
  delete rec.attachment;
  p.volumes.prune(rec.name);
  log.info('volume detached', { name: rec.name });
}

/** Shutdown: detach everything, logging what fails. */
export async function detachAll(p: CoreParts): Promise<void> {
  for (const rec of p.volumes.values()) {
    if (!rec.attachment) continue;
    try {
      await p.fuse.detach(rec.attachment);
    } catch (e) {
      log.error('detach failed at shutdown', { name: rec.name, error: e instanceof Error ? e.message : String(e) });
    }
    delete rec.attachment;
  }
}
