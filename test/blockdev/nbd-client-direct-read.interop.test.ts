// READ payloads land in the caller's buffer with no userspace copy over a plain socket (issue 15,
// "The client adds no per-request copy beyond the socket read"): the socket reads straight into the
// request's buffer (Node's onread with the destination offered per read). Measured by counting
// the bytes copied into the destination with TypedArray set / Buffer copy while large READs run,
// against nbdkit with structured replies and without (simple replies); the data must still match.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { test } from 'node:test';
import { NbdDevice } from '../../src/blockdev/nbd-client/device.js';
import { seededBytes } from '../helpers/prng.js';
import { useServers } from './nbd-servers.js';

const servers = useServers('cryptmap-nbddirect-');
const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');

/** Run `f` while counting bytes copied into `dest` by Uint8Array.prototype.set and Buffer.prototype.copy. */
async function copiesInto(dest: Uint8Array, f: () => Promise<void>): Promise<number> {
  const set = Uint8Array.prototype.set;
  const copy = Buffer.prototype.copy;
  let bytes = 0;
  Uint8Array.prototype.set = function (this: Uint8Array, src: ArrayLike<number>, offset?: number) {
    if (this.buffer === dest.buffer) bytes += src.length;
    return set.call(this, src, offset);
  } as typeof set;
  Buffer.prototype.copy = function (this: Buffer, target: Uint8Array, ts?: number, ss?: number, se?: number) {
    if (target.buffer === dest.buffer) bytes += Math.min(se ?? this.length, this.length) - (ss ?? 0);
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

for (const [label, extra] of [
  ['structured replies', []],
  ['simple replies', ['--no-sr']],
] as const) {
  test(`${label}: large READs are read by the socket into the caller's buffer (no userspace copy)`, async () => {
    const s = await servers.start('nbdkit', (sock) => ['-f', ...extra, '-U', sock, 'memory', '16M']);
    const dev = await NbdDevice.open(`nbd+unix:///?socket=${s.sock}`, { connections: 2 });
    try {
      const data = seededBytes(16 << 20, 5);
      const w: Promise<void>[] = [];
      for (let at = 0; at < data.length; at += 1 << 20) w.push(dev.write(at, data.subarray(at, at + (1 << 20))));
      await Promise.all(w);
      await dev.flush();
      // One destination buffer (SharedArrayBuffer-free, its own ArrayBuffer) for every read.
      const back = Buffer.from(new ArrayBuffer(16 << 20));
      const copied = await copiesInto(back, async () => {
        const r: Promise<void>[] = [];
        for (let at = 0; at < back.length; at += 256 << 10) r.push(dev.read(at, back.subarray(at, at + (256 << 10))));
        await Promise.all(r);
      });
      assert.equal(sha(back), sha(data));
      // At most the first read after the handshake (one scratch buffer per connection) is copied.
      assert.ok(copied <= 2 * (64 << 10), `${copied} of ${back.length} bytes copied in userspace`);
    } finally {
      await dev.close();
      await s.stop();
    }
  });
}
