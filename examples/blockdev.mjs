// cryptmap/blockdev: a file as a block device. Writes two blocks, one with FUA (on stable storage when
// the promise resolves), reads one back, zeroes the other and asks which parts of the file hold data.
//
//   node examples/blockdev.mjs
import { mkdtemp, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { FileDevice } from 'cryptmap/blockdev';

const dir = await mkdtemp(join(tmpdir(), 'cryptmap-example-'));
try {
  const path = join(dir, 'disk.img');
  await writeFile(path, '', { mode: 0o600 });
  await truncate(path, 1 << 20); // a sparse 1 MiB file
  const dev = await FileDevice.open(path);
  try {
    console.log(`size: ${dev.sizeBytes} bytes, logical block: ${dev.limits.logicalBlockBytes} bytes`);
    await dev.write(0, Buffer.alloc(4096, 'a'));
    await dev.write(65536, Buffer.alloc(4096, 'b'), { fua: true });
    const buf = Buffer.alloc(4096);
    await dev.read(65536, buf);
    const ok1 = buf.every((x) => x === 0x62);
    console.log(`read back at 64 KiB: ${buf.subarray(0, 4).toString()}... ${ok1 ? 'ok' : 'WRONG'}`);
    await dev.writeZeroes(0, 4096);
    await dev.read(0, buf);
    const ok2 = buf.every((x) => x === 0);
    console.log(`after write zeroes at 0: ${ok2 ? 'zeroes' : 'WRONG'}`);
    await dev.flush();
    if (dev.capabilities.blockStatus) {
      // NBD base:allocation semantics: runs of data, holes (unallocated) and known zeroes.
      let at = 0;
      const runs = [];
      for (const e of await dev.blockStatus(0, dev.sizeBytes)) {
        runs.push(`${at}+${e.lengthBytes}${e.hole ? ' hole' : ''}${e.zero ? ' zero' : ''}`);
        at += e.lengthBytes;
      }
      console.log(`extents: ${runs.join(', ')}`);
    } else {
      console.log('extents: not reported (files need the native addon for SEEK_HOLE)');
    }
    if (!ok1 || !ok2) process.exitCode = 1;
  } finally {
    await dev.close();
  }
} finally {
  await rm(dir, { recursive: true, force: true });
}
