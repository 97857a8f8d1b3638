/**
 * The volume verbs with cryptsetup's messages and exit codes: open, close, luksSuspend, luksResume,
 * refresh, resize. Each runs inside the core's per-name serialisation (core.ts); the key checks
 * compare in constant time and never keep a key beyond the keyring.
 */
import { createHmac, randomBytes } from 'node:crypto';
import { allFlags } from '../activate/flags.js';
import { checkExclusiveAccess, deviceInUseError } from '../blockdev/exclusive.js';
import { loopBackingFile } from '../blockdev/loop.js';
import {
  type CryptMapping,
  cryptTableLine,
  dmUuid,
  keyDescription,
  keyLocation,
  keyRefArg,
} from '../activate/mapping.js';
import type { RefreshFlags } from '../control/protocol.js';
import type { MappedDevice } from '../dm/index.js';
import { nbdUnixUri } from '../nbd/index.js';
import { constantTimeEqual, wipe } from '../util/bytes.js';
import {
  CryptmapError,
  type ErrorCode,
  EXIT_BUSY,
  EXIT_FAILURE,
  EXIT_WRONG_DEVICE,
  isCryptmapError,
} from '../util/errors.js';
import { logger } from '../util/log.js';
import { runTool } from '../util/tools.js';
import type { Secret } from '../util/secret.js';
import { exportIfLive, removeDevice, removeSuspended } from './export-sync.js';
import type { CoreParts } from './volume-table.js';

const log = logger('daemon');

const notActive = (name: string) =>
  new CryptmapError('ENODEV', `Device ${name} is not active.`, { exitCode: EXIT_WRONG_DEVICE, errno: 'ENOENT' });
const notLuksActive = (name: string) => `${name} is not active LUKS device name or header is missing.`;
const suspended = (name: string) =>
  new CryptmapError('ESUSPENDED', `Volume ${name} is suspended (luksResume it first).`, {
    exitCode: EXIT_FAILURE,
    errno: 'EINVAL',
  });

/** How a volume is opened. */
export interface OpenOptions {
  /**
   * cryptsetup's `--shared` (CRYPT_ACTIVATE_SHARED): skip the exclusive-access check, so a block
   * device another mapping of this daemon uses can be mapped again (any range, overlapping or not:
   * cryptsetup has allowed overlapping shared segments since 1.5). Without it a block device that
   * anything holds (a mapping, a mount) is refused with cryptsetup's "Cannot use device X which is in
   * use (already mapped or mounted)." (exit 5).
   */
  shared?: boolean;
}

/**
 * Create a crypt mapping for an unlocked volume and export it. Takes a copy of the key. As
 * cryptsetup 2.6 (lib/setup.c _activate_check_status, then create_or_reload_device): the name
 * first ("Device X already exists.", exit 5), then the data device's exclusive-access check unless
 * `shared` (blockdev/exclusive.ts; the registry's claim on the devices of live tables is what makes
 * a mapped device fail it).
 */
export async function openVolume(
  p: CoreParts,
  m: CryptMapping,
  volumeKey: Secret,
  opts: OpenOptions = {},
): Promise<void> {
  if (p.registry.find(m.name)) {
    throw new CryptmapError('EEXIST', `Device ${m.name} already exists.`, { exitCode: EXIT_BUSY, errno: 'EEXIST' });
  }
  if (opts.shared !== true) await checkExclusiveAccess(m.device);
  if (volumeKey.length !== m.keyBytes)
    throw new CryptmapError('EKEY_SIZE', `volume key has ${volumeKey.length} bytes, mapping needs ${m.keyBytes}`);
  const desc = keyDescription(m.name);
  p.keyring.set(desc, volumeKey.expose());
  try {
    try {
      await p.dm.create(m.name, { table: cryptTableLine(m, keyRefArg(m)), uuid: dmUuid(m), readOnly: m.readOnly });
    } catch (e) {
      // The registry's claim failed (with --shared: something outside this daemon holds the device).
      // Its error names the table line, as `dmsetup` would; open says what cryptsetup says.
      if (isCryptmapError(e) && e.code === 'EBUSY') throw deviceInUseError(m.device);
      throw e;
    }
    try {
      exportIfLive(p, m.name);
    } catch (e) {
      await p.dm.remove(m.name, { force: true });
      throw e;
    }
  } catch (e) {
    p.keyring.delete(desc);
    throw e;
  }
  p.volumes.get(m.name).mapping = m;
  log.info('volume opened', { name: m.name, type: m.type, device: m.device, nbd: nbdUnixUri(m.name, p.nbdSocketPath) });
}

