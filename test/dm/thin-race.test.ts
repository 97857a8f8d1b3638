// Races between a discard (or a pool suspend) and I/O in flight on the thin pool's data device, provoked
// deterministically: a data device whose next write (or discard) is held at a gate until the test
// releases it. A freed data block must not be reused, nor discarded, while I/O that found it
// mapped is still in flight, and a reused block must not be discarded after its new data landed.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { within } from '../helpers/wait.js';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import { poolOf } from '../../src/dm/targets/thin-pool.js';
import { pattern } from './helpers.js';
import { BLOCK, memBytes, status, thinRig } from './thin-helpers.js';

/** A memory device that holds the next read, write or discard (once armed) until release(). */
class GatedMemory extends MemoryDevice {
  #armed: 'read' | 'write' | 'discard' | undefined;
  #release: (() => void) | undefined;
  #entered: (() => void) | undefined;

  /** Hold the next `op`; resolves when it arrived and waits. */
  arm(op: 'read' | 'write' | 'discard'): Promise<void> {
    this.#armed = op;
    return new Promise((resolve) => {
      this.#entered = resolve;
    });
  }

  release(): void {
    const r = this.#release;
    this.#release = undefined;
    r?.();
  }

  async #gate(op: 'read' | 'write' | 'discard'): Promise<void> {
    if (this.#armed !== op) return;
    this.#armed = undefined;
    const open = new Promise<void>((resolve) => {
      this.#release = resolve;
    });
    this.#entered?.();
    await open;
  }

  override async read(o: number, b: Uint8Array): Promise<void> {
    await this.#gate('read');
    return super.read(o, b);
  }

  override async write(o: number, b: Uint8Array): Promise<void> {
    await this.#gate('write');
    return super.write(o, b);
  }

  override async discard(o: number, n: number): Promise<void> {
    await this.#gate('discard');
    return super.discard(o, n);
  }
}

/** Whether `p` is still pending after the event loop turned `turns` times (it never settles by itself here). */
async function pendingAfterTurns(p: Promise<unknown>, turns = 50): Promise<boolean> {
  let settled = false;
  p.then(
    () => (settled = true),
    () => (settled = true),
  );
  for (let i = 0; i < turns && !settled; i++) await new Promise((r) => setImmediate(r));
  return !settled;
}

async function onePool(data: GatedMemory, blocks: number) {
  const rig = thinRig({ data });
  await rig.registry.create('pool', { table: `0 ${(blocks * BLOCK) / 512} thin-pool /mem/meta /mem/data 128 0` });
  await rig.registry.message('pool', 0, ['create_thin', '0']);
  await rig.registry.create('t', { table: `0 ${(8 * BLOCK) / 512} thin pool 0` });
  return { ...rig, h: rig.registry.open('t') };
}

test('discard during a write in flight to the block: the block is freed only after the write landed, so its reuse keeps its data', async () => {
  // One data block: whatever is written next after the discard reuses it.
  const data = new GatedMemory({ sizeBytes: BLOCK });
  const { registry, h } = await onePool(data, 1);
  await h.write(0, pattern(BLOCK, 1));
  await h.flush();
  // A write to the mapped block goes straight to the data device; hold it there.
  const entered = data.arm('write');
  const inFlight = h.write(0, pattern(4096, 2));
  await within(entered, 20_000, 'the held data-device call');
  const discard = h.discard(0, BLOCK);
  // The next write needs a block: only the discarded one can be had (after a commit).
  const reuse = h.write(BLOCK, pattern(BLOCK, 3));
  assert.equal(await pendingAfterTurns(discard), true, 'the discard waits for the write in flight to its block');
  assert.equal(await pendingAfterTurns(reuse), true, 'the freed block is not reused while a write to it is in flight');
  data.release();
  await within(Promise.all([inFlight, discard, reuse]), 20_000, 'the write, discard and reuse');
  const back = Buffer.alloc(BLOCK);
  await h.read(BLOCK, back);
  assert.deepEqual(
    back,
    pattern(BLOCK, 3),
    'the block reused by another virtual block holds its own data, not the late write',
  );
  await h.read(0, back);
  assert.ok(
    back.every((x) => x === 0),
    'the discarded block reads as zeros',
  );
  await h.flush();
  assert.equal(status(registry, 't'), `0 ${(8 * BLOCK) / 512} thin 128 255`);
  await h.close();
  await registry.closeAll();
});

