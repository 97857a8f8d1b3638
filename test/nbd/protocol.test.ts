/**
 * NBD server at the byte level (proto.md): handshake, every option, every command, and the
 * malformed input a hostile or buggy client can send. Raw sockets, no external tools.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { pollUntil } from '../helpers/wait.js';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import fc from 'fast-check';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import { CryptmapError } from '../../src/util/errors.js';
import { OPTION_HANDLERS } from '../../src/nbd/options.js';
import { NbdServer } from '../../src/nbd/server.js';
import { canTransition, STATES } from '../../src/nbd/states.js';
import { COMMANDS } from '../../src/nbd/transmission.js';
import { nbdTcpUri, nbdUnixUri } from '../../src/nbd-wire/uri.js';
import { type Fixture, goData, metaData, openClient, RawClient, selfSignedCert, startServer } from './helpers.js';
import { seededBytes } from '../helpers/prng.js';

/** A full garbage collection, so memory figures show what is held, not what awaits collection. */
function forceGc(): void {
  setFlagsFromString('--expose_gc');
  (runInNewContext('gc') as () => void)();
}

const NBD_OPT_EXPORT_NAME = 1;
const NBD_OPT_ABORT = 2;
const NBD_OPT_LIST = 3;
const NBD_OPT_STARTTLS = 5;
const NBD_OPT_INFO = 6;
const NBD_OPT_GO = 7;
const NBD_OPT_STRUCTURED_REPLY = 8;
const NBD_OPT_LIST_META_CONTEXT = 9;
const NBD_OPT_SET_META_CONTEXT = 10;
const NBD_OPT_EXTENDED_HEADERS = 11;
const ACK = 1;
const REP_SERVER = 2;
const REP_INFO = 3;
const REP_META = 4;
const ERR = 0x80000000;
const ERR_UNSUP = ERR + 1;
const ERR_POLICY = ERR + 2;
const ERR_INVALID = ERR + 3;
const ERR_TLS_REQD = ERR + 5;
const ERR_UNKNOWN = ERR + 6;
const CMD_READ = 0;
const CMD_WRITE = 1;
const CMD_DISC = 2;
const CMD_FLUSH = 3;
const CMD_TRIM = 4;
const CMD_CACHE = 5;
const CMD_WRITE_ZEROES = 6;
const CMD_BLOCK_STATUS = 7;
const EPERM = 1;
const EIO = 5;
const EINVAL = 22;
const ENOSPC = 28;
const ENOTSUP = 95;

let f: Fixture;
before(async () => {
  f = await startServer({ handshakeTimeoutMs: 20_000 });
});
after(async () => {
  await f.close();
});

/**
 * Wait (bounded: fail after 10 s) until the server pushes back on a client that does not read: a
 * connection waits for room and the only payload in flight is replies queued for the client, so it
 * holds what it holds until the client reads. A server that kept reading and answering would never
 * get there.
 */
async function untilServerWaitsForClient(server: NbdServer, what: string): Promise<void> {
  await pollUntil(
    () => server.connectionsWaitingForRoom > 0 && server.payloadBytesInFlight === server.replyBytesQueued,
    {
      deadlineMs: 10_000,
      intervalMs: 10,
      what: `${what}: the server to wait for the client to read`,
      detail: () =>
        `connections waiting for room: ${server.connectionsWaitingForRoom}, payload bytes in flight: ${server.payloadBytesInFlight}, of which queued replies: ${server.replyBytesQueued}`,
    },
  );
}

/** The server still serves a fresh client after whatever a test did. */
async function assertServerHealthy(): Promise<void> {
  const c = await openClient(f);
  c.sendRequest(CMD_READ, 0, 512, { cookie: 77n });
  const r = await c.readSimpleReply();
  assert.equal(r.error, 0);
  assert.equal(r.cookie, 77n);
  await c.read(512);
  c.close();
}

describe('state table', () => {
  test('every state lists only known states, CLOSED is terminal', () => {
    for (const [name, spec] of Object.entries(STATES)) {
      for (const n of spec.next) assert.ok(n in STATES, `${name} -> ${n}`);
    }
    assert.deepEqual(STATES.CLOSED.next, []);
    assert.ok(canTransition('OPTIONS', 'TRANSMISSION'));
    assert.ok(!canTransition('GREETING', 'TRANSMISSION'));
    assert.ok(!canTransition('TRANSMISSION', 'OPTIONS'));
  });

  test('URIs', () => {
    assert.equal(nbdUnixUri('vol 1', '/run/cryptmap/nbd.sock'), 'nbd+unix:///vol%201?socket=/run/cryptmap/nbd.sock');
    assert.equal(nbdTcpUri('d', '::1', 10809, true), 'nbds://[::1]:10809/d');
  });
});

describe('handshake', () => {
  test('greeting has NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE|NO_ZEROES', async () => {
    const c = await RawClient.connect(f.sock);
    const flags = await c.handshake();
    assert.equal(flags, 3);
    c.close();
  });

  test('unknown client flag bits end the session', async () => {
    const c = await RawClient.connect(f.sock);
    await c.handshake(0x80000001);
    assert.ok(await c.closedByServer());
    await assertServerHealthy();
  });

  test('wrong option magic ends the session', async () => {
    const c = await RawClient.connect(f.sock);
    await c.handshake();
    c.send(Buffer.from('IHAVEOPX\0\0\0\x07\0\0\0\0', 'latin1'));
    assert.ok(await c.closedByServer());
  });

  test('oversized option length ends the session before any allocation', async () => {
    const c = await RawClient.connect(f.sock);
    await c.handshake();
    c.sendOption(NBD_OPT_GO, Buffer.alloc(0), 0xfffffff0);
    assert.ok(await c.closedByServer());
    await assertServerHealthy();
  });

  test('non-fixed-newstyle client may only use EXPORT_NAME', async () => {
    const c = await RawClient.connect(f.sock);
    await c.handshake(0);
    c.sendOption(NBD_OPT_EXPORT_NAME, Buffer.from('disk'));
    const r = await c.read(10 + 124); // size, flags, 124 zero bytes (NO_ZEROES not negotiated)
    assert.equal(r.readBigUInt64BE(0), BigInt(16 << 20));
    assert.ok(r.subarray(10).every((b) => b === 0));
    c.close();
    const d = await RawClient.connect(f.sock);
    await d.handshake(0);
    d.sendOption(NBD_OPT_LIST);
    assert.ok(await d.closedByServer());
  });
});

