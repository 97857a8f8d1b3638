// The crypt target: its output equals the engine's for the same key, offsets and options; keys are
// hidden unless asked; key references go through the KeyStore; key messages only while suspended.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { createSectorCipher } from '../../src/engine/index.js';
import type { SectorBytes } from '../../src/engine/index.js';
import type { KeyRef, KeyStore } from '../../src/dm/types.js';
import { Secret } from '../../src/util/secret.js';
import { memRegistry, pattern, xtsKey } from './helpers.js';

const MiB = 1 << 20;

interface Case {
  spec: string;
  key: Buffer;
  ivOffset: bigint;
  offsetS: number;
  opts: string[];
  sectorBytes: SectorBytes;
  ivLarge: boolean;
}

const cases: Case[] = [
  { spec: 'aes-xts-plain64', key: xtsKey(1), ivOffset: 0n, offsetS: 0, opts: [], sectorBytes: 512, ivLarge: false },
  {
    spec: 'aes-xts-plain64',
    key: xtsKey(2),
    ivOffset: 123456789n,
    offsetS: 40,
    opts: [],
    sectorBytes: 512,
    ivLarge: false,
  },
  {
    spec: 'aes-xts-plain64',
    key: xtsKey(3).subarray(0, 32),
    ivOffset: 16n,
    offsetS: 8,
    opts: ['sector_size:4096'],
    sectorBytes: 4096,
    ivLarge: false,
  },
  {
    spec: 'aes-xts-plain64',
    key: xtsKey(4),
    ivOffset: 2n ** 40n,
    offsetS: 64,
    opts: ['sector_size:4096', 'iv_large_sectors'],
    sectorBytes: 4096,
    ivLarge: true,
  },
  {
    spec: 'aes-cbc-essiv:sha256',
    key: xtsKey(5).subarray(0, 32),
    ivOffset: 7n,
    offsetS: 3,
    opts: ['allow_discards'],
    sectorBytes: 512,
    ivLarge: false,
  },
  {
    spec: 'capi:xts(aes)-plain64',
    key: xtsKey(6),
    ivOffset: 0n,
    offsetS: 0,
    opts: ['sector_size:2048', 'same_cpu_crypt'],
    sectorBytes: 2048,
    ivLarge: false,
  },
];

test('crypt target output equals the engine output (key, iv_offset, offset, sector_size, iv_large_sectors)', async () => {
  for (const c of cases) {
    const { registry, mems } = memRegistry({ a: 2 * MiB });
    // The crypt target sits second in the table: IV sectors count from the target's start.
    const optText = c.opts.length ? ` ${c.opts.length} ${c.opts.join(' ')}` : '';
    const lenS = 1024;
    await registry.create('c', {
      table: `0 64 zero\n64 ${lenS} crypt ${c.spec} ${c.key.toString('hex')} ${c.ivOffset} /mem/a ${c.offsetS}${optText}`,
    });
    const dev = registry.open('c');
    const plain = pattern(lenS * 512, 11);
    // Several request sizes: one sector, odd multiples, one large request.
    const step = c.sectorBytes;
    await dev.write(64 * 512, plain.subarray(0, step));
    await dev.write(64 * 512 + step, plain.subarray(step, 8 * step));
    await dev.write(64 * 512 + 8 * step, plain.subarray(8 * step));
    const cipher = createSectorCipher({
      spec: c.spec,
      key: c.key,
      sectorBytes: c.sectorBytes,
      ivLargeSectors: c.ivLarge,
      ivOffsetSectors: c.ivOffset,
    });
    const expected = Buffer.alloc(plain.length);
    cipher.encrypt(plain, 0n, expected);
    const raw = Buffer.alloc(plain.length);
    await mems.get('a')!.read(c.offsetS * 512, raw);
    assert.ok(raw.equals(expected), `ciphertext for ${c.spec} ${c.opts.join(',')}`);
    // And ciphertext written below by the engine reads back as plaintext through the target.
    const plain2 = pattern(lenS * 512, 12);
    const enc2 = Buffer.alloc(plain2.length);
    cipher.encrypt(plain2, 0n, enc2);
    await mems.get('a')!.write(c.offsetS * 512, enc2);
    const back = Buffer.alloc(plain2.length);
    await dev.read(64 * 512, back);
    assert.ok(back.equals(plain2), `plaintext for ${c.spec}`);
    // A read in the middle decrypts with the right IVs.
    const mid = Buffer.alloc(4 * step);
    await dev.read(64 * 512 + 3 * step, mid);
    assert.ok(mid.equals(plain2.subarray(3 * step, 7 * step)));
    cipher.dispose();
    await dev.close();
    await registry.closeAll();
  }
});

