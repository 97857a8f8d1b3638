// cryptmap/nbd: serve a block device over NBD on a Unix socket and read it back with cryptmap's own
// NBD client (cryptmap/blockdev NbdDevice). Any NBD client works the same way on the printed URI:
// `nbdinfo URI`, `qemu-img info URI`, `nbd-client -unix SOCKET -N NAME /dev/nbd0`.
//
//   node examples/nbd.mjs
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MemoryDevice, NbdDevice } from 'cryptmap/blockdev';
import { NbdServer, nbdUnixUri } from 'cryptmap/nbd';

const dir = await mkdtemp(join(tmpdir(), 'cryptmap-example-'));
const server = new NbdServer();
try {
  const disk = new MemoryDevice({ sizeBytes: 16 << 20 });
  server.addExport('disk', { device: disk, description: 'a 16 MiB memory disk' });
  const socket = join(dir, 'nbd.sock');
  await server.listenUnix(socket); // mode 0600 by default
  const uri = nbdUnixUri('disk', socket);
  console.log(`serving ${uri}`);

  const client = await NbdDevice.open(uri);
  try {
    console.log(
      `client: ${client.sizeBytes} bytes, flush: ${client.capabilities.flush}, trim: ${client.capabilities.discard}`,
    );
    const data = Buffer.alloc(64 << 10, 'over nbd ');
    await client.write(1 << 20, data, { fua: true });
    const back = Buffer.alloc(data.length);
    await client.read(1 << 20, back);
    const direct = Buffer.alloc(data.length);
    await disk.read(1 << 20, direct); // what the server's device holds
    console.log(
      `read back over NBD: ${back.equals(data) ? 'same' : 'WRONG'}; on the served device: ${direct.equals(data) ? 'same' : 'WRONG'}`,
    );
    console.log(`connections to disk: ${server.connectionCount('disk')}`);
    if (!back.equals(data) || !direct.equals(data)) process.exitCode = 1;
  } finally {
    await client.close();
  }
} finally {
  await server.close(); // drains requests in flight, flushes the exports
  await rm(dir, { recursive: true, force: true });
}
