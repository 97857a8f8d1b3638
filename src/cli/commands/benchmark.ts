/**
 * `cryptmap benchmark`, like `cryptsetup benchmark` (cryptsetup(8) BENCHMARK): in-memory throughput of
 * the supported ciphers, no I/O.
 *
 *   cryptmap benchmark [--cipher SPEC] [--key-size BITS] [--sector-size 512|1024|2048|4096]
 *                      [--threads N] [--json] [--seconds S]
 *   cryptmap benchmark --pbkdf pbkdf2|argon2i|argon2id [--hash H] [--iter-time MS]
 *                      [--pbkdf-memory KIB] [--pbkdf-parallel N] [--key-size BITS] [--json]
 *
 * As cryptsetup 2.6 (action_benchmark): with no option the KDFs come first (PBKDF2 iterations per
 * second for sha1, sha256, sha512, ripemd160, whirlpool - "N/A" where the hash is missing - then the
 * Argon2 cost for --iter-time, default 2000 ms), then the cipher table; `--pbkdf` or `--hash` measures
 * one KDF only, `--cipher` one cipher only.
 *
 * `--cipher aes-xts` means aes-xts-plain64 (an IV mode is added when missing). `--threads N` runs the
 * requests on a crypt pool of N threads (default 1: the calling thread) as the data path does: 4N
 * requests of 1 MiB in flight, each in its own buffer, each submitted as the previous one in its lane
 * completes (the crypt target hands each request to the pool as it arrives; the data-path benchmarks
 * run 1 MiB at queue depth 8); with N > 1 one thread is measured too, over the same buffers (the cache
 * footprint changes the figures), in three interleaved rounds with the best of each kept (as
 * `npm run bench:engine` does), and the pool's ratio to it printed.
 * `--json` prints an array of {cipher, keyBits, sectorSize, threads, backend, implementation,
 * encryptMBps, decryptMBps[, oneThreadEncryptMBps, oneThreadDecryptMBps, poolRatio (wall clock),
 * poolInFlight (requests in flight), poolCores (CPU cores the pool got), poolPerCpuRatio (MB per CPU-second against one thread's),
 * poolSleepsPerRequest (pool threads that ran out of queued work and slept, per request)]}; implementation
 * is the native XTS implementation (vaes512|vaes256|aesni|evp) for XTS, `openssl` for the native
 * backend's other modes, `js` for the js backend. MB/s are 10^6 bytes per second.
 */
import { parseArgs } from 'node:util';
import {
  benchmarkCipher,
  type BenchmarkResult,
  defaultBackend,
  nativeXtsImpl,
  parseCipherSpec,
  type SectorBytes,
} from '../../engine/index.js';
import { calibrateKdf, hashAvailable } from '../../crypto/kdf/index.js';
import { parseUint } from '../../util/bytes.js';
import { CryptmapError } from '../../util/errors.js';
import type { VerbMain } from '../types.js';

const DEFAULTS: [string, number][] = [
  ['aes-cbc-plain64', 128],
  ['aes-cbc-plain64', 256],
  ['aes-xts-plain64', 256],
  ['aes-xts-plain64', 512],
];

/** cryptsetup's default KDF list (src/cryptsetup.c bkdfs). */
const DEFAULT_KDFS: [string, string | undefined][] = [
  ['pbkdf2', 'sha1'],
  ['pbkdf2', 'sha256'],
  ['pbkdf2', 'sha512'],
  ['pbkdf2', 'ripemd160'],
  ['pbkdf2', 'whirlpool'],
  ['argon2i', undefined],
  ['argon2id', undefined],
];

interface KdfResult {
  pbkdf: string;
  hash?: string;
  keyBits: number;
  /** PBKDF2: iterations per second; Argon2: the time cost for the requested time. */
  iterations: number | null;
  memoryKiB?: number;
  parallel?: number;
  requestedMs?: number;
}

