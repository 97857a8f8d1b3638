// The server's WRITE path through cryptmap over the NBD client (issue 15, "no per-request copy beyond
// the socket read/write"): payloads of 16 KiB or more are read by the socket straight into their
// pooled buffers (nbd-wire/recv.ts direct mode), and a device may keep a payload past the write
// (WriteFlags.hold, the NBD client's replay copy) without the pool handing the buffer out again.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { test } from 'node:test';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import { NbdDevice } from '../../src/blockdev/nbd-client/device.js';
import type { WriteFlags } from '../../src/blockdev/types.js';
import { NbdServer } from '../../src/nbd/server.js';
import { seededBytes } from '../helpers/prng.js';
import { makeTempDir } from '../helpers/tmp.js';

const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');
const REQ = 256 << 10;

/** Records what each write carried; keeps (holds) the payloads when asked to. */
class Recorder extends MemoryDevice {
  seen = new Map<number, string>();
  held: { data: Uint8Array; sha: string; release: () => void }[] = [];
  buffers = new Set<ArrayBufferLike>();
  hold = false;
  override async write(offsetBytes: number, data: Uint8Array, flags?: WriteFlags): Promise<void> {
    const h = sha(data);
    this.seen.set(offsetBytes, h);
    this.buffers.add(data.buffer);
    if (this.hold && flags?.scratch && flags.hold) this.held.push({ data, sha: h, release: flags.hold() });
  }
}

async function withServer(f: (dev: Recorder, uri: string) => Promise<void>): Promise<void> {
  const { dir, cleanup } = makeTempDir('cryptmap-nbd-direct-');
  const server = new NbdServer();
  const dev = new Recorder({ sizeBytes: 32 << 20 });
  server.addExport('disk', { device: dev });
  const sock = join(dir, 'nbd.sock');
  try {
    await server.listenUnix(sock);
    await f(dev, `nbd+unix:///disk?socket=${sock}`);
  } finally {
    await server.close();
    cleanup();
  }
}

/** Bytes copied by Uint8Array.prototype.set and Buffer.prototype.copy into buffers of 16 KiB or more while `f` runs. */
async function largeCopies(f: () => Promise<void>): Promise<number> {
  const set = Uint8Array.prototype.set;
  const copy = Buffer.prototype.copy;
  let bytes = 0;
  Uint8Array.prototype.set = function (this: Uint8Array, src: ArrayLike<number>, offset?: number) {
    if (this.buffer.byteLength >= 16384) bytes += src.length;
    return set.call(this, src, offset);
  } as typeof set;
  Buffer.prototype.copy = function (this: Buffer, target: Uint8Array, ts?: number, ss?: number, se?: number) {
    if (target.buffer.byteLength >= 16384) bytes += Math.min(se ?? this.length, this.length) - (ss ?? 0);
    return copy.call(this, target, ts, ss, se);
  } as typeof copy;
  try {
    await f();
  } finally {
    Uint8Array.prototype.set = set;
    Buffer.prototype.copy = copy;
  }
  return bytes;
}

test('large WRITE payloads are read by the socket into their buffers (no userspace copy)', async () => {
  await withServer(async (dev, uri) => {
    // replayBytes 0: the client itself keeps no copies, so every large copy counted is the server's.
    const client = await NbdDevice.open(uri, { connections: 2, replayBytes: 0 });
    try {
      const data = seededBytes(16 << 20, 11);
      const copied = await largeCopies(async () => {
        const w: Promise<void>[] = [];
        for (let at = 0; at < data.length; at += REQ) w.push(client.write(at, data.subarray(at, at + REQ)));
        await Promise.all(w);
        await client.flush();
      });
      for (let at = 0; at < data.length; at += REQ) assert.equal(dev.seen.get(at), sha(data.subarray(at, at + REQ)));
      // Copied: a read of at most 4 KiB taken before the server saw a header, per request, and what
      // arrived while the connection waited for room (its in-flight limit) and was queued. Before
      // direct reads every payload byte was copied (16 MiB here); measured ~0.5 MiB after.
      assert.ok(copied <= data.length / 8, `${copied} of ${data.length} bytes copied in userspace`);
    } finally {
      await client.close();
    }
  });
});

test('a payload a device holds is not handed out again until it lets go; then the pool reuses it', async () => {
  await withServer(async (dev, uri) => {
    const client = await NbdDevice.open(uri, { connections: 2, replayBytes: 0 });
    try {
      dev.hold = true;
      // Four rounds one after the other: a buffer the pool took back would carry a later round's data.
      for (let round = 0; round < 4; round++) {
        const data = seededBytes(16 * REQ, 100 + round);
        const w: Promise<void>[] = [];
        for (let i = 0; i < 16; i++)
          w.push(client.write((round * 16 + i) * REQ, data.subarray(i * REQ, (i + 1) * REQ)));
        await Promise.all(w);
      }
      assert.equal(dev.held.length, 64);
      for (const h of dev.held) assert.equal(sha(h.data), h.sha, 'a held payload was overwritten');
      const heldBuffers = new Set(dev.held.map((h) => h.data.buffer));
      for (const h of dev.held) h.release();
      dev.held = [];
      dev.hold = false;
      dev.buffers.clear();
      const w: Promise<void>[] = [];
      const data = seededBytes(16 * REQ, 200);
      for (let i = 0; i < 16; i++) w.push(client.write(i * REQ, data.subarray(i * REQ, (i + 1) * REQ)));
      await Promise.all(w);
      const reused = [...dev.buffers].filter((b) => heldBuffers.has(b)).length;
      assert.ok(reused > 0, 'no released payload buffer went back to the pool');
    } finally {
      await client.close();
    }
  });
});
