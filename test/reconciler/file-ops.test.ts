import assert from 'node:assert/strict';
import { stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { createSparseFile, deleteBackingFile, LUKS_MAGIC, probeBackingFile } from '../../src/reconciler/file-ops.js';
import { makeTempDir } from '../helpers/tmp.js';

test('sparse backing files: exclusive create, probe, delete', async () => {
  const t = makeTempDir('cryptmap-fileops-');
  try {
    const p = join(t.dir, 'volumes', 'scratch', 'db', 'data.img');
    await createSparseFile(p, 64 << 20);
    const st = await stat(p);
    assert.equal(st.size, 64 << 20);
    assert.equal(st.mode & 0o777, 0o600);
    assert.ok(st.blocks * 512 < 1 << 20, 'sparse');
    assert.equal((await stat(join(t.dir, 'volumes', 'scratch', 'db'))).mode & 0o777, 0o700);
    await assert.rejects(createSparseFile(p, 1), { code: 'ECREATE', errno: 'EEXIST' });
    assert.deepEqual(await probeBackingFile(p), { exists: true, bytes: 64 << 20, isLuks: false });
    await writeFile(p, Buffer.concat([LUKS_MAGIC, Buffer.from([0, 2])]));
    assert.deepEqual(await probeBackingFile(p), { exists: true, bytes: 8, isLuks: true });
    await deleteBackingFile(p);
    await deleteBackingFile(p);
    assert.deepEqual(await probeBackingFile(p), { exists: false });
  } finally {
    await t.cleanup();
  }
});
