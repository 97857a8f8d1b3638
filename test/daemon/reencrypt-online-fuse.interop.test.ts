/**
 * Online reencryption under a FUSE client (issue 16 item 3, as root): a LUKS2 volume attached `--via
 * fuse` (the built-in FUSE export + loop with direct I/O), ext4 on it, mounted; fio with crc32c verify
 * writes and reads a file there (O_DIRECT) the whole time the daemon reencrypts the volume with a new
 * key (the top table swapped at every hotzone, the FUSE direct route switched off around each swap).
 * No fio error, the file system checks clean, a file written before reads back, and the volume opens
 * with the new key afterwards.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { prepareLuks } from '../../src/activate/mapping.js';
import { FileDevice } from '../../src/blockdev/file.js';
import { initReencrypt, Luks2Volume, unlockReencryptKeys } from '../../src/luks/index.js';
import { Secret } from '../../src/util/secret.js';
import { startFio } from '../helpers/fio.js';
import { mustRun } from '../helpers/tools.js';
import { pollUntil } from '../helpers/wait.js';
import { coreWithLuks2, MiB, PASS } from './fixtures.js';

const sh = (cmd: string, args: string[], timeoutMs = 120_000) => mustRun(cmd, args, { timeoutMs });

test('online reencryption while a FUSE-mounted ext4 takes fio verify: no error, data intact, new key', {
  timeout: 600_000,
}, async (t) => {
  assert.equal(process.getuid?.(), 0, 'the FUSE export tests run as root (mount(2), losetup)');
  const { dir, core, img } = await coreWithLuks2('cm-reenc-fuse-', 66 * MiB);
  const mnt = join(dir, 'mnt');
  let mounted = false;
  t.after(async () => {
    if (mounted) await sh('umount', [mnt]).catch(() => undefined);
    await core.shutdown();
    rmSync(dir, { recursive: true, force: true });
  });
  await core.listen();
  const { mapping, volumeKey } = await prepareLuks({ name: 'rf', device: img, passphrase: PASS });
  const vk0 = Buffer.from(volumeKey.expose());
  await core.openVolume(mapping, volumeKey);
  volumeKey.dispose();
  const info = await core.attach('rf', { via: 'fuse' });
  mkdirSync(mnt, { recursive: true });
  await sh('mkfs.ext4', ['-q', '-F', info.devicePath]);
  await sh('mount', [info.devicePath, mnt]);
  mounted = true;
  const kept = randomBytes(2 * MiB);
  writeFileSync(join(mnt, 'kept.bin'), kept);
  await sh('sync', ['-f', join(mnt, 'kept.bin')]);

  const fio = startFio(join(mnt, 'fio.dat'), 'fuse', dir, 16);
  let f: Awaited<ReturnType<typeof fio.stop>> | undefined;
  try {
    // fio is doing I/O through FUSE before the reencryption starts.
    const requests = () => {
      const s = core.fuseStats('rf')!;
      return s.direct + s.js;
    };
    const before = requests();
    await pollUntil(() => requests() > before + 50, {
      deadlineMs: 60_000,
      what: 'fio writing through the FUSE export',
    });
    // What `cryptmap reencrypt NAME` does: the header initialised, both keys unlocked, the daemon runs it.
    const dev = await FileDevice.open(img, { readOnly: false });
    try {
      const vol = await Luks2Volume.open(dev);
      await initReencrypt(vol, PASS, { kdf: { type: 'pbkdf2', hash: 'sha256', iterations: 1000 } });
      const k = await unlockReencryptKeys(vol, PASS);
      const oldKey = new Secret(k.oldKey!);
      const newKey = new Secret(k.newKey!);
      try {
        await core.reencryptVolume('rf', oldKey, newKey, { hotzoneBytes: MiB });
      } finally {
        oldKey.dispose();
        newKey.dispose();
      }
    } finally {
      await dev.close();
    }
    const st = await pollUntil(
      () => {
        const r = core.statusOf('rf').reencrypt;
        return r?.state !== 'running' ? r : undefined;
      },
      {
        deadlineMs: 400_000,
        what: 'the online reencryption to end',
        detail: () => JSON.stringify(core.statusOf('rf')),
      },
    );
    assert.equal(st?.state, 'finished', st?.error);
  } finally {
    f = await fio.stop();
  }
  assert.equal(f.errors, 0, f.out);
  assert.ok(f.ops > 0, f.out);
  assert.ok(readFileSync(join(mnt, 'kept.bin')).equals(kept));
  await sh('umount', [mnt]);
  mounted = false;
  await sh('e2fsck', ['-f', '-n', info.devicePath]);
  await core.detach('rf');
  await core.closeVolume('rf');
  // The header now opens with the new key only, and the file system mounts from it.
  const again = await prepareLuks({ name: 'rf', device: img, passphrase: PASS });
  assert.notDeepEqual(Buffer.from(again.volumeKey.expose()), vk0, 'a new volume key');
  await core.openVolume(again.mapping, again.volumeKey);
  again.volumeKey.dispose();
  const info2 = await core.attach('rf', { via: 'fuse' });
  await sh('mount', ['-o', 'ro', info2.devicePath, mnt]);
  mounted = true;
  assert.ok(readFileSync(join(mnt, 'kept.bin')).equals(kept));
  await sh('umount', [mnt]);
  mounted = false;
  await core.detach('rf');
});
