/** dm-crypt `plain`: IV = le32(sector & 0xffffffff), zero padded (wraps every 2^32 sectors). */
import { type IvOps, sectorIv, writeLe32 } from './types.js';

export const plain: IvOps = sectorIv('plain', (out, at, lo) => writeLe32(out, at, lo));
