// The NBD client block device (src/blockdev/nbd-client/) against cryptmap's own NBD server:
// capability mapping, ranges, many requests in flight, request splitting, FLUSH ordering, and the
// fault paths. Faults come from a proxy between client and server that can cut every connection
// and stop accepting, and from a device with a volatile write cache that a "crash" empties (what a
// storage server killed -9 loses): acknowledged unflushed writes must be replayed, not lost.
import assert from 'node:assert/strict';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { test } from 'node:test';
import { fileTempDir } from '../helpers/tmp.js';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import { NbdDevice } from '../../src/blockdev/nbd-client/device.js';
import type {
  BlockDevice,
  BlockDeviceCapabilities,
  BlockDeviceLimits,
  Extent,
  WriteFlags,
  WriteZeroesFlags,
} from '../../src/blockdev/types.js';
import { NbdServer } from '../../src/nbd/server.js';
import { isCryptmapError } from '../../src/util/errors.js';

const dir = fileTempDir('cryptmap-nbdc-');
let seq = 0;
const sockPath = (what: string) => join(dir, `${what}-${seq++}.sock`);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A device whose writes sit in a volatile cache until flush() (or a FUA write); crash() loses them. */
class VolatileDevice implements BlockDevice {
  readonly disk: MemoryDevice;
  readonly sizeBytes: number;
  readonly capabilities: BlockDeviceCapabilities = {
    write: true,
    flush: true,
    fua: true,
    discard: false,
    writeZeroes: false,
    blockStatus: false,
    multiConn: true,
  };
  readonly limits: BlockDeviceLimits;
  cache: { at: number; data: Buffer }[] = [];
  delayMs = 0;
  writesInProgress = 0;
  flushes: { writesInProgress: number }[] = [];

  constructor(sizeBytes: number) {
    this.disk = new MemoryDevice({ sizeBytes });
    this.sizeBytes = sizeBytes;
    this.limits = this.disk.limits;
  }
  async read(at: number, buf: Uint8Array): Promise<void> {
    if (this.delayMs) await sleep(this.delayMs);
    await this.disk.read(at, buf);
    for (const w of this.cache) {
      const s = Math.max(at, w.at);
      const e = Math.min(at + buf.length, w.at + w.data.length);
      if (s < e) buf.set(w.data.subarray(s - w.at, e - w.at), s - at);
    }
  }
  async write(at: number, data: Uint8Array, flags?: WriteFlags): Promise<void> {
    this.writesInProgress++;
    try {
      if (this.delayMs) await sleep(this.delayMs);
      this.cache.push({ at, data: Buffer.from(data) });
      if (flags?.fua) await this.#commit();
    } finally {
      this.writesInProgress--;
    }
  }
  async #commit(): Promise<void> {
    for (const w of this.cache) await this.disk.write(w.at, w.data);
    this.cache = [];
  }
  async flush(): Promise<void> {
    this.flushes.push({ writesInProgress: this.writesInProgress });
    await this.#commit();
  }
  crash(): void {
    this.cache = [];
  }
  async discard(): Promise<void> {}
  async writeZeroes(at: number, n: number, _f?: WriteZeroesFlags): Promise<void> {
    await this.write(at, Buffer.alloc(n));
  }
  async blockStatus(): Promise<Extent[]> {
    return [];
  }
  async close(): Promise<void> {}
}

/** A Unix-socket proxy in front of the server: cut() drops every connection, stop() refuses new ones. */
class CutProxy {
  readonly path = sockPath('proxy');
  readonly #target: string;
  #server: Server | null = null;
  readonly #pairs = new Set<[Socket, Socket]>();
  constructor(target: string) {
    this.#target = target;
  }
  async start(): Promise<void> {
    const s = createServer((a) => {
      const b = connect(this.#target);
      const pair: [Socket, Socket] = [a, b];
      this.#pairs.add(pair);
      const end = () => {
        a.destroy();
        b.destroy();
        this.#pairs.delete(pair);
      };
      a.on('error', end).on('close', end);
      b.on('error', end).on('close', end);
      a.pipe(b);
      b.pipe(a);
    });
    await new Promise<void>((r) => s.listen(this.path, r));
    this.#server = s;
  }
  cut(): void {
    for (const [a, b] of this.#pairs) {
      a.destroy();
      b.destroy();
    }
    this.#pairs.clear();
  }
  async stop(): Promise<void> {
    const s = this.#server;
    this.#server = null;
    const closed = s ? new Promise((r) => s.close(r)) : null;
    this.cut();
    await closed;
  }
}

async function serve(
  device: BlockDevice,
  opts: { readOnly?: boolean } = {},
): Promise<{ server: NbdServer; sock: string; uri: string }> {
  const server = new NbdServer();
  server.addExport('disk', { device, readOnly: opts.readOnly ?? false });
  const sock = sockPath('srv');
  await server.listenUnix(sock);
  return { server, sock, uri: `nbd+unix:///disk?socket=${sock}` };
}

function pattern(n: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i++) b[i] = (i * 31 + seed * 7 + (i >> 9)) & 0xff;
  return b;
}

