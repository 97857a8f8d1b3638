// The CLI entry point's error reporting: usage errors from any verb's option parsing exit 1 with
// the parser's message, never as an "internal error".
import assert from 'node:assert/strict';
import { PassThrough } from 'node:stream';
import { test } from 'node:test';
import { testTempDir } from '../helpers/tmp.js';
import { main } from '../../src/cli/main.js';

async function run(argv: string[]): Promise<{ code: number; err: string }> {
  let err = '';
  const stderr = new PassThrough();
  stderr.on('data', (c: Buffer) => {
    err += c.toString();
  });
  const code = await main(argv, { stdin: new PassThrough(), stdout: new PassThrough(), stderr, env: {} });
  return { code, err };
}

test('an unknown option is a usage error (exit 1) for every verb, not an internal error', async () => {
  for (const verb of [
    'status',
    'close',
    'attach',
    'benchmark',
    'daemon',
    'luksDump',
    'open',
    'refresh',
    'luksSuspend',
    'luksResume',
  ]) {
    const r = await run([verb, '--no-such-option']);
    assert.equal(r.code, 1, verb);
    assert.match(r.err, /Unknown option '--no-such-option'/, verb);
    assert.doesNotMatch(r.err, /internal error/, verb);
  }
});

test('daemon --crypt-threads takes 1..256 and refuses anything else before starting', async () => {
  for (const bad of ['0', '257', '2x', '1.5', '']) {
    const r = await run(['daemon', '--crypt-threads', bad, '--runtime-dir', '/nonexistent/never-created']);
    assert.equal(r.code, 1, bad);
    assert.match(r.err, /--crypt-threads wants a number of threads from 1 to 256/, bad);
  }
});

test('every verb answers --help with its usage and exit 0', async () => {
  const verbs = [
    'luksFormat',
    'luksDump',
    'luksAddKey',
    'luksRemoveKey',
    'luksKillSlot',
    'luksChangeKey',
    'luksConvertKey',
    'luksUUID',
    'isLuks',
  ];
  verbs.push(
    'luksHeaderBackup',
    'luksHeaderRestore',
    'config',
    'repair',
    'erase',
    'token',
    'open',
    'close',
    'status',
    'luksSuspend',
    'luksResume',
  );
  verbs.push(
    'refresh',
    'resize',
    'attach',
    'detach',
    'benchmark',
    'daemon',
    'dm',
    'agent',
    'keyd',
    'crypttab',
    'volume',
  );
  for (const verb of verbs) {
    let out = '';
    const stdout = new PassThrough();
    stdout.on('data', (c: Buffer) => {
      out += c.toString();
    });
    const code = await main([verb, '--help'], { stdin: new PassThrough(), stdout, stderr: new PassThrough(), env: {} });
    assert.equal(code, 0, verb);
    assert.match(out, new RegExp(`^usage: cryptmap ${verb}\\b`), verb);
  }
});

test('options before the verb and -h as --hash: luksFormat does what was asked (issue 12 item 1)', async (t) => {
  const { truncateSync, writeFileSync } = await import('node:fs');
  const { join } = await import('node:path');
  const dir = testTempDir(t, 'cryptmap-main-');
  const img = join(dir, 'img');
  writeFileSync(img, Buffer.alloc(0));
  truncateSync(img, 20 << 20);
  let out = '';
  const stdout = new PassThrough();
  stdout.on('data', (c: Buffer) => {
    out += c.toString();
  });
  const io = (input: string) => {
    const stdin = new PassThrough();
    stdin.end(input);
    return { stdin, stdout, stderr: new PassThrough(), env: { CRYPTMAP_LOCK_DIR: join(dir, 'locks') } };
  };
  assert.equal(
    await main(
      ['-q', '--type', 'luks1', 'luksFormat', img, '-h', 'sha512', '--pbkdf-force-iterations', '1000'],
      io('pw\n'),
    ),
    0,
  );
  assert.equal(await main(['-v', 'luksDump', img], io('')), 0);
  assert.match(out, /Hash spec:\s+sha512/);
  assert.equal(await main(['-d', '-', 'open', '--test-passphrase', img, '--', 'name'], io('pw')), 0);
  assert.equal((await run(['--uuid', 'x', 'open', img, 'name'])).code, 1);
});
