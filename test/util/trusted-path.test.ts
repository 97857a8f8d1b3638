// src/util/trusted-path.ts: a file it creates is 0600 whatever the umask, and a secret it reads is
// returned in memory of its own (not a slice of Node's shared 8 KiB pool, which a wipe of the slice
// leaves full of other copies and which lives on after the caller wiped its part). A file root makes
// where the user asks (checkNewFileDir, FileDevice.createNew): refused in a directory others can
// rewrite, written only through the descriptor that created it, removed only while its path names it.
import assert from 'node:assert/strict';
import {
  chmodSync,
  chownSync,
  closeSync,
  existsSync,
  lstatSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { makeTempDir } from '../helpers/tmp.js';
import { join } from 'node:path';
import { test } from 'node:test';
import { readPassphraseFile } from '../../src/keyservice/root-secret.js';
import { FileDevice } from '../../src/blockdev/file.js';
import { CryptmapError } from '../../src/util/errors.js';
import { checkNewFileDir, openTrustedAppend, readTrustedFile } from '../../src/util/trusted-path.js';

function tmp(): string {
  return makeTempDir('cm-trusted-').dir;
}

test('openTrustedAppend creates the file with mode 0600 under a umask of 022', () => {
  const d = tmp();
  const old = process.umask(0o022);
  try {
    const p = join(d, 'log');
    closeSync(openTrustedAppend(p));
    assert.equal(statSync(p).mode & 0o777, 0o600);
  } finally {
    process.umask(old);
    rmSync(d, { recursive: true, force: true });
  }
});

test('readTrustedFile and readPassphraseFile return a buffer with its own memory', () => {
  const d = tmp();
  try {
    const p = join(d, 'pass');
    writeFileSync(p, 'correct horse\n', { mode: 0o600 });
    const raw = readTrustedFile(p, { private: true, maxBytes: 64 });
    assert.equal(raw.toString(), 'correct horse\n');
    assert.equal(raw.byteOffset, 0);
    assert.equal(raw.buffer.byteLength, raw.length, 'a small read came back as a slice of a shared pool');
    const s = readPassphraseFile(p);
    const b = s.expose();
    assert.equal(b.toString(), 'correct horse');
    assert.equal(b.byteOffset, 0);
    assert.equal(b.buffer.byteLength, b.length, 'the passphrase is a slice of a shared pool');
    s.dispose();
  } finally {
    rmSync(d, { recursive: true, force: true });
  }
});

/** A directory `name` in `parent` owned by nobody (uid 65534) with `mode` (as another local user's). */
function othersDir(parent: string, name: string, mode: number): string {
  const d = join(parent, name);
  mkdirSync(d);
  chownSync(d, 65534, 65534);
  chmodSync(d, mode);
  return d;
}

test('checkNewFileDir: a directory (or one above it) that others can write to and is not sticky is refused; sticky or only its owner, accepted', () => {
  const d = tmp();
  try {
    const open = othersDir(d, 'open', 0o777);
    assert.throws(
      () => checkNewFileDir(join(open, 'hdr')),
      (e: unknown) =>
        e instanceof CryptmapError &&
        e.code === 'EUNTRUSTED_PATH' &&
        e.exitCode === 2 &&
        /refusing .*\/open: it is writable by group or others \(mode 777\)/.test(e.message),
    );
    const below = join(open, 'sub');
    mkdirSync(below, { mode: 0o700 });
    assert.throws(() => checkNewFileDir(join(below, 'hdr')), /refusing .*\/open: it is writable/);
    assert.throws(() => checkNewFileDir(join(othersDir(d, 'group', 0o775), 'hdr')), /mode 775/);
    checkNewFileDir(join(othersDir(d, 'sticky', 0o1777), 'hdr')); // as /tmp: only the file's owner renames it
    checkNewFileDir(join(othersDir(d, 'theirs', 0o755), 'hdr')); // the owner's directory: the user named it
    checkNewFileDir(join(d, 'missing', 'hdr')); // nothing to refuse: creating the file fails
  } finally {
    rmSync(d, { recursive: true, force: true });
  }
});

test('FileDevice.createNew writes only the file it created, and discardCreated removes only that file', async () => {
  const d = tmp();
  try {
    await assert.rejects(FileDevice.createNew(join(othersDir(d, 'open', 0o777), 'hdr'), 4096), /refusing/);
    assert.deepEqual(readdirSync(join(d, 'open')), [], 'nothing is created in a refused directory');
    const p = join(d, 'hdr');
    const victim = join(d, 'victim');
    writeFileSync(victim, 'not a header');
    const dev = await FileDevice.createNew(p, 8192);
    assert.equal(statSync(p).mode & 0o7777, 0o600);
    // The injected step: the file is renamed away and a symlink to another file put at its path.
    renameSync(p, `${p}.moved`);
    symlinkSync(victim, p);
    await dev.write(0, Buffer.alloc(4096, 0xab));
    await dev.discardCreated();
    assert.equal(readFileSync(victim, 'utf8'), 'not a header', 'the file behind the path is never written');
    assert.ok(lstatSync(p).isSymbolicLink(), 'what was put at the path is not removed');
    assert.equal(readFileSync(`${p}.moved`)[0], 0xab, 'the writes went to the file created');
    // Still at its path: removed.
    const q = join(d, 'hdr2');
    await (await FileDevice.createNew(q, 4096)).discardCreated();
    assert.ok(!existsSync(q));
    // An existing file or a planted symlink is never opened.
    await assert.rejects(FileDevice.createNew(p, 4096), /EEXIST/);
    assert.equal(readFileSync(victim, 'utf8'), 'not a header');
  } finally {
    rmSync(d, { recursive: true, force: true });
  }
});
