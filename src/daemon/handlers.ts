/**
 * Control-socket operations of the daemon (control/protocol.ts ControlOps): `dm.*` (dmsetup verbs),
 * `volume.*` (open, close, suspend, resume, refresh, resize, reencrypt, status, list), `attach`/`detach`,
 * `daemon.ping`; `agent.*` (the agent's key rotation: agent-host.ts serves them, a plain daemon refuses). Args never reach a log: they may carry keys. Keyed operations take the key through
 * `withKey` (wiped however the call ends).
 */
import { allFlags, pickFlags } from '../activate/flags.js';
import { mappingFromJson, nameArg, need, withKey, withKeyPair } from '../control/args.js';
import { dmHandlers } from '../control/dm-remote.js';
import { type OpHandlers, VIAS, type Via } from '../control/protocol.js';
import { CryptmapError } from '../util/errors.js';
import type { DaemonCore } from './core.js';

export function daemonHandlers(core: DaemonCore): OpHandlers {
  return {
    ...dmHandlers(core.dm()),
    'daemon.ping': async () => ({ pid: process.pid, nbdSocket: core.nbdSocketPath }),
    'volume.open': (a) =>
      withKey(a, (key) => core.openVolume(mappingFromJson(a.mapping), key, { shared: a.shared === true })),
    'volume.suspend': async (a) => core.suspendVolume(nameArg(a.name)),
    'volume.resume': (a) =>
      withKey(a, (key) => core.resumeVolume(nameArg(a.name), key, { disableKeyring: a.disableKeyring === true })),
    'volume.refresh': (a) => {
      const name = nameArg(a.name);
      const f = a.flags ?? {};
      if (typeof f !== 'object' || f === null || Array.isArray(f))
        throw new CryptmapError('EPROTO', 'flags must be an object');
      return withKey(a, (key) => core.refreshVolume(name, allFlags(pickFlags(f)), key));
    },
    'volume.resize': async (a) => {
      const name = nameArg(a.name);
      const size =
        a.sizeSectors === undefined
          ? undefined
          : need<number>(a.sizeSectors, (x) => typeof x === 'number' && Number.isSafeInteger(x), 'sizeSectors');
      if (a.key === undefined) return core.resizeVolume(name, size);
      return withKey(a, (key) => core.resizeVolume(name, size, key));
    },
    'volume.reencrypt': (a) => {
      const name = nameArg(a.name);
      const hotzoneBytes =
        a.hotzoneBytes === undefined
          ? undefined
          : need<number>(
              a.hotzoneBytes,
              (x) => typeof x === 'number' && Number.isSafeInteger(x) && x > 0,
              'hotzoneBytes',
            );
      return withKeyPair(a, (oldKey, newKey) =>
        core.reencryptVolume(name, oldKey, newKey, hotzoneBytes === undefined ? {} : { hotzoneBytes }),
      );
    },
    'volume.openReencrypt': (a) => {
      const m = mappingFromJson(a.mapping);
      return withKeyPair(a, (oldKey, newKey) => core.openReencryptingVolume(m, oldKey, newKey));
    },
    'volume.reencryptStop': async (a) => core.stopReencrypt(nameArg(a.name)),
    'agent.rotateKey': async () => {
      throw new CryptmapError('ENOTSUP', 'only a cryptmap agent rotates the keys of its service volumes', {
        exitCode: 1,
      });
    },
    'agent.rewrapKeys': async () => {
      throw new CryptmapError('ENOTSUP', 'only a cryptmap agent rewraps the keys of its service volumes', {
        exitCode: 1,
      });
    },
    'volume.close': async (a) => core.closeVolume(nameArg(a.name), { force: a.force === true }),
    'volume.status': async (a) => core.statusOf(nameArg(a.name)),
    'volume.list': async () => core.volumes(),
    attach: async (a) => {
      const via =
        a.via === undefined ? 'auto' : need<Via | 'auto'>(a.via, (x) => x === 'auto' || VIAS.includes(x as Via), 'via');
      return core.attach(nameArg(a.name), { readOnly: a.readOnly === true, via });
    },
    detach: async (a) => core.detach(nameArg(a.name)),
    'agent.snapshot': async () => {
      throw new CryptmapError('ENOTSUP', 'snapshots of volumes are taken by a cryptmap agent, not by the daemon', {
        errno: 'ENOTSUP',
      });
    },
  };
}