test('capabilities, limits and the data path against cryptmap’s server', async () => {
  const mem = new MemoryDevice({ sizeBytes: 64 << 20 });
  const s = await serve(mem);
  const dev = await NbdDevice.open(s.uri);
  try {
    assert.equal(dev.sizeBytes, 64 << 20);
    assert.deepEqual(dev.capabilities, {
      write: true,
      flush: true,
      fua: true,
      discard: true,
      writeZeroes: true,
      blockStatus: true,
      multiConn: true,
    });
    assert.equal(dev.limits.logicalBlockBytes, 512);
    assert.equal(dev.limits.maxRequestBytes, 32 << 20);
    assert.deepEqual(dev.health, { uri: s.uri, state: 'ready', connections: 2, reconnects: 0 });
    const a = pattern(1 << 20, 1);
    await dev.write(4096, a);
    await dev.write(8 << 20, a, { fua: true });
    await dev.flush();
    const back = Buffer.alloc(1 << 20);
    await dev.read(4096, back);
    assert.ok(back.equals(a));
    const onServer = Buffer.alloc(1 << 20);
    await mem.read(8 << 20, onServer);
    assert.ok(onServer.equals(a));
    // A read larger than the maximum payload is split; holes come back as zeros.
    const big = Buffer.alloc(40 << 20, 0xee);
    await dev.read(0, big);
    assert.ok(big.subarray(4096, 4096 + (1 << 20)).equals(a));
    assert.ok(big.subarray(0, 4096).every((x) => x === 0));
    await dev.writeZeroes(4096, 65536);
    await dev.discard(8 << 20, 1 << 20);
    await dev.read(4096, back);
    assert.ok(back.subarray(0, 65536).every((x) => x === 0));
    assert.ok(back.subarray(65536).equals(a.subarray(65536)));
    const ext = await dev.blockStatus(0, 16 << 20);
    assert.equal(
      ext.reduce((n, e) => n + e.lengthBytes, 0),
      16 << 20,
    );
    assert.equal(ext[0]!.hole, false);
    assert.equal(ext[ext.length - 1]!.hole, true);
    await assert.rejects(dev.read(100, Buffer.alloc(512)), { code: 'EALIGN', errno: 'EINVAL' });
    await assert.rejects(dev.read(64 << 20, Buffer.alloc(512)), { code: 'ERANGE', errno: 'EINVAL' });
    await assert.rejects(dev.write(64 << 20, Buffer.alloc(512)), { code: 'ERANGE', errno: 'ENOSPC' });
  } finally {
    await dev.close();
    await dev.close();
  }
  await assert.rejects(dev.read(0, Buffer.alloc(512)), { code: 'ECLOSED', errno: 'EIO' });
  await s.server.close();
});

test('hundreds of requests in flight on several connections agree with a model', async () => {
  const mem = new MemoryDevice({ sizeBytes: 8 << 20 });
  const s = await serve(mem);
  const dev = await NbdDevice.open(s.uri, { connections: 3, maxInflight: 16 });
  const model = Buffer.alloc(8 << 20);
  const ops: Promise<void>[] = [];
  // Non-overlapping 4 KiB writes in random order, all in flight at once.
  const blocks = [...Array(512).keys()].sort(() => Math.random() - 0.5);
  for (const [i, b] of blocks.entries()) {
    const d = pattern(4096, i);
    d.copy(model, b * 8192);
    ops.push(dev.write(b * 8192, d));
  }
  await Promise.all(ops);
  const reads: Promise<void>[] = [];
  const got = Buffer.alloc(8 << 20);
  for (let at = 0; at < 8 << 20; at += 65536) reads.push(dev.read(at, got.subarray(at, at + 65536)));
  await Promise.all(reads);
  assert.ok(got.equals(model));
  assert.equal(dev.health.connections, 3);
  await dev.close();
  await s.server.close();
});

test('a FLUSH reaches the server only after every earlier write was acknowledged', async () => {
  const vol = new VolatileDevice(4 << 20);
  vol.delayMs = 30;
  const s = await serve(vol);
  const dev = await NbdDevice.open(s.uri, { connections: 2 });
  const writes = Array.from({ length: 24 }, (_, i) => dev.write(i * 4096, pattern(4096, i)));
  await dev.flush(); // issued while the writes are in flight
  await Promise.all(writes);
  assert.equal(vol.flushes.length, 1);
  assert.equal(vol.flushes[0]!.writesInProgress, 0);
  assert.equal(vol.cache.length, 0, 'the flush covered all 24 writes');
  await dev.close();
  await s.server.close();
});

