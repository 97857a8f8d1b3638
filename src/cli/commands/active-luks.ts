/**
 * Shared by the verbs that need the volume key of an active LUKS volume again (luksResume, refresh,
 * resize): as cryptsetup's crypt_init_by_name_and_header, the header is --header or the mapping's
 * device (a detached header given at open must be given again, as with cryptsetup), and its type and UUID must give the mapping's dm uuid
 * (CRYPT-LUKS2-<uuid>-<name>); then a keyslot is unlocked exactly as `open` does (tokens, prompt with
 * --tries, key file) and the volume key goes to the daemon once, as raw bytes over the 0600 control socket
 * (docs/secrets.md).
 */
import { dmUuid } from '../../activate/mapping.js';
import type { BlockDevice } from '../../blockdev/types.js';
import type { ControlClient } from '../../control/client.js';
import type { MappingJson, VolumeStatus } from '../../control/protocol.js';
import type { Luks1Volume, Luks2Volume } from '../../luks/index.js';
import { CryptmapError, EXIT_FAILURE, EXIT_WRONG_DEVICE, isCryptmapError } from '../../util/errors.js';
import type { CliIO } from '../types.js';
import { closeQuietly, type LuksArgs } from './luks-common.js';
import { loadLuksForRead, unlockForOpen } from './luks-unlock.js';

export const notActive = (name: string) =>
  new CryptmapError('ENODEV', `Device ${name} is not active.`, { exitCode: EXIT_WRONG_DEVICE });
export const notLuks = (name: string) =>
  new CryptmapError('ENOTLUKS', `${name} is not active LUKS device name or header is missing.`, {
    exitCode: EXIT_FAILURE,
  });

/** The daemon's status of `name` and its dm uuid; cryptsetup's "Device NAME is not active." (exit 4) otherwise. */
export async function activeVolume(c: ControlClient, name: string): Promise<{ st: VolumeStatus; uuid: string }> {
  const st = await c.call('volume.status', { name });
  const info = st.active ? (await c.call('dm.info', { name }))[0] : undefined;
  if (info === undefined) throw notActive(name);
  return { st, uuid: info.uuid };
}

/** Load the header of the active mapping and check it is the one the mapping was made from. */
export async function loadMatchingHeader(
  name: string,
  st: VolumeStatus,
  dmUuidNow: string,
  v: LuksArgs,
): Promise<{ dev: BlockDevice; vol: Luks1Volume | Luks2Volume }> {
  const m = st.mapping;
  if (m === undefined || (m.type !== 'LUKS1' && m.type !== 'LUKS2')) throw notLuks(name);
  // The header is --header or the data device, as cryptsetup finds it (crypt_init_by_name_and_header):
  // the daemon remembers a detached header, but a command line must name it, so a script behaves as
  // with cryptsetup (a detached header that is not at hand stays "missing").
  const hdr = v.header ?? m.device;
  let loaded: { dev: BlockDevice; vol: Luks1Volume | Luks2Volume };
  try {
    loaded = await loadLuksForRead(hdr, v);
  } catch (e) {
    if (!isCryptmapError(e)) throw e;
    throw notLuks(name);
  }
  const { dev, vol } = loaded;
  const type = vol.type === 'luks1' ? 'LUKS1' : 'LUKS2';
  if (dmUuid({ type, uuid: vol.uuid, name }) !== dmUuidNow) {
    await closeQuietly(dev);
    throw notLuks(name);
  }
  return loaded;
}

/**
 * cryptsetup's view of an active volume's header: a volume opened with a detached header has it only
 * when the command line names that header again (`--header`); otherwise cryptsetup finds no header
 * and treats the device as one of no type (status `type: n/a`, resize and refresh refused).
 */
export function headerMissing(m: MappingJson | undefined, header: string | undefined): boolean {
  return m?.header !== undefined && header === undefined;
}

/** `--type luks1|luks2` must name the header's type (cryptsetup: "NAME is not active LUKS1 device name.", exit 1). */
export function checkLuksType(name: string, reqType: string | undefined, vol: Luks1Volume | Luks2Volume): void {
  const type = vol.type === 'luks1' ? 'LUKS1' : 'LUKS2';
  if (reqType !== undefined && reqType !== 'luks' && reqType.toUpperCase() !== type) {
    throw new CryptmapError('ENOTLUKS', `${name} is not active ${reqType.toUpperCase()} device name.`, {
      exitCode: EXIT_FAILURE,
    });
  }
}

/**
 * Unlock the matching header of active volume `name` and give its volume key (raw bytes, wiped after `send`) to `send`.
 * `check` runs on the loaded header before any passphrase is asked (type checks, reading flags).
 */
export async function sendActiveVolumeKey(
  io: CliIO,
  name: string,
  active: { st: VolumeStatus; uuid: string },
  v: LuksArgs,
  send: (key: Buffer) => Promise<void>,
  check?: (vol: Luks1Volume | Luks2Volume) => void,
): Promise<void> {
  const { dev, vol } = await loadMatchingHeader(name, active.st, active.uuid, v);
  try {
    check?.(vol);
    // Prompt with the data device's name, as cryptsetup's tools_get_key does.
    const r = await unlockForOpen(io, vol, active.st.mapping!.device, v);
    try {
      await send(r.volumeKey.expose());
    } finally {
      r.volumeKey.dispose();
    }
  } finally {
    try {
      await vol.close();
    } finally {
      await closeQuietly(dev);
    }
  }
}

/**
 * `sendActiveVolumeKey` for active LUKS volume `name` as the daemon reports it (cryptsetup's "not active"
 * otherwise), with `--type` checked against its header before `check`; returns the daemon's status.
 */
export async function sendActiveLuksKey(
  c: ControlClient,
  io: CliIO,
  name: string,
  v: LuksArgs,
  send: (key: Buffer) => Promise<void>,
  check?: (vol: Luks1Volume | Luks2Volume, st: VolumeStatus) => void,
): Promise<VolumeStatus> {
  const active = await activeVolume(c, name);
  await sendActiveVolumeKey(io, name, active, v, send, (vol) => {
    checkLuksType(name, v.type, vol);
    check?.(vol, active.st);
  });
  return active.st;
}
