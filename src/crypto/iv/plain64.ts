/** dm-crypt `plain64`: IV = le64(sector), zero padded. */
import { forEachIvSector, IV_BYTES, type IvInstance, type IvOps, NO_STATE, writeLe32 } from './types.js';

export const plain64: IvOps = {
  name: 'plain64',
  init(): IvInstance {
    return {
      ...NO_STATE,
      generate(out, count, lo, hi, step) {
        out.fill(0, 0, count * IV_BYTES);
        forEachIvSector(count, lo, hi, step, (i, l, h) => {
          writeLe32(out, i * IV_BYTES, l);
          writeLe32(out, i * IV_BYTES + 4, h);
        });
      },
    };
  },
};
