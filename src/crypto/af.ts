/**
 * The LUKS anti-forensic information splitter (LUKS1 spec §2.4 "AF-Splitter"; cryptsetup
 * lib/luks1/af.c; identical in LUKS2). A key of `keyBytes` is expanded to `keyBytes * stripes`
 * bytes so that destroying any part of the stored material destroys the key.
 *
 *   diffuse(d): for each digest-sized block i of d: block_i = H(be32(i) || block_i), truncated
 *   split:      d = 0; for i < n-1: s_i = random; d = diffuse(d ^ s_i);  s_{n-1} = key ^ d
 *   merge:      the same loop over the stored s_0..s_{n-2}; key = s_{n-1} ^ d
 */
import * as nodeCrypto from 'node:crypto';
import { createHash, randomFillSync } from 'node:crypto';
import { CryptmapError } from '../util/errors.js';
import { hashDigestBytes, nodeHashName } from './kdf/hash.js';

/** Bytes the split material occupies on disk: whole 512-byte sectors (AF_split_sectors). */
export function afSplitBytes(keyBytes: number, stripes: number): number {
  return Math.ceil((keyBytes * stripes) / 512) * 512;
}

type OneShotHash = (alg: string, data: Uint8Array, enc: 'buffer') => Buffer;
/** crypto.hash (Node >= 20.12): one call per block without a Hash object (4000 stripes make 8000 blocks). */
const hashOnce: OneShotHash =
  (nodeCrypto as { hash?: OneShotHash }).hash ?? ((alg, data) => createHash(alg).update(data).digest());

/** `scratch` is 4 + ds bytes: the big-endian block counter, then the block. */
function diffuse(d: Buffer, hashName: string, ds: number, scratch: Buffer): void {
  const len = d.length;
  const blocks = Math.ceil(len / ds);
  for (let i = 0; i < blocks; i++) {
    const start = i * ds;
    const end = Math.min(start + ds, len);
    scratch.writeUInt32BE(i, 0);
    d.copy(scratch, 4, start, end);
    const h = hashOnce(hashName, scratch.subarray(0, 4 + end - start), 'buffer');
    h.copy(d, start, 0, end - start);
    h.fill(0);
  }
  scratch.fill(0);
}

function check(keyBytes: number, stripes: number): void {
  if (
    !Number.isInteger(keyBytes) ||
    keyBytes < 1 ||
    keyBytes > 4096 ||
    !Number.isInteger(stripes) ||
    stripes < 1 ||
    stripes > 65536
  ) {
    throw new CryptmapError('EAFPARAM', `Invalid AF parameters (key ${keyBytes} bytes, ${stripes} stripes).`);
  }
}

/** Split `key` into `afSplitBytes(key.length, stripes)` bytes (padding after the stripes is zero). */
export function afSplit(key: Uint8Array, stripes: number, hash: string): Buffer {
  const keyBytes = key.length;
  check(keyBytes, stripes);
  const hashName = nodeHashName(hash);
  const ds = hashDigestBytes(hash);
  const out = Buffer.alloc(afSplitBytes(keyBytes, stripes));
  const d = Buffer.alloc(keyBytes);
  const scratch = Buffer.alloc(4 + ds);
  randomFillSync(out, 0, (stripes - 1) * keyBytes);
  for (let s = 0; s < stripes - 1; s++) {
    const base = s * keyBytes;
    for (let j = 0; j < keyBytes; j++) d[j]! ^= out[base + j]!;
    diffuse(d, hashName, ds, scratch);
  }
  const last = out.subarray((stripes - 1) * keyBytes, stripes * keyBytes);
  for (let j = 0; j < keyBytes; j++) last[j] = key[j]! ^ d[j]!;
  d.fill(0);
  return out;
}

/** Recover the key from split material (at least keyBytes*stripes bytes). The caller wipes the result. */
export function afMerge(material: Uint8Array, keyBytes: number, stripes: number, hash: string): Buffer {
  check(keyBytes, stripes);
  if (material.length < keyBytes * stripes) throw new CryptmapError('EAFPARAM', 'AF material is too short.');
  const hashName = nodeHashName(hash);
  const ds = hashDigestBytes(hash);
  const d = Buffer.alloc(keyBytes);
  const scratch = Buffer.alloc(4 + ds);
  for (let s = 0; s < stripes - 1; s++) {
    const base = s * keyBytes;
    for (let j = 0; j < keyBytes; j++) d[j]! ^= material[base + j]!;
    diffuse(d, hashName, ds, scratch);
  }
  const base = (stripes - 1) * keyBytes;
  for (let j = 0; j < keyBytes; j++) d[j] = material[base + j]! ^ d[j]!;
  return d;
}
