// src/util/trusted-path.ts: a file it creates is 0600 whatever the umask, and a secret it reads is
// returned in memory of its own (not a slice of Node's shared 8 KiB pool, which a wipe of the slice
// leaves full of other copies and which lives on after the caller wiped its part).
import assert from 'node:assert/strict';
import { closeSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { makeTempDir } from '../helpers/tmp.js';
import { join } from 'node:path';
import { test } from 'node:test';
import { readPassphraseFile } from '../../src/keyservice/root-secret.js';
import { openTrustedAppend, readTrustedFile } from '../../src/util/trusted-path.js';

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
