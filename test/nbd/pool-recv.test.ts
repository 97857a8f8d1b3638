/**
 * Unit tests for the receive queue (views vs copies, skip, close, backpressure) and the buffer pool.
 */
import assert from 'node:assert/strict';
import { PassThrough } from 'node:stream';
import { describe, test } from 'node:test';
import { BufferPool } from '../../src/nbd/pool.js';
import { ConnectionClosed, RecvQueue } from '../../src/nbd-wire/recv.js';

describe('RecvQueue', () => {
  test('a message inside one chunk is a view; one spanning chunks is a copy from alloc', async () => {
    const q = new RecvQueue(1 << 20);
    const a = Buffer.from([1, 2, 3, 4, 5, 6]);
    q.push(a);
    const v = q.tryRead(4)!;
    assert.equal(v.buffer, a.buffer);
    assert.deepEqual([...v], [1, 2, 3, 4]);
    q.push(Buffer.from([7, 8, 9]));
    let allocated = 0;
    const c = await q.read(4, (n) => {
      allocated = n;
      return Buffer.alloc(n);
    });
    assert.equal(allocated, 4);
    assert.deepEqual([...c], [5, 6, 7, 8]);
    assert.equal(q.queuedBytes, 1);
  });

  test('read waits for data; skip discards across chunks; close rejects waiting readers', async () => {
    const q = new RecvQueue(1 << 20);
    const p = q.read(5);
    q.push(Buffer.from('ab'));
    q.push(Buffer.from('cdefgh'));
    assert.equal((await p).toString(), 'abcde');
    const s = q.skip(6);
    q.push(Buffer.from('ijklmn'));
    await s;
    assert.equal(q.tryRead(3)!.toString(), 'lmn');
    const pending = q.read(10);
    q.close();
    await assert.rejects(pending, ConnectionClosed);
    await assert.rejects(q.read(1), ConnectionClosed);
  });

  test('pauses the source above the high-water mark unless a reader needs more', async () => {
    const src = new PassThrough();
    const q = new RecvQueue(8);
    q.attach(src);
    src.write(Buffer.alloc(16, 1));
    await new Promise((r) => setImmediate(r));
    assert.equal(src.isPaused(), true);
    q.tryRead(12);
    assert.equal(src.isPaused(), false);
    const big = q.read(44);
    src.write(Buffer.alloc(40, 2));
    assert.equal((await big).length, 44);
    const rest = q.detach();
    assert.equal(rest, null);
  });
});

describe('BufferPool', () => {
  test('reuses released buffers of the same class, never small or foreign ones', () => {
    const pool = new BufferPool(1 << 20);
    const a = pool.acquire(256 * 1024 + 28);
    assert.equal(a.length, 256 * 1024 + 28);
    pool.release(a);
    pool.release(a); // a second release is ignored
    const b = pool.acquire(256 * 1024 + 16);
    assert.equal(b.buffer, a.buffer);
    const c = pool.acquire(256 * 1024);
    assert.notEqual(c.buffer, a.buffer);
    pool.release(Buffer.alloc(256 * 1024 + 64)); // not from the pool
    assert.equal(pool.idleBytes, 0);
    const small = pool.acquire(100);
    pool.release(small);
    assert.equal(pool.idleBytes, 0);
  });

  test('idle bytes are capped', () => {
    const pool = new BufferPool(300 * 1024);
    const bufs = [pool.acquire(200 * 1024), pool.acquire(200 * 1024)];
    for (const b of bufs) pool.release(b);
    assert.ok(pool.idleBytes <= 300 * 1024);
    assert.equal(new BufferPool(0).acquire(1 << 20).length, 1 << 20);
  });
});
