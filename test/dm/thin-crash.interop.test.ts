// Crash safety of the thin-pool metadata: a scenario (provisioning, overwrites, a snapshot with
// break-on-write, a discard, a delete) runs with the metadata device behind a FaultDevice that
// "loses power" after N writes, for every N. After each crash thin_check (thin-provisioning-tools)
// accepts the metadata, the pool opens again with the devices of the last acknowledged commit, and
// every write acknowledged by a flush reads back (a later, unacknowledged write may show instead).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { BlockDevice } from '../../src/blockdev/types.js';
import { pattern } from './helpers.js';
import { BLOCK, MiB, assertThinCheck, memBytes, thinRig } from './thin-helpers.js';

const PAGE = 4096;
const DEV_BYTES = 16 * BLOCK;
const POOL = `0 ${(4 * MiB) / 512} thin-pool /mem/meta /mem/data 128 0`;

/** What each 4 KiB page of each thin device may read back: the acknowledged value or a pending one. */
class Model {
  acked = new Map<number, Buffer>();
  pending = new Map<number, Map<number, Buffer[]>>();
  ackedIds = new Set<number>();
  liveIds = new Set<number>();

  create(id: number, from?: number): void {
    this.liveIds.add(id);
    const base = from === undefined ? Buffer.alloc(DEV_BYTES) : Buffer.from(this.current(from));
    this.acked.set(id, base);
  }
  /** The latest content (what the device shows now). */
  current(id: number): Buffer {
    const b = Buffer.from(this.acked.get(id)!);
    for (const [page, vals] of this.pending.get(id) ?? []) vals[vals.length - 1]!.copy(b, page * PAGE);
    return b;
  }
  write(id: number, off: number, data: Buffer): void {
    let m = this.pending.get(id);
    if (m === undefined) this.pending.set(id, (m = new Map()));
    for (let p = 0; p < data.length; p += PAGE) {
      const page = (off + p) / PAGE;
      const list = m.get(page) ?? [];
      list.push(Buffer.from(data.subarray(p, p + PAGE)));
      m.set(page, list);
    }
  }
  delete(id: number): void {
    this.liveIds.delete(id);
  }
  /** A commit was acknowledged: pending values become the acknowledged ones. */
  ack(): void {
    for (const id of this.liveIds) this.acked.set(id, this.current(id));
    for (const id of [...this.acked.keys()]) if (!this.liveIds.has(id)) this.acked.delete(id);
    this.pending.clear();
    this.ackedIds = new Set(this.liveIds);
  }
  allowed(id: number, page: number): Buffer[] {
    const a = this.acked.get(id)!.subarray(page * PAGE, (page + 1) * PAGE);
    return [a, ...(this.pending.get(id)?.get(page) ?? [])];
  }
}

async function scenario(rig: ReturnType<typeof thinRig>, m: Model): Promise<void> {
  const { registry } = rig;
  await registry.create('pool', { table: POOL });
  m.ack();
  await registry.message('pool', 0, ['create_thin', '0']);
  m.create(0);
  m.ack();
  await registry.create('t0', { table: `0 ${DEV_BYTES / 512} thin pool 0` });
  const h = registry.open('t0');
  const w = async (dev: BlockDevice, id: number, off: number, data: Buffer): Promise<void> => {
    m.write(id, off, data);
    await dev.write(off, data);
  };
  try {
    for (let round = 0; round < 5; round++) {
      await w(h, 0, round * BLOCK, pattern(BLOCK, 10 + round)); // a whole new block
      await w(h, 0, (8 + round) * BLOCK + PAGE, pattern(PAGE, 20 + round)); // part of a new block
      await w(h, 0, 0, pattern(PAGE, 30 + round)); // overwrite (in place, or break sharing)
      await h.flush();
      m.ack();
      if (round === 1) {
        await registry.suspend('t0');
        m.create(1, 0);
        await registry.message('pool', 0, ['create_snap', '1', '0']);
        m.ack();
        await registry.resume('t0');
      }
      if (round === 2) {
        // Discard block 1: it may read as zeros or as before until acknowledged.
        m.write(0, BLOCK, Buffer.alloc(BLOCK));
        await h.discard(BLOCK, BLOCK);
        await h.flush();
        m.ack();
      }
      if (round === 3) {
        m.delete(1);
        await registry.message('pool', 0, ['delete', '1']);
        m.ack();
      }
    }
  } finally {
    await h.close().catch(() => {});
  }
}

test('a crash after any metadata write leaves metadata thin_check accepts and every flushed write readable', async () => {
  // A clean run counts the metadata writes.
  const clean = thinRig({ plan: {} });
  await scenario(clean, new Model());
  await clean.registry.closeAll();
  const total = clean.fault!.stats.writes;
  assert.ok(total > 20, `the scenario writes metadata (${total} writes)`);
  await assertThinCheck(clean.meta, 'after the clean run');

  let crashes = 0;
  for (let n = 0; n < total; n++) {
    const rig = thinRig({ plan: { crashAfterWrites: n } });
    const m = new Model();
    let crashed = false;
    try {
      await scenario(rig, m);
    } catch {
      crashed = true;
    }
    await rig.registry.closeAll().catch(() => {});
    if (!crashed) continue;
    crashes++;
    const image = await memBytes(rig.meta);
    if (image.subarray(0, 4096).every((x) => x === 0)) {
      // The crash came before the first superblock: no pool was ever committed.
      assert.equal(m.ackedIds.size, 0);
      continue;
    }
    await assertThinCheck(image, `the metadata after a crash at write ${n + 1}`);
    // Open the pool again over the same bytes: the acknowledged devices and data are there.
    const again = thinRig({ meta: rig.meta, data: rig.data });
    await again.registry.create('pool', { table: POOL });
    for (const id of m.ackedIds) {
      await again.registry.create(`t${id}`, { table: `0 ${DEV_BYTES / 512} thin pool ${id}` });
      const h = again.registry.open(`t${id}`);
      const got = Buffer.alloc(DEV_BYTES);
      await h.read(0, got);
      for (let page = 0; page < DEV_BYTES / PAGE; page++) {
        const have = got.subarray(page * PAGE, (page + 1) * PAGE);
        assert.ok(
          m.allowed(id, page).some((a) => a.equals(have)),
          `crash at write ${n + 1}: thin ${id} page ${page} holds neither the acknowledged data nor a later write`,
        );
      }
      await h.close();
    }
    // Device 1 exists exactly when the acknowledged state has it.
    const has1 = await again.registry.create('tx', { table: '0 8 thin pool 1' }).then(
      () => true,
      (e: Error) => {
        assert.match(e.message, /does not exist/);
        return false;
      },
    );
    assert.equal(has1, m.ackedIds.has(1), `crash at write ${n + 1}: thin device 1 ${has1 ? 'exists' : 'is missing'}`);
    await again.registry.closeAll();
  }
  assert.ok(crashes >= total - 2, `most write counts crash the scenario (${crashes} of ${total})`);
});
