/**
 * Throughput measurement of sector ciphers, shared by `cryptmap benchmark` (like `cryptsetup
 * benchmark`: in-memory, no I/O) and bench/engine.ts. One thread: synchronous calls on the calling
 * thread. N threads: the native crypt pool set to N threads and 4N requests kept in flight through the
 * async form, so that no pool thread waits for the JS thread to hand it the next request.
 * MB/s are 10^6 bytes per second.
 */
import { randomFillSync } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import { wipe } from '../util/bytes.js';
import { cryptPoolStats, createSectorCipher, setCryptThreads } from './sector-cipher.js';
import type { SectorBytes, SectorCipherOptions } from './types.js';

/** What `benchmarkCipher` measures (cryptsetup benchmark's --cipher, --key-size, --sector-size; threads, duration). */
export interface BenchmarkOptions {
  spec: string;
  keyBytes: number;
  sectorBytes?: SectorBytes;
  /** 1: synchronous on this thread; N > 1: the crypt pool sized to N threads, 4N requests in flight. */
  threads?: number;
  /**
   * Distinct request buffers the run cycles through (default 1 on one thread, one per request in
   * flight on the pool). The cache footprint matters: compare thread counts at equal buffers.
   */
  buffers?: number;
  /** Requests kept in flight on the pool (threads > 1; default 4 per thread). */
  inFlight?: number;
  /** Bytes per request (default 1 MiB). */
  requestBytes?: number;
  /** Time per direction (default 0.15 s). */
  seconds?: number;
  backend?: SectorCipherOptions['backend'];
  /** Hook for benchmarks of implementation variants (native XTS path selection). */
  configure?: (cipher: unknown) => void;
}

/** One `benchmarkCipher` row: encryption and decryption throughput, and what ran it. */
export interface BenchmarkResult {
  cipher: string;
  keyBits: number;
  sectorSize: number;
  threads: number;
  encryptMBps: number;
  decryptMBps: number;
  backend: 'native' | 'js';
  /** Distinct request buffers the run cycled through. */
  buffers: number;
  /** Average CPU cores this process used while encrypting (user + system time / wall time). */
  encryptCores: number;
  /**
   * The crypt pool while encrypting (threads > 1 with the native addon): how often a pool thread went
   * to sleep for want of work, per job (0 when the JS thread refills the queue in time), and how many
   * completions each wake-up of the JS thread delivered, and the share of jobs that ran on another CPU
   * than the one that last ran a job on their buffer, and the share the JS thread ran itself.
   */
  pool?: { sleepsPerJob: number; jobsPerWakeup: number; remoteShare: number; callerShare: number };
  /**
   * CPU milliseconds per GiB encrypted, by thread (Linux /proc/self/task schedstat; absent elsewhere):
   * the JS thread, the crypt pool's threads, and the process's other threads (V8's, libuv's).
   */
  encryptCpuMsPerGiB?: { js: number; pool: number; other: number };
}

/** CPU nanoseconds so far of this process's threads: the JS thread, the crypt pool's, the others; null off Linux. */
function threadCpu(): { js: number; pool: number; other: number } | null {
  try {
    const out = { js: 0, pool: 0, other: 0 };
    for (const t of readdirSync('/proc/self/task')) {
      let ns: number;
      let comm: string;
      try {
        ns = Number(readFileSync(`/proc/self/task/${t}/schedstat`, 'utf8').split(' ')[0]);
        comm = readFileSync(`/proc/self/task/${t}/comm`, 'utf8').trim();
      } catch {
        continue; // a thread that ended meanwhile
      }
      if (!Number.isFinite(ns)) continue;
      if (t === String(process.pid)) out.js += ns;
      else if (comm === 'cryptmap-crypt') out.pool += ns;
      else out.other += ns;
    }
    return out;
  } catch {
    return null;
  }
}

/**
 * [MB/s, CPU cores used, CPU ms per GiB by thread or undefined] of `work`, which runs until the
 * deadline (performance.now() ms) and returns bytes done.
 */
