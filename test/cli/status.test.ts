// `cryptmap status` of a dm-crypt device made with `cryptmap dm` (not `open`): cryptsetup's fields
// with `type: n/a`, read from the live table line; keys never shown; nothing for other targets.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { rawCryptFields } from '../../src/cli/commands/status.js';

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
      '  skipped: 16 sectors',
      '  size:    8192 sectors',
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
