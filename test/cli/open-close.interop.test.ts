/**
 * The CLI as a user runs it: `cryptmap daemon` in the background, then luksFormat, open, status,
 * close (cryptsetup's flags and exit codes), data over NBD with qemu-io and nbdcopy, and, as root,
 * the whole path: open --attach, mkfs.ext4, mount, files, unmount, close, reopen, files intact, and
 * cryptsetup decrypting the ciphertext to the same file system.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { FileDevice } from '../../src/blockdev/file.js';
import { cryptmap, exec, ok, useDaemon } from './harness.js';
import { readLuks2 } from '../../src/luks/index.js';
import { FAST_LUKS2_FORMAT, FAST_PBKDF } from '../helpers/luks.js';

const fx = useDaemon('cm-cli-');
const cm = (...args: string[]) => cryptmap(args);
const MiB = 1 << 20;

test('luksFormat, open, status, data over NBD, close; exit codes as cryptsetup', async () => {
  const img = join(fx.dir, 'a.img');
  const key = join(fx.dir, 'a.key');
  writeFileSync(key, 'correct horse battery staple', { mode: 0o600 });
  writeFileSync(img, Buffer.alloc(0));
  await ok('truncate', ['-s', '40M', img]);
  let r = await cm(...FAST_LUKS2_FORMAT, '--key-file', key, img);
  assert.equal(r.code, 0, r.stderr);

  r = await cm('open', '--runtime-dir', fx.run, '--key-file', key, img, 'avol');
  assert.equal(r.code, 0, r.stderr);
  r = await cm('status', '--runtime-dir', fx.run, 'avol');
  assert.equal(r.code, 0);
  assert.match(r.stdout, /^\/dev\/mapper\/avol is active\./);
  assert.match(r.stdout, /type: {4}LUKS2/);
  assert.match(r.stdout, /cipher: {2}aes-xts-plain64/);
  assert.match(r.stdout, /keysize: 512 bits/);
  assert.match(r.stdout, /size: {4}49152 sectors/);
  const uri = /nbd: +(\S+)/.exec(r.stdout)?.[1] ?? '';
  assert.match(uri, /^nbd\+unix:\/\/\/avol\?socket=/);

  const data = randomBytes(2 * MiB);
  const src = join(fx.dir, 'src.bin');
  const dst = join(fx.dir, 'dst.bin');
  writeFileSync(src, data);
  await ok('qemu-io', ['-f', 'raw', uri, '-c', 'write -P 0x7e 0 1M']);
  await ok('nbdcopy', [uri, dst]);
  const whole = readFileSync(dst);
  assert.equal(whole.length, 49152 * 512);
  assert.ok(whole.subarray(0, MiB).every((b) => b === 0x7e));

  // Same name again: busy/exists (5). Wrong passphrase: 2 with cryptsetup's message.
  r = await cm('open', '--runtime-dir', fx.run, '--key-file', key, img, 'avol');
  assert.equal(r.code, 5, r.stderr);
  const bad = join(fx.dir, 'bad.key');
  writeFileSync(bad, 'wrong', { mode: 0o600 });
  r = await cm('open', '--runtime-dir', fx.run, '--key-file', bad, img, 'bvol');
  assert.equal(r.code, 2);
  assert.match(r.stderr, /No key available with this passphrase\./);

  r = await cm('close', '--runtime-dir', fx.run, 'avol');
  assert.equal(r.code, 0, r.stderr);
  r = await cm('status', '--runtime-dir', fx.run, 'avol');
  assert.equal(r.code, 4);
  assert.match(r.stdout, /is inactive/);
  r = await cm('close', '--runtime-dir', fx.run, 'avol');
  assert.equal(r.code, 4);

  // Reopen: the data written through NBD is still there.
  r = await cm('open', '--runtime-dir', fx.run, '--key-file', key, img, 'avol');
  assert.equal(r.code, 0, r.stderr);
  await ok('qemu-io', ['-f', 'raw', uri, '-c', 'read -P 0x7e 0 1M']);
  await cm('close', '--runtime-dir', fx.run, 'avol');
});

/** Both LUKS2 header copies of `img` as the loader sees them. */
async function headerState(img: string): Promise<{ needsRepair: boolean; stale: string | null }> {
  const dev = await FileDevice.open(img, { readOnly: true });
  try {
    const r = await readLuks2(dev);
    return { needsRepair: r.needsRepair, stale: r.stale };
  } finally {
    await dev.close();
  }
}

