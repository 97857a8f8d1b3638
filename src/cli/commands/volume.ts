/**
 * `cryptmap volume delete ID --state-dir DIR [--manifest FILE]`: remove a persistent volume's file
 * for good (reconciler/delete.ts). Refused while an agent runs on DIR, while the manifest still names
 * the volume (without --manifest: while the record does not say `retired`, i.e. the last agent run
 * still had it in its manifest), and while it is in use.
 *
 * `cryptmap volume snapshot SERVICE/VOLUME NAME --state-dir DIR`: a snapshot of a volume in a thin
 * pool, taken by the agent running on DIR (over its control socket, DIR/run/control.sock) while the
 * volume stays open (reconciler/snapshot.ts).
 *
 * `cryptmap volume rotate-key SERVICE/VOLUME --state-dir DIR [--hotzone-size BYTES]`: the agent
 * running on DIR gives that persistent volume a new volume key, reencrypting it online; this waits
 * and prints the progress. `cryptmap volume rewrap-keys --state-dir DIR`: the agent moves every
 * persistent volume's keyslot to the key service's newest root secret (docs/keyservice.md).
 */
import { parseArgs } from 'node:util';
import { join } from 'node:path';
import type { ControlClient } from '../../control/client.js';
import { AGENT_RUN_DIR, AGENT_VOLUME_DIR, runningAgentPid } from '../../reconciler/agent-dir.js';
import { deleteVolume, stoppedAgentPorts } from '../../reconciler/delete.js';
import { loadManifest } from '../../reconciler/manifest.js';
import { desiredVolumes } from '../../reconciler/plan.js';
import type { VolumeTarget } from '../../reconciler/ports.js';
import { StateStore } from '../../reconciler/state.js';
import { CryptmapError, EXIT_BUSY, EXIT_WRONG_DEVICE, EXIT_WRONG_PARAMS } from '../../util/errors.js';
import { withDaemon } from '../daemon-client.js';
import type { CliIO, VerbMain } from '../types.js';

const USAGE =
  'usage: cryptmap volume delete ID --state-dir DIR [--manifest FILE]\n' +
  '       cryptmap volume snapshot SERVICE/VOLUME NAME --state-dir DIR\n' +
  '       cryptmap volume rotate-key SERVICE/VOLUME --state-dir DIR [--hotzone-size BYTES]\n' +
  '       cryptmap volume rewrap-keys --state-dir DIR\n';

