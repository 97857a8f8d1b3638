/**
 * Engine benchmark against OpenSSL, same machine, same run (npm run bench:engine).
 *
 * For aes-256-xts (512-bit keys) at 512- and 4096-byte units it runs, interleaved, for several rounds:
 *   openssl speed -evp aes-256-xts -bytes N -seconds 1 -mr      (machine-readable: "+F:idx:name:bytes/s")
 * the engine's native backend on one thread (synchronous calls, 1 MiB requests; once on one buffer, once
 * cycling over 8 buffers), its crypt pool with 2 threads (POOL_CONFIGS: 8 requests of 1 MiB in flight with
 * the implementation in use and with aesni, 32 of 4 KiB; each compared with one thread cycling over the
 * same buffers: same cache footprint), each native XTS implementation the CPU supports
 * (vaes512, vaes256, aesni, evp, own), and the js backend. The first lines name the one in use.
 * Each figure is the best of its rounds (the machine may be shared: noise only ever slows a run
 * down). openssl speed divides by the user CPU time it got, so the engine is compared on the same
 * basis: MB per CPU-second of this process (user + system). The pool's ratio to one thread is
 * wall-clock (it needs two idle cores); its per-CPU-second efficiency is printed beside it.
 *
 *   node dist/bench/engine.js [--rounds R] [--seconds S] [--json]
 */
import { spawnSync } from 'node:child_process';
import { parseArgs } from 'node:util';
import { benchmarkCipher, type BenchmarkOptions } from '../src/engine/index.js';
import { loadNative, XTS_IMPL_IDS } from '../src/util/native.js';

const { values } = parseArgs({
  options: { seconds: { type: 'string' }, rounds: { type: 'string' }, json: { type: 'boolean' } },
});
const seconds = Number(values.seconds ?? '0.5');
const rounds = Number(values.rounds ?? '3');

/** openssl speed in bytes/s for one cipher and unit size, or an error string. */
function opensslSpeed(cipher: string, bytes: number): number | string {
  const r = spawnSync('openssl', ['speed', '-mr', '-evp', cipher, '-bytes', String(bytes), '-seconds', '1'], {
    encoding: 'utf8',
  });
  if (r.error) return `openssl not runnable (${r.error.message}); install the Debian package openssl`;
  // OpenSSL 3 with -mr: "+F:<n>:<name>:<bytes per second for each size>".
  const line = r.stdout.split('\n').find((l) => l.startsWith('+F:'));
  const v = line === undefined ? Number.NaN : Number(line.split(':')[3]);
  return Number.isFinite(v) ? v : `could not parse openssl speed output: ${r.stdout.slice(0, 200)}`;
}

interface Row {
  what: string;
  sectorSize: number;
  /** wall-clock MB/s */
  encryptMBps: number;
  decryptMBps: number;
  /** encrypt MB per CPU-second of the process (what openssl speed reports) */
  encryptPerCpu?: number;
  ratio?: number;
  note?: string;
}

interface Best {
  e: number;
  d: number;
  cpu: number;
  cores: number;
  /** pool runs: thread sleeps per job and jobs per JS wake-up of the best run */
  pool?: { sleepsPerJob: number; jobsPerWakeup: number; remoteShare: number; callerShare: number };
  /** CPU ms per GiB encrypted by thread, of the best run */
  byThread?: { js: number; pool: number; other: number };
}

const native = loadNative();
// Each XTS implementation the addon can run here (CRYPTMAP_CRYPTO_IMPL or the CPU decide which one is in use).
const XTS_IMPLS: [number, string][] = [
  [4, 'vaes512: VAES, 512-bit registers'],
  [5, 'vaes256: VAES, 256-bit registers'],
  [3, 'aesni: AES-NI xts per sector'],
  [1, 'evp: EVP xts, IV reset per sector'],
  [2, 'own tweaks over ECB'],
].filter(([id]) => id === 2 || (native?.xtsImpls ?? []).some((n) => XTS_IMPL_IDS[n] === id)) as [number, string][];
const rows: Row[] = [];
/**
 * The pool runs, each against one thread over the same buffers: the implementation in use with
 * 1 MiB requests (8 in flight, as the data-path benchmarks), aesni likewise (3x the CPU per byte, so
 * the hand-off weighs a third), and small requests (4 KiB, 32 in flight: the hand-off dominates).
 */