test('open through the daemon rewrites a damaged secondary LUKS2 header copy from the good one; the volume opens with its data', async () => {
  const img = join(fx.dir, 'rec.img');
  const key = join(fx.dir, 'rec.key');
  writeFileSync(key, 'recovery passphrase', { mode: 0o600 });
  writeFileSync(img, Buffer.alloc(0));
  await ok('truncate', ['-s', '20M', img]);
  let r = await cm(...FAST_LUKS2_FORMAT, '--key-file', key, img);
  assert.equal(r.code, 0, r.stderr);
  r = await cm('open', '--runtime-dir', fx.run, '--key-file', key, img, 'recvol');
  assert.equal(r.code, 0, r.stderr);
  const uri = /nbd: +(\S+)/.exec((await cm('status', '--runtime-dir', fx.run, 'recvol')).stdout)?.[1] ?? '';
  await ok('qemu-io', ['-f', 'raw', uri, '-c', 'write -P 0x5c 0 256k']);
  assert.equal((await cm('close', '--runtime-dir', fx.run, 'recvol')).code, 0);

  // Flip a byte of the secondary copy's checksum (binary header field csum at 448, the copy at hdr_size).
  const b = readFileSync(img);
  const hdrSize = Number(b.readBigUInt64BE(8));
  const primary = Buffer.from(b.subarray(0, hdrSize));
  b[hdrSize + 448]! ^= 0x5a;
  writeFileSync(img, b);
  assert.deepEqual(await headerState(img), { needsRepair: true, stale: 'secondary' });

  r = await cm('open', '--runtime-dir', fx.run, '--key-file', key, img, 'recvol');
  assert.equal(r.code, 0, r.stderr + fx.log);
  try {
    assert.deepEqual(
      await headerState(img),
      { needsRepair: false, stale: null },
      'secondary copy not repaired by open',
    );
    const after = readFileSync(img);
    assert.ok(after.subarray(0, hdrSize).equals(primary), 'the good primary copy changed');
    r = await cm('status', '--runtime-dir', fx.run, 'recvol');
    assert.match(r.stdout, /is active\./);
    await ok('qemu-io', ['-f', 'raw', uri, '-c', 'read -P 0x5c 0 256k']);
  } finally {
    await cm('close', '--runtime-dir', fx.run, 'recvol');
  }
});

test('plain mode: key file read directly; same ciphertext as the engine computes', async () => {
  const img = join(fx.dir, 'p.img');
  const key = join(fx.dir, 'p.key');
  writeFileSync(key, randomBytes(64), { mode: 0o600 });
  writeFileSync(img, Buffer.alloc(4 * MiB));
  let r = await cm(
    'open',
    '--runtime-dir',
    fx.run,
    '--type',
    'plain',
    '--cipher',
    'aes-xts-plain64',
    '--key-size',
    '512',
    '--key-file',
    key,
    '--offset',
    '8',
    img,
    'pvol',
  );
  assert.equal(r.code, 0, r.stderr);
  r = await cm('status', '--runtime-dir', fx.run, 'pvol');
  assert.match(r.stdout, /type: {4}PLAIN/);
  assert.match(r.stdout, /offset: {2}8 sectors/);
  const uri = /nbd: +(\S+)/.exec(r.stdout)?.[1] ?? '';
  await ok('qemu-io', ['-f', 'raw', uri, '-c', 'write -P 0x33 0 64k']);
  r = await cm('close', '--runtime-dir', fx.run, 'pvol');
  assert.equal(r.code, 0);
  const raw = readFileSync(img);
  assert.ok(
    raw.subarray(0, 4096).every((b) => b === 0),
    'nothing written before --offset',
  );
  assert.ok(!raw.subarray(4096, 4096 + 65536).every((b) => b === 0x33), 'data on disk is encrypted');
});

