/**
 * Engine benchmark against OpenSSL, same machine, same run (npm run bench:engine).
 *
 * For aes-256-xts (512-bit keys) at 512- and 4096-byte units it runs
 *   openssl speed -evp aes-256-xts -bytes N -seconds S -mr      (machine-readable: "+F:idx:name:bytes/s")
 * then the engine: native on one thread (synchronous calls, 1 MiB requests), the native async pool
 * with 2 requests in flight, each native XTS implementation, and the js backend; and prints each
 * figure with its ratio to OpenSSL (and the pool's ratio to one thread).
 *
 *   node dist/bench/engine.js [--seconds S] [--json]
 */
import { spawnSync } from 'node:child_process';
import { parseArgs } from 'node:util';
import { benchmarkCipher, type BenchmarkResult } from '../src/engine/index.js';
import { loadNative } from '../src/util/native.js';

const { values } = parseArgs({ options: { seconds: { type: 'string' }, json: { type: 'boolean' } } });
const seconds = Number(values.seconds ?? '1');

/** openssl speed in bytes/s for one cipher and unit size, or an error string. */
function opensslSpeed(cipher: string, bytes: number): number | string {
  const r = spawnSync('openssl', ['speed', '-mr', '-evp', cipher, '-bytes', String(bytes), '-seconds', String(Math.max(1, Math.round(seconds)))], {
    encoding: 'utf8',
  });
  if (r.error) return `openssl not runnable (${r.error.message}); install the Debian package openssl`;
  // OpenSSL 3: "+F:<n>:<name>:<bytes per second for each size>"; 1.1 prints the same with -mr.
  const line = r.stdout.split('\n').find((l) => l.startsWith('+F:'));
  const v = line === undefined ? Number.NaN : Number(line.split(':')[3]);
  return Number.isFinite(v) ? v : `could not parse openssl speed output: ${r.stdout.slice(0, 200)}`;
}

interface Row {
  what: string;
  sectorSize: number;
  encryptMBps: number;
  decryptMBps: number;
  ratio?: number;
  note?: string;
}

const rows: Row[] = [];
const native = loadNative();
const XTS_IMPLS: [number, string][] = [
  [1, 'EVP xts, IV reset per sector'],
  [2, 'own tweaks over ECB'],
  [3, 'AES-NI xts per sector'],
];

for (const sb of [512, 4096] as const) {
  const ossl = opensslSpeed('aes-256-xts', sb);
  const osslMBps = typeof ossl === 'number' ? ossl / 1e6 : Number.NaN;
  rows.push({ what: 'openssl speed -evp aes-256-xts', sectorSize: sb, encryptMBps: osslMBps, decryptMBps: Number.NaN, note: typeof ossl === 'string' ? ossl : undefined });
  const add = (what: string, r: BenchmarkResult, base = osslMBps): number => {
    const row: Row = { what, sectorSize: sb, encryptMBps: r.encryptMBps, decryptMBps: r.decryptMBps, ratio: r.encryptMBps / base };
    rows.push(row);
    return r.encryptMBps;
  };
  const common = { spec: 'aes-xts-plain64', keyBytes: 64, sectorBytes: sb, seconds };
  if (native) {
    const one = add('native, 1 thread', await benchmarkCipher({ ...common, backend: 'native' }));
    const pool = await benchmarkCipher({ ...common, backend: 'native', threads: 2 });
    rows.push({ what: 'native pool, 2 threads (ratio to 1 thread)', sectorSize: sb, encryptMBps: pool.encryptMBps, decryptMBps: pool.decryptMBps, ratio: pool.encryptMBps / one });
    for (const [impl, name] of XTS_IMPLS) {
      const r = await benchmarkCipher({
        ...common,
        backend: 'native',
        seconds: seconds / 2,
        configure: (c) => ((c as { setXtsImplForBench?: (n: number) => void }).setXtsImplForBench?.(impl)),
      });
      add(`  native: ${name}`, r);
    }
  } else {
    rows.push({ what: 'native', sectorSize: sb, encryptMBps: Number.NaN, decryptMBps: Number.NaN, note: 'addon not built (node scripts/build-native.mjs)' });
  }
  add('js backend, 1 thread', await benchmarkCipher({ ...common, backend: 'js', seconds: Math.min(seconds, 0.5) }));
}

if (values.json) {
  console.log(JSON.stringify(rows, null, 2));
} else {
  const f = (n: number) => (Number.isFinite(n) ? n.toFixed(0).padStart(9) : '        -');
  console.log(`aes-xts-plain64, 512-bit key, 1 MiB requests; MB/s = 10^6 bytes/s; ratio = encrypt / openssl (pool: / 1 thread)`);
  console.log(`${'configuration'.padEnd(46)} ${'sector'.padStart(6)} ${'encrypt'.padStart(9)} ${'decrypt'.padStart(9)}  ratio`);
  for (const r of rows) {
    console.log(`${r.what.padEnd(46)} ${String(r.sectorSize).padStart(6)} ${f(r.encryptMBps)} ${f(r.decryptMBps)}  ${r.ratio === undefined ? '' : r.ratio.toFixed(2)}${r.note ? `  (${r.note})` : ''}`);
  }
}
