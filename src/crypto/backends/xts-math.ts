/**
 * XTS tweak arithmetic (IEEE Std 1619-2007 section 5.2): the tweak of block j+1 is the tweak of
 * block j multiplied by the primitive element alpha of GF(2^128), little-endian byte order, i.e. a
 * left shift by one bit with 0x87 folded into byte 0 on carry out of byte 15.
 */

/** buf[dst..dst+16) = alpha * buf[src..src+16). src and dst may not overlap partially. */
export function gfDouble(buf: Uint8Array, src: number, dst: number): void {
  const carry = buf[src + 15]! >>> 7;
  for (let i = 15; i > 0; i--) buf[dst + i] = ((buf[src + i]! << 1) | (buf[src + i - 1]! >>> 7)) & 0xff;
  buf[dst] = ((buf[src]! << 1) & 0xff) ^ (carry * 0x87);
}
