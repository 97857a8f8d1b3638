/** dm-crypt `plain64`: IV = le64(sector), zero padded. */
import { type IvOps, sectorIv, writeLe32 } from './types.js';

export const plain64: IvOps = sectorIv('plain64', (out, at, lo, hi) => {
  writeLe32(out, at, lo);
  writeLe32(out, at + 4, hi);
});
