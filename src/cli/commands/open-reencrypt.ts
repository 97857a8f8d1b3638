/**
 * `cryptmap open` of a LUKS2 device in the middle of a reencryption (cryptsetup 2.6
 * _open_and_activate_reencrypt_device, read, not copied): under cryptsetup's reencryption lock
 * ("Reencryption in-progress. Cannot activate device.", exit 5, while a reencryption runs), a hotzone
 * left in progress by a crash is recovered first (from its checksums, journal or the moved data; a
 * reencryption whose last hotzone that was is finished by it), the old and new volume keys are unlocked
 * with the passphrase, the reencryption metadata is checked against its digest, and the daemon maps
 * each live segment with its key, linear where the data is plaintext (`volume.openReencrypt`):
 * `cryptmap reencrypt --resume-only NAME` then continues online. A volume-key reencryption, an
 * encryption (--encrypt, with a detached header or a data shift) and a decryption are mapped alike.
 */
import { flagOfPersistent, flagsFromOptions } from '../../activate/flags.js';
import { type CryptMapping, persistentFlagsOf } from '../../activate/mapping.js';
import { resolveDevice } from '../../blockdev/open.js';
import type { BlockDevice } from '../../blockdev/types.js';
import type { ControlClient } from '../../control/client.js';
import { mappingToJson } from '../../control/args.js';
import type { VolumeStatus } from '../../control/protocol.js';
import type { SectorBytes } from '../../engine/types.js';
import {
  type L2Segment,
  type Luks2Volume,
  reencryptSegments,
  runReencrypt,
  takeReencryptLock,
  unmetReencryptRequirement,
  withDeviceLock,
} from '../../luks/index.js';
import { CryptmapError } from '../../util/errors.js';
import { passphrasePrompt } from '../device-name.js';
import type { CliIO } from '../types.js';
import { closeQuietly, headerPath, keyFileSource, type LuksArgs, openDevice } from './luks-common.js';
import { loadLuks, openReencryptKeys } from './luks-unlock.js';
import { getPassphrase } from './terminal-input.js';

/** cryptsetup's refusal while another process holds the reencryption lock. */
const ACTIVATE_BUSY = 'Reencryption in-progress. Cannot activate device.';

/** The mapping of one layout of the reencryption (segment `s`, crypt) over `sizeBytes` of data. */
function layoutMapping(
  vol: Luks2Volume,
  s: L2Segment,
  name: string,
  device: string,
  sizeBytes: number,
  v: LuksArgs,
  header: string | undefined,
): CryptMapping {
  const m: CryptMapping = {
    name,
    type: 'LUKS2',
    uuid: vol.uuid,
    device,
    cipher: s.encryption!,
    keyBytes: 0,
    sectorBytes: (s.sector_size ?? 512) as SectorBytes,
    ivOffsetSectors: BigInt(s.iv_tweak ?? '0'),
    offsetSectors: Number(s.offset) / 512,
    sizeSectors: sizeBytes / 512,
    readOnly: v.readonly ?? false,
    allowDiscards: v['allow-discards'] ?? false,
  };
  for (const f of persistentFlagsOf(vol)) m[flagOfPersistent(f)!.field] = true;
  Object.assign(m, flagsFromOptions(v));
  if (header !== undefined) m.header = header;
  return m;
}

/**
 * Have the daemon `c` map `vol` (in reencryption, no hotzone in progress: `st`) as `name`, with the keys
 * `pass` unlocks (checked against the reencryption's digest here and in the daemon).
 */
export async function mapInDaemon(
  c: ControlClient,
  vol: Luks2Volume,
  st: Awaited<ReturnType<typeof reencryptSegments>>,
  device: string,
  name: string,
  v: LuksArgs,
  pass: Uint8Array,
): Promise<VolumeStatus> {
  const keys = await openReencryptKeys(vol, pass, v);
  try {
    // cryptsetup activates (LUKS2_activate_multi) only with no requirement it does not know.
    const unmet = unmetReencryptRequirement(vol.jsonSnapshot());
    if (unmet !== undefined) throw new CryptmapError('EREQUIREMENT', unmet, { exitCode: 1 });
    const dataPath = resolveDevice(device);
    const hdrPathAbs = v.header === undefined ? undefined : resolveDevice(v.header);
    // The daemon maps the header's segments; the mapping names the volume (the crypt side's cipher).
    const crypt = st.layout.previous.type === 'crypt' ? st.layout.previous : st.layout.final;
    const m = layoutMapping(vol, crypt, name, dataPath, st.totalBytes, v, hdrPathAbs);
    m.keyBytes = (crypt === st.layout.previous ? keys.oldKey : keys.newKey)!.length;
    return await c.call(
      'volume.openReencrypt',
      { mapping: mappingToJson(m) },
      {
        ...(keys.oldKey ? { key: keys.oldKey } : {}),
        ...(keys.newKey ? { newKey: keys.newKey } : {}),
      },
    );
  } finally {
    keys.oldKey?.fill(0);
    keys.newKey?.fill(0);
  }
}

/**
 * Open `device` (its header in reencryption) as `name` through the daemon `c`. Returns the daemon's
 * status of the new volume, or null when recovery finished the reencryption (the caller then opens
 * the volume as any other).
 */
export async function openInReencryption(
  io: CliIO,
  c: ControlClient,
  device: string,
  name: string,
  v: LuksArgs,
): Promise<VolumeStatus | null> {
  const hdr = headerPath(v, device);
  const dev = await openDevice(hdr, true);
  let dataDev: BlockDevice | undefined;
  try {
    if (v.header !== undefined) dataDev = await openDevice(device, true);
    // cryptsetup's lock first, without waiting: a reencryption running (either tool) refuses at once.
    const uuid = (await loadLuks(dev, hdr)).uuid;
    const lock = takeReencryptLock(uuid, {
      env: io.env,
      disabled: v['disable-locks'] === true,
      busyMessage: ACTIVATE_BUSY,
    });
    try {
      return await withDeviceLock(
        hdr,
        async () => {
          const vol = (await loadLuks(dev, hdr)) as Luks2Volume;
          if (vol.uuid !== uuid)
            throw new CryptmapError('EINVAL', `The header on ${hdr} changed while it was being opened; try again.`, {
              exitCode: 1,
            });
          let st = await reencryptSegments(vol, dataDev);
          const pass = await getPassphrase(io, passphrasePrompt(device), keyFileSource(v));
          try {
            if (st.hotzone) {
              // A crash left a hotzone half rewritten: recover it (as cryptsetup's open does) and stop.
              const finished = await runReencrypt(vol, pass, {
                ...(dataDev ? { dataDev } : {}),
                signal: AbortSignal.abort(),
              });
              if (finished) return null;
              st = await reencryptSegments(vol, dataDev);
            }
            return await mapInDaemon(c, vol, st, device, name, v, pass);
          } finally {
            pass.fill(0);
          }
        },
        { env: io.env },
      );
    } finally {
      lock.release();
    }
  } finally {
    await closeQuietly(dataDev);
    await closeQuietly(dev);
  }
}
