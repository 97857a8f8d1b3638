// The fault wrapper (src/blockdev/fault.ts): each fault kind does what it says, and LUKS header
// updates survive a torn or short write at every write position (extends test/luks/fault.test.ts,
// which sweeps clean crashes between writes).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { FaultDevice, type FaultPlan, isInjectedFault } from '../../src/blockdev/fault.js';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import type { BlockDevice } from '../../src/blockdev/types.js';
import { Luks1Volume, Luks2Volume, type LuksVolume, openLuks } from '../../src/luks/index.js';
import { type ErrorCode, isCryptmapError } from '../../src/util/errors.js';
import { recordFaults } from '../fuzz/harness.js';

const FAST = { type: 'pbkdf2', hash: 'sha256', iterations: 1000 } as const;
const P = (s: string) => Buffer.from(s);
const SIZE = 4 << 20;

async function rejectsWith(p: Promise<unknown>, code: ErrorCode, errno: string): Promise<void> {
  await assert.rejects(p, (e: unknown) => isCryptmapError(e, code) && (e as { errno: string }).errno === errno);
}

test('fail, short, tear and crash at chosen write numbers', async () => {
  const mem = new MemoryDevice({ sizeBytes: 1 << 20 });
  const fd = new FaultDevice(mem, { writes: { 2: 'fail', 3: 'short', 5: 'tear' } });
  const data = Buffer.alloc(8 * 512, 0xaa);
  await fd.write(0, data); // 1
  await rejectsWith(fd.write(8192, data), 'EFAULT_EIO', 'EIO'); // 2: nothing written
  const probe = Buffer.alloc(data.length);
  await mem.read(8192, probe);
  assert.ok(probe.every((b) => b === 0));
  await rejectsWith(fd.write(16384, data), 'EFAULT_EIO', 'EIO'); // 3: a strict prefix
  await mem.read(16384, probe);
  const written = probe.indexOf(0);
  assert.ok(written > 0 && written < data.length && written % 512 === 0, `short write kept ${written} bytes`);
  await fd.write(32768, data); // 4
  await rejectsWith(fd.write(65536, data), 'EFAULT_CRASH', 'EIO'); // 5: torn, then dead
  assert.ok(fd.crashed);
  await rejectsWith(fd.write(0, data), 'EFAULT_CRASH', 'EIO');
  await rejectsWith(fd.flush(), 'EFAULT_CRASH', 'EIO');
  assert.deepEqual(fd.stats.injected, { fail: 1, short: 1, tear: 1, crash: 2 });
});

test('failed flushes are reported, bad ranges fail reads and writes, rate faults are seeded', async () => {
  const fd = new FaultDevice(new MemoryDevice({ sizeBytes: 1 << 20 }), {
    failFlushes: [2],
    badRanges: [{ offsetBytes: 4096, lengthBytes: 512, ops: ['read'] }],
  });
  await fd.flush();
  await rejectsWith(fd.flush(), 'EFAULT_EIO', 'EIO');
  await fd.flush();
  await rejectsWith(fd.read(0, Buffer.alloc(8192)), 'EFAULT_EIO', 'EIO');
  await fd.read(0, Buffer.alloc(4096));
  await fd.write(4096, Buffer.alloc(512)); // reads only

  const run = async (seed: number) => {
    const d = new FaultDevice(new MemoryDevice({ sizeBytes: 1 << 20 }), { rate: { probability: 0.3, seed } });
    const out: boolean[] = [];
    for (let i = 0; i < 64; i++)
      out.push(
        await d.write(i * 512, Buffer.alloc(512)).then(
          () => true,
          () => false,
        ),
      );
    return out;
  };
  const a = await run(7);
  assert.deepEqual(a, await run(7));
  const fails = a.filter((x) => !x).length;
  assert.ok(fails > 5 && fails < 40, `${fails} of 64 failed at rate 0.3`);
});

test('a full thin device fails new writes with ENOSPC and keeps what it holds', async () => {
  const mem = new MemoryDevice({ sizeBytes: 1 << 20 });
  const fd = new FaultDevice(mem, { capacityBytes: 16384 });
  await fd.write(0, Buffer.alloc(8192, 1));
  await fd.write(65536, Buffer.alloc(8192, 2));
  await rejectsWith(fd.write(131072, Buffer.alloc(512, 3)), 'EFAULT_ENOSPC', 'ENOSPC');
  await fd.write(0, Buffer.alloc(8192, 4)); // rewrites fit
  const b = Buffer.alloc(8192);
  await fd.read(65536, b);
  assert.ok(b.every((x) => x === 2));
  await fd.read(0, b);
  assert.ok(b.every((x) => x === 4));
});

// ---- LUKS header updates under torn and short writes ----

