/**
 * Shared by the daemon core tests: a core in a fresh 0700 temp dir, a small LUKS2 image with a cheap
 * KDF, opening it through the core, a plain mapping, and a matcher for cryptsetup-style errors.
 */
import { truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { type CryptMapping, prepareLuks } from '../../src/activate/mapping.js';
import { makeTempDir } from '../helpers/tmp.js';
import { FileDevice } from '../../src/blockdev/file.js';
import { DaemonCore } from '../../src/daemon/core.js';
import { Luks2Volume } from '../../src/luks/index.js';
import type { CryptmapError } from '../../src/util/errors.js';
import { Secret } from '../../src/util/secret.js';

export const MiB = 1 << 20;
export const PASS = Buffer.from('daemon test passphrase');

/** A DaemonCore serving from a fresh temp dir (the caller shuts it down and removes `dir`). */
export function coreIn(prefix: string): { dir: string; core: DaemonCore } {
  const { dir } = makeTempDir(prefix);
  return { dir, core: new DaemonCore({ nbdSocketPath: join(dir, 'nbd.sock'), attachDir: join(dir, 'attach') }) };
}

/** coreIn plus a LUKS2 image of `bytes` (`dir`/luks.img, passphrase PASS, PBKDF2 1000 iterations, data at 2 MiB). */
export async function coreWithLuks2(
  prefix: string,
  bytes = 6 * MiB,
): Promise<{ dir: string; core: DaemonCore; img: string }> {
  const { dir, core } = coreIn(prefix);
  const img = join(dir, 'luks.img');
  writeFileSync(img, Buffer.alloc(0));
  truncateSync(img, bytes);
  const fd = await FileDevice.open(img, { readOnly: false });
  try {
    await Luks2Volume.format(fd, PASS, {
      keyslot: { kdf: { type: 'pbkdf2', hash: 'sha256', iterations: 1000 } },
      offsetBytes: 2 * MiB,
      keyslotsBytes: 2 * MiB - 2 * 16384,
      digestIterations: 1000,
    });
  } finally {
    await fd.close();
  }
  return { dir, core, img };
}

/** Unlock `img` with PASS and open it as `name`; returns a copy of the volume key (the caller disposes it). */
export async function openLuks(
  core: DaemonCore,
  img: string,
  name: string,
): Promise<{ mapping: CryptMapping; key: Secret }> {
  const { mapping, volumeKey } = await prepareLuks({ name, device: img, passphrase: PASS });
  const key = Secret.copyOf(volumeKey.expose());
  try {
    await core.openVolume(mapping, volumeKey);
  } finally {
    volumeKey.dispose();
  }
  return { mapping, key };
}

/** A plain aes-xts-plain64 mapping `m0` of 1 MiB over `dir`/disk.img. */
export function plainMapping(dir: string, over: Partial<CryptMapping> = {}): CryptMapping {
  return {
    name: 'm0',
    type: 'PLAIN',
    uuid: '',
    device: join(dir, 'disk.img'),
    cipher: 'aes-xts-plain64',
    keyBytes: 64,
    sectorBytes: 512,
    ivOffsetSectors: 0n,
    offsetSectors: 0,
    sizeSectors: 2048,
    readOnly: false,
    allowDiscards: false,
    ...over,
  };
}

/** assert.rejects matcher: a CryptmapError with this exit code and a message matching `re`. */
export const code = (exitCode: number, re: RegExp) => (e: CryptmapError) =>
  e.exitCode === exitCode && re.test(e.message);