const POOL_CONFIGS: { what: string; options: Partial<BenchmarkOptions> }[] = [
  { what: 'in use, 1 MiB x 8', options: {} },
  ...((native?.xtsImpls ?? []).includes('aesni') && native?.xtsImpl !== 'aesni'
    ? [
        {
          what: 'aesni, 1 MiB x 8',
          options: { configure: (c: unknown) => (c as { setXtsImplForBench(n: number): void }).setXtsImplForBench(3) },
        },
      ]
    : []),
  { what: 'in use, 4 KiB x 32', options: { requestBytes: 4096, inFlight: 32 } },
];

for (const sb of [512, 4096] as const) {
  const best = new Map<string, Best>();
  const keep = (
    what: string,
    r: {
      encryptMBps: number;
      decryptMBps: number;
      encryptCores: number;
      pool?: Best['pool'];
      encryptCpuMsPerGiB?: Best['byThread'];
    },
  ) => {
    const b = best.get(what);
    const cpu = r.encryptMBps / r.encryptCores;
    const better = b === undefined || r.encryptMBps > b.e;
    best.set(what, {
      e: Math.max(b?.e ?? 0, r.encryptMBps),
      d: Math.max(b?.d ?? 0, r.decryptMBps),
      cpu: Math.max(b?.cpu ?? 0, cpu),
      cores: better ? r.encryptCores : b.cores,
      pool: better ? r.pool : b.pool,
      byThread: better ? r.encryptCpuMsPerGiB : b.byThread,
    });
  };
  let osslNote: string | undefined;
  const common: BenchmarkOptions = { spec: 'aes-xts-plain64', keyBytes: 64, sectorBytes: sb, seconds };
  for (let round = 0; round < rounds; round++) {
    const o = opensslSpeed('aes-256-xts', sb);
    if (typeof o === 'string') osslNote = o;
    else keep('openssl', { encryptMBps: o / 1e6, decryptMBps: Number.NaN, encryptCores: 1 });
    if (native) {
      keep('native1', await benchmarkCipher({ ...common, backend: 'native' }));
      // Each pool configuration beside its base: one thread over the same buffers (same cache footprint).
      for (const pc of POOL_CONFIGS) {
        const o = { ...common, backend: 'native' as const, ...pc.options };
        keep(`base:${pc.what}`, await benchmarkCipher({ ...o, buffers: pc.options.inFlight ?? 8 }));
        keep(`pool:${pc.what}`, await benchmarkCipher({ ...o, threads: 2 }));
      }
      for (const [impl, name] of XTS_IMPLS) {
        const r = await benchmarkCipher({
          ...common,
          backend: 'native',
          seconds: seconds / 2,
          configure: (c) => (c as { setXtsImplForBench(n: number): void }).setXtsImplForBench(impl),
        });
        keep(name, r);
      }
    }
  }
  const js = await benchmarkCipher({ ...common, backend: 'js', seconds: Math.min(seconds, 0.3) });
  const ossl = best.get('openssl')?.e ?? Number.NaN;
  const one = best.get('native1');
  rows.push({
    what: 'openssl speed -evp aes-256-xts',
    sectorSize: sb,
    encryptMBps: Number.NaN,
    decryptMBps: Number.NaN,
    encryptPerCpu: ossl,
    note: osslNote,
  });
  if (native && one) {
    rows.push({
      what: `native (${native.xtsImpl}), 1 thread`,
      sectorSize: sb,
      encryptMBps: one.e,
      decryptMBps: one.d,
      encryptPerCpu: one.cpu,
      ratio: one.cpu / ossl,
    });
    for (const pc of POOL_CONFIGS) {
      const pool = best.get(`pool:${pc.what}`)!;
      const base = best.get(`base:${pc.what}`)!;
      rows.push({
        what: `native, 1 thread (pool base: ${pc.what})`,
        sectorSize: sb,
        encryptMBps: base.e,
        decryptMBps: base.d,
        encryptPerCpu: base.cpu,
        ratio: base.cpu / ossl,
      });
      rows.push({
        what: `native pool, 2 threads (wall ratio to base)`,
        sectorSize: sb,
        encryptMBps: pool.e,
        decryptMBps: pool.d,
        encryptPerCpu: pool.cpu,
        ratio: pool.e / base.e,
        // On a shared machine the pool may not get two whole cores: show what it got and its efficiency.
        note:
          `${pool.cores.toFixed(2)} cores used; per CPU-second ${(pool.cpu / base.cpu).toFixed(2)} of the base` +
          (pool.pool
            ? `; ${pool.pool.sleepsPerJob.toFixed(2)} thread sleeps per job, ${pool.pool.jobsPerWakeup.toFixed(1)} jobs per JS wake-up, ` +
              `${(100 * pool.pool.callerShare).toFixed(0)}% of jobs run by the JS thread, ${(100 * pool.pool.remoteShare).toFixed(0)}% off their buffer's CPU`
            : '') +
          (pool.byThread && base.byThread
            ? `; CPU ms per GiB: JS thread ${pool.byThread.js.toFixed(1)}, pool threads ${pool.byThread.pool.toFixed(1)}, others ${pool.byThread.other.toFixed(1)}` +
              ` (base: JS thread ${base.byThread.js.toFixed(1)}, others ${base.byThread.other.toFixed(1)})`
            : ''),
      });
    }
    for (const [, name] of XTS_IMPLS) {
      const r = best.get(name)!;
      rows.push({
        what: `  native: ${name}`,
        sectorSize: sb,
        encryptMBps: r.e,
        decryptMBps: r.d,
        encryptPerCpu: r.cpu,
        ratio: r.cpu / ossl,
      });
    }
  } else {
    rows.push({
      what: 'native',
      sectorSize: sb,
      encryptMBps: Number.NaN,
      decryptMBps: Number.NaN,
      note: 'addon not built (node scripts/build-native.mjs)',
    });
  }
  const jsCpu = js.encryptMBps / js.encryptCores;
  rows.push({
    what: 'js backend, 1 thread',
    sectorSize: sb,
    encryptMBps: js.encryptMBps,
    decryptMBps: js.decryptMBps,
    encryptPerCpu: jsCpu,
    ratio: jsCpu / ossl,
  });
}

