/**
 * cryptsetup's old action names, kept by cryptsetup 2.6 (src/cryptsetup.c main) and so by cryptmap:
 * create <name> <device> and plainOpen are `open --type plain`, luksOpen is `open --type luks` (over any
 * --type), remove/plainClose/luksClose are `close`, luksConfig is `config`; formats cryptmap does not
 * read (tcrypt, ...) are refused. Also: `convert` refuses a volume the daemon has open (exit 5).
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { cryptmap, exec, ok, useDaemon } from './harness.js';
import { FAST_PBKDF } from '../helpers/luks.js';

const fx = useDaemon('cm-alias-');
const cm = (...args: string[]) => cryptmap(args);

test('create/remove, plainOpen/plainClose, luksOpen over --type, luksClose, luksConfig; tcryptOpen refused', async () => {
  const img = join(fx.dir, 'p.img');
  const key = join(fx.dir, 'p.key');
  writeFileSync(key, randomBytes(32), { mode: 0o600 });
  writeFileSync(img, Buffer.alloc(4 << 20));
  // create takes <name> <device>
  let r = await cm(
    'create',
    '--runtime-dir',
    fx.run,
    '-c',
    'aes-cbc-essiv:sha256',
    '-s',
    '256',
    '-d',
    key,
    'cvol',
    img,
  );
  assert.equal(r.code, 0, r.stderr);
  r = await cm('status', '--runtime-dir', fx.run, 'cvol');
  assert.match(r.stdout, /type: {4}PLAIN/);
  assert.match(r.stdout, new RegExp(`device: +${img}`));
  assert.equal((await cm('remove', '--runtime-dir', fx.run, 'cvol')).code, 0);
  r = await cm('plainOpen', '--runtime-dir', fx.run, '-d', key, img, 'pvol');
  assert.equal(r.code, 0, r.stderr);
  assert.match((await cm('status', '--runtime-dir', fx.run, 'pvol')).stdout, /type: {4}PLAIN/);
  assert.equal((await cm('plainClose', '--runtime-dir', fx.run, 'pvol')).code, 0);
  assert.equal((await cm('status', '--runtime-dir', fx.run, 'pvol')).code, 4);

  const limg = join(fx.dir, 'l.img');
  const lkey = join(fx.dir, 'l.key');
  writeFileSync(lkey, 'pw', { mode: 0o600 });
  await ok('truncate', ['-s', '20M', limg]);
  await ok('cryptsetup', ['-q', 'luksFormat', '--type', 'luks2', '--sector-size', '512', ...FAST_PBKDF, limg, lkey]);
  // luksOpen is LUKS whatever --type says (cryptsetup sets the type from the action name)
  r = await cm('luksOpen', '--runtime-dir', fx.run, '--type', 'plain', '-d', lkey, limg, 'lvol');
  assert.equal(r.code, 0, r.stderr);
  assert.match((await cm('status', '--runtime-dir', fx.run, 'lvol')).stdout, /type: {4}LUKS2/);
  // convert refuses an open volume, as cryptsetup (exit 5), and writes nothing
  // (convert takes no --runtime-dir, as cryptsetup's has none: the daemon is found through the environment)
  process.env.CRYPTMAP_RUNTIME_DIR = fx.run;
  try {
    r = await cm('convert', '-q', '--type', 'luks1', limg);
  } finally {
    delete process.env.CRYPTMAP_RUNTIME_DIR;
  }
  assert.equal(r.code, 5, r.stderr);
  assert.match(r.stderr, new RegExp(`^Cannot convert device ${limg} which is still in use\\.$`, 'm'));
  assert.equal((await cm('luksClose', '--runtime-dir', fx.run, 'lvol')).code, 0);
  assert.equal((await cm('luksConfig', limg, '--label', 'old-name')).code, 0);
  assert.match(await ok('cryptsetup', ['luksDump', limg]), /Label:\s+old-name/);

  r = await cm('tcryptOpen', '--runtime-dir', fx.run, '-d', lkey, limg, 'tvol');
  assert.equal(r.code, 1);
  assert.match(r.stderr, /Unsupported device type tcrypt/);
  void exec;
});
