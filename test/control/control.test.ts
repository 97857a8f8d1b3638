import assert from 'node:assert/strict';
import { rmSync, statSync } from 'node:fs';
import { fileTempDir, makeTempDir } from '../helpers/tmp.js';
import { connect, createServer } from 'node:net';
import { join } from 'node:path';
import { test } from 'node:test';
import { openInDaemon } from '../../src/cli/daemon-client.js';
import { ControlClient } from '../../src/control/client.js';
import { MAX_LINE_BYTES } from '../../src/control/protocol.js';
import { controlSocketPath, ensureRuntimeDir } from '../../src/control/runtime-dir.js';
import { ControlServer } from '../../src/control/server.js';
import { CryptmapError } from '../../src/util/errors.js';
import { within } from '../helpers/wait.js';

// every test's runtime dir lives under one directory that is removed after the file's tests
const BASE = fileTempDir('cm-control-');

function tmp(): string {
  const d = makeTempDir('t-', BASE).dir;
  ensureRuntimeDir(join(d, 'run'));
  return join(d, 'run');
}

test('requests reach handlers; errors come back with code and exit code', async () => {
  const dir = tmp();
  const server = new ControlServer({
    'echo.args': async (a) => a,
    'fail.busy': async () => {
      throw new CryptmapError('EBUSY', 'device x is busy', { exitCode: 5 });
    },
  });
  await server.listen(controlSocketPath(dir));
  try {
    assert.equal(statSync(dir).mode & 0o777, 0o700);
    assert.equal(statSync(controlSocketPath(dir)).mode & 0o777, 0o600);
    const c = await ControlClient.connect(dir);
    assert.deepEqual(await c.request('echo.args', { a: 1 }), { a: 1 });
    await assert.rejects(c.request('fail.busy'), (e: CryptmapError) => e.code === 'EBUSY' && e.exitCode === 5);
    await assert.rejects(c.request('no.such'), (e: CryptmapError) => e.code === 'EUNKNOWN_OP');
    c.close();
    await assert.rejects(
      new ControlServer({}).listen(controlSocketPath(dir)),
      (e: CryptmapError) => e.code === 'EDAEMON_RUNNING',
    );
  } finally {
    await server.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a missing daemon gives a clear error saying how to start it', async () => {
  const dir = tmp();
  await assert.rejects(
    ControlClient.connect(dir),
    (e: CryptmapError) => e.code === 'EDAEMON_DOWN' && /cryptmap daemon/.test(e.message),
  );
  rmSync(dir, { recursive: true, force: true });
});

test('malformed and oversized lines get an error reply and a closed connection', async () => {
  const dir = tmp();
  const server = new ControlServer({ ok: async () => 1 });
  await server.listen(controlSocketPath(dir));
  try {
    for (const payload of ['not json\n', '{"id":"x","op":"ok"}\n', Buffer.alloc(MAX_LINE_BYTES + 10, 0x61)]) {
      const reply = await new Promise<string>((res) => {
        const s = connect(controlSocketPath(dir));
        let got = '';
        s.on('data', (d) => {
          got += d.toString();
        });
        s.on('close', () => res(got));
        s.on('error', () => res(got));
        s.write(payload);
      });
      const r = JSON.parse(reply.split('\n')[0] ?? '');
      assert.equal(r.ok, false);
      assert.equal(r.error.code, 'EPROTO');
    }
  } finally {
    await server.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a peer that accepts and never answers: the request fails with EDAEMON_TIMEOUT at its deadline, the check before a header rewrite says so', async () => {
  const dir = tmp();
  const silent = createServer((s) => s.resume()); // accepts, reads, never writes
  await new Promise<void>((res) => silent.listen(controlSocketPath(dir), res));
  const old = process.env.CRYPTMAP_RUNTIME_DIR;
  try {
    const c = await ControlClient.connect(dir, { requestTimeoutMs: 300 });
    await within(
      assert.rejects(
        c.call('daemon.ping'),
        (e: CryptmapError) => e.code === 'EDAEMON_TIMEOUT' && /did not answer daemon\.ping/.test(e.message),
      ),
      30_000,
      'the ping to a silent peer to time out',
    );
    // The connection is closed: a later request fails at once instead of waiting again.
    await within(
      assert.rejects(c.request('echo.args'), (e: CryptmapError) => e.code === 'EDAEMON_TIMEOUT'),
      5_000,
      'a request on the timed-out connection to fail',
    );
    process.env.CRYPTMAP_RUNTIME_DIR = dir;
    await within(
      assert.rejects(
        openInDaemon(process.env, 'some-uuid', 'reencrypt', 300),
        (e: CryptmapError) =>
          e.code === 'EDAEMON_CHECK' && /Cannot reencrypt: .*did not answer volume\.list/.test(e.message),
      ),
      30_000,
      'the open check against a silent peer to fail',
    );
  } finally {
    if (old === undefined) delete process.env.CRYPTMAP_RUNTIME_DIR;
    else process.env.CRYPTMAP_RUNTIME_DIR = old;
    await new Promise<void>((res) => silent.close(() => res()));
    rmSync(dir, { recursive: true, force: true });
  }
});
