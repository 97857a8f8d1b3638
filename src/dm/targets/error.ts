/**
 * The `error` target (kernel drivers/md/dm-target.c io_err_*): every read, write, discard and
 * write-zeroes fails with EIO. Flushes succeed, as in the kernel where flushes are not sent to it.
 */
import { CryptmapError } from '../../util/errors.js';
import type { TargetType } from '../types.js';
import { expectArgs } from './args.js';

function ioError(op: string, line: number): Promise<never> {
  return Promise.reject(
    new CryptmapError('EIOERR', `I/O error: ${op} hit the error target (table line ${line})`, { errno: 'EIO' }),
  );
}

/* Table grammar:  error   (no arguments) */
export const error: TargetType = {
  name: 'error',
  version: [1, 6, 0],
  async ctr(args, ctx) {
    expectArgs(args, ctx, []);
    const line = ctx.line;
    return {
      capabilities: { write: true, flush: false, discard: true, writeZeroes: true, multiConn: true },
      limits: { logicalBlockBytes: 512, physicalBlockBytes: 512, maxRequestBytes: 64 << 20 },
      read: () => ioError('read', line),
      write: () => ioError('write', line),
      flush: () => Promise.resolve(),
      discard: () => ioError('discard', line),
      writeZeroes: () => ioError('write zeroes', line),
      status: () => '',
      dispose() {},
    };
  },
};
