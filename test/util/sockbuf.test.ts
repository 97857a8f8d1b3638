/**
 * util/sockbuf.ts: a Unix socket's send buffer grows to what was asked (the kernel reports twice the
 * request, capped by net.core.wmem_max), a TCP socket is left alone (the kernel tunes it), and the
 * addon's errors are typed. Both ends of each connection are closed in `finally`.
 */
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { loadNative, nativeLoadError } from '../../src/util/native.js';
import { enlargeUnixSendBuffer } from '../../src/util/sockbuf.js';

/** A connected pair (client, accepted) on `listen`'s address; rejects after 10 s. */
async function pair(
  listen: (s: Server) => void,
  dial: (s: Server) => Socket,
): Promise<{ a: Socket; b: Socket; srv: Server }> {
  const srv = createServer();
  const accepted = new Promise<Socket>((res) => srv.once('connection', res));
  await new Promise<void>((res, rej) => {
    srv.once('listening', res);
    srv.once('error', rej);
    listen(srv);
  });
  const a = dial(srv);
  const deadline = new Promise<never>((_, rej) =>
    setTimeout(() => rej(new Error('no connection in 10 s')), 10_000).unref(),
  );
  await Promise.race([new Promise((res) => a.once('connect', res)), deadline]);
  const b = await Promise.race([accepted, deadline]);
  return { a, b, srv };
}

test('enlargeUnixSendBuffer: a Unix socket gets the buffer asked for, TCP is left alone', async () => {
  const addon = loadNative();
  assert.ok(
    addon?.unixSendBuffer,
    `the native addon has no unixSendBuffer (${nativeLoadError() ?? 'stale build'}); run node scripts/build-native.mjs`,
  );
  const wmemMax = Number(readFileSync('/proc/sys/net/core/wmem_max', 'utf8'));
  const dir = mkdtempSync(join(tmpdir(), 'cryptmap-sockbuf-'));
  const path = join(dir, 's');
  const u = await pair(
    (s) => s.listen(path),
    () => connect(path),
  );
  const t = await pair(
    (s) => s.listen(0, '127.0.0.1'),
    (s) => connect((s.address() as { port: number }).port, '127.0.0.1'),
  );
  try {
    const got = enlargeUnixSendBuffer(u.a, 1 << 20);
    assert.equal(got, 2 * Math.min(1 << 20, wmemMax), 'SO_SNDBUF after asking for 1 MiB');
    assert.ok(enlargeUnixSendBuffer(u.b, 1 << 20) > 0, 'an accepted Unix socket too');
    assert.equal(enlargeUnixSendBuffer(t.a, 1 << 20), 0, 'TCP: nothing done');
    assert.equal(enlargeUnixSendBuffer(u.a, 0), 0, 'zero asks for nothing');
    // Bytes still flow both ways after the change.
    const echoed = new Promise<Buffer>((res) => u.b.once('data', res));
    u.a.write('ping');
    assert.equal((await echoed).toString(), 'ping');
    // Typed errors from the addon itself.
    assert.throws(
      () => addon.unixSendBuffer!(0x7fffffff, 1 << 20),
      (e: NodeJS.ErrnoException) => e.code === 'EBADF',
    );
    assert.throws(() => addon.unixSendBuffer!(1, 0), /expected/);
  } finally {
    for (const s of [u.a, u.b, t.a, t.b]) s.destroy();
    await Promise.all([u.srv, t.srv].map((s) => new Promise((res) => s.close(res))));
    rmSync(dir, { recursive: true, force: true });
  }
});
