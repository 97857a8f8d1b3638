// LUKS1 <-> LUKS2 conversion (src/luks/convert.ts): both directions keep every passphrase, a crash
// after any write leaves an image that opens with every passphrase (as LUKS1 or LUKS2), the refusals
// write nothing, and the move planner goes through inactive keyslots. The layouts are checked
// byte for byte against cryptsetup in convert.interop.test.ts.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import type { BlockDevice } from '../../src/blockdev/types.js';
import {
  convertLuks1ToLuks2,
  convertLuks2ToLuks1,
  detectLuks,
  Luks1Volume,
  Luks2Volume,
  openLuks,
  planLuks1Moves,
} from '../../src/luks/index.js';
import { CryptmapError, isCryptmapError } from '../../src/util/errors.js';
import { cloneDevice, FAST_ARGON, FAST_PBKDF2, P, sweepCrashes } from './helpers.js';

const SIZE = 4 << 20;
const mk = (n: number) => new MemoryDevice({ sizeBytes: n });
const LUKS2 = { keyslot: { kdf: FAST_PBKDF2 }, offsetBytes: 2 << 20, sectorBytes: 512 as const, keyBytes: 32 };

async function opensAll(dev: BlockDevice, passes: string[]): Promise<boolean> {
  try {
    const v = await openLuks(dev);
    for (const p of passes) (await v.unlock(P(p))).volumeKey.dispose();
    return true;
  } catch {
    return false;
  }
}

async function snapshot(dev: BlockDevice): Promise<Buffer> {
  const b = Buffer.alloc(dev.sizeBytes);
  await dev.read(0, b);
  return b;
}

/**
 * Convert copies of `base`, the device failing after 0, 1, 2, ... writes (more than 4 writes), until
 * one completes: each opens with every passphrase, the completed one is `want`.
 */
async function sweep(
  base: BlockDevice,
  run: (d: BlockDevice) => Promise<void>,
  passes: string[],
  want: 'luks1' | 'luks2',
): Promise<void> {
  await sweepCrashes({
    makeBase: base,
    run: async (dev, img) => {
      await run(dev);
      assert.equal(await detectLuks(img), want);
    },
    recover: async () => undefined,
    check: async (img, n) =>
      assert.ok(await opensAll(img, passes), `after ${n} writes the image does not open with every passphrase`),
    minWrites: 4,
  });
}

test('LUKS1 -> LUKS2 -> LUKS1 keeps every passphrase and the volume key', async () => {
  const dev = mk(SIZE);
  const v1 = await Luks1Volume.format(dev, P('one'), { keyslot: { kdf: FAST_PBKDF2, keySlot: 5 }, keyBytes: 64 });
  await v1.addKey({ passphrase: P('one') }, P('two'), { kdf: FAST_PBKDF2, keySlot: 1 });
  const vk = (await v1.unlock(P('one'))).volumeKey.expose().toString('hex');
  await convertLuks1ToLuks2(dev);
  const v2 = await openLuks(dev);
  assert.equal(v2.type, 'luks2');
  assert.equal(v2.uuid, v1.uuid);
  assert.deepEqual(
    v2.keyslots().map((k) => k.id),
    [1, 5],
  );
  assert.equal((await v2.unlock(P('two'))).volumeKey.expose().toString('hex'), vk);
  assert.equal(v2.dataSegment.offsetBytes, v1.dataSegment.offsetBytes);
  await convertLuks2ToLuks1(dev);
  const back = await openLuks(dev);
  assert.equal(back.type, 'luks1');
  assert.deepEqual(
    (back as Luks1Volume).header.keyblock.map((k) => k.keyMaterialOffset),
    v1.header.keyblock.map((k) => k.keyMaterialOffset),
  );
  assert.equal((await back.unlock(P('one'))).volumeKey.expose().toString('hex'), vk);
});

