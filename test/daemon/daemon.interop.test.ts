/**
 * The daemon end to end, in process: a LUKS2 volume made by cryptsetup over known plaintext is
 * unlocked by the activation layer, mapped by the daemon core and read and written over NBD with
 * libnbd's nbdcopy and qemu-io; cryptsetup reads back what was written.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { fileTempDir } from '../helpers/tmp.js';
import { runTool } from '../helpers/tools.js';
import { prepareLuks } from '../../src/activate/mapping.js';
import { DaemonCore } from '../../src/daemon/core.js';
import type { CryptmapError } from '../../src/util/errors.js';
import { FAST_PBKDF } from '../helpers/luks.js';

const MiB = 1 << 20;
const dir = fileTempDir('cm-daemon-');
let core: DaemonCore;

/** Run a tool that must succeed; its stdout as bytes. */
async function sh(cmd: string, args: string[]): Promise<Buffer> {
  const r = await runTool(cmd, args);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} failed: ${r.stderr || `exit ${r.code}`}`);
  return r.stdoutBytes;
}

before(async () => {
  core = new DaemonCore({ nbdSocketPath: join(dir, 'nbd.sock'), attachDir: join(dir, 'attach') });
  await core.listen();
});

after(async () => {
  await core.shutdown();
});

test('cryptsetup volume (detached header) served over NBD: reads give the plaintext, writes land encrypted', async () => {
  const plain = randomBytes(8 * MiB);
  const data = join(dir, 'data.img');
  const hdr = join(dir, 'hdr.img');
  const keyFile = join(dir, 'key');
  writeFileSync(keyFile, 'daemon test passphrase', { mode: 0o600 });
  writeFileSync(data, plain);
  await sh('cryptsetup', [
    'reencrypt',
    '--encrypt',
    '--type',
    'luks2',
    '--header',
    hdr,
    '--batch-mode',
    '--key-file',
    keyFile,
    ...FAST_PBKDF,
    data,
  ]);
  assert.ok(!readFileSync(data).equals(plain), 'cryptsetup encrypted the data in place');

  const { mapping, volumeKey } = await prepareLuks({
    name: 'vol0',
    device: data,
    header: hdr,
    passphrase: readFileSync(keyFile),
  });
  assert.equal(mapping.type, 'LUKS2');
  assert.equal(mapping.offsetSectors, 0);
  assert.equal(mapping.sizeSectors * 512, plain.length);
  const st = await core.openVolume(mapping, volumeKey);
  volumeKey.dispose();
  assert.equal(st.active, true);
  assert.match(st.nbdUri, /^nbd\+unix:\/\/\/vol0\?socket=/);

  // Keys are never in the table, even with showKeys: the keyring reference is shown instead.
  const [t] = await core.dm().table('vol0', { showKeys: true });
  assert.match(t?.lines[0] ?? '', /crypt aes-xts-plain64 :64:logon:cryptmap:vol0 0 /);

  assert.ok((await sh('nbdcopy', [st.nbdUri, '-'])).equals(plain), 'nbdcopy reads the plaintext');

  await sh('qemu-io', ['-f', 'raw', st.nbdUri, '-c', 'write -P 0x5a 1M 64k', '-c', 'flush']);
  plain.fill(0x5a, MiB, MiB + 65536);
  await core.closeVolume('vol0');
  assert.equal(core.statusOf('vol0').active, false);

  // cryptsetup decrypts in place what cryptmap wrote.
  await sh('cryptsetup', [
    'reencrypt',
    '--decrypt',
    '--force-offline-reencrypt',
    '--header',
    hdr,
    '--batch-mode',
    '--key-file',
    keyFile,
    data,
  ]);
  assert.ok(readFileSync(data).equals(plain), 'cryptsetup reads back what cryptmap wrote');
});

test('header in the image: the dynamic data segment covers the rest of the file, read-only', async () => {
  const plain = randomBytes(4 * MiB);
  const img = join(dir, 'inline.img');
  const keyFile = join(dir, 'key1');
  writeFileSync(keyFile, 'pw1', { mode: 0o600 });
  writeFileSync(img, Buffer.concat([plain, Buffer.alloc(8 * MiB)]));
  await sh('cryptsetup', [
    'reencrypt',
    '--encrypt',
    '--type',
    'luks2',
    '--reduce-device-size',
    '8M',
    '--batch-mode',
    '--key-file',
    keyFile,
    ...FAST_PBKDF,
    img,
  ]);
  const { mapping, volumeKey } = await prepareLuks({
    name: 'inline',
    device: img,
    passphrase: readFileSync(keyFile),
    readOnly: true,
  });
  // cryptsetup put the header in the first half of the reduction (4 MiB); data runs to the end.
  assert.equal(mapping.offsetSectors * 512, 4 * MiB);
  assert.equal(mapping.sizeSectors * 512, 8 * MiB);
  const st = await core.openVolume(mapping, volumeKey);
  volumeKey.dispose();
  const out = await sh('nbdcopy', [st.nbdUri, '-']);
  assert.ok(out.subarray(0, plain.length).equals(plain));
  await assert.rejects(sh('qemu-io', ['-f', 'raw', st.nbdUri, '-c', 'write -P 1 0 4k']), /failed/);
  await core.closeVolume('inline');
});

test('errors: unknown volume, duplicate name, wrong passphrase', async () => {
  await assert.rejects(core.closeVolume('nope'), (e: CryptmapError) => e.code === 'ENODEV' && e.exitCode === 4);
  const img = join(dir, 'v2.img');
  const keyFile = join(dir, 'key2');
  writeFileSync(keyFile, 'pw2', { mode: 0o600 });
  writeFileSync(img, Buffer.alloc(20 * MiB));
  await sh('cryptsetup', ['luksFormat', '--type', 'luks2', '--batch-mode', '--key-file', keyFile, ...FAST_PBKDF, img]);
  await assert.rejects(
    prepareLuks({ name: 'v2', device: img, passphrase: Buffer.from('wrong') }),
    (e: CryptmapError) => e.exitCode === 2,
  );
  const { mapping, volumeKey } = await prepareLuks({ name: 'v2', device: img, passphrase: readFileSync(keyFile) });
  await core.openVolume(mapping, volumeKey);
  await assert.rejects(
    core.openVolume(mapping, volumeKey),
    (e: CryptmapError) => e.code === 'EEXIST' && e.exitCode === 5,
  );
  volumeKey.dispose();
  await core.closeVolume('v2');
  assert.equal(core.registry.list().length, 0);
});