test('read-only exports and read-only opens refuse writes; unknown exports fail to open', async () => {
  const s = await serve(new MemoryDevice({ sizeBytes: 1 << 20 }), { readOnly: true });
  await assert.rejects(NbdDevice.open(s.uri), { code: 'EROFS', errno: 'EPERM', message: /read-only/ });
  const ro = await NbdDevice.open(s.uri, { readOnly: true });
  assert.equal(ro.capabilities.write, false);
  await assert.rejects(ro.write(0, Buffer.alloc(512)), { code: 'EROFS' });
  await ro.read(0, Buffer.alloc(512));
  await ro.close();
  await assert.rejects(NbdDevice.open(s.uri.replace('/disk?', '/nope?')), {
    code: 'ENBDOPEN',
    exitCode: 4,
    message: /no export 'nope'/,
  });
  await assert.rejects(NbdDevice.open(`nbd+unix:///disk?socket=${join(dir, 'absent.sock')}`), {
    code: 'ENBDOPEN',
    message: /ENOENT|no such file/i,
  });
  await assert.rejects(NbdDevice.open('nbd+unix:///disk'), { code: 'EURI', exitCode: 1 });
  await s.server.close();
});

test('a dropped connection: acknowledged unflushed writes are replayed, in-flight reads re-sent', async (t) => {
  const vol = new VolatileDevice(4 << 20);
  const s = await serve(vol);
  const px = new CutProxy(s.sock);
  await px.start();
  const dev = await NbdDevice.open(`nbd+unix:///disk?socket=${px.path}`, { connections: 2 });
  // Closed also when an assertion fails: a leaked connection keeps the test file from ending.
  t.after(async () => {
    await dev.close().catch(() => {});
    await px.stop().catch(() => {});
    await s.server.close().catch(() => {});
  });
  const a = pattern(65536, 1);
  const b = pattern(65536, 2);
  await dev.write(0, a);
  await dev.write(65536, b);
  await dev.write(0, b.subarray(0, 4096)); // overwrites part of a: replay must keep this order
  await dev.flush();
  const c = pattern(8192, 3);
  await dev.write(1 << 20, c); // acknowledged, not flushed
  await dev.write(1 << 20, a.subarray(0, 4096), { fua: true }); // newer, durable: must not be undone by the replay
  vol.delayMs = 100;
  const slowRead = Buffer.alloc(65536);
  const pending = dev.read(65536, slowRead);
  await sleep(20);
  // The storage server dies with its cache, and the connections with it.
  vol.crash();
  px.cut();
  await pending;
  assert.ok(slowRead.equals(b), 'the read in flight was sent again');
  vol.delayMs = 0;
  const got = Buffer.alloc(8192);
  await dev.read(1 << 20, got);
  assert.ok(got.subarray(0, 4096).equals(a.subarray(0, 4096)), 'the FUA write stays on top');
  assert.ok(got.subarray(4096).equals(c.subarray(4096)), 'the lost write was replayed');
  await dev.flush();
  const onDisk = Buffer.alloc(8192);
  await vol.disk.read(1 << 20, onDisk);
  assert.ok(onDisk.equals(got));
  assert.equal(dev.health.state, 'ready');
  assert.equal(dev.health.reconnects, 1);
  // A cut connection reads as closed (FIN) or reset (RST), depending on what was in flight.
  assert.match(dev.health.lastError ?? '', /closed|ECONNRESET/);
});

test('without replay copies, a flush after such a loss fails with EIO instead of lying', async () => {
  const vol = new VolatileDevice(1 << 20);
  const s = await serve(vol);
  const px = new CutProxy(s.sock);
  await px.start();
  const dev = await NbdDevice.open(`nbd+unix:///disk?socket=${px.path}`, { replayBytes: 0 });
  await dev.write(0, pattern(4096, 5));
  vol.crash();
  px.cut();
  await assert.rejects(dev.flush(), (e) => isCryptmapError(e, 'ENBDLOST') && e.errno === 'EIO');
  await dev.write(0, pattern(4096, 6));
  await dev.flush(); // reported once; new writes are covered again
  await dev.close();
  await px.stop();
  await s.server.close();
});

