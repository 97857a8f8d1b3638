/**
 * Public surface of blockdev/: the BlockDevice contract and its backends (file, memory, NBD client).
 *
 * @module cryptmap/blockdev
 */
export type {
  BlockDevice,
  BlockDeviceCapabilities,
  BlockDeviceLimits,
  Extent,
  WriteFlags,
  WriteZeroesFlags,
} from './types.js';
export { MemoryDevice, type MemoryDeviceOptions } from './memory.js';
export { FileDevice, type FileDeviceOptions } from './file.js';
export { deviceView } from './view.js';
export { NbdDevice, type NbdDeviceHealth, type NbdDeviceOptions, type NbdDeviceState } from './nbd-client/device.js';
export { isRemoteDevice, openBlockDevice, resolveDevice } from './open.js';
