// `cryptmap dm ...`: dmsetup argument forms and output formats, driven through runDm with an
// in-process DmControl; without a daemon every command reports that the daemon is not running.
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Readable, Writable } from 'node:stream';
import { test } from 'node:test';
import { testTempDir } from '../helpers/tmp.js';
import dmMain, { DAEMON_NOT_RUNNING, runDm } from '../../src/cli/commands/dm.js';
import type { CliIO } from '../../src/cli/types.js';
import { dmHandlers } from '../../src/control/dm-remote.js';
import { controlSocketPath, ensureRuntimeDir } from '../../src/control/runtime-dir.js';
import { ControlServer } from '../../src/control/server.js';
import { InProcessDmControl } from '../../src/dm/control.js';
import { memRegistry, xtsKey } from './helpers.js';

function sink(): Writable & { text: () => string } {
  const chunks: Buffer[] = [];
  const w = new Writable({
    write(c, _e, cb) {
      chunks.push(Buffer.from(c));
      cb();
    },
  });
  return Object.assign(w, { text: () => Buffer.concat(chunks).toString('utf8') });
}

function setup() {
  const { registry } = memRegistry({ a: 1 << 20, b: 1 << 20 });
  const control = new InProcessDmControl(registry);
  const dm = async (args: string[], stdin = '') => {
    const stdout = sink();
    const stderr = sink();
    const io: CliIO = { stdin: Readable.from([Buffer.from(stdin)]), stdout, stderr, env: {} };
    const code = await runDm(['dm', ...args], io, control);
    return { code, out: stdout.text(), err: stderr.text() };
  };
  return { registry, control, dm };
}

