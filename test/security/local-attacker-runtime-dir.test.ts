// Local attacker (issue 11 item 2): root must not trust directories and files another user made.
// The daemon's runtime dir, its pid file and --detach log, and the LUKS lock dir; each attack is set
// up by a real second user (attacker.ts) and must be refused without touching what the attacker made.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import {
  chmodSync,
  chownSync,
  copyFileSync,
  lstatSync,
  mkdirSync,
  readFileSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import { makeTempDir } from '../helpers/tmp.js';
import { test } from 'node:test';
import { ensureRuntimeDir } from '../../src/control/runtime-dir.js';
import { lockDir, withDeviceLock } from '../../src/luks/lock.js';
import { ensureTrustedDir, resolveTrusted } from '../../src/util/trusted-path.js';
import { ENTRY, startDaemon } from '../load/helpers.js';
import { attack } from './attack.js';
import { attacker, NEEDS_ROOT } from './attacker.js';

function rootTemp(mode = 0o755): string {
  const d = makeTempDir('cm-victim-').dir;
  chmodSync(d, mode);
  return d;
}

function runDaemon(args: string[]): { status: number | null; out: string } {
  const r = spawnSync(process.execPath, [ENTRY, 'daemon', ...args], { encoding: 'utf8', timeout: 20_000 });
  return { status: r.status, out: r.stdout + r.stderr };
}

test('runtime dir: a 0777 directory the attacker made is refused, not tightened, and nothing is written through its planted pid link', {
  skip: NEEDS_ROOT,
}, async () => {
  const a = attacker();
  const victim = rootTemp();
  const target = join(victim, 'etc-shadow-stand-in');
  writeFileSync(target, 'precious\n', { mode: 0o600 });
  const run = a.dir(0o777);
  try {
    assert.equal(a.sh(`ln -s ${target} ${run}/daemon.pid && ln -s ${target} ${run}/daemon.log`).status, 0);
    await attack(
      'daemon --runtime-dir at a 0777 directory another user made, with daemon.pid and daemon.log links planted',
      () => {
        const r = runDaemon(['--runtime-dir', run, '--detach']);
        assert.equal(r.status, 2, r.out);
        assert.match(r.out, new RegExp(`refusing ${run}: it belongs to uid ${a.uid}`));
        assert.equal(lstatSync(run).mode & 0o7777, 0o777, 'the directory was not chmod-ed');
        assert.equal(readFileSync(target, 'utf8'), 'precious\n');
        return 'refused (exit 2), directory left 0777, link target untouched';
      },
    );
  } finally {
    rmSync(run, { recursive: true, force: true });
    rmSync(victim, { recursive: true, force: true });
  }
});

test('runtime dir: root-owned 0777 and sticky 1777 directories are refused and left as they are', {
  skip: NEEDS_ROOT,
}, async () => {
  const base = rootTemp();
  try {
    await attack('runtime dir pre-existing with mode 0777, 1777 or 0755', () => {
      for (const mode of [0o777, 0o1777, 0o755]) {
        const d = join(base, `d${mode.toString(8)}`);
        mkdirSync(d);
        chmodSync(d, mode);
        assert.throws(
          () => ensureRuntimeDir(d),
          (e: Error & { code?: string }) => e.code === 'ERUNDIR' && e.message.includes(d) && /chmod/.test(e.message),
        );
        assert.equal(lstatSync(d).mode & 0o7777, mode);
      }
      return 'refused with the fix named; modes (and the sticky bit) unchanged';
    });
    // Created fresh: 0700, and again accepted.
    const fresh = join(base, 'a', 'b', 'run');
    ensureRuntimeDir(fresh);
    assert.equal(lstatSync(fresh).mode & 0o777, 0o700);
    assert.equal(lstatSync(join(base, 'a')).mode & 0o777, 0o700);
    ensureRuntimeDir(fresh);
  } finally {
    rmSync(base, { recursive: true, force: true });
  }
});

test('runtime dir: a parent owned by the attacker is refused (it could be renamed away after the check)', {
  skip: NEEDS_ROOT,
}, async () => {
  const a = attacker();
  const parent = a.dir(0o755);
  try {
    const run = join(parent, 'run');
    mkdirSync(run, { mode: 0o700 }); // root-owned and 0700 itself: only the parent is bad
    await attack('runtime dir 0700 and root-owned, below a parent directory another user owns', () => {
      assert.throws(() => ensureRuntimeDir(run), new RegExp(`refusing ${parent}: it belongs to uid ${a.uid}`));
      return 'refused: the parent is checked, not only the last component';
    });
    // A symlink the attacker owns, pointing at a good directory, is refused too.
    const good = rootTemp(0o700);
    const link = join(rootTemp(), 'link');
    const r = a.sh(`ln -s ${good} ${parent}/alias`);
    assert.equal(r.status, 0, r.stderr);
    assert.throws(() => resolveTrusted(join(parent, 'alias')), /refusing/);
    symlinkSync(good, link); // a root-owned link in a root-owned dir is followed
    assert.equal(resolveTrusted(link).real, good);
    assert.equal(ensureTrustedDir(link), good);
    rmSync(good, { recursive: true, force: true });
  } finally {
    rmSync(parent, { recursive: true, force: true });
  }
});

