/**
 * A real file system on an export (INTEROP.md "A real file system on an NBD export"): attach a
 * MemoryDevice export as a kernel block device (nbdfuse + loop here; the kernel nbd client where
 * the module exists), mkfs.ext4, mount, write files, unmount, detach, attach again and read back.
 * Needs root (loop devices, mount): skipped with that reason otherwise.
 *
 * The server runs in this very process, so every access to the mounted file system must be
 * asynchronous (fs/promises, spawned tools): a synchronous call would block the event loop that
 * has to answer the NBD requests the kernel makes for it, and deadlock.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { attachExport, detachExport, type AttachInfo } from '../../src/nbd/attach.js';
import { type Fixture, startServer } from './helpers.js';
import { seededBytes } from '../helpers/prng.js';
import { mustRun, requireTool, runTool } from '../helpers/tools.js';

const isRoot = process.getuid?.() === 0;
// In CI (root) these always run; a CI without root fails them instead of hiding them.
const skip = isRoot || process.env.CI ? false : 'needs root (loop devices and mount)';

let f: Fixture;
const attached: AttachInfo[] = [];
let mnt = '';

before(async () => {
  if (!isRoot) return;
  for (const t of ['nbdfuse', 'losetup', 'mkfs.ext4', 'fusermount3']) requireTool(t);
  f = await startServer({}, 64 << 20);
  mnt = join(f.dir, 'mnt');
  mkdirSync(mnt);
});

after(async () => {
  if (!isRoot) return;
  await runTool('umount', [mnt]).catch(() => {});
  for (const a of attached) await detachExport(a).catch(() => {});
  await f.close();
});

test('ext4 on a MemoryDevice export survives unmount, detach and re-attach', { skip }, async () => {
  const files = new Map<string, Buffer>();
  for (let i = 0; i < 5; i++) files.set(`file-${i}.bin`, seededBytes(200_000 + i * 77_777, 100 + i));

  const a = await attachExport({ socketPath: f.sock, exportName: 'disk', method: 'auto', workDir: f.dir });
  attached.push(a);
  assert.match(a.devicePath, /^\/dev\/(loop|nbd)[0-9]+$/);
  assert.equal(existsSync(a.devicePath), true);
  await mustRun('mkfs.ext4', ['-q', '-F', a.devicePath]);
  await mustRun('mount', [a.devicePath, mnt]);
  for (const [name, data] of files) await writeFile(join(mnt, name), data);
  await mustRun('umount', [mnt]);
  await detachExport(a);
  attached.pop();
  assert.equal(a.fuseDir === undefined || !existsSync(a.fuseDir), true, 'work directory removed');

  const b = await attachExport({ socketPath: f.sock, exportName: 'disk', workDir: f.dir });
  attached.push(b);
  await mustRun('mount', ['-o', 'ro', b.devicePath, mnt]);
  const h = (d: Buffer) => createHash('sha256').update(d).digest('hex');
  for (const [name, data] of files) assert.equal(h(await readFile(join(mnt, name))), h(data), name);
  await mustRun('umount', [mnt]);
  await detachExport(b);
  attached.pop();
  await detachExport(b); // idempotent
});

test('attaching an unknown export fails cleanly', { skip }, async () => {
  await assert.rejects(
    attachExport({ socketPath: f.sock, exportName: 'nope', method: 'fuse', workDir: f.dir, timeoutMs: 10_000 }),
    /nbdfuse/,
  );
});
