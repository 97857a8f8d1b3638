// The port contract for persistent volumes, checked with real cryptsetup (Debian package
// cryptsetup-bin): the key service's 32-byte key, given as a 0600 key file (never in argv), unlocks
// a LUKS2 keyslot made with VOLUME_KEYSLOT_PBKDF; the key from another root secret does not.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { requireTool } from '../helpers/tools.js';
import { startEmbeddedKeyService } from '../../src/keyservice/embedded.js';
import { VOLUME_KEYSLOT_PBKDF } from '../../src/reconciler/ports.js';
import { makeTempDir } from '../helpers/tmp.js';

function cryptsetup(args: string[]): { status: number | null; stderr: string } {
  requireTool('cryptsetup');
  const r = spawnSync('cryptsetup', args, { encoding: 'utf8' });
  assert.ifError(r.error);
  return { status: r.status, stderr: r.stderr };
}

test('a derived key unlocks a LUKS2 keyslot with the cheapest PBKDF; another root key does not', async () => {
  const t = makeTempDir('cryptmap-dk-');
  try {
    const req = { purpose: 'scratch' as const, service: 'db', volume: 'data', length: 32 };
    const a = await startEmbeddedKeyService(join(t.dir, 'a'));
    const b = await startEmbeddedKeyService(join(t.dir, 'b'));
    const ka = await a.client.deriveKey(req);
    const kb = await b.client.deriveKey(req);
    await a.close();
    await b.close();
    const fa = join(t.dir, 'ka');
    const fb = join(t.dir, 'kb');
    await writeFile(fa, ka.expose(), { mode: 0o600 });
    await writeFile(fb, kb.expose(), { mode: 0o600 });
    const img = join(t.dir, 'img');
    await writeFile(img, '');
    await truncate(img, 20 << 20);
    const fmt = cryptsetup([
      'luksFormat',
      '-q',
      '--type',
      'luks2',
      '--pbkdf',
      VOLUME_KEYSLOT_PBKDF.type,
      '--hash',
      VOLUME_KEYSLOT_PBKDF.hash,
      '--pbkdf-force-iterations',
      String(VOLUME_KEYSLOT_PBKDF.iterations),
      '--key-file',
      fa,
      img,
    ]);
    assert.equal(fmt.status, 0, fmt.stderr);
    assert.equal(cryptsetup(['open', '--test-passphrase', '--key-file', fa, img]).status, 0);
    assert.equal(
      cryptsetup(['open', '--test-passphrase', '--key-file', fb, img]).status,
      2,
      'wrong key: exit code 2 (no permission)',
    );
    const lower = cryptsetup([
      'luksFormat',
      '-q',
      '--type',
      'luks2',
      '--pbkdf',
      'pbkdf2',
      '--pbkdf-force-iterations',
      '999',
      '--key-file',
      fa,
      img,
    ]);
    assert.notEqual(lower.status, 0, 'cryptsetup refuses fewer iterations: 1000 is the floor');
  } finally {
    await t.cleanup();
  }
});
