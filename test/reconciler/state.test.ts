import assert from 'node:assert/strict';
import { readdir, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { STATE_FILE, StateStore } from '../../src/reconciler/state.js';
import { makeTempDir } from '../helpers/tmp.js';

test('state store: empty when missing, atomic save (no temp files left), strict load', async () => {
  const t = makeTempDir('cryptmap-state-');
  try {
    const s = new StateStore(t.dir);
    assert.deepEqual(await s.load(), { version: 1, volumes: {} });
    const st = await s.load();
    st.volumes['scratch/a/b'] = {
      id: 'scratch/a/b',
      kind: 'scratch',
      class: 'persistent',
      path: '/v/a/b.img',
      filesystem: 'ext4',
      mapping: 'scratch:a:b',
      bootId: 'x',
      phase: 'ready',
      created: true,
      formatted: true,
      mkfsDone: true,
      updatedAt: 'now',
    };
    await s.save(st);
    await s.save(st);
    assert.deepEqual(await s.load(), st);
    assert.deepEqual(await readdir(t.dir), [STATE_FILE]);
    assert.equal((await stat(join(t.dir, STATE_FILE))).mode & 0o777, 0o600);
    assert.ok((await readFile(join(t.dir, STATE_FILE), 'utf8')).endsWith('}\n'));
    await writeFile(join(t.dir, STATE_FILE), '{"version":1,"volu');
    await assert.rejects(s.load(), { code: 'ESTATE' });
    await writeFile(join(t.dir, STATE_FILE), '{"version":7,"volumes":{}}');
    await assert.rejects(s.load(), /unsupported state version 7/);
  } finally {
    await t.cleanup();
  }
});