test('create, table, status, info, ls, rename, remove in dmsetup formats', async (t) => {
  const { dm, registry } = setup();
  const key = xtsKey(5).toString('hex');
  assert.deepEqual(await dm(['ls']), { code: 0, out: 'No devices found\n', err: '' });
  assert.equal((await dm(['create', 'lin', '--table', '0 1024 linear /mem/a 0;1024 1024 zero'])).code, 0);
  assert.equal((await dm(['create', 'str', '-u', 'CRYPT-TEST-1'], '0 2048 striped 2 8 /mem/a 0 /mem/b 0\n')).code, 0);
  const dir = testTempDir(t, 'cryptmap-cli-');
  const f = join(dir, 'table');
  writeFileSync(f, `0 1024 crypt aes-xts-plain64 ${key} 0 lin 0 1 allow_discards\n`, { mode: 0o600 });
  assert.equal((await dm(['create', 'cr', f])).code, 0);
  const bad = await dm(['create', 'x', join(dir, 'missing')]);
  assert.equal(bad.code, 4);
  assert.match(bad.err, /cannot read table file .*missing/);
  assert.equal((await dm(['create', 'empty', '-n'])).code, 0);

  assert.deepEqual(await dm(['table', 'lin']), { code: 0, out: '0 1024 linear /mem/a 0\n1024 1024 zero \n', err: '' });
  assert.equal(
    (await dm(['table', 'cr'])).out,
    `0 1024 crypt aes-xts-plain64 ${'0'.repeat(128)} 0 lin 0 1 allow_discards\n`,
  );
  assert.equal(
    (await dm(['table', '--showkeys', 'cr'])).out,
    `0 1024 crypt aes-xts-plain64 ${key} 0 lin 0 1 allow_discards\n`,
  );
  assert.equal((await dm(['table', 'empty'])).out, '\n');
  assert.equal(
    (await dm(['table'])).out,
    `cr: 0 1024 crypt aes-xts-plain64 ${'0'.repeat(128)} 0 lin 0 1 allow_discards\nempty: \nlin: 0 1024 linear /mem/a 0\nlin: 1024 1024 zero \nstr: 0 2048 striped 2 8 /mem/a 0 /mem/b 0\n`,
  );
  assert.equal((await dm(['status', 'str'])).out, '0 2048 striped 2 /mem/a /mem/b  AA\n');
  assert.equal(
    (await dm(['status'])).out,
    'cr: 0 1024 crypt \nempty: \nlin: 0 1024 linear \nlin: 1024 1024 zero \nstr: 0 2048 striped 2 /mem/a /mem/b  AA\n',
  );
  assert.equal((await dm(['ls'])).out, 'cr\t(253:2)\nempty\t(253:3)\nlin\t(253:0)\nstr\t(253:1)\n');
  assert.equal(
    (await dm(['info', 'str'])).out,
    'Name:              str\nState:             ACTIVE\nRead Ahead:        256\nTables present:    LIVE\nOpen count:        0\nEvent number:      0\nMajor, minor:      253, 1\nNumber of targets: 1\nUUID: CRYPT-TEST-1\n\n',
  );
  assert.equal((await dm(['reload', 'lin', '--table', '0 2048 linear /mem/a 0'])).code, 0);
  assert.equal((await dm(['suspend', 'lin'])).code, 0);
  assert.equal(
    (await dm(['info', 'lin'])).out,
    'Name:              lin\nState:             SUSPENDED\nRead Ahead:        256\nTables present:    LIVE & INACTIVE\nOpen count:        1\nEvent number:      0\nMajor, minor:      253, 0\nNumber of targets: 2\n\n',
  );
  assert.equal((await dm(['resume', 'lin'])).code, 0);
  assert.equal((await dm(['table', 'lin'])).out, '0 2048 linear /mem/a 0\n');
  assert.match((await dm(['info'])).out, /^Name: {14}cr\n[\s\S]*Tables present: {4}None\n[\s\S]*Name: {14}str\n/);
  assert.equal((await dm(['load', 'empty'], '0 8 zero')).code, 0);
  assert.match((await dm(['info', 'empty'])).out, /Tables present: {4}INACTIVE\n/);
  assert.equal((await dm(['clear', 'empty'])).code, 0);
  assert.equal((await dm(['create', 'ro', '-r', '--table', '0 8 zero'])).code, 0);
  assert.match((await dm(['info', 'ro'])).out, /State: {13}ACTIVE \(READ-ONLY\)\n/);

  assert.equal((await dm(['rename', 'empty', 'vacant'])).code, 0);
  const busy = await dm(['remove', 'lin']);
  assert.deepEqual(busy, {
    code: 5,
    out: '',
    err: 'device lin is in use (open count 1); use --force to remove it anyway\n',
  });
  assert.equal((await dm(['remove', 'cr', 'lin'])).code, 0);
  assert.equal((await dm(['remove', '-f', 'str'])).code, 0);
  assert.deepEqual(await dm(['remove', 'nope']), { code: 4, out: '', err: 'device nope does not exist\n' });
  assert.equal((await dm(['ls'])).out, 'ro\t(253:4)\nvacant\t(253:3)\n');
  await registry.closeAll();
});

test('message: suspend, key wipe, key set, resume', async () => {
  const { dm, registry } = setup();
  const key = xtsKey(6).toString('hex');
  await dm(['create', 'c', '--table', `0 64 crypt aes-xts-plain64 ${key} 0 /mem/a 0`]);
  const notSusp = await dm(['message', 'c', '0', 'key', 'wipe']);
  assert.deepEqual(notSusp, {
    code: 1,
    out: '',
    err: 'crypt target: the device must be suspended for key manipulation\n',
  });
  await dm(['suspend', 'c']);
  assert.equal((await dm(['message', 'c', '0', 'key', 'wipe'])).code, 0);
  assert.match((await dm(['resume', 'c'])).err, /aborting resume/);
  assert.equal((await dm(['message', 'c', '0', 'key', 'set', key])).code, 0);
  assert.equal((await dm(['resume', 'c'])).code, 0);
  const badSector = await dm(['message', 'c', 'x', 'key', 'wipe']);
  assert.equal(badSector.code, 1);
  assert.match(badSector.err, /message: SECTOR 'x' is not an unsigned decimal number/);
  await registry.closeAll();
});

