// Model-based random I/O (fast-check, seeded, bounded runs): stacks of targets against a plain
// in-memory reference. Every read must equal the reference; I/O touching an error target must
// fail while the other pieces of the same request still land; discards follow capabilities.
import assert from 'node:assert/strict';
import { rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { testTempDir } from '../helpers/tmp.js';
import fc from 'fast-check';
import type { BlockDevice } from '../../src/blockdev/types.js';
import { DeviceRegistry } from '../../src/dm/registry.js';
import { createSectorCipher } from '../../src/engine/index.js';
import { memRegistry, pattern, xtsKey } from './helpers.js';

type Kind = 'data' | 'zero' | 'error';
interface Region {
  startS: number;
  endS: number;
  kind: Kind;
}

type Op =
  | { op: 'read'; s: number; n: number }
  | { op: 'write'; s: number; n: number; seed: number; fua: boolean }
  | { op: 'writeZeroes'; s: number; n: number }
  | { op: 'discard'; s: number; n: number }
  | { op: 'flush' };

/** The reference: a flat byte array plus the region kinds of the table. */
class Model {
  readonly ref: Buffer;
  constructor(
    readonly sizeS: number,
    readonly regions: Region[],
    readonly discard: boolean,
  ) {
    this.ref = Buffer.alloc(sizeS * 512);
  }
  touches(s: number, n: number, kind: Kind): boolean {
    return this.regions.some((r) => r.kind === kind && r.startS < s + n && s < r.endS);
  }
  /** Apply `f` to the data parts of [s, s+n). */
  eachData(s: number, n: number, f: (fromS: number, toS: number) => void): void {
    for (const r of this.regions) {
      const a = Math.max(r.startS, s);
      const b = Math.min(r.endS, s + n);
      if (r.kind === 'data' && a < b) f(a, b);
    }
  }
  expectedRead(s: number, n: number): Buffer {
    const out = Buffer.from(this.ref.subarray(s * 512, (s + n) * 512));
    for (const r of this.regions) {
      const a = Math.max(r.startS, s);
      const b = Math.min(r.endS, s + n);
      if (r.kind === 'zero' && a < b) out.fill(0, (a - s) * 512, (b - s) * 512);
    }
    return out;
  }
}

async function check(dev: BlockDevice, model: Model, ops: Op[], lbsS: number): Promise<void> {
  for (const o of ops) {
    if (o.op === 'flush') {
      await dev.flush();
      continue;
    }
    const s = o.s - (o.s % lbsS);
    const n = Math.min(o.n - (o.n % lbsS), model.sizeS - s);
    const err = model.touches(s, n, 'error');
    switch (o.op) {
      case 'read': {
        const buf = Buffer.alloc(n * 512);
        if (err) await assert.rejects(dev.read(s * 512, buf), /error target/);
        else {
          await dev.read(s * 512, buf);
          assert.ok(buf.equals(model.expectedRead(s, n)), `read ${n} sectors at ${s}`);
        }
        break;
      }
      case 'write': {
        const data = pattern(n * 512, o.seed);
        const copy = Buffer.from(data);
        const p = dev.write(s * 512, data, { fua: o.fua });
        if (err) await assert.rejects(p, /error target/);
        else await p;
        assert.ok(data.equals(copy), 'write must not modify the caller data');
        model.eachData(s, n, (a, b) => data.copy(model.ref, a * 512, (a - s) * 512, (b - s) * 512));
        break;
      }
      case 'writeZeroes': {
        const p = dev.writeZeroes(s * 512, n * 512);
        if (err && n > 0) await assert.rejects(p, /error target/);
        else await p;
        model.eachData(s, n, (a, b) => model.ref.fill(0, a * 512, b * 512));
        break;
      }
      case 'discard': {
        const p = dev.discard(s * 512, n * 512);
        if (!model.discard) {
          await assert.rejects(p, /does not support discard/);
          break;
        }
        if (err && n > 0) await assert.rejects(p, /error target/);
        else await p;
        // The memory backends read discarded ranges back as zeros.
        model.eachData(s, n, (a, b) => model.ref.fill(0, a * 512, b * 512));
        break;
      }
    }
  }
  // Whole-device comparison at the end (the error parts excluded).
  for (const r of model.regions) {
    if (r.kind === 'error') continue;
    const buf = Buffer.alloc((r.endS - r.startS) * 512);
    await dev.read(r.startS * 512, buf);
    assert.ok(
      buf.equals(model.expectedRead(r.startS, r.endS - r.startS)),
      `final state of sectors ${r.startS}..${r.endS}`,
    );
  }
}

function opsArb(sizeS: number, edges: number[], discard: boolean): fc.Arbitrary<Op[]> {
  const pos = fc.oneof(
    fc.integer({ min: 0, max: sizeS - 1 }),
    fc.constantFrom(...edges.flatMap((e) => [e - 1, e, e + 1]).filter((e) => e >= 0 && e < sizeS)),
  );
  const len = fc.oneof(fc.integer({ min: 0, max: 40 }), fc.integer({ min: 0, max: 300 }));
  const kinds: fc.Arbitrary<Op>[] = [
    fc.record({ op: fc.constant('read' as const), s: pos, n: len }),
    fc.record({
      op: fc.constant('write' as const),
      s: pos,
      n: len,
      seed: fc.integer({ min: 1, max: 1 << 30 }),
      fua: fc.boolean(),
    }),
    fc.record({ op: fc.constant('writeZeroes' as const), s: pos, n: len }),
    fc.record({ op: fc.constant('discard' as const), s: pos, n: len }),
    fc.constant({ op: 'flush' as const }),
  ];
  void discard;
  return fc.array(
    fc.oneof({ weight: 3, arbitrary: kinds[0]! }, { weight: 3, arbitrary: kinds[1]! }, kinds[2]!, kinds[3]!, kinds[4]!),
    { minLength: 1, maxLength: 25 },
  );
}

const RUNS = { seed: 424242, numRuns: 25 };

test('crypt over striped over two memory devices matches a plain reference', async () => {
  const key = xtsKey(3);
  for (const opt of ['', ' 1 sector_size:4096', ' 2 sector_size:4096 iv_large_sectors']) {
    const lbsS = opt.includes('4096') ? 8 : 1;
    await fc.assert(
      fc.asyncProperty(opsArb(2048, [0, 16, 32, 1024, 2047], false), async (ops) => {
        const { registry } = memRegistry({ a: 512 << 10, b: 512 << 10 });
        await registry.create('s', { table: '0 2048 striped 2 16 /mem/a 0 /mem/b 0' });
        await registry.create('c', { table: `0 2048 crypt aes-xts-plain64 ${key.toString('hex')} 0 s 0${opt}` });
        const dev = registry.open('c');
        const model = new Model(2048, [{ startS: 0, endS: 2048, kind: 'data' }], false);
        // Start from known plaintext (memory starts as zeros = ciphertext of garbage).
        const init = pattern(2048 * 512, 99);
        await dev.write(0, init);
        init.copy(model.ref);
        await check(dev, model, ops, lbsS);
        // The stored ciphertext equals the engine's encryption of the reference.
        await registry.create('raw', { table: '0 2048 linear s 0' });
        const raw = Buffer.alloc(2048 * 512);
        await registry.open('raw').read(0, raw);
        const sectorBytes = lbsS === 8 ? 4096 : 512;
        const c = createSectorCipher({
          spec: 'aes-xts-plain64',
          key,
          sectorBytes,
          ivLargeSectors: opt.includes('iv_large'),
        });
        const expect = Buffer.alloc(raw.length);
        c.encrypt(model.ref, 0n, expect);
        c.dispose();
        assert.ok(raw.equals(expect), 'ciphertext below the crypt target');
        await dev.close();
        await registry.closeAll();
      }),
      RUNS,
    );
  }
});

test('linear over linear (permuted ranges) matches a plain reference', async () => {
  await fc.assert(
    fc.asyncProperty(opsArb(2048, [0, 512, 1024, 1536, 2047], true), async (ops) => {
      const { registry } = memRegistry({ a: 1 << 20 });
      await registry.create('l1', { table: '0 512 linear /mem/a 1536\n512 1536 linear /mem/a 0' });
      await registry.create('l2', {
        table: '0 1024 linear l1 1024\n1024 1000 linear l1 8\n2024 24 linear /dev/mapper/l1 1000',
      });
      const dev = registry.open('l2');
      await check(dev, new Model(2048, [{ startS: 0, endS: 2048, kind: 'data' }], true), ops, 1);
      await dev.close();
      await registry.closeAll();
    }),
    RUNS,
  );
});

test('linear, zero and error mixed in one table match the reference', async () => {
  const regions: Region[] = [
    { startS: 0, endS: 256, kind: 'data' },
    { startS: 256, endS: 384, kind: 'zero' },
    { startS: 384, endS: 512, kind: 'error' },
    { startS: 512, endS: 1024, kind: 'data' },
    { startS: 1024, endS: 1032, kind: 'zero' },
    { startS: 1032, endS: 2048, kind: 'data' },
  ];
  await fc.assert(
    fc.asyncProperty(opsArb(2048, [0, 256, 384, 512, 1024, 1032, 2047], true), async (ops) => {
      const { registry } = memRegistry({ a: 256 << 10, b: 1 << 20 });
      const table =
        '0 256 linear /mem/a 0\n256 128 zero\n384 128 error\n512 512 linear /mem/b 8\n1024 8 zero\n1032 1016 striped 1 8 /mem/b 1024';
      await registry.create('mix', { table });
      const dev = registry.open('mix');
      await check(dev, new Model(2048, regions, true), ops, 1);
      await dev.close();
      await registry.closeAll();
    }),
    RUNS,
  );
});

test('boundary cases: first and last sector, zero length, crossing every edge', async () => {
  const { registry } = memRegistry({ a: 1 << 20, b: 1 << 20 });
  await registry.create('m', {
    table: '0 8 linear /mem/a 0\n8 16 striped 2 8 /mem/a 8 /mem/b 0\n24 1 zero\n25 999 linear /mem/b 64',
  });
  const dev = registry.open('m');
  assert.equal(dev.sizeBytes, 1024 * 512);
  const all = pattern(1024 * 512, 5);
  await dev.write(0, all);
  all.fill(0, 24 * 512, 25 * 512);
  const got = Buffer.alloc(all.length);
  await dev.read(0, got);
  assert.ok(got.equals(all));
  const first = Buffer.alloc(512);
  await dev.read(0, first);
  assert.ok(first.equals(all.subarray(0, 512)));
  const last = Buffer.alloc(512);
  await dev.read(1023 * 512, last);
  assert.ok(last.equals(all.subarray(1023 * 512)));
  await dev.read(1024 * 512, Buffer.alloc(0));
  await dev.write(0, Buffer.alloc(0));
  await dev.writeZeroes(512 * 1024, 0);
  await assert.rejects(dev.read(1023 * 512, Buffer.alloc(1024)), { code: 'ERANGE', errno: 'EINVAL' });
  await assert.rejects(dev.write(1024 * 512, Buffer.alloc(512)), {
    code: 'ERANGE',
    errno: 'ENOSPC',
    message: /write of 512 bytes at 524288 is outside device m \(524288 bytes\)/,
  });
  await assert.rejects(dev.read(100, Buffer.alloc(512)), {
    code: 'EALIGN',
    message: /read of 512 bytes at 100 on device m is not aligned to its 512-byte logical blocks/,
  });
  await assert.rejects(dev.read(-512, Buffer.alloc(512)), { code: 'ERANGE' });
  await dev.close();
  await registry.closeAll();
});

test('concurrent batches of disjoint I/O on crypt over striped over two real files', async (t) => {
  const dir = testTempDir(t, 'cryptmap-model-');
  const key = xtsKey(17).toString('hex');
  const sizeS = 2048;
  const batch = fc.array(
    fc.record({
      s: fc.integer({ min: 0, max: sizeS - 1 }),
      n: fc.integer({ min: 1, max: 200 }),
      write: fc.boolean(),
      seed: fc.integer({ min: 1, max: 1 << 30 }),
    }),
    { minLength: 1, maxLength: 12 },
  );
  let run = 0;
  await fc.assert(
    fc.asyncProperty(fc.array(batch, { minLength: 1, maxLength: 6 }), async (batches) => {
      const files = ['a', 'b'].map((x) => join(dir, `${x}${run}.img`));
      run++;
      for (const f of files) writeFileSync(f, Buffer.alloc(512 << 10), { mode: 0o600 });
      const registry = new DeviceRegistry();
      await registry.create('s', { table: `0 ${sizeS} striped 2 32 ${files[0]} 0 ${files[1]} 0` });
      await registry.create('c', { table: `0 ${sizeS} crypt aes-xts-plain64 ${key} 0 s 0` });
      const dev = registry.open('c');
      const ref = pattern(sizeS * 512, 5);
      await dev.write(0, ref);
      for (const b of batches) {
        // Keep the requests of one batch disjoint: then any completion order gives one result.
        const taken: [number, number][] = [];
        const ops = b
          .map((o) => ({ ...o, n: Math.min(o.n, sizeS - o.s) }))
          .filter((o) => {
            if (taken.some(([a, e]) => o.s < e && a < o.s + o.n)) return false;
            taken.push([o.s, o.s + o.n]);
            return true;
          });
        const reads: [number, Buffer][] = [];
        await Promise.all(
          ops.map((o) => {
            if (o.write) {
              const data = pattern(o.n * 512, o.seed);
              data.copy(ref, o.s * 512);
              return dev.write(o.s * 512, data);
            }
            const buf = Buffer.alloc(o.n * 512);
            reads.push([o.s, buf]);
            // Reads in a batch see the state before it: no write in the batch overlaps them.
            return dev.read(o.s * 512, buf);
          }),
        );
        for (const [s, buf] of reads)
          assert.ok(buf.equals(ref.subarray(s * 512, s * 512 + buf.length)), `read at ${s}`);
      }
      const all = Buffer.alloc(sizeS * 512);
      await dev.read(0, all);
      assert.ok(all.equals(ref));
      await dev.close();
      await registry.closeAll();
      for (const f of files) rmSync(f);
    }),
    { seed: 7, numRuns: 15 },
  );
});
