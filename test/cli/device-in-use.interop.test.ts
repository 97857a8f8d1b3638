// A block device that a mapping uses is in use, as with the kernel's device-mapper (issue 12;
// cryptsetup's compat-test [20] and [25]): the daemon claims the devices of its tables O_EXCL, so
// cryptsetup 2.6 itself (the oracle) refuses to format a device cryptmap has mapped, and cryptmap
// refuses what cryptsetup refuses with its message and exit code:
// - a second mapping of a mapped device (lib/setup.c create_or_reload_device, DEV_EXCL): "Cannot use
//   device X which is in use (already mapped or mounted).", exit 5; `--shared` (plain only) maps it
//   again, in any range: cryptsetup has allowed overlapping shared segments since 1.5 (commit
//   f720affe "Relax --shared test, allow mapping even for overlapping segments");
// - luksFormat of a mapped device: exit 5 with that message on a device without a signature, exit 1
//   "Cannot exclusively open X, device in use." when blkid finds one (src/utils_blockdev.c);
// - a regular file is never held (cryptsetup puts each activation of a file on a loop device of its own).
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { closeSync, openSync, readSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { cryptmap, ENTRY, exec, ok, useDaemon } from './harness.js';
import { FAST_PBKDF } from '../helpers/luks.js';

const fx = useDaemon('cm-in-use-');
const CS = '/usr/sbin/cryptsetup';
const cm = (args: string[], input?: string) => cryptmap(['--runtime-dir', fx.run, ...args], input);
const BOTH = [[CS], [process.execPath, ENTRY]];
const inUse = (dev: string) => `Cannot use device ${dev} which is in use (already mapped or mounted).\n`;

let n = 0;
/** A zeroed image of 16 MiB on a fresh loop device; `use` runs with the loop device, which is detached afterwards. */
async function withLoop(use: (loop: string, img: string) => Promise<void>): Promise<void> {
  const img = join(fx.dir, `img${n++}`);
  writeFileSync(img, '');
  truncateSync(img, 16 << 20);
  const loop = (await ok('losetup', ['-f', '--show', img])).trim();
  try {
    await use(loop, img);
  } finally {
    for (const name of ['u1', 'u2', 'u3', 'u4']) await cm(['close', name]);
    await exec('losetup', ['-d', loop]);
  }
}

function keyFile(): string {
  const f = join(fx.dir, 'key64');
  writeFileSync(f, Buffer.alloc(64, 7), { mode: 0o600 });
  return f;
}

/** The first `len` bytes of `file` are all zero (nothing was written there). */
function zeroes(file: string, len = 4096): boolean {
  const fd = openSync(file, 'r');
  try {
    const b = Buffer.alloc(len);
    readSync(fd, b, 0, len, 0);
    return b.every((x) => x === 0);
  } finally {
    closeSync(fd);
  }
}

test('a mapped block device is in use: a second mapping and luksFormat are refused as cryptsetup refuses them (exit 5), --shared maps it again even overlapping; the claim ends with the mapping', async () => {
  const key = keyFile();
  await withLoop(async (loop, img) => {
    assert.equal((await cm(['create', 'u1', loop, '-d', key])).code, 0);
    // The same name first (cryptsetup checks the name before the device), then the device.
    const again = await cm(['create', 'u1', loop, '-d', key]);
    assert.deepEqual([again.code, again.stderr], [5, 'Device u1 already exists.\n']);
    const second = await cm(['create', 'u2', loop, '-d', key]);
    assert.deepEqual([second.code, second.stderr], [5, inUse(loop)]);
    // luksFormat of the mapped device: cryptsetup itself is kept out by the daemon's claim, and cryptmap says the same.
    for (const bin of BOTH) {
      const r = await exec(
        bin[0]!,
        [...bin.slice(1), '-q', 'luksFormat', '--type', 'luks1', ...FAST_PBKDF, loop],
        'pw\n',
      );
      assert.deepEqual([r.code, r.stderr], [5, inUse(loop)], `${bin.join(' ')} luksFormat`);
    }
    assert.ok(zeroes(img), 'nothing was written to the device');
    // --shared: plain only (cryptsetup verify_open), and then any range, overlapping or not.
    for (const bin of BOTH) {
      const r = await exec(bin[0]!, [...bin.slice(1), 'open', '--shared', loop, 'u2'], 'pw\n');
      assert.equal(r.code, 1, `${bin.join(' ')} open --shared (LUKS)`);
      assert.match(r.stderr, /Option --shared is allowed only for open of plain device\.\n$/);
    }
    const plain = ['--hash', 'sha256', '--shared'];
    assert.equal((await cm(['create', 'u2', loop, ...plain, '--offset', '0', '--size', '256'], 'pw\n')).code, 0);
    assert.equal((await cm(['create', 'u3', loop, ...plain, '--offset', '512', '--size', '256'], 'pw\n')).code, 0);
    const overlap = await cm(
      ['open', '--type', 'plain', loop, 'u4', ...plain, '--offset', '100', '--size', '512'],
      'pw\n',
    );
    assert.deepEqual([overlap.code, overlap.stderr], [0, '']);
    assert.match((await cm(['status', 'u4'])).stdout, /offset:\s+100 sectors\n\s+size:\s+512 sectors/);
    for (const name of ['u1', 'u2', 'u3']) assert.equal((await cm(['close', name])).code, 0);
    // One mapping left still holds the device; none: cryptsetup formats it.
    assert.equal((await exec(CS, ['-q', 'luksFormat', '--type', 'luks1', ...FAST_PBKDF, loop], 'pw\n')).code, 5);
    assert.equal((await cm(['close', 'u4'])).code, 0);
    assert.equal((await exec(CS, ['-q', 'luksFormat', '--type', 'luks1', ...FAST_PBKDF, loop], 'pw\n')).code, 0);
    assert.ok(!zeroes(img), 'cryptsetup wrote its header');

    // A LUKS device opened: a second open is refused; luksFormat meets blkid's signature first (exit 1).
    assert.equal((await cm(['luksOpen', loop, 'u1'], 'pw\n')).code, 0);
    const open2 = await cm(['luksOpen', loop, 'u2'], 'pw\n');
    assert.deepEqual([open2.code, open2.stderr], [5, inUse(loop)]);
    const before = await ok(CS, ['luksDump', loop]);
    for (const bin of BOTH) {
      const r = await exec(
        bin[0]!,
        [...bin.slice(1), '-q', 'luksFormat', '--type', 'luks1', ...FAST_PBKDF, loop],
        'pw\n',
      );
      assert.equal(r.code, 1, `${bin.join(' ')} luksFormat of an open LUKS device: ${r.stderr}`);
      assert.match(r.stderr, new RegExp(`Cannot exclusively open ${loop}, device in use\\.\\n$`));
    }
    assert.equal(await ok(CS, ['luksDump', loop]), before, 'the header is unchanged');
    assert.equal((await cm(['close', 'u1'])).code, 0);
  });
});

test('a regular file is not held: two mappings of one image file, as cryptsetup gives each its own loop device', async () => {
  const key = keyFile();
  const img = join(fx.dir, 'file.img');
  writeFileSync(img, '');
  truncateSync(img, 4 << 20);
  try {
    assert.equal((await cm(['create', 'u1', img, '-d', key])).code, 0);
    const r = await cm(['create', 'u2', img, '-d', key]);
    assert.deepEqual([r.code, r.stderr], [0, '']);
  } finally {
    await cm(['close', 'u1']);
    await cm(['close', 'u2']);
  }
});

/** A process that holds `dev` O_EXCL (as a mount would) until killed; resolves once it holds it. */
async function holdExclusive(dev: string): Promise<ChildProcess> {
  const py =
    'import os,sys\nfd=os.open(sys.argv[1], os.O_RDONLY|os.O_EXCL)\nprint("held", flush=True)\nsys.stdin.read()';
  const child = spawn('python3', ['-c', py, dev], { stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stderr?.on('data', (d) => {
    err += d;
  });
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`python3 did not hold ${dev} within 60 s: ${err}`)), 60_000);
    child.stdout?.on('data', (d) => {
      out += d;
      if (out.includes('held')) {
        clearTimeout(timer);
        resolve();
      }
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`python3 exited (${code}) before holding ${dev}: ${err}`));
    });
  });
  return child;
}

