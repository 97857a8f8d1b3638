// The thin-pool and thin targets against thin-provisioning-tools 0.9 (Debian package
// thin-provisioning-tools), both ways: what cryptmap commits passes thin_check and thin_dump shows
// the mappings cryptmap made, pointing at the data blocks that hold the data; metadata made by
// thin_restore opens in cryptmap with the same mappings (multi-level btrees, shared data blocks);
// snapshots (thin_ls sees what is shared); the metadata snapshot (thin_dump -m); damaged metadata
// refused naming the check; a pool over NBD exports (the NBD client as <dev>).
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { test } from 'node:test';
import { testTempDir } from '../helpers/tmp.js';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import { DeviceRegistry } from '../../src/dm/registry.js';
import { NbdServer } from '../../src/nbd/server.js';
import { pattern } from './helpers.js';
import {
  BLOCK,
  MiB,
  assertThinCheck,
  parseDump,
  status,
  thinDump,
  thinRestore,
  thinRig,
  tool,
  withImage,
} from './thin-helpers.js';

const POOL = (dataBytes: number, extra = '') => `0 ${dataBytes / 512} thin-pool /mem/meta /mem/data 128 0${extra}`;

test('cryptmap writes metadata thin_check accepts; thin_dump shows the mappings and the data blocks hold the data', async () => {
  const { registry, meta, data } = thinRig({ dataBytes: 8 * MiB });
  await registry.create('pool', { table: POOL(8 * MiB) });
  await assertThinCheck(meta, 'a freshly formatted pool');
  await registry.message('pool', 0, ['create_thin', '0']);
  await registry.message('pool', 0, ['create_thin', '7']);
  await registry.message('pool', 0, ['set_transaction_id', '0', '42']);
  await registry.create('t0', { table: '0 65536 thin pool 0' });
  const h = registry.open('t0');
  const full = pattern(BLOCK, 1);
  const part = pattern(4096, 2);
  await h.write(3 * BLOCK, full);
  await h.write(10 * BLOCK + 8192, part);
  await h.flush();
  await assertThinCheck(meta, 'after provisioning');
  const dump = parseDump(await thinDump(meta));
  assert.equal(dump.superblock.transaction, '42');
  assert.equal(dump.superblock.data_block_size, '128');
  assert.equal(dump.superblock.nr_data_blocks, String((8 * MiB) / BLOCK));
  assert.deepEqual([...dump.devices.keys()].sort(), [0, 7]);
  const d0 = dump.devices.get(0)!;
  assert.deepEqual(
    [...d0.map.keys()].sort((a, b) => a - b),
    [3, 10],
  );
  assert.equal(d0.mappedBlocks, 2);
  const at = async (vb: number, off: number, n: number): Promise<Buffer> => {
    const b = Buffer.alloc(n);
    await data.read(d0.map.get(vb)![0] * BLOCK + off, b);
    return b;
  };
  assert.deepEqual(await at(3, 0, BLOCK), full);
  assert.deepEqual(await at(10, 8192, 4096), part);
  assert.ok(
    (await at(10, 0, 8192)).every((x) => x === 0),
    'the rest of a partially written new block is zeroed',
  );
  assert.equal(status(registry, 't0'), `0 65536 thin ${2 * 128} ${11 * 128 - 1}`);
  assert.match(
    status(registry, 'pool'),
    /^0 16384 thin-pool 42 [0-9]+\/256 2\/128 - rw discard_passdown queue_if_no_space - 64 $/,
  );
  await h.close();
  await registry.closeAll();
  await assertThinCheck(meta, 'after removing the devices');
});

