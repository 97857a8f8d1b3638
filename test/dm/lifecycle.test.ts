// Mapped-device lifecycle: suspend drains and queues, reload/resume swaps tables without losing or
// reordering I/O, removal of devices in use, rename, loops, messages, and the rule that the
// registry is unchanged after any failed operation.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import { DeviceRegistry } from '../../src/dm/registry.js';
import { BUILTIN_TARGETS } from '../../src/dm/targets/index.js';
import { memRegistry, pattern, prng, settle, shareOf, traceControl, traceTarget, xtsKey } from './helpers.js';

const MiB = 1 << 20;

function traced() {
  const ctl = traceControl();
  const mr = memRegistry({ a: MiB, b: MiB }, { targets: { ...BUILTIN_TARGETS, trace: traceTarget(ctl) } });
  return { ctl, ...mr };
}

test('suspend waits for in-flight I/O, queues new I/O, resume swaps the table and replays in order', async () => {
  const { ctl, registry, mems } = traced();
  await registry.create('v', { table: '0 2048 trace /mem/a 0 old' });
  const dev = registry.open('v');
  ctl.hold = true;
  const inflight = [1, 2, 3].map((i) => dev.write((16 + i) * 4096, Buffer.alloc(4096, i)));
  await settle();
  assert.equal(ctl.waiting(), 3);
  let suspended = false;
  const susp = registry.suspend('v').then(() => {
    suspended = true;
  });
  await settle();
  assert.equal(suspended, false, 'suspend must wait for in-flight I/O');
  assert.equal(registry.get('v').suspended, true);
  ctl.hold = false;
  ctl.release();
  await Promise.all(inflight);
  await susp;
  assert.ok(ctl.log.includes('old:flush'), 'suspend flushes the live table');

  // I/O issued while suspended waits; a new table is loaded meanwhile.
  let done = 0;
  const queued: Promise<void>[] = [];
  for (let i = 10; i < 20; i++) queued.push(dev.write(0, Buffer.alloc(512, i)).then(() => void done++));
  for (let i = 20; i < 30; i++) queued.push(dev.write(i * 512, Buffer.alloc(512, i)).then(() => void done++));
  const r = Buffer.alloc(512);
  queued.push(dev.read(25 * 512, r).then(() => void done++));
  await settle();
  assert.equal(done, 0, 'no I/O completes while suspended');
  await registry.load('v', '0 2048 trace /mem/a 0 new');
  assert.equal(registry.get('v').hasInactiveTable, true);
  await settle();
  assert.equal(done, 0);
  ctl.log.length = 0;
  await registry.resume('v');
  await Promise.all(queued);
  assert.equal(done, 21);
  // The new table saw the queued requests in arrival order; the old table was disposed.
  const expected = [
    'old:dispose',
    ...Array.from({ length: 10 }, (_, k) => `new:write:0:${10 + k}`),
    ...Array.from({ length: 10 }, (_, k) => `new:write:${(20 + k) * 512}:${20 + k}`),
    `new:read:${25 * 512}`,
  ];
  assert.deepEqual(ctl.log, expected);
  const a = mems.get('a')!;
  const check = Buffer.alloc(512);
  await a.read(0, check);
  assert.ok(check.equals(Buffer.alloc(512, 19)), 'the last queued write wins');
  for (let i = 20; i < 30; i++) {
    await a.read(i * 512, check);
    assert.ok(check.equals(Buffer.alloc(512, i)), `queued write ${i} landed`);
  }
  assert.ok(r.equals(Buffer.alloc(512, 25)), 'queued read saw the writes queued before it');
  for (const i of [1, 2, 3]) {
    const b = Buffer.alloc(4096);
    await a.read((16 + i) * 4096, b);
    assert.ok(b.equals(Buffer.alloc(4096, i)), `in-flight write ${i} landed`);
  }
  await dev.close();
  await registry.closeAll();
});

test('suspend --noflush skips the flush; suspend and resume are idempotent; resume without a table change', async () => {
  const { ctl, registry } = traced();
  await registry.create('v', { table: '0 8 trace /mem/a 0 t' });
  await registry.suspend('v', { noflush: true });
  await registry.suspend('v');
  assert.deepEqual(ctl.log, []);
  await registry.resume('v');
  await registry.resume('v');
  assert.equal(registry.get('v').suspended, false);
  await registry.closeAll();
});

