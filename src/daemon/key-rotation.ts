/**
 * Key rotation for the agent's persistent volumes (issue 16 item 5, docs/keyservice.md):
 *
 * - `rotateVolumeKey`: a new volume key, the data reencrypted online (reencrypt-online.ts) while the
 *   volume stays served. The keyslot passphrase stays the key service's derived key.
 * - `rewrapVolume`: the keyslot moves to the key derived from another root secret (a root rotation):
 *   a keyslot for the new passphrase is added, then the old one removed; the volume key and the data
 *   do not change. Each step is one crash-safe header write and the whole is idempotent: whatever
 *   opens tells where a crashed run got to, so running it again over a fleet finishes the job.
 */
import { openBlockDevice } from '../blockdev/open.js';
import type { VolumeStatus } from '../control/protocol.js';
import {
  initReencrypt,
  inReencryption,
  Luks2Volume,
  openLuks,
  unlockInReencryption,
  unlockReencryptKeys,
  withDeviceLock,
} from '../luks/index.js';
import type { KeyPort, VolumeTarget } from '../reconciler/ports.js';
import { VOLUME_KEYSLOT_PBKDF } from '../reconciler/ports.js';
import { CryptmapError, EXIT_BUSY, isCryptmapError } from '../util/errors.js';
import { Secret } from '../util/secret.js';
import type { DaemonCore } from './core.js';

/** Bytes of a persistent volume's keyslot passphrase (reconciler/apply.ts VOLUME_PASSPHRASE_BYTES). */
const PASSPHRASE_BYTES = 32;

function derive(keys: KeyPort, t: VolumeTarget, generation: 'current' | 'next' | 'previous'): Promise<Secret> {
  return keys.deriveKey({
    purpose: 'scratch',
    service: t.service,
    volume: t.volume,
    length: PASSPHRASE_BYTES,
    ...(generation !== 'current' ? { generation } : {}),
  });
}

async function withVolume<T>(t: VolumeTarget, fn: (vol: Luks2Volume) => Promise<T>): Promise<T> {
  return withDeviceLock(t.path, async () => {
    const dev = await openBlockDevice(t.path, { readOnly: false });
    try {
      const vol = await openLuks(dev);
      if (!(vol instanceof Luks2Volume))
        throw new CryptmapError('ENOTLUKS', `${t.id}: ${t.path} is not LUKS2`, { exitCode: 1 });
      return await fn(vol);
    } finally {
      await dev.close();
    }
  });
}

/**
 * Give persistent volume `t` (open in `core`) a new volume key, reencrypting it online. Returns once
 * the reencryption runs (its progress: `core.statusOf(t.mapping).reencrypt`); a reencryption left
 * half-way (stopped, crashed) is resumed.
 */
export async function rotateVolumeKey(
  core: DaemonCore,
  keys: KeyPort,
  t: VolumeTarget,
  o: { hotzoneBytes?: number } = {},
): Promise<VolumeStatus> {
  if (t.kind !== 'scratch' || t.class !== 'persistent')
    throw new CryptmapError('ENOVOLUME', `${t.id} is not a persistent volume: only those keep a key to rotate`, {
      exitCode: 1,
    });
  if (!core.statusOf(t.mapping).active)
    throw new CryptmapError('ENOVOLUME', `${t.id} is not open (the agent opens it once it is ready)`, { exitCode: 4 });
  return await withVolume(t, async (vol) => {
    const pass = await passphraseOf(keys, t, vol);
    try {
      if (!inReencryption(vol.jsonSnapshot())) {
        await refuseOtherKeyslots(vol, pass, t);
        await initReencrypt(vol, pass.expose(), { kdf: { ...VOLUME_KEYSLOT_PBKDF }, resilience: 'checksum' });
      }
      const k = await unlockReencryptKeys(vol, pass.expose());
      const oldKey = k.oldKey ? new Secret(k.oldKey) : undefined;
      const newKey = k.newKey ? new Secret(k.newKey) : undefined;
      try {
        return await core.reencryptVolume(t.mapping, oldKey, newKey, o);
      } finally {
        oldKey?.dispose();
        newKey?.dispose();
      }
    } finally {
      pass.dispose();
    }
  });
}

/**
 * The keyslot passphrase that opens `vol`: the key derived from the current root secret, or, when a
 * root rotation left this volume half-way (docs/keyservice.md), from the next or the previous one.
 */
