/**
 * LUKS2 on-disk bytes: the 4096-byte binary header, its checksum and the two header copies
 * (LUKS2 On-Disk Format Specification §2.1 "Binary header", §2.3 "Header copies"; cryptsetup
 * lib/luks2/luks2.h `struct luks2_hdr_disk`, lib/luks2/luks2_disk_metadata.c). All integers are
 * big-endian. Meaning (JSON) lives in luks2-json.ts; this file knows only bytes.
 *
 *   off  len  field            off  len  field
 *   0    6    magic            168  40   uuid
 *   6    2    version (2)      208  48   subsystem
 *   8    8    hdr_size         256  8    hdr_offset
 *   16   8    seqid            264  184  padding
 *   24   48   label            448  64   csum
 *   72   32   checksum_alg     512  3584 padding
 *   104  64   salt             4096 ...  JSON area (hdr_size - 4096)
 *
 * csum = H(binary header with csum zeroed || whole JSON area).
 */
import { createHash } from 'node:crypto';
import type { BlockDevice } from '../blockdev/types.js';
import { nodeHashName } from '../crypto/kdf/hash.js';
import { CryptmapError, EXIT_WRONG_DEVICE } from '../util/errors.js';

export const LUKS2_HDR_BIN_LEN = 4096;
export const LUKS2_MAGIC_1ST = Buffer.from([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]);
export const LUKS2_MAGIC_2ND = Buffer.from([0x53, 0x4b, 0x55, 0x4c, 0xba, 0xbe]);
export const LUKS2_MAGIC_L = 6;
export const LUKS2_LABEL_L = 48;
export const LUKS2_CHECKSUM_ALG_L = 32;
export const LUKS2_SALT_L = 64;
export const LUKS2_UUID_L = 40;
export const LUKS2_CHECKSUM_L = 64;
/** The nine metadata sizes (binary header + JSON area) LUKS2 allows; also where a secondary may sit. */
export const LUKS2_HDR_SIZES = [
  0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000, 0x400000,
] as const;

const OFF = {
  magic: 0,
  version: 6,
  hdr_size: 8,
  seqid: 16,
  label: 24,
  checksum_alg: 72,
  salt: 104,
  uuid: 168,
  subsystem: 208,
  hdr_offset: 256,
  csum: 448,
} as const;

/** The LUKS2 binary header (4096 bytes before each JSON area), fields in the on-disk format's spelling. */
export interface Luks2BinHeader {
  /** Which magic it carries. */
  kind: 'primary' | 'secondary';
  version: number;
  hdrSize: number;
  seqid: bigint;
  label: string;
  checksumAlg: string;
  salt: Buffer;
  uuid: string;
  subsystem: string;
  hdrOffset: bigint;
  csum: Buffer;
}

function cstr(buf: Uint8Array, off: number, len: number): string {
  const b = Buffer.from(buf.buffer, buf.byteOffset + off, len);
  const nul = b.indexOf(0);
  return b.subarray(0, nul < 0 ? len : nul).toString('latin1');
}

function putCstr(buf: Buffer, off: number, len: number, s: string, what: string): void {
  const b = Buffer.from(s, 'latin1');
  if (b.length >= len) throw new CryptmapError('ELUKS2FIELD', `${what} is too long (max ${len - 1} characters).`);
  b.copy(buf, off);
}

/** True when `buf` starts with either LUKS2 magic and version 2. */
export function hasLuks2Magic(buf: Uint8Array): 'primary' | 'secondary' | null {
  if (buf.length < 8) return null;
  const b = Buffer.from(buf.buffer, buf.byteOffset, 8);
  if (b.readUInt16BE(6) !== 2) return null;
  if (b.subarray(0, 6).equals(LUKS2_MAGIC_1ST)) return 'primary';
  if (b.subarray(0, 6).equals(LUKS2_MAGIC_2ND)) return 'secondary';
  return null;
}

/** Decode the 4096-byte binary header. Checks magic, version and the hdr_size set; nothing else. */
export function decodeBinHeader(buf: Uint8Array): Luks2BinHeader {
  if (buf.length < LUKS2_HDR_BIN_LEN) throw new CryptmapError('ELUKS2BIN', 'LUKS2 binary header is truncated.');
  const kind = hasLuks2Magic(buf);
  if (!kind) throw new CryptmapError('ELUKS2MAGIC', 'No LUKS2 magic.', { exitCode: EXIT_WRONG_DEVICE });
  const b = Buffer.from(buf.buffer, buf.byteOffset, LUKS2_HDR_BIN_LEN);
  const hdrSizeBig = b.readBigUInt64BE(OFF.hdr_size);
  if (!(LUKS2_HDR_SIZES as readonly number[]).includes(Number(hdrSizeBig)) || hdrSizeBig > 0x400000n) {
    throw new CryptmapError('ELUKS2HDRSIZE', `LUKS2 header size ${hdrSizeBig} is not supported.`);
  }
  return {
    kind,
    version: b.readUInt16BE(OFF.version),
    hdrSize: Number(hdrSizeBig),
    seqid: b.readBigUInt64BE(OFF.seqid),
    label: cstr(b, OFF.label, LUKS2_LABEL_L),
    checksumAlg: cstr(b, OFF.checksum_alg, LUKS2_CHECKSUM_ALG_L),
    salt: Buffer.from(b.subarray(OFF.salt, OFF.salt + LUKS2_SALT_L)),
    uuid: cstr(b, OFF.uuid, LUKS2_UUID_L),
    subsystem: cstr(b, OFF.subsystem, LUKS2_LABEL_L),
    hdrOffset: b.readBigUInt64BE(OFF.hdr_offset),
    csum: Buffer.from(b.subarray(OFF.csum, OFF.csum + LUKS2_CHECKSUM_L)),
  };
}

