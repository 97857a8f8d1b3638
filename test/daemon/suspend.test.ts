/**
 * DaemonCore.suspendVolume / resumeVolume (luksSuspend / luksResume, cryptsetup 2.6 lib/setup.c
 * crypt_suspend and crypt_resume_by_*): I/O waits while suspended, the volume key leaves the
 * keyring and the crypt target, resume with the right key lets the waiting I/O finish with the
 * right bytes; cryptsetup's messages and exit codes; close and shutdown of a suspended volume.
 */
import assert from 'node:assert/strict';
import { rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { keyDescription } from '../../src/activate/mapping.js';
import type { BlockDevice } from '../../src/blockdev/types.js';
import { Secret } from '../../src/util/secret.js';
import { pattern } from '../dm/helpers.js';
import { code, coreWithLuks2, MiB, openLuks, plainMapping } from './fixtures.js';

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

const setup = () => coreWithLuks2('cm-suspend-');

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
    const plain = plainMapping(dir, { name: 'p', device: join(dir, 'plain.img') });
    await core.openVolume(plain, k);
    await assert.rejects(core.suspendVolume('p'), code(1, /^This operation is supported only for LUKS device\.$/));
    await assert.rejects(
      core.resumeVolume('p', k),
      code(1, /^p is not active LUKS device name or header is missing\.$/),
    );
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
