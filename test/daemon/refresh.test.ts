/**
 * DaemonCore.refreshVolume (cryptsetup refresh): the live table is swapped for one with the new
 * activation flags while the data stays readable; the key must be the one the volume runs with; a
 * suspended or unknown volume is refused with cryptsetup's exit codes.
 */
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { test } from 'node:test';
import { Secret } from '../../src/util/secret.js';
import { code, coreWithLuks2, MiB, openLuks } from './fixtures.js';

test('refreshVolume swaps in the new flags, keeps the data, and checks key and state', async () => {
  const { dir, core, img } = await coreWithLuks2('cm-refresh-');
  try {
    const { key } = await openLuks(core, img, 'v');
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
