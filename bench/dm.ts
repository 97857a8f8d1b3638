/**
 * Benchmark: the cost of the mapping layer. Reads and writes through a `linear` target over a
 * memory device, compared with the memory device alone, at 1 MiB and 4 KiB requests (queue depth 1
 * and 8). Prints throughput and the ratio mapped/backend. Goals (issue 3): >= 0.9 at 1 MiB,
 * >= 0.7 at 4 KiB. Rounds alternate between the two and the best of several rounds counts, to
 * damp the noise of a shared machine. A second table compares the crypt target with the engine
 * and the memory device driven by hand (no goal; it shows what the target adds around the cipher).
 * A third compares the linear device with its I/O accounting on (what `--metrics` turns on:
 * dm/io-stats.ts) and off, in the same run; the goal is a cost of at most ~2% (ratio >= 0.98) where
 * the mapping layer's own cost shows, 4 KiB requests.
 *
 *   npm run bench:dm            (CRYPTMAP_BENCH_MS=300 per round by default)
 */
import type { BlockDevice } from '../src/blockdev/types.js';
import { MemoryDevice } from '../src/blockdev/memory.js';
import { deviceView } from '../src/blockdev/view.js';
import { DeviceRegistry } from '../src/dm/registry.js';
import { createSectorCipher } from '../src/engine/index.js';

const SIZE = 64 << 20;
const ROUND_MS = Number(process.env.CRYPTMAP_BENCH_MS ?? 300);
const ROUNDS = 5;

async function round(
  dev: Pick<BlockDevice, 'read' | 'write'>,
  op: 'read' | 'write',
  reqBytes: number,
  depth: number,
): Promise<number> {
  const bufs = Array.from({ length: depth }, () => Buffer.alloc(reqBytes, 0x5a));
  const slots = SIZE / reqBytes;
  let next = 0;
  let bytes = 0;
  const deadline = performance.now() + ROUND_MS;
  const start = performance.now();
  const worker = async (buf: Buffer) => {
    while (performance.now() < deadline) {
      // Batch 16 requests between clock reads: cheap requests would otherwise time the clock.
      for (let i = 0; i < 16; i++) {
        const off = (next++ % slots) * reqBytes;
        if (op === 'read') await dev.read(off, buf);
        else await dev.write(off, buf);
        bytes += reqBytes;
      }
    }
  };
  await Promise.all(bufs.map(worker));
  return bytes / ((performance.now() - start) / 1000);
}

function fmt(bps: number): string {
  return bps >= 1e9 ? `${(bps / 1e9).toFixed(2)} GB/s` : `${(bps / 1e6).toFixed(0)} MB/s`;
}