/** Encode a binary header with the csum field zeroed. */
export function encodeBinHeader(h: Omit<Luks2BinHeader, 'csum' | 'version'>): Buffer {
  const b = Buffer.alloc(LUKS2_HDR_BIN_LEN);
  (h.kind === 'primary' ? LUKS2_MAGIC_1ST : LUKS2_MAGIC_2ND).copy(b, OFF.magic);
  b.writeUInt16BE(2, OFF.version);
  b.writeBigUInt64BE(BigInt(h.hdrSize), OFF.hdr_size);
  b.writeBigUInt64BE(h.seqid, OFF.seqid);
  putCstr(b, OFF.label, LUKS2_LABEL_L, h.label, 'Label');
  putCstr(b, OFF.checksum_alg, LUKS2_CHECKSUM_ALG_L, h.checksumAlg, 'Checksum algorithm');
  if (h.salt.length !== LUKS2_SALT_L) throw new CryptmapError('ELUKS2FIELD', 'LUKS2 header salt must be 64 bytes.');
  h.salt.copy(b, OFF.salt);
  putCstr(b, OFF.uuid, LUKS2_UUID_L, h.uuid, 'UUID');
  putCstr(b, OFF.subsystem, LUKS2_LABEL_L, h.subsystem, 'Subsystem');
  b.writeBigUInt64BE(h.hdrOffset, OFF.hdr_offset);
  return b;
}

/** csum over the binary header (csum field zeroed) and the whole JSON area. */
export function computeChecksum(alg: string, bin: Uint8Array, jsonArea: Uint8Array): Buffer {
  const h = createHash(nodeHashName(alg));
  const copy = Buffer.from(bin.subarray(0, LUKS2_HDR_BIN_LEN));
  copy.fill(0, OFF.csum, OFF.csum + LUKS2_CHECKSUM_L);
  h.update(copy);
  h.update(jsonArea);
  return h.digest();
}

/** Place a checksum into an encoded binary header. */
export function setChecksum(bin: Buffer, csum: Uint8Array): void {
  bin.fill(0, OFF.csum, OFF.csum + LUKS2_CHECKSUM_L);
  Buffer.from(csum).copy(bin, OFF.csum);
}

/** One header copy as read from disk: the binary header and its raw JSON area, checksum verified. */
export interface Luks2DiskCopy {
  offsetBytes: number;
  bin: Luks2BinHeader;
  jsonArea: Buffer;
}

/**
 * Read and checksum-verify the header copy at `offsetBytes`. Throws a CryptmapError saying what is
 * wrong (the JSON itself is checked by the caller).
 */
export async function readCopy(
  dev: BlockDevice,
  offsetBytes: number,
  expect: 'primary' | 'secondary',
): Promise<Luks2DiskCopy> {
  if (offsetBytes + LUKS2_HDR_BIN_LEN > dev.sizeBytes)
    throw new CryptmapError('ELUKS2BIN', `No LUKS2 header at offset ${offsetBytes}: device too small.`);
  const binBuf = Buffer.alloc(LUKS2_HDR_BIN_LEN);
  await dev.read(offsetBytes, binBuf);
  const bin = decodeBinHeader(binBuf);
  if (bin.kind !== expect)
    throw new CryptmapError('ELUKS2MAGIC', `No ${expect} LUKS2 header at offset ${offsetBytes}.`);
  if (bin.version !== 2) throw new CryptmapError('ELUKS2VERSION', `Unsupported LUKS2 version ${bin.version}.`);
  if (bin.hdrOffset !== BigInt(offsetBytes))
    throw new CryptmapError('ELUKS2OFFSET', `LUKS2 header at offset ${offsetBytes} claims offset ${bin.hdrOffset}.`);
  if (offsetBytes + bin.hdrSize > dev.sizeBytes)
    throw new CryptmapError('ELUKS2BIN', `LUKS2 header at offset ${offsetBytes} extends past the device end.`);
  const jsonArea = Buffer.alloc(bin.hdrSize - LUKS2_HDR_BIN_LEN);
  await dev.read(offsetBytes + LUKS2_HDR_BIN_LEN, jsonArea);
  let calc: Buffer;
  try {
    calc = computeChecksum(bin.checksumAlg, binBuf, jsonArea);
  } catch (e) {
    throw new CryptmapError('ELUKS2CSUM', `Unsupported LUKS2 checksum algorithm '${bin.checksumAlg}'.`, { cause: e });
  }
  const stored = bin.csum.subarray(0, calc.length);
  if (!stored.equals(calc) || bin.csum.subarray(calc.length).some((x) => x !== 0)) {
    throw new CryptmapError('ELUKS2CSUM', `LUKS2 header checksum error at offset ${offsetBytes}.`, {
      context: { offsetBytes },
    });
  }
  return { offsetBytes, bin, jsonArea };
}

/**
 * Write one header copy the way cryptsetup does (hdr_write_disk): binary header with a zero
 * checksum first (the copy is invalid from here), then the JSON area, then the binary header with
 * its checksum. A crash at any point leaves this copy invalid or complete, never half-valid.
 */
export async function writeCopy(
  dev: BlockDevice,
  bin: Omit<Luks2BinHeader, 'csum' | 'version'>,
  jsonArea: Buffer,
): Promise<void> {
  const b = encodeBinHeader(bin);
  const offset = Number(bin.hdrOffset);
  await dev.write(offset, b);
  await dev.write(offset + LUKS2_HDR_BIN_LEN, jsonArea);
  setChecksum(b, computeChecksum(bin.checksumAlg, b, jsonArea));
  await dev.write(offset, b);
  await dev.flush();
}
