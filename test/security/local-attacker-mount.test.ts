// Local attacker (issue 11 item 4): a service user who owns a parent of a manifest mountpoint
// points it (a symlink) at a root-owned directory; the agent, running as root, must not mount the
// volume over it. Also: system directories are never mountpoints.
import assert from 'node:assert/strict';
import { chmodSync, chownSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { AgentHost } from '../../src/daemon/agent-host.js';
import { parseManifest } from '../../src/reconciler/manifest.js';
import { setLogSink } from '../../src/util/log.js';
import { ensureMountpoint } from '../../src/util/trusted-path.js';
import { cleanupKernelState } from '../daemon/helpers.js';
import { makeTempDir } from '../helpers/tmp.js';
import { dbDataService, manifestText } from '../reconciler/manifests.js';
import { attack } from './attack.js';
import { attacker, NEEDS_ROOT } from './attacker.js';

setLogSink(() => {});

test('system directories and symlinked or foreign-owned paths are never mountpoints', {
  skip: NEEDS_ROOT,
}, async () => {
  await attack('manifest mountpoints /, /etc, /usr/../etc, /run, /proc', () => {
    for (const p of ['/', '/etc', '/usr/../etc', '/run', '/proc', '/boot', '/sys', '/dev', '/usr']) {
      assert.throws(
        () => ensureMountpoint(p),
        (e: Error & { code?: string }) => e.code === 'EMOUNTPOINT' && /system directory/.test(e.message),
        p,
      );
    }
    return 'refused as system directories';
  });
  const t = makeTempDir('cm-mount-');
  try {
    const a = attacker();
    chmodSync(t.dir, 0o755);
    mkdirSync(join(t.dir, 'owned'));
    chownSync(join(t.dir, 'owned'), a.uid, a.gid);
    assert.throws(
      () => ensureMountpoint(join(t.dir, 'owned', 'db')),
      new RegExp(`refusing ${t.dir}/owned: it belongs to uid ${a.uid}, not to root`),
    );
    const ok = ensureMountpoint(join(t.dir, 'good', 'srv', 'db'));
    assert.equal(ok, join(t.dir, 'good', 'srv', 'db'));
    assert.equal(readFileSync('/proc/self/mounts', 'utf8').includes(ok), false);
  } finally {
    await t.cleanup();
  }
});

test('agent: a mountpoint whose parent a service user owns and pointed at a root-owned directory is not mounted over', {
  skip: NEEDS_ROOT,
}, async () => {
  const a = attacker();
  const t = makeTempDir('cm-mount-attack-');
  chmodSync(t.dir, 0o755);
  const victim = join(t.dir, 'etc-stand-in');
  mkdirSync(victim, { mode: 0o755 });
  writeFileSync(join(victim, 'passwd'), 'root:x:0:0\n');
  const mnt = join(t.dir, 'mnt');
  mkdirSync(join(mnt, 'srv'), { recursive: true, mode: 0o755 });
  chownSync(join(mnt, 'srv'), a.uid, a.gid); // the service user owns /srv (as rebased under mnt)
  const r = a.sh(`ln -s ${victim} ${mnt}/srv/db`);
  assert.equal(r.status, 0, r.stderr);
  const manifest = parseManifest(manifestText([dbDataService('16M', '/srv/db')]));
  let host: AgentHost | undefined;
  try {
    host = await AgentHost.start({
      manifest,
      stateDir: join(t.dir, 'state'),
      bootId: 'boot-1',
      mountRoot: mnt,
      retry: { attempts: 1, baseMs: 1, maxMs: 1 },
    });
    assert.equal(host.mode, 'attach', 'as root here, attach must be possible');
    const h = host;
    await attack(
      'agent mount at a path whose parent a service user owns and symlinked to a root-owned directory',
      async () => {
        const rep = await h.reconcile();
        const v = rep.volumes.find((x) => x.id === 'scratch/db/data');
        assert.notEqual(v?.state, 'ready', JSON.stringify(rep.volumes));
        assert.match(v?.reason ?? '', /refusing .*srv: it belongs to uid/, JSON.stringify(v));
        const mounts = readFileSync('/proc/self/mounts', 'utf8');
        assert.ok(!mounts.includes(victim) && !mounts.includes(mnt), `nothing mounted at ${victim} or under ${mnt}`);
        assert.equal(readFileSync(join(victim, 'passwd'), 'utf8'), 'root:x:0:0\n');
        return 'mount refused (parent owned by the service user); the root-owned directory was not covered';
      },
    );
  } finally {
    await host?.stop().catch(() => {});
    cleanupKernelState(t.dir);
    await t.cleanup();
  }
});