test('metadata from thin_restore opens with the same mappings (multi-level btrees, shared blocks); cryptmap commits on top of it', async () => {
  const nrData = 4096;
  const lines: string[] = [
    `<superblock uuid="" time="3" transaction="9" flags="0" version="2" data_block_size="128" nr_data_blocks="${nrData}">`,
  ];
  // Device 1: 3000 single mappings (several btree leaves and an internal level), vblock 2i -> i.
  lines.push('<device dev_id="1" mapped_blocks="3000" transaction="2" creation_time="0" snap_time="2">');
  for (let i = 0; i < 3000; i++) lines.push(`<single_mapping origin_block="${2 * i}" data_block="${i}" time="1"/>`);
  lines.push('</device>');
  // Device 5: a snapshot of part of device 1 (shares data blocks 0..99), plus a range of its own.
  lines.push('<device dev_id="5" mapped_blocks="300" transaction="3" creation_time="2" snap_time="2">');
  for (let i = 0; i < 100; i++) lines.push(`<single_mapping origin_block="${2 * i}" data_block="${i}" time="1"/>`);
  lines.push('<range_mapping origin_begin="10000" data_begin="3000" length="200" time="2"/>');
  lines.push('</device>', '</superblock>');
  const meta = await thinRestore(`${lines.join('\n')}\n`, 4 * MiB);
  const data = new MemoryDevice({ sizeBytes: nrData * BLOCK });
  for (const b of [0, 1, 99, 2999, 3000, 3199]) await data.write(b * BLOCK, pattern(512, 1000 + b));
  const { registry } = thinRig({ meta, data });
  await registry.create('pool', { table: POOL(nrData * BLOCK) });
  assert.match(status(registry, 'pool'), /^0 [0-9]+ thin-pool 9 [0-9]+\/1024 3200\/4096 - rw /);
  await registry.create('t1', { table: '0 2000000 thin pool 1' });
  await registry.create('t5', { table: '0 2000000 thin pool 5' });
  assert.equal(status(registry, 't1'), `0 2000000 thin ${3000 * 128} ${5999 * 128 - 1}`);
  assert.equal(status(registry, 't5'), `0 2000000 thin ${300 * 128} ${10200 * 128 - 1}`);
  const h1 = registry.open('t1');
  const h5 = registry.open('t5');
  const rd = async (h: typeof h1, vb: number): Promise<Buffer> => {
    const b = Buffer.alloc(512);
    await h.read(vb * BLOCK, b);
    return b;
  };
  assert.deepEqual(await rd(h1, 0), pattern(512, 1000));
  assert.deepEqual(await rd(h1, 198), pattern(512, 1099));
  assert.deepEqual(await rd(h1, 5998), pattern(512, 3999));
  assert.deepEqual(await rd(h5, 10000), pattern(512, 4000));
  assert.deepEqual(await rd(h5, 10199), pattern(512, 4199));
  assert.ok(
    (await rd(h1, 1)).every((x) => x === 0),
    'an unmapped block reads as zeros',
  );
  // Device 5 was snapshotted at time 2 after its block 0 was mapped at time 1: writing breaks sharing.
  await h5.write(0, pattern(512, 7));
  await h1.write(BLOCK, pattern(512, 8));
  await h5.flush();
  assert.deepEqual(await rd(h5, 0), pattern(512, 7));
  assert.deepEqual(await rd(h1, 0), pattern(512, 1000), 'the other device keeps the shared block');
  await h1.close();
  await h5.close();
  await registry.closeAll();
  await assertThinCheck(meta, 'restored metadata after cryptmap commits');
  const dump = parseDump(await thinDump(meta));
  assert.equal(dump.superblock.transaction, '9');
  assert.equal(dump.devices.get(1)!.map.size, 3001);
  assert.notEqual(dump.devices.get(5)!.map.get(0)![0], 0, 'device 5 block 0 moved to a new data block');
  assert.equal(dump.devices.get(1)!.map.get(0)![0], 0);
  assert.equal(dump.devices.get(5)!.map.get(2)![0], 1, 'still shared');
});