/** One KDF measurement and its line in cryptsetup's format (src/cryptsetup.c action_benchmark_kdf). */
async function benchmarkKdf(
  pbkdf: string,
  hash: string | undefined,
  keyBits: number,
  o: { iterTimeMs: number; memoryKiB?: number; parallel?: number },
): Promise<[KdfResult, string]> {
  if (pbkdf === 'pbkdf2') {
    const h = hash ?? 'sha256';
    if (!hashAvailable(h)) return [{ pbkdf, hash: h, keyBits, iterations: null }, `PBKDF2-${h.padEnd(9)}     N/A`];
    // cryptsetup measures PBKDF2 for 1000 ms: the iteration count is per second.
    const k = await calibrateKdf({ type: 'pbkdf2', hash: h, iterTimeMs: 1000, keyBytes: keyBits / 8 });
    const it = k.type === 'pbkdf2' ? k.iterations : 0;
    return [
      { pbkdf, hash: h, keyBits, iterations: it },
      `PBKDF2-${h.padEnd(9)} ${String(it).padStart(7)} iterations per second for ${keyBits}-bit key`,
    ];
  }
  const k = await calibrateKdf({
    type: pbkdf as 'argon2i' | 'argon2id',
    iterTimeMs: o.iterTimeMs,
    keyBytes: keyBits / 8,
    ...(o.memoryKiB !== undefined ? { maxMemoryKiB: o.memoryKiB } : {}),
    ...(o.parallel !== undefined ? { parallel: o.parallel } : {}),
  });
  if (k.type === 'pbkdf2') throw new CryptmapError('EKDF', `unexpected ${k.type}`);
  return [
    { pbkdf, keyBits, iterations: k.time, memoryKiB: k.memoryKiB, parallel: k.parallel, requestedMs: o.iterTimeMs },
    `${pbkdf.padEnd(10)} ${String(k.time).padStart(4)} iterations, ${String(k.memoryKiB).padStart(5)} memory, ${k.parallel} parallel threads (CPUs) for ${keyBits}-bit key (requested ${o.iterTimeMs} ms time)`,
  ];
}

const HELP = `usage: cryptmap benchmark [--cipher SPEC] [--key-size BITS] [--sector-size BYTES] [--threads N] [--json]
       cryptmap benchmark --pbkdf pbkdf2|argon2i|argon2id [--hash H] [--iter-time MS] [--pbkdf-memory KIB] [--pbkdf-parallel N]
In-memory encryption and decryption throughput of dm-crypt sector ciphers (MB/s = 10^6 bytes/s).
  --cipher SPEC       e.g. aes-xts-plain64, aes-cbc-essiv:sha256 (aes-xts means aes-xts-plain64)
  --key-size BITS     key size in bits (default: 512 for xts, 256 otherwise)
  --sector-size N     512 (default), 1024, 2048 or 4096
  --threads N         crypt pool threads (default 1: the calling thread), 4N requests of 1 MiB in
                      flight; N > 1 also measures one thread over the same buffers (3 interleaved
                      rounds, best of each) and prints the pool's ratio to it
  --seconds S         time per direction (default 0.15)
  --json              print a JSON array instead of the table
  --pbkdf KDF         measure one KDF (--hash H for PBKDF2, --iter-time MS, --pbkdf-memory KIB and
                      --pbkdf-parallel N for Argon2); without --cipher or --pbkdf all KDFs come first
Backend: CRYPTMAP_CRYPTO_BACKEND=native|js forces one; CRYPTMAP_CRYPTO_IMPL=vaes512|vaes256|aesni|evp
forces the native backend's XTS implementation (the header line names the one in use).
`;

/** --threads N > 1: rounds of the pool and of one thread, interleaved; the best of each is printed. */
const POOL_ROUNDS = 3;

function withIv(spec: string): string {
  if (spec.startsWith('capi:') || spec.split('-').length >= 3 || spec.endsWith('-ecb')) return spec;
  return spec.includes('-') ? `${spec}-plain64` : spec;
}