test("discard during a read in flight: the block is not reused before the read is done (another device's data never shows in it)", async () => {
  const data = new GatedMemory({ sizeBytes: BLOCK });
  const { registry, h } = await onePool(data, 1);
  await h.write(0, pattern(BLOCK, 1));
  await h.flush();
  const entered = data.arm('read');
  const read = Buffer.alloc(4096);
  const reading = h.read(0, read);
  await within(entered, 20_000, 'the held data-device call');
  const discard = h.discard(0, BLOCK);
  const reuse = h.write(BLOCK, pattern(BLOCK, 3));
  assert.equal(await pendingAfterTurns(reuse), true, 'the freed block is not reused while a read of it is in flight');
  data.release();
  await within(Promise.all([reading, discard, reuse]), 20_000, 'the read, discard and reuse');
  assert.deepEqual(read, pattern(BLOCK, 1).subarray(0, 4096), 'the read returns the data mapped when it was issued');
  await h.close();
  await registry.closeAll();
});

test('passdown: a block being discarded on the data device after the commit is not reused until the discard is done', async () => {
  const data = new GatedMemory({ sizeBytes: 2 * BLOCK });
  const { registry, h } = await onePool(data, 2);
  await h.write(0, pattern(2 * BLOCK, 1));
  await h.discard(0, BLOCK);
  // The commit frees data block 0 and passes the discard down: hold that discard.
  const entered = data.arm('discard');
  const flushing = h.flush();
  await within(entered, 20_000, 'the held data-device call');
  const reuse = h.write(2 * BLOCK, pattern(BLOCK, 3));
  assert.equal(await pendingAfterTurns(reuse), true, 'allocation waits for the passdown discard');
  data.release();
  await within(Promise.all([flushing, reuse]), 20_000, 'the flush and the reuse');
  const back = Buffer.alloc(BLOCK);
  await h.read(2 * BLOCK, back);
  assert.deepEqual(back, pattern(BLOCK, 3), 'the late discard did not erase the reused block');
  await h.close();
  await registry.closeAll();
});

test('pool suspend: thin I/O waits until the pool resumes (reads, writes, discards, flushes), in-flight I/O drains first, and the metadata stays as committed meanwhile', async () => {
  const data = new GatedMemory({ sizeBytes: 4 * BLOCK });
  const { registry, h, meta } = await onePool(data, 4);
  await h.write(0, pattern(BLOCK, 1));
  await h.flush();
  // A write in flight on the data device: the suspend waits for it.
  const entered = data.arm('write');
  const inFlight = h.write(0, pattern(4096, 2));
  await within(entered, 20_000, 'the held data-device write');
  const suspending = registry.suspend('pool');
  assert.equal(await pendingAfterTurns(suspending), true, 'the pool suspend waits for the thin write in flight');
  data.release();
  await within(Promise.all([inFlight, suspending]), 20_000, 'the write and the suspend');
  const metaBefore = await memBytes(meta);
  const back = Buffer.alloc(4096);
  const ops = [h.write(BLOCK, pattern(BLOCK, 3)), h.read(0, back), h.discard(2 * BLOCK, BLOCK), h.flush()];
  for (const [i, op] of ops.entries())
    assert.equal(await pendingAfterTurns(op), true, `thin operation ${i} waits while the pool is suspended`);
  assert.deepEqual(await memBytes(meta), metaBefore, 'no metadata write while the pool is suspended');
  await registry.resume('pool');
  await within(Promise.all(ops), 20_000, 'the thin I/O after the resume');
  assert.deepEqual(back, pattern(4096, 2));
  await h.read(BLOCK, back);
  assert.deepEqual(back, pattern(BLOCK, 3).subarray(0, 4096));
  await h.close();
  await registry.closeAll();
});

