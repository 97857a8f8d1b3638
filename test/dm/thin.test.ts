// The thin-pool and thin targets without the external tools: strict table grammar with errors
// naming line, target and argument, the kernel's canonical table and status forms, pool messages
// and their errors, zeroing, discard with passdown, out-of-data-space (error and queue), the
// low-water-mark event, a full metadata device turning the pool read-only, needs_check, stacks
// with crypt, and `cryptmap dm` (messages as one dmsetup string).
import assert from 'node:assert/strict';
import { Readable, Writable } from 'node:stream';
import { test } from 'node:test';
import { runDm } from '../../src/cli/commands/dm.js';
import type { CliIO } from '../../src/cli/types.js';
import { InProcessDmControl } from '../../src/dm/control.js';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import { ThinMetadata } from '../../src/dm/thin/metadata.js';
import {
  BITMAP_CSUM_XOR,
  BTREE_CSUM_XOR,
  INDEX_CSUM_XOR,
  SUPERBLOCK_CSUM_XOR,
  blockChecksum,
  sealBlock,
} from '../../src/dm/thin/persistent-data.js';
import { CryptmapError } from '../../src/util/errors.js';
import { pattern, prng, xtsKey } from './helpers.js';
import { BLOCK, MiB, status, table, thinRig } from './thin-helpers.js';