test('dm verbs through the daemon: create from stdin, table, info, ls, suspend/resume, remove; exported over NBD', async () => {
  const img = join(fx.dir, 'lin.img');
  writeFileSync(img, Buffer.alloc(MiB, 0xa5));
  let r = await cryptmap(['dm', 'create', 'lin', '--runtime-dir', fx.run], `0 1024 linear ${img} 1024\n`);
  assert.equal(r.code, 0, r.stderr);
  r = await cm('dm', 'table', '--runtime-dir', fx.run, 'lin');
  assert.equal(r.stdout, `0 1024 linear ${img} 1024\n`);
  r = await cm('dm', 'info', '--runtime-dir', fx.run, 'lin');
  assert.match(r.stdout, /State: +ACTIVE/);
  r = await cm('dm', 'ls', '--runtime-dir', fx.run);
  assert.match(r.stdout, /^lin\t\(253:\d+\)$/m);
  const sock = join(fx.run, 'nbd.sock');
  const info = await ok('nbdinfo', ['--size', `nbd+unix:///lin?socket=${sock}`]);
  assert.equal(info.trim(), String(1024 * 512));
  await ok('qemu-io', ['-f', 'raw', `nbd+unix:///lin?socket=${sock}`, '-c', 'read -P 0xa5 0 512k']);
  r = await cm('dm', 'suspend', '--runtime-dir', fx.run, 'lin');
  assert.equal(r.code, 0, r.stderr);
  r = await cm('dm', 'info', '--runtime-dir', fx.run, 'lin');
  assert.match(r.stdout, /State: +SUSPENDED/);
  r = await cm('dm', 'resume', '--runtime-dir', fx.run, 'lin');
  assert.equal(r.code, 0, r.stderr);
  r = await cm('dm', 'create', 'bad', '--runtime-dir', fx.run, '--table', '0 10 nosuchtarget');
  assert.notEqual(r.code, 0);
  assert.match(r.stderr, /nosuchtarget/);
  r = await cm('dm', 'reload', '--runtime-dir', fx.run, 'lin', '--table', `0 1024 zero`);
  assert.equal(r.code, 0, r.stderr);
  r = await cm('dm', 'info', '--runtime-dir', fx.run, 'lin');
  assert.match(r.stdout, /Tables present: +LIVE & INACTIVE/);
  r = await cm('dm', 'remove', '--runtime-dir', fx.run, 'lin');
  assert.equal(r.code, 0, r.stderr);
  r = await cm('dm', 'ls', '--runtime-dir', fx.run);
  assert.match(r.stdout, /No devices found/);
});

test('no daemon: a clear error saying how to start it', async () => {
  const r = await cm('open', '--runtime-dir', join(fx.dir, 'nowhere'), '--key-file', '/dev/null', '/dev/null', 'x');
  assert.equal(r.code, 1);
  assert.match(r.stderr, /daemon is not running \(start it with 'cryptmap daemon'\)/);
});

test('as root: open --attach, mkfs.ext4, mount, files survive close and reopen; cryptsetup decrypts the same file system', {
  skip: process.getuid?.() !== 0 && !process.env.CI ? 'needs root (CI runs as root)' : false,
}, async () => {
  const data = join(fx.dir, 'fs.img');
  const hdr = join(fx.dir, 'fs.hdr');
  const key = join(fx.dir, 'fs.key');
  const mnt = join(fx.dir, 'mnt');
  mkdirSync(mnt);
  writeFileSync(key, 'fs passphrase', { mode: 0o600 });
  writeFileSync(data, Buffer.alloc(0));
  await ok('truncate', ['-s', '64M', data]);
  let r = await cm('luksFormat', '-q', '--type', 'luks2', '--header', hdr, ...FAST_PBKDF, '--key-file', key, data);
  assert.equal(r.code, 0, r.stderr);
  r = await cm('open', '--runtime-dir', fx.run, '--header', hdr, '--key-file', key, '--attach', data, 'fsvol');
  assert.equal(r.code, 0, r.stderr + fx.log);
  const dev = r.stdout.trim();
  assert.match(dev, /^\/dev\/(loop|nbd)\d+$/);
  try {
    await ok('mkfs.ext4', ['-q', '-F', dev]);
    await ok('mount', [dev, mnt]);
    writeFileSync(join(mnt, 'hello.txt'), 'hello from cryptmap\n');
    await ok('umount', [mnt]);
  } finally {
    await exec('umount', [mnt]);
  }
  r = await cm('close', '--runtime-dir', fx.run, 'fsvol');
  assert.equal(r.code, 0, r.stderr);

  r = await cm('open', '--runtime-dir', fx.run, '--header', hdr, '--key-file', key, '--attach', data, 'fsvol');
  assert.equal(r.code, 0, r.stderr);
  const dev2 = r.stdout.trim();
  try {
    await ok('mount', [dev2, mnt]);
    assert.equal(readFileSync(join(mnt, 'hello.txt'), 'utf8'), 'hello from cryptmap\n');
    await ok('umount', [mnt]);
  } finally {
    await exec('umount', [mnt]);
  }
  r = await cm('close', '--runtime-dir', fx.run, 'fsvol');
  assert.equal(r.code, 0, r.stderr);

  // cryptsetup decrypts the ciphertext in place: the result is the same ext4 file system.
  await ok('cryptsetup', [
    'reencrypt',
    '--decrypt',
    '--force-offline-reencrypt',
    '--header',
    hdr,
    '--batch-mode',
    '--key-file',
    key,
    data,
  ]);
  const cat = await ok('debugfs', ['-R', 'cat /hello.txt', data]);
  assert.equal(cat, 'hello from cryptmap\n');
  assert.ok(existsSync(hdr));
});
