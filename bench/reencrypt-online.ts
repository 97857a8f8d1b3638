/**
 * Online reencryption vs a concurrent client (issue 16, Performance: "online reencryption must not cut
 * a concurrent client's throughput by more than half"). A `cryptmap daemon` serves a LUKS2 volume on
 * tmpfs; per round one fio (ioengine=nbd, 64 KiB random read/write, iodepth 8, over the first half of
 * the volume) runs the whole time, and `cryptmap reencrypt` of the same volume runs online in the
 * daemon in the middle of it. fio logs its bandwidth every 100 ms with Unix timestamps; the daemon's log
 * lines mark when its reencryption job started and ended. The ratio is the client's throughput while the
 * job ran over its throughput in equal windows just before and just after (alone), so that the load of
 * a shared machine, which drifts over seconds, weighs on both sides alike. Also printed: the
 * throughput over the whole CLI run (Node's start, unlocking and the header's initialisation
 * included), the reencryption's own MiB/s and the time it yielded to the client (daemon
 * reencrypt-online.ts YIELD_FACTOR).
 *
 * Run: npm run bench:reencrypt-online   (BENCH_ROUNDS=3, BENCH_SIZE_MIB=256, BENCH_DIR=/dev/shm,
 * BENCH_HOTZONE unset: the daemon's online default)
 */
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { median } from './common.js';

const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3);
const SIZE_MIB = Number(process.env.BENCH_SIZE_MIB ?? 256);
const BASE_DIR = process.env.BENCH_DIR ?? '/dev/shm';
const HOTZONE = process.env.BENCH_HOTZONE;
const HEADER_MIB = 16;
/** Alone windows: at least this long, else as long as the last reencryption job. */
const MIN_ALONE_MS = 3000;
/** fio's first samples (connection, warm-up) are left out. */
const WARMUP_MS = 500;

const dir = mkdtempSync(join(BASE_DIR, 'cryptmap-bench-reenc-online-'));
const run = join(dir, 'run');
const key = join(dir, 'key');
const img = join(dir, 'vol.img');
writeFileSync(key, 'bench passphrase', { mode: 0o600 });
const cli = join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'bin', 'cryptmap.js');
const env = { ...process.env, CRYPTMAP_RUNTIME_DIR: run, CRYPTMAP_LOCK_DIR: join(dir, 'locks') };
const FAST = ['--pbkdf', 'pbkdf2', '--pbkdf-force-iterations', '1000'];
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function cm(...args: string[]): void {
  const r = spawnSync(process.execPath, [cli, ...args], { env, encoding: 'utf8', timeout: 600_000 });
  if (r.status !== 0) throw new Error(`cryptmap ${args[0]} failed: ${r.stderr}`);
}

/** fio against the volume until `stop()`; then its bandwidth samples: [unix ms at the interval's end, bytes]. */
function fio(name: string): { stop(): Promise<Array<[number, number]>> } {
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
      `write_bw_log=${join(dir, name)}`,
      'log_avg_msec=100',
      'log_unix_epoch=1',
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
      const js = JSON.parse(out.slice(out.indexOf('{'))) as { jobs: { error: number }[] };
      if (js.jobs[0]!.error !== 0) throw new Error(`fio ${name} failed: error ${js.jobs[0]!.error}`);
      // Lines: time (ms), bandwidth (KiB/s) averaged over the interval, direction, block size, offset[, prio].
      const samples: Array<[number, number]> = [];
      for (const line of readFileSync(join(dir, `${name}_bw.1.log`), 'utf8').split('\n')) {
        const f = line.split(',').map((x) => Number(x.trim()));
        if (f.length >= 2 && Number.isFinite(f[0]) && Number.isFinite(f[1])) samples.push([f[0]!, f[1]! * 1024 * 0.1]);
      }
      return samples;
    },
  };
}

/** MiB/s of the samples whose interval ends in [a, b). */
function rate(samples: Array<[number, number]>, a: number, b: number): number {
  let bytes = 0;
  for (const [t, n] of samples) if (t > a && t <= b) bytes += n;
  return bytes / (1 << 20) / ((b - a) / 1000);
}

