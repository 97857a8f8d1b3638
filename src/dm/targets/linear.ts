/**
 * The `linear` target (kernel drivers/md/dm-linear.c; Documentation/admin-guide/device-mapper/linear.rst):
 * maps the target's range onto a contiguous range of another device.
 */
import type { BlockDevice } from '../../blockdev/types.js';
import type { TargetInstance, TargetType } from '../types.js';
import { checkDeviceAlignment, checkDeviceSize, expectArgs, passThroughCapabilities, uintArg } from './args.js';

/*
 * Table grammar:  linear <dev> <offset>
 *   <dev>     file path, block device (/dev/x or MAJ:MIN) or mapped device name
 *   <offset>  start on <dev>, in 512-byte sectors
 */
export const linear: TargetType = {
  name: 'linear',
  version: [1, 4, 0],
  async ctr(args, ctx): Promise<TargetInstance> {
    expectArgs(args, ctx, ['dev', 'offset']);
    const [devArg, offArg] = args as [string, string];
    const offsetSectors = uintArg(offArg, ctx, 'offset');
    const dev: BlockDevice = await ctx.openDevice(devArg, 'dev');
    checkDeviceSize(dev, devArg, ctx, 'dev', offsetSectors + ctx.lengthSectors);
    checkDeviceAlignment(dev, devArg, ctx, 'offset', offsetSectors);
    const base = offsetSectors * 512;
    return {
      capabilities: passThroughCapabilities([dev]),
      limits: dev.limits,
      read: (o, buf) => dev.read(base + o, buf),
      write: (o, data, flags) => dev.write(base + o, data, flags),
      flush: () => dev.flush(),
      discard: (o, n) => dev.discard(base + o, n),
      writeZeroes: (o, n, flags) => dev.writeZeroes(base + o, n, flags),
      ...(dev.capabilities.blockStatus && dev.blockStatus
        ? { blockStatus: (o: number, n: number) => dev.blockStatus!(base + o, n) }
        : {}),
      status: (kind) => (kind === 'table' ? `${devArg} ${offsetSectors}` : ''),
      dispose() {},
    };
  },
};