if (values.json) {
  console.log(JSON.stringify(rows, null, 2));
} else {
  const f = (n: number | undefined) => (n !== undefined && Number.isFinite(n) ? n.toFixed(0).padStart(9) : '        -');
  console.log(`aes-xts-plain64, 512-bit key, 1 MiB requests, best of ${rounds} rounds; MB = 10^6 bytes.`);
  console.log(
    `native XTS implementation in use: ${native ? `${native.xtsImpl} (usable here: ${native.xtsImpls.join(', ')})` : 'none (addon not built)'}`,
  );
  console.log(
    'enc/CPU-s: encrypted MB per CPU-second of the process, which is what openssl speed reports (it divides by',
  );
  console.log(
    'user CPU time), so ratios to openssl hold on a busy machine; the pool ratio is wall-clock and needs 2 idle cores.',
  );
  console.log(
    `${'configuration'.padEnd(48)} ${'sector'.padStart(6)} ${'enc MB/s'.padStart(9)} ${'dec MB/s'.padStart(9)} ${'enc/CPU-s'.padStart(9)}  ratio`,
  );
  for (const r of rows) {
    console.log(
      `${r.what.padEnd(48)} ${String(r.sectorSize).padStart(6)} ${f(r.encryptMBps)} ${f(r.decryptMBps)} ${f(r.encryptPerCpu)}  ${r.ratio === undefined ? '' : r.ratio.toFixed(2)}${r.note ? `  (${r.note})` : ''}`,
    );
  }
}
