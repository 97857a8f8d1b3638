/**
 * `cryptmap luksSuspend` / `luksResume` as a user runs them, against a `cryptmap daemon` child: a
 * volume formatted by cryptsetup 2.6, data written over NBD with qemu-io, suspend (an NBD read
 * started meanwhile waits), a wrong key file (exit 2, still suspended), the right one (the read
 * finishes, data intact), a passphrase on stdin; cryptsetup's messages and exit codes for a plain
 * volume, an unknown name, a volume that is not (or already) suspended, a wrong --type or --header.
 */
import assert from 'node:assert/strict';
import { truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { pollUntil } from '../helpers/wait.js';
import { cryptmap, exec, ok, useDaemon } from './harness.js';
import { FAST_LUKS2_FORMAT, FAST_PBKDF } from '../helpers/luks.js';

const fx = useDaemon('cm-suspend-cli-');
const cm = (args: string[], input?: string) => cryptmap([args[0]!, '--runtime-dir', fx.run, ...args.slice(1)], input);
const MiB = 1 << 20;

function secretFile(name: string, content: string | Buffer): string {
  const p = join(fx.dir, name);
  writeFileSync(p, content, { mode: 0o600 });
  return p;
}

test('luksSuspend / luksResume of a cryptsetup-made LUKS2 volume: NBD I/O waits, wrong key exit 2, right key resumes with the data intact', async () => {
  const img = join(fx.dir, 'a.img');
  writeFileSync(img, Buffer.alloc(0));
  truncateSync(img, 40 * MiB);
  const key = secretFile('a.key', 'suspend me softly');
  const bad = secretFile('bad.key', 'not the passphrase');
  await ok('cryptsetup', [...FAST_LUKS2_FORMAT, '--key-file', key, img]);

  let r = await cm(['open', '--key-file', key, img, 'sv']);
  assert.equal(r.code, 0, r.stderr);
  const uri = `nbd+unix:///sv?socket=${join(fx.run, 'nbd.sock')}`;
  await ok('qemu-io', ['-f', 'raw', uri, '-c', 'write -P 0x5a 0 1M', '-c', 'write -P 0xa5 1M 1M']);

  r = await cm(['luksSuspend', 'sv']);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stdout + r.stderr, '');
  r = await cm(['status', 'sv']);
  assert.equal(r.code, 0);
  assert.match(r.stdout, /\(suspended\)/);
  r = await cm(['status', '--json', 'sv']);
  assert.equal(JSON.parse(r.stdout).suspended, true);

  // An NBD client reading now waits (as on a suspended dm device) until the resume.
  let readDone = false;
  const reader = exec('qemu-io', ['-f', 'raw', uri, '-c', 'read -P 0x5a 0 1M', '-c', 'read -P 0xa5 1M 1M']).finally(
    () => {
      readDone = true;
    },
  );

  // Already suspended: cryptsetup's message, exit 1.
  r = await cm(['luksSuspend', 'sv']);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /^Volume sv is already suspended\.$/m);

  // Wrong key file: exit 2, cryptsetup's message, still suspended (retryable).
  r = await cm(['luksResume', '--key-file', bad, 'sv']);
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /No key available with this passphrase\./);
  r = await cm(['status', 'sv']);
  assert.match(r.stdout, /\(suspended\)/);
  // Wrong --type, or a --header that is not this volume's: cryptsetup's messages, exit 1.
  r = await cm(['luksResume', '--type', 'luks1', '--key-file', key, 'sv']);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /^sv is not active LUKS1 device name\.$/m);
  r = await cm(['luksResume', '--header', bad, '--key-file', key, 'sv']);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /^sv is not active LUKS device name or header is missing\.$/m);
  // The reader is connected (bounded poll) and its read has not finished: it waits at the gate.
  r = await pollUntil(
    async () => {
      const s = await cm(['status', '--json', 'sv']);
      return JSON.parse(s.stdout).nbdConnections >= 1 || readDone ? s : undefined;
    },
    { deadlineMs: 10_000, intervalMs: 100, what: 'qemu-io to connect' },
  );
  assert.equal(JSON.parse(r.stdout).nbdConnections, 1, 'qemu-io is connected');
  assert.equal(readDone, false, 'the NBD read is still waiting');

  r = await cm(['luksResume', '-v', '--key-file', key, 'sv']);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /Key slot 0 unlocked\./);
  const read = await reader;
  assert.equal(read.code, 0, `the waiting read failed after resume: ${read.stdout}${read.stderr}`);
  assert.doesNotMatch(read.stdout, /Pattern verification failed/);
  r = await cm(['status', 'sv']);
  assert.doesNotMatch(r.stdout, /suspended/);

  // Not suspended: cryptsetup's message, exit 1.
  r = await cm(['luksResume', '--key-file', key, 'sv']);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /^Volume sv is not suspended\.$/m);

  // Passphrase on stdin (up to the first newline), as cryptsetup reads it without --key-file.
  r = await cm(['luksSuspend', 'sv']);
  assert.equal(r.code, 0, r.stderr);
  r = await cm(['luksResume', 'sv'], 'suspend me softly\n');
  assert.equal(r.code, 0, r.stderr);
  await ok('qemu-io', ['-f', 'raw', uri, '-c', 'read -P 0x5a 0 1M', '-c', 'read -P 0xa5 1M 1M']);

  // Suspended volumes close without a resume.
  r = await cm(['luksSuspend', 'sv']);
  assert.equal(r.code, 0, r.stderr);
  r = await cm(['close', 'sv']);
  assert.equal(r.code, 0, r.stderr);
  r = await cm(['status', 'sv']);
  assert.equal(r.code, 4);
  assert.doesNotMatch(fx.log, /suspend me softly/);
});

