// LUKS1 reencryption in cryptsetup 2.6's legacy format (issue 16): a FaultDevice tears a write (part of
// its blocks reach the device) and cuts power there, after every write of init and run, for a new
// volume key in place, with --reduce-device-size (the data moves up, backwards) and for --decrypt; the
// survivor is resumed from the log and header files as the CLI does, and the plaintext must come out
// whole every time (cryptmap's journal puts back a torn block first).
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { test } from 'node:test';
import { FaultDevice } from '../../src/blockdev/fault.js';
import type { BlockDevice } from '../../src/blockdev/types.js';
import { createSectorCipher } from '../../src/engine/index.js';
import {
  initLuks1Reencrypt,
  Luks1Volume,
  luks1ReencryptFiles,
  luks1ReencryptStale,
  luks1StainedUuid,
  removeLuks1ReencryptFiles,
  runLuks1Reencrypt,
} from '../../src/luks/index.js';
import { CryptmapError } from '../../src/util/errors.js';
import { testTempDir } from '../helpers/tmp.js';
import { FAST_PBKDF2, memDev, P } from './helpers.js';

const PASS = P('pass');
const SIZE = 3 << 20;

async function plaintextOf(dev: BlockDevice): Promise<{ data: Buffer; offset: number; cipher: string }> {
  const v = await Luks1Volume.open(dev);
  const { volumeKey } = await v.unlock(PASS);
  const seg = v.dataSegment;
  const b = Buffer.alloc(dev.sizeBytes - seg.offsetBytes);
  await dev.read(seg.offsetBytes, b);
  const c = createSectorCipher({ spec: seg.cipher, key: volumeKey.expose(), sectorBytes: 512 });
  c.decrypt(b, 0n);
  c.dispose();
  volumeKey.dispose();
  return { data: b, offset: seg.offsetBytes, cipher: seg.cipher };
}

async function fresh(): Promise<{ base: ReturnType<typeof memDev>; plain: Buffer }> {
  const base = memDev(SIZE);
  const v = await Luks1Volume.format(base, PASS, {
    cipher: 'aes-xts-plain64',
    keyBytes: 32,
    keyslot: { kdf: FAST_PBKDF2 },
  });
  await v.addKey({ passphrase: PASS }, P('other'), { kdf: FAST_PBKDF2, keySlot: 3 });
  const off = v.dataSegment.offsetBytes;
  const plain = randomBytes(SIZE - off);
  const { volumeKey } = await v.unlock(PASS);
  const c = createSectorCipher({ spec: 'aes-xts-plain64', key: volumeKey.expose(), sectorBytes: 512 });
  const enc = Buffer.from(plain);
  c.encrypt(enc, 0n);
  c.dispose();
  volumeKey.dispose();
  await base.write(off, enc);
  return { base, plain };
}

const CASES = [
  { name: 'a new volume key in place', mode: 'reencrypt' as const, reduce: undefined },
  { name: '--reduce-device-size (the data moves up, backwards)', mode: 'reencrypt' as const, reduce: 256 << 10 },
  { name: '--decrypt (the data moves to the start)', mode: 'decrypt' as const, reduce: undefined },
];

for (const c of CASES) {
  test(`LUKS1 legacy reencryption, ${c.name}: a torn write and power cut anywhere resumes to the plaintext`, async (t) => {
    const dir = testTempDir(t, 'cm-l1-');
    let n = 1;
    for (; ; n++) {
      const { base, plain } = await fresh();
      const v0 = await Luks1Volume.open(base);
      const oldOff = v0.dataSegment.offsetBytes;
      const uuid0 = v0.uuid;
      const run = async (dev: BlockDevice) => {
        let uuid = await luks1StainedUuid(dev);
        // Decryption overwrites the header with plaintext: a resume names the UUID (cryptsetup --uuid).
        if (uuid === undefined && c.mode === 'decrypt' && existsSync(luks1ReencryptFiles(dir, uuid0).log)) {
          const probe = await Luks1Volume.open(dev).catch(() => null);
          if (!probe) uuid = uuid0;
        }
        if (uuid === undefined) {
          const vol = await Luks1Volume.open(dev);
          uuid = vol.uuid;
          if (await luks1ReencryptStale(dev, dir, uuid)) await removeLuks1ReencryptFiles(dir, uuid);
          if (!existsSync(luks1ReencryptFiles(dir, uuid).log))
            await initLuks1Reencrypt(dev, vol, dir, {
              mode: c.mode,
              passphrases: new Map([
                [0, PASS],
                [3, P('other')],
              ]),
              cipher: 'aes-cbc-essiv:sha256',
              keyslot: { kdf: FAST_PBKDF2 },
              ...(c.reduce !== undefined ? { reduceBytes: c.reduce } : {}),
            });
        }
        assert.equal(await runLuks1Reencrypt(dev, dir, uuid, PASS, { blockBytes: 128 << 10 }), true);
      };
      const fd = new FaultDevice(base, { writes: { [n]: 'tear' }, rate: { probability: 0, seed: n } });
      let crashed = false;
      try {
        await run(fd);
      } catch (e) {
        if (!(e instanceof CryptmapError && e.code.startsWith('EFAULT'))) throw e;
        crashed = true;
      }
      if (crashed) await run(base);
      if (c.mode === 'decrypt') {
        const b = Buffer.alloc(SIZE);
        await base.read(0, b);
        assert.ok(b.subarray(0, plain.length).equals(plain), `plaintext damaged after a torn write ${n}`);
        assert.ok(b.subarray(plain.length).equals(Buffer.alloc(SIZE - plain.length)), 'the tail is zeroed');
      } else {
        const r = await plaintextOf(base);
        assert.equal(r.cipher, 'aes-cbc-essiv:sha256');
        assert.equal(r.offset, oldOff + (c.reduce ?? 0));
        assert.ok(r.data.equals(plain.subarray(0, r.data.length)), `plaintext damaged after a torn write ${n}`);
        const v = await Luks1Volume.open(base);
        assert.equal((await v.unlock(P('other'))).keyslot, 3, 'both keyslots come to the new header');
      }
      const f = luks1ReencryptFiles(dir, uuid0);
      assert.ok(!existsSync(f.log) && !existsSync(f.journal), 'the files go at the end');
      if (!crashed) break;
    }
    assert.ok(n > 6, `only ${n} writes`);
  });
}
