// cryptmap/dm: the device mapper in userspace, with dmsetup's table syntax. Over one 4 MiB file: a
// `linear` device on its second MiB, and a `crypt` device stacked on that one (a mapped device is named
// in a table like a path). Data written through `secret` lands encrypted in the file, exactly as
// dm-crypt would write it (checked with cryptmap/engine), and reads back in the clear.
//
//   node examples/dm.mjs
import { randomBytes } from 'node:crypto';
import { mkdtemp, readFile, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DeviceRegistry, formatLines, formatLs, InProcessDmControl } from 'cryptmap/dm';
import { createSectorCipher } from 'cryptmap/engine';

const dir = await mkdtemp(join(tmpdir(), 'cryptmap-example-'));
const registry = new DeviceRegistry(); // tables name files, block devices or other mapped devices
try {
  const file = join(dir, 'disk.img');
  await writeFile(file, '', { mode: 0o600 });
  await truncate(file, 4 << 20);
  const key = randomBytes(64); // aes-xts-plain64 with two 256-bit keys
  // <start> <length> linear <device> <offset>, in 512-byte sectors
  await registry.create('part', { table: `0 2048 linear ${file} 2048` });
  // <start> <length> crypt <cipher> <key> <iv_offset> <device> <offset>
  await registry.create('secret', { table: `0 2048 crypt aes-xts-plain64 ${key.toString('hex')} 0 part 0` });

  const dm = new InProcessDmControl(registry); // the dmsetup verbs as data
  process.stdout.write(formatLs(await dm.ls()));
  process.stdout.write(formatLines(await dm.table(), true)); // keys hidden unless { showKeys: true }

  const secret = registry.open('secret');
  const data = Buffer.alloc(4096, 'cryptmap example ');
  await secret.write(8192, data); // byte 8192 = sector 16 of `secret`
  await secret.flush();
  const back = Buffer.alloc(4096);
  await secret.read(8192, back);
  console.log(`read through secret: ${back.equals(data) ? 'plaintext' : 'WRONG'}`);
  await secret.close();

  // In the file: 1 MiB (linear offset) + 8192 bytes, encrypted with IV = sector 16 (plain64).
  const raw = (await readFile(file)).subarray((1 << 20) + 8192, (1 << 20) + 8192 + 4096);
  const cipher = createSectorCipher({ spec: 'aes-xts-plain64', key });
  const expected = Buffer.from(data);
  cipher.encrypt(expected, 16n);
  cipher.dispose();
  console.log(`in the file: ${raw.equals(expected) ? 'dm-crypt ciphertext' : 'WRONG'}`);
  if (!back.equals(data) || !raw.equals(expected)) process.exitCode = 1;
  await registry.remove('secret');
  await registry.remove('part');
} finally {
  await registry.closeAll();
  await rm(dir, { recursive: true, force: true });
}
