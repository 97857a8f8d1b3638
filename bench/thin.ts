/**
 * Benchmark: a `thin` device against a `linear` one over the same data file, in one run.
 *   - provision: first writes to a fresh thin device (every block allocated; metadata committed by
 *     the final flush) vs writing the same range through linear (and flushing);
 *   - overwrite: the same writes again (blocks provisioned) vs linear;
 *   - read: reading the provisioned range vs linear.
 * 1 MiB requests at queue depth 4, and 4 KiB at depth 8 for overwrite and read. Each round uses a
 * new thin device (create_thin, deleted after), so provisioning is measured every round; the best
 * of ROUNDS rounds counts. Goals (issue 17): overwrite and read >= 0.8 of linear, provisioning
 * >= 0.5.
 *
 *   npm run bench:thin          (CRYPTMAP_BENCH_MB=64 MiB per round by default)
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { BlockDevice } from '../src/blockdev/types.js';
import { DeviceRegistry } from '../src/dm/registry.js';

const RANGE = Number(process.env.CRYPTMAP_BENCH_MB ?? 64) << 20;
const DATA = 4 * RANGE;
const ROUNDS = 4;
const BLOCK_SECTORS = 128;

async function pass(
  dev: BlockDevice,
  op: 'read' | 'write',
  reqBytes: number,
  depth: number,
  flush: boolean,
): Promise<number> {
  const slots = RANGE / reqBytes;
  let next = 0;
  const start = performance.now();
  const worker = async (): Promise<void> => {
    const buf = Buffer.alloc(reqBytes, 0x5a);
    for (let i = next++; i < slots; i = next++) {
      if (op === 'read') await dev.read(i * reqBytes, buf);
      else await dev.write(i * reqBytes, buf);
    }
  };
  await Promise.all(Array.from({ length: depth }, worker));
  if (flush) await dev.flush();
  return RANGE / ((performance.now() - start) / 1000);
}

function fmt(bps: number): string {
  return bps >= 1e9 ? `${(bps / 1e9).toFixed(2)} GB/s` : `${(bps / 1e6).toFixed(0)} MB/s`;
}

async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'cryptmap-bench-thin-'));
  try {
    const meta = join(dir, 'meta');
    const data = join(dir, 'data');
    writeFileSync(meta, Buffer.alloc(16 << 20));
    writeFileSync(data, Buffer.alloc(DATA));
    const reg = new DeviceRegistry();
    await reg.create('pool', {
      table: `0 ${DATA / 512} thin-pool ${meta} ${data} ${BLOCK_SECTORS} 0 1 skip_block_zeroing`,
    });
    await reg.create('lin', { table: `0 ${RANGE / 512} linear ${data} 0` });
    const lin = reg.open('lin');
    const cases: { name: string; op: 'read' | 'write'; req: number; depth: number; goal: number }[] = [
      { name: 'provision', op: 'write', req: 1 << 20, depth: 4, goal: 0.5 },
      { name: 'overwrite', op: 'write', req: 1 << 20, depth: 4, goal: 0.8 },
      { name: 'read', op: 'read', req: 1 << 20, depth: 4, goal: 0.8 },
      { name: 'overwrite', op: 'write', req: 4096, depth: 8, goal: 0.8 },
      { name: 'read', op: 'read', req: 4096, depth: 8, goal: 0.8 },
    ];
    const best = cases.map(() => ({ thin: 0, lin: 0 }));
    for (let r = 0; r < ROUNDS; r++) {
      await reg.message('pool', 0, ['create_thin', String(r)]);
      await reg.create('t', { table: `0 ${RANGE / 512} thin pool ${r}` });
      const t = reg.open('t');
      for (let c = 0; c < cases.length; c++) {
        const k = cases[c]!;
        const flush = k.op === 'write';
        best[c]!.lin = Math.max(best[c]!.lin, await pass(lin, k.op, k.req, k.depth, flush));
        best[c]!.thin = Math.max(best[c]!.thin, await pass(t, k.op, k.req, k.depth, flush));
      }
      await t.close();
      await reg.remove('t');
      await reg.message('pool', 0, ['delete', String(r)]);
    }
    console.log(
      `thin bench: thin vs linear over the same data file, ${RANGE >> 20} MiB per pass, 64 KiB blocks, best of ${ROUNDS} rounds`,
    );
    console.log('case       request  depth  linear        thin          ratio  goal');
    for (let c = 0; c < cases.length; c++) {
      const k = cases[c]!;
      const ratio = best[c]!.thin / best[c]!.lin;
      console.log(
        `${k.name.padEnd(10)} ${(k.req >= 1 << 20 ? '1 MiB' : '4 KiB').padEnd(8)} ${String(k.depth).padEnd(6)} ${fmt(best[c]!.lin).padEnd(13)} ${fmt(best[c]!.thin).padEnd(13)} ${ratio.toFixed(2).padEnd(6)} ${k.goal}${ratio < k.goal ? '  (below goal)' : ''}`,
      );
    }
    await lin.close();
    await reg.closeAll();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