test('resume with a loaded table suspends (and flushes) first', async () => {
  const { ctl, registry } = traced();
  await registry.create('v', { table: '0 8 trace /mem/a 0 one' });
  await registry.load('v', '0 16 trace /mem/a 0 two');
  assert.equal(registry.get('v').sizeBytes, 8 * 512);
  await registry.resume('v');
  assert.deepEqual(ctl.log, ['one:flush', 'one:dispose']);
  assert.equal(registry.get('v').sizeBytes, 16 * 512);
  await registry.clear('v');
  await registry.load('v', '0 8 zero');
  await registry.clear('v');
  assert.equal(registry.get('v').hasInactiveTable, false);
  await registry.closeAll();
});

test('a failed load leaves the previous inactive table, a failed create leaves nothing', async () => {
  const { registry } = memRegistry({ a: MiB });
  await registry.create('v', { table: '0 8 zero', uuid: 'U-1' });
  await registry.load('v', '0 16 linear /mem/a 0');
  await assert.rejects(registry.load('v', '0 16 linear /mem/missing 0'), /cannot open/);
  await assert.rejects(registry.load('v', '0 16 bogus'), /unknown target type/);
  await registry.resume('v');
  assert.deepEqual(registry.get('v').liveTable!.format('table', false), ['0 16 linear /mem/a 0']);
  await assert.rejects(registry.create('v', { table: '0 8 zero' }), {
    code: 'EEXIST',
    message: 'device v already exists',
  });
  await assert.rejects(registry.create('w', { table: '0 8 zero', uuid: 'U-1' }), {
    code: 'EEXIST',
    message: 'a device with uuid U-1 already exists',
  });
  await assert.rejects(registry.create('w', { uuid: 'a b' }), { code: 'EUUID', message: /invalid uuid 'a b'/ });
  await assert.rejects(registry.create('w', { uuid: 'x'.repeat(129) }), { code: 'EUUID' });
  for (const bad of ['', 'a/b', '.', '..', 'a b', 'x'.repeat(128)]) {
    await assert.rejects(registry.create(bad), { code: 'ENAME', message: /invalid device name/ });
  }
  await assert.rejects(registry.create('w', { table: '0 8 linear /mem/missing 0' }), /cannot open/);
  assert.deepEqual(
    registry.list().map((d) => [d.name, d.minor]),
    [['v', 0]],
  );
  // The failed creates consumed no minor number.
  assert.equal((await registry.create('w')).minor, 1);
  assert.equal(registry.findByUuid('U-1')?.name, 'v');
  await registry.closeAll();
});

test('remove is refused while open unless forced; stacked devices count as openers', async () => {
  const { registry } = memRegistry({ a: MiB });
  await registry.create('low', { table: '0 2048 linear /mem/a 0' });
  await registry.create('top', { table: '0 1024 linear low 1024' });
  assert.equal(registry.get('low').openCount, 1);
  await assert.rejects(registry.remove('low'), {
    code: 'EBUSY',
    exitCode: 5,
    message: 'device low is in use (open count 1); use --force to remove it anyway',
  });
  const h = registry.open('top');
  await assert.rejects(registry.remove('top'), { code: 'EBUSY' });
  await h.write(0, Buffer.alloc(512, 1));
  await registry.remove('top', { force: true });
  await assert.rejects(h.read(0, Buffer.alloc(512)), { code: 'ENOTABLE', errno: 'EIO' });
  assert.throws(() => registry.get('top').open(), { code: 'ENODEV', message: 'device top does not exist' });
  assert.equal(registry.get('low').openCount, 0, 'removing top released low');
  await h.close();
  await h.close();
  await registry.remove('low');
  assert.deepEqual(registry.list(), []);
  await assert.rejects(registry.remove('low'), { code: 'ENODEV', exitCode: 4 });
  await assert.rejects(registry.suspend('nope'), { code: 'ENODEV' });
});

test('forced remove of a device in use by another: the upper one then gets I/O errors', async () => {
  const { registry } = memRegistry({ a: MiB });
  const low = await registry.create('low', { table: '0 2048 linear /mem/a 0' });
  await registry.create('top', { table: '0 2048 linear low 0' });
  await registry.remove('low', { force: true });
  assert.throws(() => low.open(), { code: 'ENODEV', message: 'device low has been removed' });
  await assert.rejects(registry.open('top').read(0, Buffer.alloc(512)), {
    code: 'ENOTABLE',
    message: 'device low has no live table (read)',
  });
  await registry.closeAll();
});