describe('options', () => {
  test('unknown options, EXTENDED_HEADERS included, get ERR_UNSUP and haggling continues', async () => {
    const c = await RawClient.connect(f.sock);
    await c.handshake();
    for (const opt of [NBD_OPT_EXTENDED_HEADERS, 4, 12345, 0xffffffff]) {
      c.sendOption(opt, Buffer.from('junk'));
      const r = await c.readOptionReply();
      assert.equal(r.opt, opt);
      assert.equal(r.type, ERR_UNSUP);
    }
    await c.go('disk');
    c.close();
  });

  test('LIST names every export with its description', async () => {
    const c = await RawClient.connect(f.sock);
    await c.handshake();
    c.sendOption(NBD_OPT_LIST);
    const replies = await c.readOptionReplies();
    assert.equal(replies.at(-1)!.type, ACK);
    const names = replies
      .filter((r) => r.type === REP_SERVER)
      .map((r) => {
        const n = r.data.readUInt32BE(0);
        return [r.data.toString('utf8', 4, 4 + n), r.data.toString('utf8', 4 + n)];
      });
    assert.deepEqual(names, [
      ['disk', 'test disk'],
      ['ro', ''],
    ]);
    c.sendOption(NBD_OPT_LIST, Buffer.from('x'));
    assert.equal((await c.readOptionReply()).type, ERR_INVALID);
    c.close();
  });

  test('INFO returns EXPORT, NAME, DESCRIPTION, BLOCK_SIZE and stays in haggling', async () => {
    const c = await RawClient.connect(f.sock);
    await c.handshake();
    c.sendOption(NBD_OPT_INFO, goData('disk', [0, 1, 2, 3]));
    const replies = await c.readOptionReplies();
    assert.equal(replies.at(-1)!.type, ACK);
    const infos = new Map(
      replies.filter((r) => r.type === REP_INFO).map((r) => [r.data.readUInt16BE(0), r.data.subarray(2)]),
    );
    assert.equal(infos.get(0)!.readBigUInt64BE(0), BigInt(16 << 20));
    assert.equal(infos.get(1)!.toString(), 'disk');
    assert.equal(infos.get(2)!.toString(), 'test disk');
    const bs = infos.get(3)!;
    assert.deepEqual([bs.readUInt32BE(0), bs.readUInt32BE(4), bs.readUInt32BE(8)], [512, 4096, 32 << 20]);
    const { flags } = await c.go('ro');
    assert.ok(flags & 2, 'READ_ONLY');
    c.close();
  });

  test('GO on an unknown export is ERR_UNKNOWN, then GO on a good one works', async () => {
    const c = await RawClient.connect(f.sock);
    await c.handshake();
    c.sendOption(NBD_OPT_GO, goData('nope'));
    const r = await c.readOptionReply();
    assert.equal(r.type, ERR_UNKNOWN);
    assert.match(r.data.toString(), /not found/);
    const { size, flags } = await c.go('disk');
    assert.equal(size, BigInt(16 << 20));
    // HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES, CAN_MULTI_CONN, SEND_CACHE, SEND_FAST_ZERO
    assert.equal(flags, 1 | 4 | 8 | 32 | 64 | 256 | 1024 | 2048);
    c.close();
  });

  test('malformed GO data is ERR_INVALID', async () => {
    const c = await RawClient.connect(f.sock);
    await c.handshake();
    const bad = goData('disk', [3]);
    bad.writeUInt32BE(1000, 0); // name length beyond the data
    c.sendOption(NBD_OPT_GO, bad);
    assert.equal((await c.readOptionReply()).type, ERR_INVALID);
    c.sendOption(NBD_OPT_GO, goData('disk', [3]).subarray(0, 9)); // truncated info list
    assert.equal((await c.readOptionReply()).type, ERR_INVALID);
    c.sendOption(NBD_OPT_INFO, Buffer.alloc(3));
    assert.equal((await c.readOptionReply()).type, ERR_INVALID);
    c.close();
  });

  test('EXPORT_NAME of an unknown export is a hard disconnect', async () => {
    const c = await RawClient.connect(f.sock);
    await c.handshake();
    c.sendOption(NBD_OPT_EXPORT_NAME, Buffer.from('missing'));
    assert.ok(await c.closedByServer());
  });

  test('EXPORT_NAME with NO_ZEROES sends size and flags only', async () => {
    const c = await RawClient.connect(f.sock);
    await c.handshake(3);
    c.sendOption(NBD_OPT_EXPORT_NAME, Buffer.from('disk'));
    const r = await c.read(10);
    assert.equal(r.readBigUInt64BE(0), BigInt(16 << 20));
    c.sendRequest(CMD_FLUSH, 0, 0, { cookie: 5n });
    assert.deepEqual(await c.readSimpleReply(), { error: 0, cookie: 5n });
    c.close();
  });

  test('ABORT is acknowledged and the server closes', async () => {
    const c = await RawClient.connect(f.sock);
    await c.handshake();
    c.sendOption(NBD_OPT_ABORT);
    assert.equal((await c.readOptionReply()).type, ACK);
    assert.ok(await c.closedByServer());
  });

  test('STARTTLS without TLS configured is ERR_POLICY', async () => {
    const c = await RawClient.connect(f.sock);
    await c.handshake();
    c.sendOption(NBD_OPT_STARTTLS);
    assert.equal((await c.readOptionReply()).type, ERR_POLICY);
    c.sendOption(NBD_OPT_STARTTLS, Buffer.from('x'));
    assert.equal((await c.readOptionReply()).type, ERR_INVALID);
    c.close();
  });

  test('meta contexts: need structured replies; LIST and SET base:allocation', async () => {
    const c = await RawClient.connect(f.sock);
    await c.handshake();
    c.sendOption(NBD_OPT_SET_META_CONTEXT, metaData('disk', ['base:allocation']));
    assert.equal((await c.readOptionReply()).type, ERR_INVALID);
    c.sendOption(NBD_OPT_STRUCTURED_REPLY);
    assert.equal((await c.readOptionReply()).type, ACK);
    c.sendOption(NBD_OPT_STRUCTURED_REPLY, Buffer.from('x'));
    assert.equal((await c.readOptionReply()).type, ERR_INVALID);
    for (const q of [[], ['base:'], ['base:allocation', 'x-other:thing']]) {
      c.sendOption(NBD_OPT_LIST_META_CONTEXT, metaData('disk', q));
      const rs = await c.readOptionReplies();
      assert.equal(rs.at(-1)!.type, ACK);
      assert.deepEqual(
        rs.filter((r) => r.type === REP_META).map((r) => r.data.toString('utf8', 4)),
        ['base:allocation'],
      );
    }
    c.sendOption(NBD_OPT_LIST_META_CONTEXT, metaData('disk', ['qemu:dirty-bitmap:x']));
    assert.deepEqual(
      (await c.readOptionReplies()).map((r) => r.type),
      [ACK],
    );
    c.sendOption(NBD_OPT_SET_META_CONTEXT, metaData('nope', ['base:allocation']));
    assert.equal((await c.readOptionReply()).type, ERR_UNKNOWN);
    const bad = metaData('disk', ['base:allocation']);
    bad.writeUInt32BE(99, 8); // query count beyond the data
    c.sendOption(NBD_OPT_SET_META_CONTEXT, bad);
    assert.equal((await c.readOptionReply()).type, ERR_INVALID);
    c.sendOption(NBD_OPT_SET_META_CONTEXT, metaData('disk', ['base:allocation']));
    const rs = await c.readOptionReplies();
    assert.deepEqual(
      rs.map((r) => r.type),
      [REP_META, ACK],
    );
    const id = rs[0]!.data.readUInt32BE(0);
    await c.go('disk');
    // A fresh export has one hole; write 64 KiB at 1 MiB and ask again.
    c.sendRequest(CMD_BLOCK_STATUS, 0, 4 << 20, { cookie: 1n });
    let r = await c.readReply();
    assert.equal(r.kind, 'chunk');
    if (r.kind !== 'chunk') return;
    assert.equal(r.type, 5);
    assert.equal(r.flags & 1, 1);
    assert.equal(r.payload.readUInt32BE(0), id);
    assert.deepEqual([r.payload.readUInt32BE(4), r.payload.readUInt32BE(8)], [4 << 20, 3]);
    c.sendRequest(CMD_WRITE, 1 << 20, 65536, { cookie: 2n, data: Buffer.alloc(65536, 1) });
    assert.equal((await c.readReply()).kind, 'simple');
    c.sendRequest(CMD_BLOCK_STATUS, 0, 4 << 20, { cookie: 3n });
    r = await c.readReply();
    if (r.kind !== 'chunk') return assert.fail('expected a chunk');
    const descs = [];
    for (let i = 4; i < r.payload.length; i += 8)
      descs.push([r.payload.readUInt32BE(i), r.payload.readUInt32BE(i + 4)]);
    assert.deepEqual(descs, [
      [1 << 20, 3],
      [65536, 0],
      [(3 << 20) - 65536, 3],
    ]);
    c.sendRequest(CMD_BLOCK_STATUS, 0, 4 << 20, { cookie: 4n, flags: 8 }); // REQ_ONE
    r = await c.readReply();
    if (r.kind !== 'chunk') return assert.fail('expected a chunk');
    assert.equal(r.payload.length, 12);
    assert.deepEqual([r.payload.readUInt32BE(4), r.payload.readUInt32BE(8)], [1 << 20, 3]);
    await f.disk.writeZeroes(1 << 20, 65536);
    c.close();
  });

  test('BLOCK_STATUS without a meta context is EINVAL', async () => {
    const c = await openClient(f, 'disk', true);
    c.sendRequest(CMD_BLOCK_STATUS, 0, 4096, { cookie: 9n });
    assert.equal(await c.readError(), EINVAL);
    c.close();
  });

  test('too many options end the session', async () => {
    const c = await RawClient.connect(f.sock);
    await c.handshake();
    let closed = false;
    for (let i = 0; i < 300 && !closed; i++) {
      c.sendOption(NBD_OPT_STRUCTURED_REPLY);
      try {
        await c.readOptionReply();
      } catch {
        closed = true;
      }
    }
    assert.ok(closed, 'server gave up after its option limit');
  });
});

