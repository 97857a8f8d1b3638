/**
 * CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), table driven. Used by the device-mapper
 * persistent-data checksums (thin-pool metadata), which take the raw register: `crc32cRaw` starts
 * from 0xffffffff and does not invert at the end (the kernel's `crc32c(~0, ...)`, boost's
 * crc_optimal<32, 0x1EDC6F41, 0xffffffff, 0, true, true>); the standard CRC-32C is its complement.
 *
 * @example
 *   crc32c(Buffer.from('123456789')) === 0xe3069283
 */
const TABLE = (() => {
  const t = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let c = i;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    t[i] = c >>> 0;
  }
  return t;
})();

/** The raw CRC-32C register after `data`, seeded with 0xffffffff, not inverted. */
export function crc32cRaw(data: Uint8Array, start = 0, end = data.length): number {
  let c = 0xffffffff;
  for (let i = start; i < end; i++) c = TABLE[(c ^ data[i]!) & 0xff]! ^ (c >>> 8);
  return c >>> 0;
}

/** The standard CRC-32C of `data`. */
export function crc32c(data: Uint8Array): number {
  return ~crc32cRaw(data) >>> 0;
}