test('rename keeps the device, frees the old name, refuses a taken name', async () => {
  const { registry } = memRegistry({ a: MiB });
  await registry.create('one', { table: '0 8 zero' });
  await registry.create('two', { table: '0 8 zero' });
  await registry.rename('one', 'uno');
  assert.equal(registry.find('one'), undefined);
  assert.equal(registry.get('uno').minor, 0);
  await assert.rejects(registry.rename('uno', 'two'), {
    code: 'EEXIST',
    message: 'cannot rename uno to two: a device with that name exists',
  });
  await assert.rejects(registry.rename('uno', 'a/b'), { code: 'ENAME' });
  await registry.rename('uno', 'uno');
  await assert.rejects(registry.create('x', { table: '0 8 linear one 0' }), /cannot open/);
  await registry.create('x', { table: '0 8 linear uno 0' });
  await registry.closeAll();
});

test('loops are refused: self, by /dev/mapper name, by 253:minor, and through other devices', async () => {
  const { registry } = memRegistry({ a: MiB });
  await assert.rejects(registry.create('x', { table: '0 8 linear x 0' }), {
    code: 'ELOOP',
    message: 'table line 1: linear <dev>: x cannot be mapped onto itself',
  });
  await registry.create('a', { table: '0 2048 linear /mem/a 0' });
  await registry.create('b', { table: '0 2048 linear a 0' });
  await registry.create('c', { table: '0 2048 striped 1 8 /dev/mapper/b 0' });
  await assert.rejects(registry.load('a', '0 8 linear /dev/mapper/a 0'), { code: 'ELOOP' });
  await assert.rejects(registry.load('a', '0 8 linear 253:0 0'), {
    code: 'ELOOP',
    message: /a cannot be mapped onto itself/,
  });
  await assert.rejects(registry.load('a', '0 8 zero\n8 8 linear c 0'), {
    code: 'ELOOP',
    message: 'table line 2: linear <dev>: mapping a onto c would make a loop (c already depends on a)',
  });
  // Through an inactive table too.
  await registry.create('d', { table: '0 8 zero' });
  await registry.load('d', '0 8 linear c 0');
  await assert.rejects(registry.load('a', '0 8 linear 253:3 0'), {
    code: 'ELOOP',
    message: /mapping a onto d would make a loop/,
  });
  await assert.rejects(registry.load('a', '0 8 linear 253:99 0'), {
    code: 'ENODEV',
    message: 'table line 1: linear <dev>: no mapped device has number 253:99',
  });
  await assert.rejects(registry.load('a', '0 8 linear /dev/mapper/zz 0'), {
    code: 'ENODEV',
    message: 'table line 1: linear <dev>: device zz does not exist',
  });
  await assert.rejects(registry.load('a', '0 8 linear 4095:1048575 0'), {
    code: 'ENODEV',
    message: 'table line 1: linear <dev>: no block device has number 4095:1048575',
  });
  assert.equal(registry.get('a').hasInactiveTable, false, 'failed loads left nothing behind');
  assert.deepEqual(registry.get('a').liveTable!.format('table', false), ['0 2048 linear /mem/a 0']);
  await registry.closeAll();
  assert.deepEqual(registry.list(), []);
});

test('I/O rules at the edge: no table, read-only, discard refused, write-zeroes emulated', async () => {
  const { registry, mems } = memRegistry({ a: MiB });
  const empty = await registry.create('empty');
  assert.equal(empty.sizeBytes, 0);
  await assert.rejects(registry.open('empty').read(0, Buffer.alloc(512)), {
    code: 'ENOTABLE',
    message: 'device empty has no live table (read)',
  });
  await registry.open('empty').flush();
  await registry.load('empty', '0 8 zero');
  await registry.resume('empty');
  assert.equal(empty.sizeBytes, 4096);

  await registry.create('ro', { table: '0 8 linear /mem/a 0', readOnly: true });
  const ro = registry.open('ro');
  assert.equal(ro.capabilities.write, false);
  await assert.rejects(ro.write(0, Buffer.alloc(512)), { code: 'EROFS', message: 'device ro is read-only (write)' });
  await assert.rejects(ro.discard(0, 512), { code: 'EROFS' });
  await assert.rejects(ro.writeZeroes(0, 512), { code: 'EROFS' });

  const key = xtsKey(2).toString('hex');
  await registry.create('c', { table: `0 1024 linear /mem/a 0\n1024 1024 crypt aes-xts-plain64 ${key} 0 /mem/a 1024` });
  const c = registry.open('c');
  assert.equal(c.capabilities.discard, false);
  assert.equal(c.capabilities.writeZeroes, false);
  await assert.rejects(c.discard(0, 512), {
    code: 'ENOTSUP',
    errno: 'ENOTSUP',
    message: 'device c does not support discard (crypt target at table line 2 refuses discards)',
  });
  // write-zeroes through crypt is emulated with encrypted zeros, so it reads back as zeros.
  await c.write(1000 * 512, pattern(100 * 512, 3));
  await c.writeZeroes(1000 * 512, 100 * 512, { fua: true });
  const back = Buffer.alloc(100 * 512);
  await c.read(1000 * 512, back);
  assert.ok(back.equals(Buffer.alloc(100 * 512)));
  const raw = Buffer.alloc(512);
  await mems.get('a')!.read(1030 * 512, raw);
  assert.ok(!raw.equals(Buffer.alloc(512)), 'the stored bytes are ciphertext of zeros, not zeros');

  await registry.create('big', { table: `0 8 zero\n8 8 crypt aes-xts-plain64 ${key} 0 /mem/a 0 1 sector_size:4096` });
  assert.equal(registry.open('big').limits.logicalBlockBytes, 4096);
  await assert.rejects(registry.open('big').read(512, Buffer.alloc(4096)), { code: 'EALIGN' });
  await registry.closeAll();
});

