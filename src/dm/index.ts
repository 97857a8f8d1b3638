/**
 * Public surface of dm/: the device mapper in userspace.
 *   new DeviceRegistry({ keyStore? })      devices by name; create/load/suspend/resume/remove/rename/message
 *   registry.open(name): BlockDevice       an I/O handle (counted in the open count)
 *   new InProcessDmControl(registry)       the dmsetup verbs as data (DmControl)
 *   parseTable(text), formatTableLine(...)  dmsetup table syntax
 *   BUILTIN_TARGETS                        linear, striped, zero, error, crypt, mirror, thin-pool, thin (ops tables)
 *
 * @module cryptmap/dm
 */
export { DeviceRegistry, checkDeviceName, type CreateOptions, type DeviceRegistryOptions } from './registry.js';
export { DM_MAJOR, MappedDevice } from './mapped-device.js';
export { DeviceIoStats, IO_OPS, type IoOp, type IoOpStats } from './io-stats.js';
export { MAX_TABLE_SECTORS, Table, type TableEntry, type TableLine, formatTableLine, parseTable } from './table.js';
export type { Histogram } from '../util/metrics.js';
export {
  DM_DEFAULT_READ_AHEAD,
  type DmControl,
  type DmInfo,
  type DmLines,
  type DmListEntry,
  InProcessDmControl,
  formatInfo,
  formatLines,
  formatLs,
} from './control.js';
export { BUILTIN_TARGETS } from './targets/index.js';
export { poolOf } from './targets/thin-pool.js';
export type { KeyRef, KeyStore, TargetCapabilities, TargetContext, TargetInstance, TargetType } from './types.js';
