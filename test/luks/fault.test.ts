// Crash safety: for every N, stop the device after N writes during a header change and check the
// image still opens with the old or the new secret (issue 4 §6).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import type { BlockDevice } from '../../src/blockdev/types.js';
import { headerRestore, Luks1Volume, Luks2Volume, type LuksVolume, openLuks } from '../../src/luks/index.js';
import { cloneDevice, FAST_PBKDF2, P, sweepCrashes } from './helpers.js';

const SIZE = 4 << 20;
const LUKS2 = { keyslot: { kdf: FAST_PBKDF2 }, offsetBytes: 2 << 20, keyslotsBytes: (2 << 20) - 2 * 16384 - 4096 * 0 };
const mk = (n: number) => new MemoryDevice({ sizeBytes: n });

async function opens(dev: BlockDevice, pass: string): Promise<boolean> {
  try {
    const v = await openLuks(dev);
    (await v.unlock(P(pass))).volumeKey.dispose();
    return true;
  } catch {
    return false;
  }
}

/** Whether every one of `passes` opens the image. */
async function allOpen(dev: BlockDevice, passes: string[]): Promise<boolean> {
  return (await Promise.all(passes.map((p) => opens(dev, p)))).every(Boolean);
}

/**
 * A power cut after every write of `change` (on a copy of `base`; nothing is recovered): the `old` or
 * the `neu` secrets open after each crash, and the `neu` ones once `change` completed (then `done`).
 */
async function crashSweep(
  name: string,
  base: BlockDevice,
  change: (dev: BlockDevice) => Promise<unknown>,
  old: string[],
  neu: string[],
  done: (img: BlockDevice) => Promise<void> = async () => {},
): Promise<void> {
  await sweepCrashes({
    makeBase: base,
    run: async (dev, img) => {
      await change(dev);
      assert.ok(await allOpen(img, neu), `${name}: completed but the new secrets do not open`);
      await done(img);
    },
    recover: async () => undefined,
    check: async (img, n) =>
      assert.ok(
        (await allOpen(img, old)) || (await allOpen(img, neu)),
        `${name}: after ${n} writes neither the old nor the new secrets open`,
      ),
    minWrites: 0,
  });
}

type Op = { name: string; run(v: LuksVolume): Promise<unknown>; old: string[]; neu: string[] };

const sweep = (base: BlockDevice, op: Op) =>
  crashSweep(op.name, base, async (dev) => op.run(await openLuks(dev)), op.old, op.neu);

test('LUKS2 header changes survive a crash after any write', async () => {
  const base = mk(SIZE);
  const v = await Luks2Volume.format(base, P('one'), LUKS2);
  await v.addKey({ passphrase: P('one') }, P('two'), { kdf: FAST_PBKDF2 });
  const ops: Op[] = [
    {
      name: 'addKey',
      run: (x) => x.addKey({ passphrase: P('one') }, P('three'), { kdf: FAST_PBKDF2 }),
      old: ['one'],
      neu: ['one', 'three'],
    },
    {
      name: 'changeKey',
      run: (x) => x.changeKey(P('one'), P('uno'), { kdf: FAST_PBKDF2 }),
      old: ['one'],
      neu: ['uno'],
    },
    { name: 'removeKey', run: (x) => x.removeKey(P('two')), old: ['one'], neu: ['one'] },
    {
      name: 'token',
      run: (x) => (x as Luks2Volume).importToken('{"type":"t","keyslots":["0"]}'),
      old: ['one', 'two'],
      neu: ['one', 'two'],
    },
    { name: 'config', run: (x) => (x as Luks2Volume).setLabel('L', 'S'), old: ['one'], neu: ['one'] },
    {
      name: 'persistent flags',
      run: (x) => (x as Luks2Volume).setPersistentFlags(['allow-discards', 'no-read-workqueue']),
      old: ['one'],
      neu: ['one'],
    },
    { name: 'uuid', run: (x) => x.setUuid('12345678-1234-1234-1234-123456789abc'), old: ['one'], neu: ['one'] },
  ];
  for (const op of ops) await sweep(base, op);
});