test('messages route to the target at the sector', async () => {
  const { registry } = memRegistry({ a: MiB });
  await assert.rejects(registry.message('nope', 0, ['x']), { code: 'ENODEV' });
  await registry.create('n');
  await assert.rejects(registry.message('n', 0, ['x']), {
    code: 'ENOTABLE',
    message: 'device n has no live table to send a message to',
  });
  await registry.create('z', { table: '0 8 zero' });
  await assert.rejects(registry.message('z', 0, ['hello']), {
    code: 'ENOMSG',
    message: 'the zero target does not accept messages',
  });
  await assert.rejects(registry.message('z', 8, ['hello']), {
    code: 'ERANGE',
    message: 'message sector 8 is outside device z (8 sectors)',
  });
  await registry.closeAll();
});

test('lifecycle operations on one device run one after another', async () => {
  const { ctl, registry } = traced();
  await registry.create('v', { table: '0 8 trace /mem/a 0 t' });
  const dev = registry.open('v');
  ctl.hold = true;
  const w = dev.write(0, Buffer.alloc(512, 1));
  await settle();
  const order: string[] = [];
  const s = registry.suspend('v').then(() => order.push('suspend'));
  const r = registry.resume('v').then(() => order.push('resume'));
  const l = registry.load('v', '0 8 zero').then(() => order.push('load'));
  await settle();
  assert.deepEqual(order, []);
  ctl.hold = false;
  ctl.release();
  await Promise.all([w, s, r, l]);
  assert.deepEqual(order, ['suspend', 'resume', 'load']);
  await dev.close();
  await registry.closeAll();
});

test('offsets and chunks must fit the logical block size of the device below', async () => {
  const { registry } = memRegistry({ a: MiB });
  const key = xtsKey(12).toString('hex');
  await registry.create('c4k', { table: `0 1024 crypt aes-xts-plain64 ${key} 0 /mem/a 0 1 sector_size:4096` });
  await assert.rejects(registry.create('x', { table: '0 8 linear c4k 1' }), {
    code: 'EALIGN',
    message: 'table line 1: linear <offset>: offset 1 is not aligned to the 4096-byte logical blocks of device c4k',
  });
  await assert.rejects(registry.create('x', { table: '0 16 striped 1 8 c4k 4' }), {
    code: 'EALIGN',
    message: /striped <offset #0>: offset 4 is not aligned/,
  });
  await assert.rejects(registry.create('x', { table: `0 8 crypt aes-xts-plain64 ${key} 0 c4k 2` }), {
    code: 'EALIGN',
    message: /crypt <offset>: offset 2 is not aligned/,
  });
  await registry.create('ok', { table: '0 16 linear c4k 8' });
  assert.equal(registry.open('ok').limits.logicalBlockBytes, 4096);
  await registry.closeAll();
});

test('block status passes through linear and zero targets and merges extents', async () => {
  const { registry } = memRegistry({ a: MiB });
  await registry.create('bs', { table: '0 256 linear /mem/a 0\n256 128 zero\n384 640 linear /mem/a 256' });
  const dev = registry.open('bs');
  assert.equal(dev.capabilities.blockStatus, true);
  await dev.write(64 << 10, Buffer.alloc(64 << 10, 1)); // memory chunk 1 (64 KiB chunks)
  assert.deepEqual(await dev.blockStatus!(0, 1024 * 512), [
    { lengthBytes: 64 << 10, hole: true, zero: true },
    { lengthBytes: 64 << 10, hole: false, zero: false },
    { lengthBytes: 1024 * 512 - (128 << 10), hole: true, zero: true },
  ]);
  assert.deepEqual(await dev.blockStatus!(512, 0), []);
  const key = xtsKey(13).toString('hex');
  await registry.create('enc', { table: `0 64 crypt aes-xts-plain64 ${key} 0 /mem/a 0` });
  const enc = registry.open('enc');
  assert.equal(enc.capabilities.blockStatus, false);
  await assert.rejects(enc.blockStatus!(0, 512), {
    code: 'ENOTSUP',
    message: 'device enc cannot report block status (a target in its table cannot)',
  });
  await registry.closeAll();
});

