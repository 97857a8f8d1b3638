/**
 * Control-socket operations of the daemon: `dm.*` (dmsetup verbs), `volume.*` (open, close,
 * suspend, resume, status, list), `attach`/`detach`, `daemon.ping`. Args never reach a log: they may carry keys.
 */
import { allFlags, pickFlags } from '../activate/flags.js';
import type { CryptMapping } from '../activate/mapping.js';
import { dmHandlers } from '../control/dm-remote.js';
import type { ControlHandlers } from '../control/server.js';
import { CryptmapError } from '../util/errors.js';
import { Secret } from '../util/secret.js';
import type { DaemonCore, RefreshFlags } from './core.js';
import { VIAS, type Via } from './fuse-export.js';

function need<T>(v: unknown, check: (x: unknown) => boolean, what: string): T {
  if (!check(v)) throw new CryptmapError('EPROTO', `control request: bad or missing '${what}'`);
  return v as T;
}
const isStr = (x: unknown) => typeof x === 'string' && x.length > 0;

/**
 * The volume key of a request: raw bytes sent after the request line (control/protocol.ts `bin`),
 * a Buffer the control server wipes once the handler is done. The core takes copies of its own.
 */
function keyOf(a: Record<string, unknown>): Secret {
  return new Secret(need<Buffer>(a.key, (x) => Buffer.isBuffer(x) && x.length > 0, 'key (binary)'));
}
const isUint = (x: unknown) => typeof x === 'number' && Number.isSafeInteger(x) && x >= 0;

/** Rebuild a CryptMapping from its JSON form, checking every field. */
export function mappingFromJson(v: unknown): CryptMapping {
  const o = need<Record<string, unknown>>(v, (x) => typeof x === 'object' && x !== null, 'mapping');
  const m: CryptMapping = {
    name: need(o.name, isStr, 'mapping.name'),
    type: need(o.type, (x) => x === 'LUKS1' || x === 'LUKS2' || x === 'PLAIN', 'mapping.type'),
    uuid: need(o.uuid, (x) => typeof x === 'string', 'mapping.uuid'),
    device: need(o.device, isStr, 'mapping.device'),
    cipher: need(o.cipher, isStr, 'mapping.cipher'),
    keyBytes: need(o.keyBytes, isUint, 'mapping.keyBytes'),
    sectorBytes: need(o.sectorBytes, (x) => x === 512 || x === 1024 || x === 2048 || x === 4096, 'mapping.sectorBytes'),
    ivOffsetSectors: BigInt(need<string>(o.ivOffsetSectors, (x) => typeof x === 'string' && /^[0-9]+$/.test(x), 'mapping.ivOffsetSectors')),
    offsetSectors: need(o.offsetSectors, isUint, 'mapping.offsetSectors'),
    sizeSectors: need(o.sizeSectors, isUint, 'mapping.sizeSectors'),
    readOnly: o.readOnly === true,
    allowDiscards: o.allowDiscards === true,
  };
  Object.assign(m, pickFlags(o));
  if (o.ivLargeSectors === true) m.ivLargeSectors = true;
  if (typeof o.header === 'string') m.header = o.header;
  if (isUint(o.keyslot)) m.keyslot = o.keyslot as number;
  return m;
}

export function mappingToJson(m: CryptMapping): Record<string, unknown> {
  return { ...m, ivOffsetSectors: m.ivOffsetSectors.toString() };
}

export function daemonHandlers(core: DaemonCore): ControlHandlers {
  return {
    ...dmHandlers(core.dm()),
    'daemon.ping': async () => ({ pid: process.pid, nbdSocket: core.nbdSocketPath }),
    'volume.open': async (a) => {
      const m = mappingFromJson(a.mapping);
      const key = keyOf(a);
      try {
        return await core.openVolume(m, key);
      } finally {
        key.dispose();
      }
    },
    'volume.suspend': async (a) => core.suspendVolume(need(a.name, isStr, 'name')),
    'volume.resume': async (a) => {
      const name = need<string>(a.name, isStr, 'name');
      const key = keyOf(a);
      try {
        return await core.resumeVolume(name, key);
      } finally {
        key.dispose();
      }
    },
    'volume.refresh': async (a) => {
      const name = need<string>(a.name, isStr, 'name');
      const f = (a.flags ?? {}) as Record<string, unknown>;
      if (typeof f !== 'object' || f === null || Array.isArray(f)) throw new CryptmapError('EPROTO', 'flags must be an object');
      const flags: RefreshFlags = allFlags(pickFlags(f));
      const key = keyOf(a);
      try {
        return await core.refreshVolume(name, flags, key);
      } finally {
        key.dispose();
      }
    },
    'volume.resize': async (a) => {
      const name = need<string>(a.name, isStr, 'name');
      const size = a.sizeSectors === undefined ? undefined : need<number>(a.sizeSectors, (x) => typeof x === 'number' && Number.isSafeInteger(x), 'sizeSectors');
      if (a.key === undefined) return core.resizeVolume(name, size);
      const key = keyOf(a);
      try {
        return await core.resizeVolume(name, size, key);
      } finally {
        key.dispose();
      }
    },
    'volume.close': async (a) => core.closeVolume(need(a.name, isStr, 'name'), { force: a.force === true }),
    'volume.status': async (a) => core.statusOf(need(a.name, isStr, 'name')),
    'volume.list': async () => core.volumes(),
    attach: async (a) => {
      const via = a.via === undefined ? 'auto' : need<Via | 'auto'>(a.via, (x) => x === 'auto' || VIAS.includes(x as Via), 'via');
      return core.attach(need(a.name, isStr, 'name'), { readOnly: a.readOnly === true, via });
    },
    detach: async (a) => core.detach(need(a.name, isStr, 'name')),
  };
}
