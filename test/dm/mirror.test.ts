// The mirror target (dm-raid1 with a core log): strict table parsing with stable error codes and
// the kernel's canonical table form; writes land on every leg; the resync copies leg 0 over the
// others without losing writes that race it; nosync; status lines; failing legs with and without
// handle_errors (fault target); dispose stops the resync; crypt stacked over a mirror.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import type { DeviceRegistry } from '../../src/dm/registry.js';
import { FAULT_TARGETS } from './fault-target.js';
import { memRegistry, pattern, prng, settle, traceControl, traceTarget, xtsKey } from './helpers.js';

const MiB = 1 << 20;

function faulty() {
  const ctl = traceControl();
  const mr = memRegistry({ a: MiB, b: MiB, c: MiB }, { targets: { ...FAULT_TARGETS, trace: traceTarget(ctl) } });
  return { ctl, ...mr };
}

/** A mirror `m` of 1024 two-sector regions over traced legs (la, lb), its resync seen running. */
async function resyncRunning() {
  const f = faulty();
  await f.registry.create('la', { table: '0 2048 trace /mem/a 0 A' });
  await f.registry.create('lb', { table: '0 2048 trace /mem/b 0 B' });
  await f.registry.create('m', { table: '0 2048 mirror core 1 2 2 la 0 lb 0' });
  for (let turn = 0; turn < 10_000 && f.ctl.log.length < 20; turn++) await settle();
  assert.ok(f.ctl.log.length >= 20, 'the resync is running');
  return f;
}

function status(registry: DeviceRegistry, name: string): string {
  return registry.get(name).liveTable!.format('status', false).join('\n');
}

function table(registry: DeviceRegistry, name: string): string {
  return registry.get(name).liveTable!.format('table', false).join('\n');
}

/** Poll the status line (bounded) until every region is in sync; returns that line. */
async function waitInSync(registry: DeviceRegistry, name: string): Promise<string> {
  for (let turn = 0; turn < 100_000; turn++) {
    const s = status(registry, name);
    const m = / ([0-9]+)\/([0-9]+) 1 /.exec(s);
    if (m && m[1] === m[2]) return s;
    await settle();
  }
  assert.fail(`mirror ${name} never got in sync: ${status(registry, name)}`);
}

async function raw(
  registry: { mems: Map<string, MemoryDevice> },
  mem: string,
  offsetBytes: number,
  length: number,
): Promise<Buffer> {
  const b = Buffer.alloc(length);
  await registry.mems.get(mem)!.read(offsetBytes, b);
  return b;
}

test('mirror tables parse and print back in the kernel canonical form (round trip)', async () => {
  const cases: [string, string][] = [
    ['0 2048 mirror core 1 1024 2 /mem/a 0 /mem/b 0', '0 2048 mirror core 1 1024 2 /mem/a 0 /mem/b 0'],
    [
      '0 1024 mirror core 2 16 nosync 3 /mem/a 0 /mem/b 8 /mem/c 16 1 handle_errors',
      '0 1024 mirror core 2 16 nosync 3 /mem/a 0 /mem/b 8 /mem/c 16 1 handle_errors',
    ],
    [
      '0 1000 mirror  core 2 64 sync 2 /mem/a 0 /mem/b 0 2 keep_log handle_errors',
      '0 1000 mirror core 2 64 sync 2 /mem/a 0 /mem/b 0 2 handle_errors keep_log',
    ],
    ['0 2048 mirror core 1 1024 2 /mem/a 0 /mem/b 0 0', '0 2048 mirror core 1 1024 2 /mem/a 0 /mem/b 0'],
    [
      '0 512 mirror core 1 2 2 /mem/a 0 /mem/b 0 1 handle_errors',
      '0 512 mirror core 1 2 2 /mem/a 0 /mem/b 0 1 handle_errors',
    ],
  ];
  for (const [text, canonical] of cases) {
    const { registry } = memRegistry({ a: MiB, b: MiB, c: MiB });
    await registry.create('one', { table: text });
    assert.equal(table(registry, 'one'), canonical, text);
    await registry.create('two', { table: canonical });
    assert.equal(table(registry, 'two'), canonical);
    await registry.closeAll();
  }
  // The region count rounds up: 1000 sectors in 64-sector regions are 16 regions, the last short.
  const { registry } = memRegistry({ a: MiB, b: MiB });
  await registry.create('m', { table: '0 1000 mirror core 2 64 nosync 2 /mem/a 0 /mem/b 0' });
  assert.equal(status(registry, 'm'), '0 1000 mirror 2 /mem/a /mem/b 16/16 1 AA 1 core');
  await registry.closeAll();
  // The resync copies the short last region and nothing past the target's end.
  const r2 = memRegistry({ a: MiB, b: MiB });
  await r2.mems.get('a')!.write(0, Buffer.alloc(MiB, 5));
  await r2.mems.get('b')!.write(0, Buffer.alloc(MiB, 6));
  await r2.registry.create('m', { table: '0 1000 mirror core 1 64 2 /mem/a 0 /mem/b 0' });
  assert.equal(await waitInSync(r2.registry, 'm'), '0 1000 mirror 2 /mem/a /mem/b 16/16 1 AA 1 core');
  assert.ok((await raw(r2, 'b', 0, 1000 * 512)).equals(Buffer.alloc(1000 * 512, 5)));
  assert.ok((await raw(r2, 'b', 1000 * 512, 48 * 512)).equals(Buffer.alloc(48 * 512, 6)), 'past the end untouched');
  await r2.registry.closeAll();
});

