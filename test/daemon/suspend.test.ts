/**
 * DaemonCore.suspendVolume / resumeVolume (luksSuspend / luksResume, cryptsetup 2.6 lib/setup.c
 * crypt_suspend and crypt_resume_by_*): I/O waits while suspended, the volume key leaves the
 * keyring and the crypt target, resume with the right key lets the waiting I/O finish with the
 * right bytes; cryptsetup's messages and exit codes; close and shutdown of a suspended volume.
 */
import assert from 'node:assert/strict';
import { chmodSync, mkdtempSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { type CryptMapping, keyDescription, prepareLuks } from '../../src/activate/mapping.js';
import { FileDevice } from '../../src/blockdev/file.js';
import type { BlockDevice } from '../../src/blockdev/types.js';
import { DaemonCore } from '../../src/daemon/core.js';
import { Luks2Volume } from '../../src/luks/index.js';
import type { CryptmapError } from '../../src/util/errors.js';
import { Secret } from '../../src/util/secret.js';

const MiB = 1 << 20;
const PASS = Buffer.from('suspend test passphrase');
const FAST = { type: 'pbkdf2' as const, hash: 'sha256', iterations: 1000 };

/** Deterministic pattern (xorshift32, fixed seed). */
function pattern(n: number, seed: number): Buffer {
  const b = Buffer.alloc(n);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    b[i] = x & 0xff;
  }
  return b;
}

/** Let every ready promise job and I/O callback run (a few loop turns; no timing assertion). */
async function turns(n = 20): Promise<void> {
  for (let i = 0; i < n; i++) await new Promise((r) => setTimeout(r, 5));
}

function track<T>(p: Promise<T>): { p: Promise<T>; settled: () => boolean } {
  let done = false;
  const q = p.finally(() => {
    done = true;
  });
  q.catch(() => undefined);
  return { p: q, settled: () => done };
}

async function setup(): Promise<{ dir: string; core: DaemonCore; img: string }> {
  const dir = mkdtempSync(join(tmpdir(), 'cm-suspend-'));
  chmodSync(dir, 0o700);
  const img = join(dir, 'luks.img');
  writeFileSync(img, Buffer.alloc(0));
  truncateSync(img, 6 * MiB);
  const fd = await FileDevice.open(img, { readOnly: false });
  try {
    await Luks2Volume.format(fd, PASS, { keyslot: { kdf: FAST }, offsetBytes: 2 * MiB, keyslotsBytes: 2 * MiB - 2 * 16384, digestIterations: 1000 });
  } finally {
    await fd.close();
  }
  return { dir, core: new DaemonCore({ nbdSocketPath: join(dir, 'nbd.sock'), attachDir: join(dir, 'attach') }), img };
}

/** Unlock and open `img` as `name`; returns a copy of the volume key (the caller disposes it). */
async function openLuks(core: DaemonCore, img: string, name: string): Promise<{ mapping: CryptMapping; key: Secret }> {
  const { mapping, volumeKey } = await prepareLuks({ name, device: img, passphrase: PASS });
  const key = Secret.copyOf(volumeKey.expose());
  try {
    await core.openVolume(mapping, volumeKey);
  } finally {
    volumeKey.dispose();
  }
  return { mapping, key };
}

const code = (exitCode: number, re: RegExp) => (e: CryptmapError) => e.exitCode === exitCode && re.test(e.message);

