// LUKS2 reencryption with a data shift (cryptsetup 2.6 `reencrypt --reduce-device-size N` without
// --encrypt): the data moves N bytes up while it is reencrypted, backward, in hotzones of N. A
// FaultDevice cuts power after every write of init + run; the survivor is resumed and the plaintext
// (all but the last N bytes the reduction gives up) must come out whole every time. The same for a
// detached-header decryption with --reduce-device-size (the plaintext ends up N bytes further up).
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import type { MemoryDevice } from '../../src/blockdev/memory.js';
import type { BlockDevice } from '../../src/blockdev/types.js';
import {
  initDecrypt,
  initDecryptExport,
  initDecryptExportFile,
  initReencrypt,
  inReencryption,
  Luks2Volume,
  runReencrypt,
} from '../../src/luks/index.js';
import { CryptmapError } from '../../src/util/errors.js';
import { FAST_PBKDF2, hasLuks2, memDev, P, readPlaintext, sliceDev, sweepCrashes, writePlaintext } from './helpers.js';
import { makeTempDir } from '../helpers/tmp.js';

const PASS = P('pass');
const META = 0x4000;
const KS = 1 << 20;
const OFF = 2 * META + KS;

/** A LUKS2 volume (metadata META, keyslots KS, data at OFF) on a memory device with `data` bytes of data. */
async function volume(data: number, sectorBytes: 512 | 4096 = 512): Promise<{ dev: MemoryDevice; v: Luks2Volume }> {
  const dev = memDev(OFF + data);
  const v = await Luks2Volume.format(dev, PASS, {
    metadataBytes: META,
    keyslotsBytes: KS,
    offsetBytes: OFF,
    sectorBytes,
    keyslot: { kdf: FAST_PBKDF2 },
  });
  return { dev, v };
}

for (const [S, DATA, sector] of [
  [256 << 10, (1 << 20) + (64 << 10), 512],
  [64 << 10, 256 << 10, 4096],
] as const) {
  test(`reencryption with a data shift of ${S} bytes (${DATA} bytes of data, sector ${sector}) survives a crash after every write`, async () => {
    const { dev: base0, v: v0 } = await volume(DATA, sector);
    const plain = randomBytes(DATA);
    await writePlaintext(v0, PASS, base0, plain);
    let recovered = 0;
    await sweepCrashes({
      makeBase: base0,
      run: async (dev) => {
        const v = await Luks2Volume.open(dev);
        const j = v.jsonSnapshot();
        if (!inReencryption(j)) {
          if (Number(j.segments['0']!.offset) !== OFF) return; // finished before the crash
          // A crash inside init leaves the old header (perhaps with an unbound new keyslot): begin again.
          await initReencrypt(v, PASS, { kdf: FAST_PBKDF2, shiftBytes: S });
        }
        if (Object.values(v.jsonSnapshot().segments).some((s) => s.flags?.includes('in-reencryption'))) recovered++;
        assert.equal(await runReencrypt(v, PASS), true);
      },
      check: async (base, n) => {
        const v = await Luks2Volume.open(base);
        const j = v.jsonSnapshot();
        assert.equal(inReencryption(j), false);
        assert.deepEqual(Object.keys(j.segments), ['0']);
        assert.equal(j.segments['0']!.offset, String(OFF + S));
        assert.equal(j.config.keyslots_size, String(KS + S));
        assert.ok(
          (await readPlaintext(v, PASS, base, DATA - S)).equals(plain.subarray(0, DATA - S)),
          `plaintext damaged after a crash after ${n} writes`,
        );
      },
      minWrites: 10,
    });
    assert.ok(recovered > 2, `only ${recovered} hotzones recovered`);
  });
}

