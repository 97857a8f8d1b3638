// luksDump --dump-volume-key --volume-key-file writes the key to a new file only (as cryptsetup):
// owner read-only, never over an existing file, never through a symbolic link planted at the path.
import assert from 'node:assert/strict';
import { existsSync, readFileSync, statSync, symlinkSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { FAST_LUKS2_FORMAT } from '../helpers/luks.js';
import { testTempDir } from '../helpers/tmp.js';
import { cryptmap } from './harness.js';

test('luksDump --volume-key-file: a new 0400 file with the key; an existing file or a symlink is refused (exit 1)', async (t) => {
  const dir = testTempDir(t, 'cm-vkfile-');
  const img = join(dir, 'a.img');
  writeFileSync(img, '');
  truncateSync(img, 16 << 20);
  const pass = join(dir, 'pass');
  writeFileSync(pass, 'vk file passphrase', { mode: 0o600 });
  const key = join(dir, 'key.in');
  writeFileSync(key, Buffer.alloc(64, 7), { mode: 0o600 });
  let r = await cryptmap([...FAST_LUKS2_FORMAT, '--key-file', pass, '--volume-key-file', key, img]);
  assert.equal(r.code, 0, r.stderr);
  const out = join(dir, 'vk.out');
  const dump = (file: string) =>
    cryptmap(['luksDump', '--dump-volume-key', '--batch-mode', '--key-file', pass, '--volume-key-file', file, img]);
  r = await dump(out);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /Key stored to file/);
  assert.deepEqual(readFileSync(out), Buffer.alloc(64, 7));
  assert.equal(statSync(out).mode & 0o777, 0o400);
  r = await dump(out);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /Cannot open keyfile .* for write\./);
  const target = join(dir, 'target');
  symlinkSync(target, join(dir, 'link'));
  r = await dump(join(dir, 'link'));
  assert.equal(r.code, 1);
  assert.ok(!existsSync(target), 'the key was written through a symbolic link');
});
