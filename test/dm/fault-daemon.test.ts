// Data-path errors inside the real daemon core: a LUKS2 volume (opened as the CLI does) and, next to
// it, a device stacked on it whose second half is the built-in `error` target. NBD clients of the
// broken device get EIO on exactly the requests that touch the bad half; the LUKS volume's clients
// keep reading and writing on their own connections throughout, and the daemon shuts down cleanly.
import assert from 'node:assert/strict';
import { truncateSync, writeFileSync } from 'node:fs';
import { makeTempDir } from '../helpers/tmp.js';
import { join } from 'node:path';
import { test } from 'node:test';
import { prepareLuks } from '../../src/activate/mapping.js';
import { FileDevice } from '../../src/blockdev/file.js';
import { DaemonCore } from '../../src/daemon/core.js';
import { Luks2Volume } from '../../src/luks/index.js';
import { setLogSink } from '../../src/util/log.js';
import { recordFaults } from '../fuzz/harness.js';
import { type Fixture, openClient } from '../nbd/helpers.js';
import { pattern } from './helpers.js';

const NBD_EIO = 5;
const PASS = Buffer.from('daemon fault test');

test('the daemon answers EIO on the failing requests of one device and keeps serving the others', {
  timeout: 60_000,
}, async () => {
  setLogSink(() => {});
  const { dir, cleanup: removeDir } = makeTempDir('cryptmap-fault-daemon-');
  const img = join(dir, 'vol.img');
  writeFileSync(img, '');
  truncateSync(img, 8 << 20);
  const core = new DaemonCore({ nbdSocketPath: join(dir, 'nbd.sock'), attachDir: join(dir, 'attach') });
  try {
    const fd = await FileDevice.open(img);
    await Luks2Volume.format(fd, PASS, {
      keyslot: { kdf: { type: 'pbkdf2', hash: 'sha256', iterations: 1000 } },
      offsetBytes: 2 << 20,
      keyslotsBytes: (2 << 20) - 2 * 16384,
    });
    await fd.close();
    const { mapping, volumeKey } = await prepareLuks({ name: 'sec', device: img, passphrase: PASS });
    await core.openVolume(mapping, volumeKey);
    volumeKey.dispose();
    await core.listen();
    // 'half': the first 1024 sectors of the LUKS volume, then 1024 sectors of the error target.
    await core.dm().create('half', { table: '0 1024 linear sec 0\n1024 1024 error' });

    const fx = { sock: join(dir, 'nbd.sock') } as Fixture;
    const good = await openClient(fx, 'sec');
    const bad = await openClient(fx, 'half');
    const data = pattern(4096, 9);
    const seq: [string, number][] = [];
    for (let i = 0; i < 8; i++) {
      // interleave: a good write on 'sec', then a request on 'half' that fails or succeeds
      good.sendRequest(1, 8192 + i * 4096, 4096, { cookie: BigInt(i + 1), data });
      bad.sendRequest(i % 2 === 0 ? 0 : 1, i < 4 ? 0 : 1024 * 512 + i * 4096, 4096, {
        cookie: BigInt(100 + i),
        ...(i % 2 === 1 ? { data } : {}),
      });
      const g = await good.readSimpleReply();
      seq.push(['good', g.error]);
      const b = await bad.readSimpleReply();
      if (i % 2 === 0 && b.error === 0) await bad.read(4096);
      seq.push([i < 4 ? 'bad-ok-half' : 'bad-error-half', b.error]);
    }
    for (const [what, err] of seq) {
      if (what === 'bad-error-half') assert.equal(err, NBD_EIO, `${what}: ${JSON.stringify(seq)}`);
      else assert.equal(err, 0, `${what}: ${JSON.stringify(seq)}`);
    }
    // The LUKS volume's data is intact and reads back through its own connection and through 'half'.
    good.sendRequest(3, 0, 0, { cookie: 50n });
    assert.equal((await good.readSimpleReply()).error, 0);
    good.sendRequest(0, 8192, 4096, { cookie: 51n });
    assert.equal((await good.readSimpleReply()).error, 0);
    assert.deepEqual(Buffer.from(await good.read(4096)), data);
    bad.sendRequest(0, 8192, 4096, { cookie: 52n });
    assert.equal((await bad.readSimpleReply()).error, 0);
    assert.deepEqual(Buffer.from(await bad.read(4096)), data);
    recordFaults('daemon-eio', 4, 4);
    good.close();
    bad.close();
    assert.equal(core.statusOf('sec').active, true);
  } finally {
    await core.shutdown();
    setLogSink((l) => process.stderr.write(`${l}\n`));
    removeDir();
  }
});