test('decryption with a detached header and a data shift survives a crash after every write', async () => {
  // The live segments' offsets (down to the shift) must stay above the keyslots area, as cryptsetup checks.
  const S = 512 << 10;
  const DATA = (1 << 20) + (256 << 10);
  const H = 2 * META + (256 << 10);
  const base0 = memDev(H + DATA);
  const hdr0 = sliceDev(base0, 0, H);
  const data0 = sliceDev(base0, H, DATA);
  const v0 = await Luks2Volume.format(hdr0, PASS, {
    metadataBytes: META,
    keyslotsBytes: 256 << 10,
    detachedHeader: true,
    offsetBytes: 0,
    keyslot: { kdf: FAST_PBKDF2 },
  });
  const plain = randomBytes(DATA);
  await writePlaintext(v0, PASS, data0, plain);
  await sweepCrashes({
    makeBase: base0,
    run: async (dev) => {
      const v = await Luks2Volume.open(sliceDev(dev, 0, H));
      const data = sliceDev(dev, H, DATA);
      const j = v.jsonSnapshot();
      if (!inReencryption(j)) {
        if (j.segments['0']!.type === 'linear') return;
        await initDecrypt(v, PASS, { dataDev: data, shiftBytes: S });
      }
      assert.equal(await runReencrypt(v, PASS, { dataDev: data }), true);
    },
    check: async (base, n) => {
      const j = (await Luks2Volume.open(sliceDev(base, 0, H))).jsonSnapshot();
      assert.equal(inReencryption(j), false);
      assert.equal(j.segments['0']!.type, 'linear');
      assert.equal(j.segments['0']!.offset, String(S));
      const b = Buffer.alloc(DATA - S);
      await base.read(H + S, b);
      assert.ok(b.equals(plain.subarray(0, DATA - S)), `plaintext damaged after a crash after ${n} writes`);
    },
    minWrites: 5,
  });
});

test('a data shift not aligned to the encryption sector size is refused before anything is written', async () => {
  const { dev, v } = await volume(1 << 20, 4096);
  const before = JSON.stringify(v.jsonSnapshot());
  await assert.rejects(
    initReencrypt(v, PASS, { kdf: FAST_PBKDF2, shiftBytes: 1536 }),
    /Data shift value is not aligned to encryption sector size \(4096 bytes\)\./,
  );
  assert.equal(JSON.stringify((await Luks2Volume.open(dev)).jsonSnapshot()), before);
});

for (const [resilience, moved] of [
  ['datashift-checksum', undefined],
  ['datashift-journal', 128 << 10],
] as const) {
  test(`decryption with the header exported (${resilience}) survives a crash after every write`, async () => {
    const KS2 = 512 << 10;
    const SHIFT = 2 * META + KS2;
    const DATA = SHIFT + (1 << 20) + (256 << 10);
    const H = SHIFT;
    const base0 = memDev(H + DATA);
    const dev0 = sliceDev(base0, H, DATA);
    const v0 = await Luks2Volume.format(dev0, PASS, {
      metadataBytes: META,
      keyslotsBytes: KS2,
      offsetBytes: SHIFT,
      keyslot: { kdf: FAST_PBKDF2 },
    });
    const plain = randomBytes(DATA - SHIFT);
    await writePlaintext(v0, PASS, dev0, plain);
    let restored = 0;
    await sweepCrashes({
      makeBase: base0,
      run: async (dev) => {
        const hdr = sliceDev(dev, 0, H);
        const data = sliceDev(dev, H, DATA);
        let hv: Luks2Volume | undefined = (await hasLuks2(hdr)) ? await Luks2Volume.open(hdr) : undefined;
        if (hv && !inReencryption(hv.jsonSnapshot())) {
          if (hv.jsonSnapshot().segments['0']!.type === 'linear') return; // finished
          hv = undefined;
        }
        if (!hv) {
          if (!(await hasLuks2(data))) {
            // Crashed after the device's signatures went: the header file holds the backup (luksHeaderRestore).
            const b = Buffer.alloc(H);
            await hdr.read(0, b);
            await data.write(0, b);
            restored++;
          }
          hv = await initDecryptExport(data, hdr, PASS, {
            resilience,
            ...(moved !== undefined ? { movedBytes: moved } : {}),
          });
        }
        assert.equal(await runReencrypt(hv, PASS, { dataDev: data }), true);
      },
      check: async (base, n) => {
        const j = (await Luks2Volume.open(sliceDev(base, 0, H))).jsonSnapshot();
        assert.equal(inReencryption(j), false);
        assert.deepEqual(Object.keys(j.segments), ['0']);
        assert.equal(j.segments['0']!.type, 'linear');
        assert.equal(j.segments['0']!.offset, '0');
        const b = Buffer.alloc(DATA - SHIFT);
        await base.read(H, b);
        assert.ok(b.equals(plain), `plaintext damaged after a crash after ${n} writes`);
      },
      minWrites: 10,
    });
    assert.ok(restored > 0, `only ${restored} restores`);
  });
}

