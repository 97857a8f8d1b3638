// The NBD client when the real server dies under it. nbdkit with its cache filter in writeback mode
// keeps acknowledged writes in memory until a FLUSH, so a kill -9 loses them, as a storage server's
// volatile cache would: the client must replay them after reconnecting (no acknowledged write lost),
// or, without replay copies, fail the next flush. A server that stays dead fails the device with EIO.
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { pollUntil } from '../helpers/wait.js';
import { startWriteLoad } from './write-load.js';
import { NbdDevice } from '../../src/blockdev/nbd-client/device.js';
import { isCryptmapError } from '../../src/util/errors.js';
import { useServers } from './nbd-servers.js';

const servers = useServers('cryptmap-nbdrc-');
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const MiB = 1 << 20;

const nbdkitArgs = (img: string) => (sock: string) => [
  '-f',
  '-U',
  sock,
  '--filter=cache',
  'file',
  img,
  'cache=writeback',
];

test('nbdkit killed -9 and restarted twice mid-load: no acknowledged write is lost', async () => {
  const img = join(servers.dir, 'load.img');
  const SIZE = 32 * MiB;
  writeFileSync(img, Buffer.alloc(SIZE));
  let srv = await servers.start('nbdkit', nbdkitArgs(img));
  const sock = srv.sock;
  const dev = await NbdDevice.open(`nbd+unix:///?socket=${sock}`, { reconnectTimeoutMs: 20_000 });
  const model = Buffer.alloc(SIZE);
  const load = startWriteLoad(dev, model, { readBackEvery: 7, flushEvery: 25 });
  for (let round = 0; round < 2; round++) {
    await sleep(700);
    await srv.kill();
    await sleep(300);
    srv = await servers.start('nbdkit', nbdkitArgs(img), sock);
    // Wait for the client to be back before the next crash.
    await pollUntil(() => dev.health.reconnects >= round + 1 && dev.health.state === 'ready', {
      deadlineMs: 20_000,
      what: `reconnect ${round + 1} of the client`,
      detail: () => JSON.stringify(dev.health),
    });
    assert.equal(dev.health.state, 'ready', JSON.stringify(dev.health));
  }
  await sleep(700);
  await load.stop();
  assert.deepEqual(load.errors, []);
  assert.ok(load.ops > 50, `only ${load.ops} operations ran`);
  assert.ok(dev.health.reconnects >= 2, JSON.stringify(dev.health));
  assert.equal(dev.health.state, 'ready');
  await dev.close(); // flushes
  await srv.stop();
  assert.ok(readFileSync(img).equals(model), 'the file holds every acknowledged write');
});

test('without replay copies the loss is reported by the next flush, not hidden', async () => {
  const img = join(servers.dir, 'lost.img');
  writeFileSync(img, Buffer.alloc(4 * MiB));
  let srv = await servers.start('nbdkit', nbdkitArgs(img));
  const dev = await NbdDevice.open(`nbd+unix:///?socket=${srv.sock}`, { replayBytes: 0 });
  await dev.write(0, Buffer.alloc(MiB, 0x33)); // acknowledged, in nbdkit's cache only
  await srv.kill();
  srv = await servers.start('nbdkit', nbdkitArgs(img), srv.sock);
  await assert.rejects(dev.flush(), (e) => isCryptmapError(e, 'ENBDLOST') && e.errno === 'EIO');
  const back = Buffer.alloc(MiB);
  await dev.read(0, back);
  assert.ok(
    back.every((b) => b === 0),
    'the cache filter really lost the write (what replay prevents)',
  );
  await dev.close();
  await srv.stop();
});

test('a server killed for good turns the device to EIO within the reconnect deadline', async () => {
  const img = join(servers.dir, 'gone.img');
  writeFileSync(img, Buffer.alloc(MiB));
  const srv = await servers.start('nbdkit', nbdkitArgs(img));
  const dev = await NbdDevice.open(`nbd+unix:///?socket=${srv.sock}`, { reconnectTimeoutMs: 1000 });
  await dev.read(0, Buffer.alloc(4096));
  await srv.kill();
  const t0 = Date.now();
  await assert.rejects(dev.read(0, Buffer.alloc(4096)), (e) => isCryptmapError(e, 'ENBDGONE') && e.errno === 'EIO');
  assert.ok(Date.now() - t0 < 10_000);
  assert.equal(dev.health.state, 'failed');
  assert.match(dev.health.lastError ?? '', /did not come back within 1000 ms/);
  await dev.close();
});
