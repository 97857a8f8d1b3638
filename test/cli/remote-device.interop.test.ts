/**
 * An NBD URI wherever a device path goes (issue 15): a LUKS2 volume that cryptsetup made (with known
 * plaintext, by `reencrypt --encrypt`, which needs no device-mapper) on a file that nbdkit serves is
 * dumped and opened by cryptmap through its NBD client, and reads back the same bytes over
 * cryptmap's own export; a dm table names the URI as its `<dev>`.
 */
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { type RunningServer, useServers } from '../blockdev/nbd-servers.js';
import { cryptmap, exec, ok, useDaemon } from './harness.js';
import { FAST_LUKS2_FORMAT, FAST_PBKDF } from '../helpers/luks.js';

// The daemon (a child of this process) gives a lost NBD server 1.5 s to come back, not 30.
process.env.CRYPTMAP_NBD_RECONNECT_TIMEOUT_MS = '1500';
const fx = useDaemon('cm-remote-');
const MiB = 1 << 20;
const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');
const servers = useServers('cm-remote-nbdkit-');

/** nbdkit serving `img` on `sock`, used once it accepts connections (test/blockdev/nbd-servers.ts). */
async function nbdkitFile(img: string, sock: string): Promise<RunningServer> {
  return servers.start('nbdkit', (s) => ['-f', '-U', s, 'file', img], sock);
}

test('a cryptsetup LUKS2 volume on nbdkit opens through the NBD client and reads the same bytes', async () => {
  const plain = randomBytes(8 * MiB);
  const img = join(fx.dir, 'enc.img');
  const key = join(fx.dir, 'key');
  writeFileSync(key, 'remote passphrase', { mode: 0o600 });
  writeFileSync(img, Buffer.concat([plain, Buffer.alloc(16 * MiB)]));
  await ok('cryptsetup', [
    'reencrypt',
    '--encrypt',
    '--type',
    'luks2',
    '--reduce-device-size',
    '16M',
    '--batch-mode',
    '--key-file',
    key,
    ...FAST_PBKDF,
    img,
  ]);
  const uuid = (await ok('cryptsetup', ['luksUUID', img])).trim();
  const sock = join(fx.dir, 'nbdkit.sock');
  await nbdkitFile(img, sock);
  const remote = `nbd+unix:///?socket=${sock}`;

  let r = await cryptmap(['luksDump', remote]);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, new RegExp(`UUID:\\s+${uuid}`));
  r = await cryptmap(['isLuks', remote]);
  assert.equal(r.code, 0, r.stderr);

  r = await cryptmap(['open', '--runtime-dir', fx.run, '--key-file', key, remote, 'rvol']);
  assert.equal(r.code, 0, r.stderr);
  r = await cryptmap(['status', '--runtime-dir', fx.run, 'rvol']);
  assert.equal(r.code, 0, r.stderr);
  assert.ok(r.stdout.includes(`device:  ${remote}`), r.stdout);
  assert.match(r.stdout, /remote: {2}ready\n/);
  const uri = /nbd: +(\S+)/.exec(r.stdout)?.[1] ?? '';
  const out = join(fx.dir, 'out.bin');
  await ok('nbdcopy', [uri, out]);
  // --reduce-device-size 16M puts the data at 8 MiB: the volume is 16 MiB and starts with the plaintext.
  const first = readFileSync(out);
  assert.equal(first.length, 16 * MiB);
  assert.equal(sha(first.subarray(0, 8 * MiB)), sha(plain));

  // Writes go through the client to the file: read back after close and a fresh open.
  await ok('qemu-io', ['-f', 'raw', uri, '-c', 'write -P 0x6b 1M 1M']);
  r = await cryptmap(['close', '--runtime-dir', fx.run, 'rvol']);
  assert.equal(r.code, 0, r.stderr);
  assert.ok(!readFileSync(img).includes(Buffer.alloc(4096, 0x6b)), 'ciphertext, not plaintext, on the server');
  r = await cryptmap(['open', '--runtime-dir', fx.run, '--key-file', key, '--readonly', remote, 'rvol']);
  assert.equal(r.code, 0, r.stderr);
  await ok('nbdcopy', [uri, out]);
  const back = readFileSync(out);
  assert.ok(back.subarray(MiB, 2 * MiB).every((b) => b === 0x6b));
  assert.equal(sha(back.subarray(0, MiB)), sha(plain.subarray(0, MiB)));
  assert.equal(sha(back.subarray(2 * MiB, 8 * MiB)), sha(plain.subarray(2 * MiB)));
  r = await cryptmap(['close', '--runtime-dir', fx.run, 'rvol']);
  assert.equal(r.code, 0, r.stderr);

  // A wrong passphrase and a missing server give cryptsetup's exit codes (2, 4).
  const bad = join(fx.dir, 'bad');
  writeFileSync(bad, 'nope', { mode: 0o600 });
  r = await cryptmap(['open', '--runtime-dir', fx.run, '--key-file', bad, remote, 'rvol']);
  assert.equal(r.code, 2, r.stderr);
  r = await cryptmap([
    'open',
    '--runtime-dir',
    fx.run,
    '--key-file',
    key,
    `nbd+unix:///?socket=${join(fx.dir, 'none.sock')}`,
    'rvol',
  ]);
  assert.equal(r.code, 4, r.stderr);
  assert.match(r.stderr, /cannot open nbd\+unix/);
  r = await cryptmap(['luksDump', 'nbd+unix:///x']);
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /needs? \?socket=PATH/);
});