export async function closeVolume(p: CoreParts, name: string, force: boolean): Promise<void> {
  const dev = p.registry.find(name);
  if (!dev) throw notActive(name);
  if (dev.suspended) await removeSuspended(p, name, force);
  else await removeDevice(p, name, force);
  log.info('volume closed', { name });
}

/**
 * The active volume `name` opened through this daemon: cryptsetup's "not active" (exit 4) when
 * there is no such device; with `notLuksMessage`, only LUKS volumes (else that message, exit 1);
 * without it, any volume (a bare dm device gets cryptsetup's "not supported", exit 1).
 */
function activeVolume(p: CoreParts, name: string, notLuksMessage?: string): { dev: MappedDevice; m: CryptMapping } {
  const dev = p.registry.find(name);
  if (!dev) throw notActive(name);
  const m = p.volumes.find(name)?.mapping;
  if (m === undefined && notLuksMessage === undefined) {
    throw new CryptmapError('ENOTSUP', 'This operation is not supported for this device type.', {
      exitCode: EXIT_FAILURE,
      errno: 'ENOTSUP',
    });
  }
  if (notLuksMessage !== undefined && (m === undefined || (m.type !== 'LUKS1' && m.type !== 'LUKS2'))) {
    throw new CryptmapError('ENOTLUKS', notLuksMessage, { exitCode: EXIT_FAILURE, errno: 'EINVAL' });
  }
  return { dev, m: m! };
}

/**
 * luksSuspend (cryptsetup lib/setup.c crypt_suspend): suspend the device (new I/O waits, in-flight
 * I/O drains, flush), wipe the crypt target's key (`key wipe` message) and drop the volume key from
 * the keyring. Only LUKS volumes opened through this daemon. Errors as cryptsetup 2.6:
 * not active -> exit 4; not LUKS or already suspended -> exit 1.
 */
export async function suspendVolume(p: CoreParts, name: string): Promise<void> {
  const { dev, m } = activeVolume(p, name, 'This operation is supported only for LUKS device.');
  if (dev.suspended)
    throw new CryptmapError('ESUSPENDED', `Volume ${name} is already suspended.`, {
      exitCode: EXIT_FAILURE,
      errno: 'EINVAL',
    });
  const desc = keyDescription(name);
  let keyTag: { salt: Buffer; tag: Buffer } | undefined;
  if (p.keyring.has(desc)) {
    const key = await p.keyring.resolve({ type: 'logon', description: desc, keyBytes: m.keyBytes });
    const salt = randomBytes(32);
    keyTag = { salt, tag: createHmac('sha256', salt).update(key.expose()).digest() };
    key.dispose();
  }
  try {
    await p.dm.suspend(name);
  } catch (e) {
    throw new CryptmapError('ESUSPEND', `Error during suspending device ${name}.`, {
      exitCode: EXIT_FAILURE,
      cause: e,
    });
  }
  try {
    await p.dm.message(name, 0, ['key', 'wipe']);
  } catch (e) {
    await p.dm.resume(name);
    throw new CryptmapError('ESUSPEND', `Error during suspending device ${name}.`, {
      exitCode: EXIT_FAILURE,
      cause: e,
    });
  }
  p.keyring.delete(desc);
  if (keyTag) p.volumes.get(name).suspendedKeyTag = keyTag;
  log.info('volume suspended', { name });
}

