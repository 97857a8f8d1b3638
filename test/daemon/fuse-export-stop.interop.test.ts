/**
 * FuseExport.stop (daemon/fuse-export.ts) unmounts what it mounted wherever it is: a mount point
 * whose path has a space (escaped as \040 in /proc/self/mounts) is found and unmounted, not left
 * behind as a dead FUSE mount. Root.
 */
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { testTempDir } from '../helpers/tmp.js';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import { FuseExport } from '../../src/daemon/fuse-export.js';
import { mounts, runTool } from '../../src/util/tools.js';

test('a FUSE export on a path with a space is unmounted by stop()', async (t) => {
  assert.equal(process.getuid?.(), 0, 'the FUSE export tests run as root (mount(2))');
  const dir = testTempDir(t, 'cm fuse stop ');
  const mnt = join(dir, 'mnt point');
  mkdirSync(mnt);
  const exp = FuseExport.start(new MemoryDevice({ sizeBytes: 1 << 20 }), mnt);
  try {
    assert.ok(
      mounts().some(([, at]) => at === mnt),
      'the export is not mounted',
    );
    await exp.stop();
    assert.deepEqual(
      mounts().filter(([, at]) => at === mnt),
      [],
      'stop() left the FUSE mount behind',
    );
    assert.equal(exp.stats().threads, 0);
  } finally {
    if (mounts().some(([, at]) => at === mnt)) await runTool('umount', ['-l', mnt]).catch(() => undefined);
  }
});
