// reencrypt and convert ask the daemon whether the volume is open (cli/daemon-client.ts openInDaemon):
// no daemon means not open; a daemon that cannot be asked (here: a runtime dir others may write, so
// its socket is not trusted) is an error, not a "not open" that lets the header be rewritten.
import assert from 'node:assert/strict';
import { chmodSync, mkdirSync, readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { testTempDir } from '../helpers/tmp.js';
import { cryptmap } from './harness.js';
import { FAST_PBKDF } from '../helpers/luks.js';

test('reencrypt and convert: an unanswerable daemon check fails (header untouched); no daemon at all goes ahead', async (t) => {
  const dir = testTempDir(t, 'cm-daemon-check-');
  const old = process.env.CRYPTMAP_RUNTIME_DIR;
  try {
    const img = join(dir, 'a.img');
    writeFileSync(img, '');
    truncateSync(img, 16 << 20);
    const pass = join(dir, 'pass');
    writeFileSync(pass, 'daemon check', { mode: 0o600 });
    const fast = [...FAST_PBKDF];
    let r = await cryptmap([
      'luksFormat',
      '--type',
      'luks2',
      '--sector-size',
      '512',
      '--batch-mode',
      ...fast,
      '--key-file',
      pass,
      img,
    ]);
    assert.equal(r.code, 0, r.stderr);
    const before = readFileSync(img);
    const untrusted = join(dir, 'run');
    mkdirSync(untrusted);
    chmodSync(untrusted, 0o777);
    process.env.CRYPTMAP_RUNTIME_DIR = untrusted;
    r = await cryptmap(['reencrypt', '--batch-mode', ...fast, '--key-file', pass, img]);
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /Cannot reencrypt: cannot tell whether the cryptmap daemon has the device open/);
    r = await cryptmap(['convert', '--batch-mode', '--type', 'luks1', img]);
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /Cannot convert: cannot tell whether the cryptmap daemon has the device open/);
    assert.ok(readFileSync(img).equals(before), 'the volume was written');
    process.env.CRYPTMAP_RUNTIME_DIR = join(dir, 'no-such-dir');
    r = await cryptmap(['convert', '--batch-mode', '--type', 'luks1', img]);
    assert.equal(r.code, 0, r.stderr);
  } finally {
    if (old === undefined) delete process.env.CRYPTMAP_RUNTIME_DIR;
    else process.env.CRYPTMAP_RUNTIME_DIR = old;
  }
});
