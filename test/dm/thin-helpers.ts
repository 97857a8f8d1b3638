// Helpers for the thin-pool tests: a registry whose /mem/NAME paths are memory devices (the
// metadata one optionally behind a FaultDevice), and the thin-provisioning-tools (Debian package
// thin-provisioning-tools) run on a metadata image copied to a temp file. A missing tool fails.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { makeTempDir } from '../helpers/tmp.js';
import { join } from 'node:path';
import { FaultDevice, type FaultPlan } from '../../src/blockdev/fault.js';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import type { BlockDevice } from '../../src/blockdev/types.js';
import { DeviceRegistry } from '../../src/dm/registry.js';
import { CryptmapError } from '../../src/util/errors.js';
import { resolveTool } from '../../src/util/tools.js';
import { shareOf } from './helpers.js';

export const KiB = 1024;
export const MiB = 1 << 20;
/** 64 KiB data blocks (128 sectors). */
export const BLOCK = 64 * KiB;

export interface ThinRig {
  registry: DeviceRegistry;
  meta: MemoryDevice;
  data: MemoryDevice;
  fault?: FaultDevice;
  /** `/mem/NAME` paths opened read-only. */
  readOnlyOpens: Set<string>;
}

/** A registry with /mem/meta and /mem/data (reused when given), the metadata behind `plan` if any, and /mem/NAME for each of `more`. */
export function thinRig(
  opts: {
    metaBytes?: number;
    dataBytes?: number;
    meta?: MemoryDevice;
    data?: MemoryDevice;
    plan?: FaultPlan;
    more?: Record<string, MemoryDevice>;
  } = {},
): ThinRig {
  const meta = opts.meta ?? new MemoryDevice({ sizeBytes: opts.metaBytes ?? MiB });
  const data = opts.data ?? new MemoryDevice({ sizeBytes: opts.dataBytes ?? 16 * MiB });
  const fault = opts.plan ? new FaultDevice(meta, opts.plan) : undefined;
  const readOnlyOpens = new Set<string>();
  const registry = new DeviceRegistry({
    openFile: async (path: string, readOnly: boolean): Promise<BlockDevice> => {
      if (readOnly) readOnlyOpens.add(path);
      if (path === '/mem/meta') return shareOf(fault ?? meta);
      if (path === '/mem/data') return shareOf(data);
      const more = opts.more?.[path.slice('/mem/'.length)];
      if (path.startsWith('/mem/') && more !== undefined) return shareOf(more);
      throw new CryptmapError('EOPEN', `cannot open ${path}: no such memory device`, { errno: 'ENOENT', exitCode: 4 });
    },
  });
  return { registry, meta, data, readOnlyOpens, ...(fault ? { fault } : {}) };
}

export function tool(cmd: string, args: string[], input?: string): { status: number; stdout: string; stderr: string } {
  const r = spawnSync(resolveTool(cmd), args, { encoding: 'utf8', input, maxBuffer: 256 * MiB });
  if (r.error && (r.error as NodeJS.ErrnoException).code === 'ENOENT')
    assert.fail(`${cmd} not found: install the Debian package thin-provisioning-tools`);
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

export async function memBytes(dev: MemoryDevice): Promise<Buffer> {
  const b = Buffer.alloc(dev.sizeBytes);
  await dev.read(0, b);
  return b;
}

/** Run `fn` with the metadata image in a temp file. */
export async function withImage<T>(meta: MemoryDevice | Buffer, fn: (path: string) => T): Promise<T> {
  const { dir, cleanup: removeDir } = makeTempDir('cryptmap-thin-');
  try {
    const p = join(dir, 'meta');
    writeFileSync(p, Buffer.isBuffer(meta) ? meta : await memBytes(meta));
    return fn(p);
  } finally {
    removeDir();
  }
}

/** thin_check on the image; asserts it passes. */
export async function assertThinCheck(meta: MemoryDevice | Buffer, what = 'metadata'): Promise<void> {
  const r = await withImage(meta, (p) => tool('thin_check', [p]));
  assert.equal(r.status, 0, `thin_check rejects ${what}:\n${r.stdout}${r.stderr}`);
}

/** thin_dump of the image (optionally of the metadata snapshot, -m). */
export async function thinDump(meta: MemoryDevice | Buffer, args: string[] = []): Promise<string> {
  const r = await withImage(meta, (p) => tool('thin_dump', [...args, p]));
  assert.equal(r.status, 0, `thin_dump failed: ${r.stderr}`);
  return r.stdout;
}

/** thin_restore `xml` into a fresh image of `metaBytes`; returns it as a memory device. */
export async function thinRestore(xml: string, metaBytes: number): Promise<MemoryDevice> {
  const { dir, cleanup: removeDir } = makeTempDir('cryptmap-thin-');
  try {
    writeFileSync(join(dir, 'in.xml'), xml);
    writeFileSync(join(dir, 'meta'), Buffer.alloc(metaBytes));
    const r = tool('thin_restore', ['-i', join(dir, 'in.xml'), '-o', join(dir, 'meta')]);
    assert.equal(r.status, 0, `thin_restore failed: ${r.stderr}`);
    const dev = new MemoryDevice({ sizeBytes: metaBytes });
    await dev.write(0, readFileSync(join(dir, 'meta')));
    return dev;
  } finally {
    removeDir();
  }
}

export interface DumpedDevice {
  id: number;
  mappedBlocks: number;
  transaction: number;
  creationTime: number;
  snapTime: number;
  /** virtual block -> [data block, time] */
  map: Map<number, [number, number]>;
}

/** Parse thin_dump's XML (single and range mappings). */
export function parseDump(xml: string): { superblock: Record<string, string>; devices: Map<number, DumpedDevice> } {
  const attrs = (s: string): Record<string, string> =>
    Object.fromEntries([...s.matchAll(/(\w+)="([^"]*)"/g)].map((m) => [m[1]!, m[2]!]));
  const sb = /<superblock ([^>]*)>/.exec(xml);
  assert.ok(sb, `no superblock in thin_dump output: ${xml.slice(0, 200)}`);
  const devices = new Map<number, DumpedDevice>();
  let cur: DumpedDevice | undefined;
  for (const line of xml.split('\n')) {
    const t = line.trim();
    if (t.startsWith('<device ')) {
      const a = attrs(t);
      cur = {
        id: Number(a.dev_id),
        mappedBlocks: Number(a.mapped_blocks),
        transaction: Number(a.transaction),
        creationTime: Number(a.creation_time),
        snapTime: Number(a.snap_time),
        map: new Map(),
      };
      devices.set(cur.id, cur);
    } else if (t.startsWith('<single_mapping ')) {
      const a = attrs(t);
      cur!.map.set(Number(a.origin_block), [Number(a.data_block), Number(a.time)]);
    } else if (t.startsWith('<range_mapping ')) {
      const a = attrs(t);
      for (let i = 0; i < Number(a.length); i++)
        cur!.map.set(Number(a.origin_begin) + i, [Number(a.data_begin) + i, Number(a.time)]);
    }
  }
  return { superblock: attrs(sb[1]!), devices };
}

export function status(registry: DeviceRegistry, name: string): string {
  return registry.get(name).liveTable!.format('status', false).join('\n');
}

export function table(registry: DeviceRegistry, name: string): string {
  return registry.get(name).liveTable!.format('table', false).join('\n');
}
