// Bad input to a reencryption in progress (issue 16, Bad input): a resume with the wrong passphrase, a
// device that shrank, a header whose reencryption metadata was tampered with, a header damaged in one
// or both copies, a second reencrypt while one runs, SIGINT. Each is refused with cryptsetup's message
// and exit code and leaves every byte of the device as it was (or, SIGINT, stops at a hotzone boundary
// that both tools resume from).
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { test } from 'node:test';
import { fileTempDir } from '../helpers/tmp.js';
import { FileDevice } from '../../src/blockdev/file.js';
import type { BlockDevice } from '../../src/blockdev/types.js';
import { createSectorCipher } from '../../src/engine/index.js';
import { initReencrypt, inReencryption, Luks2Volume, runReencrypt, withDeviceLock } from '../../src/luks/index.js';
import { CryptmapError } from '../../src/util/errors.js';
import { cloneDevice, FAST_PBKDF2, inProcessCli, memDev, P, volumeHolding } from './helpers.js';
import { FAST_LUKS2_FORMAT, FAST_PBKDF } from '../helpers/luks.js';
import { cryptsetupSync, cryptsetupVolumeKey, type CryptsetupResult } from '../helpers/tools.js';

const OFF = 1 << 20;
const DATA = 512 << 10;
const SIZE = OFF + DATA;
const PASS = P('pass');
const HZ = 64 << 10;

const dir = fileTempDir('cm-reenc-bad-');

async function bytes(dev: BlockDevice): Promise<Buffer> {
  const b = Buffer.alloc(dev.sizeBytes);
  await dev.read(0, b);
  return b;
}

/** A volume with random data, its reencryption begun and stopped after two hotzones. */
async function halfway(): Promise<BlockDevice> {
  const { dev, v } = await volumeHolding(randomBytes(DATA), OFF, PASS);
  await initReencrypt(v, PASS, { kdf: FAST_PBKDF2 });
  const ac = new AbortController();
  let n = 0;
  const stopped = await runReencrypt(v, PASS, {
    hotzoneBytes: HZ,
    signal: ac.signal,
    onProgress: () => {
      if (++n === 3) ac.abort();
    },
  });
  assert.equal(stopped, false);
  return dev;
}

test("resume with the wrong passphrase: exit 1 as cryptsetup (the last keyslot tried for the old key is the new key's), nothing changed", async () => {
  const dev = await halfway();
  const was = await bytes(dev);
  await assert.rejects(
    runReencrypt(await Luks2Volume.open(dev), P('wrong'), { hotzoneBytes: HZ }),
    (e) => e instanceof CryptmapError && e.code === 'EKEYSLOT' && e.exitCode === 1,
  );
  assert.ok((await bytes(dev)).equals(was));
});

test('a device that shrank under the part already reencrypted: refused, nothing changed', async () => {
  const dev = await halfway();
  // Cut the device inside the new segment (the first 128 KiB of data are done).
  const small = memDev(OFF + HZ);
  const head = Buffer.alloc(OFF + HZ);
  await dev.read(0, head);
  await small.write(0, head);
  const was = await bytes(small);
  await assert.rejects(
    runReencrypt(await Luks2Volume.open(small), PASS, { hotzoneBytes: HZ }),
    (e) => e instanceof CryptmapError && e.code === 'EDEVSIZE' && /too small/.test(e.message),
  );
  assert.ok((await bytes(small)).equals(was));
});

test('reencryption metadata changed behind the verification digest: refused, nothing changed', async () => {
  const dev = await halfway();
  const v = await Luks2Volume.open(dev);
  const j = v.jsonSnapshot();
  const ks = Object.values(j.keyslots).find((k) => k.type === 'reencrypt')!;
  (ks as unknown as { direction: string }).direction = 'backward';
  await v.commitJson(j);
  const was = await bytes(dev);
  await assert.rejects(
    runReencrypt(await Luks2Volume.open(dev), PASS, { hotzoneBytes: HZ }),
    (e) => e instanceof CryptmapError && /Reencryption metadata is invalid/.test(e.message),
  );
  assert.ok((await bytes(dev)).equals(was));
});

