// Luks2Header.update: a change whose header write fails leaves no key material behind and the header
// in memory equal to the device's, so the next change works (review findings of session 4).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { FaultDevice } from '../../src/blockdev/fault.js';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import type { BlockDevice, WriteFlags } from '../../src/blockdev/types.js';
import { Luks2Volume, openLuks } from '../../src/luks/index.js';
import { FAST_PBKDF2, P } from './helpers.js';

const HDR = 16384;

/** Records every write below the data segment that is not a header write (keyslot material). */
class Recorder {
  writes: { offset: number; data: Buffer }[] = [];
  wrap(dev: BlockDevice): BlockDevice {
    const self = this;
    return new Proxy(dev, {
      get(t, p, r) {
        if (p === 'write')
          return async (o: number, d: Uint8Array, f?: WriteFlags) => {
            if (o >= 2 * HDR) self.writes.push({ offset: o, data: Buffer.from(d) });
            return t.write(o, d, f);
          };
        const v = Reflect.get(t, p, r);
        return typeof v === 'function' ? v.bind(t) : v;
      },
    });
  }
}

async function opensWith(dev: BlockDevice, pass: string): Promise<boolean> {
  try {
    (await (await openLuks(dev)).unlock(P(pass))).volumeKey.dispose();
    return true;
  } catch {
    return false;
  }
}

async function setup() {
  const mem = new MemoryDevice({ sizeBytes: 4 << 20 });
  await Luks2Volume.format(mem, P('one'), { keyslot: { kdf: FAST_PBKDF2 }, offsetBytes: 2 << 20 });
  const rec = new Recorder();
  // Header writes (both copies) fail; keyslot material and wipes reach the device.
  const fault = new FaultDevice(rec.wrap(mem), {
    badRanges: [{ offsetBytes: 0, lengthBytes: 2 * HDR, ops: ['write'] }],
  });
  return { mem, rec, fault };
}

async function assertMaterialGone(mem: BlockDevice, rec: Recorder): Promise<void> {
  const material = rec.writes.filter((w) => w.data.some((b) => b !== 0));
  assert.ok(material.length > 0, 'the change wrote keyslot material before its header write');
  // The last write to each place is the wipe; the first was the material.
  const first = new Map<number, Buffer>();
  for (const w of material) if (!first.has(w.offset)) first.set(w.offset, w.data);
  for (const [offset, data] of first) {
    const now = Buffer.alloc(data.length);
    await mem.read(offset, now);
    assert.ok(!now.equals(data), `key material written at ${offset} is still on the device`);
  }
}

test('a failed addKey wipes the material it stored; the volume and the next change are intact', async () => {
  const { mem, rec, fault } = await setup();
  const v = await openLuks(fault);
  await assert.rejects(v.addKey({ passphrase: P('one') }, P('two'), { kdf: FAST_PBKDF2 }), /I\/O error/);
  await assertMaterialGone(mem, rec);
  assert.ok(await opensWith(mem, 'one'));
  assert.ok(!(await opensWith(mem, 'two')));
  // The in-memory header is the device's: lifting the fault, the same object adds the key.
  fault.plan = {};
  await v.addKey({ passphrase: P('one') }, P('two'), { kdf: FAST_PBKDF2 });
  assert.ok(await opensWith(mem, 'two'));
});

test('a failed changeKey wipes its new material and keeps the old passphrase', async () => {
  const { mem, rec, fault } = await setup();
  const v = await openLuks(fault);
  await assert.rejects(v.changeKey(P('one'), P('uno'), { kdf: FAST_PBKDF2 }), /I\/O error/);
  await assertMaterialGone(mem, rec);
  assert.ok(await opensWith(mem, 'one'));
  assert.ok(!(await opensWith(mem, 'uno')));
});

test('a failed unbound keyslot add wipes its material and leaves no digest behind', async () => {
  const { mem, rec, fault } = await setup();
  const v = (await openLuks(fault)) as Luks2Volume;
  await assert.rejects(v.addUnboundKeyslot(P('u'), { keyBytes: 32, kdf: FAST_PBKDF2 }), /I\/O error/);
  await assertMaterialGone(mem, rec);
  const again = (await openLuks(mem)) as Luks2Volume;
  assert.deepEqual(Object.keys(again.json.digests), ['0']);
  assert.deepEqual(Object.keys(v.json.digests), ['0'], 'the in-memory header is the device one');
});
