/**
 * Ceph RBD as the reference storage engine (issue 15 item 3): a real single-node Ceph
 * (scripts/ceph-mini.sh: ceph-mon + ceph-osd with bluestore, RBD images exported by qemu-nbd's rbd
 * driver) under cryptmap's NBD client.
 * - cryptmap formats and serves a LUKS2 volume on an RBD image; the ciphertext read straight from
 *   the RBD export decrypts, with the volume key cryptsetup dumps from it, to what cryptmap served.
 * - The OSD killed -9 and restarted mid-load, and qemu-nbd killed -9 and restarted under the
 *   client: no acknowledged write is lost (checked against a model after a fresh open).
 */
import assert from 'node:assert/strict';
import { createDecipheriv, createHash, randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { startWriteLoad } from './write-load.js';
import { NbdDevice } from '../../src/blockdev/nbd-client/device.js';
import { cryptmap, ok, useDaemon } from '../cli/harness.js';
import { useCeph } from './ceph.js';
import { FAST_LUKS2_FORMAT } from '../helpers/luks.js';

// The daemon (spawned by useDaemon's before hook) gives a restarted qemu-nbd 60 s to come back.
process.env.CRYPTMAP_NBD_RECONNECT_TIMEOUT_MS = '60000';
const ceph = useCeph('cm-rbd-');
const fx = useDaemon('cm-rbd-d-');
const MiB = 1 << 20;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');

function keyFile(name: string): string {
  const p = join(fx.dir, name);
  writeFileSync(p, `passphrase of ${name}`, { mode: 0o600 });
  return p;
}

async function formatAndOpen(uri: string, name: string, key: string): Promise<string> {
  const r = await cryptmap([...FAST_LUKS2_FORMAT, '--key-file', key, uri]);
  assert.equal(r.code, 0, r.stderr);
  return open(uri, name, key);
}

/** Open through the daemon; resolves the volume's own NBD URI. */
async function open(uri: string, name: string, key: string): Promise<string> {
  let r = await cryptmap(['open', '--runtime-dir', fx.run, '--key-file', key, uri, name]);
  assert.equal(r.code, 0, r.stderr);
  r = await cryptmap(['status', '--runtime-dir', fx.run, name]);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /remote: {2}ready\n/);
  return /nbd: +(\S+)/.exec(r.stdout)![1]!;
}

async function close(name: string): Promise<void> {
  const r = await cryptmap(['close', '--runtime-dir', fx.run, name]);
  assert.equal(r.code, 0, r.stderr);
}

/** aes-xts-plain64 of one LUKS2 data segment with node:crypto: IV = le64(512-byte sector), per sector. */
function xtsDecrypt(cipher: Buffer, keyHex: string, sectorBytes: number): Buffer {
  const key = Buffer.from(keyHex, 'hex');
  const algo = key.length === 64 ? 'aes-256-xts' : 'aes-128-xts';
  const out = Buffer.alloc(cipher.length);
  for (let off = 0; off < cipher.length; off += sectorBytes) {
    const iv = Buffer.alloc(16);
    iv.writeBigUInt64LE(BigInt(off / 512));
    const d = createDecipheriv(algo, key, iv).setAutoPadding(false);
    const p = Buffer.concat([d.update(cipher.subarray(off, off + sectorBytes)), d.final()]);
    p.copy(out, off);
  }
  return out;
}

