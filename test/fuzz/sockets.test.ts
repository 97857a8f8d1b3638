// Fuzz targets for the two socket protocols, driven against real servers over Unix sockets:
//   nbd:     an NbdServer (exports 'disk' and 'ro'); inputs are random-but-plausible byte streams
//            (client flags, option sequences with sane or insane lengths, GO, then requests in
//            compact or extended form) or raw junk, sent in random pieces. The server must not crash,
//            must answer or hang up, must drop the connection's state once the client goes
//            (connectionCount back to 0) and still serve a well-behaved client afterwards.
//   control: a ControlServer with the daemon's handlers on a DaemonCore; inputs are lines of
//            mutated JSON requests. Every line must get a JSON response or a hang-up, and no
//            response may be an internal error (a handler that threw something other than a
//            CryptmapError).
import assert from 'node:assert/strict';
import { connect } from 'node:net';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { pollUntil } from '../helpers/wait.js';
import { testTempDir } from '../helpers/tmp.js';
import fc from 'fast-check';
import { ControlServer } from '../../src/control/server.js';
import { DaemonCore } from '../../src/daemon/core.js';
import { daemonHandlers } from '../../src/daemon/handlers.js';
import { setLogSink } from '../../src/util/log.js';
import { openClient, startServer, type Fixture } from '../nbd/helpers.js';
import { type FuzzFn, fuzz, junk } from './harness.js';

const T = { timeout: 180_000 };
const IHAVEOPT = Buffer.from('IHAVEOPT');

const u16 = (v: number) => {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v & 0xffff);
  return b;
};
const u32 = (v: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  return b;
};
const u64 = (v: bigint) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt.asUintN(64, v));
  return b;
};

const name = fc.oneof(
  fc.constantFrom('disk', 'ro', '', 'nope', 'disk\0', 'x'.repeat(5000)),
  fc.string({ maxLength: 8 }),
);
const nameData = fc
  .tuple(name, fc.array(fc.integer({ min: 0, max: 5 }), { maxLength: 4 }), fc.boolean())
  .map(([n, infos, lie]) => {
    const nb = Buffer.from(n);
    return Buffer.concat([u32(lie ? nb.length + 7 : nb.length), nb, u16(infos.length), ...infos.map(u16)]);
  });
const metaData = fc
  .tuple(
    name,
    fc.array(fc.constantFrom('base:allocation', 'base:', 'qemu:dirty-bitmap:x', '', 'x:y'), { maxLength: 3 }),
  )
  .map(([n, qs]) => {
    const nb = Buffer.from(n);
    return Buffer.concat([
      u32(nb.length),
      nb,
      u32(qs.length),
      ...qs.flatMap((q) => [u32(Buffer.byteLength(q)), Buffer.from(q)]),
    ]);
  });
const optData = fc.oneof(
  nameData,
  metaData,
  fc.uint8Array({ maxLength: 64 }).map((u) => Buffer.from(u)),
  fc.constant(Buffer.alloc(0)),
);
const option = fc.record({
  opt: fc.oneof(
    { weight: 4, arbitrary: fc.constantFrom(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11) },
    { weight: 1, arbitrary: fc.nat() },
  ),
  data: optData,
  len: fc.oneof(
    { weight: 6, arbitrary: fc.constant(-1) },
    { weight: 1, arbitrary: fc.constantFrom(0, 1, 0xffffffff, 65537, 1 << 30) },
  ),
  magic: fc.oneof({ weight: 9, arbitrary: fc.constant(true) }, { weight: 1, arbitrary: fc.constant(false) }),
});
const request = fc.record({
  ext: fc.boolean(),
  flags: fc.oneof(fc.constantFrom(0, 1, 2, 4, 8, 16), fc.nat(0xffff)),
  type: fc.oneof(
    { weight: 5, arbitrary: fc.constantFrom(0, 1, 2, 3, 4, 5, 6, 7) },
    { weight: 1, arbitrary: fc.nat(0xffff) },
  ),
  cookie: fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
  offset: fc.oneof(
    fc.constantFrom(0n, 512n, 4096n, (16n << 20n) - 512n, 16n << 20n, 2n ** 63n, 2n ** 64n - 1n),
    fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
  ),
  length: fc.oneof(fc.constantFrom(0, 1, 512, 4096, 65536, 32 << 20, (32 << 20) + 1, 0xffffffff), fc.nat()),
  payload: fc.nat(8192),
  badMagic: fc.oneof({ weight: 19, arbitrary: fc.constant(false) }, { weight: 1, arbitrary: fc.constant(true) }),
});

interface Req {
  ext: boolean;
  flags: number;
  type: number;
  cookie: bigint;
  offset: bigint;
  length: number;
  payload: number;
  badMagic: boolean;
}