describe('transmission, simple replies', () => {
  let c: RawClient;
  before(async () => {
    c = await openClient(f);
  });
  after(() => c.close());

  test('write then read back, with FUA', async () => {
    const data = seededBytes(128 << 10, 1);
    c.sendRequest(CMD_WRITE, 8192, data.length, { cookie: 10n, data, flags: 1 });
    assert.deepEqual(await c.readSimpleReply(), { error: 0, cookie: 10n });
    c.sendRequest(CMD_READ, 8192, data.length, { cookie: 11n });
    assert.deepEqual(await c.readSimpleReply(), { error: 0, cookie: 11n });
    assert.ok((await c.read(data.length)).equals(data));
  });

  test('unaligned requests are EINVAL', async () => {
    c.sendRequest(CMD_READ, 100, 512, { cookie: 12n });
    assert.deepEqual(await c.readSimpleReply(), { error: EINVAL, cookie: 12n });
    c.sendRequest(CMD_WRITE, 0, 100, { cookie: 13n, data: Buffer.alloc(100) });
    assert.deepEqual(await c.readSimpleReply(), { error: EINVAL, cookie: 13n });
  });

  test('write past the end is ENOSPC, read past the end is EINVAL, huge offsets too', async () => {
    const end = 16 << 20;
    c.sendRequest(CMD_WRITE, end - 512, 1024, { cookie: 14n, data: Buffer.alloc(1024) });
    assert.deepEqual(await c.readSimpleReply(), { error: ENOSPC, cookie: 14n });
    c.sendRequest(CMD_WRITE_ZEROES, end, 512, { cookie: 15n });
    assert.deepEqual(await c.readSimpleReply(), { error: ENOSPC, cookie: 15n });
    c.sendRequest(CMD_READ, end, 512, { cookie: 16n });
    assert.deepEqual(await c.readSimpleReply(), { error: EINVAL, cookie: 16n });
    c.sendRequest(CMD_TRIM, 0xffffffffffff0000n, 512, { cookie: 17n });
    assert.deepEqual(await c.readSimpleReply(), { error: EINVAL, cookie: 17n });
    c.sendRequest(CMD_READ, 0xfffffffffffffe00n, 512, { cookie: 18n });
    assert.deepEqual(await c.readSimpleReply(), { error: EINVAL, cookie: 18n });
  });

  test('oversize requests are EINVAL; an oversize WRITE payload is skipped and the stream stays in sync', async () => {
    c.sendRequest(CMD_READ, 0, (32 << 20) + 512, { cookie: 19n });
    assert.deepEqual(await c.readSimpleReply(), { error: EINVAL, cookie: 19n });
    const big = (32 << 20) + 4096;
    c.sendRequest(CMD_WRITE, 0, big, { cookie: 20n, data: Buffer.alloc(big, 0xee) });
    assert.deepEqual(await c.readSimpleReply(), { error: EINVAL, cookie: 20n });
    c.sendRequest(CMD_READ, 0, 512, { cookie: 21n });
    assert.deepEqual(await c.readSimpleReply(), { error: 0, cookie: 21n });
    assert.ok((await c.read(512)).every((b) => b !== 0xee));
  });

  test('unknown command and unknown flags are EINVAL', async () => {
    c.sendRequest(99, 0, 0, { cookie: 22n });
    assert.deepEqual(await c.readSimpleReply(), { error: EINVAL, cookie: 22n });
    c.sendRequest(CMD_READ, 0, 512, { cookie: 23n, flags: 0x40 });
    assert.deepEqual(await c.readSimpleReply(), { error: EINVAL, cookie: 23n });
    c.sendRequest(CMD_READ, 0, 512, { cookie: 24n, flags: 4 }); // DF without structured replies
    assert.deepEqual(await c.readSimpleReply(), { error: EINVAL, cookie: 24n });
    c.sendRequest(CMD_FLUSH, 512, 0, { cookie: 25n });
    assert.deepEqual(await c.readSimpleReply(), { error: EINVAL, cookie: 25n });
  });

  test('trim, write zeroes (NO_HOLE), cache, flush, zero-length requests', async () => {
    c.sendRequest(CMD_WRITE, 0, 4096, { cookie: 30n, data: Buffer.alloc(4096, 7) });
    assert.equal((await c.readSimpleReply()).error, 0);
    c.sendRequest(CMD_WRITE_ZEROES, 0, 1024, { cookie: 31n, flags: 2 });
    assert.equal((await c.readSimpleReply()).error, 0);
    c.sendRequest(CMD_TRIM, 1024, 1024, { cookie: 32n });
    assert.equal((await c.readSimpleReply()).error, 0);
    c.sendRequest(CMD_CACHE, 0, 4096, { cookie: 33n });
    assert.equal((await c.readSimpleReply()).error, 0);
    c.sendRequest(CMD_FLUSH, 0, 0, { cookie: 34n });
    assert.equal((await c.readSimpleReply()).error, 0);
    c.sendRequest(CMD_READ, 0, 0, { cookie: 35n });
    assert.deepEqual(await c.readSimpleReply(), { error: 0, cookie: 35n });
    c.sendRequest(CMD_WRITE, 0, 0, { cookie: 36n });
    assert.deepEqual(await c.readSimpleReply(), { error: 0, cookie: 36n });
    c.sendRequest(CMD_READ, 0, 4096, { cookie: 37n });
    await c.readSimpleReply();
    const back = await c.read(4096);
    assert.ok(back.subarray(0, 1024).every((b) => b === 0));
    assert.ok(back.subarray(2048).every((b) => b === 7));
  });

  test('FAST_ZERO is accepted on a device that zeroes fast', async () => {
    c.sendRequest(CMD_WRITE_ZEROES, 0, 65536, { cookie: 38n, flags: 16 });
    assert.equal((await c.readSimpleReply()).error, 0);
  });

  test('many requests in flight are all answered, each with its cookie', async () => {
    const n = 200;
    for (let i = 0; i < n; i++) {
      c.sendRequest(CMD_WRITE, i * 4096, 4096, { cookie: BigInt(1000 + i), data: Buffer.alloc(4096, i & 0xff) });
    }
    const seen = new Set<bigint>();
    for (let i = 0; i < n; i++) {
      const r = await c.readSimpleReply();
      assert.equal(r.error, 0);
      seen.add(r.cookie);
    }
    assert.equal(seen.size, n);
    for (let i = 0; i < n; i++) c.sendRequest(CMD_READ, i * 4096, 4096, { cookie: BigInt(5000 + i) });
    for (let i = 0; i < n; i++) {
      const r = await c.readSimpleReply();
      const body = await c.read(4096);
      const k = Number(r.cookie) - 5000;
      assert.ok(
        body.every((b) => b === (k & 0xff)),
        `read ${k}`,
      );
    }
  });
});

