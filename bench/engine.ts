/**
 * Engine benchmark against OpenSSL, same machine, same run (npm run bench:engine).
 *
 * For aes-256-xts (512-bit keys) at 512- and 4096-byte units it runs, interleaved, for several rounds:
 *   openssl speed -evp aes-256-xts -bytes N -seconds 1 -mr      (machine-readable: "+F:idx:name:bytes/s")
 * the engine's native backend on one thread (synchronous calls, 1 MiB requests), its crypt pool with 2
 * threads (8 requests of 1 MiB in flight), each native XTS implementation, and once the js backend.
 * Each figure is the best of its rounds (the machine may be shared: noise only ever slows a run
 * down), printed with its ratio to OpenSSL (the pool: to one thread).
 *
 *   node dist/bench/engine.js [--rounds R] [--seconds S] [--json]
 */
import { spawnSync } from 'node:child_process';
import { parseArgs } from 'node:util';
import { benchmarkCipher, type BenchmarkOptions } from '../src/engine/index.js';
import { loadNative } from '../src/util/native.js';

const { values } = parseArgs({ options: { seconds: { type: 'string' }, rounds: { type: 'string' }, json: { type: 'boolean' } } });
const seconds = Number(values.seconds ?? '0.5');
const rounds = Number(values.rounds ?? '3');

/** openssl speed in bytes/s for one cipher and unit size, or an error string. */
function opensslSpeed(cipher: string, bytes: number): number | string {
  const r = spawnSync('openssl', ['speed', '-mr', '-evp', cipher, '-bytes', String(bytes), '-seconds', '1'], { encoding: 'utf8' });
  if (r.error) return `openssl not runnable (${r.error.message}); install the Debian package openssl`;
  // OpenSSL 3 with -mr: "+F:<n>:<name>:<bytes per second for each size>".
  const line = r.stdout.split('\n').find((l) => l.startsWith('+F:'));
  const v = line === undefined ? Number.NaN : Number(line.split(':')[3]);
  return Number.isFinite(v) ? v : `could not parse openssl speed output: ${r.stdout.slice(0, 200)}`;
}

interface Row {
  what: string;
  sectorSize: number;
  encryptMBps: number;
  decryptMBps: number;
  /** encrypt / openssl, or for the pool: encrypt / native 1 thread */
  ratio?: number;
  note?: string;
}

const native = loadNative();
const XTS_IMPLS: [number, string][] = [
  [1, 'EVP xts, IV reset per sector'],
  [2, 'own tweaks over ECB'],
  [3, 'AES-NI xts per sector'],
];
const rows: Row[] = [];

for (const sb of [512, 4096] as const) {
  const best = new Map<string, { e: number; d: number; cores?: number }>();
  const keep = (what: string, e: number, d: number, cores?: number) => {
    const b = best.get(what);
    best.set(what, { e: Math.max(b?.e ?? 0, e), d: Math.max(b?.d ?? 0, d), cores: b === undefined || e > b.e ? cores : b.cores });
  };
  let osslNote: string | undefined;
  const common: BenchmarkOptions = { spec: 'aes-xts-plain64', keyBytes: 64, sectorBytes: sb, seconds };
  for (let round = 0; round < rounds; round++) {
    const o = opensslSpeed('aes-256-xts', sb);
    if (typeof o === 'string') osslNote = o;
    else keep('openssl', o / 1e6, Number.NaN);
    if (native) {
      const one = await benchmarkCipher({ ...common, backend: 'native' });
      keep('native1', one.encryptMBps, one.decryptMBps);
      const pool = await benchmarkCipher({ ...common, backend: 'native', threads: 2 });
      keep('pool2', pool.encryptMBps, pool.decryptMBps, pool.encryptCores);
      for (const [impl, name] of XTS_IMPLS) {
        const r = await benchmarkCipher({
          ...common,
          backend: 'native',
          seconds: seconds / 2,
          configure: (c) => (c as { setXtsImplForBench(n: number): void }).setXtsImplForBench(impl),
        });
        keep(name, r.encryptMBps, r.decryptMBps);
      }
    }
  }
  const js = await benchmarkCipher({ ...common, backend: 'js', seconds: Math.min(seconds, 0.3) });
  const ossl = best.get('openssl')?.e ?? Number.NaN;
  const one = best.get('native1');
  rows.push({ what: 'openssl speed -evp aes-256-xts', sectorSize: sb, encryptMBps: ossl, decryptMBps: Number.NaN, note: osslNote });
  if (native && one) {
    rows.push({ what: 'native, 1 thread', sectorSize: sb, encryptMBps: one.e, decryptMBps: one.d, ratio: one.e / ossl });
    const pool = best.get('pool2')!;
    rows.push({
      what: 'native pool, 2 threads (ratio to 1 thread)',
      sectorSize: sb,
      encryptMBps: pool.e,
      decryptMBps: pool.d,
      ratio: pool.e / one.e,
      // On a shared machine the pool may not get two whole cores: show what it got.
      note: `${(pool.cores ?? Number.NaN).toFixed(2)} cores used, ${(pool.e / (pool.cores ?? Number.NaN) / one.e).toFixed(2)} of 1-thread speed per core`,
    });
    for (const [, name] of XTS_IMPLS) {
      const r = best.get(name)!;
      rows.push({ what: `  native: ${name}`, sectorSize: sb, encryptMBps: r.e, decryptMBps: r.d, ratio: r.e / ossl });
    }
  } else {
    rows.push({ what: 'native', sectorSize: sb, encryptMBps: Number.NaN, decryptMBps: Number.NaN, note: 'addon not built (node scripts/build-native.mjs)' });
  }
  rows.push({ what: 'js backend, 1 thread', sectorSize: sb, encryptMBps: js.encryptMBps, decryptMBps: js.decryptMBps, ratio: js.encryptMBps / ossl });
}

if (values.json) {
  console.log(JSON.stringify(rows, null, 2));
} else {
  const f = (n: number) => (Number.isFinite(n) ? n.toFixed(0).padStart(9) : '        -');
  console.log(`aes-xts-plain64, 512-bit key, 1 MiB requests, best of ${rounds} rounds; MB/s = 10^6 bytes/s; ratio = encrypt / openssl (pool: / 1 thread)`);
  console.log(`${'configuration'.padEnd(46)} ${'sector'.padStart(6)} ${'encrypt'.padStart(9)} ${'decrypt'.padStart(9)}  ratio`);
  for (const r of rows) {
    console.log(`${r.what.padEnd(46)} ${String(r.sectorSize).padStart(6)} ${f(r.encryptMBps)} ${f(r.decryptMBps)}  ${r.ratio === undefined ? '' : r.ratio.toFixed(2)}${r.note ? `  (${r.note})` : ''}`);
  }
}
