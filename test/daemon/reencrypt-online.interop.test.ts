// Online reencryption (issue 16 item 3): `cryptmap reencrypt` on a volume the daemon serves runs in the
// daemon while fio (ioengine=nbd, crc32c verify) reads and writes it the whole time, with no error;
// afterwards cryptsetup finds the new volume key and the plaintext beside fio's region intact. The
// daemon killed -9 mid-way leaves a header that cryptsetup, or cryptmap offline, resumes. The daemon
// holds cryptsetup's reencryption lock while its job runs.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { fileTempDir } from '../helpers/tmp.js';
import { FileDevice } from '../../src/blockdev/file.js';
import { ControlClient } from '../../src/control/client.js';
import { createSectorCipher } from '../../src/engine/index.js';
import { reencryptLockPath, takeReencryptLock } from '../../src/luks/index.js';
import { cli, cliOk, type Daemon, volumeStatus, startDaemon } from '../load/helpers.js';
import { requireTool, cryptsetupSync, cryptsetupVolumeKey, type CryptsetupResult } from '../helpers/tools.js';
import { FAST_PBKDF } from '../helpers/luks.js';
import { startFio } from '../helpers/fio.js';

const MiB = 1 << 20;
const DATA_OFF = 16 * MiB;
const DATA = 48 * MiB;
/** fio's region: the first 32 MiB; the rest holds a known plaintext checked at the end. */
const FIO_MIB = 32;

const dir = fileTempDir('cm-reenc-online-');

function cs(...args: string[]): CryptsetupResult {
  return cryptsetupSync(args);
}

/** Encrypt `plain` into the data at byte `at` (aes-xts-plain64, 512-byte sectors) or read it back decrypted. */
async function crypt(img: string, vk: Buffer, at: number, plain: Buffer | number): Promise<Buffer> {
  const dev = await FileDevice.open(img);
  const c = createSectorCipher({ spec: 'aes-xts-plain64', key: vk, sectorBytes: 512 });
  try {
    if (Buffer.isBuffer(plain)) {
      const b = Buffer.from(plain);
      c.encrypt(b, BigInt(at / 512));
      await dev.write(DATA_OFF + at, b);
      await dev.flush();
      return b;
    }
    const b = Buffer.alloc(plain);
    await dev.read(DATA_OFF + at, b);
    c.decrypt(b, BigInt(at / 512));
    return b;
  } finally {
    c.dispose();
    await dev.close();
  }
}

interface Env {
  img: string;
  key: string;
  run: string;
  env: NodeJS.ProcessEnv;
  tail: Buffer;
}

async function setup(name: string): Promise<Env> {
  const img = join(dir, `${name}.img`);
  const key = join(dir, `${name}.key`);
  const run = join(dir, `${name}-run`);
  writeFileSync(key, `pass ${name}`, { mode: 0o600 });
  writeFileSync(img, '');
  truncateSync(img, DATA_OFF + DATA);
  const f = cs('luksFormat', '-q', '--type', 'luks2', '--sector-size', '512', ...FAST_PBKDF, '--key-file', key, img);
  assert.equal(f.status, 0, f.out);
  const tail = randomBytes(DATA - FIO_MIB * MiB);
  await crypt(img, cryptsetupVolumeKey(key, img), FIO_MIB * MiB, tail);
  return { img, key, run, env: { CRYPTMAP_RUNTIME_DIR: run, CRYPTMAP_LOCK_DIR: join(dir, 'locks') }, tail };
}

