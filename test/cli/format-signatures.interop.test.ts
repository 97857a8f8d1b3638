// luksFormat lists the signatures already on the device as cryptsetup 2.6 does (blkid probe,
// src/utils_blockdev.c): "WARNING: Device X already contains a 'ext4' superblock signature." and
// "... a 'dos' partition signature." on standard output, superblocks first; nothing with -q or on a
// blank device. cryptsetup (which formats a regular file without device-mapper) is the oracle.
import assert from 'node:assert/strict';
import { closeSync, copyFileSync, openSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { deviceSignatures } from '../../src/blockdev/signatures.js';
import { FAST_PBKDF as FAST } from '../helpers/luks.js';
import { fileTempDir } from '../helpers/tmp.js';
import { cryptmap, exec, ok } from './harness.js';

const CS = '/usr/sbin/cryptsetup';
const dir = fileTempDir('cryptmap-sig-');

function blank(name: string): string {
  const p = join(dir, name);
  writeFileSync(p, '');
  truncateSync(p, 32 << 20);
  return p;
}
/** A DOS partition table with one Linux partition (sector 2048, 8 MiB), as fdisk writes it. */
function writeMbr(p: string): void {
  const mbr = Buffer.alloc(66);
  mbr.set([0x00, 0, 0, 0, 0x83, 0, 0, 0], 0);
  mbr.writeUInt32LE(2048, 8);
  mbr.writeUInt32LE(16384, 12);
  mbr.set([0x55, 0xaa], 64);
  const fd = openSync(p, 'r+');
  try {
    writeSync(fd, mbr, 0, mbr.length, 446);
  } finally {
    closeSync(fd);
  }
}

test('luksFormat warns of the signatures on the device exactly as cryptsetup', async () => {
  const key = join(dir, 'key');
  writeFileSync(key, 'pw', { mode: 0o600 });
  const ext4 = blank('ext4');
  await ok('mkfs.ext4', ['-q', '-F', ext4]);
  const mbr = blank('mbr');
  writeMbr(mbr);
  const both = blank('both');
  await ok('mkfs.ext4', ['-q', '-F', both]);
  writeMbr(both);
  const luks = blank('luks');
  await ok(CS, ['-q', 'luksFormat', ...FAST, luks, key]);
  const cases: [string, string[]][] = [
    [ext4, []],
    [mbr, ['--type', 'luks1']],
    [both, []],
    [luks, []],
    [blank('blank'), []],
    [ext4, ['-q']],
  ];
  for (const [img, extra] of cases) {
    const a = `${img}.cs`;
    const b = `${img}.cm`;
    copyFileSync(img, a);
    copyFileSync(img, b);
    const rs = await exec(CS, ['luksFormat', ...extra, ...FAST, a, key], 'YES\n');
    const rm = await cryptmap(['luksFormat', ...extra, ...FAST, b, key], 'YES\n');
    assert.equal(rs.code, 0, rs.stderr);
    assert.equal(rm.code, 0, rm.stderr);
    const warnings = (s: string, p: string) =>
      s
        .split('\n')
        .filter((l) => l.startsWith('WARNING: Device'))
        .map((l) => l.replace(p, 'IMG'));
    assert.deepEqual(warnings(rm.stdout, b), warnings(rs.stdout, a), `${img} ${extra.join(' ')}`);
  }
  // The cases above are not all silent: ext4 then dos on `both`.
  copyFileSync(both, `${both}.y`);
  const y = await cryptmap(['luksFormat', ...FAST, `${both}.y`, key], 'YES\n');
  assert.equal(
    y.stdout
      .split('\n')
      .filter((l) => l.startsWith('WARNING'))
      .join('\n'),
    `WARNING: Device ${both}.y already contains a 'ext4' superblock signature.\nWARNING: Device ${both}.y already contains a 'dos' partition signature.`,
  );
});

test('a device path that starts with a dash is probed as a path, not read as blkid options', async () => {
  await ok('mkfs.ext4', ['-q', '-F', blank('-dash.img')]);
  const cwd = process.cwd();
  process.chdir(dir);
  try {
    assert.deepEqual(await deviceSignatures('-dash.img'), [{ type: 'ext4', kind: 'superblock' }]);
  } finally {
    process.chdir(cwd);
  }
});
