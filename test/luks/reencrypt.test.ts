// Crash safety of cryptmap reencrypt (issue 16 item 2): a FaultDevice cuts power after every write
// of init + run, for resilience checksum and journal; the survivor is resumed (or begun again when the
// crash came before the reencryption was on disk) and the plaintext must come out whole every time.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import type { BlockDevice } from '../../src/blockdev/types.js';
import { createSectorCipher } from '../../src/engine/index.js';
import { type HotzoneHooks, initReencrypt, inReencryption, Luks2Volume, runReencrypt } from '../../src/luks/index.js';
import { CryptmapError } from '../../src/util/errors.js';
import { cloneDevice, FAST_PBKDF2, memDev, P, sweepCrashes, volumeHolding } from './helpers.js';

const OFF = 1 << 20;
const DATA = 256 << 10;
const SIZE = OFF + DATA;
const PASS = P('pass');

async function plaintext(dev: BlockDevice): Promise<Buffer> {
  const v = await Luks2Volume.open(dev);
  const { volumeKey } = await v.unlock(PASS);
  const seg = v.dataSegment;
  const c = createSectorCipher({ spec: seg.cipher, key: volumeKey.expose(), sectorBytes: seg.sectorBytes });
  const b = Buffer.alloc(DATA);
  await dev.read(OFF, b);
  c.decrypt(b, 0n);
  c.dispose();
  volumeKey.dispose();
  return b;
}

async function reencrypt(dev: BlockDevice, resilience: 'checksum' | 'journal', cipher?: string): Promise<void> {
  const v = await Luks2Volume.open(dev);
  if (!inReencryption(v.jsonSnapshot()))
    await initReencrypt(v, PASS, {
      kdf: FAST_PBKDF2,
      resilience,
      ...(cipher ? { cipher, keyBytes: 32, sectorBytes: 4096 } : {}),
    });
  assert.equal(await runReencrypt(v, PASS, { hotzoneBytes: 64 << 10 }), true);
}

for (const [resilience, cipher] of [
  ['checksum', undefined],
  ['journal', undefined],
  ['checksum', 'aes-cbc-essiv:sha256'],
] as const) {
  test(`reencrypt (${resilience}${cipher ? `, to ${cipher} 4096-byte sectors` : ''}) survives a crash after every write`, async () => {
    const plain = randomBytes(DATA);
    const { dev: base } = await volumeHolding(plain, OFF, PASS);
    await sweepCrashes({
      makeBase: base,
      run: (dev) => reencrypt(dev, resilience, cipher),
      check: async (img, n) => {
        const j = (await Luks2Volume.open(img)).jsonSnapshot();
        assert.equal(inReencryption(j), false, `after ${n} writes`);
        assert.deepEqual(Object.keys(j.segments), ['0']);
        if (cipher) assert.equal(j.segments['0']!.encryption, cipher);
        assert.ok((await plaintext(img)).equals(plain), `plaintext damaged after a crash after ${n} writes`);
      },
      minWrites: 20,
    });
  });
}

test('online (checksum): a client write between the hotzone read and its suspension is hashed again; a crash after every write resumes to what the client wrote', async () => {
  const plain = randomBytes(DATA);
  const { dev: base, v } = await volumeHolding(plain, OFF, PASS);
  const { volumeKey } = await v.unlock(PASS);
  const oldKey = Buffer.from(volumeKey.expose());
  volumeKey.dispose();
  const c = createSectorCipher({ spec: 'aes-xts-plain64', key: oldKey, sectorBytes: 512 });
  await initReencrypt(v, PASS, { kdf: FAST_PBKDF2, resilience: 'checksum' });
  // What the client wrote (on top of `plain`) and how often, since the last fresh copy.
  let want = Buffer.alloc(0);
  let writes = 0;
  try {
    await sweepCrashes({
      makeBase: () => {
        want = Buffer.from(plain);
        writes = 0;
        return cloneDevice(base, (s) => memDev(s), SIZE);
      },
      run: async (dev, img) => {
        // The client: once the run has read and hashed a hotzone (old layout still live), it writes
        // 1 KiB across two blocks of it in the old layout, as the volume's table then maps it.
        const client: HotzoneHooks = {
          async start(off) {
            const at = off + 512;
            const p = randomBytes(1024);
            p.copy(want, at);
            const x = Buffer.from(p);
            c.encrypt(x, BigInt(at / 512));
            await img.write(OFF + at, x);
            writes++;
          },
          async done() {},
        };
        const fv = await Luks2Volume.open(dev);
        assert.equal(await runReencrypt(fv, PASS, { hotzoneBytes: 64 << 10, hotzone: client }), true);
      },
      recover: async (img) => {
        const left = await Luks2Volume.open(img);
        if (inReencryption(left.jsonSnapshot())) assert.equal(await runReencrypt(left, PASS), true);
        return undefined;
      },
      check: async (img, n) => {
        assert.ok(writes > 0 || n < 3, `no client write before a crash after ${n} writes`);
        const j = (await Luks2Volume.open(img)).jsonSnapshot();
        assert.equal(inReencryption(j), false, `after ${n} writes`);
        assert.ok((await plaintext(img)).equals(want), `plaintext damaged after a crash after ${n} writes`);
      },
      minWrites: 10,
    });
  } finally {
    c.dispose();
    oldKey.fill(0);
  }
});

