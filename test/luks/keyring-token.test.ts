// luks2-keyring tokens (cryptsetup token add --key-description, token unassign, unlock through the
// kernel keyring): the token JSON as cryptsetup writes it, assignment rules and messages, and the
// passphrase read from the "user" key the token names (native addon; keys are put there with keyctl
// from keyutils, in the user keyring, and unlinked afterwards).
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { after, test } from 'node:test';
import { Luks2Volume, unlockByToken } from '../../src/luks/index.js';
import { isCryptmapError } from '../../src/util/errors.js';
import { FAST_PBKDF2, memDev, P } from './helpers.js';

const ids: string[] = [];
function addKey(desc: string, payload: string): void {
  const r = spawnSync('keyctl', ['padd', 'user', desc, '@u'], { input: payload });
  if (r.error || r.status !== 0) assert.fail(`keyctl padd failed (install keyutils): ${r.error?.message ?? r.stderr}`);
  ids.push(r.stdout.toString().trim());
}
after(() => {
  for (const id of ids) spawnSync('keyctl', ['unlink', id, '@u']);
});

test('token add: luks2-keyring JSON, all keyslots / one / none, cryptsetup messages', async () => {
  const v = await Luks2Volume.format(memDev(4 << 20), P('one'), {
    keyslot: { kdf: FAST_PBKDF2 },
    offsetBytes: 2 << 20,
  });
  await v.addKey({ passphrase: P('one') }, P('two'), { kdf: FAST_PBKDF2, keySlot: 4 });
  assert.equal(await v.addKeyringToken('cm:a', { tokenId: 3 }), 3);
  assert.equal(v.exportToken(3), '{"type":"luks2-keyring","keyslots":["0","4"],"key_description":"cm:a"}');
  assert.equal(await v.addKeyringToken('cm:b', { keySlot: 4 }), 0);
  assert.equal(v.exportToken(0), '{"type":"luks2-keyring","keyslots":["4"],"key_description":"cm:b"}');
  assert.equal(await v.addKeyringToken('cm:c', { unbound: true }), 1);
  assert.deepEqual(JSON.parse(v.exportToken(1)).keyslots, []);
  const msg = (m: string) => (e: unknown) => isCryptmapError(e) && e.message === m && e.exitCode === 1;
  await assert.rejects(v.addKeyringToken('cm:d', { tokenId: 3 }), msg('Token 3 in use.'));
  await assert.rejects(v.addKeyringToken('cm:d', { keySlot: 5 }), msg('Keyslot 5 is not active.'));
  await v.unassignToken(3, 0);
  assert.deepEqual(JSON.parse(v.exportToken(3)).keyslots, ['4']);
  await assert.rejects(v.unassignToken(3, 0), msg('Token 3 is not assigned to keyslot 0.'));
  await assert.rejects(v.unassignToken(7, 0), msg('Token 7 is not assigned to keyslot 0.'));
  await assert.rejects(v.unassignToken(3, 44), msg('Failed to unassign token 3 from keyslot 44.'));
  await assert.rejects(v.unassignToken(44, 0), msg('Failed to unassign token 44 from keyslot 0.'));
  // a keyslot added with a token's passphrase is assigned to that token in the same write
  await v.addKey({ passphrase: P('one') }, P('three'), { kdf: FAST_PBKDF2, keySlot: 7, assignTokens: [1] });
  assert.deepEqual(JSON.parse(v.exportToken(1)).keyslots, ['7']);
});

test('a luks2-keyring token unlocks with the passphrase in the kernel keyring', async () => {
  const desc = `cryptmap-test:${process.pid}:${Date.now()}`;
  const v = await Luks2Volume.format(memDev(4 << 20), P('secret pass'), {
    keyslot: { kdf: FAST_PBKDF2 },
    offsetBytes: 2 << 20,
  });
  await v.addKeyringToken(desc, { tokenId: 0 });
  await assert.rejects(
    unlockByToken(v, { tokenId: 0 }),
    (e) => isCryptmapError(e, 'ETOKENKEYRING') && e.exitCode === 2 && e.message.includes(desc),
  );
  addKey(desc, 'wrong');
  await assert.rejects(unlockByToken(v, { tokenId: 0 }), (e) => isCryptmapError(e, 'ETOKENPASS') && e.exitCode === 2);
  addKey(desc, 'secret pass'); // padd updates the key in place
  const r = await unlockByToken(v, { tokenId: 0 });
  assert.equal(r.keyslot, 0);
  r.volumeKey.dispose();
});
