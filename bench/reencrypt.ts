/**
 * Offline reencryption (issue 16, Performance): `cryptmap reencrypt` vs `cryptsetup reencrypt` of the
 * same 1 GiB LUKS2 volume on tmpfs in the same run, for resilience checksum and none. Prints min and
 * median wall time and CPU time (user+sys of the process and its threads) per side and the ratios
 * cryptsetup / cryptmap (target >= 1.0: cryptmap at least as fast).
 *
 * Equal work: cryptsetup formats one image (PBKDF2, 1000 iterations: the KDF is not what is measured)
 * whose data area is filled with random bytes; each round copies it twice and each tool reencrypts its
 * copy to a new volume key with default options (same cipher, hotzone length each tool's own default;
 * BENCH_HOTZONE=16M gives both the same --hotzone-size). Both run as processes from the command line
 * (cryptmap's time includes Node's start, ~0.1 s). The order alternates every round so that load drift
 * from other processes on a shared machine hits both sides alike. Both results are checked: no
 * reencryption left in the header and the keyslot opens.
 *
 * Run: npm run bench:reencrypt   (BENCH_ROUNDS=3, BENCH_SIZE_MIB=1024, BENCH_DIR=/dev/shm,
 * BENCH_RESILIENCE=checksum,none, BENCH_HOTZONE unset)
 */
import { spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { closeSync, copyFileSync, mkdtempSync, openSync, rmSync, statfsSync, writeFileSync, writeSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { childCpuMs, median } from './common.js';

const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3);
const SIZE_MIB = Number(process.env.BENCH_SIZE_MIB ?? 1024);
const BASE_DIR = process.env.BENCH_DIR ?? '/dev/shm';
const RESILIENCE = (process.env.BENCH_RESILIENCE ?? 'checksum,none').split(',');
const HOTZONE = process.env.BENCH_HOTZONE;
const TMPFS_MAGIC = 0x01021994;
const HEADER_MIB = 16;

const dir = mkdtempSync(join(BASE_DIR, 'cryptmap-bench-reencrypt-'));
const key = join(dir, 'key');
writeFileSync(key, 'bench passphrase', { mode: 0o600 });
const cli = join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'bin', 'cryptmap.js');
const COMMON = [
  '--batch-mode',
  '--key-file',
  key,
  '--pbkdf',
  'pbkdf2',
  '--pbkdf-force-iterations',
  '1000',
  '--force-offline-reencrypt',
  ...(HOTZONE ? ['--hotzone-size', HOTZONE] : []),
];

interface Sample {
  wallMs: number;
  cpuMs: number;
}

function timed(what: string, argv: string[]): Sample {
  const t0 = performance.now();
  const r = spawnSync('bash', ['-c', '"$@" >/dev/null || exit 9; times', 'bench', ...argv], { encoding: 'utf8' });
  const wallMs = performance.now() - t0;
  if (r.status !== 0) throw new Error(`${what} failed (${r.status}): ${r.stderr}`);
  return { wallMs, cpuMs: childCpuMs(r.stdout) };
}

function check(img: string, who: string): void {
  const d = spawnSync('cryptsetup', ['luksDump', '--dump-json-metadata', img], { encoding: 'utf8' });
  if (d.status !== 0 || /reencrypt/.test(d.stdout)) throw new Error(`${who}: the header is still in reencryption`);
  const t = spawnSync('cryptsetup', ['open', '--test-passphrase', '--key-file', key, img], { encoding: 'utf8' });
  if (t.status !== 0) throw new Error(`${who}: the passphrase no longer opens the volume: ${t.stderr}`);
}

function fmt(s: Sample[]): string {
  const w = s.map((x) => x.wallMs);
  const c = s.map((x) => x.cpuMs);
  const f = (v: number) => `${(v / 1000).toFixed(2)} s`;
  return `wall min ${f(Math.min(...w))} median ${f(median(w))}, CPU min ${f(Math.min(...c))} median ${f(median(c))}`;
}

try {
  if (statfsSync(dir).type !== TMPFS_MAGIC) console.log(`note: ${dir} is not on tmpfs (BENCH_DIR)`);
  const base = join(dir, 'base.img');
  const dataBytes = SIZE_MIB << 20;
  writeFileSync(base, '');
  spawnSync('truncate', ['-s', String(dataBytes + (HEADER_MIB << 20)), base]);
  const f = spawnSync(
    'cryptsetup',
    ['luksFormat', '--batch-mode', '--type', 'luks2', '--pbkdf', 'pbkdf2', '--pbkdf-force-iterations', '1000'].concat([
      '--key-file',
      key,
      base,
    ]),
    { encoding: 'utf8' },
  );
  if (f.status !== 0) throw new Error(`cryptsetup luksFormat failed: ${f.stderr}`);
  // Ciphertext-like data in the whole data area (a sparse file would read holes).
  const fd = openSync(base, 'r+');
  const chunk = Buffer.alloc(16 << 20);
  for (let p = 0; p < dataBytes; p += chunk.length)
    writeSync(fd, randomFillSync(chunk), 0, chunk.length, (HEADER_MIB << 20) + p);
  closeSync(fd);
  const cs = spawnSync('cryptsetup', ['--version'], { encoding: 'utf8' }).stdout.trim();
  console.log(
    `reencrypt of a ${SIZE_MIB} MiB LUKS2 volume (aes-xts-plain64, 512-bit key) in ${dir}; ${cs}; node ${process.version}; ${ROUNDS} rounds${HOTZONE ? `; --hotzone-size ${HOTZONE}` : ''}`,
  );
  for (const resilience of RESILIENCE) {
    const ours: Sample[] = [];
    const theirs: Sample[] = [];
    for (let r = 0; r < ROUNDS; r++) {
      const a = join(dir, 'cryptsetup.img');
      const b = join(dir, 'cryptmap.img');
      copyFileSync(base, a);
      copyFileSync(base, b);
      const runTheirs = () =>
        theirs.push(
          timed('cryptsetup reencrypt', ['cryptsetup', 'reencrypt', ...COMMON, '--resilience', resilience, a]),
        );
      const runOurs = () =>
        ours.push(timed('cryptmap reencrypt', ['node', cli, 'reencrypt', ...COMMON, '--resilience', resilience, b]));
      if (r % 2 === 0) {
        runTheirs();
        runOurs();
      } else {
        runOurs();
        runTheirs();
      }
      check(a, 'cryptsetup');
      check(b, 'cryptmap');
      rmSync(a);
      rmSync(b);
    }
    const ratio = (k: keyof Sample) => median(theirs.map((x) => x[k])) / median(ours.map((x) => x[k]));
    console.log(`resilience ${resilience}`);
    console.log(`  cryptsetup: ${fmt(theirs)}`);
    console.log(`  cryptmap:   ${fmt(ours)}`);
    console.log(
      `  ratio cryptsetup/cryptmap (median; >= 1.0: cryptmap as fast or faster): wall ${ratio('wallMs').toFixed(2)}x, CPU ${ratio('cpuMs').toFixed(2)}x`,
    );
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