test('bad mirror tables are refused with the line, the argument and a stable code', async () => {
  const { registry, mems } = memRegistry({ a: MiB, b: MiB, c: MiB });
  mems.set('big', new MemoryDevice({ sizeBytes: MiB, logicalBlockBytes: 4096 }));
  const legs = '2 /mem/a 0 /mem/b 0';
  const cases: [string, string, RegExp][] = [
    ['0 64 mirror', 'ETABLE', /^table line 1: mirror <log_type>: missing argument/],
    ['0 64 mirror core', 'ETABLE', /^table line 1: mirror <#log_args>: missing argument/],
    ['0 64 mirror core x', 'ETABLE', /mirror <#log_args>: 'x' is not an unsigned decimal number/],
    ['0 64 mirror core 3 8', 'ETABLE', /mirror <#log_args>: says 3 log arguments but 1 arguments follow/],
    [
      `0 64 mirror disk 2 /mem/c 8 ${legs}`,
      'EUNSUPPORTED',
      /mirror <log_type>: log type 'disk' is not supported by cryptmap \(use 'core'\)/,
    ],
    [`0 64 mirror userspace 1 x ${legs}`, 'EUNSUPPORTED', /log type 'userspace' is not supported/],
    [`0 64 mirror fancy 1 8 ${legs}`, 'ETABLE', /mirror <log_type>: unknown log type 'fancy'/],
    [`0 64 mirror core 0 ${legs}`, 'ETABLE', /mirror <#log_args>: the core log takes 1 or 2 arguments/],
    [
      `0 64 mirror core 3 8 sync x ${legs}`,
      'ETABLE',
      /mirror <#log_args>: the core log takes 1 or 2 arguments .* got 3/,
    ],
    [
      `0 64 mirror core 1 12 ${legs}`,
      'ETABLE',
      /mirror <region_size>: '12' must be a power of two, at least 2 and at most the target length \(64\) sectors/,
    ],
    [`0 64 mirror core 1 1 ${legs}`, 'ETABLE', /mirror <region_size>: '1' must be a power of two/],
    [`0 64 mirror core 1 128 ${legs}`, 'ETABLE', /mirror <region_size>: '128' must be/],
    [`0 64 mirror core 1 -8 ${legs}`, 'ETABLE', /mirror <region_size>: '-8' is not an unsigned decimal number/],
    [
      `0 64 mirror core 2 8 fast ${legs}`,
      'ETABLE',
      /mirror <log_args>: unknown sync argument 'fast' \(expected sync or nosync\)/,
    ],
    ['0 64 mirror core 1 8', 'ETABLE', /mirror <#mirrors>: missing argument/],
    ['0 64 mirror core 1 8 1 /mem/a 0', 'ETABLE', /mirror <#mirrors>: '1' must be from 2 to 9/],
    [`0 64 mirror core 1 8 10 ${'/mem/a 0 '.repeat(10)}`, 'ETABLE', /mirror <#mirrors>: '10' must be from 2 to 9/],
    [
      '0 64 mirror core 1 8 2 /mem/a 0 /mem/b',
      'ETABLE',
      /mirror <dev>: expected 2 <dev> <offset> pairs, got 3 arguments/,
    ],
    ['0 64 mirror core 1 8 2 /mem/a 0 /mem/b x', 'ETABLE', /mirror <offset #1>: 'x' is not an unsigned decimal number/],
    [`0 64 mirror core 1 8 ${legs} x`, 'ETABLE', /mirror <#features>: 'x' is not an unsigned decimal number/],
    [`0 64 mirror core 1 8 ${legs} 1`, 'ETABLE', /mirror <#features>: says 1 features but 0 follow/],
    [
      `0 64 mirror core 1 8 ${legs} 1 fast`,
      'ETABLE',
      /mirror <features>: unknown feature 'fast' \(known: handle_errors, keep_log\)/,
    ],
    [
      `0 64 mirror core 1 8 ${legs} 1 keep_log`,
      'ETABLE',
      /mirror <features>: keep_log requires the handle_errors feature/,
    ],
    [
      `0 64 mirror core 1 8 ${legs} 1 handle_errors extra`,
      'ETABLE',
      /mirror <args>: unexpected extra argument 'extra'/,
    ],
    ['0 64 mirror core 1 8 2 /mem/a 0 /mem/nope 0', 'EOPEN', /mirror <dev #1>: cannot open \/mem\/nope/],
    [
      '0 2048 mirror core 1 8 2 /mem/a 0 /mem/b 8',
      'EDEVSIZE',
      /mirror <dev #1>: device \/mem\/b is too small: it has 2048 sectors, the target needs 2056/,
    ],
    [
      '0 64 mirror core 1 8 2 /mem/a 0 /mem/big 1',
      'EALIGN',
      /mirror <offset #1>: offset 1 is not aligned to the 4096-byte logical blocks of device \/mem\/big/,
    ],
  ];
  for (const [text, code, re] of cases) {
    await assert.rejects(registry.create('x', { table: text }), (e: Error & { code?: string }) => {
      assert.equal(e.code, code, `${text}: ${e.message}`);
      assert.match(e.message, re, text);
      return true;
    });
    assert.equal(registry.find('x'), undefined, 'registry unchanged after a failed create');
  }
  await registry.closeAll();
});

test('data written through the mirror is on every leg (write, FUA, write zeroes, discard)', async () => {
  const { registry, mems } = memRegistry({ a: MiB, b: MiB, c: MiB });
  await registry.create('m', { table: '0 1024 mirror core 2 16 nosync 3 /mem/a 8 /mem/b 0 /mem/c 64' });
  const dev = registry.open('m');
  const r = prng(5);
  const model = Buffer.alloc(1024 * 512);
  for (let k = 0; k < 40; k++) {
    const s = r() % 1000;
    const n = 1 + (r() % Math.min(64, 1024 - s));
    const data = pattern(n * 512, k + 1);
    await dev.write(s * 512, data, { fua: k % 3 === 0 });
    data.copy(model, s * 512);
  }
  await dev.writeZeroes(100 * 512, 40 * 512);
  model.fill(0, 100 * 512, 140 * 512);
  await dev.flush();
  assert.ok((await raw({ mems }, 'a', 8 * 512, model.length)).equals(model), 'leg 0');
  assert.ok((await raw({ mems }, 'b', 0, model.length)).equals(model), 'leg 1');
  assert.ok((await raw({ mems }, 'c', 64 * 512, model.length)).equals(model), 'leg 2');
  const back = Buffer.alloc(model.length);
  await dev.read(0, back);
  assert.ok(back.equals(model));
  // A discard reaches every leg (memory legs read zeros after it).
  assert.equal(dev.capabilities.discard, true);
  await dev.discard(0, 64 * 512);
  for (const [m, off] of [
    ['a', 8],
    ['b', 0],
    ['c', 64],
  ] as const) {
    assert.ok((await raw({ mems }, m, off * 512, 64 * 512)).equals(Buffer.alloc(64 * 512)), `discard on ${m}`);
  }
  assert.equal(status(registry, 'm'), '0 1024 mirror 3 /mem/a /mem/b /mem/c 64/64 1 AAA 1 core');
  await registry.closeAll();
});

test('the resync copies leg 0 to the others; reads and racing writes stay correct, and every leg ends equal', async () => {
  const { registry, mems } = memRegistry({ a: MiB, b: MiB, c: MiB });
  const size = 2048 * 512;
  const model = pattern(size, 77);
  await mems.get('a')!.write(0, model);
  await mems.get('b')!.write(0, pattern(size, 78));
  await mems.get('c')!.write(0, pattern(size, 79));
  await registry.create('m', { table: '0 2048 mirror core 1 8 3 /mem/a 0 /mem/b 0 /mem/c 0' });
  const dev = registry.open('m');
  const r = prng(11);
  let sawPartial = false;
  for (let k = 0; k < 150; k++) {
    const st = status(registry, 'm');
    assert.match(st, /^0 2048 mirror 3 \/mem\/a \/mem\/b \/mem\/c [0-9]+\/256 1 AAA 1 core$/);
    if (!st.includes(' 256/256 ')) sawPartial = true;
    const s = r() % 2040;
    const n = 1 + (r() % Math.min(40, 2048 - s));
    if (r() % 2 === 0) {
      const data = pattern(n * 512, 1000 + k);
      // Several writes in flight at once, some in regions being copied.
      const s2 = r() % 2040;
      const data2 = pattern(8 * 512, 5000 + k);
      const ranges = s2 + 8 <= s || s + n <= s2;
      await Promise.all([dev.write(s * 512, data), ranges ? dev.write(s2 * 512, data2) : Promise.resolve()]);
      data.copy(model, s * 512);
      if (ranges) data2.copy(model, s2 * 512);
    } else {
      const got = Buffer.alloc(n * 512);
      await dev.read(s * 512, got);
      assert.ok(got.equals(model.subarray(s * 512, (s + n) * 512)), `read at ${s}+${n} during the resync`);
    }
    if (k % 4 === 0) await settle();
  }
  assert.ok(sawPartial, 'the I/O ran while the resync was under way');
  assert.equal(await waitInSync(registry, 'm'), '0 2048 mirror 3 /mem/a /mem/b /mem/c 256/256 1 AAA 1 core');
  for (const m of ['a', 'b', 'c'])
    assert.ok((await raw({ mems }, m, 0, size)).equals(model), `leg ${m} equals the model`);
  await registry.closeAll();
});

test('a write to a region being copied waits for the copy, so the copy never overwrites it', async () => {
  const { ctl, registry, mems } = faulty();
  await mems.get('a')!.write(0, Buffer.alloc(4096, 0xaa));
  await mems.get('b')!.write(0, Buffer.alloc(4096, 0xbb));
  await registry.create('la', { table: '0 1024 trace /mem/a 0 A' });
  await registry.create('lb', { table: '0 1024 trace /mem/b 0 B' });
  ctl.hold = true;
  await registry.create('m', { table: '0 1024 mirror core 1 8 2 la 0 lb 0' });
  assert.equal(status(registry, 'm'), '0 1024 mirror 2 la lb 0/128 1 AA 1 core');
  for (let turn = 0; turn < 1000 && ctl.waiting() === 0; turn++) await settle();
  assert.deepEqual(ctl.log, ['A:read:0'], 'the resync is reading region 0 of leg 0');
  const w = registry.open('m').write(0, Buffer.alloc(4096, 0x11));
  for (let turn = 0; turn < 20; turn++) await settle();
  assert.deepEqual(ctl.log, ['A:read:0'], 'the write waits for the region lock');
  assert.equal(status(registry, 'm'), '0 1024 mirror 2 la lb 0/128 1 AA 1 core');
  ctl.hold = false;
  ctl.release();
  await w;
  assert.deepEqual(ctl.log.slice(0, 4), ['A:read:0', `B:write:0:${0xaa}`, `A:write:0:${0x11}`, `B:write:0:${0x11}`]);
  assert.equal(await waitInSync(registry, 'm'), '0 1024 mirror 2 la lb 128/128 1 AA 1 core');
  assert.ok((await raw({ mems }, 'a', 0, 4096)).equals(Buffer.alloc(4096, 0x11)));
  assert.ok((await raw({ mems }, 'b', 0, 4096)).equals(Buffer.alloc(4096, 0x11)));
  await registry.closeAll();
});

test('nosync: every region is in sync at once, nothing is copied, reads come from leg 0', async () => {
  const { registry, mems } = memRegistry({ a: MiB, b: MiB });
  await mems.get('a')!.write(0, Buffer.alloc(MiB, 1));
  await mems.get('b')!.write(0, Buffer.alloc(MiB, 2));
  await registry.create('m', { table: '0 2048 mirror core 2 64 nosync 2 /mem/a 0 /mem/b 0' });
  assert.equal(status(registry, 'm'), '0 2048 mirror 2 /mem/a /mem/b 32/32 1 AA 1 core');
  for (let turn = 0; turn < 50; turn++) await settle();
  assert.ok((await raw({ mems }, 'b', 0, MiB)).equals(Buffer.alloc(MiB, 2)), 'leg 1 untouched');
  const got = Buffer.alloc(4096);
  await registry.open('m').read(8192, got);
  assert.ok(got.equals(Buffer.alloc(4096, 1)));
  await registry.closeAll();
});

test('dispose stops the resync: no leg I/O after the mirror is removed', async () => {
  const { ctl, registry } = await resyncRunning();
  await registry.remove('m');
  await settle();
  const n = ctl.log.length;
  for (let turn = 0; turn < 50; turn++) await settle();
  assert.equal(ctl.log.length, n, 'no resync I/O after remove');
  await registry.closeAll();
});

test('suspend pauses the resync (no leg I/O until resume, as the kernel stops recovery); resume finishes it', async () => {
  const { ctl, registry } = await resyncRunning();
  await registry.suspend('m');
  const n = ctl.log.length;
  const before = status(registry, 'm');
  for (let turn = 0; turn < 50; turn++) await settle();
  assert.equal(ctl.log.length, n, 'no resync I/O while suspended');
  assert.equal(status(registry, 'm'), before);
  await registry.resume('m');
  assert.match(await waitInSync(registry, 'm'), / 1024\/1024 1 AA 1 core$/);
  await registry.closeAll();
});

test('handle_errors: a leg whose write fails is dropped (D), I/O goes on on the others', async () => {
  const { registry, mems } = faulty();
  await registry.create('fb', { table: '0 1024 fault /mem/b 0' });
  await registry.create('m', { table: '0 1024 mirror core 2 8 nosync 2 /mem/a 0 fb 0 1 handle_errors' });
  const dev = registry.open('m');
  await dev.write(0, Buffer.alloc(4096, 1));
  await registry.message('fb', 0, ['fail_writes']);
  await dev.write(0, Buffer.alloc(4096, 2));
  assert.equal(status(registry, 'm'), '0 1024 mirror 2 /mem/a fb 128/128 1 AD 1 core');
  assert.ok((await raw({ mems }, 'a', 0, 4096)).equals(Buffer.alloc(4096, 2)));
  assert.ok((await raw({ mems }, 'b', 0, 4096)).equals(Buffer.alloc(4096, 1)), 'the failed leg kept the old data');
  // The dropped leg gets no more I/O, even once it would work again.
  await registry.message('fb', 0, ['clear']);
  await dev.write(4096, Buffer.alloc(4096, 3));
  assert.ok((await raw({ mems }, 'b', 4096, 4096)).equals(Buffer.alloc(4096)));
  const got = Buffer.alloc(8192);
  await dev.read(0, got);
  assert.ok(got.equals(Buffer.concat([Buffer.alloc(4096, 2), Buffer.alloc(4096, 3)])));
  await dev.flush();
  // When the last leg fails too, the write fails.
  await registry.create('fa', { table: '0 1024 fault /mem/a 0 fail_writes' });
  await registry.create('m2', { table: '0 1024 mirror core 2 8 nosync 2 fa 0 fb 0 1 handle_errors' });
  await registry.message('fb', 0, ['fail_writes']);
  await assert.rejects(registry.open('m2').write(0, Buffer.alloc(512)), {
    code: 'EIO',
    errno: 'EIO',
    message: /mirror: write failed on every leg/,
  });
  assert.equal(status(registry, 'm2'), '0 1024 mirror 2 fa fb 128/128 1 DD 1 core');
  await assert.rejects(registry.open('m2').write(0, Buffer.alloc(512)), { code: 'EIO' });
  await registry.closeAll();
});

test('handle_errors: a read error retries another in-sync leg (R); a flush error marks F', async () => {
  const { registry } = faulty();
  await registry.create('fa', { table: '0 1024 fault /mem/a 0' });
  await registry.create('fb', { table: '0 1024 fault /mem/b 0' });
  await registry.create('m', { table: '0 1024 mirror core 2 8 nosync 2 fa 0 fb 0 1 handle_errors' });
  const dev = registry.open('m');
  const data = pattern(64 * 512, 3);
  await dev.write(0, data);
  await registry.message('fa', 0, ['fail_reads']);
  const got = Buffer.alloc(data.length);
  await dev.read(0, got);
  assert.ok(got.equals(data));
  assert.equal(status(registry, 'm'), '0 1024 mirror 2 fa fb 128/128 1 RA 1 core');
  // A leg with only read errors still takes writes.
  const data2 = pattern(64 * 512, 4);
  await dev.write(0, data2);
  await registry.message('fa', 0, ['clear']);
  await registry.message('fb', 0, ['fail_reads']);
  await dev.read(0, got);
  assert.ok(got.equals(data2), 'leg 0 got the write although it had a read error');
  await registry.message('fb', 0, ['clear']);
  await registry.message('fb', 0, ['fail_flush']);
  await dev.flush();
  assert.equal(status(registry, 'm'), '0 1024 mirror 2 fa fb 128/128 1 RF 1 core');
  await registry.closeAll();
});

test('without handle_errors every leg error is returned to the caller and recorded in the health chars', async () => {
  const { registry, mems } = faulty();
  await registry.create('fa', { table: '0 1024 fault /mem/a 0' });
  await registry.create('fb', { table: '0 1024 fault /mem/b 0 fail_writes' });
  await registry.create('m', { table: '0 1024 mirror core 2 8 nosync 2 fa 0 fb 0' });
  const dev = registry.open('m');
  await assert.rejects(dev.write(0, Buffer.alloc(4096, 7)), { errno: 'EIO' });
  assert.equal(status(registry, 'm'), '0 1024 mirror 2 fa fb 128/128 1 AD 1 core');
  assert.ok((await raw({ mems }, 'a', 0, 4096)).equals(Buffer.alloc(4096, 7)), 'the other legs still got it');
  // The leg is not dropped: once it works again it gets writes, and errors keep coming back.
  await registry.message('fb', 0, ['clear']);
  await dev.write(0, Buffer.alloc(4096, 8));
  assert.ok((await raw({ mems }, 'b', 0, 4096)).equals(Buffer.alloc(4096, 8)));
  await registry.message('fa', 0, ['fail_reads']);
  await assert.rejects(dev.read(0, Buffer.alloc(512)), { errno: 'EIO' });
  assert.equal(status(registry, 'm'), '0 1024 mirror 2 fa fb 128/128 1 RD 1 core');
  await registry.message('fa', 0, ['clear']);
  await registry.message('fb', 0, ['fail_flush']);
  await assert.rejects(dev.flush(), { errno: 'EIO' });
  assert.equal(status(registry, 'm'), '0 1024 mirror 2 fa fb 128/128 1 RF 1 core');
  await registry.closeAll();
});

test('a leg failing during the resync is marked S: dropped with handle_errors, its regions stay out of sync without', async () => {
  {
    const { registry, mems } = faulty();
    await mems.get('a')!.write(0, pattern(512 * 512, 9));
    await registry.create('fb', { table: '0 512 fault /mem/b 0 fail_writes' });
    await registry.create('m', { table: '0 512 mirror core 1 16 3 /mem/a 0 fb 0 /mem/c 0 1 handle_errors' });
    assert.equal(await waitInSync(registry, 'm'), '0 512 mirror 3 /mem/a fb /mem/c 32/32 1 ASA 1 core');
    assert.ok((await raw({ mems }, 'c', 0, 512 * 512)).equals(pattern(512 * 512, 9)));
    await registry.closeAll();
  }
  {
    const { registry } = faulty();
    await registry.create('fb', { table: '0 512 fault /mem/b 0 fail_writes' });
    await registry.create('m', { table: '0 512 mirror core 1 16 2 /mem/a 0 fb 0' });
    for (let turn = 0; turn < 10_000 && !status(registry, 'm').includes(' AS '); turn++) await settle();
    for (let turn = 0; turn < 200; turn++) await settle();
    assert.equal(status(registry, 'm'), '0 512 mirror 2 /mem/a fb 0/32 1 AS 1 core');
    await registry.closeAll();
  }
});

test('crypt over mirror over memory: both legs hold the same ciphertext', async () => {
  const key = xtsKey(12).toString('hex');
  const { registry, mems } = memRegistry({ a: MiB, b: MiB, c: MiB });
  await registry.create('m', { table: '0 2048 mirror core 1 64 2 /mem/a 0 /mem/b 0' });
  await registry.create('c', { table: `0 2048 crypt aes-xts-plain64 ${key} 0 m 0` });
  await registry.create('ref', { table: `0 2048 crypt aes-xts-plain64 ${key} 0 /mem/c 0` });
  const plain = pattern(256 * 1024, 13);
  // Scratch writes let crypt encrypt in place and hand the buffer down; the mirror must not let a
  // leg change what the other legs still write.
  await registry.open('c').write(4096, Buffer.from(plain), { scratch: true });
  await registry.open('ref').write(4096, Buffer.from(plain));
  await waitInSync(registry, 'm');
  const cipherA = await raw({ mems }, 'a', 4096, plain.length);
  assert.ok(cipherA.equals(await raw({ mems }, 'b', 4096, plain.length)), 'legs equal');
  assert.ok(cipherA.equals(await raw({ mems }, 'c', 4096, plain.length)), 'ciphertext equals a plain crypt device');
  assert.ok(!cipherA.equals(plain));
  const back = Buffer.alloc(plain.length);
  await registry.open('c').read(4096, back);
  assert.ok(back.equals(plain));
  await registry.closeAll();
});

test('mirror over crypt legs: a scratch write is handed to each leg unchanged', async () => {
  const key = xtsKey(14).toString('hex');
  const { registry, mems } = memRegistry({ a: MiB, b: MiB });
  await registry.create('ca', { table: `0 1024 crypt aes-xts-plain64 ${key} 0 /mem/a 0` });
  await registry.create('cb', { table: `0 1024 crypt aes-xts-plain64 ${key} 0 /mem/b 0` });
  await registry.create('m', { table: '0 1024 mirror core 2 8 nosync 2 ca 0 cb 0' });
  const plain = pattern(8192, 15);
  await registry.open('m').write(0, Buffer.from(plain), { scratch: true });
  assert.ok(
    (await raw({ mems }, 'a', 0, 8192)).equals(await raw({ mems }, 'b', 0, 8192)),
    'same ciphertext on both legs',
  );
  for (const leg of ['ca', 'cb']) {
    const back = Buffer.alloc(8192);
    await registry.open(leg).read(0, back);
    assert.ok(back.equals(plain), leg);
  }
  await registry.closeAll();
});
