// withDeviceLock (src/luks/lock.ts) locks an NBD URI too (keyed by the URI in the lock dir): a second
// header update of the same export waits for the first, one of another export does not.
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { test } from 'node:test';
import { testTempDir } from '../helpers/tmp.js';
import { withDeviceLock } from '../../src/luks/index.js';

test('an NBD URI is locked: the same export is busy while held, another export is not', async (t) => {
  const dir = testTempDir(t, 'cm-lock-uri-');
  const env = { CRYPTMAP_LOCK_DIR: join(dir, 'locks') };
  const uri = 'nbd+unix:///vol?socket=/run/x/nbd.sock';
  let release!: () => void;
  const held = new Promise<void>((r) => (release = r));
  let entered!: () => void;
  const inside = new Promise<void>((r) => (entered = r));
  const first = withDeviceLock(
    uri,
    async () => {
      entered();
      await held;
    },
    { env },
  );
  await inside;
  await assert.rejects(
    withDeviceLock(uri, async () => undefined, { env, timeoutMs: 100 }),
    { code: 'ELOCKED', exitCode: 5 },
  );
  assert.equal(
    await withDeviceLock('nbd+unix:///other?socket=/run/x/nbd.sock', async () => 'free', { env, timeoutMs: 100 }),
    'free',
  );
  release();
  await first;
  assert.equal(await withDeviceLock(uri, async () => 'again', { env, timeoutMs: 100 }), 'again');
});
