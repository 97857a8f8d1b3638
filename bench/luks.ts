/**
 * Unlock time: cryptmap's keyslot unlock vs `cryptsetup open --test-passphrase` on the same image in
 * the same run (issue 4, Performance): Argon2id t=4 m=1 GiB p=4 (lanes capped at the CPU count, as
 * cryptsetup caps them when it formats) and PBKDF2-SHA256 with 2,000,000 iterations. Prints min and
 * median of wall time and of CPU time (user+sys, all threads) per side, and their ratios (target <= 1.2).
 *
 * Equal work on both sides: the image is formatted by cryptsetup once per case and both sides unlock
 * that same image (same keyslot, same stored KDF parameters, same digest), each reading the header
 * from the file; the stored parameters are printed. The order alternates every round so that load
 * drift from other processes on a shared machine hits both sides alike. cryptsetup's time includes
 * its process start (a few ms); cryptmap's is the in-process library call the activation layer makes.
 *
 * Run: npm run bench:luks   (BENCH_ROUNDS=5, BENCH_ARGON2_MEMORY_KIB=1048576, BENCH_CASES=argon2id,pbkdf2)
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { cpus, tmpdir } from 'node:os';
import { join } from 'node:path';
import { FileDevice } from '../src/blockdev/file.js';
import { openLuks } from '../src/luks/index.js';
import { childCpuMs, median } from './common.js';

const dir = mkdtempSync(join(tmpdir(), 'cryptmap-bench-luks-'));
const key = join(dir, 'key');
const PASS = 'bench passphrase';
writeFileSync(key, PASS, { mode: 0o600 });
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 5);
const ARGON2_MEMORY_KIB = Number(process.env.BENCH_ARGON2_MEMORY_KIB ?? 1048576);
const CASES = (process.env.BENCH_CASES ?? 'argon2id,pbkdf2').split(',');

interface Sample {
  wallMs: number;
  cpuMs: number;
}

function theirs(img: string): Sample {
  const t0 = performance.now();
  const r = spawnSync(
    'bash',
    ['-c', 'cryptsetup open --test-passphrase --key-file "$1" "$2" || exit 9; times', 'bench', key, img],
    { encoding: 'utf8' },
  );
  const wallMs = performance.now() - t0;
  if (r.status !== 0) throw new Error(`cryptsetup open --test-passphrase failed: ${r.stderr}`);
  return { wallMs, cpuMs: childCpuMs(r.stdout) };
}

async function ours(img: string): Promise<Sample> {
  const c0 = process.cpuUsage();
  const t0 = performance.now();
  const dev = await FileDevice.open(img, { readOnly: true });
  try {
    const v = await openLuks(dev);
    (await v.unlock(Buffer.from(PASS))).volumeKey.dispose();
  } finally {
    await dev.close();
  }
  const wallMs = performance.now() - t0;
  const c = process.cpuUsage(c0);
  return { wallMs, cpuMs: (c.user + c.system) / 1000 };
}

function stored(img: string): string {
  const r = spawnSync('cryptsetup', ['luksDump', '--dump-json-metadata', img], { encoding: 'utf8' });
  const j = JSON.parse(r.stdout) as {
    keyslots: Record<string, { kdf: Record<string, unknown>; area: { key_size: number } }>;
    digests: Record<string, { iterations: number }>;
  };
  const ks = j.keyslots['0']!;
  const { salt: _s, ...kdf } = ks.kdf;
  return `keyslot 0 kdf ${JSON.stringify(kdf)} area key ${ks.area.key_size} B, digest pbkdf2 ${j.digests['0']!.iterations} iterations`;
}

const fmt = (xs: number[]) =>
  `min ${Math.min(...xs)
    .toFixed(0)
    .padStart(6)} median ${median(xs).toFixed(0).padStart(6)} ms`;

async function one(name: string, kdfArgs: string[]): Promise<void> {
  const img = join(dir, `${name}.img`);
  writeFileSync(img, '');
  truncateSync(img, 20 << 20);
  const f = spawnSync('cryptsetup', [
    'luksFormat',
    '--batch-mode',
    '--type',
    'luks2',
    ...kdfArgs,
    '--key-file',
    key,
    img,
  ]);
  if (f.status !== 0) throw new Error(`cryptsetup luksFormat failed: ${f.stderr}`);
  console.log(`${name}: ${stored(img)}`);
  const a: Sample[] = [];
  const b: Sample[] = [];
  for (let i = 0; i < ROUNDS; i++) {
    if (i % 2 === 0) {
      b.push(theirs(img));
      a.push(await ours(img));
    } else {
      a.push(await ours(img));
      b.push(theirs(img));
    }
  }
  const ratio = (f: (s: Sample) => number, g: (xs: number[]) => number) => (g(a.map(f)) / g(b.map(f))).toFixed(2);
  const min = (xs: number[]) => Math.min(...xs);
  // Each round's two runs are adjacent in time: their ratio is the least load-sensitive figure.
  const paired = a.map((s, i) => s.wallMs / b[i]!.wallMs);
  console.log(
    `  wall  cryptmap   ${fmt(a.map((s) => s.wallMs))} | cryptsetup ${fmt(b.map((s) => s.wallMs))} | ratio min ${ratio((s) => s.wallMs, min)} median ${ratio((s) => s.wallMs, median)} paired median ${median(paired).toFixed(2)}`,
  );
  console.log(
    `  cpu   cryptmap   ${fmt(a.map((s) => s.cpuMs))} | cryptsetup ${fmt(b.map((s) => s.cpuMs))} | ratio min ${ratio((s) => s.cpuMs, min)} median ${ratio((s) => s.cpuMs, median)}`,
  );
}

try {
  const lanes = String(Math.min(4, cpus().length));
  console.log(`${ROUNDS} rounds, ${cpus().length} CPUs, target ratio <= 1.20`);
  if (CASES.includes('argon2id')) {
    await one('argon2id', [
      '--pbkdf',
      'argon2id',
      '--pbkdf-force-iterations',
      '4',
      '--pbkdf-memory',
      String(ARGON2_MEMORY_KIB),
      '--pbkdf-parallel',
      lanes,
    ]);
  }
  if (CASES.includes('pbkdf2'))
    await one('pbkdf2', ['--pbkdf', 'pbkdf2', '--hash', 'sha256', '--pbkdf-force-iterations', '2000000']);
} finally {
  rmSync(dir, { recursive: true, force: true });
}
