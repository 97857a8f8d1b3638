// The NBD client block device against real servers as the oracle: nbdkit (memory, file; without
// structured replies; with the blocksize-policy filter enforcing block sizes; with the error
// filter) and qemu-nbd. Bytes written through the client are read back with nbdcopy and the
// other way round.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { NbdDevice } from '../../src/blockdev/nbd-client/device.js';
import { isCryptmapError } from '../../src/util/errors.js';
import { seededBytes } from '../helpers/prng.js';
import { mustRun } from '../helpers/tools.js';
import { useServers } from './nbd-servers.js';

const servers = useServers('cryptmap-nbdci-');
const dir = servers.dir;
const startServer = servers.start;
const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');

test('nbdkit memory: writes through the client are what nbdcopy reads, and back', async () => {
  const s = await startServer('nbdkit', (sock) => ['-f', '-U', sock, 'memory', '32M']);
  const uri = `nbd+unix:///?socket=${s.sock}`;
  const dev = await NbdDevice.open(uri, { connections: 4 });
  assert.equal(dev.sizeBytes, 32 << 20);
  assert.equal(dev.capabilities.multiConn, true);
  assert.equal(dev.health.connections, 4);
  const data = seededBytes(8 << 20, 7);
  const parts = [];
  for (let at = 0; at < data.length; at += 256 << 10)
    parts.push(dev.write(at + (4 << 20), data.subarray(at, at + (256 << 10))));
  await Promise.all(parts);
  await dev.flush();
  const img = join(dir, 'copy.img');
  await mustRun('nbdcopy', [uri, img]);
  const whole = readFileSync(img);
  assert.equal(sha(whole.subarray(4 << 20, 12 << 20)), sha(data));
  // nbdcopy writes, the client reads.
  const other = seededBytes(32 << 20, 9);
  writeFileSync(img, other);
  await mustRun('nbdcopy', [img, uri]);
  const back = Buffer.alloc(32 << 20);
  await dev.read(0, back);
  assert.equal(sha(back), sha(other));
  const ext = await dev.blockStatus(0, 32 << 20);
  assert.equal(
    ext.reduce((a, e) => a + e.lengthBytes, 0),
    32 << 20,
  );
  await dev.writeZeroes(0, 32 << 20);
  const zext = await dev.blockStatus(0, 32 << 20);
  assert.ok(zext.every((e) => e.zero));
  await dev.close();
  await s.stop();
});

test('nbdkit without structured replies: simple replies, no block status', async () => {
  const s = await startServer('nbdkit', (sock) => ['-f', '--no-sr', '-U', sock, 'memory', '4M']);
  const dev = await NbdDevice.open(`nbd+unix:///?socket=${s.sock}`);
  assert.equal(dev.capabilities.blockStatus, false);
  const d = seededBytes(1 << 20, 3);
  await dev.write(1 << 20, d);
  const back = Buffer.alloc(1 << 20);
  await dev.read(1 << 20, back);
  assert.ok(back.equals(d));
  await assert.rejects(dev.blockStatus(0, 4096), { code: 'ENOTSUP' });
  await dev.close();
  await s.stop();
});

test('block size constraints are honoured: nbdkit blocksize-policy with error policy', async () => {
  const s = await startServer('nbdkit', (sock) => [
    '-f',
    '-U',
    sock,
    '--filter=blocksize-policy',
    'memory',
    '8M',
    'blocksize-minimum=4096',
    'blocksize-preferred=65536',
    'blocksize-maximum=131072',
    'blocksize-error-policy=error',
  ]);
  const dev = await NbdDevice.open(`nbd+unix:///?socket=${s.sock}`);
  assert.deepEqual(dev.limits, { logicalBlockBytes: 4096, physicalBlockBytes: 65536, maxRequestBytes: 131072 });
  const d = seededBytes(1 << 20, 4);
  await dev.write(0, d); // split into 128 KiB requests, or the server errors
  const back = Buffer.alloc(1 << 20);
  await dev.read(0, back);
  assert.ok(back.equals(d));
  await assert.rejects(dev.read(512, Buffer.alloc(512)), { code: 'EALIGN' });
  await dev.close();
  await s.stop();
});

test('server errors fail the request with its errno and leave the device usable', async () => {
  const s = await startServer('nbdkit', (sock) => [
    '-f',
    '-U',
    sock,
    '--filter=error',
    'memory',
    '4M',
    'error-pwrite=ENOSPC',
    'error-pwrite-rate=1',
  ]);
  const dev = await NbdDevice.open(`nbd+unix:///?socket=${s.sock}`);
  await assert.rejects(
    dev.write(0, Buffer.alloc(4096, 1)),
    (e) => isCryptmapError(e, 'ENBDIO') && e.errno === 'ENOSPC',
  );
  await dev.read(0, Buffer.alloc(4096));
  assert.equal(dev.health.state, 'ready');
  await dev.close();
  await s.stop();
});

test('qemu-nbd on a raw file: the file holds what the client wrote', async () => {
  const img = join(dir, 'q.img');
  writeFileSync(img, Buffer.alloc(16 << 20));
  const s = await startServer('qemu-nbd', (sock) => [
    '-k',
    sock,
    '-f',
    'raw',
    '-x',
    'disk',
    '-t',
    '-e',
    '4',
    '--cache=writeback',
    img,
  ]);
  const dev = await NbdDevice.open(`nbd+unix:///disk?socket=${s.sock}`);
  const d = seededBytes(4 << 20, 11);
  await dev.write(2 << 20, d, { fua: true });
  await dev.discard(8 << 20, 1 << 20);
  await dev.flush();
  const back = Buffer.alloc(4 << 20);
  await dev.read(2 << 20, back);
  assert.ok(back.equals(d));
  await dev.close();
  await s.stop();
  assert.equal(sha(readFileSync(img).subarray(2 << 20, 6 << 20)), sha(d));
});