test('usage errors name the problem and exit 1', async () => {
  const { dm } = setup();
  const cases: [string[], RegExp][] = [
    [['frobnicate'], /unknown dm command 'frobnicate'/],
    [['create'], /create: missing argument/],
    [['create', 'a', 'b', 'c'], /create: unexpected argument 'c'/],
    [['create', 'a', '--bogus'], /create: Unknown option '--bogus'/],
    [['create', 'a', '-n', '--table', '0 8 zero'], /create: --notable excludes a table/],
    [['create', 'a', '--table', '0 8 zero', 'file'], /give the table either with --table or as a file, not both/],
    [['remove'], /remove: missing argument/],
    [['suspend', 'a', 'b'], /suspend: unexpected argument 'b'/],
    [['rename', 'a'], /rename: missing argument/],
    [['ls', 'x'], /ls: unexpected argument 'x'/],
    [['message', 'a', '0'], /message: expected NAME SECTOR MESSAGE/],
    [['create', 'bad', '--table', '0 8 nosuch'], /table line 1: unknown target type 'nosuch'/],
  ];
  for (const [args, re] of cases) {
    const r = await dm(args);
    assert.equal(r.code, 1, args.join(' '));
    assert.match(r.err, re, args.join(' '));
  }
  const help = await dm(['--help']);
  assert.equal(help.code, 0);
  assert.match(help.out, /^usage: cryptmap dm <command>/);
  assert.equal((await dm([])).code, 1);
});

test('without a daemon: arguments are checked, then the daemon message, exit 1', async (t) => {
  const dir = testTempDir(t, 'cryptmap-nodaemon-');
  const stderr = sink();
  const io: CliIO = { stdin: Readable.from([]), stdout: sink(), stderr, env: { CRYPTMAP_RUNTIME_DIR: dir } };
  assert.equal(await dmMain(['dm', 'ls'], io), 1);
  assert.ok(stderr.text().startsWith(DAEMON_NOT_RUNNING), stderr.text());
  assert.equal(DAEMON_NOT_RUNNING, "cryptmap: the daemon is not running (start it with 'cryptmap daemon')");
  const stderr2 = sink();
  assert.equal(await dmMain(['dm', 'create'], { ...io, stderr: stderr2 }), 1);
  assert.match(stderr2.text(), /create: missing argument/);
  const stderr3 = sink();
  assert.equal(await runDm(['dm', 'ls'], { ...io, stderr: stderr3 }, null), 1);
  assert.equal(stderr3.text(), `${DAEMON_NOT_RUNNING}\n`);
});

test('with a daemon: the verbs reach its registry over the control socket', async (t) => {
  const dir = testTempDir(t, 'cryptmap-daemon-');
  const run = join(dir, 'run');
  ensureRuntimeDir(run);
  const { registry } = memRegistry({ a: 1 << 20 });
  const server = new ControlServer(dmHandlers(new InProcessDmControl(registry)));
  await server.listen(controlSocketPath(run));
  try {
    const call = async (args: string[]) => {
      const stdout = sink();
      const stderr = sink();
      const code = await dmMain(['dm', ...args], {
        stdin: Readable.from([]),
        stdout,
        stderr,
        env: { CRYPTMAP_RUNTIME_DIR: run },
      });
      return { code, out: stdout.text(), err: stderr.text() };
    };
    assert.equal((await call(['create', 'r', '--table', '0 16 linear /mem/a 0', '-u', 'U'])).code, 0);
    assert.deepEqual(await call(['table', 'r']), { code: 0, out: '0 16 linear /mem/a 0\n', err: '' });
    assert.deepEqual(await call(['ls']), { code: 0, out: 'r\t(253:0)\n', err: '' });
    assert.deepEqual(await call(['remove', 'nope']), { code: 4, out: '', err: 'device nope does not exist\n' });
    assert.equal((await call(['remove', 'r'])).code, 0);
    assert.equal(registry.list().length, 0);
  } finally {
    await server.close();
    await registry.closeAll();
  }
});