test('a block device something else holds exclusively (as a mount does) is refused, with --shared too (the daemon cannot claim it)', async () => {
  const key = keyFile();
  await withLoop(async (loop) => {
    const holder = await holdExclusive(loop);
    try {
      const r = await cm(['create', 'u1', loop, '-d', key]);
      assert.deepEqual([r.code, r.stderr], [5, inUse(loop)]);
      // cryptsetup's message alone (not the daemon's table-line context), for create and open --type plain.
      const s = await cm(['create', 'u1', loop, '-d', key, '--shared']);
      assert.deepEqual([s.code, s.stderr], [5, inUse(loop)]);
      const o = await cm(['open', '--type', 'plain', '--shared', loop, 'u1', '-d', key]);
      assert.deepEqual([o.code, o.stderr], [5, inUse(loop)]);
      assert.equal((await cm(['status', 'u1'])).code, 4, 'nothing was mapped');
    } finally {
      holder.kill();
    }
    await new Promise<void>((resolve, reject) => {
      if (holder.exitCode !== null || holder.signalCode !== null) return resolve();
      const timer = setTimeout(() => reject(new Error('python3 did not exit within 30 s of SIGTERM')), 30_000);
      holder.once('exit', () => {
        clearTimeout(timer);
        resolve();
      });
    });
    assert.equal((await cm(['create', 'u1', loop, '-d', key])).code, 0, 'free again once the holder is gone');
  });
});