async function measure(
  work: (deadline: number) => Promise<number>,
  seconds: number,
): Promise<[number, number, BenchmarkResult['encryptCpuMsPerGiB']]> {
  // Warm up briefly (first calls build contexts and fault pages in), then time.
  await work(performance.now() + Math.min(20, seconds * 100));
  const t0c = threadCpu();
  const c0 = process.cpuUsage();
  const t0 = performance.now();
  const bytes = await work(t0 + seconds * 1000);
  const ms = performance.now() - t0;
  const cpu = process.cpuUsage(c0);
  const t1c = t0c && threadCpu();
  const perGiB = (ns: number) => ns / 1e6 / (bytes / 2 ** 30);
  const byThread =
    t0c && t1c && bytes > 0
      ? { js: perGiB(t1c.js - t0c.js), pool: perGiB(t1c.pool - t0c.pool), other: perGiB(t1c.other - t0c.other) }
      : undefined;
  return [bytes / (ms * 1000), (cpu.user + cpu.system) / (ms * 1000), byThread];
}

/** Measure one configuration; see BenchmarkOptions. */
export async function benchmarkCipher(o: BenchmarkOptions): Promise<BenchmarkResult> {
  const sectorBytes = o.sectorBytes ?? 512;
  const threads = o.threads ?? 1;
  const requestBytes = Math.max(sectorBytes, Math.floor((o.requestBytes ?? 1 << 20) / sectorBytes) * sectorBytes);
  const seconds = o.seconds ?? 0.15;
  const key = Buffer.alloc(o.keyBytes);
  randomFillSync(key);
  const c = createSectorCipher({ spec: o.spec, key, sectorBytes, backend: o.backend, asyncMinBytes: 0 });
  wipe(key);
  o.configure?.(c);
  const prevThreads = threads > 1 ? setCryptThreads(threads) : 0;
  try {
    const inFlight = threads > 1 ? Math.max(1, o.inFlight ?? 4 * threads) : 1;
    const nbufs = Math.max(inFlight, o.buffers ?? 1);
    const bufs = Array.from({ length: nbufs }, () => randomFillSync(Buffer.alloc(requestBytes)));
    const one =
      (encrypt: boolean) =>
      async (deadline: number): Promise<number> => {
        if (threads <= 1) {
          // Synchronous calls; the clock is read every 4 MiB so its cost stays out of the figure.
          const reps = Math.max(1, Math.floor((4 << 20) / requestBytes));
          let bytes = 0;
          let next = 0;
          do {
            for (let i = 0; i < reps; i++) {
              const b = bufs[next]!;
              next = (next + 1) % nbufs;
              if (encrypt) c.encrypt(b, 0n);
              else c.decrypt(b, 0n);
            }
            bytes += reps * requestBytes;
          } while (performance.now() < deadline);
          return bytes;
        }
        // inFlight independent lanes, each submitting its next request as soon as the previous one
        // settles (a stream, as the NBD server produces; no barrier between rounds).
        let bytes = 0;
        await Promise.all(
          bufs.slice(0, inFlight).map(async (b) => {
            do {
              await (encrypt ? c.encryptAsync(b, 0n) : c.decryptAsync(b, 0n));
              bytes += requestBytes;
            } while (performance.now() < deadline);
          }),
        );
        return bytes;
      };
    const s0 = threads > 1 ? cryptPoolStats() : null;
    const [encryptMBps, encryptCores, encryptCpuMsPerGiB] = await measure(one(true), seconds);
    const s1 = s0 ? cryptPoolStats() : null;
    const jobs = s0 && s1 ? s1.jobs - s0.jobs : 0;
    const pool =
      s0 && s1 && jobs > 0
        ? {
            sleepsPerJob: (s1.sleeps - s0.sleeps) / jobs,
            jobsPerWakeup: jobs / Math.max(1, s1.wakeups - s0.wakeups),
            remoteShare: (s1.remoteJobs - s0.remoteJobs) / jobs,
            callerShare: (s1.callerJobs - s0.callerJobs) / jobs,
          }
        : undefined;
    const [decryptMBps] = await measure(one(false), seconds);
    return {
      cipher: o.spec,
      keyBits: o.keyBytes * 8,
      sectorSize: sectorBytes,
      threads,
      encryptMBps,
      decryptMBps,
      backend: c.backend,
      buffers: nbufs,
      encryptCores,
      pool,
      ...(encryptCpuMsPerGiB ? { encryptCpuMsPerGiB } : {}),
    };
  } finally {
    c.dispose();
    if (prevThreads > 0) setCryptThreads(prevThreads);
  }
}
