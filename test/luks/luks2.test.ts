// LUKS2 library behaviour on memory devices: format, unlock by priority, key changes, tokens,
// config, recovery from one damaged copy, concurrent-update detection and JSON validation checks.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { computeChecksum, LUKS2_HDR_BIN_LEN, setChecksum } from '../../src/luks/luks2-disk.js';
import { CHECK_NAMES, Luks2Volume, openLuks, validateLuks2Json } from '../../src/luks/index.js';
import { VALIDATORS } from '../../src/luks/luks2-handlers.js';
import { FAST_ARGON, FAST_PBKDF2, memDev, P } from './helpers.js';

async function fresh(opts = {}) {
  const dev = memDev();
  const vol = await Luks2Volume.format(dev, P('one'), {
    keyslot: { kdf: FAST_PBKDF2 },
    sectorBytes: 4096,
    label: 'lab',
    ...opts,
  });
  return { dev, vol };
}

test('format then unlock; wrong passphrase is ENOKEY with exit 2', async () => {
  const { dev, vol } = await fresh();
  const r = await vol.unlock(P('one'));
  assert.equal(r.keyslot, 0);
  assert.equal(r.volumeKey.length, 64);
  const again = await openLuks(dev);
  assert.equal(again.type, 'luks2');
  assert.equal(again.label, 'lab');
  const seg = again.dataSegment;
  assert.deepEqual(
    { ...seg },
    {
      offsetBytes: 16 << 20,
      sizeBytes: 'dynamic',
      cipher: 'aes-xts-plain64',
      sectorBytes: 4096,
      ivTweak: 0n,
      keyBytes: 64,
    },
  );
  assert.ok(await again.verifyVolumeKey(r.volumeKey.expose()));
  await assert.rejects(
    again.unlock(P('two')),
    (e: { code: string; exitCode: number; message: string }) =>
      e.code === 'ENOKEY' && e.exitCode === 2 && e.message === 'No key available with this passphrase.',
  );
  r.volumeKey.dispose();
});

test('add, change, remove and kill keyslots; priorities', async () => {
  const { dev, vol } = await fresh();
  assert.equal(await vol.addKey({ passphrase: P('one') }, P('two'), { kdf: FAST_ARGON }), 1);
  assert.equal(await vol.addKey({ passphrase: P('two') }, P('three'), { kdf: FAST_PBKDF2, keySlot: 5 }), 5);
  await assert.rejects(
    vol.addKey({ passphrase: P('one') }, P('x'), { kdf: FAST_PBKDF2, keySlot: 5 }),
    /Key slot 5 is full/,
  );
  assert.equal((await vol.unlock(P('three'))).keyslot, 5);
  assert.equal(await vol.changeKey(P('two'), P('deux'), { kdf: FAST_PBKDF2 }), 1);
  await assert.rejects(vol.unlock(P('two')), { code: 'ENOKEY' });
  assert.equal((await vol.unlock(P('deux'))).keyslot, 1);
  await vol.setPriority(5, 'ignore');
  await assert.rejects(vol.unlock(P('three')), { code: 'ENOKEY' });
  assert.equal((await vol.unlock(P('three'), { keySlot: 5 })).keyslot, 5);
  await vol.setPriority(5, 'normal');
  assert.equal(vol.json.keyslots['5']!.priority, undefined);
  assert.equal(await vol.removeKey(P('one')), 0);
  await vol.killSlot(5);
  const re = await openLuks(dev);
  assert.deepEqual(
    re.keyslots().map((k) => k.id),
    [1],
  );
  assert.equal((await re.unlock(P('deux'))).keyslot, 1);
});

test('tokens are kept through key changes; uuid, label, subsystem', async () => {
  const { dev, vol } = await fresh();
  await vol.addKey({ passphrase: P('one') }, P('two'), { kdf: FAST_PBKDF2 });
  const id = await vol.importToken('{"type":"luks2-keyring","keyslots":["1"],"key_description":"k"}');
  assert.equal(id, 0);
  await assert.rejects(
    vol.importToken('{"type":"luks2-keyring","keyslots":["1"],"key_description":"k","extra":1}'),
    /luks2-keyring/,
  );
  await assert.rejects(vol.importToken('{"type":"x","keyslots":["9"]}'), /missing keyslot/);
  await vol.importToken({ type: 'user', keyslots: ['0'], data: 'abc/def' }, 3);
  await vol.changeKey(P('one'), P('uno'), { kdf: FAST_PBKDF2 });
  await vol.setUuid('12345678-1234-1234-1234-123456789abc');
  await vol.setLabel('new', 'sub');
  const re = (await openLuks(dev)) as Luks2Volume;
  assert.equal(re.exportToken(3), '{"type":"user","keyslots":["0"],"data":"abc/def"}');
  assert.equal(re.uuid, '12345678-1234-1234-1234-123456789abc');
  assert.equal(re.label, 'new');
  assert.equal(re.subsystem, 'sub');
  await re.killSlot(1);
  assert.deepEqual(((await openLuks(dev)) as Luks2Volume).json.tokens['0']!.keyslots, []);
  await re.removeToken(3);
  assert.throws(() => re.exportToken(3), /not in use/);
});

