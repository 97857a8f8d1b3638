/** Shared test settings: cheap KDFs (tests only), memory devices; the interop tests' tool helpers. */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdirSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Readable, Writable } from 'node:stream';
import { FaultDevice } from '../../src/blockdev/fault.js';
import { FileDevice } from '../../src/blockdev/file.js';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import type { BlockDevice } from '../../src/blockdev/types.js';
import type { KdfParams } from '../../src/crypto/kdf/index.js';
import { createSectorCipher } from '../../src/engine/index.js';
import type { SectorBytes } from '../../src/engine/types.js';
import { Luks2Volume, readLuks2 } from '../../src/luks/index.js';
import { CryptmapError } from '../../src/util/errors.js';

export const FAST_PBKDF2: KdfParams = { type: 'pbkdf2', hash: 'sha256', iterations: 1000 };
export const FAST_ARGON: KdfParams = { type: 'argon2id', time: 4, memoryKiB: 32768, parallel: 1 };
export const P = (s: string) => Buffer.from(s);

export function memDev(sizeBytes = 20 << 20): MemoryDevice {
  return new MemoryDevice({ sizeBytes });
}

/** A deep copy of the first `bytes` of a device into a new one from `make` (snapshot before an operation). */
export async function cloneDevice(
  src: BlockDevice,
  make: (size: number) => BlockDevice,
  bytes: number,
): Promise<BlockDevice> {
  const d = make(src.sizeBytes);
  const buf = Buffer.alloc(bytes);
  await src.read(0, buf);
  await d.write(0, buf);
  return d;
}

/** [base, base+len) of `dev` as a device of its own (header and data on one FaultDevice share its write count). */
export function sliceDev(dev: BlockDevice, base: number, len: number): BlockDevice {
  return {
    sizeBytes: len,
    capabilities: dev.capabilities,
    limits: dev.limits,
    directIo: dev.directIo,
    read: (o, b) => dev.read(base + o, b),
    write: (o, d, f) => dev.write(base + o, d, f),
    flush: () => dev.flush(),
    discard: (o, n) => dev.discard(base + o, n),
    writeZeroes: (o, n, f) => dev.writeZeroes(base + o, n, f),
    close: async () => {},
  };
}

/** Whether a LUKS2 header reads from `dev`. */
export async function hasLuks2(dev: BlockDevice): Promise<boolean> {
  try {
    await readLuks2(dev);
    return true;
  } catch {
    return false;
  }
}

/** Encrypts `plain` with `vol`'s volume key (unlocked by `pass`) to its data segment's offset on `data`. */
export async function writePlaintext(vol: Luks2Volume, pass: Buffer, data: BlockDevice, plain: Buffer): Promise<void> {
  const { volumeKey } = await vol.unlock(pass);
  const seg = vol.dataSegment;
  const c = createSectorCipher({ spec: seg.cipher, key: volumeKey.expose(), sectorBytes: seg.sectorBytes });
  try {
    const b = Buffer.from(plain);
    c.encrypt(b, 0n);
    await data.write(seg.offsetBytes, b);
  } finally {
    c.dispose();
    volumeKey.dispose();
  }
}

/**
 * A LUKS2 volume (passphrase `pass`, a cheap KDF, aes-xts-plain64, 512-byte sectors) on a new memory
 * device, its data at `off` (the keyslots area up to it) holding `plain`.
 */
export async function volumeHolding(
  plain: Buffer,
  off: number,
  pass: Buffer,
): Promise<{ dev: MemoryDevice; v: Luks2Volume }> {
  const dev = memDev(off + plain.length);
  const v = await Luks2Volume.format(dev, pass, {
    offsetBytes: off,
    keyslotsBytes: off - 0x8000,
    keyslot: { kdf: FAST_PBKDF2 },
  });
  await writePlaintext(v, pass, dev, plain);
  return { dev, v };
}

/** The first `bytes` of plaintext at `vol`'s data segment on `data` (its volume key unlocked by `pass`). */
export async function readPlaintext(vol: Luks2Volume, pass: Buffer, data: BlockDevice, bytes: number): Promise<Buffer> {
  const { volumeKey } = await vol.unlock(pass);
  const seg = vol.dataSegment;
  const c = createSectorCipher({ spec: seg.cipher, key: volumeKey.expose(), sectorBytes: seg.sectorBytes });
  try {
    const b = Buffer.alloc(bytes);
    await data.read(seg.offsetBytes, b);
    c.decrypt(b, 0n);
    return b;
  } finally {
    c.dispose();
    volumeKey.dispose();
  }
}

/** What one power-cut sweep needs: see sweepCrashes. */
export interface CrashSweep {
  /** The device before the operation (each crash point works on a fresh memory copy), or a maker of fresh ones. */
  makeBase: BlockDevice | (() => Promise<BlockDevice>);
  /** The operation, begun or resumed as the device shows; `dev` is `base` behind the FaultDevice. */
  run: (dev: BlockDevice, base: BlockDevice) => Promise<void>;
  /** After a crash, the recovery on `base` as the crash left it (default: `run(base, base)`); 'refused' skips `check`. */
  recover?: (base: BlockDevice, n: number) => Promise<undefined | 'refused'>;
  /** The finished device (after `run` finished, or after the recovery). */
  check: (base: BlockDevice, n: number) => Promise<void>;
  /** The sweep fails unless the uninterrupted run took more than this many writes (it cannot pass vacuously). */
  minWrites: number;
}

/**
 * A power cut after every write: for n = 0, 1, 2, ... `run` on a fresh `makeBase()` behind a
 * FaultDevice that crashes after n writes; after a crash, `recover`; then `check`. Any error but the
 * crash fails. Ends only at the first n at which `run` finished before its crash point, and fails
 * unless n > `minWrites`. Returns n (the uninterrupted run's writes) and how many crashes were
 * recovered or refused.
 */