test('convert survives a crash after any write, both directions', async () => {
  const l1 = mk(SIZE);
  const v1 = await Luks1Volume.format(l1, P('one'), { keyslot: { kdf: FAST_PBKDF2 }, keyBytes: 32 });
  await v1.addKey({ passphrase: P('one') }, P('two'), { kdf: FAST_PBKDF2, keySlot: 1 });
  await v1.addKey({ passphrase: P('one') }, P('three'), { kdf: FAST_PBKDF2, keySlot: 6 });
  await sweep(l1, convertLuks1ToLuks2, ['one', 'two', 'three'], 'luks2');

  const l2 = mk(SIZE);
  const v2 = await Luks2Volume.format(l2, P('one'), LUKS2);
  await v2.addKey({ passphrase: P('one') }, P('two'), { kdf: FAST_PBKDF2, keySlot: 3 });
  await sweep(l2, convertLuks2ToLuks1, ['one', 'two'], 'luks1');
});

test('all eight LUKS1 keyslots active: no crash-safe order, converted in one pass', async () => {
  const dev = mk(SIZE);
  const v = await Luks1Volume.format(dev, P('p0'), { keyslot: { kdf: FAST_PBKDF2 }, keyBytes: 32 });
  for (let i = 1; i < 8; i++) await v.addKey({ passphrase: P('p0') }, P(`p${i}`), { kdf: FAST_PBKDF2, keySlot: i });
  const shift = v.header.keyblock.map((k) => k.keyMaterialOffset + 56);
  assert.equal(planLuks1Moves(v.header as never, shift, dev.sizeBytes), null);
  await convertLuks1ToLuks2(dev);
  assert.ok(await opensAll(dev, ['p0', 'p3', 'p7']));
  await convertLuks2ToLuks1(dev);
  assert.ok(await opensAll(dev, ['p0', 'p5', 'p7']));
});

test('the planner moves an active keyslot through an inactive one when it overlaps its own target', () => {
  const h = {
    version: 1,
    cipherName: 'aes',
    cipherMode: 'xts-plain64',
    hashSpec: 'sha256',
    payloadOffset: 4096,
    keyBytes: 64,
    mkDigest: Buffer.alloc(20),
    mkDigestSalt: Buffer.alloc(32),
    mkDigestIterations: 1000,
    uuid: '12345678-1234-1234-1234-123456789abc',
    keyblock: Array.from({ length: 8 }, (_, i) => ({
      active: i === 0 ? 0x00ac71f3 : 0xdead,
      iterations: 1000,
      salt: Buffer.alloc(32),
      keyMaterialOffset: 8 + i * 504,
      stripes: 4000,
    })),
  };
  const plan = planLuks1Moves(
    h,
    h.keyblock.map((k) => k.keyMaterialOffset + 56),
    4 << 20,
  )!;
  const copies = plan.filter((s) => s.kind === 'copy');
  assert.equal(copies.length, 2, 'slot 0: to a free area, then to its target');
  assert.equal(plan[plan.length - 1]!.kind, 'header');
});

test('refusals write nothing (cryptsetup 2.6 rules)', async () => {
  const cases: {
    name: string;
    make: () => Promise<BlockDevice>;
    run: (d: BlockDevice) => Promise<void>;
    msg: RegExp;
  }[] = [
    {
      name: 'sector size 4096',
      make: async () => {
        const d = mk(SIZE);
        await Luks2Volume.format(d, P('one'), { ...LUKS2, sectorBytes: 4096 });
        return d;
      },
      run: convertLuks2ToLuks1,
      msg: /default segment encryption sector size is not 512 bytes/,
    },
    {
      name: 'argon2 keyslot',
      make: async () => {
        const d = mk(SIZE);
        await Luks2Volume.format(d, P('one'), { ...LUKS2, keyslot: { kdf: FAST_ARGON } });
        return d;
      },
      run: convertLuks2ToLuks1,
      msg: /keyslot 0 is not LUKS1 compatible/,
    },
    {
      name: 'keyslot above 7',
      make: async () => {
        const d = mk(SIZE);
        const v = await Luks2Volume.format(d, P('one'), LUKS2);
        await v.addKey({ passphrase: P('one') }, P('two'), { kdf: FAST_PBKDF2, keySlot: 9 });
        return d;
      },
      run: convertLuks2ToLuks1,
      msg: /slot 9 \(over maximum slots\) is still active/,
    },
    {
      name: 'token',
      make: async () => {
        const d = mk(SIZE);
        const v = await Luks2Volume.format(d, P('one'), LUKS2);
        await v.importToken('{"type":"x","keyslots":[]}');
        return d;
      },
      run: convertLuks2ToLuks1,
      msg: /LUKS2 header contains 1 token\(s\)/,
    },
    {
      name: 'no room for the shifted keyslots',
      make: async () => {
        const d = mk(SIZE);
        await Luks1Volume.format(d, P('one'), { keyslot: { kdf: FAST_PBKDF2 }, keyBytes: 64, offsetBytes: 4040 * 512 });
        return d;
      },
      run: convertLuks1ToLuks2,
      msg: /Unable to move keyslot area. Not enough space./,
    },
  ];
  for (const c of cases) {
    const d = await c.make();
    const before = await snapshot(d);
    await assert.rejects(c.run(d), (e) => isCryptmapError(e) && c.msg.test(e.message) && e.exitCode === 1, c.name);
    assert.ok((await snapshot(d)).equals(before), `${c.name}: the device changed`);
  }
});