/** The daemon's log lines as they arrive, each with the time it came. */
function watchLog(p: ChildProcess): {
  wait(re: RegExp, after: number, ms: number): Promise<{ t: number; line: string }>;
} {
  const lines: Array<{ t: number; line: string }> = [];
  let buf = '';
  p.stderr!.on('data', (d) => {
    buf += d;
    const parts = buf.split('\n');
    buf = parts.pop()!;
    for (const line of parts) lines.push({ t: Date.now(), line });
  });
  return {
    async wait(re, after, ms) {
      const end = Date.now() + ms;
      for (;;) {
        const hit = lines.find((l) => l.t >= after && re.test(l.line));
        if (hit) return hit;
        if (Date.now() > end) throw new Error(`the daemon did not log ${re} within ${ms} ms`);
        await sleep(20);
      }
    },
  };
}

async function reencrypt(): Promise<void> {
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
}

async function main(): Promise<void> {
  if (spawnSync('fio', ['--version']).error) throw new Error('fio is missing (Debian package fio)');
  writeFileSync(img, '');
  truncateSync(img, (HEADER_MIB + SIZE_MIB) << 20);
  cm('luksFormat', '-q', '--type', 'luks2', ...FAST, '--key-file', key, img);
  const daemon = spawn(process.execPath, [cli, 'daemon', '--runtime-dir', run], {
    env,
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  const log = watchLog(daemon);
  try {
    for (let i = 0; ; i++) {
      if (spawnSync(process.execPath, [cli, 'status', 'x'], { env }).status === 4) break;
      if (i > 100) throw new Error('the daemon did not start');
      await sleep(100);
    }
    cm('open', '--key-file', key, img, 'vol');
    console.log(
      `online reencryption of a ${SIZE_MIB} MiB LUKS2 volume (tmpfs, hotzone ${HOTZONE ?? 'default'}) vs fio randrw 64k qd8 over NBD, ${ROUNDS} rounds; load average ${spawnSync(
        'uptime',
        { encoding: 'utf8' },
      )
        .stdout.trim()
        .replace(/.*load average: /, '')}`,
    );
    const ratios: number[] = [];
    const cliRatios: number[] = [];
    let alone = MIN_ALONE_MS;
    for (let r = 0; r < ROUNDS; r++) {
      const f = fio(`round${r}`);
      const t0 = Date.now();
      await sleep(WARMUP_MS + alone);
      const c0 = Date.now();
      const done = reencrypt();
      const started = await log.wait(/online reencryption started/, c0, 600_000);
      const ended = await log.wait(/online reencryption (finished|stopped|failed)/, c0, 600_000);
      await done;
      const c1 = Date.now();
      const jobMs = ended.t - started.t;
      await sleep(alone);
      const t1 = Date.now();
      const s = await f.stop();
      const a0 = Math.max(t0 + WARMUP_MS, started.t - alone);
      const a1 = Math.min(t1, ended.t + alone);
      const before = rate(s, a0, started.t) * (started.t - a0);
      const after = rate(s, ended.t, a1) * (a1 - ended.t);
      const aloneRate = (before + after) / (started.t - a0 + a1 - ended.t);
      const during = rate(s, started.t, ended.t);
      const cliRate = rate(s, c0, c1);
      const ratio = during / aloneRate;
      ratios.push(ratio);
      cliRatios.push(cliRate / aloneRate);
      const yielded = /yieldedMs=(\d+)/.exec(ended.line)?.[1] ?? '?';
      const suspended = /suspendedMs=(\d+)/.exec(ended.line)?.[1] ?? '?';
      console.log(
        `  round ${r + 1}: client alone ${aloneRate.toFixed(1)} MiB/s, during the reencryption job ${during.toFixed(1)} MiB/s: ratio ${ratio.toFixed(2)}` +
          ` (job ${(jobMs / 1000).toFixed(1)} s = ${(SIZE_MIB / (jobMs / 1000)).toFixed(0)} MiB/s, ${yielded} ms yielded, hotzones suspended ${suspended} ms;` +
          ` whole CLI run ${((c1 - c0) / 1000).toFixed(1)} s: ${cliRate.toFixed(1)} MiB/s, ratio ${(cliRate / aloneRate).toFixed(2)})`,
      );
      alone = Math.max(MIN_ALONE_MS, jobMs);
    }
    console.log(
      `median ratio during/alone: ${median(ratios).toFixed(2)} (target >= 0.50); over the whole CLI run ${median(cliRatios).toFixed(2)}; load average ${spawnSync(
        'uptime',
        { encoding: 'utf8' },
      )
        .stdout.trim()
        .replace(/.*load average: /, '')}`,
    );
  } finally {
    spawnSync(process.execPath, [cli, 'close', 'vol'], { env });
    daemon.kill('SIGTERM');
    await new Promise((r) => daemon.on('close', r));
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