export async function sweepCrashes(s: CrashSweep): Promise<{ writes: number; recovered: number; refused: number }> {
  let recovered = 0;
  let refused = 0;
  for (let n = 0; ; n++) {
    const from = s.makeBase;
    const base = typeof from === 'function' ? await from() : await cloneDevice(from, memDev, from.sizeBytes);
    let crashed = false;
    try {
      await s.run(new FaultDevice(base, { crashAfterWrites: n }), base);
    } catch (e) {
      if (!(e instanceof CryptmapError && e.code === 'EFAULT_CRASH')) throw e;
      crashed = true;
    }
    if (crashed) {
      if ((await (s.recover ?? ((b) => s.run(b, b).then(() => undefined)))(base, n)) === 'refused') {
        refused++;
        continue;
      }
      recovered++;
    }
    await s.check(base, n);
    if (!crashed) {
      assert.ok(n > s.minWrites, `only ${n} writes (${recovered} crashes recovered, ${refused} refused)`);
      return { writes: n, recovered, refused };
    }
  }
}

/** Collects what a CLI verb writes (stdout or stderr of a CliIO). */
export class Sink extends Writable {
  data = '';
  override _write(c: Buffer, _e: string, cb: () => void) {
    this.data += c.toString();
    cb();
  }
}

/**
 * The external-tool helpers of the cryptsetup interop tests, working in the temp dir `getDir()`
 * (known only once the test's `before` ran): `run` any tool (C locale), `cs` cryptsetup that must
 * succeed, `image` a sparse file.
 */
export function interopTools(getDir: () => string) {
  const run = (cmd: string, args: string[], input?: Buffer | string): { code: number; out: string; err: string } => {
    const r = spawnSync(cmd, args, { input, cwd: getDir(), env: { ...process.env, LC_ALL: 'C' } });
    return { code: r.status ?? -1, out: r.stdout?.toString() ?? '', err: r.stderr?.toString() ?? '' };
  };
  const cs = (...args: string[]): string => {
    const r = run('cryptsetup', args);
    assert.equal(r.code, 0, `cryptsetup ${args.join(' ')} failed: ${r.err}`);
    return r.out;
  };
  const image = (name: string, size = 20 << 20): string => {
    const p = join(getDir(), name);
    writeFileSync(p, '');
    truncateSync(p, size);
    return p;
  };
  return { run, cs, image };
}

/**
 * The CLI run in this process (`main`), its lock directory `<dir>/locks`: `cm(...argv)` gives the exit
 * code and what it wrote to stdout and stderr (stdin is empty).
 */
export function inProcessCli(dir: string) {
  return async (...argv: string[]): Promise<{ code: number; out: string; err: string }> => {
    const { main } = await import('../../src/cli/main.js');
    const out = new Sink();
    const err = new Sink();
    mkdirSync(join(dir, 'locks'), { recursive: true, mode: 0o700 });
    const code = await main(argv, {
      stdin: Readable.from([]) as unknown as NodeJS.ReadableStream,
      stdout: out,
      stderr: err,
      env: { ...process.env, CRYPTMAP_LOCK_DIR: join(dir, 'locks') },
    });
    return { code, out: out.data, err: err.data };
  };
}

/**
 * aes-xts-plain64 with volume key `vk` (IVs from 0, `sector`-byte sectors, 512 by default) on the image
 * file `img` at byte `offset`: encrypts `plain` there (and returns the ciphertext), or without it
 * returns the plaintext of `bytes` bytes from `offset` (by default up to the end of the file).
 */
export async function cryptFile(
  img: string,
  vk: Buffer,
  offset: number,
  o: { sector?: number; plain?: Buffer; bytes?: number } = {},
): Promise<Buffer> {
  const { sector = 512, plain } = o;
  const dev = await FileDevice.open(img);
  const c = createSectorCipher({ spec: 'aes-xts-plain64', key: vk, sectorBytes: sector as SectorBytes });
  try {
    if (plain) {
      const b = Buffer.from(plain);
      c.encrypt(b, 0n);
      await dev.write(offset, b);
      await dev.flush();
      return b;
    }
    const b = Buffer.alloc(o.bytes ?? dev.sizeBytes - offset);
    await dev.read(offset, b);
    c.decrypt(b, 0n);
    return b;
  } finally {
    c.dispose();
    await dev.close();
  }
}

/** The LUKS2 header copy at `off` of `img` (metadata size `md`): its SHA-256 checksum recomputed (binary header and JSON area). */
export function rechecksum(img: Buffer, off: number, md = 16384): void {
  img.fill(0, off + 448, off + 512);
  const h = createHash('sha256')
    .update(img.subarray(off, off + 4096))
    .update(img.subarray(off + 4096, off + md))
    .digest();
  h.copy(img, off + 448);
}

/** Put `text` in the JSON area of the LUKS2 header copy at `off` (NUL-padded, cut to fit) and recompute its checksum. */
export function setJson(img: Buffer, off: number, text: Buffer, md = 16384): void {
  img.fill(0, off + 4096, off + md);
  text.copy(img, off + 4096, 0, Math.min(text.length, md - 4096));
  rechecksum(img, off, md);
}

/** The JSON metadata of the LUKS2 header copy at `off`, parsed. */
// biome-ignore lint/suspicious/noExplicitAny: tests poke at arbitrary JSON
export function jsonOf(img: Buffer, off: number, md = 16384): Record<string, any> {
  const a = img.subarray(off + 4096, off + md);
  return JSON.parse(a.subarray(0, a.indexOf(0)).toString());
}