test('random I/O during repeated suspend/reload/resume cycles: nothing lost, every read sees its writer', async () => {
  // The memory device answers one event-loop turn later, so I/O is really in flight across
  // suspends; the writers yield between requests so table swaps interleave with them.
  const mem = new MemoryDevice({ sizeBytes: MiB });
  const slow = shareOf(mem);
  const later = () => new Promise<void>((r) => setImmediate(r));
  const registry = new DeviceRegistry({
    openFile: async () => ({
      ...slow,
      sizeBytes: mem.sizeBytes,
      capabilities: mem.capabilities,
      limits: mem.limits,
      read: async (o: number, b: Uint8Array) => {
        await later();
        await mem.read(o, b);
      },
      write: async (o: number, d: Uint8Array) => {
        await later();
        await mem.write(o, d);
      },
    }),
  });
  const mems = new Map([['a', mem]]);
  const identity = [
    '0 2048 linear /mem/a 0',
    '0 1024 linear /mem/a 0\n1024 1024 linear /mem/a 1024',
    '0 2048 striped 1 8 /mem/a 0',
  ];
  await registry.create('v', { table: identity[0]! });
  const dev = registry.open('v');
  const rnd = prng(77);
  const writers = 8;
  const regionS = 2048 / writers;
  const last: Buffer[] = [];
  let stop = false;
  const writer = async (w: number) => {
    const mine = Buffer.alloc(regionS * 512);
    for (let k = 0; k < 40; k++) {
      const s = rnd() % regionS;
      const n = 1 + (rnd() % Math.min(16, regionS - s));
      const data = pattern(n * 512, rnd());
      await dev.write((w * regionS + s) * 512, data);
      data.copy(mine, s * 512);
      const back = Buffer.alloc(n * 512);
      await dev.read((w * regionS + s) * 512, back);
      assert.ok(back.equals(data), `writer ${w} reads its write ${k}`);
      if (k % 4 === 0) await settle();
    }
    last[w] = mine;
  };
  let cycles = 0;
  const cycler = async () => {
    for (let c = 0; !stop; c++, cycles++) {
      await registry.suspend('v', { noflush: c % 2 === 1 });
      await registry.load('v', identity[c % identity.length]!);
      await settle();
      await registry.resume('v');
      await settle();
    }
  };
  const cyc = cycler();
  await Promise.all(Array.from({ length: writers }, (_, w) => writer(w)));
  stop = true;
  await cyc;
  assert.ok(cycles >= 3, `only ${cycles} table swaps happened during the I/O`);
  const all = Buffer.alloc(2048 * 512);
  await mems.get('a')!.read(0, all);
  for (let w = 0; w < writers; w++)
    assert.ok(all.subarray(w * regionS * 512, (w + 1) * regionS * 512).equals(last[w]!), `region of writer ${w}`);
  await dev.close();
  await registry.closeAll();
});

test('striped status marks a stripe that saw an I/O error', async () => {
  const { registry } = memRegistry({ a: MiB });
  await registry.create('bad', { table: '0 1024 error' });
  await registry.create('s', { table: '0 32 striped 2 8 /mem/a 0 bad 0' });
  assert.deepEqual(registry.get('s').liveTable!.format('status', false), ['0 32 striped 2 /mem/a bad  AA']);
  await assert.rejects(registry.open('s').read(0, Buffer.alloc(16 * 512)), {
    code: 'EIOERR',
    errno: 'EIO',
    message: 'I/O error: read hit the error target (table line 1)',
  });
  assert.deepEqual(registry.get('s').liveTable!.format('status', false), ['0 32 striped 2 /mem/a bad  AD']);
  await registry.closeAll();
});

test('a failing file opener is reported with the line, the argument and the path', async () => {
  const registry = new DeviceRegistry({
    openFile: async () => {
      throw new Error('boom');
    },
  });
  await assert.rejects(registry.create('x', { table: '0 8 linear /some/file 0' }), {
    code: 'EOPEN',
    exitCode: 4,
    message: 'table line 1: linear <dev>: cannot open /some/file: boom',
  });
  assert.deepEqual(registry.list(), []);
});