const benchmark: VerbMain = async (argv, io) => {
  const { values } = parseArgs({
    args: argv.slice(1),
    options: {
      cipher: { type: 'string', short: 'c' },
      'key-size': { type: 'string', short: 's' },
      'sector-size': { type: 'string' },
      threads: { type: 'string' },
      seconds: { type: 'string' },
      json: { type: 'boolean' },
      pbkdf: { type: 'string' },
      hash: { type: 'string', short: 'h' },
      'iter-time': { type: 'string', short: 'i' },
      'pbkdf-memory': { type: 'string' },
      'pbkdf-parallel': { type: 'string' },
      help: { type: 'boolean' },
    },
    strict: true,
    allowPositionals: false,
  });
  if (values.help) {
    io.stdout.write(HELP);
    return 0;
  }
  const sectorBytes = parseUint(values['sector-size'] ?? '512', '--sector-size');
  if (![512, 1024, 2048, 4096].includes(sectorBytes)) {
    throw new CryptmapError('ESECTOR_SIZE', `--sector-size ${sectorBytes}: must be 512, 1024, 2048 or 4096`);
  }
  const threads = parseUint(values.threads ?? '1', '--threads', 256);
  if (threads < 1) throw new CryptmapError('EINVAL', '--threads must be at least 1');
  const seconds = values.seconds === undefined ? 0.15 : Number(values.seconds);
  if (!Number.isFinite(seconds) || seconds <= 0 || seconds > 60)
    throw new CryptmapError('EINVAL', `--seconds '${values.seconds}': a number of seconds in (0, 60] expected`);

  const backend = defaultBackend(io.env);
  // The native backend names its XTS implementation (CRYPTMAP_CRYPTO_IMPL forces one).
  const impl = backend === 'native' ? ` (XTS: ${nativeXtsImpl() ?? '?'})` : '';
  const head = `# Tests are approximate using memory only (no storage IO); backend ${backend}${impl}, ${sectorBytes}-byte sectors, ${threads} thread${threads > 1 ? 's' : ''}.\n`;
  const kdfOpts = {
    iterTimeMs: values['iter-time'] === undefined ? 2000 : parseUint(values['iter-time'], '--iter-time', 3_600_000),
    ...(values['pbkdf-memory'] !== undefined
      ? { memoryKiB: parseUint(values['pbkdf-memory'], '--pbkdf-memory', 4 * 1024 * 1024) }
      : {}),
    ...(values['pbkdf-parallel'] !== undefined
      ? { parallel: parseUint(values['pbkdf-parallel'], '--pbkdf-parallel', 4) }
      : {}),
  };
  if (kdfOpts.iterTimeMs < 1) throw new CryptmapError('EINVAL', '--iter-time must be at least 1 ms');
  // cryptsetup's KDF benchmarks use --key-size (default 256 bits, its plain default).
  const kdfKeyBits = values['key-size'] === undefined ? 256 : parseUint(values['key-size'], '--key-size', 4096);
  if (kdfKeyBits % 8 !== 0 || kdfKeyBits === 0)
    throw new CryptmapError('EKEY_SIZE', `--key-size ${kdfKeyBits}: must be a multiple of 8`);
  if (values.pbkdf !== undefined || values.hash !== undefined) {
    const pbkdf = values.pbkdf ?? 'pbkdf2';
    if (!['pbkdf2', 'argon2i', 'argon2id'].includes(pbkdf))
      throw new CryptmapError('EKDF', `--pbkdf ${pbkdf}: must be pbkdf2, argon2i or argon2id`);
    const [r, line] = await benchmarkKdf(pbkdf, values.hash, kdfKeyBits, kdfOpts);
    io.stdout.write(values.json ? `${JSON.stringify([r], null, 2)}\n` : `${head}${line}\n`);
    return 0;
  }

  let configs: [string, number][];
  if (values.cipher !== undefined) {
    const spec = withIv(values.cipher);
    const parsed = parseCipherSpec(spec);
    const bits =
      values['key-size'] !== undefined
        ? parseUint(values['key-size'], '--key-size', 4096)
        : parsed.chainMode === 'xts'
          ? 512
          : 256;
    if (bits % 8 !== 0) throw new CryptmapError('EKEY_SIZE', `--key-size ${bits}: must be a multiple of 8`);
    configs = [[spec, bits]];
  } else {
    const bits = values['key-size'] === undefined ? undefined : parseUint(values['key-size'], '--key-size', 4096);
    configs = DEFAULTS.filter(([, b]) => bits === undefined || b === bits);
    if (configs.length === 0)
      throw new CryptmapError('EKEY_SIZE', `--key-size ${bits}: no default cipher uses it; give --cipher too`);
  }

  const results: { r: BenchmarkResult; one?: BenchmarkResult; implementation: string }[] = [];
  if (!values.json) {
    io.stdout.write(head);
    if (values.cipher === undefined) {
      for (const [pbkdf, hash] of DEFAULT_KDFS)
        io.stdout.write(`${(await benchmarkKdf(pbkdf, hash, kdfKeyBits, kdfOpts))[1]}\n`);
    }
    io.stdout.write(
      `#${'Algorithm'.padStart(24)} |${'Key'.padStart(6)} |${'Encryption'.padStart(14)} |${'Decryption'.padStart(14)}\n`,
    );
  }
  const mbps = (x: number): string => `${x.toFixed(1)} MB/s`;
  const round1 = (x: number): number => Math.round(x * 10) / 10;
  // Encryption per CPU-second of the pool against one thread's (the wall ratio needs idle cores).
  const perCpu = (r: BenchmarkResult, one: BenchmarkResult): number =>
    r.encryptMBps / r.encryptCores / (one.encryptMBps / one.encryptCores);
  for (const [spec, bits] of configs) {
    const common = { spec, keyBytes: bits / 8, sectorBytes: sectorBytes as SectorBytes, seconds, backend };
    let r = await benchmarkCipher({ ...common, threads });
    // The pool's base: one thread over as many buffers as the pool had requests in flight. Both are
    // measured as bench:engine does: interleaved rounds, the best of each (a shared machine only ever
    // slows a run down, and a single short run of the pool was what made the two disagree).
    let one: BenchmarkResult | undefined;
    for (let round = 0; threads > 1 && round < POOL_ROUNDS; round++) {
      if (round > 0) {
        const again = await benchmarkCipher({ ...common, threads });
        if (again.encryptMBps > r.encryptMBps) r = again;
      }
      const o = await benchmarkCipher({ ...common, threads: 1, buffers: r.buffers });
      if (one === undefined || o.encryptMBps > one.encryptMBps) one = o;
    }
    const implementation =
      r.backend === 'js' ? 'js' : parseCipherSpec(spec).chainMode === 'xts' ? (nativeXtsImpl() ?? '?') : 'openssl';
    results.push({ r, ...(one ? { one } : {}), implementation });
    if (!values.json) {
      io.stdout.write(
        `${spec.padStart(25)} ${`${bits}b`.padStart(7)} ${mbps(r.encryptMBps).padStart(15)} ${mbps(r.decryptMBps).padStart(15)}\n`,
      );
      if (one) {
        io.stdout.write(
          `#${'1 thread, same buffers'.padStart(24)} ${''.padStart(7)} ${mbps(one.encryptMBps).padStart(15)} ${mbps(one.decryptMBps).padStart(15)}` +
            `   pool ${(r.encryptMBps / one.encryptMBps).toFixed(2)}x (${r.buffers} requests in flight; ${r.encryptCores.toFixed(2)} cores used; per CPU-second ${perCpu(r, one).toFixed(2)}x` +
            `${r.pool ? `; ${r.pool.sleepsPerJob.toFixed(2)} thread sleeps per request` : ''})\n`,
        );
      }
    }
  }
  if (values.json) {
    const out = results.map(({ r, one, implementation }) => ({
      cipher: r.cipher,
      keyBits: r.keyBits,
      sectorSize: r.sectorSize,
      threads: r.threads,
      backend: r.backend,
      implementation,
      encryptMBps: round1(r.encryptMBps),
      decryptMBps: round1(r.decryptMBps),
      ...(one
        ? {
            oneThreadEncryptMBps: round1(one.encryptMBps),
            oneThreadDecryptMBps: round1(one.decryptMBps),
            poolRatio: Math.round((r.encryptMBps / one.encryptMBps) * 100) / 100,
            poolInFlight: r.buffers,
            poolCores: Math.round(r.encryptCores * 100) / 100,
            poolPerCpuRatio: Math.round(perCpu(r, one) * 100) / 100,
            ...(r.pool ? { poolSleepsPerRequest: Math.round(r.pool.sleepsPerJob * 1000) / 1000 } : {}),
          }
        : {}),
    }));
    io.stdout.write(`${JSON.stringify(out, null, 2)}\n`);
  }
  return 0;
};
export default benchmark;
