// Token unlock through the handler table (luks2-handlers.ts TOKEN_HANDLERS, token-unlock.ts): a
// registered type opens its keyslots, priorities and --key-slot are respected, and the error codes
// match cryptsetup's exit codes (1 no usable token, 2 token could not unlock / luks2-keyring).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { foreignSignature, Luks1Volume, Luks2Volume, TOKEN_HANDLERS, unlockByToken } from '../../src/luks/index.js';
import { isCryptmapError } from '../../src/util/errors.js';
import { FAST_PBKDF2, memDev, P } from './helpers.js';

const code = (c: string, exit: number) => (e: unknown) => isCryptmapError(e) && e.code === c && e.exitCode === exit;

test('a registered token type unlocks its keyslots; failures carry cryptsetup exit codes', async () => {
  const dev = memDev(4 << 20);
  const v = await Luks2Volume.format(dev, P('one'), {
    keyslot: { kdf: FAST_PBKDF2 },
    offsetBytes: 2 << 20,
    keyslotsBytes: (2 << 20) - 32768,
  });
  await v.addKey({ passphrase: P('one') }, P('two'), { kdf: FAST_PBKDF2, keySlot: 3 });
  await v.addKey({ passphrase: P('one') }, P('three'), { kdf: FAST_PBKDF2, keySlot: 4 });
  TOKEN_HANDLERS['test-static'] = {
    name: 'test-static',
    validate() {},
    async open(tok) {
      return Buffer.from(String(tok.pass));
    },
  };
  try {
    await v.importToken({ type: 'test-static', keyslots: ['3'], pass: 'two' }, 0);
    await v.importToken({ type: 'test-static', keyslots: ['0', '4'], pass: 'three' }, 1);
    await v.importToken({ type: 'test-static', keyslots: ['0'], pass: 'wrong' }, 2);
    await v.importToken({ type: 'luks2-keyring', keyslots: ['0'], key_description: 'cryptmap:t' }, 3);
    await v.importToken({ type: 'some-plugin', keyslots: ['0'], x: 1 }, 4);

    const any = await unlockByToken(v);
    assert.deepEqual([any.tokenId, any.keyslot], [0, 3]);
    any.volumeKey.dispose();
    const t1 = await unlockByToken(v, { tokenId: 1 });
    assert.deepEqual([t1.tokenId, t1.keyslot], [1, 4]);
    t1.volumeKey.dispose();
    // --key-slot restricts the token to that keyslot (a preferred one is tried first otherwise).
    await v.setPriority(4, 'prefer');
    const t1p = await unlockByToken(v, { tokenId: 1, keySlot: 4 });
    assert.equal(t1p.keyslot, 4);
    t1p.volumeKey.dispose();

    await assert.rejects(unlockByToken(v, { tokenId: 2 }), code('ETOKENPASS', 2));
    await assert.rejects(unlockByToken(v, { tokenId: 3 }), code('ETOKENKEYRING', 2));
    await assert.rejects(unlockByToken(v, { tokenId: 4 }), code('ENOTOKEN', 1));
    await assert.rejects(unlockByToken(v, { tokenId: 9 }), code('ENOTOKEN', 1));
    await assert.rejects(
      unlockByToken(v, { tokenType: 'some-plugin' }),
      (e) => code('ENOTOKEN', 1)(e) && /type some-plugin/.test((e as Error).message),
    );
    await assert.rejects(unlockByToken(v, { tokenId: 0, keySlot: 4 }), code('ENOTOKEN', 1));
    // The keyring token is tried (and fails) after the wrong one: the last error is reported.
    await assert.rejects(unlockByToken(v, { tokenType: 'luks2-keyring' }), code('ETOKENKEYRING', 2));
  } finally {
    delete TOKEN_HANDLERS['test-static'];
  }
  // Without the handler the type is merely kept: nothing usable.
  await assert.rejects(unlockByToken(v, { tokenId: 0 }), code('ENOTOKEN', 1));
  assert.equal(v.exportToken(0), '{"type":"test-static","keyslots":["3"],"pass":"two"}');
});

test('LUKS1 has no tokens', async () => {
  const dev = memDev(4 << 20);
  const v = await Luks1Volume.format(dev, P('one'), { keyslot: { kdf: FAST_PBKDF2 }, keyBytes: 32 });
  await assert.rejects(unlockByToken(v), code('ETOKENLUKS1', 1));
});

test('foreign signatures block automatic recovery of a damaged primary area', () => {
  const a = Buffer.alloc(65536);
  assert.equal(foreignSignature(a), null);
  a.writeUInt16LE(0xef53, 0x438);
  assert.equal(foreignSignature(a), 'ext2/3/4');
  const b = Buffer.alloc(16384);
  b.write('SWAPSPACE2', 4086, 'latin1');
  assert.equal(foreignSignature(b), 'swap');
  assert.equal(foreignSignature(Buffer.from('VACUUM')), null);
});
