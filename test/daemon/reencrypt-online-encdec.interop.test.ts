// Online encryption and decryption (issue 16 item 3, as cryptsetup 2.6 runs them on an active device):
// `cryptmap reencrypt --decrypt --header H DEVICE` of a volume the daemon serves, and `cryptmap reencrypt
// --encrypt [--header H | --reduce-device-size N] --init-only DEVICE NAME` (the device activated in the
// middle of its encryption, as cryptsetup's second argument does) then `--resume-only NAME`, each while
// fio (ioengine=nbd, crc32c verify) reads and writes the volume the whole time, with no error.
// Afterwards the data past fio's region is intact: on the data device after a decryption, under the
// volume key cryptsetup dumps after an encryption.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { FileDevice } from '../../src/blockdev/file.js';
import { createSectorCipher } from '../../src/engine/index.js';
import { cli, cliOk, type Daemon, volumeStatus, startDaemon } from '../load/helpers.js';
import { startFio } from '../helpers/fio.js';
import { FAST_PBKDF } from '../helpers/luks.js';
import { fileTempDir } from '../helpers/tmp.js';
import { cryptsetupSync, cryptsetupVolumeKey, type CryptsetupResult } from '../helpers/tools.js';
import { pollUntil } from '../helpers/wait.js';

const MiB = 1 << 20;
/** fio's region: the first 16 MiB of the volume; the rest holds a known plaintext checked at the end. */
const FIO_MIB = 16;
const VOL = 40 * MiB;
const SHIFT = MiB;

const dir = fileTempDir('cm-reenc-encdec-');

function cs(...args: string[]): CryptsetupResult {
  return cryptsetupSync(args);
}

interface Env {
  img: string;
  hdr?: string;
  key: string;
  run: string;
  env: NodeJS.ProcessEnv;
  tail: Buffer;
}

function files(name: string, bytes: number, detached: boolean): Env {
  const img = join(dir, `${name}.img`);
  const key = join(dir, `${name}.key`);
  writeFileSync(key, `pass ${name}`, { mode: 0o600 });
  writeFileSync(img, '');
  truncateSync(img, bytes);
  const run = join(dir, `${name}-run`);
  return {
    img,
    ...(detached ? { hdr: join(dir, `${name}.hdr`) } : {}),
    key,
    run,
    env: { CRYPTMAP_RUNTIME_DIR: run, CRYPTMAP_LOCK_DIR: join(dir, 'locks') },
    tail: randomBytes(VOL - FIO_MIB * MiB),
  };
}

function volumeKey(e: Env): Buffer {
  return cryptsetupVolumeKey(e.key, e.hdr ?? e.img);
}

/** Bytes [at, at+n) of the data device, decrypted with `vk` (volume data at `dataOff`, IVs from 0) unless plain. */
async function readData(e: Env, dataOff: number, at: number, n: number, vk?: Buffer): Promise<Buffer> {
  const dev = await FileDevice.open(e.img);
  try {
    const b = Buffer.alloc(n);
    await dev.read(dataOff + at, b);
    if (vk) {
      const c = createSectorCipher({ spec: 'aes-xts-plain64', key: vk, sectorBytes: 512 });
      c.decrypt(b, BigInt(at / 512));
      c.dispose();
    }
    return b;
  } finally {
    await dev.close();
  }
}

/** fio runs on the open volume `vol` while `job` runs; then no fio error, and the job's CLI exited 0. */
async function underFio(e: Env, name: string, job: () => Promise<{ code: number; stderr: string }>): Promise<void> {
  const fio = startFio(`nbd+unix:///vol?socket=${join(e.run, 'nbd.sock')}`, name, dir, FIO_MIB);
  let r: { code: number; stderr: string };
  let f: Awaited<ReturnType<typeof fio.stop>>;
  try {
    await pollUntil(async () => (await volumeStatus(e.run, 'vol')).nbdConnections > 0, {
      deadlineMs: 30_000,
      what: 'fio to connect',
    });
    r = await job();
  } finally {
    f = await fio.stop();
  }
  assert.equal(r.code, 0, r.stderr);
  assert.equal(f.errors, 0, f.out);
  assert.ok(f.ops > 0, f.out);
  const st = await volumeStatus(e.run, 'vol');
  assert.equal(st.reencrypt?.state, 'finished');
  assert.equal(st.reencrypt?.doneBytes, st.reencrypt?.totalBytes);
}

