// `cryptmap status NAME` of a LUKS2 volume opened in the middle of a reencryption: cryptsetup 2.6's
// "  reencryption:  in-progress" line right after the type line (src/cryptsetup.c action_status prints
// it while the header is in reencryption, clean or crashed), gone once the reencryption finished.
// The header is put in reencryption by cryptsetup itself (reencrypt --init-only, no device-mapper).
import assert from 'node:assert/strict';
import { truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { FAST_PBKDF } from '../helpers/luks.js';
import { fileTempDir } from '../helpers/tmp.js';
import { mustRun } from '../helpers/tools.js';
import { cli, cliOk, startDaemon } from '../load/helpers.js';

const CS = '/usr/sbin/cryptsetup';
const dir = fileTempDir('cm-status-reenc-');

test('status of a volume opened mid-reencryption has the "reencryption:  in-progress" line after type; not once finished', {
  timeout: 600_000,
}, async () => {
  const img = join(dir, 'v.img');
  const key = join(dir, 'key');
  writeFileSync(key, 'pw', { mode: 0o600 });
  writeFileSync(img, '');
  truncateSync(img, 24 << 20);
  const cs = (...args: string[]) => mustRun(CS, args);
  await cs('luksFormat', '-q', '--type', 'luks2', ...FAST_PBKDF, '--key-file', key, img);
  await cs('reencrypt', '--init-only', '--force-offline-reencrypt', '-q', ...FAST_PBKDF, '--key-file', key, img);
  const run = join(dir, 'run');
  const env = { CRYPTMAP_RUNTIME_DIR: run, CRYPTMAP_LOCK_DIR: join(dir, 'locks') };
  const daemon = await startDaemon(run);
  try {
    await cliOk(['open', '--key-file', key, img, 'vol'], { env });
    const mid = (await cliOk(['status', 'vol'], { env })).stdout.split('\n');
    assert.deepEqual(mid.slice(0, 3), [
      '/dev/mapper/vol is active.',
      '  type:    LUKS2',
      '  reencryption:  in-progress',
    ]);
    assert.match(mid[3]!, /^ {2}cipher: {2}/);
    const r = await cli(['reencrypt', '--resume-only', '-q', '--key-file', key, 'vol'], { env });
    assert.equal(r.code, 0, r.stderr);
    const done = (await cliOk(['status', 'vol'], { env })).stdout;
    assert.doesNotMatch(done, /in-progress/);
    assert.match(done, /^ {2}type: {4}LUKS2\n {2}cipher: {2}/m);
    await cliOk(['close', 'vol'], { env });
  } finally {
    await daemon.kill();
  }
  assert.doesNotMatch(await cs('luksDump', img), /online-reencrypt/);
});
