/**
 * `cryptmap benchmark`, like `cryptsetup benchmark` (cryptsetup(8) BENCHMARK): in-memory throughput of
 * the supported ciphers, no I/O.
 *
 *   cryptmap benchmark [--cipher SPEC] [--key-size BITS] [--sector-size 512|1024|2048|4096]
 *                      [--threads N] [--json] [--seconds S]
 *
 * `--cipher aes-xts` means aes-xts-plain64 (an IV mode is added when missing). `--threads N` runs the
 * requests on a crypt pool of N threads (default 1: the calling thread). `--json` prints an array of
 * {cipher, keyBits, sectorSize, threads, encryptMBps, decryptMBps}. MB/s are 10^6 bytes per second.
 */
import { parseArgs } from 'node:util';
import { benchmarkCipher, type BenchmarkResult, defaultBackend, parseCipherSpec, type SectorBytes } from '../../engine/index.js';
import { parseUint } from '../../util/bytes.js';
import { CryptmapError } from '../../util/errors.js';
import type { VerbMain } from '../types.js';

const DEFAULTS: [string, number][] = [
  ['aes-cbc-plain64', 128],
  ['aes-cbc-plain64', 256],
  ['aes-xts-plain64', 256],
  ['aes-xts-plain64', 512],
];

const HELP = `usage: cryptmap benchmark [--cipher SPEC] [--key-size BITS] [--sector-size BYTES] [--threads N] [--json]
In-memory encryption and decryption throughput of dm-crypt sector ciphers (MB/s = 10^6 bytes/s).
  --cipher SPEC       e.g. aes-xts-plain64, aes-cbc-essiv:sha256 (aes-xts means aes-xts-plain64)
  --key-size BITS     key size in bits (default: 512 for xts, 256 otherwise)
  --sector-size N     512 (default), 1024, 2048 or 4096
  --threads N         crypt pool threads (default 1: the calling thread)
  --seconds S         time per direction (default 0.15)
  --json              print a JSON array instead of the table
Backend: CRYPTMAP_CRYPTO_BACKEND=native|js forces one.
`;

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
      help: { type: 'boolean', short: 'h' },
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
  if (!Number.isFinite(seconds) || seconds <= 0 || seconds > 60) throw new CryptmapError('EINVAL', `--seconds '${values.seconds}': a number of seconds in (0, 60] expected`);

  let configs: [string, number][];
  if (values.cipher !== undefined) {
    const spec = withIv(values.cipher);
    const parsed = parseCipherSpec(spec);
    const bits = values['key-size'] !== undefined ? parseUint(values['key-size'], '--key-size', 4096) : parsed.chainMode === 'xts' ? 512 : 256;
    if (bits % 8 !== 0) throw new CryptmapError('EKEY_SIZE', `--key-size ${bits}: must be a multiple of 8`);
    configs = [[spec, bits]];
  } else {
    const bits = values['key-size'] === undefined ? undefined : parseUint(values['key-size'], '--key-size', 4096);
    configs = DEFAULTS.filter(([, b]) => bits === undefined || b === bits);
    if (configs.length === 0) throw new CryptmapError('EKEY_SIZE', `--key-size ${bits}: no default cipher uses it; give --cipher too`);
  }

  const backend = defaultBackend(io.env);
  const results: BenchmarkResult[] = [];
  if (!values.json) {
    io.stdout.write(`# Tests are approximate using memory only (no storage IO); backend ${backend}, ${sectorBytes}-byte sectors, ${threads} thread${threads > 1 ? 's' : ''}.\n`);
    io.stdout.write(`#${'Algorithm'.padStart(24)} |${'Key'.padStart(6)} |${'Encryption'.padStart(14)} |${'Decryption'.padStart(14)}\n`);
  }
  for (const [spec, bits] of configs) {
    const r = await benchmarkCipher({ spec, keyBytes: bits / 8, sectorBytes: sectorBytes as SectorBytes, threads, seconds, backend });
    results.push(r);
    if (!values.json) {
      io.stdout.write(`${spec.padStart(25)} ${`${bits}b`.padStart(7)} ${`${r.encryptMBps.toFixed(1)} MB/s`.padStart(15)} ${`${r.decryptMBps.toFixed(1)} MB/s`.padStart(15)}\n`);
    }
  }
  if (values.json) {
    const out = results.map((r) => ({
      cipher: r.cipher,
      keyBits: r.keyBits,
      sectorSize: r.sectorSize,
      threads: r.threads,
      encryptMBps: Math.round(r.encryptMBps * 10) / 10,
      decryptMBps: Math.round(r.decryptMBps * 10) / 10,
    }));
    io.stdout.write(`${JSON.stringify(out, null, 2)}\n`);
  }
  return 0;
};
export default benchmark;
