// Shared helpers for the dm tests: a registry whose file paths `/mem/NAME` are memory devices,
// deterministic byte patterns, and a small seeded PRNG.
import { MemoryDevice } from '../../src/blockdev/memory.js';
import { deviceView } from '../../src/blockdev/view.js';
import type { BlockDevice } from '../../src/blockdev/types.js';
import { CryptmapError } from '../../src/util/errors.js';
import { DeviceRegistry, type DeviceRegistryOptions } from '../../src/dm/registry.js';
import type { TargetType } from '../../src/dm/types.js';
import { seededBytes, xorshift32 } from '../helpers/prng.js';

export interface MemRegistry {
  registry: DeviceRegistry;
  mems: Map<string, MemoryDevice>;
}

/** A registry where `/mem/NAME` opens memory device NAME (created on first use with `sizes`). */
export function memRegistry(sizes: Record<string, number>, opts: DeviceRegistryOptions = {}): MemRegistry {
  const mems = new Map<string, MemoryDevice>();
  for (const [k, v] of Object.entries(sizes)) mems.set(k, new MemoryDevice({ sizeBytes: v }));
  const registry = new DeviceRegistry({
    ...opts,
    openFile: async (path: string): Promise<BlockDevice> => {
      const m = /^\/mem\/(.+)$/.exec(path);
      const dev = m ? mems.get(m[1]!) : undefined;
      if (dev === undefined)
        throw new CryptmapError('EOPEN', `cannot open ${path}: no such memory device`, {
          errno: 'ENOENT',
          exitCode: 4,
        });
      // Tables may close what they opened; the memory device outlives them.
      return shareOf(dev);
    },
  });
  return { registry, mems };
}

/** xorshift32 (test/helpers/prng.ts), under the name the dm suites use. */
export const prng = xorshift32;

/** `length` deterministic bytes (test/helpers/prng.ts seededBytes). */
export function pattern(length: number, seed: number): Buffer {
  return seededBytes(length, seed);
}

/** 64 key bytes whose XTS halves differ (OpenSSL refuses equal halves on encrypt). */
export function xtsKey(seed = 1): Buffer {
  return pattern(64, seed);
}

/** A view of `dev` whose close() does nothing (the test owns the device). */
export function shareOf(dev: BlockDevice): BlockDevice {
  return deviceView(dev, async () => {});
}

/**
 * Test-only targets that plug in like any other: `trace <dev> <offset>` is linear that records
 * every call (with a tag naming the table) in `log`; while `hold` is set, its I/O waits until
 * release() is called.
 */
export interface TraceControl {
  log: string[];
  hold: boolean;
  release(): void;
  /** Number of requests currently waiting in hold. */
  waiting(): number;
}

export function traceTarget(ctl: TraceControl & { waiters: (() => void)[] }): TargetType {
  return {
    name: 'trace',
    version: [0, 0, 1],
    async ctr(args, ctx) {
      const [devArg, offArg, tag = 't'] = args as [string, string, string?];
      const dev = await ctx.openDevice(devArg, 'dev');
      const base = Number(offArg) * 512;
      const gate = async () => {
        if (ctl.hold) await new Promise<void>((r) => ctl.waiters.push(r));
      };
      return {
        capabilities: { write: true, flush: true, discard: true, writeZeroes: false, multiConn: true },
        limits: dev.limits,
        async read(o, b) {
          ctl.log.push(`${tag}:read:${o}`);
          await gate();
          await dev.read(base + o, b);
        },
        async write(o, d, f) {
          ctl.log.push(`${tag}:write:${o}:${d[0]}`);
          await gate();
          await dev.write(base + o, d, f);
        },
        async flush() {
          ctl.log.push(`${tag}:flush`);
          await dev.flush();
        },
        async discard(o, n) {
          ctl.log.push(`${tag}:discard:${o}`);
          await dev.discard(base + o, n);
        },
        status: (kind) => (kind === 'table' ? `${devArg} ${offArg} ${tag}` : 'traced'),
        dispose() {
          ctl.log.push(`${tag}:dispose`);
        },
      };
    },
  };
}

export function traceControl(): TraceControl & { waiters: (() => void)[] } {
  const waiters: (() => void)[] = [];
  return {
    log: [],
    hold: false,
    waiters,
    release() {
      for (const w of waiters.splice(0)) w();
    },
    waiting: () => waiters.length,
  };
}

/** Let pending promise callbacks and I/O callbacks run. */
export function settle(): Promise<void> {
  return new Promise((r) => setImmediate(r));
}
