/**
 * An independent, slow reference for dm-crypt sector encryption: one node:crypto cipher per sector and
 * IVs computed straight from the formulas in dm-crypt.c's IV-mode comment with bigint arithmetic.
 * Used to cross-check both backends on random data (it cannot do XTS with equal key halves).
 */
import { createCipheriv, createDecipheriv, createHash } from 'node:crypto';

const M64 = (1n << 64n) - 1n;

export function refIv(ivMode: string, ivOpts: string | undefined, key: Uint8Array, ivSector: bigint): Buffer {
  const iv = Buffer.alloc(16);
  switch (ivMode) {
    case 'null':
      break;
    case 'plain':
      iv.writeUInt32LE(Number(ivSector & 0xffffffffn), 0);
      break;
    case 'plain64':
      iv.writeBigUInt64LE(ivSector & M64, 0);
      break;
    case 'plain64be':
      iv.writeBigUInt64BE(ivSector & M64, 8);
      break;
    case 'benbi':
      iv.writeBigUInt64BE(((ivSector << 5n) + 1n) & M64, 8);
      break;
    case 'essiv': {
      const salt = createHash(ivOpts ?? 'sha256')
        .update(key)
        .digest();
      const p = Buffer.alloc(16);
      p.writeBigUInt64LE(ivSector & M64, 0);
      return createCipheriv(`aes-${salt.length * 8}-ecb`, salt, null)
        .setAutoPadding(false)
        .update(p);
    }
    default:
      throw new Error(`no reference for ${ivMode}`);
  }
  return iv;
}

/** chain 'xts' | 'cbc' | 'ecb'; firstIv/step in IV-sector units as the engine computes them. */
export function refCrypt(
  encrypt: boolean,
  chain: string,
  ivMode: string | undefined,
  ivOpts: string | undefined,
  key: Uint8Array,
  sectorBytes: number,
  data: Uint8Array,
  firstIv: bigint,
  step: bigint,
): Buffer {
  const out = Buffer.alloc(data.length);
  const bits = chain === 'xts' ? (key.length / 2) * 8 : key.length * 8;
  const algo = `aes-${bits}-${chain}`;
  for (let s = 0; s * sectorBytes < data.length; s++) {
    const iv = chain === 'ecb' ? null : refIv(ivMode!, ivOpts, key, firstIv + BigInt(s) * step);
    const c = (encrypt ? createCipheriv(algo, key, iv) : createDecipheriv(algo, key, iv)).setAutoPadding(false);
    out.set(c.update(data.subarray(s * sectorBytes, (s + 1) * sectorBytes)), s * sectorBytes);
  }
  return out;
}