describe('transmission, structured replies', () => {
  test('READ answers with OFFSET_DATA and OFFSET_HOLE chunks; DF gives one data chunk; errors are ERROR chunks', async () => {
    const c = await openClient(f, 'disk', true);
    const data = seededBytes(65536, 3);
    c.sendRequest(CMD_WRITE, 2 << 20, data.length, { cookie: 1n, data });
    assert.equal((await c.readReply()).kind, 'simple');
    c.sendRequest(CMD_READ, (2 << 20) - 65536, 3 * 65536, { cookie: 2n });
    const got = Buffer.alloc(3 * 65536, 0xff);
    let done = false;
    const types: number[] = [];
    while (!done) {
      const r = await c.readReply();
      if (r.kind !== 'chunk') return assert.fail('READ must use structured replies');
      assert.equal(r.cookie, 2n);
      types.push(r.type);
      const off = Number(r.payload.readBigUInt64BE(0)) - ((2 << 20) - 65536);
      if (r.type === 1) r.payload.copy(got, off, 8);
      else if (r.type === 2) got.fill(0, off, off + r.payload.readUInt32BE(8));
      else assert.fail(`unexpected chunk type ${r.type}`);
      done = (r.flags & 1) === 1;
    }
    assert.deepEqual(types, [2, 1, 2]);
    assert.ok(got.subarray(65536, 131072).equals(data));
    assert.ok(got.subarray(0, 65536).every((b) => b === 0));
    c.sendRequest(CMD_READ, (2 << 20) - 65536, 3 * 65536, { cookie: 3n, flags: 4 }); // DF
    const r = await c.readReply();
    if (r.kind !== 'chunk') return assert.fail('expected a chunk');
    assert.deepEqual([r.type, r.flags, r.payload.length], [1, 1, 8 + 3 * 65536]);
    c.sendRequest(CMD_READ, 1, 512, { cookie: 4n });
    const e = await c.readReply();
    if (e.kind !== 'chunk') return assert.fail('a READ error must be a structured chunk');
    assert.equal(e.type, 0x8001);
    assert.equal(e.payload.readUInt32BE(0), EINVAL);
    const msgLen = e.payload.readUInt16BE(4);
    assert.match(e.payload.toString('utf8', 6, 6 + msgLen), /aligned/);
    c.sendRequest(CMD_READ, 0, 0, { cookie: 5n });
    const z = await c.readReply();
    assert.ok(z.kind === 'chunk' && z.type === 0 && z.flags === 1);
    c.close();
  });
});