const volume: VerbMain = async (argv, io) => {
  let parsed: ReturnType<
    typeof parseArgs<{
      options: {
        'state-dir': { type: 'string' };
        manifest: { type: 'string' };
        'hotzone-size': { type: 'string' };
        help: { type: 'boolean'; short: 'h' };
      };
      allowPositionals: true;
      strict: true;
    }>
  >;
  try {
    parsed = parseArgs({
      args: argv.slice(1),
      options: {
        'state-dir': { type: 'string' },
        manifest: { type: 'string' },
        'hotzone-size': { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
      allowPositionals: true,
      strict: true,
    });
  } catch (e) {
    throw new CryptmapError('EARGS', `${(e as Error).message}\n${USAGE.trimEnd()}`, { exitCode: EXIT_WRONG_PARAMS });
  }
  const { values: v, positionals } = parsed;
  if (v.help) {
    io.stdout.write(USAGE);
    return 0;
  }
  const [sub, id, ...rest] = positionals;
  if (sub === 'snapshot') {
    const [name, ...more] = rest;
    if (id === undefined || name === undefined || more.length > 0 || !v['state-dir'] || v.manifest !== undefined)
      throw new CryptmapError('EARGS', USAGE.trimEnd(), { exitCode: EXIT_WRONG_PARAMS });
    const stateDir = v['state-dir'];
    if (runningAgentPid(stateDir) === undefined)
      throw new CryptmapError(
        'EDAEMON_DOWN',
        `no cryptmap agent runs on ${stateDir}: a snapshot is taken by the running agent (the volume open)`,
        { exitCode: EXIT_WRONG_DEVICE },
      );
    const r = await withDaemon(join(stateDir, AGENT_RUN_DIR), io.env, (c) =>
      c.call('agent.snapshot', { volume: id, name }),
    );
    io.stdout.write(`snapshot ${r.name} of ${r.volume}: thin device ${r.thinId}\n`);
    return 0;
  }
  if (sub === 'rotate-key' && id !== undefined && rest.length === 0 && v['state-dir'])
    return rotateKey(io, v['state-dir'], id, v['hotzone-size']);
  if (sub === 'rewrap-keys' && id === undefined && v['state-dir']) return rewrapKeys(io, v['state-dir']);
  if (sub !== 'delete' || id === undefined || rest.length > 0 || !v['state-dir']) {
    throw new CryptmapError('EARGS', USAGE.trimEnd(), { exitCode: EXIT_WRONG_PARAMS });
  }
  const stateDir = v['state-dir'];
  const pid = runningAgentPid(stateDir);
  if (pid !== undefined)
    throw new CryptmapError(
      'EAGENT_RUNNING',
      `a cryptmap agent (pid ${pid}) is running on ${stateDir}; remove the volume from its manifest and stop the agent first`,
      { exitCode: EXIT_BUSY, errno: 'EBUSY' },
    );
  const store = new StateStore(stateDir);
  let desired: VolumeTarget[];
  if (v.manifest) desired = desiredVolumes(await loadManifest(v.manifest), `${stateDir}/${AGENT_VOLUME_DIR}`);
  else {
    const r = (await store.load()).volumes[id];
    if (r && r.phase !== 'retired') {
      throw new CryptmapError(
        'EVOLUME_NAMED',
        `${id} was still in the agent's manifest at its last run (state ${r.phase}); remove it from the manifest and run the agent, or give --manifest`,
        {
          exitCode: EXIT_BUSY,
          errno: 'EBUSY',
        },
      );
    }
    desired = [];
  }
  const { path } = await deleteVolume({ id, store, ports: stoppedAgentPorts(), desired });
  io.stdout.write(`deleted ${id} (${path})\n`);
  return 0;
};

/** The agent running on `stateDir`, through its control socket. */
function withAgent<T>(io: CliIO, stateDir: string, fn: (c: ControlClient) => Promise<T>): Promise<T> {
  if (runningAgentPid(stateDir) === undefined)
    throw new CryptmapError('EDAEMON_DOWN', `no cryptmap agent runs on ${stateDir}`, { exitCode: 1 });
  return withDaemon(join(stateDir, AGENT_RUN_DIR), io.env, fn);
}

async function rotateKey(io: CliIO, stateDir: string, id: string, hotzone: string | undefined): Promise<number> {
  const hotzoneBytes = hotzone === undefined ? undefined : Number(hotzone);
  if (hotzoneBytes !== undefined && !(Number.isSafeInteger(hotzoneBytes) && hotzoneBytes > 0))
    throw new CryptmapError('EARGS', 'Invalid --hotzone-size value.', { exitCode: EXIT_WRONG_PARAMS });
  return withAgent(io, stateDir, async (c) => {
    const st = await c.call('agent.rotateKey', { id, ...(hotzoneBytes !== undefined ? { hotzoneBytes } : {}) });
    let last = '';
    for (;;) {
      const r = (await c.call('volume.status', { name: st.name })).reencrypt;
      const line = r ? `${id}: ${r.state} ${((r.doneBytes / Math.max(1, r.totalBytes)) * 100).toFixed(1)}%` : '';
      if (line !== last && r?.state !== 'running') io.stdout.write(`${line}\n`);
      last = line;
      if (!r || r.state === 'failed')
        throw new CryptmapError('EREENCRYPT', `rotating the key of ${id} failed: ${r?.error ?? 'no reencryption'}`, {
          exitCode: 1,
        });
      if (r.state !== 'running') return r.state === 'finished' ? 0 : 1;
      await new Promise((res) => setTimeout(res, 200));
    }
  });
}

async function rewrapKeys(io: CliIO, stateDir: string): Promise<number> {
  return withAgent(io, stateDir, async (c) => {
    const rows = await c.call('agent.rewrapKeys', {});
    for (const r of rows) io.stdout.write(`${r.id}: ${r.result}${r.error ? ` (${r.error})` : ''}\n`);
    return rows.some((r) => r.result === 'failed') ? 1 : 0;
  });
}

export default volume;
