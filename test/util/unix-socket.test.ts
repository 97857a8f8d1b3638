// clearStaleSocket: free, stale (removed), live (kept), and a regular file (never removed).
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { clearStaleSocket } from '../../src/util/unix-socket.js';

const dir = mkdtempSync(join(tmpdir(), 'cryptmap-sock-'));
after(() => rmSync(dir, { recursive: true, force: true }));

test('a missing path is free; a regular file is left alone', async () => {
  assert.equal(await clearStaleSocket(join(dir, 'none.sock')), 'free');
  const file = join(dir, 'file');
  writeFileSync(file, 'keep me');
  assert.equal(await clearStaleSocket(file), 'not-socket');
  assert.ok(existsSync(file));
});

test('a live socket is reported and kept', async () => {
  const path = join(dir, 'live.sock');
  const server = createServer((s) => s.destroy());
  await new Promise<void>((res) => server.listen(path, res));
  try {
    assert.equal(await clearStaleSocket(path), 'live');
    assert.ok(existsSync(path));
  } finally {
    await new Promise<void>((res) => server.close(() => res()));
  }
});

test('a socket left by a killed server is stale and removed', async () => {
  const path = join(dir, 'stale.sock');
  // A child listens, then dies by SIGKILL: the socket file stays with nobody accepting.
  const child = spawn(process.execPath, ['-e', `require('node:net').createServer().listen(${JSON.stringify(path)}, () => console.log('up'))`], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  await new Promise<void>((res) => child.stdout!.once('data', () => res()));
  const exited = new Promise<void>((res) => child.once('exit', () => res()));
  child.kill('SIGKILL');
  await exited;
  assert.ok(existsSync(path));
  assert.equal(await clearStaleSocket(path), 'free');
  assert.equal(existsSync(path), false);
});
