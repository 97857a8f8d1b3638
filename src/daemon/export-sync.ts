/**
 * The dm <-> export sync: every mapped device with a live table is exported over NBD under its
 * name; before a device goes, its attachment and export go (refused while in use, unless forced).
 * `syncedDm` wraps the dmsetup verbs so exports follow the devices whoever changes them.
 */
import { keyDescription } from '../activate/mapping.js';
import type { DmControl } from '../dm/index.js';
import { CryptmapError, EXIT_BUSY } from '../util/errors.js';
import { logger } from '../util/log.js';
import { mountedAt } from '../util/tools.js';
import { detachNow } from './attachments.js';
import type { CoreParts } from './volume-table.js';

const log = logger('daemon');

/** Run `fn` after every earlier lifecycle operation on the key (the core's per-name serialisation). */
export type Serial = <T>(key: string, fn: () => Promise<T>) => Promise<T>;

const inUse = (name: string, conns: number) =>
  new CryptmapError('EBUSY', `Device ${name} is still in use (${conns} NBD connection${conns === 1 ? '' : 's'}).`, {
    exitCode: EXIT_BUSY,
    errno: 'EBUSY',
  });

/** Export `name` over NBD when it has a live table and is not exported yet. */
export function exportIfLive(p: CoreParts, name: string): void {
  const dev = p.registry.find(name);
  if (!dev?.hasLiveTable || p.volumes.find(name)?.exportHandle) return;
  const handle = p.registry.open(name);
  try {
    p.nbd.addExport(name, { device: handle, description: `cryptmap ${name}`, readOnly: dev.readOnly });
  } catch (e) {
    void handle.close();
    throw e;
  }
  p.volumes.get(name).exportHandle = handle;
}

/** Stop exporting `name` (refused while NBD clients or a mounted attachment use it, unless forced). */
export async function unexport(p: CoreParts, name: string, force: boolean): Promise<void> {
  const rec = p.volumes.find(name);
  const handle = rec?.exportHandle;
  if (!rec || !handle) return;
  const attached = rec.attachment;
  if (attached) {
    const where = mountedAt(attached.devicePath);
    if (where !== undefined && !force) {
      throw new CryptmapError(
        'EBUSY',
        `Device ${name} is still in use (${attached.devicePath} is mounted on ${where}).`,
        { exitCode: EXIT_BUSY, errno: 'EBUSY' },
      );
    }
    await detachNow(p, rec);
  }
  const conns = p.nbd.connectionCount(name);
  if (!force && conns > 0) throw inUse(name, conns);
  await p.nbd.removeExport(name);
  delete rec.exportHandle;
  p.volumes.prune(name);
  // A device whose storage failed (an NBD server gone for good) cannot flush; it still closes, as
  // the kernel removes a mapping over a dead disk. The failure was already reported to the writers.
  await handle
    .close()
    .catch((e: unknown) =>
      log.warn('flush on close failed', { name, error: e instanceof Error ? e.message : String(e) }),
    );
}

/** Forget `name`: its record (mapping, key check) and its volume key. */
function forget(p: CoreParts, name: string): void {
  p.volumes.delete(name);
  p.keyring.delete(keyDescription(name));
}

/** Remove device `name`: attachment and export first; a failed remove exports it again. */
export async function removeDevice(p: CoreParts, name: string, force: boolean): Promise<void> {
  p.registry.get(name);
  const wasExported = p.volumes.find(name)?.exportHandle !== undefined;
  await unexport(p, name, force);
  try {
    await p.dm.remove(name, { force });
  } catch (e) {
    if (wasExported) exportIfLive(p, name);
    throw e;
  }
  forget(p, name);
}

/**
 * Remove a suspended device (as the kernel does, without resuming it). Its data was flushed when it
 * was suspended; the export's flush and any queued NBD request would wait at the closed gate for
 * ever, so the device goes first (queued I/O then fails with EIO), then the export. An attached
 * device is refused: detaching flushes through the kernel client, which would wait too.
 */
export async function removeSuspended(p: CoreParts, name: string, force: boolean): Promise<void> {
  const rec = p.volumes.find(name);
  if (rec?.attachment) {
    throw new CryptmapError(
      'EBUSY',
      `Device ${name} is still in use (suspended and attached as ${rec.attachment.devicePath}; resume it first).`,
      { exitCode: EXIT_BUSY, errno: 'EBUSY' },
    );
  }
  const conns = p.nbd.connectionCount(name);
  if (!force && conns > 0) throw inUse(name, conns);
  // Other openers than the export (the kernel's open count check).
  const others = p.registry.get(name).openCount - (rec?.exportHandle ? 1 : 0);
  if (!force && others > 0)
    throw new CryptmapError('EBUSY', `Device ${name} is still in use.`, { exitCode: EXIT_BUSY, errno: 'EBUSY' });
  await p.dm.remove(name, { force: true });
  await unexport(p, name, true);
  forget(p, name);
}

/** The dmsetup verbs, serialised per device, with NBD exports following the devices. */
export function syncedDm(p: CoreParts, serial: Serial): DmControl {
  const dm = p.dm;
  return {
    create: (name, opts) =>
      serial(name, async () => {
        await dm.create(name, opts);
        try {
          exportIfLive(p, name);
        } catch (e) {
          await dm.remove(name, { force: true });
          throw e;
        }
      }),
    remove: (name, opts) => serial(name, () => removeDevice(p, name, opts?.force ?? false)),
    load: (name, table) => serial(name, () => dm.load(name, table)),
    clear: (name) => serial(name, () => dm.clear(name)),
    suspend: (name, opts) => serial(name, () => dm.suspend(name, opts)),
    resume: (name) =>
      serial(name, async () => {
        await dm.resume(name);
        exportIfLive(p, name);
      }),
    rename: (oldName, newName) =>
      serial(oldName, async () => {
        if (p.volumes.find(oldName)?.mapping)
          throw new CryptmapError(
            'EBUSY',
            `Device ${oldName} is a cryptmap volume; close and reopen it under the new name.`,
            { exitCode: EXIT_BUSY },
          );
        const exported = p.volumes.find(oldName)?.exportHandle !== undefined;
        await unexport(p, oldName, false);
        try {
          await dm.rename(oldName, newName);
        } finally {
          if (exported) exportIfLive(p, p.registry.find(newName) ? newName : oldName);
        }
      }),
    table: (name, opts) => dm.table(name, opts),
    status: (name) => dm.status(name),
    info: (name) => dm.info(name),
    ls: () => dm.ls(),
    message: (name, sector, msg) => serial(name, () => dm.message(name, sector, msg)),
  };
}
