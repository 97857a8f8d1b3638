/** dm-crypt `null`: IV is all zeros. */
import { IV_BYTES, type IvInstance, type IvOps, NO_STATE } from './types.js';

export const nullIv: IvOps = {
  name: 'null',
  init(): IvInstance {
    return {
      ...NO_STATE,
      generate(out, count) {
        out.fill(0, 0, count * IV_BYTES);
      },
    };
  },
};