function encodeRequest(r: Req): Buffer {
  const magic = r.badMagic ? 0x12345678 : r.ext ? 0x21e41c71 : 0x25609513;
  const head = r.ext
    ? Buffer.concat([u32(magic), u16(r.flags), u16(r.type), u64(r.cookie), u64(r.offset), u64(BigInt(r.length))])
    : Buffer.concat([u32(magic), u16(r.flags), u16(r.type), u64(r.cookie), u64(r.offset), u32(r.length)]);
  // WRITE carries payload: usually the announced length (when small), sometimes less.
  const pay = r.type === 1 ? Math.min(r.length, r.payload) : 0;
  return Buffer.concat([head, Buffer.alloc(pay, 0x5a)]);
}

const session = fc
  .record({
    clientFlags: fc.oneof(fc.constantFrom(0, 1, 2, 3), fc.nat()),
    options: fc.array(option, { maxLength: 5 }),
    go: fc.oneof(fc.constant('disk'), fc.constant('ro'), fc.constant(null)),
    requests: fc.array(request, { maxLength: 6 }),
  })
  .map(({ clientFlags, options, go, requests }) => {
    const parts: Buffer[] = [u32(clientFlags)];
    for (const o of options) {
      const len = o.len < 0 ? o.data.length : o.len;
      parts.push(o.magic ? IHAVEOPT : Buffer.from('IHAVEOPX'), u32(o.opt), u32(len), o.data);
    }
    if (go !== null) {
      const nb = Buffer.from(go);
      const d = Buffer.concat([u32(nb.length), nb, u16(0)]);
      parts.push(IHAVEOPT, u32(7), u32(d.length), d);
    }
    for (const r of requests) parts.push(encodeRequest(r));
    return Buffer.concat(parts);
  });

export const nbdArb = fc.oneof({ weight: 6, arbitrary: session }, { weight: 1, arbitrary: junk() });

/** Send `input` in a few pieces, wait for the server to hang up or go quiet, then disconnect. */
function drive(sock: string, input: Buffer, quietMs = 25): Promise<void> {
  return new Promise((resolve, reject) => {
    const s = connect(sock);
    let timer: NodeJS.Timeout | undefined;
    let got = 0;
    const done = () => {
      clearTimeout(timer);
      s.destroy();
      resolve();
    };
    const quiet = () => {
      clearTimeout(timer);
      timer = setTimeout(done, quietMs);
    };
    s.on('data', (d: Buffer) => {
      got += d.length;
      quiet();
    });
    s.on('close', done);
    s.on('error', () => done());
    s.once('connect', () => {
      const cut = [Math.floor(input.length / 3), Math.floor((2 * input.length) / 3)];
      s.write(input.subarray(0, cut[0]));
      setImmediate(() => {
        if (s.destroyed) return;
        s.write(input.subarray(cut[0], cut[1]));
        setImmediate(() => {
          if (!s.destroyed) s.write(input.subarray(cut[1]));
          quiet();
        });
      });
    });
    s.setTimeout(10_000, () => reject(new Error(`no greeting or hang-up within 10 s (got ${got} bytes)`)));
  });
}

let fx: Fixture;
before(async () => {
  setLogSink(() => {});
  fx = await startServer({ handshakeTimeoutMs: 5000, maxInflightBytes: 64 << 20 });
});
after(async () => {
  setLogSink((l) => process.stderr.write(`${l}\n`));
  await fx.close();
});

async function settled(): Promise<void> {
  await pollUntil(() => fx.server.connectionCount() === 0, {
    deadlineMs: 10_000,
    intervalMs: 10,
    what: 'the server to stop counting a connection whose client left',
  });
}

export async function nbdHealthy(f: Fixture): Promise<void> {
  const c = await openClient(f, 'disk');
  c.sendRequest(0, 0, 4096, { cookie: 42n });
  const r = await c.readSimpleReply();
  assert.equal(r.error, 0);
  await c.read(4096);
  c.close();
}

export const nbdTarget =
  (f: () => Fixture): FuzzFn =>
  (input) =>
    drive(f().sock, input);

test('fuzz: NBD handshake and requests against a live server', T, async () => {
  let n = 0;
  await fuzz(
    'nbd',
    nbdArb,
    nbdTarget(() => fx),
    {
      seed: 0xb0d,
      numRuns: 250,
      async after() {
        await settled();
        if (++n % 25 === 0) await nbdHealthy(fx);
      },
    },
  );
  await nbdHealthy(fx);
});

// ---- control socket ----

