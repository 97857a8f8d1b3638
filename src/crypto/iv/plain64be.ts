/** dm-crypt `plain64be`: IV = be64(sector) in the last 8 bytes of the IV, zeros before. */
import { type IvOps, sectorIv, writeBe32 } from './types.js';

export const plain64be: IvOps = sectorIv('plain64be', (out, at, lo, hi) => {
  writeBe32(out, at + 8, hi);
  writeBe32(out, at + 12, lo);
});
