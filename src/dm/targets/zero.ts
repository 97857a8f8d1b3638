/**
 * The `zero` target (kernel drivers/md/dm-zero.c; zero.rst): reads return zeros, writes and
 * discards are accepted and dropped.
 */
import type { TargetType } from '../types.js';
import { expectArgs } from './args.js';

const RESOLVED = Promise.resolve();

/* Table grammar:  zero   (no arguments) */
export const zero: TargetType = {
  name: 'zero',
  version: [1, 2, 0],
  async ctr(args, ctx) {
    expectArgs(args, ctx, []);
    return {
      capabilities: { write: true, flush: false, discard: true, writeZeroes: true, multiConn: true },
      limits: { logicalBlockBytes: 512, physicalBlockBytes: 512, maxRequestBytes: 64 << 20 },
      read(_o, buf) {
        buf.fill(0);
        return RESOLVED;
      },
      write: () => RESOLVED,
      flush: () => RESOLVED,
      discard: () => RESOLVED,
      writeZeroes: () => RESOLVED,
      blockStatus: async (_o, n) => [{ lengthBytes: n, hole: true, zero: true }],
      status: () => '',
      dispose() {},
    };
  },
};
