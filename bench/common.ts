/**
 * What the benchmarks share: running a tool, waiting for a server's socket, the load average printed
 * beside every figure, medians, a process's CPU time, fio's random-read IOPS over NBD, cryptsetup's fast
 * LUKS1 format arguments, and opening a LUKS volume on the daemon core of a bench's child process.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { type CryptMapping, prepareLuks } from '../src/activate/mapping.js';
import type { DaemonCore } from '../src/daemon/core.js';

/** Run `cmd`; its stdout, or an error with its stderr (and, when it is missing, the package to install). */
export function run(cmd: string, args: string[], pkg?: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const c = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    c.stdout.on('data', (d: Buffer) => {
      out += d.toString();
    });
    c.stderr.on('data', (d: Buffer) => {
      err += d.toString();
    });
    c.on('error', (e) =>
      reject(new Error(`${cmd}: ${e.message}${pkg === undefined ? '' : ` (install the Debian package ${pkg})`}`)),
    );
    c.on('close', (code) =>
      code === 0 ? resolve(out) : reject(new Error(`${cmd} ${args.join(' ')} exited ${code}: ${err.trim()}`)),
    );
  });
}

/** Wait (at most 10 s) until `path` exists; fail early if `child`, which should create it, exits. */
export async function waitFor(path: string, child?: ChildProcess, what = path): Promise<void> {
  for (let i = 0; i < 400 && !existsSync(path); i++) {
    if (child !== undefined && child.exitCode !== null)
      throw new Error(`${what} exited with ${child.exitCode} before listening`);
    await new Promise((r) => setTimeout(r, 25));
  }
  if (!existsSync(path)) throw new Error(`${what}: ${path} did not appear`);
}

/** The 1, 5 and 15 minute load averages. */
export function loadavg(): string {
  return readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');
}

/** The median (the upper one of an even count); NaN for none. */
export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)] ?? Number.NaN;
}

/** CPU seconds (user + system, all threads) process `pid` used so far (/proc/PID/stat); NaN if it is gone. */
export function cpuSeconds(pid: number | undefined): number {
  if (pid === undefined) return Number.NaN;
  try {
    const f = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = f.slice(f.lastIndexOf(')') + 2).split(' ');
    return (Number(fields[11]) + Number(fields[12])) / 100; // USER_HZ 100
  } catch {
    return Number.NaN;
  }
}

/** The children's CPU time in ms from bash's `times` (its last line: "0m1.234s 0m0.056s", user and sys). */
export function childCpuMs(timesOutput: string): number {
  const lines = timesOutput.trim().split('\n');
  const child = lines[lines.length - 1] ?? '';
  let ms = 0;
  for (const m of child.matchAll(/(\d+)m([\d.]+)s/g)) ms += (Number(m[1]) * 60 + Number(m[2])) * 1000;
  return ms;
}

/**
 * `cryptsetup` arguments that format the LUKS1 aes-xts-plain64 (512-bit key) images the transport
 * benchmarks serve, with a fast PBKDF (the unlock is not what they measure); add `--key-file F IMG`.
 */
export const CRYPTSETUP_FAST_LUKS1_FORMAT = [
  'luksFormat',
  '--batch-mode',
  '--type',
  'luks1',
  '--cipher',
  'aes-xts-plain64',
  '--key-size',
  '512',
  '--hash',
  'sha256',
  '--pbkdf-force-iterations',
  '1000',
];

/** IOPS of fio's nbd engine reading 4 KiB at random, queue depth 32, for `seconds`, over the first `sizeBytes`. */
export async function fioRandRead(uri: string, sizeBytes: number, seconds: number): Promise<number> {
  const out = await run(
    'fio',
    [
      '--name=randread',
      '--ioengine=nbd',
      `--uri=${uri}`,
      '--rw=randread',
      '--bs=4k',
      '--iodepth=32',
      `--size=${sizeBytes}`,
      '--time_based',
      `--runtime=${seconds}`,
      '--randseed=42',
      '--output-format=json',
    ],
    'fio',
  );
  const j = JSON.parse(out.slice(out.indexOf('{'))) as { jobs: { read: { iops: number } }[] };
  return j.jobs[0]!.read.iops;
}

/** Opens the LUKS volume on `device` as `name` on `core`, the passphrase read from `keyFile` (wiped once used); its mapping. */
export async function openLuksVolume(
  core: DaemonCore,
  name: string,
  device: string,
  keyFile: string,
): Promise<CryptMapping> {
  const passphrase = readFileSync(keyFile);
  let prepared: Awaited<ReturnType<typeof prepareLuks>>;
  try {
    prepared = await prepareLuks({ name, device, passphrase });
  } finally {
    passphrase.fill(0);
  }
  try {
    await core.openVolume(prepared.mapping, prepared.volumeKey);
  } finally {
    prepared.volumeKey.dispose();
  }
  return prepared.mapping;
}
