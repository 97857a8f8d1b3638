import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { AgentHost } from '../../src/daemon/agent-host.js';
import { detectServeMode } from '../../src/daemon/volume-ports.js';
import { parseManifest } from '../../src/reconciler/manifest.js';
import { setLogSink } from '../../src/util/log.js';
import { makeTempDir } from '../helpers/tmp.js';
import { dbOnlyManifest, mountedManifest } from '../reconciler/manifests.js';
import { cleanupKernelState } from './helpers.js';

setLogSink(() => {});

const isRoot = process.getuid?.() === 0;

test('as root: attach, mkfs.ext4, mount; files survive an agent restart; swapon through FUSE refused', {
  skip: isRoot || process.env.CI ? false : 'needs root (CI runs as root)',
}, async () => {
  assert.equal(
    detectServeMode().mode,
    'attach',
    'as root here, attach (nbd module, or /dev/fuse + /dev/loop-control) must be possible',
  );
  const t = makeTempDir('cryptmap-agent-mount-');
  const manifest = parseManifest(mountedManifest());
  const start = { manifest, stateDir: join(t.dir, 'state'), bootId: 'boot-1', mountRoot: join(t.dir, 'mnt') };
  let host: AgentHost | undefined;
  try {
    host = await AgentHost.start(start);
    assert.equal(host.mode, 'attach');
    const r = await host.reconcile();
    const byId = new Map(r.volumes.map((v) => [v.id, v]));
    assert.equal(byId.get('scratch/web/cache')?.state, 'ready', JSON.stringify(r.volumes));
    assert.equal(byId.get('scratch/db/data')?.state, 'ready', JSON.stringify(r.volumes));
    assert.equal(byId.get('swap/swap0')?.code, 'ESWAPUNSAFE');
    assert.match(byId.get('swap/swap0')?.reason ?? '', /FUSE.*deadlock.*--force-swap/s);
    const db = host.targets.find((x) => x.id === 'scratch/db/data')!;
    const d = host.ports.describe(db);
    assert.match(d.device ?? '', /^\/dev\/(loop|nbd)[0-9]+$/);
    assert.equal(d.mountpoint, join(t.dir, 'mnt', 'srv', 'db'));
    await writeFile(join(d.mountpoint!, 'hello.txt'), 'kept across restarts\n');
    await host.stop();
    host = undefined;
    assert.ok(!readFileSync('/proc/self/mounts', 'utf8').includes(t.dir), 'everything unmounted at stop');
    assert.ok(
      !execFileSync('losetup', ['-a'], { encoding: 'utf8' }).includes(t.dir),
      'every loop device detached at stop',
    );

    host = await AgentHost.start({ ...start, bootId: 'boot-2' });
    const r2 = await host.reconcile();
    assert.equal(r2.volumes.find((v) => v.id === 'scratch/db/data')?.state, 'ready');
    assert.deepEqual(
      r2.executed.filter((s) => s.id === 'scratch/db/data').map((s) => s.kind),
      ['open', 'attach', 'mount'],
      'reopened and mounted, never formatted or mkfs-ed again',
    );
    assert.equal(await readFile(join(t.dir, 'mnt', 'srv', 'db', 'hello.txt'), 'utf8'), 'kept across restarts\n');
    await host.stop();
    host = undefined;
  } finally {
    await host?.stop().catch(() => {});
    cleanupKernelState(t.dir);
    await t.cleanup();
  }
});

test('as root: a full disk during format rolls back (no file, no record), and the next run on a roomier disk converges', {
  skip: isRoot || process.env.CI ? false : 'needs root (tmpfs mount)',
}, async () => {
  const t = makeTempDir('cryptmap-agent-full-');
  const state = join(t.dir, 'state');
  const manifest = parseManifest(dbOnlyManifest());
  let host: AgentHost | undefined;
  try {
    execFileSync('mkdir', ['-p', state]);
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=64k,mode=0700', 'tmpfs', state]);
    host = await AgentHost.start({ manifest, stateDir: state, bootId: 'b1', serve: 'nbd-only' });
    const r = await host.reconcile();
    assert.equal(r.volumes[0]?.state, 'failed', JSON.stringify(r.volumes));
    assert.match(r.volumes[0]?.reason ?? '', /format: .*(ENOSPC|No space left|space)/i);
    await assert.rejects(readFile(join(state, 'volumes', 'scratch', 'db', 'data.img')), { code: 'ENOENT' });
    const rec = JSON.parse(await readFile(join(state, 'agent-state.json'), 'utf8')) as {
      volumes: Record<string, unknown>;
    };
    assert.deepEqual(Object.keys(rec.volumes), [], 'the half-made volume is forgotten');
    await host.stop();
    host = undefined;
    execFileSync('mount', ['-o', 'remount,size=64m', state]);
    host = await AgentHost.start({ manifest, stateDir: state, bootId: 'b1', serve: 'nbd-only' });
    const r2 = await host.reconcile();
    assert.equal(r2.volumes[0]?.state, 'ready', JSON.stringify(r2.volumes));
    await host.stop();
    host = undefined;
  } finally {
    await host?.stop().catch(() => {});
    try {
      execFileSync('umount', ['-l', state]);
    } catch {}
    await t.cleanup();
  }
});
