// The one dev_t split (blockdev/file.ts devMajor/devMinor) against glibc's major()/minor() (through
// python3's os.major/os.minor), and the sysfs loop-device reads (blockdev/loop.ts) over a fake tree.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { testTempDir } from '../helpers/tmp.js';
import { devMajor, devMinor } from '../../src/blockdev/file.js';
import { boundLoops, loopBound, loopsOn } from '../../src/blockdev/loop.js';

test('devMajor/devMinor split a device number as glibc does, high bits included', () => {
  const devs = [
    0x0701,
    0x10300,
    0x103000ff,
    2 ** 43 + 0x700,
    2 ** 40 + 0x503,
    0xffffffff,
    0xabc00012345,
    0x7fffff00000,
  ];
  const glibc = execFileSync(
    'python3',
    ['-c', 'import os, sys\nfor d in sys.argv[1:]: print(os.major(int(d)), os.minor(int(d)))', ...devs.map(String)],
    { encoding: 'utf8' },
  )
    .trim()
    .split('\n');
  for (const [i, d] of devs.entries())
    assert.equal(`${devMajor(d)} ${devMinor(d)}`, glibc[i], `dev 0x${d.toString(16)}`);
});

test('bound loop devices and their backing files, as sysfs lists them', (t) => {
  const sys = testTempDir(t, 'cm-sysfs-');
  const loop = (n: number, backing?: string) => {
    mkdirSync(join(sys, 'block', `loop${n}`, 'loop'), { recursive: true });
    if (backing !== undefined) writeFileSync(join(sys, 'block', `loop${n}`, 'loop', 'backing_file'), `${backing}\n`);
  };
  loop(0, '/srv/a.img');
  loop(1); // not bound
  loop(2, '/srv/b.img (deleted)');
  loop(3, '/srv/a.img');
  mkdirSync(join(sys, 'block', 'sda'));
  assert.deepEqual(
    boundLoops(sys).sort((x, y) => x.dev.localeCompare(y.dev)),
    [
      { dev: '/dev/loop0', backing: '/srv/a.img' },
      { dev: '/dev/loop2', backing: '/srv/b.img (deleted)' },
      { dev: '/dev/loop3', backing: '/srv/a.img' },
    ],
  );
  assert.deepEqual(loopsOn('/srv/a.img', sys).sort(), ['/dev/loop0', '/dev/loop3']);
  assert.deepEqual(loopsOn('/srv/b.img', sys), ['/dev/loop2']);
  assert.deepEqual(loopsOn('/srv/c.img', sys), []);
  assert.equal(loopBound('/dev/loop0', sys), true);
  assert.equal(loopBound('/dev/loop1', sys), false);
  assert.deepEqual(boundLoops(join(sys, 'missing')), []);
});
