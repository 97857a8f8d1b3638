/**
 * External tools in tests: `requireTool` fails (never skips) when one is missing, naming the Debian
 * package; `runTool` / `mustRun` run one with its output captured and a deadline (asynchronously: a
 * server under test may live in this process, so never spawnSync it).
 */
import { spawn, spawnSync } from 'node:child_process';
import { debianPackage } from '../../src/util/tools.js';

/** Packages of the tools only the tests run (the tools cryptmap itself runs are in src/util/tools.ts). */
const TEST_PACKAGES: Record<string, string> = {
  cryptsetup: 'cryptsetup-bin',
  nbdinfo: 'libnbd-bin',
  nbdcopy: 'libnbd-bin',
  nbdsh: 'python3-libnbd',
  'qemu-io': 'qemu-utils',
  'qemu-img': 'qemu-utils',
  'qemu-nbd': 'qemu-utils',
  fio: 'fio',
  openssl: 'openssl',
  nbdkit: 'nbdkit',
  'nbd-server': 'nbd-server',
  python3: 'python3',
  'systemd-notify': 'systemd',
  'systemd-analyze': 'systemd',
  thin_check: 'thin-provisioning-tools',
  thin_dump: 'thin-provisioning-tools',
  thin_restore: 'thin-provisioning-tools',
};

/** The Debian package that provides `tool`. */
export function packageOf(tool: string): string {
  return TEST_PACKAGES[tool] ?? debianPackage(tool);
}

/** The failure message for a missing tool. */
export function missingTool(tool: string): string {
  return `${tool} is not installed: install the Debian package ${packageOf(tool)} (scripts/install-deps.sh)`;
}

/** Throws (never skips) when `tool` is not on PATH, naming its Debian package. */
export function requireTool(tool: string): void {
  const r = spawnSync('sh', ['-c', 'command -v "$1"', 'sh', tool], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(missingTool(tool));
}

export interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Run a tool (stdin: `input`, then EOF) with its output captured; killed after `timeoutMs` (60 s). */
export function runTool(
  cmd: string,
  args: string[],
  opts: { input?: Buffer | string; timeoutMs?: number; env?: NodeJS.ProcessEnv } = {},
): Promise<RunResult> {
  requireTool(cmd);
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'], env: opts.env ?? process.env });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (d: Buffer) => out.push(d));
    child.stderr.on('data', (d: Buffer) => err.push(d));
    const t = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 60_000);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(t);
      resolve({ code, stdout: Buffer.concat(out).toString('utf8'), stderr: Buffer.concat(err).toString('utf8') });
    });
    child.stdin.on('error', () => {});
    if (opts.input !== undefined) child.stdin.end(opts.input);
    else child.stdin.end();
  });
}

/** Run and assert exit 0, returning stdout. */
export async function mustRun(cmd: string, args: string[], opts: Parameters<typeof runTool>[2] = {}): Promise<string> {
  const r = await runTool(cmd, args, opts);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.code}: ${r.stderr}${r.stdout}`);
  return r.stdout;
}