test('a data segment with an integrity profile is not reencrypted (cryptsetup: luks2_reencrypt_eligible)', async () => {
  const { dev, v } = await volume(1 << 20);
  const j = v.jsonSnapshot();
  j.segments['0']!.integrity = { type: 'hmac(sha256)', journal_encryption: 'none', journal_integrity: 'none' };
  await v.commitJson(j);
  const before = JSON.stringify(v.jsonSnapshot());
  const msg = /Reencryption of device with integrity profile is not supported\./;
  await assert.rejects(initReencrypt(v, PASS, { kdf: FAST_PBKDF2 }), msg);
  await assert.rejects(initReencrypt(v, PASS, { kdf: FAST_PBKDF2, shiftBytes: 64 << 10 }), msg);
  const hdr = memDev(OFF);
  await assert.rejects(initDecryptExport(dev, hdr, PASS), msg);
  assert.equal(JSON.stringify((await Luks2Volume.open(dev)).jsonSnapshot()), before);
});

test('datashift-checksum and datashift-journal protect only a decryption with the header exported', async () => {
  const { dev, v } = await volume(1 << 20);
  const before = JSON.stringify(v.jsonSnapshot());
  for (const resilience of ['datashift-checksum', 'datashift-journal'] as const)
    await assert.rejects(
      initReencrypt(v, PASS, { kdf: FAST_PBKDF2, resilience }),
      /Failed to initialize LUKS2 reencryption in metadata\./,
    );
  assert.equal(JSON.stringify((await Luks2Volume.open(dev)).jsonSnapshot()), before);
});

test('initDecryptExportFile writes the header only through the file it created, and on a failure removes only that file', async (t) => {
  const { dir, cleanup } = makeTempDir('cm-export-');
  t.after(cleanup);
  const dev = memDev(OFF + (1 << 20));
  await Luks2Volume.format(dev, PASS, {
    metadataBytes: META,
    keyslotsBytes: KS,
    offsetBytes: OFF,
    keyslot: { kdf: FAST_PBKDF2 },
  });
  const before = Buffer.alloc(OFF);
  await dev.read(0, before);
  const hdr = join(dir, 'hdr');
  const planted = Buffer.from('another file, put where the header was made\n');
  // The injected step: at the first write to the device (after the header was copied to H), H is
  // renamed away and another file put at its path; then the write fails.
  let swapped = false;
  const failing: BlockDevice = new Proxy(dev, {
    get(target, prop) {
      if (prop === 'write' && !swapped)
        return async () => {
          swapped = true;
          renameSync(hdr, `${hdr}.moved`);
          writeFileSync(hdr, planted);
          throw new CryptmapError('EIO', 'injected write failure');
        };
      const v = Reflect.get(target, prop, target);
      return typeof v === 'function' ? v.bind(target) : v;
    },
  });
  await assert.rejects(initDecryptExportFile(failing, hdr, PASS), /injected write failure/);
  assert.ok(swapped, 'the device was written');
  assert.ok(readFileSync(hdr).equals(planted), 'the file put at the path is neither written nor removed');
  assert.ok(readFileSync(`${hdr}.moved`).subarray(0, OFF).equals(before), 'the header went to the file made');
  const after = Buffer.alloc(OFF);
  await dev.read(0, after);
  assert.ok(after.equals(before), 'the device keeps its header');
  // Without the swap, a failure removes the file it made.
  rmSync(hdr);
  await assert.rejects(initDecryptExportFile(dev, hdr, PASS, { movedBytes: 2 * OFF }), /Moved segment size/);
  assert.ok(!existsSync(hdr), 'the header file made is removed');
});