function table(e: Env): string {
  const r = spawnSync(
    process.execPath,
    [new URL('../../src/cli/entry.js', import.meta.url).pathname, 'dm', 'table', 'vol'],
    { env: { ...process.env, ...e.env }, encoding: 'utf8' },
  );
  return r.stdout;
}

test('online decryption (detached header) under fio verify: no error, the data device ends up plaintext', {
  timeout: 600_000,
}, async () => {
  const e = files('dec', VOL, true);
  const f = cs(
    'luksFormat',
    '-q',
    '--type',
    'luks2',
    '--sector-size',
    '512',
    ...FAST_PBKDF,
    '--header',
    e.hdr!,
    '--key-file',
    e.key,
    e.img,
  );
  assert.equal(f.status, 0, f.out);
  {
    const dev = await FileDevice.open(e.img);
    const c = createSectorCipher({ spec: 'aes-xts-plain64', key: volumeKey(e), sectorBytes: 512 });
    const b = Buffer.from(e.tail);
    c.encrypt(b, BigInt((FIO_MIB * MiB) / 512));
    c.dispose();
    await dev.write(FIO_MIB * MiB, b);
    await dev.close();
  }
  let daemon: Daemon | undefined = await startDaemon(e.run);
  try {
    await cliOk(['open', '--header', e.hdr!, '--key-file', e.key, e.img, 'vol'], { env: e.env });
    await underFio(e, 'dec', () =>
      cli(['reencrypt', '--decrypt', '-q', '--header', e.hdr!, '--hotzone-size', '1M', '--key-file', e.key, e.img], {
        env: e.env,
      }),
    );
    // As cryptsetup leaves it: a linear mapping of the plaintext, no key.
    assert.match(table(e), /^0 [0-9]+ linear /);
    await cliOk(['close', 'vol'], { env: e.env });
    await daemon.stop();
    daemon = undefined;
  } finally {
    await daemon?.kill();
  }
  assert.doesNotMatch(cs('luksDump', e.hdr!).out, /online-reencrypt/);
  assert.ok((await readData(e, 0, FIO_MIB * MiB, e.tail.length)).equals(e.tail));
});

for (const shift of [false, true]) {
  test(`online encryption (${shift ? 'data shift' : 'detached header'}) under fio verify: activated by reencrypt --encrypt DEVICE NAME, no error, cryptsetup finds the plaintext`, {
    timeout: 600_000,
  }, async () => {
    const e = files(shift ? 'enc-s' : 'enc-h', shift ? VOL + 2 * SHIFT : VOL, !shift);
    const dataOff = shift ? SHIFT : 0;
    {
      const dev = await FileDevice.open(e.img);
      await dev.write(FIO_MIB * MiB, e.tail);
      await dev.close();
    }
    let daemon: Daemon | undefined = await startDaemon(e.run);
    try {
      const how = shift ? ['--reduce-device-size', String(2 * SHIFT)] : ['--header', e.hdr!];
      const init = await cliOk(
        [
          'reencrypt',
          '--encrypt',
          '--type',
          'luks2',
          '--init-only',
          '-q',
          ...FAST_PBKDF,
          ...how,
          '--key-file',
          e.key,
          e.img,
          'vol',
        ],
        { env: e.env },
      );
      assert.match(init.stdout, /vol is now active and ready for online encryption\./);
      assert.equal((await volumeStatus(e.run, 'vol')).reencrypt?.state, 'stopped');
      await underFio(e, shift ? 'enc-s' : 'enc-h', () =>
        cli(['reencrypt', '--resume-only', '-q', '--hotzone-size', '1M', '--key-file', e.key, 'vol'], { env: e.env }),
      );
      assert.match(table(e), /^0 [0-9]+ crypt aes-xts-plain64 :64:logon:cryptmap:vol /);
      await cliOk(['close', 'vol'], { env: e.env });
      await daemon.stop();
      daemon = undefined;
    } finally {
      await daemon?.kill();
    }
    assert.doesNotMatch(cs('luksDump', e.hdr ?? e.img).out, /online-reencrypt/);
    const t = cs('open', '--test-passphrase', ...(e.hdr ? ['--header', e.hdr] : []), '--key-file', e.key, e.img);
    assert.equal(t.status, 0, t.out);
    assert.ok((await readData(e, dataOff, FIO_MIB * MiB, e.tail.length, volumeKey(e))).equals(e.tail));
  });
}
