// cryptmap/luks: format a LUKS2 image in a temporary file, open it, try a wrong and a right
// passphrase, add a second passphrase, map the data segment with a dm-crypt table (cryptmap/dm) and
// read the data back after unlocking with the second passphrase. The on-disk format is cryptsetup's:
// `cryptsetup luksDump` and `cryptsetup open` take such an image.
//
//   node examples/luks.mjs
import { mkdtemp, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { FileDevice } from 'cryptmap/blockdev';
import { DeviceRegistry } from 'cryptmap/dm';
import { detectLuks, Luks2Volume, openLuks } from 'cryptmap/luks';

// PBKDF2 with a forced iteration count so that the example runs in a moment. Leave `kdf` out to
// calibrate as cryptsetup does (Argon2id, iterTimeMs default 2 s, up to 1 GiB of memory), or give
// { type: 'argon2id', time, memoryKiB, parallel }.
/** @type {import('cryptmap/luks').NewKeyslotOptions['kdf']} */
const KDF = { type: 'pbkdf2', hash: 'sha256', iterations: 100_000 };

/**
 * The crypt table for a LUKS data segment on `file` (what `cryptsetup open` loads).
 * @param {import('cryptmap/luks').DataSegment} seg
 * @param {string} file
 * @param {number} fileBytes
 * @param {import('cryptmap/luks').UnlockResult['volumeKey']} volumeKey
 */
function cryptTable(seg, file, fileBytes, volumeKey) {
  const size = seg.sizeBytes === 'dynamic' ? fileBytes - seg.offsetBytes : seg.sizeBytes;
  const opts = seg.sectorBytes === 512 ? '' : ` 1 sector_size:${seg.sectorBytes}`;
  // The key travels in hex here as in a dmsetup table; DeviceRegistry({ keyStore }) takes
  // `:<bytes>:logon:<description>` references instead.
  return `0 ${size / 512} crypt ${seg.cipher} ${volumeKey.expose().toString('hex')} ${seg.ivTweak} ${file} ${seg.offsetBytes / 512}${opts}`;
}

const dir = await mkdtemp(join(tmpdir(), 'cryptmap-example-'));
try {
  const file = join(dir, 'disk.img');
  await writeFile(file, '', { mode: 0o600 });
  await truncate(file, 32 << 20); // 16 MiB of header (LUKS2's default data offset) and 16 MiB of data
  const dev = await FileDevice.open(file);
  const data = Buffer.alloc(1 << 20, 'sixteen bytes!! ');
  try {
    await Luks2Volume.format(dev, Buffer.from('correct horse'), { label: 'example', keyslot: { kdf: KDF } });
    console.log(`detected: ${await detectLuks(dev)}`);
    const vol = await openLuks(dev);
    const seg = vol.dataSegment;
    console.log(
      `label: ${vol.label}, cipher: ${seg.cipher}, key: ${seg.keyBytes * 8} bits, data at ${seg.offsetBytes >> 20} MiB`,
    );
    await vol.unlock(Buffer.from('wrong')).catch((e) => console.log(`wrong passphrase: ${e.code}: ${e.message}`));
    const { volumeKey, keyslot } = await vol.unlock(Buffer.from('correct horse'));
    console.log(`unlocked with keyslot ${keyslot}`);
    const slot = await vol.addKey({ volumeKey }, Buffer.from('battery staple'), { kdf: KDF });
    console.log(
      `added keyslot ${slot}; keyslots: ${vol
        .keyslots()
        .map((k) => `${k.id} (${k.kdf})`)
        .join(', ')}`,
    );

    const registry = new DeviceRegistry();
    await registry.create('vol', { table: cryptTable(seg, file, dev.sizeBytes, volumeKey) });
    volumeKey.dispose(); // wipes the key bytes
    const mapped = registry.open('vol');
    await mapped.write(0, data);
    await mapped.close();
    await registry.closeAll();
  } finally {
    await dev.close();
  }

  // Later: open again, unlock with the second passphrase, read the data back.
  const dev2 = await FileDevice.open(file, { readOnly: true });
  try {
    const vol = await openLuks(dev2);
    const { volumeKey, keyslot } = await vol.unlock(Buffer.from('battery staple'));
    const registry = new DeviceRegistry();
    await registry.create('vol', {
      table: cryptTable(vol.dataSegment, file, dev2.sizeBytes, volumeKey),
      readOnly: true,
    });
    volumeKey.dispose();
    const mapped = registry.open('vol');
    const back = Buffer.alloc(data.length);
    await mapped.read(0, back);
    console.log(`reopened with keyslot ${keyslot}: ${back.equals(data) ? 'data read back' : 'WRONG'}`);
    if (!back.equals(data)) process.exitCode = 1;
    await mapped.close();
    await registry.closeAll();
  } finally {
    await dev2.close();
  }
} finally {
  await rm(dir, { recursive: true, force: true });
}