test('snapshots: break on write keeps the snapshot image; delete frees its blocks; thin_check passes throughout', async () => {
  const { registry, meta } = thinRig({ dataBytes: 4 * MiB });
  await registry.create('pool', { table: POOL(4 * MiB) });
  await registry.message('pool', 0, ['create_thin', '0']);
  await registry.create('t0', { table: '0 8192 thin pool 0' });
  const h = registry.open('t0');
  const before = pattern(2 * BLOCK, 3);
  await h.write(0, before);
  await h.flush();
  await assert.rejects(
    registry.message('pool', 0, ['create_snap', '1', '0']),
    { code: 'EBUSY' },
    'the origin is active',
  );
  await registry.suspend('t0');
  await registry.message('pool', 0, ['create_snap', '1', '0']);
  await registry.resume('t0');
  await h.write(4096, pattern(4096, 9));
  await h.flush();
  await assertThinCheck(meta, 'after a snapshot and a break-on-write');
  await registry.create('s1', { table: '0 8192 thin pool 1' });
  const s = registry.open('s1');
  const snap = Buffer.alloc(2 * BLOCK);
  await s.read(0, snap);
  assert.deepEqual(snap, before, 'the snapshot keeps the old data');
  const now = Buffer.alloc(2 * BLOCK);
  await h.read(0, now);
  const expect = Buffer.from(before);
  pattern(4096, 9).copy(expect, 4096);
  assert.deepEqual(now, expect);
  assert.match(status(registry, 'pool'), / 3\/64 /, 'blocks 0 and 1 shared, one copy');
  // thin_ls agrees on what is shared (it reads the metadata cryptmap committed).
  await h.flush();
  const ls = await withImage(meta, (p) =>
    tool('thin_ls', ['-o', 'DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS', '--no-headers', p]),
  );
  assert.equal(ls.status, 0, ls.stderr);
  assert.deepEqual(
    ls.stdout
      .trim()
      .split('\n')
      .map((l) => l.trim().split(/\s+/).map(Number)),
    [
      [0, 2, 1, 1],
      [1, 2, 1, 1],
    ],
  );
  await assert.rejects(registry.message('pool', 0, ['delete', '1']), { code: 'EBUSY' }, 'the snapshot is open');
  await s.close();
  await registry.remove('s1');
  await registry.message('pool', 0, ['delete', '1']);
  assert.match(status(registry, 'pool'), / 2\/64 /);
  await assertThinCheck(meta, 'after deleting the snapshot');
  const dump = parseDump(await thinDump(meta));
  assert.deepEqual([...dump.devices.keys()], [0]);
  await h.close();
  await registry.closeAll();
});

test('reserve_metadata_snap keeps a metadata snapshot thin_dump -m reads; release drops it', async () => {
  const { registry, meta } = thinRig({ dataBytes: 4 * MiB });
  await registry.create('pool', { table: POOL(4 * MiB) });
  await registry.message('pool', 0, ['create_thin', '0']);
  await registry.message('pool', 0, ['create_thin', '1']);
  await registry.create('t0', { table: '0 8192 thin pool 0' });
  await registry.create('t1', { table: '0 8192 thin pool 1' });
  const h = registry.open('t0');
  const h1 = registry.open('t1');
  await h.write(0, pattern(4096, 1));
  await h1.write(0, pattern(4096, 1));
  await h.flush();
  await h1.close();
  // Device 1 does not change after this: its committed btree is shared by the snapshot and the current image.
  await registry.message('pool', 0, ['reserve_metadata_snap']);
  const held = /thin-pool 0 [0-9]+\/[0-9]+ [0-9]+\/[0-9]+ ([0-9]+) /.exec(status(registry, 'pool'));
  assert.ok(held, `a held root in ${status(registry, 'pool')}`);
  await h.write(5 * BLOCK, pattern(4096, 2));
  await h.flush();
  await assertThinCheck(meta, 'with a metadata snapshot');
  const snapDump = parseDump(await thinDump(meta, [`--metadata-snap=${held[1]}`]));
  assert.deepEqual(
    [...snapDump.devices.get(0)!.map.keys()],
    [0],
    'the metadata snapshot shows the mappings at reserve time',
  );
  const nowDump = parseDump(await thinDump(meta));
  assert.deepEqual([...nowDump.devices.get(0)!.map.keys()].sort(), [0, 5]);
  await assert.rejects(registry.message('pool', 0, ['reserve_metadata_snap']), { code: 'EBUSY' });
  await registry.message('pool', 0, ['release_metadata_snap']);
  assert.match(status(registry, 'pool'), / - rw /);
  await assertThinCheck(meta, 'after release_metadata_snap');
  await h.write(6 * BLOCK, pattern(4096, 3));
  await h.flush();
  await assertThinCheck(meta, 'after a commit without the metadata snapshot');
  assert.deepEqual(
    [
      ...parseDump(await thinDump(meta))
        .devices.get(1)!
        .map.keys(),
    ],
    [0],
  );
  await h.close();
  await registry.closeAll();
});

