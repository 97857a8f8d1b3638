/** Shared test settings: cheap KDFs (tests only), memory devices; the interop tests' tool helpers. */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import type { BlockDevice } from '../../src/blockdev/types.js';
import type { KdfParams } from '../../src/crypto/kdf/index.js';

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