test('online reencryption under fio verify: no error, cryptsetup finds the new key, plaintext intact', {
  timeout: 600_000,
}, async () => {
  requireTool('fio');
  const e = await setup('a');
  const vk0 = cryptsetupVolumeKey(e.key, e.img);
  let daemon: Daemon | undefined = await startDaemon(e.run);
  try {
    await cliOk(['open', '--key-file', e.key, e.img, 'vol'], { env: e.env });
    const fio = startFio(`nbd+unix:///vol?socket=${join(e.run, 'nbd.sock')}`, 'a', dir, FIO_MIB);
    // fio is connected and working before the reencryption starts.
    for (let i = 0; (await volumeStatus(e.run, 'vol')).nbdConnections === 0; i++) {
      assert.ok(i < 300, 'fio did not connect within 30 s');
      await new Promise((r) => setTimeout(r, 100));
    }
    await new Promise((r) => setTimeout(r, 500));
    // By name (the daemon's volume), small hotzones so that many table swaps happen under load.
    const r = await cli(['reencrypt', '-q', ...FAST_PBKDF, '--hotzone-size', '1M', '--key-file', e.key, 'vol'], {
      env: e.env,
    });
    const st = await volumeStatus(e.run, 'vol');
    const f = await fio.stop();
    assert.equal(r.code, 0, r.stderr);
    assert.equal(f.errors, 0, f.out);
    assert.ok(f.ops > 0, f.out);
    assert.equal(st.reencrypt?.state, 'finished');
    assert.equal(st.reencrypt?.doneBytes, DATA);
    assert.match((await cliOk(['status', 'vol'], { env: e.env })).stdout, /reencryption: finished 100\.0% \(/);
    // fio did I/O during every hotzone, so the reencryption paused for it between hotzones (YIELD_FACTOR).
    const dm = daemon;
    for (let i = 0; !/online reencryption finished/.test(dm.output()); i++) {
      assert.ok(i < 400, `no 'online reencryption finished' in the daemon's log: ${dm.output()}`);
      await new Promise((r) => setTimeout(r, 25));
    }
    const y = /online reencryption finished name=vol hotzones=(\d+) yieldedMs=(\d+)/.exec(dm.output());
    assert.ok(y, dm.output());
    assert.equal(Number(y[1]), DATA / MiB);
    assert.ok(Number(y[2]) > 0, y[0]);
    // The volume keeps serving after the reencryption (its table is one crypt target again).
    const table = spawnSync(
      process.execPath,
      [new URL('../../src/cli/entry.js', import.meta.url).pathname, 'dm', 'table', 'vol'],
      {
        env: { ...process.env, ...e.env },
        encoding: 'utf8',
      },
    );
    assert.equal(table.stdout.trim().split('\n').length, 1, table.stdout);
    assert.match(table.stdout, / crypt aes-xts-plain64 :64:logon:cryptmap:vol /);
    await cliOk(['close', 'vol'], { env: e.env });
    await daemon.stop();
    daemon = undefined;
    const d = cs('luksDump', e.img);
    assert.doesNotMatch(d.out, /online-reencrypt|backup-|reencrypt/);
    assert.equal(cs('open', '--test-passphrase', '--key-file', e.key, e.img).status, 0);
    const vk1 = cryptsetupVolumeKey(e.key, e.img);
    assert.notDeepEqual(vk1, vk0);
    assert.ok((await crypt(e.img, vk1, FIO_MIB * MiB, e.tail.length)).equals(e.tail));
  } finally {
    await daemon?.kill();
  }
});

for (const resumer of ['cryptsetup', 'cryptmap']) {
  test(`daemon killed -9 mid-way through an online reencryption: ${resumer} resumes offline, plaintext intact`, {
    timeout: 600_000,
  }, async () => {
    const e = await setup(`k-${resumer}`);
    const daemon = await startDaemon(e.run);
    let killed = false;
    try {
      await cliOk(['open', '--key-file', e.key, e.img, 'vol'], { env: e.env });
      // The head of the data too, written through the daemon before the reencryption.
      const head = randomBytes(FIO_MIB * MiB);
      writeFileSync(join(dir, 'head.bin'), head);
      requireTool('nbdcopy');
      const w = spawnSync('nbdcopy', [join(dir, 'head.bin'), `nbd+unix:///vol?socket=${join(e.run, 'nbd.sock')}`], {
        encoding: 'utf8',
        timeout: 120_000,
      });
      assert.ifError(w.error);
      assert.equal(w.status, 0, w.stderr);
      const reenc = cli(['reencrypt', '-q', ...FAST_PBKDF, '--hotzone-size', '512K', '--key-file', e.key, e.img], {
        env: e.env,
      });
      // Kill once a few hotzones are done.
      for (let i = 0; ; i++) {
        const st = await volumeStatus(e.run, 'vol');
        if ((st.reencrypt?.doneBytes ?? 0) >= 4 * MiB && st.reencrypt?.state === 'running') break;
        assert.ok(
          i < 1200 && st.reencrypt?.state !== 'finished',
          `no progress to kill in: ${JSON.stringify(st.reencrypt)}`,
        );
        await new Promise((r) => setTimeout(r, 25));
      }
      await daemon.kill();
      killed = true;
      const rr = await reenc;
      assert.notEqual(rr.code, 0);
      assert.match(cs('luksDump', e.img).out, /online-reencrypt/);
      if (resumer === 'cryptsetup') {
        // cryptsetup 2.6 wants a repair of a hotzone left in progress before it resumes.
        cs('repair', '-q', '--key-file', e.key, e.img);
        const r = cs('reencrypt', '--resume-only', '--force-offline-reencrypt', '-q', '--key-file', e.key, e.img);
        assert.equal(r.status, 0, r.out);
      } else {
        const r = await cli(
          ['reencrypt', '--force-offline-reencrypt', '--resume-only', '-q', '--key-file', e.key, e.img],
          { env: e.env },
        );
        assert.equal(r.code, 0, r.stderr);
      }
      assert.doesNotMatch(cs('luksDump', e.img).out, /online-reencrypt|backup-/);
      const vk = cryptsetupVolumeKey(e.key, e.img);
      assert.ok((await crypt(e.img, vk, 0, head.length)).equals(head));
      assert.ok((await crypt(e.img, vk, FIO_MIB * MiB, e.tail.length)).equals(e.tail));
    } finally {
      if (!killed) await daemon.kill();
    }
  });
}

test('online reencryption refusals: a second one while it runs, suspend while it runs', {
  timeout: 300_000,
}, async () => {
  const e = await setup('r');
  const daemon = await startDaemon(e.run);
  try {
    await cliOk(['open', '--key-file', e.key, e.img, 'vol'], { env: e.env });
    const first = cli(['reencrypt', '-q', ...FAST_PBKDF, '--hotzone-size', '64K', '--key-file', e.key, 'vol'], {
      env: e.env,
    });
    for (let i = 0; (await volumeStatus(e.run, 'vol')).reencrypt?.state !== 'running'; i++) {
      assert.ok(i < 1200, 'the reencryption did not start');
      await new Promise((r) => setTimeout(r, 25));
    }
    // The daemon refuses a second one on the same volume (the CLI would first wait for the first's lock).
    const c = await ControlClient.connect(e.run);
    try {
      await assert.rejects(
        c.call('volume.reencrypt', { name: 'vol' }, { key: Buffer.alloc(64, 1), newKey: Buffer.alloc(64, 2) }),
        /Reencryption of vol is already running/,
      );
    } finally {
      c.close();
    }
    const susp = await cli(['luksSuspend', 'vol'], { env: e.env });
    // 768 hotzones of 64 KiB, each with two header commits: the job outlives the suspend attempt by far,
    // so the refusal is checked every time (state goes running -> finished only).
    assert.equal((await volumeStatus(e.run, 'vol')).reencrypt?.state, 'running', 'the job still ran');
    assert.equal(susp.code, 5, susp.stderr);
    assert.match(susp.stderr, /Reencryption of vol is running/);
    assert.equal((await first).code, 0);
    assert.equal((await volumeStatus(e.run, 'vol')).reencrypt?.state, 'finished');
    await cliOk(['close', 'vol'], { env: e.env });
    assert.ok((await crypt(e.img, cryptsetupVolumeKey(e.key, e.img), FIO_MIB * MiB, e.tail.length)).equals(e.tail));
    assert.equal(statSync(e.img).size, DATA_OFF + DATA);
  } finally {
    await daemon.kill();
  }
});

test("online reencryption takes cryptsetup's reencryption lock: refused while it is held, and cryptsetup is refused while the daemon runs", {
  timeout: 300_000,
}, async () => {
  const e = await setup('lk');
  const uuid = cs('luksUUID', e.img).out.trim();
  const daemon = await startDaemon(e.run);
  try {
    await cliOk(['open', '--key-file', e.key, e.img, 'vol'], { env: e.env });
    // Held by another process (as a cryptsetup reencrypt holds it): the daemon refuses to start.
    const held = takeReencryptLock(uuid);
    try {
      const r = await cli(['reencrypt', '-q', ...FAST_PBKDF, '--key-file', e.key, 'vol'], { env: e.env });
      assert.equal(r.code, 5, r.stderr);
      assert.match(r.stderr, /Reencryption process is already running\./);
    } finally {
      held.release();
    }
    // The header was initialised; resumed online, the daemon holds the lock while its job runs.
    const job = cli(['reencrypt', '--resume-only', '-q', '--hotzone-size', '64K', '--key-file', e.key, 'vol'], {
      env: e.env,
    });
    for (let i = 0; (await volumeStatus(e.run, 'vol')).reencrypt?.state !== 'running'; i++) {
      assert.ok(i < 1200, 'the reencryption did not start');
      await new Promise((r) => setTimeout(r, 25));
    }
    // The daemon is stopped (SIGSTOP) with its job mid-way, so the checks below see the job holding the
    // lock for certain: the header still says reencryption (the job writes the final header before it
    // releases the lock), and nothing moves until SIGCONT.
    process.kill(daemon.pid, 'SIGSTOP');
    try {
      assert.match(cs('luksDump', e.img).out, /online-reencrypt/, 'the job ended before the daemon was stopped');
      assert.throws(
        () => takeReencryptLock(uuid),
        (x: { exitCode?: number }) => x.exitCode === 5,
        'the running job holds the lock',
      );
      // cryptsetup refuses: the lock, or (its CLI looks first) a header caught mid-hotzone, which it takes
      // for a crash to repair; either way it writes nothing.
      const c = cs('reencrypt', '--resume-only', '--force-offline-reencrypt', '-q', '--key-file', e.key, e.img);
      assert.ok(c.status === 5 || c.status === 1, c.out);
      assert.match(c.out, /Reencryption process is already running\.|requires reencryption recovery/);
    } finally {
      process.kill(daemon.pid, 'SIGCONT');
    }
    assert.equal((await job).code, 0);
    assert.equal((await volumeStatus(e.run, 'vol')).reencrypt?.state, 'finished');
    assert.equal(existsSync(reencryptLockPath(uuid)), false, 'released (and removed) when the job ended');
    await cliOk(['close', 'vol'], { env: e.env });
    assert.ok((await crypt(e.img, cryptsetupVolumeKey(e.key, e.img), FIO_MIB * MiB, e.tail.length)).equals(e.tail));
  } finally {
    await daemon.kill();
  }
});
