/**
 * DaemonCore.refreshVolume (cryptsetup refresh): the live table is swapped for one with the new
 * activation flags while the data stays readable; the key must be the one the volume runs with; a
 * suspended or unknown volume is refused with cryptsetup's exit codes.
 */
import assert from 'node:assert/strict';
import { chmodSync, mkdtempSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { prepareLuks } from '../../src/activate/mapping.js';
import { FileDevice } from '../../src/blockdev/file.js';
import { DaemonCore } from '../../src/daemon/core.js';
import { Luks2Volume } from '../../src/luks/index.js';
import type { CryptmapError } from '../../src/util/errors.js';
import { Secret } from '../../src/util/secret.js';

const MiB = 1 << 20;
const PASS = Buffer.from('refresh test passphrase');
const code = (exitCode: number, re: RegExp) => (e: CryptmapError) => e.exitCode === exitCode && re.test(e.message);

test('refreshVolume swaps in the new flags, keeps the data, and checks key and state', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'cm-refresh-'));
  chmodSync(dir, 0o700);
  const img = join(dir, 'luks.img');
  writeFileSync(img, Buffer.alloc(0));
  truncateSync(img, 6 * MiB);
  const fd = await FileDevice.open(img, { readOnly: false });
  await Luks2Volume.format(fd, PASS, { keyslot: { kdf: { type: 'pbkdf2', hash: 'sha256', iterations: 1000 } }, offsetBytes: 2 * MiB, keyslotsBytes: 2 * MiB - 2 * 16384, digestIterations: 1000 });
  await fd.close();
  const core = new DaemonCore({ nbdSocketPath: join(dir, 'nbd.sock'), attachDir: join(dir, 'attach') });
  try {
    const { mapping, volumeKey } = await prepareLuks({ name: 'v', device: img, passphrase: PASS });
    const key = Secret.copyOf(volumeKey.expose());
    await core.openVolume(mapping, volumeKey);
    volumeKey.dispose();
    const h = core.registry.open('v');
    const data = Buffer.alloc(256 * 1024, 0xa7);
    await h.write(MiB, data);
    assert.equal(h.capabilities.discard, false);
    const st = await core.refreshVolume('v', { allowDiscards: true, noWriteWorkqueue: true }, key);
    assert.equal(st.mapping?.allowDiscards, true);
    assert.equal(st.mapping?.noWriteWorkqueue, true);
    const table = (await core.dm().table('v'))[0]!.lines[0]!;
    assert.match(table, / 2 allow_discards no_write_workqueue( |$)/);
    assert.doesNotMatch(table, /[0-9a-f]{128}/, 'the table names the key, never holds it');
    const back = Buffer.alloc(data.length);
    await h.read(MiB, back);
    assert.ok(back.equals(data), 'data reads back under the new table');
    // Another key: refused, table unchanged.
    const other = Secret.copyOf(Buffer.alloc(key.length, 1));
    await assert.rejects(core.refreshVolume('v', {}, other), code(1, /Volume key does not match the volume\./));
    other.dispose();
    assert.match((await core.dm().table('v'))[0]!.lines[0]!, /allow_discards/);
    // Suspended (luksSuspend): refused until resumed. Unknown: exit 4.
    await core.suspendVolume('v');
    await assert.rejects(core.refreshVolume('v', {}, key), code(1, /suspended/));
    await core.resumeVolume('v', key);
    await assert.rejects(core.refreshVolume('nope', {}, key), code(4, /Device nope is not active\./));
    await core.refreshVolume('v', {}, key);
    assert.doesNotMatch((await core.dm().table('v'))[0]!.lines[0]!, /allow_discards/);
    key.dispose();
    await h.close();
  } finally {
    await core.shutdown();
    rmSync(dir, { recursive: true, force: true });
  }
});
