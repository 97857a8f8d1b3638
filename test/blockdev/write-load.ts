/**
 * A random-write load on a block device while its storage is broken under it (the NBD client's
 * reconnect tests against nbdkit and Ceph): `workers` writers, each in its own region, keep `model`
 * equal to every acknowledged write, read back one write in `readBackEvery` and flush every
 * `flushEvery` operations. The first failure stops its worker and is kept in `errors`.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type { BlockDevice } from '../../src/blockdev/types.js';

export interface WriteLoad {
  /** Operations acknowledged so far. */
  readonly ops: number;
  /** What stopped a worker (empty while every worker runs). */
  readonly errors: unknown[];
  /**
   * Wait (at most `deadlineMs`) until `n` more operations than now were acknowledged or a worker
   * failed; returns whether the load made that progress (the caller asserts, with its own words).
   */
  progress(n: number, deadlineMs?: number): Promise<boolean>;
  /** Stop the workers and wait for them. */
  stop(): Promise<void>;
}

export function startWriteLoad(
  dev: BlockDevice,
  model: Buffer,
  o: { workers?: number; readBackEvery: number; flushEvery: number },
): WriteLoad {
  const workers = o.workers ?? 8;
  const region = Math.floor(dev.sizeBytes / workers / 4096) * 4096;
  let stop = false;
  let ops = 0;
  const errors: unknown[] = [];
  const worker = async (w: number) => {
    while (!stop) {
      try {
        const len = 4096 * (1 + Math.floor(Math.random() * 16));
        const at = w * region + 4096 * Math.floor(Math.random() * ((region - len) / 4096));
        const data = randomBytes(len);
        await dev.write(at, data);
        data.copy(model, at);
        if (ops % o.readBackEvery === 0) {
          const back = Buffer.alloc(len);
          await dev.read(at, back);
          assert.ok(back.equals(model.subarray(at, at + len)), `read after write at ${at}`);
        }
        if (w === 0 && ops % o.flushEvery === 0) await dev.flush();
        ops++;
      } catch (e) {
        errors.push(e);
        return;
      }
    }
  };
  const running = Promise.all(Array.from({ length: workers }, (_, w) => worker(w)));
  return {
    get ops() {
      return ops;
    },
    errors,
    async progress(n, deadlineMs = 30_000) {
      const want = ops + n;
      const end = Date.now() + deadlineMs;
      while (ops < want && errors.length === 0 && Date.now() < end) await new Promise((r) => setTimeout(r, 50));
      return ops >= want;
    },
    async stop() {
      stop = true;
      await running;
    },
  };
}