test('a dm table names an NBD URI as its <dev>', async () => {
  const img = join(fx.dir, 'lin.img');
  const data = randomBytes(4 * MiB);
  writeFileSync(img, data);
  const sock = join(fx.dir, 'lin.sock');
  await nbdkitFile(img, sock);
  const remote = `nbd+unix:///?socket=${sock}`;
  let r = await cryptmap(['dm', 'create', '--runtime-dir', fx.run, 'rlin', '--table', `0 4096 linear ${remote} 2048`]);
  assert.equal(r.code, 0, r.stderr);
  r = await cryptmap(['dm', 'table', '--runtime-dir', fx.run, 'rlin']);
  assert.equal(r.stdout.trim(), `0 4096 linear ${remote} 2048`);
  const out = join(fx.dir, 'lin.out');
  await ok('nbdcopy', [`nbd+unix:///rlin?socket=${join(fx.run, 'nbd.sock')}`, out]);
  assert.equal(sha(readFileSync(out)), sha(data.subarray(MiB, 3 * MiB)));
  r = await cryptmap(['dm', 'remove', '--runtime-dir', fx.run, 'rlin']);
  assert.equal(r.code, 0, r.stderr);
});

test('a storage server that stays gone: I/O fails with EIO and status says why', async () => {
  const img = join(fx.dir, 'gone.img');
  writeFileSync(img, Buffer.alloc(0));
  await ok('truncate', ['-s', '20M', img]);
  const key = join(fx.dir, 'gone.key');
  writeFileSync(key, 'k', { mode: 0o600 });
  await ok('cryptsetup', [...FAST_LUKS2_FORMAT, '--key-file', key, img]);
  const sock = join(fx.dir, 'gone.sock');
  const srv = await nbdkitFile(img, sock);
  const remote = `nbd+unix:///?socket=${sock}`;
  let r = await cryptmap(['open', '--runtime-dir', fx.run, '--key-file', key, remote, 'gvol']);
  assert.equal(r.code, 0, r.stderr);
  r = await cryptmap(['status', '--runtime-dir', fx.run, 'gvol']);
  const uri = /nbd: +(\S+)/.exec(r.stdout)?.[1] ?? '';
  await srv.kill();
  const q = await exec('qemu-io', ['-f', 'raw', uri, '-c', 'read 0 64k']);
  assert.match(q.stdout + q.stderr, /Input\/output error/);
  r = await cryptmap(['status', '--runtime-dir', fx.run, 'gvol']);
  assert.match(r.stdout, /remote: {2}failed \(the server did not come back within 1500 ms/);
  r = await cryptmap(['close', '--runtime-dir', fx.run, 'gvol']);
  assert.equal(r.code, 0, r.stderr);
});

test('a detached header may live on either side of the NBD connection', async () => {
  const data = join(fx.dir, 'det-data.img');
  const hdr = join(fx.dir, 'det-hdr.img');
  const key = join(fx.dir, 'det.key');
  writeFileSync(key, 'detached', { mode: 0o600 });
  writeFileSync(data, Buffer.alloc(8 * MiB));
  writeFileSync(hdr, Buffer.alloc(16 * MiB));
  await ok('cryptsetup', [...FAST_LUKS2_FORMAT, '--key-file', key, '--header', hdr, data]);
  const dataSock = join(fx.dir, 'det-data.sock');
  const hdrSock = join(fx.dir, 'det-hdr.sock');
  await nbdkitFile(data, dataSock);
  await nbdkitFile(hdr, hdrSock);
  const dataUri = `nbd+unix:///?socket=${dataSock}`;
  const hdrUri = `nbd+unix:///?socket=${hdrSock}`;
  // Header local, data remote: write a pattern.
  let r = await cryptmap(['open', '--runtime-dir', fx.run, '--key-file', key, '--header', hdr, dataUri, 'dvol']);
  assert.equal(r.code, 0, r.stderr);
  r = await cryptmap(['status', '--runtime-dir', fx.run, 'dvol']);
  const uri = /nbd: +(\S+)/.exec(r.stdout)?.[1] ?? '';
  await ok('qemu-io', ['-f', 'raw', uri, '-c', 'write -P 0x5c 0 1M']);
  r = await cryptmap(['close', '--runtime-dir', fx.run, 'dvol']);
  assert.equal(r.code, 0, r.stderr);
  // Header remote, data local: the same plaintext.
  r = await cryptmap(['open', '--runtime-dir', fx.run, '--key-file', key, '--header', hdrUri, data, 'dvol']);
  assert.equal(r.code, 0, r.stderr);
  r = await cryptmap(['status', '--runtime-dir', fx.run, 'dvol']);
  assert.ok(r.stdout.includes(`header:  ${hdrUri}`), r.stdout);
  await ok('qemu-io', ['-f', 'raw', /nbd: +(\S+)/.exec(r.stdout)![1]!, '-c', 'read -P 0x5c 0 1M']);
  r = await cryptmap(['close', '--runtime-dir', fx.run, 'dvol']);
  assert.equal(r.code, 0, r.stderr);
});