/**
 * luksResume (cryptsetup lib/setup.c crypt_resume_by_*, libdevmapper.c dm_resume_and_reinstate_key):
 * put the volume key back in the keyring, `key set :<bytes>:logon:cryptmap:<name>` (the reference
 * the table already uses), resume. The caller has unlocked a keyslot with it; the daemon also checks
 * it is the key the volume was suspended with (a keyed hash kept at suspend). Takes a copy of the key.
 * Errors as cryptsetup 2.6: not active -> exit 4; not LUKS, not suspended -> exit 1. On failure the
 * device stays suspended with its key wiped (retryable).
 */
export async function resumeVolume(
  p: CoreParts,
  name: string,
  volumeKey: Secret,
  opts: { disableKeyring?: boolean } = {},
): Promise<void> {
  const { dev, m } = activeVolume(p, name, notLuksActive(name));
  if (!dev.suspended)
    throw new CryptmapError('ENOTSUSPENDED', `Volume ${name} is not suspended.`, {
      exitCode: EXIT_FAILURE,
      errno: 'EINVAL',
    });
  if (volumeKey.length !== m.keyBytes)
    throw new CryptmapError('EKEY_SIZE', `volume key has ${volumeKey.length} bytes, ${name} needs ${m.keyBytes}`);
  const rec = p.volumes.get(name);
  const was = rec.suspendedKeyTag;
  if (was !== undefined) {
    const tag = createHmac('sha256', was.salt).update(volumeKey.expose()).digest();
    const same = constantTimeEqual(tag, was.tag);
    wipe(tag);
    if (!same)
      throw new CryptmapError('EKEYMISMATCH', `The volume key does not match the key of suspended device ${name}.`, {
        exitCode: EXIT_FAILURE,
        errno: 'EINVAL',
      });
  }
  const desc = keyDescription(name);
  p.keyring.set(desc, volumeKey.expose());
  let keySet = false;
  try {
    await p.dm.message(name, 0, ['key', 'set', keyRefArg(m)]);
    keySet = true;
    await p.dm.resume(name);
  } catch (e) {
    if (keySet) await p.dm.message(name, 0, ['key', 'wipe']).catch(() => undefined);
    p.keyring.delete(desc);
    throw new CryptmapError('ERESUME', `Error during resuming device ${name}.`, { exitCode: EXIT_FAILURE, cause: e });
  }
  delete rec.suspendedKeyTag;
  // cryptsetup: the resumed key is in the keyring again unless --disable-keyring (LUKS2 only).
  if (m.type === 'LUKS2') {
    const next: CryptMapping = { ...m };
    if (opts.disableKeyring) next.keyNotInKeyring = true;
    else delete next.keyNotInKeyring;
    rec.mapping = next;
  }
  log.info('volume resumed', { name });
}

/**
 * cryptsetup refresh (open --refresh; lib/setup.c with CRYPT_ACTIVATE_REFRESH): reload the active
 * LUKS volume's table with new activation flags and swap it in (dmsetup load, suspend, resume: I/O
 * drains and continues under the new table). The caller unlocked a keyslot; its key must be the one
 * the volume runs with. Errors: not active -> exit 4; not LUKS, suspended, other key -> exit 1; a
 * failed load leaves the old table live.
 */
export async function refreshVolume(p: CoreParts, name: string, flags: RefreshFlags, volumeKey: Secret): Promise<void> {
  const { dev, m } = activeVolume(p, name, notLuksActive(name));
  if (dev.suspended) throw suspended(name);
  await checkRunningKey(p, m, volumeKey);
  await swapTable(p, { ...m, ...allFlags(flags) }, 'EREFRESH', 'refresh');
  log.info('volume refreshed', { name });
}

/**
 * cryptsetup resize (lib/setup.c crypt_resize): measure the volume's device again, then reload its
 * table with `sizeSectors` (default: all of the device after the data offset, rounded down to the
 * crypto sector) and swap it in. For LUKS2 with its key in the keyring (not --disable-keyring) the
 * caller must bring the volume key (cryptsetup asks for the passphrase); it must be the running one. New NBD connections
 * see the new size. Errors as cryptsetup 2.6: not active -> exit 4; misaligned or too large -> 1.
 */