test('a write offered as scratch is encrypted in place with the same ciphertext; otherwise the data stays untouched', async () => {
  const key = xtsKey(7);
  const { registry, mems } = memRegistry({ a: 2 * MiB, b: 2 * MiB });
  await registry.create('s', { table: `0 512 crypt aes-xts-plain64 ${key.toString('hex')} 0 /mem/a 8` });
  await registry.create('k', { table: `0 512 crypt aes-xts-plain64 ${key.toString('hex')} 0 /mem/b 8` });
  const plain = pattern(256 * 1024, 21);
  const kept = Buffer.from(plain);
  await registry.open('k').write(0, kept, { fua: true });
  assert.ok(kept.equals(plain), 'the caller data is left alone without the scratch flag');
  const given = Buffer.from(plain);
  // Large (thread pool) and small (inline) requests, across a split at the device edge of a request.
  await registry.open('s').write(0, given.subarray(0, 4096), { scratch: true });
  await registry.open('s').write(4096, given.subarray(4096), { scratch: true, fua: true });
  assert.ok(!given.equals(plain), 'the scratch payload now holds ciphertext');
  const rawA = Buffer.alloc(plain.length);
  const rawB = Buffer.alloc(plain.length);
  await mems.get('a')!.read(8 * 512, rawA);
  await mems.get('b')!.read(8 * 512, rawB);
  assert.ok(rawA.equals(rawB), 'same ciphertext on disk both ways');
  const back = Buffer.alloc(plain.length);
  await registry.open('s').read(0, back);
  assert.ok(back.equals(plain));
  // Emulated write-zeroes never hands its shared zero chunk out as scratch.
  await registry.open('s').writeZeroes(0, 65536, { scratch: true });
  await registry.open('s').writeZeroes(65536, 65536, { scratch: true, fua: true });
  const zeros = Buffer.alloc(131072, 1);
  await registry.open('s').read(0, zeros);
  assert.ok(zeros.equals(Buffer.alloc(131072)));
  await registry.closeAll();
});

test('cipher_null with the empty key "-"', async () => {
  const { registry, mems } = memRegistry({ a: MiB });
  await registry.create('n', { table: '0 16 crypt cipher_null-ecb - 0 /mem/a 0' });
  const data = pattern(16 * 512, 4);
  await registry.open('n').write(0, data);
  const raw = Buffer.alloc(data.length);
  await mems.get('a')!.read(0, raw);
  assert.ok(raw.equals(data));
  assert.deepEqual(registry.get('n').liveTable!.format('table', false), ['0 16 crypt cipher_null-ecb - 0 /mem/a 0']);
  await registry.closeAll();
});

test('keys are hidden unless asked; key references are always shown and resolved by the KeyStore', async () => {
  const store = new Map<string, Buffer>([
    ['k1', xtsKey(8)],
    ['short', Buffer.alloc(16, 1)],
  ]);
  const seen: KeyRef[] = [];
  const keyStore: KeyStore = {
    async resolve(ref) {
      seen.push(ref);
      const k = store.get(ref.description);
      if (k === undefined) throw new Error(`no key named ${ref.description}`);
      return Secret.copyOf(k);
    },
  };
  const { registry, mems } = memRegistry({ a: MiB }, { keyStore });
  const hex = xtsKey(8).toString('hex');
  await registry.create('h', { table: `0 16 crypt aes-xts-plain64 ${hex} 0 /mem/a 0` });
  assert.deepEqual(registry.get('h').liveTable!.format('table', false), [
    `0 16 crypt aes-xts-plain64 ${'0'.repeat(128)} 0 /mem/a 0`,
  ]);
  assert.deepEqual(registry.get('h').liveTable!.format('table', true), [
    `0 16 crypt aes-xts-plain64 ${hex} 0 /mem/a 0`,
  ]);
  assert.deepEqual(registry.get('h').liveTable!.format('status', true), ['0 16 crypt ']);

  await registry.create('r', { table: '0 16 crypt aes-xts-plain64 :64:logon:k1 0 /mem/a 16' });
  assert.deepEqual(seen, [{ keyBytes: 64, type: 'logon', description: 'k1' }]);
  assert.deepEqual(registry.get('r').liveTable!.format('table', false), [
    '0 16 crypt aes-xts-plain64 :64:logon:k1 0 /mem/a 16',
  ]);
  assert.deepEqual(registry.get('r').liveTable!.format('table', true), [
    '0 16 crypt aes-xts-plain64 :64:logon:k1 0 /mem/a 16',
  ]);
  // Same key by reference and by hex: same ciphertext for the same IVs.
  const data = pattern(8192, 1);
  await registry.open('h').write(0, data);
  await registry.open('r').write(0, data);
  const x = Buffer.alloc(8192);
  const y = Buffer.alloc(8192);
  await mems.get('a')!.read(0, x);
  await mems.get('a')!.read(8192, y);
  assert.ok(x.equals(y));

  await assert.rejects(registry.create('bad', { table: '0 16 crypt aes-xts-plain64 :64:user:nope 0 /mem/a 0' }), {
    code: 'EKEYREF',
    message: "table line 1: crypt <key>: the key store cannot resolve ':64:user:nope': no key named nope",
  });
  await assert.rejects(registry.create('bad', { table: '0 16 crypt aes-xts-plain64 :32:user:short 0 /mem/a 0' }), {
    code: 'EKEYREF',
    message: "table line 1: crypt <key>: the key store returned 16 bytes for ':32:user:short', which declares 32",
  });
  // A key in the wrong place (swapped with the cipher or the iv_offset) is never echoed.
  for (const table of [
    `0 16 crypt ${hex} aes-xts-plain64 0 /mem/a 0`,
    `0 16 crypt aes-xts-plain64 0 ${hex} /mem/a 0`,
  ]) {
    await assert.rejects(registry.create('bad', { table }), (e: Error & { code?: string }) => {
      assert.equal(e.code, 'EKEYPLACE');
      assert.ok(!e.message.includes(hex.slice(0, 32)), e.message);
      return true;
    });
  }
  assert.equal(registry.find('bad'), undefined);
  await registry.closeAll();
});

