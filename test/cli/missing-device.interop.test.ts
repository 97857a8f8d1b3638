// A device that does not exist, verb by verb, as cryptsetup 2.6 reports it (it is the oracle: none of
// these needs device-mapper): "Device X does not exist or access denied." with exit 4 for most
// verbs, before any passphrase is read and whatever the type (open --type plain, create, --header,
// --test-passphrase); exit 1 for reencrypt; luksFormat --header H with a missing data device exit 3
// (and "Cannot create header file H." first when H cannot be made); status of a path names it as given.
import assert from 'node:assert/strict';
import { existsSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { cryptmap, exec, useDaemon } from './harness.js';

const CS = '/usr/sbin/cryptsetup';
const fx = useDaemon('cm-missing-');

test('a missing device: the exit code and message of cryptsetup 2.6, verb by verb', async () => {
  const missing = join(fx.dir, 'missing');
  const plain = join(fx.dir, 'plain');
  writeFileSync(plain, Buffer.alloc(1 << 20));
  const kf = join(fx.dir, 'kf');
  writeFileSync(kf, 'pw', { mode: 0o600 });
  const hdr = join(fx.dir, 'new-header');
  const lines: string[][] = [
    ['luksDump', missing],
    ['isLuks', missing],
    ['luksUUID', missing],
    ['-q', 'luksFormat', missing, kf],
    ['open', missing, 'x'],
    ['open', '--type', 'plain', missing, 'x'],
    ['create', 'x', missing],
    ['plainOpen', missing, 'x'],
    ['open', '--header', plain, missing, 'x'],
    ['open', '--test-passphrase', missing],
    ['open', '--test-passphrase', '--header', plain, missing],
    ['open', '--test-passphrase', '--header', missing, plain],
    ['luksAddKey', missing, kf],
    ['luksRemoveKey', missing, kf],
    ['luksKillSlot', missing, '1'],
    ['luksChangeKey', missing],
    ['luksHeaderBackup', missing, '--header-backup-file', join(fx.dir, 'hb')],
    ['config', missing, '--label', 'x'],
    ['repair', missing],
    ['convert', '--type', 'luks1', missing],
    ['erase', missing],
    ['reencrypt', missing],
    ['reencrypt', '--decrypt', '--header', plain, missing],
    ['reencrypt', '--encrypt', '--reduce-device-size', '8M', missing],
    ['-q', 'luksFormat', '--header', hdr, missing, kf],
    ['-q', 'luksFormat', '--header', join(fx.dir, 'no-dir', 'h'), missing, kf],
    ['status', missing],
  ];
  for (const args of lines) {
    const cs = await exec(CS, args, '');
    rmSync(hdr, { force: true });
    const daemonVerb = args.some((a) => ['open', 'create', 'plainOpen', 'status', 'reencrypt'].includes(a));
    const cm = await cryptmap([...(daemonVerb ? ['--runtime-dir', fx.run] : []), ...args], '');
    assert.ok(!existsSync(hdr), `${args.join(' ')}: cryptmap leaves no header file behind`);
    const last = (s: string) => s.trim().split('\n').pop();
    assert.deepEqual(
      [cm.code, last(cm.stderr + cm.stdout)],
      [cs.code, last(cs.stderr + cs.stdout)],
      `cryptmap ${args.join(' ')} differs from cryptsetup`,
    );
  }
});
