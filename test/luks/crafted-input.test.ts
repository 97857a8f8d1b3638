// Crafted LUKS2 headers (issue 11 items 9-11): JSON nested past json-c's depth limit, a digest or
// keyslot type naming an Object.prototype member, the recovered key wiped when a digest throws,
// Argon2 cpus past cryptsetup's limit, and a segment sector_size dm-crypt cannot take. Each is
// refused at load or unlock with a typed error, as cryptsetup does, never a crash or a stack overflow.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { argon2 } from '../../src/crypto/kdf/index.js';
import { computeChecksum, LUKS2_HDR_BIN_LEN, setChecksum } from '../../src/luks/luks2-disk.js';
import { DIGEST_HANDLERS, VALIDATORS } from '../../src/luks/luks2-handlers.js';
import { JSON_MAX_NESTING, parseJsonArea } from '../../src/luks/luks2-json.js';
import { Luks2Volume, openLuks, validateLuks2Json } from '../../src/luks/index.js';
import type { MemoryDevice } from '../../src/blockdev/memory.js';
import { FAST_ARGON, FAST_PBKDF2, memDev, P } from './helpers.js';

const HDR = 16384;
// biome-ignore lint/suspicious/noExplicitAny: crafted headers poke at arbitrary JSON
type J = Record<string, any>;

/** Rewrite the JSON text of both header copies (checksums fixed), as a crafted image would carry it. */
async function setJsonText(dev: MemoryDevice, text: string): Promise<void> {
  for (const off of [0, HDR]) {
    const bin = Buffer.alloc(LUKS2_HDR_BIN_LEN);
    await dev.read(off, bin);
    const area = Buffer.alloc(HDR - LUKS2_HDR_BIN_LEN);
    area.write(text);
    setChecksum(bin, computeChecksum('sha256', bin, area));
    await dev.write(off, bin);
    await dev.write(off + LUKS2_HDR_BIN_LEN, area);
  }
}

async function fresh(kdf = FAST_PBKDF2) {
  const dev = memDev();
  const vol = await Luks2Volume.format(dev, P('one'), { keyslot: { kdf }, sectorBytes: 512 });
  return { dev, json: structuredClone(vol.json) as unknown as J };
}

const nested = (levels: number) => `${'['.repeat(levels)}${']'.repeat(levels)}`;

test('JSON nested deeper than json-c allows is refused before parsing, as not a valid LUKS device', async () => {
  assert.equal(JSON_MAX_NESTING, 32);
  const area = (t: string) => {
    const a = Buffer.alloc(t.length + 64);
    a.write(t);
    return a;
  };
  // The top-level object is level 1; an empty array adds no level below it, a number in it does.
  assert.doesNotThrow(() => parseJsonArea(area(`{"x":${nested(31)}}`)));
  assert.doesNotThrow(() => parseJsonArea(area(`{"x":${'['.repeat(30)}1${']'.repeat(30)}}`)));
  assert.throws(() => parseJsonArea(area(`{"x":${nested(32)}}`)), {
    code: 'ELUKS2JSON',
    message: /json_area.*deeper than 32 levels/,
  });
  assert.throws(() => parseJsonArea(area(`{"x":${'['.repeat(31)}1${']'.repeat(31)}}`)), { code: 'ELUKS2JSON' });
  assert.throws(() => parseJsonArea(area(`{"x":${'{"a":'.repeat(31)}1${'}'.repeat(31)}}`)), { code: 'ELUKS2JSON' });
  // Brackets inside strings do not count.
  assert.doesNotThrow(() => parseJsonArea(area(`{"x":"${'['.repeat(100)}\\"${'{'.repeat(100)}"}`)));
  // ~100,000 levels: before the fix JSON.parse overflowed the stack ("Maximum call stack size exceeded").
  assert.throws(() => parseJsonArea(area(`{"x":${nested(100_000)}}`)), {
    code: 'ELUKS2JSON',
    message: /deeper than 32 levels/,
  });

  const { dev, json } = await fresh();
  const text = JSON.stringify({ ...json, config: { ...json.config, x: JSON.parse(nested(31)) } });
  await setJsonText(dev, text);
  await assert.rejects(openLuks(dev), {
    code: 'ENOTLUKS',
    exitCode: 1,
    message: /not a valid LUKS device.*deeper than 32 levels/,
  });
});

