// The NBD client against Debian's reference `nbd-server` (package nbd-server, scripts/install-deps.sh)
// as a second real peer beside nbdkit and qemu-nbd. nbd-server 3.24 negotiates fixed newstyle and
// NBD_OPT_GO but no structured replies: the client falls back to simple replies (no block status)
// and still reads, writes (with FUA), flushes, trims and writes zeroes, over the several connections
// CAN_MULTI_CONN allows. nbdcopy (libnbd) is the second reader of what the client wrote. The server
// daemonizes (it has no foreground mode that serves more than one connection): it is started with a
// pid file and stopped by signalling its process group, which holds the per-connection children.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { existsSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { makeTempDir } from '../helpers/tmp.js';
import { NbdDevice } from '../../src/blockdev/nbd-client/device.js';
import { isCryptmapError } from '../../src/util/errors.js';
import { seededBytes } from '../helpers/prng.js';
import { mustRun, requireTool } from '../helpers/tools.js';

const { dir, cleanup } = makeTempDir('cryptmap-nbdsrv-');
const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');
const groups = new Set<number>();
after(() => {
  for (const g of groups) killGroup(g, 'SIGKILL');
  cleanup();
});

function killGroup(pgid: number, sig: NodeJS.Signals): void {
  try {
    process.kill(-pgid, sig);
  } catch {
    // already gone
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

function accepts(sock: string): Promise<boolean> {
  return new Promise((done) => {
    const c = connect(sock);
    c.once('connect', () => {
      c.destroy();
      done(true);
    });
    c.once('error', () => done(false));
  });
}

interface NbdServer {
  uri: string;
  sock: string;
  /** Signal the whole process group (the listener and its per-connection children) and wait until the listener is gone. */
  stop(sig?: NodeJS.Signals): Promise<void>;
}

/** nbd-server exporting `img` as `disk` on a Unix socket, with flush, FUA and trim announced. */
async function startNbdServer(img: string, tag: string): Promise<NbdServer> {
  requireTool('nbd-server');
  const sock = join(dir, `${tag}.sock`);
  const pidFile = join(dir, `${tag}.pid`);
  const cfg = join(dir, `${tag}.conf`);
  rmSync(sock, { force: true });
  rmSync(pidFile, { force: true });
  writeFileSync(
    cfg,
    `[generic]\n  unixsock = ${sock}\n[disk]\n  exportname = ${img}\n  flush = true\n  fua = true\n  trim = true\n`,
  );
  // Returns once the daemon forked; the pid file and the socket follow.
  await mustRun('nbd-server', ['-C', cfg, '-p', pidFile]);
  const t0 = Date.now();
  let pid = 0;
  for (;;) {
    if (pid === 0 && existsSync(pidFile)) {
      const p = Number(readFileSync(pidFile, 'utf8').trim());
      if (Number.isSafeInteger(p) && p > 0) {
        pid = p;
        groups.add(pid);
      }
    }
    if (pid !== 0 && existsSync(sock) && (await accepts(sock))) break;
    if (Date.now() - t0 > 15_000) throw new Error(`nbd-server did not accept connections on ${sock} in 15 s`);
    await new Promise((r) => setTimeout(r, 20));
  }
  const stop = async (sig: NodeJS.Signals = 'SIGTERM') => {
    killGroup(pid, sig);
    const t1 = Date.now();
    while (alive(pid)) {
      if (Date.now() - t1 > 15_000) throw new Error(`nbd-server ${pid} still runs 15 s after ${sig}`);
      await new Promise((r) => setTimeout(r, 20));
    }
    groups.delete(pid);
  };
  return { uri: `nbd+unix:///disk?socket=${sock}`, sock, stop };
}

test('nbd-server: simple replies only; read, write (FUA), flush, trim, write zeroes over multi-conn; nbdcopy agrees', async () => {
  const img = join(dir, 'a.img');
  writeFileSync(img, '');
  truncateSync(img, 32 << 20);
  const s = await startNbdServer(img, 'a');
  const dev = await NbdDevice.open(s.uri, { connections: 4 });
  try {
    assert.equal(dev.sizeBytes, 32 << 20);
    // What nbd-server 3.24 advertises with flush, fua and trim on; no structured replies, so no
    // base:allocation context: block status is refused, not guessed.
    assert.deepEqual(
      { ...dev.capabilities },
      {
        write: true,
        flush: true,
        fua: true,
        discard: true,
        writeZeroes: true,
        blockStatus: false,
        multiConn: true,
      },
    );
    assert.equal(dev.health.connections, 4);
    await assert.rejects(dev.blockStatus(0, 4096), (e) => isCryptmapError(e) && e.code === 'ENOTSUP');

    // Many writes in flight across the connections, some with FUA, then a flush.
    const data = seededBytes(8 << 20, 11);
    const parts: Promise<void>[] = [];
    for (let at = 0; at < data.length; at += 256 << 10)
      parts.push(dev.write(at + (1 << 20), data.subarray(at, at + (256 << 10)), { fua: (at >> 18) % 3 === 0 }));
    await Promise.all(parts);
    await dev.flush();
    // The file behind the export and nbdcopy (another client) both see the bytes.
    assert.equal(sha(readFileSync(img).subarray(1 << 20, 9 << 20)), sha(data));
    const copy = join(dir, 'a-copy.img');
    await mustRun('nbdcopy', [s.uri, copy]);
    assert.equal(sha(readFileSync(copy).subarray(1 << 20, 9 << 20)), sha(data));

    // nbdcopy writes, the client reads it back (many reads in flight, simple replies).
    const other = seededBytes(32 << 20, 12);
    writeFileSync(copy, other);
    await mustRun('nbdcopy', [copy, s.uri]);
    const back = Buffer.alloc(32 << 20);
    const reads: Promise<void>[] = [];
    for (let at = 0; at < back.length; at += 1 << 20) reads.push(dev.read(at, back.subarray(at, at + (1 << 20))));
    await Promise.all(reads);
    assert.equal(sha(back), sha(other));

    // WRITE_ZEROES reads back as zeroes; TRIM is accepted (its effect on reads is the server's choice).
    await dev.writeZeroes(2 << 20, 3 << 20);
    await dev.discard(8 << 20, 1 << 20);
    await dev.flush();
    const z = Buffer.alloc(3 << 20, 1);
    await dev.read(2 << 20, z);
    assert.ok(z.every((b) => b === 0));
    const edge = Buffer.alloc(4096);
    await dev.read(5 << 20, edge);
    assert.equal(sha(edge), sha(other.subarray(5 << 20, (5 << 20) + 4096)));
    // Out of range is refused by the client before it reaches the server.
    await assert.rejects(dev.read((32 << 20) - 512, Buffer.alloc(1024)), (e) => isCryptmapError(e));
  } finally {
    await dev.close();
    await s.stop();
  }
});

test('nbd-server killed -9 and restarted under the client: acknowledged writes survive, I/O resumes', async () => {
  const img = join(dir, 'b.img');
  writeFileSync(img, '');
  truncateSync(img, 16 << 20);
  let s = await startNbdServer(img, 'b');
  const dev = await NbdDevice.open(s.uri, { connections: 2, reconnectTimeoutMs: 30_000 });
  try {
    const first = seededBytes(4 << 20, 21);
    await dev.write(0, first);
    await dev.flush();
    await s.stop('SIGKILL');
    // Submitted while the server is gone: held, re-sent once it is back.
    const second = seededBytes(4 << 20, 22);
    const pending = dev.write(8 << 20, second);
    s = await startNbdServer(img, 'b');
    await pending;
    await dev.flush();
    const back = Buffer.alloc(16 << 20);
    await dev.read(0, back);
    assert.equal(sha(back.subarray(0, 4 << 20)), sha(first));
    assert.equal(sha(back.subarray(8 << 20, 12 << 20)), sha(second));
    assert.ok(dev.health.reconnects >= 1, `reconnects: ${dev.health.reconnects}`);
    assert.equal(dev.health.state, 'ready');
  } finally {
    await dev.close();
    await s.stop();
  }
});
