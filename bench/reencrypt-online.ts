/**
 * Online reencryption vs a concurrent client (issue 16, Performance: "online reencryption must not cut
 * a concurrent client's throughput by more than half"). A `cryptmap daemon` serves a LUKS2 volume on
 * tmpfs; fio (ioengine=nbd, 64 KiB random read/write, iodepth 8) runs against it alone for a while, then
 * again while `cryptmap reencrypt` of the same volume runs online in the daemon, for as long as the
 * reencryption takes. Prints each side's throughput and the ratio with / without (target >= 0.5),
 * per round and the median; the order alternates every round so that load drift hits both alike.
 *
 * Run: npm run bench:reencrypt-online   (BENCH_ROUNDS=3, BENCH_SIZE_MIB=512, BENCH_DIR=/dev/shm,
 * BENCH_HOTZONE unset: the daemon's online default, 8 MiB)
 */
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3);
const SIZE_MIB = Number(process.env.BENCH_SIZE_MIB ?? 512);
const BASE_DIR = process.env.BENCH_DIR ?? '/dev/shm';
const HOTZONE = process.env.BENCH_HOTZONE;
const HEADER_MIB = 16;

const dir = mkdtempSync(join(BASE_DIR, 'cryptmap-bench-reenc-online-'));
const run = join(dir, 'run');
const key = join(dir, 'key');
const img = join(dir, 'vol.img');
writeFileSync(key, 'bench passphrase', { mode: 0o600 });
const cli = join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'bin', 'cryptmap.js');
const env = { ...process.env, CRYPTMAP_RUNTIME_DIR: run, CRYPTMAP_LOCK_DIR: join(dir, 'locks') };
const FAST = ['--pbkdf', 'pbkdf2', '--pbkdf-force-iterations', '1000'];

function cm(...args: string[]): void {
  const r = spawnSync(process.execPath, [cli, ...args], { env, encoding: 'utf8', timeout: 600_000 });
  if (r.status !== 0) throw new Error(`cryptmap ${args[0]} failed: ${r.stderr}`);
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

/** fio against the volume until `stop()`; resolves with MiB/s read + written. */
function fio(name: string): { stop(): Promise<number> } {
  const job = join(dir, `${name}.fio`);
  writeFileSync(
    job,
    [
      '[global]',
      'ioengine=nbd',
      `uri=nbd+unix:///vol?socket=${join(run, 'nbd.sock')}`,
      'rw=randrw',
      'bs=64k',
      'iodepth=8',
      `size=${Math.floor(SIZE_MIB / 2)}m`,
      'time_based=1',
      'runtime=3600',
      `[${name}]`,
      '',
    ].join('\n'),
  );
  const p: ChildProcess = spawn('fio', ['--output-format=json', job], { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  p.stdout!.on('data', (d) => (out += d));
  const closed = new Promise<void>((r) => p.on('close', () => r()));
  return {
    async stop() {
      p.kill('SIGINT');
      await closed;
      const js = JSON.parse(out.slice(out.indexOf('{'))) as {
        jobs: { error: number; read: { bw_bytes: number }; write: { bw_bytes: number } }[];
      };
      const j = js.jobs[0]!;
      if (j.error !== 0) throw new Error(`fio ${name} failed: error ${j.error}`);
      return (j.read.bw_bytes + j.write.bw_bytes) / (1 << 20);
    },
  };
}

async function alone(seconds: number): Promise<number> {
  const f = fio('alone');
  await new Promise((r) => setTimeout(r, seconds * 1000));
  return f.stop();
}

async function during(): Promise<{ mibs: number; seconds: number }> {
  const f = fio('during');
  await new Promise((r) => setTimeout(r, 300));
  const t0 = Date.now();
  await new Promise<void>((res, rej) => {
    const p = spawn(
      process.execPath,
      [cli, 'reencrypt', '-q', ...FAST, ...(HOTZONE ? ['--hotzone-size', HOTZONE] : []), '--key-file', key, 'vol'],
      { env, stdio: ['ignore', 'ignore', 'pipe'] },
    );
    let err = '';
    p.stderr.on('data', (d) => (err += d));
    p.on('close', (code) => (code === 0 ? res() : rej(new Error(`reencrypt exited ${code}: ${err}`))));
  });
  const seconds = (Date.now() - t0) / 1000;
  return { mibs: await f.stop(), seconds };
}

async function main(): Promise<void> {
  if (spawnSync('fio', ['--version']).error) throw new Error('fio is missing (Debian package fio)');
  writeFileSync(img, '');
  truncateSync(img, (HEADER_MIB + SIZE_MIB) << 20);
  cm('luksFormat', '-q', '--type', 'luks2', ...FAST, '--key-file', key, img);
  const daemon = spawn(process.execPath, [cli, 'daemon', '--runtime-dir', run], { env, stdio: 'ignore' });
  try {
    for (let i = 0; ; i++) {
      if (spawnSync(process.execPath, [cli, 'status', 'x'], { env }).status === 4) break;
      if (i > 100) throw new Error('the daemon did not start');
      await new Promise((r) => setTimeout(r, 100));
    }
    cm('open', '--key-file', key, img, 'vol');
    console.log(
      `online reencryption of a ${SIZE_MIB} MiB LUKS2 volume (tmpfs) vs fio randrw 64k qd8 over NBD, ${ROUNDS} rounds`,
    );
    const ratios: number[] = [];
    let last = 5;
    for (let r = 0; r < ROUNDS; r++) {
      let a: number;
      let d: { mibs: number; seconds: number };
      if (r % 2 === 0) {
        d = await during();
        a = await alone(d.seconds);
      } else {
        // Alone first, for as long as the last reencryption took.
        a = await alone(last);
        d = await during();
      }
      last = d.seconds;
      const ratio = d.mibs / a;
      ratios.push(ratio);
      console.log(
        `  round ${r + 1}: client alone ${a.toFixed(1)} MiB/s, during reencryption ${d.mibs.toFixed(1)} MiB/s (reencryption ${d.seconds.toFixed(1)} s): ratio ${ratio.toFixed(2)}`,
      );
    }
    console.log(`median ratio during/alone: ${median(ratios).toFixed(2)} (target >= 0.50)`);
  } finally {
    spawnSync(process.execPath, [cli, 'close', 'vol'], { env });
    daemon.kill('SIGTERM');
    await new Promise((r) => daemon.on('close', r));
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
