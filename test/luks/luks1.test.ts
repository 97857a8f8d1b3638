// LUKS1 library behaviour on memory devices (LUKS1 spec 1.2.3 layout; cryptsetup keymanage.c rules).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { decodeLuks1, encodeLuks1, Luks1Volume, openLuks, validateLuks1 } from '../../src/luks/index.js';
import { FAST_PBKDF2, memDev, P } from './helpers.js';

test('format, unlock, add, change, remove; layout as cryptsetup', async () => {
  const dev = memDev(4 << 20);
  const vol = await Luks1Volume.format(dev, P('one'), { keyslot: { kdf: FAST_PBKDF2 } });
  assert.equal(vol.header.payloadOffset, 4096);
  assert.deepEqual(
    vol.header.keyblock.map((k) => k.keyMaterialOffset),
    [8, 512, 1016, 1520, 2024, 2528, 3032, 3536],
  );
  assert.equal((await vol.unlock(P('one'))).keyslot, 0);
  assert.equal(await vol.addKey({ passphrase: P('one') }, P('two'), { kdf: FAST_PBKDF2 }), 1);
  const moved = await vol.changeKey(P('one'), P('uno'), { kdf: FAST_PBKDF2 });
  assert.equal(moved, 2);
  const re = await openLuks(dev);
  await assert.rejects(re.unlock(P('one')), { code: 'ENOKEY', exitCode: 2 });
  assert.equal((await re.unlock(P('uno'))).keyslot, 2);
  assert.equal(await re.removeKey(P('two')), 1);
  assert.deepEqual(
    re
      .keyslots()
      .filter((k) => k.active)
      .map((k) => k.id),
    [2],
  );
});

test('validation: stripes, overlaps, slot past payload', async () => {
  const dev = memDev(4 << 20);
  const vol = await Luks1Volume.format(dev, P('one'), { keyslot: { kdf: FAST_PBKDF2 }, keyBytes: 32 });
  const h = decodeLuks1(encodeLuks1(vol.header));
  validateLuks1(h);
  const mut = (f: (x: typeof h) => void, re: RegExp) => {
    const c = decodeLuks1(encodeLuks1(h));
    f(c);
    assert.throws(() => validateLuks1(c), re);
  };
  mut((c) => (c.keyblock[1]!.stripes = 3999), /stripes/);
  mut((c) => (c.keyblock[1]!.keyMaterialOffset = c.keyblock[0]!.keyMaterialOffset + 1), /overlap/);
  mut((c) => (c.keyblock[7]!.keyMaterialOffset = c.payloadOffset - 1), /payload|overlap/);
  mut((c) => (c.keyblock[0]!.keyMaterialOffset = 0), /inside the header/);
  mut((c) => (c.keyblock[0]!.active = 5), /state/);
});
