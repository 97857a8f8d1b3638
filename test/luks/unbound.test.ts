// LUKS2 unbound keyslots and per-keyslot encryption (src/luks/luks2.ts addUnboundKeyslot, keyslotCipher),
// following cryptsetup 2.6 (luksAddKey --unbound, --keyslot-cipher/--keyslot-key-size): an unbound
// key lives under its own digest with no segment, never opens the volume, and tests with anySegment;
// the CLI and cryptsetup interop are in test/cli/luks-features.interop.test.ts.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Luks2Volume } from '../../src/luks/index.js';
import { isCryptmapError } from '../../src/util/errors.js';
import { FAST_PBKDF2, memDev, P } from './helpers.js';

const fmt = { keyslot: { kdf: FAST_PBKDF2 }, offsetBytes: 2 << 20 };

test('unbound keyslot: own digest, never opens the volume, tests with anySegment, stays unbound through changeKey, digest goes with it', async () => {
  const dev = memDev(4 << 20);
  const v = await Luks2Volume.format(dev, P('one'), fmt);
  const slot = await v.addUnboundKeyslot(P('ub'), { kdf: FAST_PBKDF2, keyBytes: 72, keySlot: 2 });
  assert.equal(slot, 2);
  assert.deepEqual(
    v.keyslots().map((k) => [k.id, k.unbound === true]),
    [
      [0, false],
      [2, true],
    ],
  );
  const j = v.json;
  assert.deepEqual(j.digests['1']!.segments, []);
  assert.deepEqual(j.digests['1']!.keyslots, ['2']);
  assert.equal(j.keyslots['2']!.key_size, 72);
  // the area key is the volume key's size with the data cipher (crypt_keyslot_get_encryption)
  assert.equal(j.keyslots['2']!.area.encryption, 'aes-xts-plain64');
  assert.equal(j.keyslots['2']!.area.key_size, 64);
  await assert.rejects(v.unlock(P('ub')), (e) => isCryptmapError(e, 'EKEYSLOT') && e.exitCode === 1);
  await assert.rejects(
    v.unlock(P('ub'), { keySlot: 2 }),
    (e) => isCryptmapError(e, 'EKEYSLOT') && e.exitCode === 1 && e.message === 'No usable keyslot is available.',
  );
  const r = await v.unlock(P('ub'), { keySlot: 2, anySegment: true });
  assert.equal(r.keyslot, 2);
  assert.equal(r.volumeKey.length, 72);
  r.volumeKey.dispose();
  assert.equal((await v.unlock(P('ub'), { anySegment: true })).keyslot, 2);
  // an unbound passphrase cannot add keyslots (it does not know the volume key)
  await assert.rejects(v.addKey({ passphrase: P('ub') }, P('x'), { kdf: FAST_PBKDF2 }), (e) =>
    isCryptmapError(e, 'EKEYSLOT'),
  );
  // a full slot is not replaced
  await assert.rejects(
    v.addUnboundKeyslot(P('x'), { kdf: FAST_PBKDF2, keyBytes: 32, keySlot: 0 }),
    /Key slot 0 is full/,
  );
  await v.changeKey(P('ub'), P('ub2'), { kdf: FAST_PBKDF2, keySlot: 2 });
  assert.equal(v.keyslots().find((k) => k.id === 2)!.unbound, true);
  assert.equal((await v.unlock(P('ub2'), { keySlot: 2, anySegment: true })).volumeKey.length, 72);
  await v.killSlot(2);
  assert.deepEqual(Object.keys(v.json.digests), ['0']);
  const re = await Luks2Volume.open(dev);
  assert.equal(re.keyslots().length, 1);
});

test('a given unbound key is stored as is', async () => {
  const dev = memDev(4 << 20);
  const v = await Luks2Volume.format(dev, P('one'), fmt);
  const key = Buffer.alloc(64, 7);
  await v.addUnboundKeyslot(P('ub'), { kdf: FAST_PBKDF2, keyBytes: 64, key, keySlot: 3 });
  assert.ok((await v.unlock(P('ub'), { keySlot: 3, anySegment: true })).volumeKey.expose().equals(key));
});

test('--keyslot-cipher/--keyslot-key-size: the area uses them (format, addKey, changeKey, unbound); unusable ones are refused', async () => {
  const dev = memDev(4 << 20);
  const ks = { kdf: FAST_PBKDF2, keyslotCipher: 'aes-cbc-plain64', keyslotKeyBytes: 16 };
  const v = await Luks2Volume.format(dev, P('one'), { ...fmt, keyslot: ks });
  await v.addKey({ passphrase: P('one') }, P('two'), { ...ks, keySlot: 1 });
  await v.addKey({ passphrase: P('one') }, P('three'), { kdf: FAST_PBKDF2, keySlot: 2 });
  await v.changeKey(P('three'), P('three'), { ...ks, keySlot: 2 });
  await v.addUnboundKeyslot(P('ub'), { ...ks, keyBytes: 72, keySlot: 21 });
  const j = v.json;
  for (const k of ['0', '1', '2', '21']) {
    assert.equal(j.keyslots[k]!.area.encryption, 'aes-cbc-plain64', k);
    assert.equal(j.keyslots[k]!.area.key_size, 16, k);
  }
  for (const p of ['one', 'two', 'three']) (await v.unlock(P(p))).volumeKey.dispose();
  await assert.rejects(
    v.addKey({ passphrase: P('one') }, P('x'), {
      kdf: FAST_PBKDF2,
      keyslotCipher: 'aes-xts-plain64',
      keyslotKeyBytes: 16,
    }),
    (e) => isCryptmapError(e, 'ECIPHER'),
  );
  await assert.rejects(
    v.addKey({ passphrase: P('one') }, P('x'), {
      kdf: FAST_PBKDF2,
      keyslotCipher: 'cipher_null-ecb',
      keyslotKeyBytes: 16,
    }),
    (e) => isCryptmapError(e, 'ECIPHER'),
  );
});
