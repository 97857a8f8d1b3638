/**
 * `cryptmap volume delete ID --state-dir DIR [--manifest FILE]`: remove a persistent volume's file
 * for good (reconciler/delete.ts). Refused while an agent runs on DIR, while the manifest still names
 * the volume (without --manifest: while the record does not say `retired`, i.e. the last agent run
 * still had it in its manifest), and while it is in use.
 *
 * `cryptmap volume snapshot SERVICE/VOLUME NAME --state-dir DIR`: a snapshot of a volume in a thin
 * pool, taken by the agent running on DIR (over its control socket, DIR/run/control.sock) while the
 * volume stays open (reconciler/snapshot.ts).
 */
import { parseArgs } from 'node:util';
import { join } from 'node:path';
import { AGENT_RUN_DIR, AGENT_VOLUME_DIR, runningAgentPid } from '../../reconciler/agent-dir.js';
import { deleteVolume, stoppedAgentPorts } from '../../reconciler/delete.js';
import { loadManifest } from '../../reconciler/manifest.js';
import { desiredVolumes } from '../../reconciler/plan.js';
import type { VolumeTarget } from '../../reconciler/ports.js';
import { StateStore } from '../../reconciler/state.js';
import { CryptmapError, EXIT_BUSY, EXIT_WRONG_DEVICE, EXIT_WRONG_PARAMS } from '../../util/errors.js';
import { withDaemon } from '../daemon-client.js';
import type { VerbMain } from '../types.js';

const USAGE =
  'usage: cryptmap volume delete ID --state-dir DIR [--manifest FILE]\n' +
  '       cryptmap volume snapshot SERVICE/VOLUME NAME --state-dir DIR\n';

const volume: VerbMain = async (argv, io) => {
  let parsed: ReturnType<
    typeof parseArgs<{
      options: { 'state-dir': { type: 'string' }; manifest: { type: 'string' }; help: { type: 'boolean'; short: 'h' } };
      allowPositionals: true;
      strict: true;
    }>
  >;
  try {
    parsed = parseArgs({
      args: argv.slice(1),
      options: { 'state-dir': { type: 'string' }, manifest: { type: 'string' }, help: { type: 'boolean', short: 'h' } },
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

export default volume;