test('reencrypt --resilience none interrupted: the data written so far is flushed before the header records the progress', async () => {
  const base = memDev(SIZE);
  const v0 = await Luks2Volume.format(base, PASS, {
    offsetBytes: OFF,
    keyslotsBytes: OFF - 0x8000,
    keyslot: { kdf: FAST_PBKDF2 },
  });
  await initReencrypt(v0, PASS, { kdf: FAST_PBKDF2, resilience: 'none' });
  const ac = new AbortController();
  const ops: string[] = [];
  let dataWrites = 0;
  // The device in the order it sees writes and flushes; SIGINT (the abort) after the second data write.
  const rec: BlockDevice = {
    sizeBytes: base.sizeBytes,
    capabilities: base.capabilities,
    limits: base.limits,
    read: (at, b) => base.read(at, b),
    write: async (at, b) => {
      await base.write(at, b);
      ops.push(at >= OFF ? 'data' : 'header');
      if (at >= OFF && ++dataWrites === 2) ac.abort();
    },
    flush: async () => {
      await base.flush();
      ops.push('flush');
    },
    discard: (at, n) => base.discard(at, n),
    writeZeroes: (at, n, f) => base.writeZeroes(at, n, f),
    close: async () => undefined,
  } as BlockDevice;
  const v = await Luks2Volume.open(rec);
  assert.equal(await runReencrypt(v, PASS, { hotzoneBytes: 64 << 10, signal: ac.signal }), false);
  const last = ops.lastIndexOf('data');
  const header = ops.indexOf('header', last);
  assert.ok(header > last, `no header write after the data: ${ops.join(' ')}`);
  assert.ok(
    ops.slice(last, header).includes('flush'),
    `the header was written before the data was flushed: ${ops.slice(last).join(' ')}`,
  );
  // And the saved progress resumes to the end.
  assert.equal(await runReencrypt(await Luks2Volume.open(base), PASS, { hotzoneBytes: 64 << 10 }), true);
});

test('reencrypt init that fails after the new keyslot was written takes the keyslot and its digest away again', async () => {
  // Two 512-bit PBKDF2 keyslots (258048 bytes each) fill the keyslots area: the new keyslot fits, the
  // reencrypt keyslot's resilience area does not.
  const dev = memDev(4 << 20);
  const v = await Luks2Volume.format(dev, PASS, {
    offsetBytes: 2 << 20,
    keyslotsBytes: 2 * 258048,
    keyslot: { kdf: FAST_PBKDF2 },
  });
  const before = v.jsonSnapshot();
  await assert.rejects(
    initReencrypt(v, PASS, { kdf: FAST_PBKDF2 }),
    (e) => e instanceof CryptmapError && e.code === 'ENOSPACE',
  );
  const after = (await Luks2Volume.open(dev)).jsonSnapshot();
  assert.deepEqual(Object.keys(after.keyslots), Object.keys(before.keyslots));
  assert.deepEqual(after.digests, before.digests);
  assert.deepEqual(after.segments, before.segments);
  assert.equal(inReencryption(after), false);
});
