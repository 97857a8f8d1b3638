/**
 * One place that turns a device argument into a BlockDevice: an NBD URI (`nbd://`, `nbds://`,
 * `nbd+unix://`, `nbds+unix://`) opens the NBD client, anything else a file or block device.
 * The CLI, activation and the dm registry's `<dev>` arguments all go through here.
 */
import { resolve } from 'node:path';
import { isNbdUri } from '../nbd-wire/uri.js';
import { FileDevice } from './file.js';
import { NbdDevice } from './nbd-client/device.js';
import type { BlockDevice } from './types.js';

/** True for an argument that names a remote export rather than a path. */
export function isRemoteDevice(arg: string): boolean {
  return isNbdUri(arg);
}

/** A path made absolute (against the cwd); a URI as it is. */
export function resolveDevice(arg: string): string {
  return isNbdUri(arg) ? arg : resolve(arg);
}

/** Open a path (FileDevice) or an NBD URI (NbdDevice). */
export function openBlockDevice(arg: string, opts: { readOnly: boolean }): Promise<BlockDevice> {
  return isNbdUri(arg)
    ? NbdDevice.open(arg, { readOnly: opts.readOnly })
    : FileDevice.open(arg, { readOnly: opts.readOnly });
}