test('offsets beyond 4 GiB (u64 on the wire) address the right bytes of an 8 TiB export', async () => {
  const server = new NbdServer();
  server.addExport('huge', { device: new MemoryDevice({ sizeBytes: 8 * 2 ** 40 }) });
  await server.listenUnix(`${f.dir}/huge.sock`);
  const c = await RawClient.connect(`${f.dir}/huge.sock`);
  await c.handshake();
  const { size } = await c.go('huge');
  assert.equal(size, 8n << 40n);
  const at = 5n * 2n ** 40n + 3n * 2n ** 32n + 4096n;
  const data = seededBytes(8192, 99);
  c.sendRequest(CMD_WRITE, at, data.length, { cookie: 1n, data });
  assert.equal((await c.readSimpleReply()).error, 0);
  c.sendRequest(CMD_READ, at - 4096n, 16384, { cookie: 2n });
  assert.equal((await c.readSimpleReply()).error, 0);
  const back = await c.read(16384);
  assert.ok(back.subarray(0, 4096).every((b) => b === 0));
  assert.ok(back.subarray(4096, 4096 + 8192).equals(data));
  c.sendRequest(CMD_WRITE, (8n << 40n) - 512n, 1024, { cookie: 3n, data: Buffer.alloc(1024) });
  assert.equal((await c.readSimpleReply()).error, ENOSPC);
  c.close();
  await server.close();
});

