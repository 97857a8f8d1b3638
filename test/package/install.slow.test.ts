/**
 * The installable package (issue 18 item 5): `npm pack` of this checkout (its built dist/), then
 * `npm install -g --prefix TMP` of the tarball as an operator would, which builds the native addon
 * from source; from that prefix: `cryptmap --version`, `cryptmap benchmark`, and a LUKS round trip
 * (luksFormat read back by cryptsetup; a daemon, open, data written and read back over NBD by qemu-io
 * across a close and reopen). A second install with --ignore-scripts (no compiler: no addon) runs on
 * the js backend. From each install, the library examples (examples/*.mjs as shipped) run in a
 * project of their own that has the installed package in its node_modules, importing `cryptmap/...`
 * as a user's code does. npm needs the registry (or its cache) for the runtime dependencies.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, readdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { FAST_LUKS2_FORMAT } from '../helpers/luks.js';
import { type RunResult, runTool } from '../helpers/tools.js';
import { pollUntil } from '../helpers/wait.js';
import { makeTempDir } from '../helpers/tmp.js';
import { fileURLToPath } from 'node:url';
import { checkExamples } from './examples-helpers.js';

const ROOT = fileURLToPath(new URL('../../../', import.meta.url));
const VERSION = (JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string }).version;
const { dir, cleanup } = makeTempDir('cryptmap-pkg-');
const children: ChildProcess[] = [];
after(() => {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  cleanup();
});

/** A tool run from the package's temp dir (by default) with the test's environment plus `env`. */
function run(
  cmd: string,
  args: string[],
  opts: { cwd?: string; env?: NodeJS.ProcessEnv; timeoutMs?: number } = {},
): Promise<RunResult> {
  return runTool(cmd, args, {
    cwd: opts.cwd ?? dir,
    env: { ...process.env, ...opts.env },
    timeoutMs: opts.timeoutMs ?? 120_000,
  });
}

async function must(cmd: string, args: string[], opts: Parameters<typeof run>[2] = {}): Promise<string> {
  const r = await run(cmd, args, opts);
  assert.equal(r.code, 0, `${cmd} ${args.join(' ')}:\n${r.stdout}\n${r.stderr}`);
  return r.stdout;
}

let tarball = '';