test('LUKS2 format: after any crash the image is unformatted/invalid or opens with the new passphrase', async () => {
  await sweepCrashes({
    makeBase: async () => mk(SIZE),
    run: async (dev, img) => {
      await Luks2Volume.format(dev, P('new'), LUKS2);
      assert.ok(await opens(img, 'new'));
    },
    recover: async () => undefined,
    // partial format must never leave a header that opens with something else or crashes the loader
    check: (img) =>
      openLuks(img).then(
        (v) =>
          v.unlock(P('other')).then(
            () => assert.fail('opened with a wrong passphrase'),
            () => {},
          ),
        () => {},
      ),
    minWrites: 0,
  });
});

test('LUKS1 header changes survive a crash after any write', async () => {
  const base = mk(SIZE);
  const v = await Luks1Volume.format(base, P('one'), { keyslot: { kdf: FAST_PBKDF2 }, keyBytes: 32 });
  await v.addKey({ passphrase: P('one') }, P('two'), { kdf: FAST_PBKDF2 });
  const ops: Op[] = [
    {
      name: 'addKey',
      run: (x) => x.addKey({ passphrase: P('one') }, P('three'), { kdf: FAST_PBKDF2 }),
      old: ['one'],
      neu: ['one', 'three'],
    },
    {
      name: 'changeKey',
      run: (x) => x.changeKey(P('one'), P('uno'), { kdf: FAST_PBKDF2 }),
      old: ['one'],
      neu: ['uno'],
    },
    { name: 'removeKey', run: (x) => x.removeKey(P('two')), old: ['one'], neu: ['one'] },
    { name: 'uuid', run: (x) => x.setUuid('12345678-1234-1234-1234-123456789abc'), old: ['one'], neu: ['one'] },
  ];
  for (const op of ops) await sweep(base, op);
});

/** Restore `backup` onto a copy of `base`, crashing after every possible write count. */
async function restoreSweep(
  name: string,
  base: BlockDevice,
  backup: BlockDevice,
  old: string[],
  neu: string[],
): Promise<void> {
  const hdr = (await openLuks(backup)).headerBytes;
  const want = Buffer.alloc(hdr);
  await backup.read(0, want);
  await crashSweep(
    name,
    base,
    (dev) => headerRestore(dev, backup),
    old,
    neu,
    async (img) => {
      const got = Buffer.alloc(hdr);
      await img.read(0, got);
      assert.ok(got.equals(want), `${name}: restored header area differs from the backup`);
    },
  );
}

test('luksHeaderRestore survives a crash after any write (old or restored secrets open)', async () => {
  // LUKS2: a different volume's header (own volume key) whose keyslot 0 lands on the live keyslot 0.
  const base = mk(SIZE);
  const v = await Luks2Volume.format(base, P('one'), LUKS2);
  await v.addKey({ passphrase: P('one') }, P('two'), { kdf: FAST_PBKDF2 });
  const other = mk(SIZE);
  const w = await Luks2Volume.format(other, P('bk'), LUKS2);
  await w.addKey({ passphrase: P('bk') }, P('bk2'), { kdf: FAST_PBKDF2, keySlot: 2 });
  await restoreSweep('luks2 other volume', base, other, ['one', 'two'], ['bk', 'bk2']);
  // LUKS2: an older backup of the same volume (before a passphrase change).
  const same = await cloneDevice(base, mk, SIZE);
  const s2 = await openLuks(same);
  await s2.changeKey(P('one'), P('uno'), { kdf: FAST_PBKDF2 });
  await restoreSweep('luks2 older backup', same, base, ['uno', 'two'], ['one', 'two']);
  // LUKS1: an older backup of the same volume (before a keyslot was added); LUKS1 slots do not move,
  // the dropped slot's material is overwritten only after the header.
  const l1 = mk(SIZE);
  const x = await Luks1Volume.format(l1, P('one'), { keyslot: { kdf: FAST_PBKDF2 }, keyBytes: 32 });
  const l1backup = await cloneDevice(l1, mk, SIZE);
  await x.addKey({ passphrase: P('one') }, P('two'), { kdf: FAST_PBKDF2 });
  await restoreSweep('luks1 older backup', l1, l1backup, ['one', 'two'], ['one']);
});
