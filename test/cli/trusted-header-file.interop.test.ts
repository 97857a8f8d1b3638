// A file cryptmap creates for the user (luksFormat --header NEW, reencrypt --encrypt --header NEW,
// reencrypt --decrypt --header NEW exporting the header, luksHeaderBackup, luksDump --volume-key-file):
// refused in a directory another local user can rewrite (mode 0777 without the sticky bit, owned by nobody: exit 2, nothing created, the device as it
// was), where cryptsetup 2.6 (the oracle for the rest) creates it; accepted in a sticky one (as /tmp).
// In a directory that passes, the file is written through the descriptor that created it: a symlink put
// at the path while the passphrase is read (the injected step) is never followed.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import {
  chmodSync,
  chownSync,
  lstatSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  renameSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { test } from 'node:test';
import { main } from '../../src/cli/main.js';
import { FAST_PBKDF } from '../helpers/luks.js';
import { fileTempDir } from '../helpers/tmp.js';
import { cryptsetupSync } from '../helpers/tools.js';
import { Sink } from '../luks/helpers.js';

const dir = fileTempDir('cm-trusted-hdr-');
const PASS = 'secret pass';
const key = join(dir, 'key');
writeFileSync(key, PASS, { mode: 0o600 });

/** The CLI in this process; `stdin` is what it reads (the end of input when not given). */
async function cm(argv: string[], stdin?: Readable): Promise<{ code: number; err: string }> {
  const err = new Sink();
  mkdirSync(join(dir, 'locks'), { recursive: true, mode: 0o700 });
  const code = await main(argv, {
    stdin: (stdin ?? Readable.from([])) as unknown as NodeJS.ReadableStream,
    stdout: new Sink(),
    stderr: err,
    env: { ...process.env, CRYPTMAP_LOCK_DIR: join(dir, 'locks') },
  });
  return { code, err: err.data };
}

/** A directory owned by nobody (uid 65534) with `mode`: another local user's. */
function othersDir(name: string, mode: number): string {
  const d = join(dir, name);
  mkdirSync(d);
  chownSync(d, 65534, 65534);
  chmodSync(d, mode);
  return d;
}

function image(name: string, bytes: number): string {
  const p = join(dir, name);
  writeFileSync(p, Buffer.alloc(0));
  spawnSync('truncate', ['-s', String(bytes), p]);
  return p;
}

const isLuks = (p: string) => cryptsetupSync(['isLuks', p]).status === 0;
const REFUSED = /refusing .*\/open[^:]*: it is writable by group or others \(mode 777\)/;

test('luksFormat --header NEW in a directory others can write to (not sticky) is refused; in a sticky one it is made', async () => {
  const open = othersDir('open', 0o777);
  const data = image('f-data.img', 8 << 20);
  const was = readFileSync(data);
  const r = await cm(['luksFormat', '-q', ...FAST_PBKDF, '--header', join(open, 'hdr'), data, key]);
  assert.equal(r.code, 2, r.err);
  assert.match(r.err, REFUSED);
  assert.deepEqual(readdirSync(open), [], 'nothing is created there');
  assert.ok(readFileSync(data).equals(was), 'the device is untouched');
  const sticky = othersDir('sticky', 0o1777);
  const ok = await cm(['luksFormat', '-q', ...FAST_PBKDF, '--header', join(sticky, 'hdr'), data, key]);
  assert.equal(ok.code, 0, ok.err);
  assert.ok(isLuks(join(sticky, 'hdr')));
});

test('reencrypt --decrypt --header NEW (header export) in a directory others can write to is refused, the device as it was', async () => {
  const open = othersDir('open-d', 0o777);
  const img = image('d.img', 8 << 20);
  const f = cryptsetupSync(['luksFormat', '-q', '--type', 'luks2', ...FAST_PBKDF, '--offset', '4096', img, key]);
  assert.equal(f.status, 0, f.out);
  const was = readFileSync(img);
  const r = await cm(['reencrypt', '--decrypt', '-q', '--header', join(open, 'hdr'), '-d', key, img]);
  assert.equal(r.code, 2, r.err);
  assert.match(r.err, REFUSED);
  assert.deepEqual(readdirSync(open), [], 'nothing is created there');
  assert.ok(readFileSync(img).equals(was), 'the device is untouched');
});

test('reencrypt --encrypt --header NEW in a directory others can write to is refused, the device as it was', async () => {
  const open = othersDir('open-e', 0o777);
  const img = image('e.img', 8 << 20);
  writeFileSync(img, Buffer.alloc(8 << 20, 0x5a));
  const r = await cm(['reencrypt', '--encrypt', '-q', ...FAST_PBKDF, '--header', join(open, 'hdr'), '-d', key, img]);
  assert.equal(r.code, 2, r.err);
  assert.match(r.err, REFUSED);
  assert.deepEqual(readdirSync(open), [], 'nothing is created there');
  assert.ok(readFileSync(img).equals(Buffer.alloc(8 << 20, 0x5a)), 'the device is untouched');
});

test('luksFormat --header NEW: a symlink put at the path while the passphrase is read is not followed', async () => {
  const hdr = join(dir, 'swap-hdr');
  const victim = join(dir, 'victim');
  writeFileSync(victim, Buffer.alloc(1 << 20, 0x11));
  const data = image('s-data.img', 8 << 20);
  // The injected step: when the passphrase is first read (the header file made by then), the file is
  // renamed away and a symlink to another file put at its path.
  let swapped = false;
  const stdin = new Readable({
    read() {
      if (!swapped) {
        swapped = true;
        renameSync(hdr, `${hdr}.moved`);
        symlinkSync(victim, hdr);
      }
      this.push(`${PASS}\n`);
      this.push(null);
    },
  });
  const r = await cm(['luksFormat', '-q', ...FAST_PBKDF, '--header', hdr, data], stdin);
  assert.ok(swapped, 'the passphrase was read');
  assert.equal(r.code, 0, r.err);
  assert.ok(readFileSync(victim).equals(Buffer.alloc(1 << 20, 0x11)), 'the file behind the symlink is not written');
  assert.ok(lstatSync(hdr).isSymbolicLink());
  assert.ok(isLuks(`${hdr}.moved`), 'the header is in the file that was made');
});

test('luksHeaderBackup and luksDump --volume-key-file into a directory others can write to are refused, nothing made', async () => {
  const open = othersDir('open-b', 0o777);
  const img = image('b.img', 8 << 20);
  const f = cryptsetupSync(['luksFormat', '-q', '--type', 'luks2', ...FAST_PBKDF, img, key]);
  assert.equal(f.status, 0, f.out);
  const backup = await cm(['luksHeaderBackup', img, '--header-backup-file', join(open, 'backup')]);
  assert.equal(backup.code, 2, backup.err);
  assert.match(backup.err, REFUSED);
  const vk = await cm([
    'luksDump',
    '--dump-volume-key',
    '-q',
    '--key-file',
    key,
    '--volume-key-file',
    join(open, 'vk'),
    img,
  ]);
  assert.equal(vk.code, 2, vk.err);
  assert.match(vk.err, REFUSED);
  assert.deepEqual(readdirSync(open), [], 'nothing is created there');
});
