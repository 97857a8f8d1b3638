// clearStaleSocket: free, stale (removed), live (kept, also when too busy to accept), and a regular file
// (never removed);
// listenUnixSocket: the socket placed with its final mode.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, lstatSync, readdirSync, writeFileSync } from 'node:fs';
import { createConnection, createServer, type Socket } from 'node:net';
import { join } from 'node:path';
import { test } from 'node:test';
import { fileTempDir } from '../helpers/tmp.js';
import { CryptmapError } from '../../src/util/errors.js';
import { clearStaleSocket, listenUnixSocket } from '../../src/util/unix-socket.js';
import { within } from '../helpers/wait.js';

const dir = fileTempDir('cryptmap-sock-');

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

test('a live server that is slow to accept (backlog full: EAGAIN) keeps its socket', async () => {
  const path = join(dir, 'busy.sock');
  // python3 listens with a backlog of 0 and never accepts: one connection waits in the queue, the
  // next connect fails with EAGAIN although a server is there.
  const py = spawn(
    'python3',
    [
      '-c',
      `import socket, sys\ns = socket.socket(socket.AF_UNIX)\ns.bind(${JSON.stringify(path)})\ns.listen(0)\nprint('up', flush=True)\nsys.stdin.read()`,
    ],
    { stdio: ['pipe', 'pipe', 'inherit'] },
  );
  const queued: Socket[] = [];
  try {
    await within(
      new Promise<void>((res) => py.stdout!.once('data', () => res())),
      30_000,
      'python3 to listen (Debian package python3)',
    );
    const connectOnce = () =>
      new Promise<string>((res) => {
        const s = createConnection(path);
        queued.push(s);
        s.once('connect', () => res('connected'));
        s.once('error', (e: NodeJS.ErrnoException) => res(e.code ?? 'error'));
      });
    assert.equal(await connectOnce(), 'connected');
    assert.equal(await connectOnce(), 'EAGAIN');
    assert.equal(await clearStaleSocket(path), 'live');
    assert.ok(existsSync(path), 'the busy server lost its socket');
  } finally {
    for (const s of queued) s.destroy();
    py.stdin!.end();
    py.kill();
  }
});

test('a socket left by a killed server is stale and removed', async () => {
  const path = join(dir, 'stale.sock');
  // A child listens, then dies by SIGKILL: the socket file stays with nobody accepting.
  const child = spawn(
    process.execPath,
    ['-e', `require('node:net').createServer().listen(${JSON.stringify(path)}, () => console.log('up'))`],
    {
      stdio: ['ignore', 'pipe', 'inherit'],
    },
  );
  await new Promise<void>((res) => child.stdout!.once('data', () => res()));
  const exited = new Promise<void>((res) => child.once('exit', () => res()));
  child.kill('SIGKILL');
  await exited;
  assert.ok(existsSync(path));
  assert.equal(await clearStaleSocket(path), 'free');
  assert.equal(existsSync(path), false);
});

test('listenUnixSocket: the socket appears with its mode, nothing is left beside it, a live or non-socket path is refused', async () => {
  const path = join(dir, 'placed.sock');
  const errors = {
    code: 'ENBDLISTEN' as const,
    live: (p: string) => new CryptmapError('EDAEMON_RUNNING', `${p} is live`),
    notSocket: (p: string) => new CryptmapError('ECONTROL_SOCKET', `${p} is not a socket`),
  };
  const old = process.umask(0); // a wide umask must not matter: the mode is set before the name exists
  const server = createServer((s) => s.destroy());
  try {
    await listenUnixSocket(server, path, 0o600, errors);
  } finally {
    process.umask(old);
  }
  try {
    const st = lstatSync(path);
    assert.ok(st.isSocket());
    assert.equal(st.mode & 0o777, 0o600);
    assert.deepEqual(
      readdirSync(dir).filter((n) => n.startsWith('.placed.sock-')),
      [],
    );
    await assert.rejects(
      listenUnixSocket(createServer(), path, 0o600, errors),
      (e: CryptmapError) => e.code === 'EDAEMON_RUNNING',
    );
    const file = join(dir, 'plain-file');
    writeFileSync(file, 'keep me');
    await assert.rejects(
      listenUnixSocket(createServer(), file, 0o600, errors),
      (e: CryptmapError) => e.code === 'ECONTROL_SOCKET',
    );
    await assert.rejects(
      listenUnixSocket(createServer(), join(dir, 'missing', 'x.sock'), 0o600, errors),
      (e: CryptmapError) => e.code === 'ENBDLISTEN',
    );
  } finally {
    await new Promise<void>((res) => server.close(() => res()));
  }
});
