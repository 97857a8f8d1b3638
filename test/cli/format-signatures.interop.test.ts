// luksFormat lists the signatures already on the device as cryptsetup 2.6 does (blkid probe,
// src/utils_blockdev.c): "WARNING: Device X already contains a 'ext4' superblock signature." and
// "... a 'dos' partition signature." on standard output, superblocks first; nothing with -q or on a
// blank device. cryptsetup (which formats a regular file without device-mapper) is the oracle.
import assert from 'node:assert/strict';
import {
  chmodSync,
  copyFileSync,
  mkdtempSync,
  openSync,
  rmSync,
  truncateSync,
  writeFileSync,
  writeSync,
  closeSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { cryptmap, exec, ok } from './harness.js';

const CS = '/usr/sbin/cryptsetup';
const FAST = ['--pbkdf', 'pbkdf2', '--pbkdf-force-iterations', '1000'];
let dir = '';
before(() => {
  dir = mkdtempSync(join(tmpdir(), 'cryptmap-sig-'));
  chmodSync(dir, 0o700);
});
after(() => rmSync(dir, { recursive: true, force: true }));

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