test('key messages: only while suspended; wipe blocks resume; set installs a new key', async () => {
  const keyStore: KeyStore = { resolve: async () => Secret.copyOf(xtsKey(30)) };
  const { registry } = memRegistry({ a: MiB }, { keyStore });
  const k1 = xtsKey(20).toString('hex');
  const k2 = xtsKey(21).toString('hex');
  await registry.create('c', { table: `0 64 crypt aes-xts-plain64 ${k1} 0 /mem/a 0` });
  const dev = registry.open('c');
  const data = pattern(64 * 512, 9);
  await dev.write(0, data);

  await assert.rejects(registry.message('c', 0, ['key', 'wipe']), {
    code: 'EMESSAGE',
    message: 'crypt target: the device must be suspended for key manipulation',
  });
  await assert.rejects(registry.message('c', 0, ['key', 'set']), {
    code: 'EMESSAGE',
    message: "crypt target: unrecognised message 'key set' with 2 words (expected 'key set <key>' or 'key wipe')",
  });
  // A malformed 'key set' never echoes the key hex it carries.
  await assert.rejects(
    registry.message('c', 0, ['key', 'set', k2, 'extra']),
    (e: Error) => !e.message.includes(k2.slice(0, 16)),
  );
  await assert.rejects(registry.message('c', 0, ['hello']), { code: 'EMESSAGE' });
  await registry.suspend('c');
  await registry.message('c', 0, ['key', 'wipe']);
  const inst = registry.get('c').liveTable!.entries[0]!.instance;
  await assert.rejects(inst.read(0, Buffer.alloc(512)), {
    code: 'ENOKEY',
    message: 'I/O on crypt target (table line 1) while its key is wiped',
  });
  await assert.rejects(registry.resume('c'), {
    code: 'ENOKEY',
    message: "aborting resume: the crypt key of table line 1 is not set (message 'key set <key>' first)",
  });
  assert.equal(registry.get('c').suspended, true);
  await assert.rejects(registry.message('c', 0, ['key', 'set', k1.slice(0, 64)]), {
    code: 'EMESSAGE',
    message: "crypt target: new <key> has 32 bytes; this table's key has 64",
  });
  await assert.rejects(registry.message('c', 0, ['key', 'set', 'zz']), {
    code: 'EMESSAGE',
    message: /crypt target: new <key> is not valid hex/,
  });
  await registry.message('c', 0, ['key', 'set', k1]);
  await registry.resume('c');
  const back = Buffer.alloc(data.length);
  await dev.read(0, back);
  assert.ok(back.equals(data), 'same key again: same plaintext');

  await registry.suspend('c');
  await registry.message('c', 0, ['key', 'set', k2]);
  await registry.resume('c');
  assert.deepEqual(registry.get('c').liveTable!.format('table', true), [`0 64 crypt aes-xts-plain64 ${k2} 0 /mem/a 0`]);
  await dev.read(0, back);
  assert.ok(!back.equals(data), 'another key: other plaintext');

  await registry.suspend('c');
  await registry.message('c', 0, ['key', 'set', ':64:logon:svc']);
  await registry.resume('c');
  assert.deepEqual(registry.get('c').liveTable!.format('table', false), [
    '0 64 crypt aes-xts-plain64 :64:logon:svc 0 /mem/a 0',
  ]);
  await dev.close();
  await registry.closeAll();
});

test('allow_discards passes discards down; without it the target refuses them', async () => {
  const { registry, mems } = memRegistry({ a: MiB });
  const key = xtsKey(40).toString('hex');
  await registry.create('d', { table: `0 256 crypt aes-xts-plain64 ${key} 0 /mem/a 0 1 allow_discards` });
  const dev = registry.open('d');
  assert.equal(dev.capabilities.discard, true);
  await dev.write(0, pattern(256 * 512, 2));
  await dev.discard(0, 128 * 512);
  const raw = Buffer.alloc(128 * 512);
  await mems.get('a')!.read(0, raw);
  assert.ok(raw.equals(Buffer.alloc(raw.length)), 'discard reached the memory device');
  await registry.create('n', { table: `0 256 crypt aes-xts-plain64 ${key} 0 /mem/a 0` });
  const inst = registry.get('n').liveTable!.entries[0]!.instance;
  await assert.rejects(inst.discard!(0, 512), {
    code: 'ENOTSUP',
    message: 'crypt target (table line 1) refuses discards: its table has no allow_discards',
  });
  await dev.close();
  await registry.closeAll();
});
