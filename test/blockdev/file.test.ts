// The file backend: sparse creation, strict ranges, read-only, short I/O, flush/FUA, discard and
// block status through the native addon when it loads (and not advertised otherwise).
import assert from 'node:assert/strict';
import { mkdirSync, readFileSync, statSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { fileTempDir } from '../helpers/tmp.js';
import { FileDevice } from '../../src/blockdev/file.js';
import { loadNative } from '../../src/util/native.js';

const dir = fileTempDir('cryptmap-file-');
let n = 0;
const path = () => join(dir, `f${n++}.img`);

test('create makes a sparse file of the given size; reads and writes round-trip', async () => {
  const p = path();
  const dev = await FileDevice.create(p, 4 << 20);
  assert.equal(dev.sizeBytes, 4 << 20);
  assert.equal(statSync(p).size, 4 << 20);
  assert.ok(statSync(p).blocks * 512 < 1 << 20, 'sparse');
  assert.equal(dev.isBlockDevice, false);
  assert.deepEqual(dev.limits, { logicalBlockBytes: 512, physicalBlockBytes: 4096, maxRequestBytes: 64 << 20 });
  const data = Buffer.alloc(8192, 0x5a);
  await dev.write(4096, data);
  await dev.write(1 << 20, data, { fua: true });
  await dev.flush();
  const back = Buffer.alloc(8192);
  await dev.read(4096, back);
  assert.ok(back.equals(data));
  await dev.read(0, Buffer.alloc(0));
  await dev.close();
  await dev.close();
  const file = readFileSync(p);
  assert.ok(file.subarray(1 << 20, (1 << 20) + 8192).equals(data));
  await assert.rejects(dev.read(0, Buffer.alloc(512)), { code: 'ECLOSED', errno: 'EIO' });
  await assert.rejects(FileDevice.create(p, 4096), { code: 'ECREATE', message: /cannot create .*f0\.img/ });
  await assert.rejects(FileDevice.create(path(), 1000), {
    code: 'EDEVSIZE',
    message: 'file device size 1000 is not a multiple of 512 bytes',
  });
});

test('open: missing files, directories, odd sizes, read-only', async () => {
  await assert.rejects(FileDevice.open(join(dir, 'missing')), { code: 'EOPEN', errno: 'ENOENT', exitCode: 4 });
  const sub = join(dir, 'sub');
  mkdirSync(sub);
  await assert.rejects(FileDevice.open(sub, { readOnly: true }), {
    code: 'ENOTBLK',
    message: `${sub} is neither a regular file nor a block device`,
  });
  const p = path();
  writeFileSync(p, Buffer.alloc(1000, 1));
  const dev = await FileDevice.open(p, { readOnly: true });
  assert.equal(dev.sizeBytes, 512, 'rounded down to whole logical blocks');
  assert.equal(dev.capabilities.write, false);
  assert.equal(dev.capabilities.discard, false);
  await assert.rejects(dev.write(0, Buffer.alloc(512)), {
    code: 'EROFS',
    exitCode: 2,
    message: `${p} is open read-only (write)`,
  });
  await assert.rejects(dev.discard(0, 512), { code: 'EROFS' });
  await assert.rejects(dev.writeZeroes(0, 512), { code: 'EROFS' });
  await assert.rejects(dev.read(512, Buffer.alloc(512)), {
    code: 'ERANGE',
    errno: 'EINVAL',
    message: /read of 512 bytes at 512 is past the end of/,
  });
  await dev.close();
  const rw = await FileDevice.open(p);
  await assert.rejects(rw.write(512, Buffer.alloc(512)), { code: 'ERANGE', errno: 'ENOSPC' });
  await rw.close();
});

test('end of file in the middle of a read is an error, never a short read', async () => {
  const p = path();
  const dev = await FileDevice.create(p, 1 << 20);
  await dev.write(0, Buffer.alloc(1 << 20, 7));
  truncateSync(p, 4096 + 100);
  const buf = Buffer.alloc(8192);
  await assert.rejects(dev.read(0, buf), {
    code: 'ESHORTIO',
    errno: 'EIO',
    message: `unexpected end of file reading ${p} at 4196`,
  });
  await dev.close();
});

test('write-zeroes reads back as zeros, with and without the native addon', async () => {
  for (const noNative of [false, true]) {
    const p = path();
    const dev = await FileDevice.create(p, 1 << 20, { noNative });
    await dev.write(0, Buffer.alloc(1 << 20, 9));
    await dev.writeZeroes(4096, 65536 + 512);
    await dev.writeZeroes(0, 512, { noHole: true, fua: true });
    await dev.writeZeroes(0, 0);
    const back = Buffer.alloc(1 << 20);
    await dev.read(0, back);
    const expect = Buffer.alloc(1 << 20, 9);
    expect.fill(0, 4096, 4096 + 65536 + 512);
    expect.fill(0, 0, 512);
    assert.ok(back.equals(expect), `noNative=${noNative}`);
    await dev.close();
  }
});

test('discard and block status follow the native addon', async () => {
  const native = loadNative() !== null;
  const p = path();
  const dev = await FileDevice.create(p, 4 << 20);
  assert.equal(dev.capabilities.discard, native);
  assert.equal(dev.capabilities.writeZeroes, native);
  assert.equal(dev.capabilities.blockStatus, native);
  await dev.write(1 << 20, Buffer.alloc(1 << 20, 3));
  if (native) {
    // File systems may round allocation to their blocks: check coverage, not exact extents.
    const statusAt = async (off: number, len: number, at: number) => {
      const ext = await dev.blockStatus(off, len);
      assert.equal(
        ext.reduce((a, e) => a + e.lengthBytes, 0),
        len,
      );
      let pos = off;
      for (const e of ext) {
        if (at >= pos && at < pos + e.lengthBytes) return e.hole;
        pos += e.lengthBytes;
      }
      throw new Error('offset not covered');
    };
    assert.equal(await statusAt(0, 4 << 20, 0), true, 'start of the sparse file is a hole');
    assert.equal(await statusAt(0, 4 << 20, (1 << 20) + 4096), false, 'written range is data');
    assert.equal(await statusAt(0, 4 << 20, 3 << 20), true, 'end of the sparse file is a hole');
    await dev.discard((1 << 20) + 65536, 65536);
    assert.equal(await statusAt(1 << 20, 1 << 20, (1 << 20) + 65536 + 4096), true, 'punched range is a hole');
    assert.equal(await statusAt(1 << 20, 1 << 20, 1 << 20), false);
    await dev.discard(0, 0);
    const b = Buffer.alloc(65536);
    await dev.read((1 << 20) + 65536, b);
    assert.ok(b.equals(Buffer.alloc(65536)));
  } else {
    await assert.rejects(dev.discard(0, 4096), { code: 'ENOTSUP' });
  }
  await dev.close();
  const plain = await FileDevice.create(path(), 1 << 20, { noNative: true });
  assert.deepEqual(await plain.blockStatus(0, 1 << 20), [{ lengthBytes: 1 << 20, hole: false, zero: false }]);
  await assert.rejects(plain.discard(0, 4096), { code: 'ENOTSUP', message: /does not support discard/ });
  await plain.close();
});

test('every operation on a closed device fails with ECLOSED', async () => {
  const p = path();
  const dev = await FileDevice.create(p, 1 << 20);
  await dev.close();
  await assert.rejects(dev.write(0, Buffer.alloc(512)), { code: 'ECLOSED', message: `${p} is closed (write)` });
  await assert.rejects(dev.flush(), { code: 'ECLOSED', message: `${p} is closed (flush)` });
  await assert.rejects(dev.discard(0, 512), { code: 'ECLOSED' });
  await assert.rejects(dev.writeZeroes(0, 512), { code: 'ECLOSED' });
  await assert.rejects(dev.blockStatus(0, 512), { code: 'ECLOSED' });
});

test('directIo: range and access checked like read/write, errors typed like theirs, close waits for a run', async () => {
  const p = path();
  const dev = await FileDevice.create(p, 1 << 20);
  const d = dev.directIo;
  // The run gets the descriptor and the file offset; the device's own I/O sees what it wrote.
  await d.run('write', 4096, 512, async (fd, at) => {
    assert.equal(at, 4096);
    writeSync(fd, Buffer.alloc(512, 0x42), 0, 512, at);
  });
  const back = Buffer.alloc(512);
  await dev.read(4096, back);
  assert.ok(back.equals(Buffer.alloc(512, 0x42)));
  let ran = false;
  const io = async () => {
    ran = true;
  };
  await assert.rejects(d.run('read', (1 << 20) - 512, 1024, io), { code: 'ERANGE' });
  await assert.rejects(d.run('write', 1 << 20, 512, io), { code: 'ERANGE', errno: 'ENOSPC' });
  assert.equal(ran, false, 'nothing runs for a bad range');
  await assert.rejects(
    d.run('read', 0, 512, async () => {
      throw Object.assign(new Error('EBADF: bad file descriptor'), { code: 'EBADF' });
    }),
    { code: 'EREAD', errno: 'EIO', message: /read of 512 bytes at 0 from .* failed: EBADF/ },
  );
  await assert.rejects(
    d.run('write', 0, 512, async () => {
      throw Object.assign(new Error('no space'), { code: 'ENOSPC' });
    }),
    { code: 'EWRITE', errno: 'ENOSPC' },
  );
  await assert.rejects(
    d.run('read', 0, 512, async () => {
      throw Object.assign(new Error('eof'), { code: 'ESHORTIO' });
    }),
    { code: 'ESHORTIO', errno: 'EIO', message: /end of file/ },
  );
  // close() waits for a run in progress: the descriptor must not be closed (and reused) under it.
  let release!: () => void;
  const running = d.run('read', 0, 512, (fd) => {
    assert.ok(fd >= 0);
    return new Promise<void>((r) => {
      release = r;
    });
  });
  let closed = false;
  const closing = dev.close().then(() => {
    closed = true;
  });
  await new Promise((r) => setTimeout(r, 30));
  assert.equal(closed, false, 'close waits for the direct run');
  await assert.rejects(d.run('read', 0, 512, io), { code: 'ECLOSED' });
  release();
  await running;
  await closing;
  assert.equal(closed, true);
  const ro = await FileDevice.open(p, { readOnly: true });
  await assert.rejects(ro.directIo.run('write', 0, 512, io), { code: 'EROFS' });
  assert.equal(ran, false);
  await ro.close();
});