const CTRL_SAMPLES = [
  { id: 1, op: 'daemon.ping' },
  { id: 2, op: 'volume.status', args: { name: 'v' } },
  { id: 3, op: 'volume.list' },
  { id: 4, op: 'dm.create', args: { name: 'z', table: '0 8 zero' } },
  { id: 5, op: 'dm.remove', args: { name: 'z', force: true } },
  {
    id: 6,
    op: 'volume.open',
    args: {
      key: '00'.repeat(64),
      mapping: {
        name: 'v',
        type: 'PLAIN',
        uuid: '',
        device: '/nonexistent',
        cipher: 'aes-xts-plain64',
        keyBytes: 64,
        sectorBytes: 512,
        ivOffsetSectors: '0',
        offsetSectors: 0,
        sizeSectors: 8,
      },
    },
  },
  { id: 7, op: 'dm.message', args: { name: 'z', sector: 0, message: ['x'] } },
  { id: 8, op: 'volume.close', args: { name: 'v' } },
  { id: 9, op: 'dm.table', args: { name: 'z' } },
  { id: 10, op: 'attach', args: { name: 'nope' } },
  { id: 11, op: 'volume.suspend', args: { name: 'v' } },
  { id: 12, op: 'volume.resume', args: { name: 'v', key: '00'.repeat(64) } },
  { id: 13, op: 'volume.refresh', args: { name: 'v', key: '00'.repeat(64), flags: { allowDiscards: true } } },
  { id: 14, op: 'volume.resize', args: { name: 'v', sizeSectors: 8, key: '00'.repeat(64) } },
];

const jsonOdd = fc.oneof(
  fc.jsonValue({ maxDepth: 2 }),
  fc.constantFrom<unknown>(
    null,
    -1,
    1e300,
    '',
    'z',
    '0 8 zero',
    '0 8 error',
    { toString: 1 },
    [],
    {},
    '__proto__',
    2 ** 53 + 2,
  ),
);
export const controlArb = fc
  .array(
    fc
      .tuple(
        fc.constantFrom(...CTRL_SAMPLES),
        fc.array(
          fc.tuple(
            fc.constantFrom(
              'id',
              'op',
              'args',
              'name',
              'table',
              'mapping',
              'key',
              'force',
              'sector',
              'message',
              'cipher',
              'keyBytes',
              'sizeSectors',
              'sectorBytes',
              'ivOffsetSectors',
              'flags',
            ),
            jsonOdd,
          ),
          { maxLength: 3 },
        ),
      )
      .map(([base, edits]) => {
        const r = structuredClone(base) as Record<string, unknown>;
        for (const [k, v] of edits) {
          const obj = (x: unknown) =>
            x !== null && typeof x === 'object' && !Array.isArray(x) ? (x as Record<string, unknown>) : undefined;
          const args = obj(r.args);
          const mapping = obj(args?.mapping);
          if (mapping && Object.hasOwn(mapping, k)) mapping[k] = v;
          else if (args && Object.hasOwn(args, k)) args[k] = v;
          else r[k] = v;
        }
        return JSON.stringify(r);
      }),
    { minLength: 1, maxLength: 6 },
  )
  .map((lines) => Buffer.from(`${lines.join('\n')}\n`));

/** Send lines, collect responses until every line was answered or the server hung up. */
function ctrlDrive(sock: string, input: Buffer): Promise<void> {
  const expected = input
    .toString()
    .split('\n')
    .filter((l) => l.trim() !== '').length;
  return new Promise((resolve, reject) => {
    const s = connect(sock);
    let buf = '';
    let answered = 0;
    const timer = setTimeout(() => {
      s.destroy();
      reject(new Error(`control: ${answered} of ${expected} lines answered within 10 s`));
    }, 10_000);
    const finish = (e?: Error) => {
      clearTimeout(timer);
      s.destroy();
      if (e) reject(e);
      else resolve();
    };
    s.on('data', (d) => {
      buf += d.toString();
      let nl = buf.indexOf('\n');
      while (nl >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        answered++;
        let r: { ok: boolean; error?: { code: string; message: string } };
        try {
          r = JSON.parse(line);
        } catch {
          return finish(new Error(`control: response is not JSON: ${line.slice(0, 200)}`));
        }
        if (!r.ok && r.error?.code === 'EINTERNAL')
          return finish(new Error(`control: internal error: ${r.error.message}`));
        nl = buf.indexOf('\n');
      }
      if (answered >= expected) finish();
    });
    s.on('close', () => finish());
    s.on('error', () => finish());
    s.once('connect', () => s.write(input));
  });
}

test('fuzz: control socket protocol against the daemon handlers', T, async (t) => {
  const dir = testTempDir(t, 'cryptmap-fuzz-ctl-');
  const core = new DaemonCore({ nbdSocketPath: join(dir, 'nbd.sock'), attachDir: join(dir, 'attach') });
  const server = new ControlServer(daemonHandlers(core));
  const sock = join(dir, 'control.sock');
  await server.listen(sock);
  try {
    await fuzz('control', controlArb, (b) => ctrlDrive(sock, b), { seed: 0xc7, numRuns: 250 });
  } finally {
    await server.close();
    await core.shutdown();
  }
});