describe('read-only export and device errors', () => {
  test('writes, trims and zeroes on a read-only export are EPERM', async () => {
    const c = await openClient(f, 'ro');
    c.sendRequest(CMD_WRITE, 0, 512, { cookie: 1n, data: Buffer.alloc(512) });
    assert.deepEqual(await c.readSimpleReply(), { error: EPERM, cookie: 1n });
    c.sendRequest(CMD_TRIM, 0, 512, { cookie: 2n });
    assert.equal((await c.readSimpleReply()).error, EPERM);
    c.sendRequest(CMD_WRITE_ZEROES, 0, 512, { cookie: 3n });
    assert.equal((await c.readSimpleReply()).error, EPERM);
    c.sendRequest(CMD_READ, 0, 512, { cookie: 4n });
    assert.equal((await c.readSimpleReply()).error, 0);
    await c.read(512);
    c.close();
  });

  test('CryptmapError.errno from the device becomes the NBD error', async () => {
    const server = new NbdServer();
    const dev = new MemoryDevice({ sizeBytes: 1 << 20 });
    dev.read = async () => {
      throw new CryptmapError('EREAD', 'backing store failed', { errno: 'EIO' });
    };
    dev.write = async () => {
      throw new Error('not a CryptmapError');
    };
    const origZero = dev.writeZeroes.bind(dev);
    dev.writeZeroes = async (o, l, fl) => {
      if (l === 512) throw new CryptmapError('ENOSPACE', 'full', { errno: 'ENOSPC' });
      return origZero(o, l, fl);
    };
    server.addExport('bad', { device: dev });
    await server.listenUnix(`${f.dir}/bad.sock`);
    const c = await RawClient.connect(`${f.dir}/bad.sock`);
    await c.handshake();
    await c.go('bad');
    c.sendRequest(CMD_READ, 0, 512, { cookie: 1n });
    assert.deepEqual(await c.readSimpleReply(), { error: EIO, cookie: 1n });
    c.sendRequest(CMD_WRITE, 0, 512, { cookie: 2n, data: Buffer.alloc(512) });
    assert.deepEqual(await c.readSimpleReply(), { error: EIO, cookie: 2n });
    c.sendRequest(CMD_WRITE_ZEROES, 0, 512, { cookie: 3n });
    assert.deepEqual(await c.readSimpleReply(), { error: ENOSPC, cookie: 3n });
    c.close();
    // With structured replies the error chunk carries the errno's text, not the device's message.
    const d = await RawClient.connect(`${f.dir}/bad.sock`);
    await d.handshake();
    d.sendOption(NBD_OPT_STRUCTURED_REPLY);
    await d.readOptionReply();
    await d.go('bad');
    d.sendRequest(CMD_READ, 0, 512, { cookie: 4n });
    const r = await d.readReply();
    if (r.kind !== 'chunk') return assert.fail('expected an error chunk');
    assert.equal(r.payload.readUInt32BE(0), EIO);
    const text = r.payload.toString('utf8', 6, 6 + r.payload.readUInt16BE(4));
    assert.equal(text, 'NBD_CMD_READ failed: input/output error');
    d.close();
    await server.close();
  });

  test('FAST_ZERO on a device without efficient zeroing is ENOTSUP', async () => {
    const server = new NbdServer();
    const dev = new MemoryDevice({ sizeBytes: 1 << 20 });
    (dev.capabilities as { writeZeroes: boolean }).writeZeroes = false;
    server.addExport('slow', { device: dev });
    await server.listenUnix(`${f.dir}/slow.sock`);
    const c = await RawClient.connect(`${f.dir}/slow.sock`);
    await c.handshake();
    await c.go('slow');
    c.sendRequest(CMD_WRITE_ZEROES, 0, 4096, { cookie: 1n, flags: 16 });
    assert.deepEqual(await c.readSimpleReply(), { error: ENOTSUP, cookie: 1n });
    c.sendRequest(CMD_WRITE_ZEROES, 0, 4096, { cookie: 2n });
    assert.deepEqual(await c.readSimpleReply(), { error: 0, cookie: 2n });
    c.close();
    await server.close();
  });
});

describe('hostile and broken clients', () => {
  test('bad request magic is a hard disconnect', async () => {
    const c = await openClient(f);
    c.send(Buffer.alloc(28, 0x41));
    assert.ok(await c.closedByServer());
    await assertServerHealthy();
  });

  test('client disconnecting mid-request (half a WRITE payload, and with reads in flight)', async () => {
    const c = await openClient(f);
    c.sendRequest(CMD_WRITE, 0, 1 << 20, { cookie: 1n });
    c.send(Buffer.alloc(300_000, 9));
    c.close();
    const d = await openClient(f);
    for (let i = 0; i < 64; i++) d.sendRequest(CMD_READ, 0, 1 << 20, { cookie: BigInt(i) });
    d.close();
    await assertServerHealthy();
  });

  test('a client that does not read its replies cannot make the server buffer without bound', async () => {
    const g = await startServer({ maxInflightBytes: 16 << 20, stallTimeoutMs: 0 }, 64 << 20);
    const c = await openClient(g);
    try {
      c.socket.pause(); // this client reads nothing: the kernel socket buffers fill up
      forceGc();
      const before = process.memoryUsage().arrayBuffers;
      const n = 300; // 300 x 1 MiB of replies if nothing pushed back
      for (let i = 0; i < n; i++) c.sendRequest(CMD_READ, (i % 64) << 20, 1 << 20, { cookie: BigInt(i) });
      await untilServerWaitsForClient(g.server, `${n} READs of 1 MiB`);
      forceGc(); // count what the server holds, not garbage a loaded machine has not collected yet
      const grown = process.memoryUsage().arrayBuffers - before;
      assert.ok(grown < 96 << 20, `server buffered ${grown} bytes`);
      // Everything is still answered once the client reads.
      c.socket.resume();
      for (let i = 0; i < n; i++) {
        const r = await c.readSimpleReply();
        assert.equal(r.error, 0);
        await c.read(1 << 20);
      }
    } finally {
      c.close();
      await g.close();
    }
  });

  test('a flood of refused requests from a client that does not read stays bounded', async () => {
    const g = await startServer({ maxInflightBytes: 1 << 20, stallTimeoutMs: 0 }, 16 << 20);
    const c = await openClient(g, 'disk', true);
    try {
      c.socket.pause();
      forceGc();
      const before = process.memoryUsage();
      const batch = Buffer.alloc(28 * 50_000);
      for (let i = 0; i < 50_000; i++) {
        batch.writeUInt32BE(0x25609513, i * 28);
        batch.writeUInt16BE(99, i * 28 + 6); // unknown command: an error chunk with a message each
      }
      for (let k = 0; k < 10; k++) c.send(batch);
      await untilServerWaitsForClient(g.server, '500000 refused requests');
      forceGc();
      const after = process.memoryUsage();
      const grown = after.arrayBuffers - before.arrayBuffers + (after.heapUsed - before.heapUsed);
      assert.ok(grown < 96 << 20, `server buffered ${grown} bytes for 500000 refused requests`);
    } finally {
      c.close();
      await g.close();
    }
  });

  test('close() completes even when a client stopped reading its replies', async () => {
    const g = await startServer({ maxInflightBytes: 4 << 20, stallTimeoutMs: 0 }, 16 << 20);
    const c = await openClient(g);
    c.socket.pause();
    for (let i = 0; i < 200; i++) c.sendRequest(CMD_READ, (i % 16) << 20, 1 << 20, { cookie: BigInt(i) });
    await untilServerWaitsForClient(g.server, '200 READs of 1 MiB').catch(async (e: unknown) => {
      c.close();
      await g.close();
      throw e;
    });
    await g.close(); // drains what is in flight, then gives the stalled peer a grace period
    c.close();
  });

  test('a hundred idle connections, then a normal client still works', async () => {
    const idle: RawClient[] = [];
    for (let i = 0; i < 100; i++) {
      const c = await RawClient.connect(f.sock);
      if (i % 3 !== 0) await c.handshake();
      if (i % 3 === 2) await c.go('disk');
      idle.push(c);
    }
    await assertServerHealthy();
    for (const c of idle) c.close();
  });

  test('random bytes in every phase never crash the server (seeded)', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.uint8Array({ minLength: 0, maxLength: 600 }),
        fc.integer({ min: 0, max: 2 }),
        async (junk, phase) => {
          const c = await RawClient.connect(f.sock);
          if (phase >= 1) await c.handshake();
          if (phase >= 2) await c.go('disk');
          c.send(Buffer.from(junk));
          await new Promise((r) => setTimeout(r, 2));
          c.close();
        },
      ),
      { numRuns: 60, seed: 42 },
    );
    await assertServerHealthy();
  });
});

