/**
 * DmControl over the control socket: every dmsetup verb becomes one `dm.<verb>` request to the
 * daemon, which runs it on its registry. The daemon side is `dmHandlers` below.
 */
import type { DmControl } from '../dm/control.js';
import { CryptmapError } from '../util/errors.js';
import type { ControlClient } from './client.js';
import type { ControlOp, OpHandlers } from './protocol.js';

export function remoteDmControl(c: ControlClient): DmControl {
  return {
    create: async (name, opts) => void (await c.call('dm.create', { name, ...opts })),
    remove: async (name, opts) => void (await c.call('dm.remove', { name, ...opts })),
    load: async (name, table) => void (await c.call('dm.load', { name, table })),
    clear: async (name) => void (await c.call('dm.clear', { name })),
    suspend: async (name, opts) => void (await c.call('dm.suspend', { name, ...opts })),
    resume: async (name) => void (await c.call('dm.resume', { name })),
    rename: async (oldName, newName) => void (await c.call('dm.rename', { oldName, newName })),
    table: (name, opts) => c.call('dm.table', { name, ...opts }),
    status: (name) => c.call('dm.status', { name }),
    info: (name) => c.call('dm.info', { name }),
    ls: () => c.call('dm.ls'),
    message: (name, sector, message) => c.call('dm.message', { name, sector, message }),
  };
}

type Args = Readonly<Record<string, unknown>>;
function str(a: Args, k: string): string {
  const v = a[k];
  if (typeof v !== 'string') throw new CryptmapError('EPROTO', `control request needs string '${k}'`);
  return v;
}
function optStr(a: Args, k: string): string | undefined {
  return a[k] === undefined || a[k] === null ? undefined : str(a, k);
}
function bool(a: Args, k: string): boolean {
  return a[k] === true;
}

/** The dmsetup operations. */
export type DmOp = Extract<ControlOp, `dm.${string}`>;

/** Control handlers for `dm.*`, over any DmControl (the daemon's). */
export function dmHandlers(dm: DmControl): OpHandlers<DmOp> {
  return {
    'dm.create': async (a) => {
      const opts: { table?: string; uuid?: string; readOnly?: boolean } = { readOnly: bool(a, 'readOnly') };
      const table = optStr(a, 'table');
      const uuid = optStr(a, 'uuid');
      if (table !== undefined) opts.table = table;
      if (uuid !== undefined) opts.uuid = uuid;
      await dm.create(str(a, 'name'), opts);
    },
    'dm.remove': (a) => dm.remove(str(a, 'name'), { force: bool(a, 'force') }),
    'dm.load': (a) => dm.load(str(a, 'name'), str(a, 'table')),
    'dm.clear': (a) => dm.clear(str(a, 'name')),
    'dm.suspend': (a) => dm.suspend(str(a, 'name'), { noflush: bool(a, 'noflush') }),
    'dm.resume': (a) => dm.resume(str(a, 'name')),
    'dm.rename': (a) => dm.rename(str(a, 'oldName'), str(a, 'newName')),
    'dm.table': (a) => dm.table(optStr(a, 'name'), { showKeys: bool(a, 'showKeys') }),
    'dm.status': (a) => dm.status(optStr(a, 'name')),
    'dm.info': (a) => dm.info(optStr(a, 'name')),
    'dm.ls': () => dm.ls(),
    'dm.message': (a) => {
      const msg = a.message;
      if (!Array.isArray(msg) || !msg.every((m) => typeof m === 'string'))
        throw new CryptmapError('EPROTO', "control request needs string array 'message'");
      const sector = a.sector;
      if (typeof sector !== 'number' || !Number.isSafeInteger(sector) || sector < 0)
        throw new CryptmapError('EPROTO', "control request needs integer 'sector'");
      return dm.message(str(a, 'name'), sector, msg as string[]);
    },
  };
}