test('a server that stays gone fails the device with EIO within the deadline, not a hang', async () => {
  const s = await serve(new MemoryDevice({ sizeBytes: 1 << 20 }));
  const px = new CutProxy(s.sock);
  await px.start();
  const dev = await NbdDevice.open(`nbd+unix:///disk?socket=${px.path}`, { reconnectTimeoutMs: 700 });
  await dev.write(0, pattern(4096, 1));
  await px.stop();
  const t0 = Date.now();
  await assert.rejects(
    dev.read(0, Buffer.alloc(4096)),
    (e) => isCryptmapError(e, 'ENBDGONE') && e.errno === 'EIO' && /did not come back within 700 ms/.test(e.message),
  );
  assert.ok(Date.now() - t0 < 5000);
  assert.equal(dev.health.state, 'failed');
  await assert.rejects(dev.flush(), { code: 'ENBDGONE' });
  await assert.rejects(dev.write(0, Buffer.alloc(512)), { code: 'ENBDGONE' });
  await dev.close();
  await s.server.close();
});

/**
 * A server that negotiates correctly and then breaks the protocol on every request (`mode`), or
 * sends an option reply too large to be honest.
 */
async function hostileServer(
  mode: 'bad-magic' | 'unknown-cookie' | 'huge-option-reply',
): Promise<{ sock: string; close(): Promise<void>; connections(): number }> {
  const sock = sockPath('hostile');
  let conns = 0;
  const srv = createServer((c) => {
    conns++;
    c.on('error', () => {});
    let buf = Buffer.alloc(0);
    let phase: 'flags' | 'options' | 'transmission' = 'flags';
    const hello = Buffer.alloc(18);
    hello.writeBigUInt64BE(0x4e42444d41474943n, 0);
    hello.writeBigUInt64BE(0x49484156454f5054n, 8);
    hello.writeUInt16BE(3, 16);
    c.write(hello);
    const optReply = (opt: number, type: number, data: Buffer = Buffer.alloc(0), len = data.length) => {
      const h = Buffer.alloc(20);
      h.writeBigUInt64BE(0x0003e889045565a9n, 0);
      h.writeUInt32BE(opt, 8);
      h.writeUInt32BE(type, 12);
      h.writeUInt32BE(len, 16);
      c.write(Buffer.concat([h, data]));
    };
    c.on('data', (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      for (;;) {
        if (phase === 'flags') {
          if (buf.length < 4) return;
          buf = buf.subarray(4);
          phase = 'options';
        } else if (phase === 'options') {
          if (buf.length < 16) return;
          const opt = buf.readUInt32BE(8);
          const len = buf.readUInt32BE(12);
          if (buf.length < 16 + len) return;
          buf = buf.subarray(16 + len);
          if (opt !== 7) optReply(opt, 0x80000001);
          else if (mode === 'huge-option-reply') optReply(opt, 3, Buffer.alloc(0), 1 << 30);
          else {
            const info = Buffer.alloc(12);
            info.writeBigUInt64BE(BigInt(1 << 20), 2);
            info.writeUInt16BE(1 | 4, 10);
            optReply(opt, 3, info);
            optReply(opt, 1);
            phase = 'transmission';
          }
        } else {
          if (buf.length < 28) return;
          const cookie = buf.readBigUInt64BE(8);
          buf = buf.subarray(28 + (buf.readUInt16BE(6) === 1 ? buf.readUInt32BE(24) : 0));
          const r = Buffer.alloc(16);
          r.writeUInt32BE(mode === 'bad-magic' ? 0xdeadbeef : 0x67446698, 0);
          r.writeBigUInt64BE(mode === 'unknown-cookie' ? cookie + 1000n : cookie, 8);
          c.write(r);
        }
      }
    });
  });
  await new Promise<void>((r) => srv.listen(sock, r));
  return { sock, connections: () => conns, close: () => new Promise((r) => srv.close(() => r())) };
}

test('a hostile server: oversized replies, bad magic, unknown cookies end in EIO, not a hang or a loop', async () => {
  const huge = await hostileServer('huge-option-reply');
  await assert.rejects(NbdDevice.open(`nbd+unix:///?socket=${huge.sock}`), {
    code: 'ENBDOPEN',
    message: /option reply of 1073741824 bytes/,
  });
  await huge.close();
  for (const mode of ['bad-magic', 'unknown-cookie'] as const) {
    const h = await hostileServer(mode);
    const dev = await NbdDevice.open(`nbd+unix:///?socket=${h.sock}`, { reconnectTimeoutMs: 10_000 });
    await assert.rejects(
      dev.read(0, Buffer.alloc(4096)),
      (e) =>
        isCryptmapError(e, 'ENBDGONE') &&
        e.errno === 'EIO' &&
        /in a row without a request completing .*protocol violation/.test(e.message),
    );
    assert.equal(dev.health.state, 'failed');
    assert.ok(h.connections() <= 12, `${h.connections()} connections`);
    await dev.close();
    await h.close();
  }
});