describe('structured fuzzing (seeded)', () => {
  test('well-framed options with random numbers and data never crash the server', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.record({ opt: fc.integer({ min: 0, max: 12 }), data: fc.uint8Array({ maxLength: 64 }) }), {
          maxLength: 8,
        }),
        async (opts) => {
          const c = await RawClient.connect(f.sock);
          await c.handshake();
          for (const o of opts) {
            if (o.opt === NBD_OPT_EXPORT_NAME || o.opt === NBD_OPT_GO || o.opt === NBD_OPT_STARTTLS) continue;
            c.sendOption(o.opt, Buffer.from(o.data));
            const r = await c.readOptionReplies();
            assert.equal(r.at(-1)!.opt, o.opt);
            if (o.opt === NBD_OPT_ABORT) break;
          }
          c.close();
        },
      ),
      { numRuns: 80, seed: 7 },
    );
    await assertServerHealthy();
  });

  test('well-framed requests with random type, flags, offset and length get one reply each', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.boolean(),
        fc.array(
          fc.record({
            type: fc.oneof(fc.constantFrom(0, 1, 3, 4, 5, 6, 7), fc.integer({ min: 8, max: 0xffff })),
            flags: fc.oneof(fc.constant(0), fc.integer({ min: 0, max: 0xffff })),
            offset: fc.oneof(
              fc.integer({ min: 0, max: 64 }).map((n) => BigInt(n * 512)),
              fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }),
            ),
            length: fc.oneof(
              fc.integer({ min: 0, max: 16 }).map((n) => n * 512),
              fc.integer({ min: 0, max: 70_000 }),
            ),
          }),
          { minLength: 1, maxLength: 12 },
        ),
        async (structured, reqs) => {
          const c = await openClient(f, 'disk', structured);
          let cookie = 0n;
          for (const r of reqs) {
            cookie++;
            const data = r.type === CMD_WRITE ? Buffer.alloc(r.length, 0x33) : undefined;
            c.sendRequest(r.type, r.offset, r.length, { flags: r.flags, cookie, data });
            // Read this request's reply (all chunks) before sending the next.
            for (;;) {
              const m = await c.readReply();
              assert.equal(m.cookie, cookie);
              if (m.kind === 'simple') {
                if (m.error === 0 && r.type === CMD_READ) await c.read(r.length);
                break;
              }
              if ((m.flags & 1) === 1) break;
            }
          }
          c.close();
        },
      ),
      { numRuns: 60, seed: 11 },
    );
    await assertServerHealthy();
  });
});

describe('lifecycle', () => {
  test('exports can be added and removed at runtime; removal drains connected clients', async () => {
    const dev = new MemoryDevice({ sizeBytes: 1 << 20 });
    f.server.addExport('late', { device: dev });
    assert.throws(() => f.server.addExport('late', { device: dev }), /already exists/);
    const c = await openClient(f, 'late');
    c.sendRequest(CMD_WRITE, 0, 4096, { cookie: 1n, data: Buffer.alloc(4096, 1) });
    assert.equal((await c.readSimpleReply()).error, 0);
    assert.equal(f.server.connectionCount('late'), 1);
    await f.server.removeExport('late');
    assert.ok(await c.closedByServer());
    assert.equal(f.server.hasExport('late'), false);
    const d = await RawClient.connect(f.sock);
    await d.handshake();
    d.sendOption(NBD_OPT_GO, goData('late'));
    assert.equal((await d.readOptionReply()).type, ERR_UNKNOWN);
    d.close();
    await assert.rejects(f.server.removeExport('late'), /does not exist/);
  });

  test('close() finishes in-flight requests, then refuses new clients', async () => {
    const g = await startServer();
    const c = await openClient(g);
    const data = seededBytes(1 << 20, 9);
    c.sendRequest(CMD_WRITE, 0, data.length, { cookie: 1n, data });
    assert.equal((await c.readSimpleReply()).error, 0);
    for (let i = 0; i < 8; i++) c.sendRequest(CMD_READ, 0, 1 << 20, { cookie: BigInt(10 + i) });
    const first = await c.readSimpleReply(); // at least one request is in flight when close starts
    const closing = g.close();
    let replies = 1;
    await c.read(1 << 20);
    for (;;) {
      try {
        await c.readSimpleReply();
        await c.read(1 << 20);
        replies++;
      } catch {
        break;
      }
    }
    await closing;
    assert.equal(first.error, 0);
    assert.ok(replies >= 1);
    await assert.rejects(RawClient.connect(g.sock));
  });

  test('TLS credentials are validated when the server is made', async () => {
    const { generateKeyPairSync } = await import('node:crypto');
    assert.throws(() => new NbdServer({ tls: 'require' }), /tlsCredentials/);
    const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    assert.throws(
      () =>
        new NbdServer({
          tls: 'on',
          tlsCredentials: { key: privateKey.export({ type: 'pkcs8', format: 'pem' }), cert: 'garbage' },
        }),
      /certificate/,
    );
  });
});

