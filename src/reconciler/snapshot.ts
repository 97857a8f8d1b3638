/**
 * `cryptmap volume snapshot SERVICE/VOLUME NAME`: a snapshot of a volume in a thin pool, taken by
 * the running agent while the volume stays open.
 *
 * What a snapshot of an encrypted volume is here: a snapshot of the thin device that holds the
 * volume's LUKS2 header and ciphertext (the pool's `create_snap`, with the origin's thin device
 * suspended around it as the kernel requires: I/O in flight drains, the pool commits, new I/O
 * waits). So the snapshot has the same header, keyslot and volume key: the service's derived key
 * opens it, and it shows the data as of the moment the thin device was suspended (crash-consistent:
 * what a file system above had not written yet is not in it; `fsfreeze` the mountpoint first for
 * more). Only persistent volumes: an ephemeral volume's key lives for one boot.
 *
 * The snapshot's thin id is recorded (volume record `snapshots`) before the pool makes it, so a
 * crash in between leaves a record naming an id that may not exist, never an unrecorded device.
 */
import { CryptmapError, EXIT_BUSY, EXIT_WRONG_DEVICE, EXIT_WRONG_PARAMS } from '../util/errors.js';
import { type StatePort, freeThinId, recordedThinIds, targetOfRecord } from './apply.js';
import { NAME_PATTERN } from './manifest-schema.js';
import type { PoolPorts, PoolTarget } from './ports.js';

export interface SnapshotOptions {
  /** `scratch/<service>/<volume>`, or `<service>/<volume>`. */
  volume: string;
  name: string;
  store: StatePort;
  ports: PoolPorts;
  /** The pools of the current manifest. */
  pools: PoolTarget[];
  now?: () => string;
}

/** The state id of `SERVICE/VOLUME` (or of an id given in full). */
export function volumeIdOf(arg: string): string {
  return arg.startsWith('scratch/') ? arg : `scratch/${arg}`;
}

export async function snapshotVolume(o: SnapshotOptions): Promise<{ volume: string; name: string; thinId: number }> {
  const id = volumeIdOf(o.volume);
  if (!new RegExp(NAME_PATTERN).test(o.name))
    throw new CryptmapError(
      'EARGS',
      `snapshot name '${o.name}' must be 1-64 letters, digits, . _ - starting with a letter or digit`,
      {
        exitCode: EXIT_WRONG_PARAMS,
      },
    );
  const state = await o.store.load();
  const r = state.volumes[id];
  if (!r)
    throw new CryptmapError('ENOVOLUME', `no volume '${id}' in the agent's record`, {
      exitCode: EXIT_WRONG_DEVICE,
      errno: 'ENOENT',
    });
  if (r.pool === undefined || r.thinId === undefined)
    throw new CryptmapError(
      'ENOTSUP',
      `${id} is not in a thin pool (manifest pool:); only volumes in a pool have snapshots`,
      {
        exitCode: 1,
        errno: 'ENOTSUP',
      },
    );
  if (r.class !== 'persistent')
    throw new CryptmapError(
      'ENOTSUP',
      `${id} is ephemeral: its key lasts one boot, a snapshot of it could not be opened after`,
      {
        exitCode: 1,
        errno: 'ENOTSUP',
      },
    );
  if (r.snapshots?.[o.name] !== undefined)
    throw new CryptmapError('EEXIST', `${id} already has a snapshot '${o.name}'`, {
      exitCode: EXIT_BUSY,
      errno: 'EEXIST',
    });
  const pool = o.pools.find((p) => p.name === r.pool!.name);
  if (pool === undefined)
    throw new CryptmapError('EPOOL', `the pool ${r.pool.name} of ${id} is not in the manifest`, {
      exitCode: EXIT_WRONG_DEVICE,
    });
  const thinId = freeThinId([...(await o.ports.poolDeviceIds(pool)), ...recordedThinIds(state, pool.name)]);
  r.snapshots = { ...r.snapshots, [o.name]: { thinId, createdAt: (o.now ?? (() => new Date().toISOString()))() } };
  await o.store.save(state);
  try {
    await o.ports.snapshot(targetOfRecord(r), thinId);
  } catch (e) {
    delete r.snapshots[o.name];
    if (Object.keys(r.snapshots).length === 0) delete r.snapshots;
    await o.store.save(state);
    throw e;
  }
  return { volume: id, name: o.name, thinId };
}