test('a header damaged mid-reencryption: one copy is recovered and the run resumes; both copies: refused', async () => {
  const dev = await halfway();
  const two = await cloneDevice(dev, (s) => memDev(s), SIZE);
  // The primary copy's JSON area damaged: the secondary copy carries the reencryption on.
  await dev.write(4096, Buffer.alloc(512, 0x41));
  assert.equal(await runReencrypt(await Luks2Volume.open(dev), PASS, { hotzoneBytes: HZ }), true);
  assert.equal(inReencryption((await Luks2Volume.open(dev)).jsonSnapshot()), false);
  // Both copies damaged: no header, an error (no crash) and nothing written.
  await two.write(4096, Buffer.alloc(512, 0x41));
  await two.write(0x4000 + 4096, Buffer.alloc(512, 0x41));
  const was = await bytes(two);
  await assert.rejects(Luks2Volume.open(two), (e) => e instanceof CryptmapError);
  assert.ok((await bytes(two)).equals(was));
});

const cm = inProcessCli(dir);

function cs(...args: string[]): CryptsetupResult {
  return cryptsetupSync(args);
}

function image(name: string): { img: string; key: string } {
  const img = join(dir, name);
  const key = join(dir, `${name}.key`);
  writeFileSync(key, 'secret pass', { mode: 0o600 });
  writeFileSync(img, Buffer.concat([Buffer.alloc(16 << 20), randomBytes(8 << 20)]));
  const f = cs(...FAST_LUKS2_FORMAT, '--key-file', key, img);
  assert.equal(f.status, 0, f.out);
  return { img, key };
}

/** The plaintext of an image made by image(), through the volume key cryptsetup dumps. */
function plainOf(f: string): Buffer {
  const vk = cryptsetupVolumeKey(`${f.replace(/\.copy$/, '')}.key`, f);
  const b = Buffer.from(readFileSync(f).subarray(16 << 20));
  const c = createSectorCipher({ spec: 'aes-xts-plain64', key: vk, sectorBytes: 4096 });
  c.decrypt(b, 0n);
  c.dispose();
  return b;
}

test('a second reencrypt while one holds the device: "Reencryption process is already running.", exit 5', async () => {
  const { img, key } = image('busy.img');
  assert.equal((await cm('reencrypt', '--init-only', '-q', ...FAST_PBKDF, '--key-file', key, img)).code, 0);
  const was = readFileSync(img);
  // This process holds the device lock as a running reencryption does.
  const r = await withDeviceLock(img, () => cm('reencrypt', '--resume-only', '-q', '--key-file', key, img), {
    env: { CRYPTMAP_LOCK_DIR: join(dir, 'locks') },
  });
  assert.equal(r.code, 5, r.err);
  assert.match(r.err, /Reencryption process is already running\./);
  assert.ok(readFileSync(img).equals(was));
});