async function passphraseOf(keys: KeyPort, t: VolumeTarget, vol: Luks2Volume): Promise<Secret> {
  const inReenc = inReencryption(vol.jsonSnapshot());
  for (const gen of ['current', 'next', 'previous'] as const) {
    let p: Secret;
    try {
      p = await derive(keys, t, gen);
    } catch (e) {
      if (gen !== 'current' && (isCryptmapError(e, 'ENOROOT') || isCryptmapError(e, 'EKEYREQ'))) continue;
      throw e;
    }
    try {
      if (inReenc) await unlockInReencryption(vol, p.expose());
      else if ((await slotOf(vol, p)) === undefined) throw new CryptmapError('ENOKEY', 'no key');
      return p;
    } catch (e) {
      p.dispose();
      if (!isCryptmapError(e, 'ENOKEY')) throw e;
    }
  }
  throw new CryptmapError('EUNLOCK', `${t.id}: no keyslot unlocks with this volume's key (any root secret)`, {
    exitCode: 2,
    errno: 'EPERM',
  });
}

export type RewrapResult = 'rewrapped' | 'done-already' | 'nothing-to-do';

/**
 * A new volume key gets a keyslot only for the key service's passphrase (the agent knows no other), so
 * any other keyslot of the volume key (a recovery passphrase someone added) would be gone when the
 * reencryption finishes. Refused instead (loses nothing), with what to do: remove those keyslots, or
 * reencrypt with `cryptmap reencrypt`, which asks for every keyslot's passphrase.
 */
async function refuseOtherKeyslots(vol: Luks2Volume, pass: Secret, t: VolumeTarget): Promise<void> {
  const own = await slotOf(vol, pass);
  const others = vol
    .keyslots()
    .filter((k) => k.active && !k.unbound && k.id !== own)
    .map((k) => k.id);
  if (others.length === 0) return;
  throw new CryptmapError(
    'EKEYSLOT',
    `${t.id}: keyslot${others.length > 1 ? 's' : ''} ${others.join(', ')} of ${t.path} hold${others.length > 1 ? '' : 's'} ` +
      "another passphrase, which a new volume key would drop (only the key service's passphrase gets a keyslot of it); " +
      'remove it first (cryptmap luksKillSlot), or rotate with cryptmap reencrypt, which asks for every passphrase',
    { exitCode: 1 },
  );
}

/** The keyslot `pass` opens, or undefined. */
async function slotOf(vol: Luks2Volume, pass: Secret): Promise<number | undefined> {
  try {
    const r = await vol.unlock(pass.expose());
    r.volumeKey.dispose();
    return r.keyslot;
  } catch (e) {
    if (isCryptmapError(e, 'ENOKEY')) return undefined;
    throw e;
  }
}

/**
 * Move persistent volume `t`'s keyslot to the newest root secret the key service has: `next` while a
 * root rotation is under way (from `current`), else `current` (from `previous`, after a commit).
 * Idempotent: a volume whose old keyslot is gone already is `done-already`.
 */
export async function rewrapVolume(keys: KeyPort, t: VolumeTarget): Promise<RewrapResult> {
  let to: Secret;
  let from: Secret | undefined;
  try {
    to = await derive(keys, t, 'next');
    from = await derive(keys, t, 'current');
  } catch (e) {
    if (!isCryptmapError(e, 'ENOROOT')) throw e;
    to = await derive(keys, t, 'current');
    try {
      from = await derive(keys, t, 'previous');
    } catch (e2) {
      if (!isCryptmapError(e2, 'ENOROOT')) {
        to.dispose();
        throw e2;
      }
      to.dispose();
      return 'nothing-to-do';
    }
  }
  try {
    return await withVolume(t, async (vol) => {
      if (inReencryption(vol.jsonSnapshot()))
        throw new CryptmapError('EBUSY', `${t.id} is in reencryption: finish it first`, {
          exitCode: EXIT_BUSY,
          errno: 'EBUSY',
        });
      const toSlot = await slotOf(vol, to);
      const fromSlot = from ? await slotOf(vol, from) : undefined;
      if (toSlot === undefined) {
        if (fromSlot === undefined)
          throw new CryptmapError('EUNLOCK', `${t.id}: neither the old nor the new root secret's key opens it`, {
            exitCode: 2,
            errno: 'EPERM',
          });
        await vol.addKey({ passphrase: from!.expose() }, to.expose(), { kdf: { ...VOLUME_KEYSLOT_PBKDF } });
      }
      if (fromSlot !== undefined && fromSlot !== toSlot) {
        await vol.killSlot(fromSlot);
        return 'rewrapped';
      }
      return 'done-already';
    });
  } finally {
    to.dispose();
    from?.dispose();
  }
}