test('a damaged primary or secondary copy is recovered from the other; both damaged fails', async () => {
  const { dev, vol } = await fresh();
  const seq = vol.seqid;
  const junk = Buffer.alloc(512, 0x41);
  await dev.write(4096, junk); // primary JSON area
  let re = (await openLuks(dev)) as Luks2Volume;
  assert.equal(re.needsRepair, true);
  assert.equal(re.seqid, seq);
  await re.repair();
  re = (await openLuks(dev)) as Luks2Volume;
  assert.equal(re.needsRepair, false);
  assert.equal((await re.unlock(P('one'))).keyslot, 0);
  await dev.write(16384 + 4096, junk); // secondary JSON area
  re = (await openLuks(dev)) as Luks2Volume;
  assert.equal(re.needsRepair, true);
  await dev.write(4096, junk);
  await assert.rejects(openLuks(dev), /damaged beyond repair|not a valid LUKS/);
});

test('a concurrent update (seqid changed on disk) is refused', async () => {
  const { dev, vol } = await fresh();
  const other = (await openLuks(dev)) as Luks2Volume;
  await other.setLabel('racer');
  await assert.rejects(vol.setLabel('late'), { code: 'ECONCURRENT' });
});

test('unknown mandatory requirement: not activatable and read-only', async () => {
  const { dev, vol } = await fresh();
  const j = vol.json;
  j.config.requirements = { mandatory: ['future-thing'] };
  const area = Buffer.alloc(16384 - LUKS2_HDR_BIN_LEN);
  Buffer.from(JSON.stringify(j)).copy(area);
  for (const off of [0, 16384]) {
    const bin = Buffer.alloc(4096);
    await dev.read(off, bin);
    bin.writeBigUInt64BE(99n, 16);
    setChecksum(bin, computeChecksum('sha256', bin, area));
    await dev.write(off + 4096, area);
    await dev.write(off, bin);
  }
  const re = (await openLuks(dev)) as Luks2Volume;
  assert.equal(re.activatable, false);
  assert.equal((await re.unlock(P('one'))).keyslot, 0);
  await assert.rejects(re.addKey({ passphrase: P('one') }, P('two'), { kdf: FAST_PBKDF2 }), { code: 'EREQUIREMENT' });
});

test('validation checks run in order and name what failed', async () => {
  assert.deepEqual(CHECK_NAMES.slice(0, 3), ['top_level', 'requirements', 'tokens']);
  const { vol } = await fresh();
  const ok = vol.json;
  const bad = (f: (j: typeof ok) => void, re: RegExp) => {
    const j = structuredClone(ok);
    f(j);
    assert.throws(() => validateLuks2Json(j, 12288, VALIDATORS), re);
  };
  validateLuks2Json(structuredClone(ok), 12288, VALIDATORS);
  bad((j) => delete (j as Record<string, unknown>).tokens, /top_level/);
  bad((j) => (j.segments['0']!.size = '-512'), /segments.*illegal size/);
  bad((j) => (j.segments['0']!.size = '18446744073709551616'), /illegal size/);
  bad((j) => (j.segments['0']!.sector_size = 1000), /sector_size/);
  bad((j) => (j.keyslots['0']!.area.offset = '0'), /areas.*inside the header/);
  bad((j) => (j.digests['0']!.keyslots = ['0', '7']), /digests.*missing 7/);
  bad((j) => (j.config.json_size = '4096'), /config|json_size/);
  bad((j) => (j.config.keyslots_size = '4097'), /keyslots_size/);
  bad((j) => (j.keyslots['0']!.kdf.extra = 1), /keyslot_types/);
  bad((j) => (j.tokens['0'] = { type: 'x', keyslots: ['3'] }), /tokens/);
  assert.throws(() => validateLuks2Json(ok, 8192, VALIDATORS), /json_size/);
});