test('pool suspend does not wait for a write queued out of data space; the write goes on after resume and growth', async () => {
  const data = new GatedMemory({ sizeBytes: 2 * BLOCK });
  const { registry, h } = await onePool(data, 1);
  await h.write(0, pattern(BLOCK, 1));
  // No block left: the write waits for space (queue_if_no_space).
  const queued = h.write(BLOCK, pattern(BLOCK, 2));
  assert.equal(await pendingAfterTurns(queued), true, 'the write is queued');
  await within(registry.suspend('pool'), 20_000, 'the suspend with a write queued for space');
  // Grow the pool: the reload's resume wakes the queued write.
  await registry.load('pool', `0 ${(2 * BLOCK) / 512} thin-pool /mem/meta /mem/data 128 0`);
  await registry.resume('pool');
  await within(queued, 20_000, 'the queued write after the pool grew');
  const back = Buffer.alloc(BLOCK);
  await h.read(BLOCK, back);
  assert.deepEqual(back, pattern(BLOCK, 2));
  await h.close();
  await registry.closeAll();
});

test('pool suspend drain: every waiter is released when the thin I/O in flight ends, and a resume releases them too', async () => {
  const data = new GatedMemory({ sizeBytes: 4 * BLOCK });
  const { registry, h } = await onePool(data, 4);
  const pool = poolOf(registry.get('pool'))!;
  await h.write(0, pattern(BLOCK, 1));
  let entered = data.arm('write');
  let inFlight = h.write(0, pattern(4096, 2));
  await within(entered, 20_000, 'the held data-device write');
  // Two suspends of the pool wait for the same write (the drain used to keep one waiter only).
  const a = pool.holdThinIo();
  const b = pool.holdThinIo();
  assert.equal(await pendingAfterTurns(a), true, 'the first waiter waits for the write in flight');
  data.release();
  assert.deepEqual(await within(Promise.all([a, b, inFlight]), 20_000, 'both drain waiters'), [true, true, undefined]);
  // A waiter is also let go when the hold ends (resume, or the pool going away), not left behind.
  pool.releaseThinIo();
  entered = data.arm('write');
  inFlight = h.write(0, pattern(4096, 3));
  await within(entered, 20_000, 'the second held write');
  const c = pool.holdThinIo();
  assert.equal(await pendingAfterTurns(c), true, 'the waiter waits for the write in flight');
  await registry.resume('pool');
  assert.equal(await within(c, 20_000, 'the waiter after the resume'), false, 'released by the resume, not drained');
  data.release();
  await within(inFlight, 20_000, 'the write');
  await h.close();
  await registry.closeAll();
});

test('pool suspend drain has a deadline: thin I/O stuck on the data device does not hold the suspend forever', async () => {
  const data = new GatedMemory({ sizeBytes: 4 * BLOCK });
  const { registry, h } = await onePool(data, 4);
  const pool = poolOf(registry.get('pool'))!;
  await h.write(0, pattern(BLOCK, 1));
  const entered = data.arm('write');
  const stuck = h.write(0, pattern(4096, 2));
  await within(entered, 20_000, 'the held data-device write');
  assert.equal(
    await within(pool.holdThinIo(50), 20_000, 'a drain with a 50 ms deadline'),
    false,
    'the deadline passed',
  );
  assert.equal(pool.suspended, true, 'new thin I/O is still held');
  pool.releaseThinIo();
  data.release();
  await within(stuck, 20_000, 'the write');
  await h.close();
  await registry.closeAll();
});
