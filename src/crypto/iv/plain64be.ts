/** dm-crypt `plain64be`: IV = be64(sector) in the last 8 bytes of the IV, zeros before. */
import { forEachIvSector, IV_BYTES, type IvInstance, type IvOps, NO_STATE, writeBe32 } from './types.js';

export const plain64be: IvOps = {
  name: 'plain64be',
  init(): IvInstance {
    return {
      ...NO_STATE,
      generate(out, count, lo, hi, step) {
        out.fill(0, 0, count * IV_BYTES);
        forEachIvSector(count, lo, hi, step, (i, l, h) => {
          writeBe32(out, i * IV_BYTES + 8, h);
          writeBe32(out, i * IV_BYTES + 12, l);
        });
      },
    };
  },
};