test("LUKS2 on an RBD image served by cryptmap: the ciphertext on RBD decrypts with cryptsetup's volume key", async () => {
  const rbd = await ceph.c.exportImage('rbd/luks', '32M');
  const key = keyFile('luks.key');
  const vol = await formatAndOpen(rbd, 'rbdvol', key);
  const info = await ok('nbdinfo', ['--size', vol]);
  const size = Number(info.trim());
  assert.equal(size, 16 * MiB, 'a 32 MiB image less the 16 MiB LUKS2 header');
  const plain = randomBytes(size);
  const src = join(fx.dir, 'plain.bin');
  writeFileSync(src, plain);
  await ok('nbdcopy', [src, vol]);
  await close('rbdvol');

  // Straight from the RBD export, past cryptmap: the header and the ciphertext.
  const copy = join(fx.dir, 'rbd-copy.img');
  await ok('nbdcopy', [rbd, copy]);
  const dump = await ok('cryptsetup', ['luksDump', '--dump-volume-key', '--batch-mode', '--key-file', key, copy]);
  const mk = /MK dump:\s*((?:[0-9a-f]{2}\s*)+)/.exec(dump);
  assert.ok(mk, dump);
  const hdr = await ok('cryptsetup', ['luksDump', copy]);
  const seg =
    /Data segments:[\s\S]*?offset:\s*([0-9]+) \[bytes\][\s\S]*?cipher:\s*(\S+)[\s\S]*?sector:\s*([0-9]+) \[bytes\]/.exec(
      hdr,
    );
  assert.ok(seg, hdr);
  assert.equal(seg[2], 'aes-xts-plain64');
  const img = readFileSync(copy);
  const offset = Number(seg[1]);
  const cipher = img.subarray(offset, offset + size);
  assert.ok(!cipher.subarray(0, 4096).equals(plain.subarray(0, 4096)), 'ciphertext, not plaintext, on RBD');
  assert.equal(sha(xtsDecrypt(cipher, mk[1]!.replace(/\s+/g, ''), Number(seg[3]))), sha(plain));
});

/**
 * Random writes (8 workers, read-back checks, a flush now and then) through cryptmap's export of a
 * LUKS2 volume on `image`, while `crash` breaks the storage path twice; then a fresh open must read
 * exactly the model.
 */
async function loadThroughCrash(image: string, name: string, crash: () => Promise<void>): Promise<void> {
  const rbd = await ceph.c.exportImage(image, '48M');
  const key = keyFile(`${name}.key`);
  const vol = await formatAndOpen(rbd, name, key);
  const before = join(fx.dir, `${name}-before.bin`);
  await ok('nbdcopy', [vol, before]);
  const model = readFileSync(before); // a fresh volume reads as noise: that is the starting model
  const dev = await NbdDevice.open(vol, { reconnectTimeoutMs: 60_000 });
  const SIZE = dev.sizeBytes;
  assert.equal(SIZE, model.length);
  const load = startWriteLoad(dev, model, { readBackEvery: 5, flushEvery: 20 });
  for (let round = 0; round < 2; round++) {
    // Crash only once the load made progress since the last restart.
    assert.ok(await load.progress(30), `the load stalled at ${load.ops} operations: ${String(load.errors[0] ?? '')}`);
    await crash();
    await sleep(200);
    await ceph.c.up();
  }
  const resumed = await load.progress(30);
  await load.stop();
  assert.deepEqual(load.errors, []);
  assert.ok(resumed, `the load did not resume after the restart (${load.ops} operations)`);
  await dev.close(); // flushes
  await close(name);
  const again = await open(rbd, name, key);
  const after = join(fx.dir, `${name}-after.bin`);
  await ok('nbdcopy', [again, after]);
  assert.equal(sha(readFileSync(after)), sha(model), 'every acknowledged write is on RBD');
  await close(name);
}

test('the OSD killed -9 and restarted twice under load: no acknowledged write lost', async () => {
  await loadThroughCrash('rbd/osdkill', 'osdvol', () => ceph.c.kill('osd.0'));
});

test('qemu-nbd killed -9 and restarted twice under the client: it reconnects, no acknowledged write lost', async () => {
  await loadThroughCrash('rbd/nbdkill', 'nbdvol', () => ceph.c.kill('nbd.rbd.nbdkill'));
  const r = await cryptmap(['status', '--runtime-dir', fx.run, 'nbdvol']);
  assert.equal(r.code, 4, 'closed at the end');
});