async function main(): Promise<void> {
  const mem = new MemoryDevice({ sizeBytes: SIZE });
  await mem.write(0, Buffer.alloc(SIZE, 1));
  // The table names the memory device as a path; the registry's file opener hands it out.
  const reg2 = new DeviceRegistry({ openFile: async () => mem });
  await reg2.create('lin', { table: `0 ${SIZE / 512} linear /bench/mem 0` });
  const lin = reg2.open('lin');

  console.log(`dm bench: linear over memory vs memory, ${ROUNDS} rounds of ${ROUND_MS} ms, best round counts`);
  console.log('op     request  depth  memory        linear        ratio  goal');
  let ok = true;
  for (const reqBytes of [1 << 20, 4096]) {
    for (const depth of [1, 8]) {
      for (const op of ['read', 'write'] as const) {
        let bestMem = 0;
        let bestLin = 0;
        for (let r = 0; r < ROUNDS; r++) {
          bestMem = Math.max(bestMem, await round(mem, op, reqBytes, depth));
          bestLin = Math.max(bestLin, await round(lin, op, reqBytes, depth));
        }
        const ratio = bestLin / bestMem;
        const goal = reqBytes >= 1 << 20 ? 0.9 : 0.7;
        if (ratio < goal) ok = false;
        const req = reqBytes >= 1 << 20 ? '1 MiB' : '4 KiB';
        console.log(
          `${op.padEnd(6)} ${req.padEnd(8)} ${String(depth).padEnd(6)} ${fmt(bestMem).padEnd(13)} ${fmt(bestLin).padEnd(13)} ${ratio.toFixed(2).padEnd(6)} ${goal}${ratio < goal ? '  (below goal)' : ''}`,
        );
      }
    }
  }
  // The I/O accounting's cost: the same table in two registries, the accounting on in one. Both
  // borrow the memory device through a view whose close leaves it open (the same path on both sides).
  const share = () => Promise.resolve(deviceView(mem, async () => {}));
  const regOff = new DeviceRegistry({ openFile: share });
  const regOn = new DeviceRegistry({ openFile: share });
  regOn.enableIoStats();
  for (const r of [regOff, regOn]) await r.create('lin', { table: `0 ${SIZE / 512} linear /bench/mem 0` });
  const linOff = regOff.open('lin');
  const linOn = regOn.open('lin');
  console.log('linear with I/O accounting (metrics on) vs off, ratio on/off');
  console.log('op     request  depth  off           on            ratio');
  for (const reqBytes of [1 << 20, 4096]) {
    for (const depth of [1, 8]) {
      for (const op of ['read', 'write'] as const) {
        let bestOff = 0;
        let bestOn = 0;
        for (let r = 0; r < ROUNDS; r++) {
          bestOff = Math.max(bestOff, await round(linOff, op, reqBytes, depth));
          bestOn = Math.max(bestOn, await round(linOn, op, reqBytes, depth));
        }
        const req = reqBytes >= 1 << 20 ? '1 MiB' : '4 KiB';
        console.log(
          `${op.padEnd(6)} ${req.padEnd(8)} ${String(depth).padEnd(6)} ${fmt(bestOff).padEnd(13)} ${fmt(bestOn).padEnd(13)} ${(bestOn / bestOff).toFixed(3)}`,
        );
      }
    }
  }
  const st = regOn.get('lin').ioStats!.ops;
  console.log(
    `(accounted: ${st.read.requests} reads, ${st.write.requests} writes; off: ${regOff.get('lin').ioStats === null ? 'no' : 'some'} accounting)`,
  );
  await linOff.close();
  await linOn.close();
  await regOff.closeAll();
  await regOn.closeAll();
  // For information: the crypt target over memory vs the engine plus the memory device by hand.
  const key = Buffer.alloc(64);
  for (let i = 0; i < 64; i++) key[i] = (i * 37 + 11) & 0xff;
  await reg2.create('enc', { table: `0 ${SIZE / 512} crypt aes-xts-plain64 ${key.toString('hex')} 0 /bench/mem 0` });
  const enc = reg2.open('enc');
  const cipher = createSectorCipher({ spec: 'aes-xts-plain64', key });
  const byHand: Pick<BlockDevice, 'read' | 'write'> = {
    async read(o, buf) {
      await mem.read(o, buf);
      await cipher.decryptAsync(buf, BigInt(o / 512));
    },
    async write(o, data) {
      const scratch = Buffer.allocUnsafe(data.length);
      await cipher.encryptAsync(data, BigInt(o / 512), scratch);
      await mem.write(o, scratch);
    },
  };
  console.log(`crypt target vs engine + memory by hand (${cipher.backend} backend), queue depth 1, for information`);
  for (const reqBytes of [1 << 20, 4096]) {
    for (const op of ['read', 'write'] as const) {
      let bestHand = 0;
      let bestEnc = 0;
      for (let r = 0; r < ROUNDS; r++) {
        bestHand = Math.max(bestHand, await round(byHand, op, reqBytes, 1));
        bestEnc = Math.max(bestEnc, await round(enc, op, reqBytes, 1));
      }
      const req = reqBytes >= 1 << 20 ? '1 MiB' : '4 KiB';
      console.log(
        `${op.padEnd(6)} ${req.padEnd(8)} ${'1'.padEnd(6)} ${fmt(bestHand).padEnd(13)} ${fmt(bestEnc).padEnd(13)} ${(bestEnc / bestHand).toFixed(2)}`,
      );
    }
  }
  cipher.dispose();
  await enc.close();
  await lin.close();
  await reg2.closeAll();
  console.log(ok ? 'all ratios meet their goals' : 'some ratios are below their goals');
}

await main();