export async function resizeVolume(
  p: CoreParts,
  name: string,
  sizeSectors: number | undefined,
  volumeKey?: Secret,
): Promise<void> {
  const { dev, m } = activeVolume(p, name);
  if (dev.suspended) throw suspended(name);
  if (keyLocation(m) === 'keyring') {
    if (volumeKey === undefined)
      throw new CryptmapError('EKEY', `Resizing LUKS2 volume ${name} needs its volume key (the passphrase).`, {
        exitCode: EXIT_FAILURE,
      });
    await checkRunningKey(p, m, volumeKey);
  }
  // A loop device first takes its backing file's size (cryptsetup: crypt_loop_resize; a failure is
  // only reported, the device is measured as it is).
  if (loopBackingFile(m.device) !== undefined) {
    await runTool('losetup', ['-c', m.device], { code: 'ERESIZE', timeoutMs: 30_000 }).catch((err: unknown) =>
      log.warn('Cannot resize loop device.', { device: m.device, err: String(err) }),
    );
  }
  // A file or block device is measured again; a mapped device below has its live size.
  const deviceBytes =
    (await p.registry.refreshFileSize(m.device)) ??
    p.registry.find(m.device.replace(/^\/dev\/mapper\//, ''))?.sizeBytes ??
    0;
  const availableSectors = Math.floor(deviceBytes / 512) - m.offsetSectors;
  const perSector = m.sectorBytes / 512;
  const size = sizeSectors ?? availableSectors - (availableSectors % perSector);
  if (sizeSectors !== undefined && (!Number.isSafeInteger(sizeSectors) || sizeSectors <= 0)) {
    throw new CryptmapError('EARGS', `Invalid size ${sizeSectors}.`, { exitCode: EXIT_FAILURE });
  }
  if (size % perSector !== 0)
    throw new CryptmapError('EALIGN', 'Device size is not aligned to requested sector size.', {
      exitCode: EXIT_FAILURE,
      errno: 'EINVAL',
    });
  if (size <= 0 || size > availableSectors)
    throw new CryptmapError('EDEVSIZE', `Device ${m.device} is too small.`, {
      exitCode: EXIT_FAILURE,
      errno: 'EINVAL',
    });
  if (size === m.sizeSectors) return;
  await swapTable(p, { ...m, sizeSectors: size }, 'ERESIZE', 'resize');
  log.info('volume resized', { name, sizeSectors: size });
}

/** The key a caller brings (refresh, resize) must be the one volume `m` runs with (constant-time compare). */
async function checkRunningKey(p: CoreParts, m: CryptMapping, volumeKey: Secret): Promise<void> {
  const live = await p.keyring.resolve({ type: 'logon', description: keyDescription(m.name), keyBytes: m.keyBytes });
  const same = volumeKey.length === live.length && constantTimeEqual(volumeKey.expose(), live.expose());
  live.dispose();
  if (!same)
    throw new CryptmapError('EKEYMISMATCH', 'Volume key does not match the volume.', {
      exitCode: EXIT_FAILURE,
      errno: 'EPERM',
    });
}

/** Load `next`'s table for its volume, then swap it in (suspend: I/O drains; resume). A failed load leaves the old table live. */
async function swapTable(p: CoreParts, next: CryptMapping, code: ErrorCode, what: string): Promise<void> {
  try {
    await p.dm.load(next.name, cryptTableLine(next, keyRefArg(next)));
  } catch (e) {
    await p.dm.clear(next.name).catch(() => undefined);
    throw new CryptmapError(code, `Cannot ${what} ${next.name}: ${(e as Error).message}`, {
      exitCode: EXIT_FAILURE,
      cause: e,
    });
  }
  await p.dm.suspend(next.name);
  await p.dm.resume(next.name);
  p.volumes.get(next.name).mapping = next;
}
