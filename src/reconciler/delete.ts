/**
 * `cryptmap volume delete`: the only way a persistent volume's file is removed. Refused while the
 * manifest still names the volume (the reconciler would recreate it empty: remove it from the
 * manifest first) and while it is open, attached or mounted (stop the agent or wait for the
 * teardown). Deletes the backing file, then forgets the record.
 */
import { CryptmapError, EXIT_BUSY } from '../util/errors.js';
import { type StatePort, targetOfRecord } from './apply.js';
import { deleteBackingFile, probeBackingFile } from './file-ops.js';
import type { VolumePorts, VolumeTarget } from './ports.js';

export interface DeleteOptions {
  /** `scratch/<service>/<volume>` or `swap/<name>` (as `cryptmap agent status` lists it). */
  id: string;
  store: StatePort;
  ports: VolumePorts;
  /** The volumes the current manifest names. */
  desired: VolumeTarget[];
}

export async function deleteVolume(opts: DeleteOptions): Promise<{ path: string }> {
  const state = await opts.store.load();
  const r = state.volumes[opts.id];
  if (!r)
    throw new CryptmapError('ENOVOLUME', `no volume '${opts.id}' in the agent's record`, {
      exitCode: 4,
      errno: 'ENOENT',
    });
  if (opts.desired.some((t) => t.id === opts.id)) {
    throw new CryptmapError('EVOLUME_NAMED', `${opts.id} is still in the manifest; remove it from the manifest first`, {
      exitCode: EXIT_BUSY,
      errno: 'EBUSY',
    });
  }
  if (r.pool !== undefined)
    throw new CryptmapError(
      'ENOTSUP',
      `${opts.id} is a thin device of pool ${r.pool.name}: deleting a volume in a pool is not supported yet (it needs the pool open)`,
      { exitCode: 1, errno: 'ENOTSUP' },
    );
  const t = targetOfRecord(r);
  const p = await opts.ports.probe(t);
  if (p.open || p.attached || p.mounted) {
    throw new CryptmapError(
      'EVOLUME_BUSY',
      `${opts.id} is still in use (open, attached or mounted); let the agent tear it down first`,
      { exitCode: EXIT_BUSY, errno: 'EBUSY' },
    );
  }
  await opts.ports.deleteFile(t);
  delete state.volumes[opts.id];
  await opts.store.save(state);
  return { path: r.path };
}

/** Ports for a stopped agent (what `cryptmap volume delete` uses): files only, since nothing can be open without the agent process. */
export function stoppedAgentPorts(): VolumePorts {
  const no = async (): Promise<never> => {
    throw new CryptmapError('EINTERNAL', 'not available without a running agent');
  };
  return {
    async probe(t) {
      const f = await probeBackingFile(t.path);
      const p = { fileExists: f.exists, open: false, attached: false, mounted: false };
      return f.bytes === undefined ? p : { ...p, fileBytes: f.bytes, isLuks: f.isLuks ?? false };
    },
    createFile: no,
    deleteFile: (t) => deleteBackingFile(t.path),
    format: no,
    open: no,
    openPlain: no,
    close: no,
    attach: no,
    detach: no,
    mkfs: no,
    mount: no,
    unmount: no,
  };
}