/** Write number `at` (1-based) reaches `inner` only in the 512-byte blocks of `mask`, then the power goes. */
function tornAt(inner: BlockDevice, at: number, mask: number): BlockDevice & { blocksOfTorn: number } {
  let n = 0;
  let dead = false;
  const crash = () => new CryptmapError('EFAULT_CRASH', 'power cut (test)');
  const dev = {
    sizeBytes: inner.sizeBytes,
    capabilities: inner.capabilities,
    limits: inner.limits,
    blocksOfTorn: 0,
    read: (o: number, b: Uint8Array) => inner.read(o, b),
    async write(o: number, data: Uint8Array) {
      if (dead) throw crash();
      if (++n === at) {
        dead = true;
        dev.blocksOfTorn = Math.ceil(data.length / 512);
        for (let b = 0; b * 512 < data.length; b++)
          if ((mask >> b) & 1) await inner.write(o + b * 512, data.subarray(b * 512, (b + 1) * 512));
        throw crash();
      }
      await inner.write(o, data);
    },
    async flush() {
      if (dead) throw crash();
      await inner.flush();
    },
    async writeZeroes(o: number, len: number) {
      if (dead) throw crash();
      n++;
      await inner.writeZeroes(o, len);
    },
    discard: (o: number, len: number) => inner.discard(o, len),
    close: async () => undefined,
  };
  return dev as unknown as BlockDevice & { blocksOfTorn: number };
}

test('convert survives a torn write (the first or the second sector of it reached the disk), both directions', async () => {
  const l1 = mk(SIZE);
  const v1 = await Luks1Volume.format(l1, P('one'), { keyslot: { kdf: FAST_PBKDF2 }, keyBytes: 32 });
  await v1.addKey({ passphrase: P('one') }, P('two'), { kdf: FAST_PBKDF2, keySlot: 3 });
  const l2 = mk(SIZE);
  const v2 = await Luks2Volume.format(l2, P('one'), LUKS2);
  await v2.addKey({ passphrase: P('one') }, P('two'), { kdf: FAST_PBKDF2, keySlot: 3 });
  for (const [base, run] of [
    [l1, convertLuks1ToLuks2],
    [l2, convertLuks2ToLuks1],
  ] as const) {
    let torn = 0;
    for (let n = 1; ; n++) {
      let finished = false;
      for (const mask of [1, 2]) {
        const img = await cloneDevice(base, mk, SIZE);
        const dev = tornAt(img, n, mask);
        try {
          await run(dev);
          finished = true;
        } catch (e) {
          if (!isCryptmapError(e, 'EFAULT_CRASH')) throw e;
        }
        if (dev.blocksOfTorn >= 2) torn++;
        assert.ok(
          await opensAll(img, ['one', 'two']),
          `${run.name}: write ${n} torn (sectors ${mask === 1 ? '0' : '1'} of ${dev.blocksOfTorn} written): the image does not open with every passphrase`,
        );
      }
      if (finished) break;
    }
    assert.ok(torn > 0, `${run.name}: no multi-sector write was torn`);
  }
});