describe('TLS', () => {
  test('require mode: options other than STARTTLS/ABORT are ERR_TLS_REQD, EXPORT_NAME disconnects', async () => {
    const { key, cert } = selfSignedCert(f.dir);
    const server = new NbdServer({ tls: 'require', tlsCredentials: { key, cert } });
    server.addExport('disk', { device: new MemoryDevice({ sizeBytes: 1 << 20 }) });
    await server.listenUnix(`${f.dir}/req.sock`);
    const c = await RawClient.connect(`${f.dir}/req.sock`);
    await c.handshake();
    for (const opt of [NBD_OPT_LIST, NBD_OPT_STRUCTURED_REPLY, NBD_OPT_INFO, NBD_OPT_GO, 999]) {
      c.sendOption(opt, opt === NBD_OPT_GO || opt === NBD_OPT_INFO ? goData('disk') : Buffer.alloc(0));
      assert.equal((await c.readOptionReply()).type, ERR_TLS_REQD, `option ${opt}`);
    }
    c.sendOption(NBD_OPT_EXPORT_NAME, Buffer.from('disk'));
    assert.ok(await c.closedByServer());
    c.close();
    await server.close();
  });

  test('STARTTLS upgrades the session, forgets earlier negotiation, refuses a second STARTTLS', async () => {
    const { key, cert } = selfSignedCert(f.dir);
    const server = new NbdServer({ tls: 'on', tlsCredentials: { key, cert } });
    server.addExport('disk', { device: new MemoryDevice({ sizeBytes: 1 << 20 }) });
    await server.listenUnix(`${f.dir}/on.sock`);
    const raw = await RawClient.connect(`${f.dir}/on.sock`);
    await raw.handshake();
    raw.sendOption(NBD_OPT_STRUCTURED_REPLY);
    assert.equal((await raw.readOptionReply()).type, ACK);
    raw.sendOption(NBD_OPT_STARTTLS);
    assert.equal((await raw.readOptionReply()).type, ACK);
    const c = await raw.startTls(cert);
    c.sendOption(NBD_OPT_STARTTLS);
    assert.equal((await c.readOptionReply()).type, ERR_INVALID);
    // Structured replies were negotiated before STARTTLS and must be forgotten.
    c.sendOption(NBD_OPT_SET_META_CONTEXT, metaData('disk', ['base:allocation']));
    assert.equal((await c.readOptionReply()).type, ERR_INVALID);
    await c.go('disk');
    const data = seededBytes(8192, 21);
    c.sendRequest(CMD_WRITE, 4096, data.length, { cookie: 1n, data });
    assert.deepEqual(await c.readSimpleReply(), { error: 0, cookie: 1n });
    c.sendRequest(CMD_READ, 4096, data.length, { cookie: 2n });
    assert.deepEqual(await c.readSimpleReply(), { error: 0, cookie: 2n });
    assert.ok((await c.read(data.length)).equals(data));
    c.sendRequest(CMD_DISC, 0, 0);
    assert.ok(await c.closedByServer());
    // Plaintext still works in 'on' mode.
    const p = await RawClient.connect(`${f.dir}/on.sock`);
    await p.handshake();
    await p.go('disk');
    p.close();
    await server.close();
  });
});

describe('limits', () => {
  test('the option and command tables match the state table', () => {
    assert.deepEqual(Object.keys(OPTION_HANDLERS).map(Number).sort(), [...STATES.OPTIONS.accepts].sort());
    assert.deepEqual([...Object.keys(COMMANDS).map(Number), CMD_DISC].sort(), [...STATES.TRANSMISSION.accepts].sort());
  });

  test('a client that never finishes the handshake is dropped after the timeout', async () => {
    const server = new NbdServer({ handshakeTimeoutMs: 200 });
    server.addExport('disk', { device: new MemoryDevice({ sizeBytes: 1 << 20 }) });
    await server.listenUnix(`${f.dir}/slowpoke.sock`);
    const c = await RawClient.connect(`${f.dir}/slowpoke.sock`);
    await c.handshake();
    assert.ok(await c.closedByServer(20_000));
    await server.close();
  });

  test('connections beyond maxConnections are refused; the others keep working', async () => {
    const server = new NbdServer({ maxConnections: 2 });
    server.addExport('disk', { device: new MemoryDevice({ sizeBytes: 1 << 20 }) });
    await server.listenUnix(`${f.dir}/few.sock`);
    const a = await RawClient.connect(`${f.dir}/few.sock`);
    const b = await RawClient.connect(`${f.dir}/few.sock`);
    await a.handshake();
    await b.handshake();
    const c = await RawClient.connect(`${f.dir}/few.sock`);
    assert.ok(await c.closedByServer());
    await a.go('disk');
    a.close();
    b.close();
    await server.close();
  });

  test('server options are range-checked', () => {
    assert.throws(() => new NbdServer({ maxPayloadBytes: 100 }), /maxPayloadBytes/);
    assert.throws(() => new NbdServer({ maxConnections: 0 }), /maxConnections/);
    const s = new NbdServer();
    assert.throws(() => s.addExport('x'.repeat(5000), { device: new MemoryDevice({ sizeBytes: 4096 }) }), /4096 bytes/);
  });
});

test('NBD_CMD_DISC: outstanding requests are answered, then the server closes', async () => {
  const c = await openClient(f);
  c.sendRequest(CMD_READ, 0, 65536, { cookie: 1n });
  c.sendRequest(CMD_DISC, 0, 0, { cookie: 2n });
  const r = await c.readSimpleReply();
  assert.deepEqual(r, { error: 0, cookie: 1n });
  await c.read(65536);
  assert.ok(await c.closedByServer());
});
