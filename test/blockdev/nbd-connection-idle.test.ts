// The NBD client's reply deadline (src/blockdev/nbd-client/connection.ts) counts from the first
// request after an idle spell, not from the last reply: a request sent after a minute of silence is
// not timed out at once. Mock timers drive the clock (no sleeps, no timing on a loaded machine).
import assert from 'node:assert/strict';
import type { Socket } from 'node:net';
import { Duplex } from 'node:stream';
import { mock, test } from 'node:test';
import { NbdConnection, type WireRequest } from '../../src/blockdev/nbd-client/connection.js';

const NBD_CMD_FLUSH = 3;

function harness(timeoutMs: number) {
  const sent: Buffer[] = [];
  const stream = new Duplex({
    read() {},
    write(chunk: Buffer, _enc, cb) {
      sent.push(chunk);
      cb();
    },
  });
  const closed: string[] = [];
  const conn = new NbdConnection(
    {
      stream,
      raw: stream as unknown as Socket,
      rest: null,
      exportSize: 1n << 20n,
      transmissionFlags: 1,
      structuredReplies: false,
      tls: false,
    },
    { closed: (_c, reason) => closed.push(reason), progress: () => undefined },
    timeoutMs,
  );
  /** The simple reply to the last request sent (cookie at bytes 8..16 of its header). */
  const reply = () => {
    const req = sent.filter((b) => b.length === 28).at(-1)!;
    const r = Buffer.alloc(16);
    r.writeUInt32BE(0x67446698, 0);
    req.copy(r, 8, 8, 16);
    stream.push(r);
  };
  return { conn, closed, reply };
}

test('a request after a long idle spell gets the full reply deadline; a silent server still times out', async () => {
  mock.timers.enable({ apis: ['setInterval', 'Date'] });
  try {
    const { conn, closed, reply } = harness(1000);
    mock.timers.tick(60_500); // a minute without I/O, half-way between two ticks of the 1 s check
    let answered = 0;
    const flush = (): WireRequest => ({
      type: NBD_CMD_FLUSH,
      flags: 0,
      offset: 0,
      length: 0,
      done: (e) => {
        assert.equal(e, null);
        answered++;
      },
    });
    conn.submit(flush());
    await new Promise((r) => setImmediate(r)); // the uncork: the request is on the wire
    mock.timers.tick(600); // the check runs once, 600 ms after the request
    assert.deepEqual(closed, [], 'the first request after the idle minute was timed out at once');
    reply();
    await new Promise((r) => setImmediate(r));
    assert.equal(answered, 1);
    assert.equal(conn.inflight, 0);
    // The deadline itself still holds: a request the server never answers ends the connection.
    mock.timers.tick(60_000);
    conn.submit(flush());
    await new Promise((r) => setImmediate(r));
    mock.timers.tick(2000);
    assert.equal(closed.length, 1);
    assert.match(closed[0]!, /no reply from the server for 1000 ms/);
  } finally {
    mock.timers.reset();
  }
});
