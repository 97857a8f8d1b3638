import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { FileDevice } from '../../src/blockdev/file.js';
import { main } from '../../src/cli/main.js';
import { controlSocketPath, nbdSocketPath } from '../../src/control/runtime-dir.js';
import { ControlServer } from '../../src/control/server.js';
import { DaemonCore } from '../../src/daemon/core.js';
import { daemonHandlers } from '../../src/daemon/handlers.js';
import { Luks2Volume } from '../../src/luks/luks2.js';
import { createSparseFile } from '../../src/reconciler/file-ops.js';
import { VOLUME_KEYSLOT_PBKDF } from '../../src/reconciler/ports.js';
import { setLogSink } from '../../src/util/log.js';
import { makeTempDir } from '../helpers/tmp.js';
import { captureIO } from './helpers.js';

setLogSink(() => {});

test('crypttab open/close through the daemon: LUKS2 with a key file, plain with a raw key file, noauto left alone, errors with lines', async () => {
  const t = makeTempDir('cryptmap-crypttab-');
  const run = join(t.dir, 'run');
  await mkdir(run, { mode: 0o700 });
  const core = new DaemonCore({ nbdSocketPath: nbdSocketPath(run), attachDir: join(run, 'attach') });
  const control = new ControlServer(daemonHandlers(core));
  try {
    await control.listen(controlSocketPath(run));
    await core.listen();
    const luksImg = join(t.dir, 'luks.img');
    const passFile = join(t.dir, 'luks.key');
    await createSparseFile(luksImg, 20 << 20);
    await writeFile(passFile, 'crypttab passphrase', { mode: 0o600 });
    const dev = await FileDevice.open(luksImg);
    const vol = await Luks2Volume.format(dev, Buffer.from('crypttab passphrase'), {
      keyslot: { kdf: { ...VOLUME_KEYSLOT_PBKDF } },
      digestIterations: 1000,
    });
    await vol.close();
    await dev.close();
    const plainImg = join(t.dir, 'plain.img');
    const plainKey = join(t.dir, 'plain.key');
    await createSparseFile(plainImg, 4 << 20);
    await writeFile(plainKey, randomBytes(64), { mode: 0o600 });
    const tab = join(t.dir, 'crypttab');
    await writeFile(
      tab,
      [
        '# name  device  key  options',
        `secure ${luksImg} ${passFile} luks,discard`,
        `scratch ${plainImg} ${plainKey} plain,cipher=aes-xts-plain64,size=512,sector-size=4096,same-cpu-crypt,no-read-workqueue`,
        `later ${plainImg} ${plainKey} plain,cipher=aes-xts-plain64,size=512,noauto`,
        '',
      ].join('\n'),
    );
    const c1 = captureIO();
    assert.equal(await main(['crypttab', 'open', '--file', tab, '--runtime-dir', run], c1.io), 0, c1.err());
    assert.match(c1.out(), /secure: opened \(luks2\), nbd\+unix:\/\/\/secure\?socket=/);
    assert.match(c1.out(), /scratch: opened \(plain\)/);
    assert.equal(core.statusOf('secure').mapping?.type, 'LUKS2');
    assert.equal(core.statusOf('secure').mapping?.allowDiscards, true);
    assert.equal(core.statusOf('scratch').mapping?.sectorBytes, 4096);
    assert.equal(core.statusOf('scratch').mapping?.keyBytes, 64);
    // the perf flags reach the mapping as `open --perf-same_cpu_crypt --perf-no_read_workqueue` does
    assert.equal(core.statusOf('scratch').mapping?.sameCpuCrypt, true);
    assert.equal(core.statusOf('scratch').mapping?.noReadWorkqueue, true);
    assert.equal(core.statusOf('secure').mapping?.sameCpuCrypt, undefined);
    assert.equal(core.statusOf('later').active, false, 'noauto is not opened by default');
    // Again: already active, nothing changes.
    const c2 = captureIO();
    assert.equal(await main(['crypttab', 'open', '--file', tab, '--runtime-dir', run, 'secure'], c2.io), 0);
    assert.match(c2.out(), /secure: already active/);
    const c3 = captureIO();
    assert.equal(await main(['crypttab', 'close', '--file', tab, '--runtime-dir', run], c3.io), 0, c3.err());
    assert.equal(core.volumes().length, 0);
    // Unknown names and unsupported options are clear errors.
    const c4 = captureIO();
    assert.notEqual(await main(['crypttab', 'open', '--file', tab, '--runtime-dir', run, 'nope'], c4.io), 0);
    assert.match(c4.err(), /has no entry 'nope'/);
    await writeFile(tab, `a ${plainImg} ${plainKey} plain\nb ${luksImg} none luks,tcrypt\n`);
    const c5 = captureIO();
    assert.notEqual(await main(['crypttab', 'open', '--file', tab, '--runtime-dir', run], c5.io), 0);
    assert.match(c5.err(), new RegExp(`${tab}:2: .*TrueCrypt`));
    assert.equal(core.volumes().length, 0, 'nothing opened when the file has errors');
  } finally {
    await control.close();
    await core.shutdown();
    await t.cleanup();
  }
});