test('thin-pool and thin tables: strict parsing, errors name line, target and argument', async () => {
  const { registry } = thinRig({ dataBytes: 4 * MiB });
  const bad: [string, RegExp][] = [
    ['0 8192 thin-pool /mem/meta /mem/data 128', /table line 1: thin-pool <low water mark>: missing argument/],
    [
      '0 8192 thin-pool /mem/meta /mem/data 100 0',
      /thin-pool <data block size>: invalid block size 100 \(128 to 2097152 sectors, a multiple of 128\)/,
    ],
    ['0 8192 thin-pool /mem/meta /mem/data 4194304 0', /<data block size>: invalid block size/],
    ['0 8192 thin-pool /mem/meta /mem/data 128 x', /<low water mark>: 'x' is not an unsigned decimal number/],
    [
      '0 8192 thin-pool /mem/meta /mem/data 128 0 1 skip_block_zeroing ignore_discard',
      /<#feature args>: says 1 feature arguments but 2 follow/,
    ],
    ['0 8192 thin-pool /mem/meta /mem/data 128 0 1 no_such', /<feature>: unrecognised pool feature 'no_such'/],
    ['0 64 thin-pool /mem/meta /mem/data 128 0', /the target \(64 sectors\) is smaller than one data block/],
    ['0 16384 thin-pool /mem/meta /mem/data 128 0', /<data dev>: device \/mem\/data is too small/],
    ['0 8192 thin-pool /mem/meta /mem/nope 128 0', /thin-pool <data dev>: cannot open \/mem\/nope/],
  ];
  for (const [t, re] of bad) await assert.rejects(registry.create('p', { table: t }), re, t);
  await registry.create('pool', {
    table: '0 8192 thin-pool /mem/meta /mem/data 128 10 3 error_if_no_space skip_block_zeroing no_discard_passdown',
  });
  // The kernel's canonical form: features in its order, each followed by a space.
  assert.equal(
    table(registry, 'pool'),
    '0 8192 thin-pool /mem/meta /mem/data 128 10 3 skip_block_zeroing no_discard_passdown error_if_no_space ',
  );
  assert.match(
    status(registry, 'pool'),
    /^0 8192 thin-pool 0 [0-9]+\/256 0\/64 - rw no_discard_passdown error_if_no_space - 64 $/,
  );
  await registry.message('pool', 0, ['create_thin', '3']);
  const badThin: [string, RegExp][] = [
    [
      '0 100 thin pool',
      /table line 1: thin <dev id>: expected 'thin <pool dev> <dev id> \[<external origin dev>\]', got 1 arguments/,
    ],
    ['0 100 thin pool 16777216', /thin <dev id>: '16777216' is too large \(max 16777215\)/],
    ['0 100 thin pool 4', /thin <dev id>: couldn't open thin internal device: thin device 4 does not exist/],
    ['0 100 thin pool 3 pool', /thin <external origin dev>: error setting origin device: it is the pool device/],
    // The same device by another name: compared by identity, not by spelling.
    [
      '0 100 thin pool 3 /dev/mapper/pool',
      /thin <external origin dev>: error setting origin device: it is the pool device/,
    ],
    ['0 100 thin pool 3 253:0', /thin <external origin dev>: error setting origin device: it is the pool device/],
    [
      '0 100 thin /dev/mapper/pool 3 pool',
      /thin <external origin dev>: error setting origin device: it is the pool device/,
    ],
    ['0 100 thin pool 3 /mem/nope', /thin <external origin dev>: cannot open \/mem\/nope/],
    ['0 100 thin /mem/data 3', /thin <pool dev>: \/mem\/data is not an active thin-pool device/],
  ];
  for (const [t, re] of badThin) await assert.rejects(registry.create('t', { table: t }), re, t);
  await registry.suspend('pool');
  await assert.rejects(
    registry.create('t', { table: '0 100 thin pool 3' }),
    /unable to activate thin device while pool is suspended/,
  );
  await registry.resume('pool');
  await registry.create('t', { table: '0 100 thin pool 3' });
  assert.equal(table(registry, 't'), '0 100 thin pool 3');
  assert.equal(status(registry, 't'), '0 100 thin 0 -');
  // A round trip: the printed table builds the same device.
  await registry.load('t', table(registry, 't'));
  await registry.resume('t');
  assert.equal(table(registry, 't'), '0 100 thin pool 3');
  await registry.closeAll();
});

test('pool messages: the kernel verbs and their errors; commits after each', async () => {
  const { registry } = thinRig({ dataBytes: 4 * MiB });
  await registry.create('pool', { table: '0 8192 thin-pool /mem/meta /mem/data 128 0' });
  const msg = (...a: string[]) => registry.message('pool', 0, a);
  await assert.rejects(msg('frobnicate'), /unrecognised thin pool target message received: frobnicate/);
  await assert.rejects(msg('create_thin'), /wrong number of arguments for 'create_thin' message: 0 \(expected 1\)/);
  await assert.rejects(msg('create_thin', 'x'), /invalid device id: x/);
  await assert.rejects(msg('create_thin', '16777216'), /invalid device id: 16777216/);
  await msg('create_thin', '16777215');
  await assert.rejects(msg('create_thin', '16777215'), { code: 'EEXIST', errno: 'EEXIST' });
  await assert.rejects(msg('create_snap', '1', '2'), /origin thin device 2 does not exist/);
  await assert.rejects(msg('delete', '5'), /thin device 5 does not exist/);
  await assert.rejects(
    msg('set_transaction_id', '1', '2'),
    /mismatched transaction id: the pool's is 0, the message says 1/,
  );
  await msg('set_transaction_id', '0', '18446744073709551615');
  assert.match(status(registry, 'pool'), /^0 8192 thin-pool 18446744073709551615 /);
  await assert.rejects(msg('release_metadata_snap'), /no metadata snapshot is held/);
  await msg('delete', '16777215');
  await registry.closeAll();
  // Read-only pools refuse messages (EOPNOTSUPP).
  const r2 = thinRig({ meta: (await thinRigWithPool()).meta, dataBytes: 4 * MiB });
  await r2.registry.create('pool', { table: '0 8192 thin-pool /mem/meta /mem/data 128 0 1 read_only' });
  assert.match(status(r2.registry, 'pool'), / - ro discard_passdown queue_if_no_space - /);
  await assert.rejects(r2.registry.message('pool', 0, ['create_thin', '1']), { code: 'EOPNOTSUPP' });
  await r2.registry.closeAll();
});

async function thinRigWithPool() {
  const r = thinRig({ dataBytes: 4 * MiB });
  await r.registry.create('pool', { table: '0 8192 thin-pool /mem/meta /mem/data 128 0' });
  await r.registry.closeAll();
  return r;
}

test('zeroing of partially written new blocks, and skip_block_zeroing', async () => {
  for (const skip of [false, true]) {
    const { registry, data } = thinRig({ dataBytes: 4 * MiB });
    await data.write(0, Buffer.alloc(4 * MiB, 0xee));
    await registry.create('pool', {
      table: `0 8192 thin-pool /mem/meta /mem/data 128 0${skip ? ' 1 skip_block_zeroing' : ''}`,
    });
    await registry.message('pool', 0, ['create_thin', '0']);
    await registry.create('t', { table: '0 8192 thin pool 0' });
    const h = registry.open('t');
    await h.write(4096, pattern(4096, 1));
    const back = Buffer.alloc(BLOCK);
    await h.read(0, back);
    assert.deepEqual(back.subarray(4096, 8192), pattern(4096, 1));
    const rest = Buffer.concat([back.subarray(0, 4096), back.subarray(8192)]);
    assert.ok(
      rest.every((x) => x === (skip ? 0xee : 0)),
      skip ? 'stale data stays without zeroing' : 'the rest of the block is zeroed',
    );
    await h.close();
    await registry.closeAll();
  }
});

test('discard unmaps whole blocks and passes down after the commit; partial blocks stay; block status shows holes', async () => {
  const { registry, data } = thinRig({ dataBytes: 4 * MiB });
  await registry.create('pool', { table: '0 8192 thin-pool /mem/meta /mem/data 128 0' });
  await registry.message('pool', 0, ['create_thin', '0']);
  await registry.create('t', { table: '0 8192 thin pool 0' });
  const h = registry.open('t');
  await h.write(0, pattern(4 * BLOCK, 5));
  await h.flush();
  assert.equal(status(registry, 't'), `0 8192 thin ${4 * 128} ${4 * 128 - 1}`);
  assert.deepEqual(await h.blockStatus!(0, 8 * BLOCK), [
    { lengthBytes: 4 * BLOCK, hole: false, zero: false },
    { lengthBytes: 4 * BLOCK, hole: true, zero: true },
  ]);
  // From the middle of block 0 to the middle of block 3: blocks 1 and 2 go.
  await h.discard(BLOCK / 2, 3 * BLOCK);
  assert.equal(status(registry, 't'), `0 8192 thin ${2 * 128} ${4 * 128 - 1}`);
  assert.match(status(registry, 'pool'), / 2\/64 /);
  const b = Buffer.alloc(BLOCK);
  await h.read(BLOCK, b);
  assert.ok(b.every((x) => x === 0));
  await h.read(0, b);
  assert.deepEqual(b, pattern(4 * BLOCK, 5).subarray(0, BLOCK), 'a partially discarded block keeps its data');
  await h.flush();
  // Passed down: data blocks 1 and 2 were the second and third allocated.
  const raw = Buffer.alloc(2 * BLOCK);
  await data.read(BLOCK, raw);
  assert.ok(
    raw.every((x) => x === 0),
    'the freed data blocks were discarded on the data device',
  );
  // write-zeroes unmaps whole blocks too.
  await h.writeZeroes(0, BLOCK);
  assert.equal(status(registry, 't'), `0 8192 thin ${128} ${4 * 128 - 1}`);
  await h.close();
  await registry.closeAll();
});

test('out of data space: error_if_no_space fails at once; queue_if_no_space waits until the pool grows; low water mark raises an event', async () => {
  const { registry } = thinRig({ dataBytes: 8 * MiB });
  // 4 blocks of data, low water mark 1.
  await registry.create('pool', {
    table: `0 ${(4 * BLOCK) / 512} thin-pool /mem/meta /mem/data 128 1 1 error_if_no_space`,
  });
  await registry.message('pool', 0, ['create_thin', '0']);
  await registry.create('t', { table: '0 8192 thin pool 0' });
  const h = registry.open('t');
  const ev0 = registry.get('pool').eventNr;
  await h.write(0, pattern(3 * BLOCK, 1));
  assert.equal(registry.get('pool').eventNr, ev0 + 1, 'one event at the low water mark');
  await h.write(3 * BLOCK, pattern(BLOCK, 2));
  await assert.rejects(h.write(4 * BLOCK, pattern(4096, 3)), { code: 'ENOSPC', errno: 'ENOSPC' });
  assert.match(status(registry, 'pool'), / 4\/4 - out_of_data_space discard_passdown error_if_no_space /);
  assert.ok(registry.get('pool').eventNr >= ev0 + 2, 'an event when the pool ran out');
  // Freed blocks are reused after a commit (the pool commits by itself when only they are left).
  await h.discard(0, BLOCK);
  await h.write(4 * BLOCK, pattern(4096, 3));
  assert.match(status(registry, 'pool'), / 4\/4 - rw /);
  // Queue mode: the write waits; growing the pool lets it go on.
  await registry.load('pool', `0 ${(4 * BLOCK) / 512} thin-pool /mem/meta /mem/data 128 1 0`);
  await registry.resume('pool');
  let done = false;
  const w = h.write(5 * BLOCK, pattern(4096, 4)).then(() => {
    done = true;
  });
  for (let i = 0; i < 50; i++) await new Promise((r) => setImmediate(r));
  assert.equal(done, false, 'the write is queued');
  assert.match(status(registry, 'pool'), / out_of_data_space discard_passdown queue_if_no_space /);
  await registry.load('pool', `0 ${(8 * BLOCK) / 512} thin-pool /mem/meta /mem/data 128 1 0`);
  await registry.resume('pool');
  await w;
  assert.equal(done, true);
  assert.match(status(registry, 'pool'), / 5\/8 - rw /);
  const b = Buffer.alloc(4096);
  await h.read(5 * BLOCK, b);
  assert.deepEqual(b, pattern(4096, 4));
  await h.close();
  await registry.closeAll();
});

test('a full metadata device turns the pool read-only (the last commit stays); provisioned blocks stay writable', async () => {
  // 24 metadata blocks: room for two copies of a small image only.
  const { registry } = thinRig({ metaBytes: 24 * 4096, dataBytes: 4 * MiB });
  await registry.create('pool', { table: '0 8192 thin-pool /mem/meta /mem/data 128 0' });
  await registry.message('pool', 0, ['create_thin', '0']);
  await registry.create('t', { table: '0 8192 thin pool 0' });
  const h = registry.open('t');
  await h.write(0, pattern(4096, 1));
  await h.flush();
  let failed: unknown;
  for (let id = 1; id < 20 && failed === undefined; id++) {
    await registry.message('pool', 0, ['create_thin', String(id)]).catch((e: unknown) => {
      failed = e;
    });
  }
  assert.ok(failed, 'the metadata device filled up');
  assert.match(String(failed), /metadata device is full/);
  assert.match(status(registry, 'pool'), / - ro discard_passdown /);
  await h.write(0, pattern(4096, 2));
  await assert.rejects(h.write(BLOCK, pattern(4096, 3)), { errno: 'EIO' });
  const b = Buffer.alloc(4096);
  await h.read(0, b);
  assert.deepEqual(b, pattern(4096, 2));
  await h.close();
  await registry.closeAll();
});

test('stacks: crypt over a thin device, and a pool over crypt devices; messages as one dmsetup string', async () => {
  const { registry, data } = thinRig({ dataBytes: 4 * MiB });
  await registry.create('pool', { table: '0 8192 thin-pool /mem/meta /mem/data 128 0' });
  await registry.message('pool', 0, ['create_thin 0']);
  await registry.create('t', { table: '0 8192 thin pool 0' });
  await registry.create('c', { table: `0 8192 crypt aes-xts-plain64 ${xtsKey(3).toString('hex')} 0 t 0` });
  const c = registry.open('c');
  const plain = pattern(3 * BLOCK, 11);
  await c.write(BLOCK, plain);
  await c.flush();
  const back = Buffer.alloc(3 * BLOCK);
  await c.read(BLOCK, back);
  assert.deepEqual(back, plain);
  assert.equal(status(registry, 't'), `0 8192 thin ${3 * 128} ${4 * 128 - 1}`);
  const raw = Buffer.alloc(3 * BLOCK);
  await data.read(0, raw);
  assert.ok(!raw.equals(plain) && raw.some((x) => x !== 0), 'the pool holds ciphertext');
  await c.close();
  await registry.closeAll();

  // Thin over crypt: the pool's metadata and data devices are crypt mappings.
  const r2 = thinRig({ dataBytes: 4 * MiB });
  const key = xtsKey(4).toString('hex');
  const mkPool = async (fresh: boolean) => {
    await r2.registry.create('cm', { table: `0 2048 crypt aes-xts-plain64 ${key} 0 /mem/meta 0` });
    await r2.registry.create('cd', { table: `0 8192 crypt aes-xts-plain64 ${key} 0 /mem/data 0` });
    if (fresh) {
      // A blank device decrypts to noise: zero the superblock through the mapping first (as lvm does).
      const cm = r2.registry.open('cm');
      await cm.write(0, Buffer.alloc(4096));
      await cm.close();
    }
    await r2.registry.create('pool', { table: '0 8192 thin-pool cm cd 128 0' });
  };
  await mkPool(true);
  await r2.registry.message('pool', 0, ['create_thin', '5']);
  await r2.registry.create('t', { table: '0 8192 thin pool 5' });
  const t = r2.registry.open('t');
  await t.write(2 * BLOCK + 4096, pattern(8192, 12));
  await t.close();
  await r2.registry.closeAll();
  const sb = Buffer.alloc(512);
  await r2.meta.read(0, sb);
  assert.notEqual(sb.readUInt32LE(32), 27022010, 'the metadata is encrypted on the memory device');
  await mkPool(false);
  await r2.registry.create('t', { table: '0 8192 thin pool 5' });
  const t2 = r2.registry.open('t');
  const got = Buffer.alloc(8192);
  await t2.read(2 * BLOCK + 4096, got);
  assert.deepEqual(got, pattern(8192, 12), 'the pool reopens over the crypt devices with its data');
  await t2.close();
  await r2.registry.closeAll();
});

test('cryptmap dm: thin-pool tables, a message given as one dmsetup string, status lines', async () => {
  const { registry } = thinRig({ dataBytes: 4 * MiB });
  const control = new InProcessDmControl(registry);
  const dm = async (args: string[]) => {
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    const w = (to: Buffer[]) =>
      new Writable({
        write(c, _e, cb) {
          to.push(Buffer.from(c));
          cb();
        },
      });
    const io: CliIO = { stdin: Readable.from([]), stdout: w(out), stderr: w(err), env: {} };
    const code = await runDm(['dm', ...args], io, control);
    return { code, out: Buffer.concat(out).toString(), err: Buffer.concat(err).toString() };
  };
  assert.equal((await dm(['create', 'pool', '--table', '0 8192 thin-pool /mem/meta /mem/data 128 4'])).code, 0);
  assert.equal((await dm(['message', 'pool', '0', 'create_thin 1'])).code, 0);
  assert.equal((await dm(['message', 'pool', '0', 'set_transaction_id', '0', '1'])).code, 0);
  assert.equal((await dm(['create', 'thin1', '--table', '0 4096 thin pool 1'])).code, 0);
  assert.equal((await dm(['table', 'pool'])).out, '0 8192 thin-pool /mem/meta /mem/data 128 4 0 \n');
  assert.match(
    (await dm(['status', 'pool'])).out,
    /^0 8192 thin-pool 1 [0-9]+\/256 0\/64 - rw discard_passdown queue_if_no_space - 64 \n$/,
  );
  assert.equal((await dm(['status', 'thin1'])).out, '0 4096 thin 0 -\n');
  const bad = await dm(['message', 'pool', '0', 'create_thin 1']);
  assert.notEqual(bad.code, 0);
  assert.match(bad.err, /thin device 1 already exists/);
  await registry.closeAll();
});

test('metadata flagged needs_check opens read-only (status needs_check), as the kernel keeps it until repaired', async () => {
  const { registry, meta } = thinRig({ dataBytes: 4 * MiB });
  await registry.create('pool', { table: '0 8192 thin-pool /mem/meta /mem/data 128 0' });
  await registry.closeAll();
  const sb = Buffer.alloc(4096);
  await meta.read(0, sb);
  sb.writeUInt32LE(sb.readUInt32LE(4) | 1, 4);
  sealBlock(sb, 0, SUPERBLOCK_CSUM_XOR);
  await meta.write(0, sb);
  const r2 = thinRig({ meta, dataBytes: 4 * MiB });
  await r2.registry.create('pool', { table: '0 8192 thin-pool /mem/meta /mem/data 128 0' });
  assert.match(status(r2.registry, 'pool'), / - ro discard_passdown queue_if_no_space needs_check 64 $/);
  await assert.rejects(r2.registry.message('pool', 0, ['create_thin', '1']), { code: 'EOPNOTSUPP' });
  // A reload cannot move the pool to another metadata device.
  await assert.rejects(
    r2.registry.load('pool', '0 8192 thin-pool /mem/data /mem/data 128 0'),
    /a reload cannot switch it to \/mem\/data/,
  );
  await r2.registry.closeAll();
});

test('metadata fuzz: blocks mutated and re-sealed (valid checksums) are opened or refused with a thin-pool metadata error, never a crash or a hang', async () => {
  const { registry, meta } = thinRig({ metaBytes: 256 * 1024, dataBytes: 4 * MiB });
  await registry.create('pool', { table: '0 8192 thin-pool /mem/meta /mem/data 128 0' });
  for (const id of ['0', '1']) await registry.message('pool', 0, ['create_thin', id]);
  await registry.create('t0', { table: '0 8192 thin pool 0' });
  const h = registry.open('t0');
  for (let b = 0; b < 40; b += 3) await h.write(b * BLOCK, pattern(4096, b));
  await h.close();
  await registry.suspend('t0');
  await registry.message('pool', 0, ['create_snap', '2', '0']);
  await registry.closeAll();
  const image = Buffer.alloc(meta.sizeBytes);
  await meta.read(0, image);
  // Which blocks hold a structure, and its checksum constant.
  const XORS = [BTREE_CSUM_XOR, BITMAP_CSUM_XOR, INDEX_CSUM_XOR, SUPERBLOCK_CSUM_XOR];
  const blocks: [number, number][] = [];
  for (let b = 0; b < image.length / 4096; b++) {
    const blk = image.subarray(b * 4096, (b + 1) * 4096);
    const x = XORS.find((x) => blk.readUInt32LE(0) === blockChecksum(blk, x));
    if (x !== undefined && blk.some((v) => v !== 0)) blocks.push([b, x]);
  }
  assert.ok(blocks.length >= 8, `structures found: ${blocks.length}`);
  const rnd = prng(99);
  let refused = 0;
  for (let i = 0; i < 300; i++) {
    const img = Buffer.from(image);
    const [b, x] = blocks[rnd() % blocks.length]!;
    const blk = img.subarray(b * 4096, (b + 1) * 4096);
    const n = 1 + (rnd() % 4);
    for (let k = 0; k < n; k++) {
      // Mostly the header and the first entries, where the structure lives.
      const at = 4 + (rnd() % (rnd() % 2 ? 400 : 4092));
      blk[at] = rnd() & 0xff;
    }
    sealBlock(blk, b, x);
    const dev = new MemoryDevice({ sizeBytes: img.length });
    await dev.write(0, img);
    try {
      await ThinMetadata.open(dev, 128, 64);
    } catch (e) {
      assert.ok(e instanceof CryptmapError, `mutation ${i} of block ${b}: ${String(e)}`);
      refused++;
    }
  }
  assert.ok(refused > 10, `mutations are refused (${refused} of 300)`);
});

test('one pool per metadata device: a second pool on it is refused (EBUSY)', async () => {
  const { registry } = thinRig({ dataBytes: 8 * MiB });
  await registry.create('p1', { table: '0 8192 thin-pool /mem/meta /mem/data 128 0' });
  await assert.rejects(
    registry.create('p2', { table: '0 8192 thin-pool /mem/meta /mem/data 128 0' }),
    (e: Error & { code?: string }) => {
      assert.equal(e.code, 'EBUSY');
      assert.match(e.message, /thin-pool <metadata dev>: \/mem\/meta is already in use by another thin pool/);
      return true;
    },
  );
  await registry.remove('p1');
  await registry.create('p2', { table: '0 8192 thin-pool /mem/meta /mem/data 128 0' });
  await registry.closeAll();
  // The metadata device is compared by identity: a reload may name it another way, not switch it.
  const r2 = thinRig({ dataBytes: 8 * MiB });
  await r2.registry.create('m', { table: `0 ${MiB / 512} linear /mem/meta 0` });
  await r2.registry.create('p', { table: '0 8192 thin-pool m /mem/data 128 0' });
  await r2.registry.load('p', '0 8192 thin-pool /dev/mapper/m /mem/data 128 0');
  await r2.registry.resume('p');
  await r2.registry.create('m2', { table: `0 ${MiB / 512} linear /mem/meta 0` });
  await assert.rejects(r2.registry.load('p', '0 8192 thin-pool m2 /mem/data 128 0'), /a reload cannot switch it to m2/);
  await r2.registry.closeAll();
});

test('external origin: unprovisioned blocks read from it (zeros past its end), the first write copies its block, discard shows it again, write-zeroes gives zeros; it is never written', async () => {
  // The origin ends in the middle of block 3.
  const originBytes = 3 * BLOCK + BLOCK / 2;
  const origin = new MemoryDevice({ sizeBytes: originBytes });
  const o = pattern(originBytes, 7);
  await origin.write(0, o);
  const { registry, readOnlyOpens } = thinRig({ dataBytes: 4 * MiB, more: { origin } });
  await registry.create('pool', { table: '0 8192 thin-pool /mem/meta /mem/data 128 0' });
  await registry.message('pool', 0, ['create_thin', '0']);
  const len = (8 * BLOCK) / 512;
  await registry.create('t', { table: `0 ${len} thin pool 0 /mem/origin` });
  assert.equal(table(registry, 't'), `0 ${len} thin pool 0 /mem/origin`);
  assert.deepEqual([...readOnlyOpens], ['/mem/origin'], 'the origin is opened read-only, as the kernel opens it');
  const h = registry.open('t');
  const expect = Buffer.alloc(8 * BLOCK);
  o.copy(expect);
  const all = Buffer.alloc(8 * BLOCK);
  const check = async (what: string): Promise<void> => {
    await h.read(0, all);
    assert.ok(all.equals(expect), what);
  };
  await check('unprovisioned blocks read from the origin, zeros past its end');
  // Partial writes: block 1 (inside the origin) and block 3 (across its end); a whole block 5.
  await h.write(BLOCK + 4096, pattern(4096, 8));
  pattern(4096, 8).copy(expect, BLOCK + 4096);
  await h.write(3 * BLOCK + 512, pattern(512, 9));
  pattern(512, 9).copy(expect, 3 * BLOCK + 512);
  await h.write(5 * BLOCK, pattern(BLOCK, 10));
  pattern(BLOCK, 10).copy(expect, 5 * BLOCK);
  await check('partial writes keep the origin data around them');
  assert.equal(status(registry, 't'), `0 ${len} thin ${3 * 128} ${6 * 128 - 1}`);
  assert.deepEqual(await h.blockStatus!(0, 8 * BLOCK), [
    { lengthBytes: 4 * BLOCK, hole: false, zero: false },
    { lengthBytes: BLOCK, hole: true, zero: true },
    { lengthBytes: BLOCK, hole: false, zero: false },
    { lengthBytes: 2 * BLOCK, hole: true, zero: true },
  ]);
  // Discard of block 1 shows the origin again (as the kernel's); write-zeroes of block 2 stays zeros.
  await h.discard(BLOCK, BLOCK);
  o.copy(expect, BLOCK, BLOCK, 2 * BLOCK);
  await h.writeZeroes(2 * BLOCK, BLOCK);
  expect.fill(0, 2 * BLOCK, 3 * BLOCK);
  await check('discard shows the origin, write-zeroes writes zeros');
  await h.flush();
  const back = Buffer.alloc(originBytes);
  await origin.read(0, back);
  assert.ok(back.equals(o), 'the origin is never written');
  await h.close();
  await registry.closeAll();
});