test('SIGINT stops the CLI at a hotzone boundary (exit 0); cryptsetup and cryptmap both resume from there', async () => {
  const cli = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..', 'bin', 'cryptmap.js');
  // The run is caught mid-way (a fixed-length first segment in the header) and interrupted; one that
  // finished first is tried again on a fresh image, and the test fails if none was caught.
  let caught: { img: string; key: string; plain: Buffer } | undefined;
  for (let attempt = 0; attempt < 4 && !caught; attempt++) {
    const { img, key } = image(`int${attempt}.img`);
    const plain = plainOf(img);
    const child = spawn(
      process.execPath,
      [cli, 'reencrypt', '--force-offline-reencrypt', '-q', '--hotzone-size', '64K', ...FAST_PBKDF, '-d', key, img],
      { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, CRYPTMAP_LOCK_DIR: join(dir, 'locks') } },
    );
    let err = '';
    child.stderr.on('data', (d) => {
      err += String(d);
    });
    const exited = new Promise<number | null>((r) => child.once('exit', (c) => r(c)));
    let code: number | null | undefined;
    void exited.then((c) => {
      code = c;
    });
    const deadline = Date.now() + 60_000;
    while (code === undefined && Date.now() < deadline) {
      const d = cs('luksDump', '--disable-locks', img).out;
      if (/Data segments:\n {2}0: crypt\n\toffset: [0-9]+ \[bytes\]\n\tlength: [0-9]+ \[bytes\]/.test(d)) break;
      await new Promise((r) => setTimeout(r, 20));
    }
    child.kill('SIGINT');
    const timer = setTimeout(() => child.kill('SIGKILL'), 120_000);
    const c = await exited;
    clearTimeout(timer);
    assert.equal(c, 0, err);
    if (/Reencryption interrupted/.test(err)) caught = { img, key, plain };
  }
  assert.ok(caught, 'the reencryption finished every time before SIGINT came: the interruption was not exercised');
  const { img, key } = caught;
  // A hotzone boundary: no hotzone in progress in the header.
  const d = cs('luksDump', img).out;
  assert.match(d, /online-reencrypt-v2/);
  assert.doesNotMatch(d, /in-reencryption/);
  const copy = `${img}.copy`;
  writeFileSync(copy, readFileSync(img));
  const r = cs('reencrypt', '--resume-only', '--force-offline-reencrypt', '-q', '--key-file', key, img);
  assert.equal(r.status, 0, r.out);
  assert.equal(
    (await cm('reencrypt', '--force-offline-reencrypt', '--resume-only', '-q', '--key-file', key, copy)).code,
    0,
  );
  for (const f of [img, copy]) {
    assert.doesNotMatch(cs('luksDump', f).out, /online-reencrypt/);
    assert.equal(cs('open', '--test-passphrase', '--key-file', key, f).status, 0);
  }
  assert.ok(plainOf(img).equals(caught.plain), 'plaintext after cryptsetup resumed');
  assert.ok(plainOf(copy).equals(caught.plain), 'plaintext after cryptmap resumed');
});

test('repair of a header in reencryption checks the reencryption digest with the passphrase, as cryptsetup: tampered metadata exit 2, nothing written', async () => {
  const { img, key } = image('repair.img');
  const init = cs('reencrypt', '--init-only', '-q', '--force-offline-reencrypt', ...FAST_PBKDF, '--key-file', key, img);
  assert.equal(init.status, 0, init.out);
  const copy = (to: string) => {
    writeFileSync(to, readFileSync(img));
    return to;
  };
  // Untouched metadata: both tools repair with exit 0 and change nothing.
  for (const [tool, f] of [
    ['cryptsetup', copy(`${img}.cs-clean`)],
    ['cryptmap', copy(`${img}.cm-clean`)],
  ] as const) {
    const was = readFileSync(f);
    const code =
      tool === 'cryptsetup'
        ? cs('repair', '-q', '--key-file', key, f).status
        : (await cm('repair', '-q', '--key-file', key, f)).code;
    assert.equal(code, 0, `${tool} repair of a clean reencryption`);
    assert.ok(readFileSync(f).equals(was), `${tool} changed a clean header`);
  }
  // The reencrypt keyslot's direction changed behind its digest (checksums recomputed): exit 2 for both, as for resume.
  const dev = await FileDevice.open(img);
  try {
    const v = await Luks2Volume.open(dev);
    const j = v.jsonSnapshot();
    const ks = Object.values(j.keyslots).find((k) => k.type === 'reencrypt')!;
    (ks as unknown as { direction: string }).direction = 'backward';
    await v.commitJson(j);
  } finally {
    await dev.close();
  }
  const csCopy = copy(`${img}.cs-bad`);
  const cmCopy = copy(`${img}.cm-bad`);
  const was = readFileSync(img);
  assert.equal(cs('repair', '-q', '--key-file', key, csCopy).status, 2);
  const r = await cm('repair', '-q', '--key-file', key, cmCopy);
  assert.equal(r.code, 2, r.err);
  assert.match(r.err, /Reencryption metadata is invalid/);
  assert.ok(readFileSync(cmCopy).equals(was), 'cryptmap wrote to a header it refused');
  // and a passphrase that opens no key: exit 1, as cryptsetup's repair
  writeFileSync(`${key}.wrong`, 'not it', { mode: 0o600 });
  assert.equal(cs('repair', '-q', '--key-file', `${key}.wrong`, copy(`${img}.cs-wrong`)).status, 1);
  assert.equal((await cm('repair', '-q', '--key-file', `${key}.wrong`, copy(`${img}.cm-wrong`))).code, 1);
});
