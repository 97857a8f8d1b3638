/**
 * Unlock time: cryptmap's keyslot unlock vs `cryptsetup open --test-passphrase` on the same image in
 * the same run (issue 4, Performance): Argon2id t=4 m=1 GiB p=4 (lanes capped at the CPU count as
 * cryptsetup does) and PBKDF2-SHA256 with 2,000,000 iterations. Prints the ratio (target <= 1.2).
 * Run: npm run bench:luks
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { cpus, tmpdir } from 'node:os';
import { join } from 'node:path';
import { FileDevice } from '../src/blockdev/file.js';
import { openLuks } from '../src/luks/index.js';

const dir = mkdtempSync(join(tmpdir(), 'cryptmap-bench-luks-'));
const key = join(dir, 'key');
writeFileSync(key, 'bench passphrase', { mode: 0o600 });
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3);

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

async function one(name: string, kdfArgs: string[]): Promise<void> {
  const img = join(dir, `${name}.img`);
  writeFileSync(img, '');
  truncateSync(img, 20 << 20);
  const f = spawnSync('cryptsetup', ['luksFormat', '--batch-mode', '--type', 'luks2', ...kdfArgs, '--key-file', key, img]);
  if (f.status !== 0) throw new Error(`cryptsetup luksFormat failed: ${f.stderr}`);
  const theirs: number[] = [];
  const ours: number[] = [];
  for (let i = 0; i < ROUNDS; i++) {
    let t0 = performance.now();
    const r = spawnSync('cryptsetup', ['open', '--test-passphrase', '--key-file', key, img]);
    theirs.push(performance.now() - t0);
    if (r.status !== 0) throw new Error('cryptsetup open --test-passphrase failed');
    t0 = performance.now();
    const dev = await FileDevice.open(img, { readOnly: true });
    const v = await openLuks(dev);
    (await v.unlock(Buffer.from('bench passphrase'))).volumeKey.dispose();
    await dev.close();
    ours.push(performance.now() - t0);
  }
  const a = median(ours);
  const b = median(theirs);
  console.log(`${name.padEnd(10)} cryptmap ${a.toFixed(0)} ms  cryptsetup ${b.toFixed(0)} ms  ratio ${(a / b).toFixed(2)} (target <= 1.20)`);
}

try {
  const lanes = String(Math.min(4, cpus().length));
  await one('argon2id', ['--pbkdf', 'argon2id', '--pbkdf-force-iterations', '4', '--pbkdf-memory', '1048576', '--pbkdf-parallel', lanes]);
  await one('pbkdf2', ['--pbkdf', 'pbkdf2', '--hash', 'sha256', '--pbkdf-force-iterations', '2000000']);
} finally {
  rmSync(dir, { recursive: true, force: true });
}