async function opens(dev: BlockDevice, pass: string): Promise<boolean> {
  try {
    const v = await openLuks(dev);
    (await v.unlock(P(pass))).volumeKey.dispose();
    return true;
  } catch (e) {
    // A damaged image must be refused with a CryptmapError, never crash the loader.
    assert.ok(isCryptmapError(e), `loader threw a non-CryptmapError: ${String(e)}`);
    return false;
  }
}

async function clone(src: MemoryDevice): Promise<MemoryDevice> {
  const d = new MemoryDevice({ sizeBytes: src.sizeBytes });
  const b = Buffer.alloc(src.sizeBytes);
  await src.read(0, b);
  await d.write(0, b);
  return d;
}

type Op = { name: string; run(v: LuksVolume): Promise<unknown>; old: string[]; neu: string[] };

/** For each write number n: fault write n with `kind`, then check old or new secrets open. */
async function sweep(base: MemoryDevice, op: Op, kind: 'tear' | 'short', seed: number): Promise<number> {
  for (let n = 1; ; n++) {
    const img = await clone(base);
    const plan: FaultPlan = { writes: { [n]: kind }, rate: { probability: 0, seed: seed + n } };
    // After a short write the process carries on in the real world only if it handles the error:
    // treat it as the last thing that happened (crash right after).
    if (kind === 'short') plan.crashAfterWrites = n;
    const fd = new FaultDevice(img, plan);
    let faulted = false;
    try {
      await op.run(await openLuks(fd));
    } catch (e) {
      if (!isInjectedFault(e)) throw e;
      faulted = true;
    }
    const oldOk = (await Promise.all(op.old.map((p) => opens(img, p)))).every(Boolean);
    const newOk = (await Promise.all(op.neu.map((p) => opens(img, p)))).every(Boolean);
    assert.ok(oldOk || newOk, `${op.name}: ${kind} at write ${n}: neither the old nor the new secrets open`);
    if (faulted) recordFaults('luks-header', 1, 1);
    if (!faulted) {
      assert.ok(newOk, `${op.name}: completed but the new secrets do not open`);
      return n - 1;
    }
  }
}

const luks2Ops: Op[] = [
  {
    name: 'addKey',
    run: (x) => x.addKey({ passphrase: P('one') }, P('three'), { kdf: FAST }),
    old: ['one'],
    neu: ['one', 'three'],
  },
  { name: 'changeKey', run: (x) => x.changeKey(P('one'), P('uno'), { kdf: FAST }), old: ['one'], neu: ['uno'] },
  { name: 'removeKey', run: (x) => x.removeKey(P('two')), old: ['one'], neu: ['one'] },
  { name: 'label', run: (x) => (x as Luks2Volume).setLabel('L', 'S'), old: ['one'], neu: ['one'] },
];

test('LUKS2 header updates survive a torn or short write at every write', async () => {
  const base = new MemoryDevice({ sizeBytes: SIZE });
  const v = await Luks2Volume.format(base, P('one'), {
    keyslot: { kdf: FAST },
    offsetBytes: 2 << 20,
    keyslotsBytes: (2 << 20) - 2 * 16384,
  });
  await v.addKey({ passphrase: P('one') }, P('two'), { kdf: FAST });
  for (const [i, op] of luks2Ops.entries()) {
    assert.ok((await sweep(base, op, 'tear', 100 * i)) > 0);
    assert.ok((await sweep(base, op, 'short', 100 * i + 50)) > 0);
  }
});

test('LUKS1 header updates survive a torn write at every write', async () => {
  const base = new MemoryDevice({ sizeBytes: SIZE });
  const v = await Luks1Volume.format(base, P('one'), { keyslot: { kdf: FAST }, keyBytes: 32 });
  await v.addKey({ passphrase: P('one') }, P('two'), { kdf: FAST });
  for (const [i, op] of luks2Ops.slice(0, 3).entries()) assert.ok((await sweep(base, op, 'tear', 7 + i)) > 0);
});

test('format onto a full disk reports ENOSPC and leaves nothing that opens with another secret', async () => {
  for (const capacityBytes of [0, 4096, 65536, 1 << 20]) {
    const img = new MemoryDevice({ sizeBytes: SIZE });
    const fd = new FaultDevice(img, { capacityBytes });
    await assert.rejects(
      Luks2Volume.format(fd, P('new'), {
        keyslot: { kdf: FAST },
        offsetBytes: 2 << 20,
        keyslotsBytes: (2 << 20) - 2 * 16384,
      }),
      (e: unknown) => isCryptmapError(e) && (e as { errno: string }).errno === 'ENOSPC',
    );
    assert.equal(await opens(img, 'other'), false);
  }
});