test('damaged metadata is refused naming the failed check, never opened', async () => {
  const { registry, meta } = thinRig({ dataBytes: 4 * MiB });
  await registry.create('pool', { table: POOL(4 * MiB) });
  await registry.message('pool', 0, ['create_thin', '0']);
  await registry.closeAll();
  // Flip a byte of the superblock: bad checksum.
  const sb = Buffer.alloc(4096);
  await meta.read(0, sb);
  const bad = Buffer.from(sb);
  bad[100] = bad[100]! ^ 0xff;
  await meta.write(0, bad);
  const r1 = thinRig({ meta, dataBytes: 4 * MiB });
  await assert.rejects(r1.registry.create('pool', { table: POOL(4 * MiB) }), (e: Error & { code?: string }) => {
    assert.equal(e.code, 'ETHINMETA');
    assert.match(
      e.message,
      /table line 1: thin-pool <metadata dev>: thin-pool metadata: bad checksum in superblock \(block 0\)/,
    );
    return true;
  });
  // Not thin metadata at all.
  await meta.write(0, Buffer.alloc(4096, 0x5a));
  await assert.rejects(thinRig({ meta }).registry.create('pool', { table: POOL(4 * MiB) }), /bad magic/);
  // A damaged btree node: the superblock is fine, the device details root is not.
  await meta.write(0, sb);
  const root = Number(sb.readBigUInt64LE(328));
  const node = Buffer.alloc(4096);
  await meta.read(root * 4096, node);
  node[200] = node[200]! ^ 1;
  await meta.write(root * 4096, node);
  await assert.rejects(
    thinRig({ meta }).registry.create('pool', { table: POOL(4 * MiB) }),
    new RegExp(`bad checksum in btree node \\(block ${root}\\)`),
  );
  // A data block size that differs from the metadata's.
  await meta.write(
    root * 4096,
    (() => {
      node[200] = node[200]! ^ 1;
      return node;
    })(),
  );
  await assert.rejects(
    thinRig({ meta }).registry.create('pool', { table: `0 8192 thin-pool /mem/meta /mem/data 256 0` }),
    /changing the data block size \(from 128 to 256\) is not supported/,
  );
});

test('thin over the NBD client: a pool whose metadata and data devices are NBD exports; thin_check accepts the served metadata', async (t) => {
  const dir = testTempDir(t, 'cryptmap-thin-nbd-');
  const meta = new MemoryDevice({ sizeBytes: MiB });
  const data = new MemoryDevice({ sizeBytes: 4 * MiB });
  const server = new NbdServer();
  server.addExport('meta', { device: meta, readOnly: false });
  server.addExport('data', { device: data, readOnly: false });
  const sock = join(dir, 'nbd.sock');
  await server.listenUnix(sock);
  const registry = new DeviceRegistry();
  try {
    await registry.create('pool', {
      table: `0 8192 thin-pool nbd+unix:///meta?socket=${sock} nbd+unix:///data?socket=${sock} 128 0`,
    });
    await registry.message('pool', 0, ['create_thin', '3']);
    await registry.create('t', { table: '0 8192 thin pool 3' });
    const t = registry.open('t');
    await t.write(BLOCK + 512, pattern(4096, 21));
    await t.flush();
    const back = Buffer.alloc(4096);
    await t.read(BLOCK + 512, back);
    assert.deepEqual(back, pattern(4096, 21));
    await t.close();
    await registry.closeAll();
    await assertThinCheck(meta, 'metadata written over NBD');
    const d = parseDump(await thinDump(meta)).devices.get(3)!;
    assert.deepEqual([...d.map.keys()], [1]);
    const raw = Buffer.alloc(4096);
    await data.read(d.map.get(1)![0] * BLOCK + 512, raw);
    assert.deepEqual(raw, pattern(4096, 21));
  } finally {
    await registry.closeAll().catch(() => {});
    await server.close();
  }
});