async function pack(): Promise<string> {
  if (tarball) return tarball;
  assert.ok(existsSync(join(ROOT, 'dist', 'src', 'cli', 'entry.js')), 'build first (npm run build)');
  // --ignore-scripts: `prepare` would rebuild dist/ under the other tests running from it.
  const out = await must('npm', ['pack', '--ignore-scripts', '--json', '--pack-destination', dir], {
    cwd: ROOT,
    timeoutMs: 300_000,
  });
  const info = (JSON.parse(out) as { filename: string; files: { path: string }[] }[])[0]!;
  const paths = info.files.map((f) => f.path);
  for (const p of [
    'bin/cryptmap.js',
    'dist/src/cli/entry.js',
    'native/cryptmap.c',
    'binding.gyp',
    'scripts/build-native.mjs',
    'contrib/systemd/cryptmap-daemon.service',
    'package.json',
    ...['engine', 'blockdev', 'dm', 'luks', 'nbd'].map((e) => `examples/${e}.mjs`),
  ]) {
    assert.ok(paths.includes(p), `the tarball holds ${p}`);
  }
  for (const p of paths)
    assert.doesNotMatch(p, /^(test|dist\/test|build|node_modules|\.cryptmap)\//, `the tarball leaves out ${p}`);
  tarball = join(dir, info.filename);
  return tarball;
}

async function install(prefix: string, extra: string[]): Promise<string> {
  const tgz = await pack();
  // As an operator would: global install of the tarball into a prefix (npm 11 asks which packages may run install scripts).
  await must(
    'npm',
    [
      'install',
      '-g',
      '--prefix',
      prefix,
      '--no-audit',
      '--no-fund',
      '--prefer-offline',
      '--allow-scripts=cryptmap,argon2',
      ...extra,
      tgz,
    ],
    { timeoutMs: 900_000 },
  );
  const bin = join(prefix, 'bin', 'cryptmap');
  assert.ok(existsSync(bin), `${bin} installed`);
  return bin;
}

/** A user's project with the installed package in node_modules; the shipped examples run from it. */
async function examplesFromInstall(prefix: string, tag: string): Promise<void> {
  const installed = join(prefix, 'lib', 'node_modules', 'cryptmap');
  const app = join(dir, `app-${tag}`);
  mkdirSync(join(app, 'node_modules'), { recursive: true });
  writeFileSync(join(app, 'package.json'), JSON.stringify({ name: `app-${tag}`, private: true, type: 'module' }));
  symlinkSync(installed, join(app, 'node_modules', 'cryptmap'));
  cpSync(join(installed, 'examples'), app, { recursive: true });
  await checkExamples(app, app);
}

async function luksRoundTrip(bin: string, tag: string): Promise<void> {
  const key = join(dir, `${tag}.key`);
  writeFileSync(key, `passphrase ${tag}`, { mode: 0o600 });
  const img = join(dir, `${tag}.img`);
  await must('truncate', ['-s', '24M', img]);
  await must(bin, [...FAST_LUKS2_FORMAT, '--key-file', key, img]);
  await must('cryptsetup', ['open', '--test-passphrase', '--key-file', key, img]);
  const rt = join(dir, `${tag}-run`);
  const daemon = spawn(bin, ['daemon', '--runtime-dir', rt], { stdio: ['ignore', 'ignore', 'pipe'] });
  children.push(daemon);
  let log = '';
  daemon.stderr!.on('data', (d: Buffer) => {
    log += d.toString();
  });
  try {
    await pollUntil(() => log.includes('daemon ready') || daemon.exitCode !== null, {
      deadlineMs: 60_000,
      intervalMs: 100,
      what: 'the installed daemon to get ready',
      detail: () => log,
    });
    assert.equal(daemon.exitCode, null, `the installed daemon exited:\n${log}`);
    const qemu = (cmd: string) =>
      must('qemu-io', ['--image-opts', `driver=nbd,path=${rt}/nbd.sock,export=${tag}`, '-c', cmd]);
    await must(bin, ['open', '--runtime-dir', rt, '--key-file', key, img, tag]);
    assert.match(await qemu('write -P 0x5a 1M 64k'), /wrote 65536\/65536/);
    await must(bin, ['close', '--runtime-dir', rt, tag]);
    await must(bin, ['open', '--runtime-dir', rt, '--key-file', key, img, tag]);
    assert.match(await qemu('read -P 0x5a 1M 64k'), /read 65536\/65536/, 'the data read back after close and open');
    await must(bin, ['close', '--runtime-dir', rt, tag]);
  } finally {
    const exited = new Promise((r) => daemon.once('exit', r));
    if (daemon.exitCode === null) daemon.kill('SIGTERM');
    await exited;
  }
}

test('npm pack, npm install -g: --version, benchmark on the native addon built at install, a LUKS round trip', async () => {
  const bin = await install(join(dir, 'prefix'), []);
  assert.equal((await must(bin, ['--version'])).trim(), `cryptmap ${VERSION}`);
  assert.ok(
    existsSync(join(dir, 'prefix', 'lib', 'node_modules', 'cryptmap', 'build', 'Release', 'cryptmap.node')),
    'the addon was built from source at install',
  );
  const b = JSON.parse(await must(bin, ['benchmark', '--json', '--cipher', 'aes-xts-plain64', '--seconds', '0.2'])) as {
    backend: string;
    encryptMBps: number;
  }[];
  assert.equal(b[0]!.backend, 'native');
  assert.ok(b[0]!.encryptMBps > 0);
  await luksRoundTrip(bin, 'native');
  await examplesFromInstall(join(dir, 'prefix'), 'native');
});

test('installed without running install scripts (no addon): the js backend serves the same verbs', async () => {
  const prefix = join(dir, 'prefix-js');
  const bin = await install(prefix, ['--ignore-scripts']);
  const pkgDir = join(prefix, 'lib', 'node_modules', 'cryptmap');
  assert.ok(
    !existsSync(join(pkgDir, 'build')),
    `no addon: ${existsSync(join(pkgDir, 'build')) ? readdirSync(join(pkgDir, 'build')).join(',') : ''}`,
  );
  const b = JSON.parse(await must(bin, ['benchmark', '--json', '--cipher', 'aes-xts-plain64', '--seconds', '0.2'])) as {
    backend: string;
  }[];
  assert.equal(b[0]!.backend, 'js');
  await luksRoundTrip(bin, 'js');
  // The default KDF, Argon2id, runs on argon2's prebuilt binary here (0.45's crashed Node 20 at load: exit 139).
  const key = join(dir, 'js.key');
  const img = join(dir, 'js-argon2.img');
  await must('truncate', ['-s', '24M', img]);
  await must(bin, [
    'luksFormat',
    '--batch-mode',
    '--pbkdf-force-iterations',
    '4',
    '--pbkdf-memory',
    '32',
    '--key-file',
    key,
    img,
  ]);
  assert.match(await must('cryptsetup', ['luksDump', img]), /PBKDF:\s+argon2id/);
  await must('cryptsetup', ['open', '--test-passphrase', '--key-file', key, img]);
  await examplesFromInstall(prefix, 'js');
});
