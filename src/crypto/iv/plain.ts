/** dm-crypt `plain`: IV = le32(sector & 0xffffffff), zero padded (wraps every 2^32 sectors). */
import { forEachIvSector, IV_BYTES, type IvInstance, type IvOps, NO_STATE, writeLe32 } from './types.js';

export const plain: IvOps = {
  name: 'plain',
  init(): IvInstance {
    return {
      ...NO_STATE,
      generate(out, count, lo, hi, step) {
        out.fill(0, 0, count * IV_BYTES);
        forEachIvSector(count, lo, hi, step, (i, l) => writeLe32(out, i * IV_BYTES, l));
      },
    };
  },
};
