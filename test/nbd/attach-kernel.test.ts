// The kernel-client attach path (nbd-client) against a fake sysfs tree and a fake nbd-client on PATH.
// This machine (and CI) has no nbd module, so the kernel side itself cannot run here: these tests pin
// what cryptmap decides and passes (which /dev/nbdN, the nbd-client arguments, errors, detach), which is
// all that differs from the nbdfuse path tested for real in attach.interop.test.ts.
import assert from 'node:assert/strict';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { makeTempDir } from '../helpers/tmp.js';
import { attachExport, detachExport } from '../../src/nbd/attach.js';

const { dir, cleanup } = makeTempDir('cryptmap-attach-kernel-');
const bin = join(dir, 'bin');
const argvLog = join(dir, 'argv.log');
const savedPath = process.env.PATH;

before(() => {
  mkdirSync(bin);
  // Records its arguments; fails (as nbd-client does on a refused export) when FAKE_NBD_FAIL is set.
  writeFileSync(
    join(bin, 'nbd-client'),
    `#!/bin/sh\necho "$*" >> '${argvLog}'\nif [ -n "$FAKE_NBD_FAIL" ]; then echo "Error: Server error: export not found" >&2; exit 1; fi\nexit 0\n`,
    { mode: 0o700 },
  );
  process.env.PATH = `${bin}:${savedPath ?? ''}`;
});
after(() => {
  process.env.PATH = savedPath;
  delete process.env.FAKE_NBD_FAIL;
  cleanup();
});

/** A fake /sys with the nbd module loaded (or not) and nbdN devices: busy (pid), in use (size > 0) or free. */
function fakeSys(name: string, devices: Record<string, 'busy' | 'sized' | 'free'>, module = true): string {
  const root = join(dir, name);
  mkdirSync(join(root, 'block'), { recursive: true });
  if (module) mkdirSync(join(root, 'module', 'nbd'), { recursive: true });
  for (const [dev, state] of Object.entries(devices)) {
    mkdirSync(join(root, 'block', dev));
    writeFileSync(join(root, 'block', dev, 'size'), state === 'sized' ? '2048\n' : '0\n');
    if (state === 'busy') writeFileSync(join(root, 'block', dev, 'pid'), '1234\n');
  }
  return root;
}

const lastArgv = () => readFileSync(argvLog, 'utf8').trim().split('\n').at(-1);

test('auto picks the kernel client when the nbd module is loaded, on the first free /dev/nbdN in numeric order', async () => {
  const sysRoot = fakeSys('sys1', { nbd10: 'free', nbd0: 'busy', nbd1: 'sized', nbd2: 'free' });
  const info = await attachExport({ socketPath: '/run/cryptmap/nbd.sock', exportName: 'data', sysRoot });
  assert.deepEqual(info, { method: 'kernel', devicePath: '/dev/nbd2', exportName: 'data' });
  assert.equal(lastArgv(), '-unix /run/cryptmap/nbd.sock -N data /dev/nbd2');
  await detachExport(info);
  assert.equal(lastArgv(), '-d /dev/nbd2');
});

test('block size, read-only and swap reach nbd-client as -b, -readonly and -swap', async () => {
  const sysRoot = fakeSys('sys2', { nbd0: 'free' });
  const info = await attachExport({
    socketPath: '/s.sock',
    exportName: 'swap0',
    method: 'kernel',
    sysRoot,
    logicalBlockBytes: 4096,
    readOnly: true,
    swap: true,
  });
  assert.deepEqual(info, { method: 'kernel', devicePath: '/dev/nbd0', exportName: 'swap0', swap: true });
  assert.equal(lastArgv(), '-unix /s.sock -N swap0 /dev/nbd0 -b 4096 -readonly -swap');
  // 512-byte exports need no -b (nbd-client's default).
  await attachExport({ socketPath: '/s.sock', exportName: 'x', method: 'kernel', sysRoot, logicalBlockBytes: 512 });
  assert.equal(lastArgv(), '-unix /s.sock -N x /dev/nbd0');
});

test('kernel attach errors: module not loaded, no free device, nbd-client failing', async () => {
  const noModule = fakeSys('sys3', { nbd0: 'free' }, false);
  await assert.rejects(attachExport({ socketPath: '/s', exportName: 'a', method: 'kernel', sysRoot: noModule }), {
    code: 'EATTACH',
    message: /nbd kernel module is not loaded \(modprobe nbd\)/,
  });
  const full = fakeSys('sys4', { nbd0: 'busy', nbd1: 'sized' });
  await assert.rejects(attachExport({ socketPath: '/s', exportName: 'a', method: 'kernel', sysRoot: full }), {
    code: 'EATTACH',
    errno: 'EBUSY',
    message: /no free \/dev\/nbdN device/,
  });
  const ok = fakeSys('sys5', { nbd0: 'free' });
  process.env.FAKE_NBD_FAIL = '1';
  try {
    await assert.rejects(
      attachExport({ socketPath: '/s', exportName: 'missing', method: 'kernel', sysRoot: ok }),
      (e: Error & { code?: string }) => {
        assert.equal(e.code, 'EATTACH');
        assert.match(e.message, /nbd-client/);
        assert.match(e.message, /export not found/);
        return true;
      },
    );
  } finally {
    delete process.env.FAKE_NBD_FAIL;
  }
});
