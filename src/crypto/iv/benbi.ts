/**
 * dm-crypt `benbi`: IV = be64((sector << (9 - log2(blockBytes))) + 1) in the last 8 bytes, the
 * 64-bit "narrow block" count starting at 1 (crypt_iv_benbi_ctr/_gen). For 16-byte blocks the
 * shift is 5. Arithmetic is modulo 2^64 as in the kernel's u64.
 */
import { forEachIvSector, IV_BYTES, type IvInstance, type IvOps, NO_STATE, writeBe32 } from './types.js';

export const benbi: IvOps = {
  name: 'benbi',
  init(ctx): IvInstance {
    const shift = 9 - Math.log2(ctx.spec.blockBytes);
    return {
      ...NO_STATE,
      generate(out, count, lo, hi, step) {
        out.fill(0, 0, count * IV_BYTES);
        forEachIvSector(count, lo, hi, step, (i, l, h) => {
          let nh = ((h << shift) | (l >>> (32 - shift))) >>> 0;
          let nl = ((l << shift) >>> 0) + 1;
          if (nl > 0xffffffff) {
            nl = 0;
            nh = (nh + 1) >>> 0;
          }
          writeBe32(out, i * IV_BYTES + 8, nh);
          writeBe32(out, i * IV_BYTES + 12, nl);
        });
      },
    };
  },
};