test('luksSuspend / luksResume refusals: plain volume (1), unknown name (4), no name (1)', async () => {
  const img = join(fx.dir, 'p.img');
  writeFileSync(img, Buffer.alloc(0));
  truncateSync(img, 4 * MiB);
  const key = secretFile('p.key', Buffer.alloc(64, 0x42).fill(0x24, 32));
  let r = await cm([
    'open',
    '--type',
    'plain',
    '--cipher',
    'aes-xts-plain64',
    '--key-size',
    '512',
    '--key-file',
    key,
    img,
    'pv',
  ]);
  assert.equal(r.code, 0, r.stderr);
  r = await cm(['luksSuspend', 'pv']);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /^This operation is supported only for LUKS device\.$/m);
  r = await cm(['luksResume', '--key-file', key, 'pv']);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /^pv is not active LUKS device name or header is missing\.$/m);
  r = await cm(['status', 'pv']);
  assert.doesNotMatch(r.stdout, /suspended/);
  r = await cm(['close', 'pv']);
  assert.equal(r.code, 0, r.stderr);

  r = await cm(['luksSuspend', 'nosuch']);
  assert.equal(r.code, 4);
  assert.match(r.stderr, /^Device nosuch is not active\.$/m);
  r = await cm(['luksResume', '--key-file', key, 'nosuch']);
  assert.equal(r.code, 4);
  assert.match(r.stderr, /^Device nosuch is not active\.$/m);
  r = await cm(['luksSuspend']);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /luksSuspend: requires <device> as arguments/);
});

test('a volume opened with a detached header (compat-test [28]): without --header cryptsetup has no header, so status says type n/a and luksResume and resize are refused (exit 1); with --header they work; luksSuspend needs none', async () => {
  for (const type of ['luks1', 'luks2'] as const) {
    const data = join(fx.dir, `det-${type}.img`);
    const hdr = join(fx.dir, `det-${type}.hdr`);
    writeFileSync(data, Buffer.alloc(0));
    truncateSync(data, 8 * MiB);
    const key = secretFile(`det-${type}.key`, 'detached passphrase');
    await ok('cryptsetup', [
      '-q',
      'luksFormat',
      '--type',
      type,
      ...FAST_PBKDF,
      '--header',
      hdr,
      '--key-file',
      key,
      data,
    ]);
    let r = await cm(['open', '--header', hdr, '--key-file', key, data, 'dh']);
    assert.equal(r.code, 0, r.stderr);
    try {
      r = await cm(['resize', 'dh', '--size', '96', '--header', hdr, '--key-file', key]);
      assert.equal(r.code, 0, r.stderr);
      const withHeader = (await cm(['status', 'dh', '--header', hdr])).stdout;
      assert.match(withHeader, new RegExp(`^ {2}type: {4}${type.toUpperCase()}$`, 'm'));
      const without = (await cm(['status', 'dh'])).stdout;
      assert.match(without, /^ {2}type: {4}n\/a$/m);
      assert.match(without, /^ {2}size: {4}96 sectors$/m);
      r = await cm(['resize', 'dh', '--size', '48', '--key-file', key]);
      assert.deepEqual([r.code, r.stderr], [1, 'dh is not active LUKS device name or header is missing.\n']);
      assert.equal((await cm(['luksSuspend', 'dh'])).code, 0);
      r = await cm(['luksResume', 'dh', '--key-file', key]);
      assert.deepEqual([r.code, r.stderr], [1, 'dh is not active LUKS device name or header is missing.\n']);
      assert.match((await cm(['status', 'dh'])).stdout, /\(suspended\)/);
      r = await cm(['luksResume', 'dh', '--header', hdr, '--key-file', key]);
      assert.equal(r.code, 0, r.stderr);
      assert.doesNotMatch((await cm(['status', 'dh'])).stdout, /suspended/);
    } finally {
      await cm(['close', 'dh']);
    }
  }
});