test('luksSuspend: I/O waits and the key is gone; a wrong key leaves it suspended; resume finishes the waiting I/O with the data intact', async () => {
  const { dir, core, img } = await setup();
  let h: BlockDevice | undefined;
  let key: Secret | undefined;
  try {
    ({ key } = await openLuks(core, img, 'v'));
    h = core.registry.open('v');
    const data = pattern(256 * 1024, 0x5eed);
    await h.write(0, data);
    await h.write(h.sizeBytes - 4096, data.subarray(0, 4096));
    await h.flush();

    const st = await core.suspendVolume('v');
    assert.equal(st.suspended, true);
    assert.equal(core.statusOf('v').suspended, true);
    assert.equal(core.keyring.has(keyDescription('v')), false, 'the volume key left the keyring');
    // The crypt target's key is wiped too: a plain dm resume is refused, the device stays suspended.
    await assert.rejects(core.dm().resume('v'), /key .* is not set|aborting resume/);
    assert.equal(core.statusOf('v').suspended, true);

    // Reads and writes started now wait.
    const buf = Buffer.alloc(data.length);
    const read = track(h.read(0, buf));
    const tail = Buffer.alloc(4096);
    const read2 = track(h.read(h.sizeBytes - 4096, tail));
    const write = track(h.write(MiB, data.subarray(0, 8192)));
    await turns();
    assert.equal(read.settled(), false, 'a read waits while suspended');
    assert.equal(read2.settled(), false);
    assert.equal(write.settled(), false, 'a write waits while suspended');

    // Already suspended: cryptsetup's message, exit 1.
    await assert.rejects(core.suspendVolume('v'), code(1, /^Volume v is already suspended\.$/));
    // A key of the right size that is not the volume's: refused, still suspended, nothing in the keyring.
    const wrong = new Secret(pattern(64, 7));
    await assert.rejects(core.resumeVolume('v', wrong), code(1, /does not match/));
    wrong.dispose();
    const short = new Secret(Buffer.alloc(32, 1));
    await assert.rejects(core.resumeVolume('v', short), /32 bytes/);
    short.dispose();
    await turns(4);
    assert.equal(core.statusOf('v').suspended, true);
    assert.equal(read.settled(), false);
    assert.equal(core.keyring.has(keyDescription('v')), false);

    const after = await core.resumeVolume('v', key);
    assert.equal(after.suspended, false);
    assert.equal(core.keyring.has(keyDescription('v')), true);
    await Promise.all([read.p, read2.p, write.p]);
    assert.ok(buf.equals(data), 'the waiting read returns the data written before suspend');
    assert.ok(tail.equals(data.subarray(0, 4096)));
    const back = Buffer.alloc(8192);
    await h.read(MiB, back);
    assert.ok(back.equals(data.subarray(0, 8192)), 'the waiting write landed after resume');

    // Not suspended any more: cryptsetup's message, exit 1.
    await assert.rejects(core.resumeVolume('v', key), code(1, /^Volume v is not suspended\.$/));

    // Suspend and resume again (the key check is per suspend).
    await core.suspendVolume('v');
    await core.resumeVolume('v', key);
    const again = Buffer.alloc(data.length);
    await h.read(0, again);
    assert.ok(again.equals(data));
  } finally {
    key?.dispose();
    await h?.close();
    await core.shutdown();
    rmSync(dir, { recursive: true, force: true });
  }
});

test('luksSuspend/luksResume refusals: unknown name (exit 4), plain volume (exit 1)', async () => {
  const { dir, core } = await setup();
  try {
    await assert.rejects(core.suspendVolume('nope'), code(4, /^Device nope is not active\.$/));
    const k = new Secret(Buffer.alloc(64, 3).fill(4, 32));
    await assert.rejects(core.resumeVolume('nope', k), code(4, /^Device nope is not active\.$/));
    writeFileSync(join(dir, 'plain.img'), Buffer.alloc(MiB));
    const plain: CryptMapping = {
      name: 'p',
      type: 'PLAIN',
      uuid: '',
      device: join(dir, 'plain.img'),
      cipher: 'aes-xts-plain64',
      keyBytes: 64,
      sectorBytes: 512,
      ivOffsetSectors: 0n,
      offsetSectors: 0,
      sizeSectors: 2048,
      readOnly: false,
      allowDiscards: false,
    };
    await core.openVolume(plain, k);
    await assert.rejects(core.suspendVolume('p'), code(1, /^This operation is supported only for LUKS device\.$/));
    await assert.rejects(core.resumeVolume('p', k), code(1, /^p is not active LUKS device name or header is missing\.$/));
    assert.equal(core.statusOf('p').suspended, false);
    assert.equal(core.keyring.has(keyDescription('p')), true);
    k.dispose();
  } finally {
    await core.shutdown();
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a suspended volume closes without resuming (waiting I/O fails), and the daemon shuts down with one suspended', async () => {
  const { dir, core, img } = await setup();
  let key: Secret | undefined;
  try {
    ({ key } = await openLuks(core, img, 'c'));
    await core.suspendVolume('c');
    await core.closeVolume('c');
    assert.equal(core.registry.find('c'), undefined);
    assert.deepEqual(core.nbd.exportNames(), []);
    assert.equal(core.keyring.has(keyDescription('c')), false);

    key.dispose();
    ({ key } = await openLuks(core, img, 'c'));
    const h = core.registry.open('c');
    await core.suspendVolume('c');
    const read = track(h.read(0, Buffer.alloc(4096)));
    await turns(4);
    assert.equal(read.settled(), false);
    // Held open (like an NBD client): close is refused without --force.
    await assert.rejects(core.closeVolume('c'), code(5, /in use/));
    await core.shutdown();
    await assert.rejects(read.p, /no live table|EIO/i);
    await h.close();
    assert.equal(core.registry.list().length, 0);
  } finally {
    key?.dispose();
    await core.shutdown();
    rmSync(dir, { recursive: true, force: true });
  }
});
