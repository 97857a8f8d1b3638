// Local attacker (issue 11 item 3): the CLI and the keyd client send keys (and tokens) only to a
// listener run by root or by the caller. A real second user listens where the client is pointed
// (CRYPTMAP_RUNTIME_DIR, a keyd address) and records every byte it receives; it must receive none.
import assert from 'node:assert/strict';
import { chmodSync, chownSync, mkdirSync, renameSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { makeTempDir } from '../helpers/tmp.js';
import { join } from 'node:path';
import { test } from 'node:test';
import { ControlClient } from '../../src/control/client.js';
import { unixKeyClient } from '../../src/keyservice/client.js';
import { peerCredAvailable } from '../../src/util/peercred.js';
import { cli, startDaemon } from '../load/helpers.js';
import { attack } from './attack.js';
import { attacker, NEEDS_ROOT, waitForLine } from './attacker.js';
import { FAST_LUKS2_FORMAT } from '../helpers/luks.js';

/** A listener as the attacker at `path` that prints LISTENING, then every byte it gets as DATA:<hex>. */
function listenAsAttacker(path: string) {
  const script = `const net=require('net');const s=net.createServer(c=>{c.on('data',d=>console.log('DATA:'+d.toString('hex')));c.on('error',()=>{})});s.listen(${JSON.stringify(path)},()=>{require('fs').chmodSync(${JSON.stringify(path)},0o777);console.log('LISTENING')});`;
  const child = attacker().node(script);
  let out = '';
  child.stdout?.on('data', (d) => (out += d));
  return {
    child,
    ready: waitForLine(child, 'LISTENING'),
    received: () => out.split('\n').filter((l) => l.startsWith('DATA:')),
  };
}

async function formatted(dir: string): Promise<{ img: string; key: string }> {
  const img = join(dir, 'disk.img');
  const key = join(dir, 'key');
  writeFileSync(img, '');
  truncateSync(img, 32 << 20);
  writeFileSync(key, 'attacker must never see this\n', { mode: 0o600 });
  const r = await cli([...FAST_LUKS2_FORMAT, '--key-file', key, img]);
  assert.equal(r.code, 0, r.stderr);
  return { img, key };
}

test("open with CRYPTMAP_RUNTIME_DIR pointing at the attacker's directory: refused before the key is sent", {
  skip: NEEDS_ROOT,
}, async () => {
  const a = attacker();
  const { dir: victim, cleanup: removeVictim } = makeTempDir('cm-victim-');
  const adir = a.dir(0o755);
  const l = listenAsAttacker(join(adir, 'control.sock'));
  try {
    await l.ready;
    const { img, key } = await formatted(victim);
    await attack(
      'CLI open with CRYPTMAP_RUNTIME_DIR at a directory and control socket owned by another user',
      async () => {
        const r = await cli(['open', '--key-file', key, img, 'stolen'], { env: { CRYPTMAP_RUNTIME_DIR: adir } });
        assert.equal(r.code, 2, r.stderr);
        assert.match(r.stderr, new RegExp(`refusing ${adir}: it belongs to uid ${a.uid}`));
        await new Promise((res) => setTimeout(res, 200));
        assert.deepEqual(l.received(), [], 'the attacker received nothing');
        return 'refused before connecting (runtime dir owned by another user); the listener received 0 bytes';
      },
    );
  } finally {
    l.child.kill();
    rmSync(adir, { recursive: true, force: true });
    removeVictim();
  }
});

test('a socket of another user moved into a root-owned directory and chowned to root: SO_PEERCRED refuses it', {
  skip: NEEDS_ROOT,
}, async () => {
  assert.ok(peerCredAvailable(), 'the native addon with peerCred must be built (node scripts/build-native.mjs)');
  const a = attacker();
  const adir = a.dir(0o755);
  const { dir: run, cleanup: removeRun } = makeTempDir('cm-victim-');
  const l = listenAsAttacker(join(adir, 'control.sock'));
  try {
    await l.ready;
    renameSync(join(adir, 'control.sock'), join(run, 'control.sock'));
    chownSync(join(run, 'control.sock'), 0, 0);
    chmodSync(join(run, 'control.sock'), 0o600);
    await attack(
      'control socket in a good root-owned directory, but the listening process runs as another user',
      async () => {
        await assert.rejects(
          ControlClient.connect(run),
          (e: Error & { code?: string }) =>
            e.code === 'EUNTRUSTED_DAEMON' && new RegExp(`runs as uid ${a.uid}`).test(e.message),
        );
        // Also with the socket still owned by the attacker: the path check alone refuses it.
        chownSync(join(run, 'control.sock'), a.uid, a.gid);
        await assert.rejects(ControlClient.connect(run), /control\.sock: it belongs to uid/);
        await new Promise((res) => setTimeout(res, 200));
        assert.deepEqual(l.received(), []);
        return 'refused by SO_PEERCRED (peer uid is not root or the caller); 0 bytes sent';
      },
    );
  } finally {
    l.child.kill();
    rmSync(adir, { recursive: true, force: true });
    removeRun();
  }
});

test("keyd client: a token and a key request are never sent to another user's socket", {
  skip: NEEDS_ROOT,
}, async () => {
  const a = attacker();
  const adir = a.dir(0o755);
  const l = listenAsAttacker(join(adir, 'keyd.sock'));
  try {
    await l.ready;
    await attack('keyd client pointed at a socket another user listens on (with a client token)', async () => {
      const c = unixKeyClient({ socketPath: join(adir, 'keyd.sock'), token: 'f'.repeat(64), timeoutMs: 2000 });
      await assert.rejects(c.deriveKey({ purpose: 'scratch', service: 'db', volume: 'data' }), {
        code: 'EKEYD_UNTRUSTED',
      });
      await assert.rejects(c.ping(), { code: 'EKEYD_UNTRUSTED' });
      await new Promise((res) => setTimeout(res, 200));
      assert.deepEqual(l.received(), []);
      return 'refused (socket dir owned by another user); the token was not sent';
    });
  } finally {
    l.child.kill();
    rmSync(adir, { recursive: true, force: true });
  }
});

test('daemon: a client of another uid that reaches a too-open control socket is refused (SO_PEERCRED)', {
  skip: NEEDS_ROOT,
}, async () => {
  assert.ok(peerCredAvailable(), 'the native addon with peerCred must be built');
  const a = attacker();
  const { dir: base, cleanup: removeBase } = makeTempDir('cm-victim-');
  const run = join(base, 'run');
  mkdirSync(run, { mode: 0o700 });
  const d = await startDaemon(run);
  try {
    await attack('another user connects to a control socket an admin made world-accessible', async () => {
      chmodSync(base, 0o755);
      chmodSync(run, 0o711);
      chmodSync(join(run, 'control.sock'), 0o666);
      const script = `const c=require('net').connect(${JSON.stringify(join(run, 'control.sock'))});c.on('connect',()=>c.write(JSON.stringify({id:1,op:'daemon.ping',args:{}})+'\\n'));c.on('data',d=>{console.log(String(d));process.exit(0)});c.on('error',e=>{console.log(e.code);process.exit(0)})`;
      const r = a.sh(`${process.execPath} -e "${script.replace(/"/g, '\\"')}"`);
      assert.match(r.stdout, /EDAEMON_PERM/, r.stdout + r.stderr);
      // Root still gets in (once the socket is 0600 again: the client refuses a world-writable one).
      chmodSync(join(run, 'control.sock'), 0o600);
      await assert.rejects(ControlClient.connect(join(run, 'nope')), { code: 'EDAEMON_DOWN' });
      const c = await ControlClient.connect(run);
      await c.call('daemon.ping');
      c.close();
      return 'the daemon answered EDAEMON_PERM and closed the connection';
    });
  } finally {
    await d.stop();
    removeBase();
  }
});