test('daemon pid file and --detach log: planted symlinks in a good runtime dir are replaced or refused, never written through', {
  skip: NEEDS_ROOT,
}, async () => {
  const victim = rootTemp();
  const target = join(victim, 'precious');
  writeFileSync(target, 'precious\n', { mode: 0o600 });
  const run = join(victim, 'run');
  mkdirSync(run, { mode: 0o700 });
  try {
    symlinkSync(target, join(run, 'daemon.log'));
    await attack('daemon --detach with daemon.log a symlink to a root-owned file', () => {
      const r = runDaemon(['--runtime-dir', run, '--detach']);
      assert.equal(r.status, 2, r.out);
      assert.match(r.out, /daemon\.log: it is a symbolic link/);
      assert.equal(readFileSync(target, 'utf8'), 'precious\n');
      return 'refused (O_NOFOLLOW), target untouched';
    });
    rmSync(join(run, 'daemon.log'));
    symlinkSync(target, join(run, 'daemon.pid'));
    await attack('daemon with daemon.pid a symlink to a root-owned file', async () => {
      const d = await startDaemon(run);
      try {
        assert.ok(!lstatSync(join(run, 'daemon.pid')).isSymbolicLink());
        assert.equal(readFileSync(join(run, 'daemon.pid'), 'utf8').trim(), String(d.pid));
      } finally {
        await d.stop();
      }
      assert.equal(readFileSync(target, 'utf8'), 'precious\n');
      return 'the link was replaced by a new file (rename), the target untouched';
    });
  } finally {
    rmSync(victim, { recursive: true, force: true });
  }
});

test('lock dir: /tmp/cryptmap-UID made by the attacker is refused; ours is created 0700', {
  skip: NEEDS_ROOT,
}, async () => {
  const a = attacker();
  const victim = rootTemp();
  const img = join(victim, 'disk.img');
  writeFileSync(img, Buffer.alloc(4096));
  const planted = a.dir(0o755);
  try {
    assert.equal(a.sh(`mkdir -m 777 ${planted}/locks`).status, 0);
    await attack('LUKS lock dir (/tmp/cryptmap-UID/locks) pre-created by another user', async () => {
      let ran = false;
      await assert.rejects(
        withDeviceLock(img, async () => (ran = true), { env: { CRYPTMAP_LOCK_DIR: join(planted, 'locks') } }),
        (e: Error & { code?: string }) => e.code === 'ELOCKDIR' && e.message.includes(planted),
      );
      assert.equal(ran, false);
      return 'refused (ELOCKDIR) before the header update ran';
    });
    const mine = join(victim, 'locks');
    assert.equal(
      await withDeviceLock(img, async () => lstatSync(mine).mode & 0o777, { env: { CRYPTMAP_LOCK_DIR: mine } }),
      0o700,
    );
    assert.equal(lockDir({ CRYPTMAP_LOCK_DIR: mine }), mine);
  } finally {
    rmSync(planted, { recursive: true, force: true });
    rmSync(victim, { recursive: true, force: true });
  }
});

test("a non-root user's own directories: group-writable only through the user's private group is accepted (umask 002 checkouts), a shared group is not", {
  skip: NEEDS_ROOT,
}, async () => {
  const a = attacker(); // here the "caller": a non-root user with a user private group
  const { dir: lib, cleanup: removeLib } = makeTempDir('cm-lib-');
  chmodSync(lib, 0o755);
  for (const f of ['trusted-path.js', 'errors.js', 'secret.js'])
    copyFileSync(new URL(`../../src/util/${f}`, import.meta.url), join(lib, f));
  writeFileSync(join(lib, 'package.json'), '{"type":"module"}');
  const home = a.dir(0o755);
  try {
    const script = (dir: string) =>
      `${process.execPath} --input-type=module -e "import('${lib}/trusted-path.js').then(m=>{try{m.ensureTrustedDir('${dir}');console.log('OK')}catch(e){console.log(e.code+': '+e.message)}})"`;
    let r = a.sh(`umask 002 && mkdir ${home}/checkout && ${script(`${home}/checkout/.cryptmap`)}`);
    assert.match(r.stdout, /^OK/, r.stdout + r.stderr);
    chownSync(join(home, 'checkout'), a.uid, 100); // a group the user shares with others ('users')
    r = a.sh(script(`${home}/checkout/.cryptmap2`));
    assert.match(
      r.stdout,
      /EUNTRUSTED_PATH: refusing .*checkout: it is writable by group or others \(mode 775\)/,
      r.stdout + r.stderr,
    );
  } finally {
    rmSync(home, { recursive: true, force: true });
    removeLib();
  }
});