test('a digest or keyslot type naming an Object.prototype member reaches no handler; the key is wiped', async () => {
  const { dev, json } = await fresh();
  json.digests['0']!.type = 'constructor';
  await setJsonText(dev, JSON.stringify(json));
  const vol = await openLuks(dev);
  // Before: "DIGEST_HANDLERS[d.type].verify is not a function" (an internal error) with the key unwiped.
  await assert.rejects(vol.unlock(P('one')), { code: 'ENOKEY', exitCode: 2 });
  assert.equal(await vol.verifyVolumeKey(Buffer.alloc(64)), false);
  for (const t of ['toString', '__proto__', 'hasOwnProperty']) {
    const j = structuredClone(json);
    j.digests['0']!.type = 'pbkdf2';
    j.keyslots['0']!.type = t;
    assert.doesNotThrow(() => validateLuks2Json(j, HDR - 4096, VALIDATORS));
  }
});

test('the recovered key is wiped when its digest check throws', async (t) => {
  const { dev } = await fresh();
  const vol = await openLuks(dev);
  const seen: Uint8Array[] = [];
  const h = DIGEST_HANDLERS.pbkdf2!;
  t.mock.method(h, 'verify', async (_d: unknown, vk: Uint8Array) => {
    seen.push(vk);
    throw new Error('digest failed');
  });
  await assert.rejects(vol.unlock(P('one')), /digest failed/);
  assert.equal(seen.length, 1);
  assert.ok(
    seen[0]!.every((b) => b === 0),
    'volume key left in memory after a failed digest check',
  );
});

test("Argon2 cpus past cryptsetup's limit: keyslot open failed (exit 1), no threads or memory spent", async () => {
  // A lane count past 4 used to raise memory past the 4 GiB cap (8 KiB per lane) after the cap was checked.
  await assert.rejects(argon2('argon2id', P('x'), Buffer.alloc(32), 4, 4 * 1024 * 1024, 0xffffff, 32), {
    code: 'EKDFLIMIT',
  });
  await assert.rejects(argon2('argon2id', P('x'), Buffer.alloc(32), 4, 32, 5, 32), { code: 'EKDFLIMIT' });
  assert.equal((await argon2('argon2id', P('x'), Buffer.alloc(32), 4, 32, 4, 32)).length, 32);
  const { dev, json } = await fresh(FAST_ARGON);
  for (const cpus of [5, 1024, 0xffffff]) {
    json.keyslots['0']!.kdf = { ...(json.keyslots['0']!.kdf as object), cpus };
    await setJsonText(dev, JSON.stringify(json));
    const vol = await openLuks(dev);
    await assert.rejects(vol.unlock(P('one')), { code: 'EKDFLIMIT', exitCode: 1, message: 'Keyslot open failed.' });
  }
});

test('a segment sector_size dm-crypt cannot take (1536, 8192) is refused at load by the segments check', async () => {
  const { json } = await fresh();
  for (const ss of [1536, 8192, 3072]) {
    const j = structuredClone(json);
    j.segments['0']!.sector_size = ss;
    assert.throws(
      () => validateLuks2Json(j, HDR - 4096, VALIDATORS),
      (e: { code: string; context: { check: string; path: string }; message: string }) =>
        e.code === 'ELUKS2JSON' &&
        e.context.check === 'segments' &&
        e.context.path === 'segments.0' &&
        e.message.includes(`illegal sector_size ${ss}`),
    );
  }
  for (const ss of [512, 1024, 2048, 4096]) {
    const j = structuredClone(json);
    j.segments['0']!.sector_size = ss;
    assert.doesNotThrow(() => validateLuks2Json(j, HDR - 4096, VALIDATORS));
  }
  const { dev } = await fresh();
  const j = structuredClone(json);
  j.segments['0']!.sector_size = 1536;
  await setJsonText(dev, JSON.stringify(j));
  await assert.rejects(openLuks(dev), { code: 'ENOTLUKS', message: /segments: segments\.0.*illegal sector_size 1536/ });
});
