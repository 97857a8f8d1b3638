// cryptsetup 2.6's `--test-args` (src/cryptsetup.c main): parse and check a whole command line,
// then stop without touching a device: "No action taken. Invoked with --test-args option.", exit 0,
// or cryptsetup's usage message, exit 1. /usr/sbin/cryptsetup is the oracle for every line below
// (it needs no device for them); cryptmap runs in-process.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { PassThrough } from 'node:stream';
import { test } from 'node:test';
import { main } from '../../src/cli/main.js';

const CS = '/usr/sbin/cryptsetup';

async function cryptmap(argv: string[]): Promise<{ code: number; out: string; err: string }> {
  let out = '';
  let err = '';
  const stdout = new PassThrough();
  const stderr = new PassThrough();
  stdout.on('data', (c: Buffer) => {
    out += c.toString();
  });
  stderr.on('data', (c: Buffer) => {
    err += c.toString();
  });
  const code = await main(argv, { stdin: new PassThrough(), stdout, stderr, env: {} });
  return { code, out, err };
}

// Each line is split on blanks; DEV and NAME are never opened.
const LINES = `
open DEV NAME --test-passphrase --type luks2
open DEV NAME --test-passphrase --type plain
open DEV NAME --test-passphrase --refresh
refresh DEV NAME --test-passphrase
open DEV NAME --refresh --shared
open DEV NAME --type plain --shared
open DEV NAME --type luks1 --shared
luksOpen DEV NAME --shared
create NAME DEV --shared
open DEV NAME --persistent --test-passphrase
open DEV NAME --serialize-memory-hard-pbkdf
luksFormat DEV --serialize-memory-hard-pbkdf
open DEV NAME --skip 8192
open DEV NAME --skip 8192 --type plain
open DEV NAME --offset 16384 --type loopaes
open DEV NAME --offset 16384
open DEV NAME --sector-size 1024
open DEV NAME --type plain --sector-size 1024
open DEV --type plain --iv-large-sectors --sector-size 512
open DEV --type plain --iv-large-sectors --sector-size 1024
open DEV --type tcrypt --iv-large-sectors
luksFormat DEV --sector-size 511
luksFormat DEV --sector-size 8192
luksFormat DEV --sector-size 0
luksFormat DEV --sector-size 4096
open DEV NAME --size 100 --device-size 51200 --type plain
resize NAME --size 100 --device-size 51200
luksFormat DEV --type luks2 --integrity hmac-sha256
luksFormat DEV --type luks2 --integrity hmac-sha256 --integrity-no-wipe
luksFormat DEV --type luks2 --integrity-no-wipe
open DEV NAME --integrity hmac-sha256
open DEV NAME --key-file F0 --key-file F1
open DEV NAME --key-file F0 --key-file F1 --type tcrypt
tcryptOpen DEV NAME --key-file F0 --key-file F1
luksFormat DEV --use-urandom --use-random
luksFormat DEV --align-payload 8192 --offset 16384
luksFormat DEV --align-payload 8192
open DEV NAME --tcrypt-hidden
open DEV NAME --tcrypt-hidden --type tcrypt
open DEV NAME --tcrypt-hidden --allow-discards --type tcrypt
tcryptDump DEV --tcrypt-system
tcryptDump DEV --allow-discards --tcrypt-hidden
open DEV NAME --veracrypt
open DEV NAME --type tcrypt --veracrypt --veracrypt-pim 1
open DEV NAME --type tcrypt --disable-veracrypt --veracrypt-pim 1
open DEV NAME --type tcrypt --disable-veracrypt --veracrypt-query-pim
open DEV NAME --type tcrypt --veracrypt-query-pim --veracrypt-pim 1
config DEV --priority normal
config DEV -S1 --priority norma
config DEV -S1 --priority prefer
luksFormat DEV --pbkdf blah
luksFormat DEV --pbkdf Argon2id
luksFormat DEV --type luks2 --pbkdf-force-iterations 4 -i1
luksFormat DEV --keyslot-cipher ks
luksFormat DEV --keyslot-key-size 32
luksFormat DEV --keyslot-cipher ks --keyslot-key-size 32
luksAddKey DEV --unbound
luksAddKey DEV --unbound --key-size 0
luksAddKey DEV --unbound --key-size 8
luksDump DEV --unbound
luksDump DEV --unbound -S5
open DEV --unbound NAME
open DEV --unbound --test-passphrase -S5
open DEV --unbound --test-passphrase --type plain
resize NAME --refresh
reencrypt DEV --reduce-device-size 64m --device-size 100g
reencrypt DEV --device-size 32m
reencrypt DEV --active-name X --type luks1
reencrypt DEV --active-name X --force-offline-reencrypt
close NAME --deferred --cancel-deferred
close NAME --cancel-deferred
token add DEV
token foo DEV
token remove DEV
token export DEV --token-id 0
token unassign DEV
token unassign DEV -S1
token unassign DEV -S1 --token-id 2
token import DEV --unbound
token add DEV --key-description x --unbound -S1
token import DEV --token-replace
token
erase
luksKillSlot DEV
luksKillSlot DEV 1
benchmark --key-size 31
benchmark --key-size 32
benchmark --test-passphrase
luksUUID DEV --uuid 12345678-1234-1234-1234-123456789abc
`
  .trim()
  .split('\n');

test('--test-args checks a command line as cryptsetup 2.6 does: same exit code and message, nothing done', async () => {
  assert.ok(existsSync(CS), `${CS} is needed as the oracle (apt-get install cryptsetup-bin)`);
  for (const line of LINES) {
    const argv = ['--test-args', ...line.split(/\s+/)];
    const cs = spawnSync(CS, argv, { encoding: 'utf8', env: { ...process.env, LANG: 'C', LC_ALL: 'C' } });
    const cm = await cryptmap(argv);
    assert.equal(cm.code, cs.status, `${line}: exit code (cryptsetup: ${cs.stderr.trim().split('\n').pop()})`);
    if (cs.status === 0) {
      assert.equal(cm.out, 'No action taken. Invoked with --test-args option.\n', line);
      assert.equal(cm.out, cs.stdout, line);
    } else {
      // cryptsetup prints popt's usage, then "<argv0>: <message>"; cryptmap the message alone.
      const message = cs.stderr
        .trim()
        .split('\n')
        .pop()!
        .replace(/^\S*cryptsetup: /, '');
      assert.equal(cm.err.trim(), message, line);
    }
  }
});

test('options cryptmap takes only for those checks are refused when a verb would act', async () => {
  for (const [line, re] of [
    ['luksFormat /nonexistent/dev --type luks2 --integrity hmac-sha256', /^Option --integrity: dm-integrity/],
    ['open /nonexistent/dev NAME --tcrypt-hidden --type tcrypt', /^Option --tcrypt-hidden: TCRYPT/],
    ['open /nonexistent/dev NAME --refresh', /^Option --refresh: use 'cryptmap refresh <name>'/],
    ['reencrypt /nonexistent/dev --device-size 32m', /^Option --device-size: reencrypt --device-size/],
  ] as const) {
    const r = await cryptmap(line.split(' '));
    assert.equal(r.code, 1, line);
    assert.match(r.err, re, line);
  }
  const r = await cryptmap(['tcryptDump', '/nonexistent/dev']);
  assert.equal(r.code, 1);
  assert.match(r.err, /verb 'tcryptDump' is not implemented/);
});
