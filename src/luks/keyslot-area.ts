/**
 * Keyslot area encryption, shared by LUKS1 and LUKS2 (cryptsetup lib/luks1/keyencryption.c,
 * lib/utils_storage_wrappers.c): the AF-split key material is encrypted with the keyslot cipher in
 * 512-byte sectors whose IVs count from 0 at the start of the area, whatever the data sector size.
 */
import type { BlockDevice } from '../blockdev/types.js';
import { createSectorCipher } from '../engine/index.js';
import { CryptmapError } from '../util/errors.js';

function cipherFor(spec: string, key: Uint8Array) {
  try {
    return createSectorCipher({ spec, key, sectorBytes: 512 });
  } catch (e) {
    throw new CryptmapError('ECIPHER', `Cipher ${spec} (key size ${key.length * 8} bits) is not available.`, {
      cause: e,
    });
  }
}

/** Read `lengthBytes` (a multiple of 512) at `offsetBytes` and decrypt them with `key`. */
export async function readKeyslotArea(
  dev: BlockDevice,
  offsetBytes: number,
  lengthBytes: number,
  spec: string,
  key: Uint8Array,
): Promise<Buffer> {
  const buf = Buffer.alloc(lengthBytes);
  await dev.read(offsetBytes, buf);
  const c = cipherFor(spec, key);
  try {
    await c.decryptAsync(buf, 0n);
  } finally {
    c.dispose();
  }
  return buf;
}

/** Encrypt `material` (a multiple of 512 bytes; wiped afterwards) and write it at `offsetBytes`. */
export async function writeKeyslotArea(
  dev: BlockDevice,
  offsetBytes: number,
  material: Buffer,
  spec: string,
  key: Uint8Array,
): Promise<void> {
  const c = cipherFor(spec, key);
  const out = Buffer.alloc(material.length);
  try {
    await c.encryptAsync(material, 0n, out);
  } finally {
    c.dispose();
    material.fill(0);
  }
  await dev.write(offsetBytes, out);
  await dev.flush();
}

/** Overwrite a keyslot area with random bytes (cryptsetup wipes with random data), then flush. */
export async function wipeArea(dev: BlockDevice, offsetBytes: number, lengthBytes: number): Promise<void> {
  const { randomFillSync } = await import('node:crypto');
  const chunk = Buffer.alloc(Math.min(lengthBytes, 1 << 20));
  for (let done = 0; done < lengthBytes; ) {
    const n = Math.min(chunk.length, lengthBytes - done);
    randomFillSync(chunk, 0, n);
    await dev.write(offsetBytes + done, chunk.subarray(0, n));
    done += n;
  }
  await dev.flush();
}
