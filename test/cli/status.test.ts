// `cryptmap status` of a dm-crypt device made with `cryptmap dm` (not `open`): cryptsetup's fields
// with `type: n/a`, read from the live table line; keys never shown; nothing for other targets. And
// an open mapping's status in cryptsetup 2.6's order (src/cryptsetup.c action_status).
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import type { CryptMapping } from '../../src/activate/mapping.js';
import { formatStatus, rawCryptFields } from '../../src/cli/commands/status.js';
import { mappingToJson } from '../../src/control/args.js';

test('status fields of a raw crypt table, as cryptsetup prints them for a device it did not make', () => {
  const zeros = '0'.repeat(128);
  assert.equal(
    rawCryptFields(
      `0 8192 crypt aes-xts-plain64 ${zeros} 16 /tmp/raw.img 2048 2 allow_discards sector_size:4096`,
      false,
    ),
    [
      '  type:    n/a',
      '  cipher:  aes-xts-plain64',
      '  keysize: 512 bits',
      '  key location: dm-crypt',
      '  device:  /tmp/raw.img',
      '  sector size:  4096',
      '  offset:  2048 sectors',
      '  size:    8192 sectors',
      '  skipped: 16 sectors',
      '  mode:    read/write',
      '  flags:   discards ',
      '',
    ].join('\n'),
  );
  const ref = rawCryptFields('0 64 crypt aes-cbc-essiv:sha256 :32:logon:cryptmap:v 0 253:1 0', true);
  assert.match(ref, /keysize: 256 bits\n {2}key location: keyring\n/);
  assert.match(ref, /mode: {4}readonly\n$/);
  assert.doesNotMatch(ref, /skipped|flags/);
  assert.match(rawCryptFields('0 8 crypt cipher_null-ecb - 0 /x 0', false), /keysize: 0 bits/);
  assert.equal(rawCryptFields('0 8 linear /x 0', false), '');
  assert.equal(rawCryptFields('0 8 zero', false), '');
});

test("status of an open mapping: cryptsetup 2.6's lines in its order (size before skipped; loop: after device)", async (t) => {
  const m: CryptMapping = {
    name: 'v',
    type: 'PLAIN',
    uuid: '',
    device: '/tmp/plain.img',
    cipher: 'aes-cbc-essiv:sha256',
    keyBytes: 32,
    sectorBytes: 512,
    ivOffsetSectors: 4n,
    offsetSectors: 3,
    sizeSectors: 100,
    readOnly: true,
    allowDiscards: false,
  };
  const st = (device: string) =>
    formatStatus({
      name: 'v',
      active: true,
      nbdUri: 'nbd+unix:///v',
      suspended: false,
      openCount: 1,
      nbdConnections: 0,
      mapping: mappingToJson({ ...m, device }) as never,
    });
  // A regular file is mapped directly: no loop device, no loop: line.
  assert.equal(
    st('/tmp/plain.img'),
    [
      '/dev/mapper/v is active.',
      '  type:    PLAIN',
      '  cipher:  aes-cbc-essiv:sha256',
      '  keysize: 256 bits',
      '  key location: dm-crypt',
      '  device:  /tmp/plain.img',
      '  sector size:  512',
      '  offset:  3 sectors',
      '  size:    100 sectors',
      '  skipped: 4 sectors',
      '  mode:    readonly',
      '  nbd:     nbd+unix:///v',
      '',
    ].join('\n'),
  );
  // On a loop device, its backing file as cryptsetup shows it.
  const dir = mkdtempSync(join(tmpdir(), 'cryptmap-status-'));
  const file = join(dir, 'backing');
  writeFileSync(file, Buffer.alloc(1 << 20));
  const loop = execFileSync('losetup', ['--find', '--show', file], { encoding: 'utf8' }).trim();
  t.after(() => {
    execFileSync('losetup', ['-d', loop]);
    rmSync(dir, { recursive: true, force: true });
  });
  assert.match(st(loop), new RegExp(`\\n {2}device: {2}${loop}\\n {2}loop: {4}${file}\\n {2}sector size:`));
});
