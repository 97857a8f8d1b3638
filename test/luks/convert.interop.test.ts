// `cryptmap convert --type luks1|luks2` against cryptsetup 2.6 as the oracle: the same image
// converted by each gives the same LUKS2 JSON (LUKS1 -> LUKS2) or the same LUKS1 header bytes
// (LUKS2 -> LUKS1), cryptsetup opens what cryptmap converted and cryptmap what cryptsetup converted,
// and every refusal (compat-test2 "[31] LUKS convert") has cryptsetup's exit code and leaves the image
// as it was.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { before, test } from 'node:test';
import { requireTool } from '../helpers/tools.js';
import { fileTempDir } from '../helpers/tmp.js';
import { main } from '../../src/cli/main.js';
import type { CliIO } from '../../src/cli/types.js';
import { interopTools, Sink } from './helpers.js';
import { FAST_PBKDF } from '../helpers/luks.js';

const dir = fileTempDir('cryptmap-convert-');
const { run, cs, image } = interopTools(() => dir);
let k1 = '';
let k5 = '';

async function cm(argv: string[], input: string[] = []): Promise<{ code: number; out: string; err: string }> {
  const x: CliIO & { stdout: Sink; stderr: Sink } = {
    stdin: Readable.from(input) as unknown as CliIO['stdin'],
    stdout: new Sink(),
    stderr: new Sink(),
    env: { ...process.env, CRYPTMAP_LOCK_DIR: join(dir, 'locks'), CRYPTMAP_RUNTIME_DIR: join(dir, 'run') },
  };
  const code = await main(argv, x);
  return { code, out: x.stdout.data, err: x.stderr.data };
}
const sha = (p: string) => createHash('sha256').update(readFileSync(p)).digest('hex');
const json = (p: string) => cs('luksDump', '--dump-json-metadata', p);
const opens = (p: string, key: string) => run('cryptsetup', ['open', '--test-passphrase', '-d', key, p]).code === 0;

before(() => {
  requireTool('cryptsetup');
  k1 = join(dir, 'k1');
  k5 = join(dir, 'k5');
  writeFileSync(k1, 'one', { mode: 0o600 });
  writeFileSync(k5, 'five', { mode: 0o600 });
});

/** A copy of `src` for each tool. */
function pair(src: string): { a: string; b: string } {
  const a = join(dir, 'a.img');
  const b = join(dir, 'b.img');
  copyFileSync(src, a);
  copyFileSync(src, b);
  return { a, b };
}

test('LUKS1 -> LUKS2: same JSON metadata as cryptsetup convert; both keys open with cryptsetup', async () => {
  const img = image('l1.img', 4 << 20);
  cs('-q', 'luksFormat', '--type', 'luks1', ...FAST_PBKDF, img, k5, '--key-slot', '5');
  cs('luksAddKey', '-q', ...FAST_PBKDF, '-S', '1', '-d', k5, img, k1);
  const { a, b } = pair(img);
  cs('-q', 'convert', '--type', 'luks2', a);
  const r = await cm(['convert', '-q', '--type', 'luks2', b]);
  assert.equal(r.code, 0, r.err);
  assert.equal(json(b), json(a));
  assert.ok(opens(b, k1) && opens(b, k5));
  // and back with cryptsetup: it accepts what cryptmap wrote
  cs('-q', 'convert', '--type', 'luks1', b);
  assert.ok(opens(b, k1) && opens(b, k5));
});

test('LUKS2 -> LUKS1: same LUKS1 header as cryptsetup convert (keyslot 1 after keyslot 0 area, data offset not 4 KiB aligned)', async () => {
  const img = image('l2.img', 4 << 20);
  cs('-q', 'luksFormat', '--type', 'luks2', '--sector-size', '512', ...FAST_PBKDF, img, k1, '--key-slot', '0');
  cs('luksAddKey', '-q', ...FAST_PBKDF, '-S', '1', '-d', k1, img, k5);
  run('cryptsetup', ['luksChangeKey', '-q', ...FAST_PBKDF, '-d', k1, img, k1]); // keyslot 0 moves to a later area
  const { a, b } = pair(img);
  cs('-q', 'convert', '--type', 'luks1', a);
  const r = await cm(['convert', '--type', 'luks1', '-q', b]);
  assert.equal(r.code, 0, r.err);
  assert.ok(
    readFileSync(b).subarray(0, 592).equals(readFileSync(a).subarray(0, 592)),
    'LUKS1 header differs from cryptsetup',
  );
  assert.ok(opens(b, k1) && opens(b, k5));
  // what cryptsetup converted, cryptmap converts back; cryptsetup opens it
  const r2 = await cm(['convert', '-q', '--type', 'luks2', a]);
  assert.equal(r2.code, 0, r2.err);
  assert.ok(opens(a, k1) && opens(a, k5));

  const odd = image('odd.img', 4 << 20);
  cs('-q', 'luksFormat', '--type', 'luks1', ...FAST_PBKDF, odd, k5, '--align-payload', '4097');
  assert.equal((await cm(['convert', '-q', '--type', 'luks2', odd])).code, 0);
  assert.equal(run('cryptsetup', ['isLuks', '--type', 'luks2', odd]).code, 0);
  assert.ok(opens(odd, k5));
});

test('refusals: cryptsetup exit codes and messages, image unchanged', async () => {
  const l1 = image('r1.img', 4 << 20);
  cs('-q', 'luksFormat', '--type', 'luks1', ...FAST_PBKDF, l1, k5);
  const sector = image('r2.img', 4 << 20);
  cs('-q', 'luksFormat', '--type', 'luks2', '--sector-size', '1024', ...FAST_PBKDF, sector, k5);
  const hash = image('r3.img', 4 << 20);
  cs(
    '-q',
    'luksFormat',
    '--type',
    'luks2',
    '--sector-size',
    '512',
    ...FAST_PBKDF,
    '--hash',
    'sha512',
    hash,
    k5,
    '-S',
    '0',
  );
  cs('luksAddKey', '-q', ...FAST_PBKDF, '-S', '1', '-d', k5, hash, k1, '--hash', 'sha256');
  const argon = image('r4.img', 4 << 20);
  cs(
    '-q',
    'luksFormat',
    '--type',
    'luks2',
    '--sector-size',
    '512',
    '--pbkdf',
    'argon2id',
    '--pbkdf-force-iterations',
    '4',
    '--pbkdf-memory',
    '32',
    argon,
    k5,
  );
  const tok = image('r5.img', 4 << 20);
  cs('-q', 'luksFormat', '--type', 'luks2', '--sector-size', '512', ...FAST_PBKDF, tok, k5);
  spawnSync('cryptsetup', ['token', 'import', tok, '--token-id', '3'], { input: '{"type":"x","keyslots":[]}' });
  const plain = image('r6.img', 1 << 20);
  const cases: { name: string; args: string[]; msg: RegExp }[] = [
    { name: 'same type', args: ['--type', 'luks1', l1], msg: /^Device is already LUKS1 type\.$/m },
    { name: 'no --type', args: [l1], msg: /^Invalid LUKS type, only luks1 and luks2 are supported\.$/m },
    {
      name: 'sector size',
      args: ['--type', 'luks1', sector],
      msg: /^Cannot convert to LUKS1 format - default segment encryption sector size is not 512 bytes\.$/m,
    },
    {
      name: 'keyslot hash',
      args: ['--type', 'luks1', hash],
      msg: /^Cannot convert to LUKS1 format - keyslot 1 is not LUKS1 compatible\.$/m,
    },
    {
      name: 'argon2',
      args: ['--type', 'luks1', argon],
      msg: /^Cannot convert to LUKS1 format - keyslot 0 is not LUKS1 compatible\.$/m,
    },
    {
      name: 'token',
      args: ['--type', 'luks1', tok],
      msg: /^Cannot convert to LUKS1 format - LUKS2 header contains 1 token\(s\)\.$/m,
    },
    { name: 'not LUKS', args: ['--type', 'luks2', plain], msg: /is not a valid LUKS device\.$/m },
  ];
  for (const c of cases) {
    const dev = c.args[c.args.length - 1]!;
    const before = sha(dev);
    const real = run('cryptsetup', ['-q', 'convert', ...c.args]);
    assert.equal(sha(dev), before, `${c.name}: cryptsetup changed the image`);
    const r = await cm(['convert', '-q', ...c.args]);
    assert.equal(r.code, real.code, `${c.name}: exit ${r.code}, cryptsetup ${real.code} (${r.err.trim()})`);
    assert.match(r.err, c.msg, c.name);
    assert.equal(sha(dev), before, `${c.name}: cryptmap changed the image`);
  }
  // after killing the odd keyslot both tools convert (compat-test2 [31] hash test)
  cs('-q', 'luksKillSlot', hash, '1');
  assert.equal((await cm(['convert', '-q', '--type', 'luks1', hash])).code, 0);
  assert.match(cs('luksDump', hash), /Key Slot 0: ENABLED/);
  assert.equal(run('cryptsetup', ['luksOpen', hash, '--test-passphrase', '--key-slot', '0', '-d', k5]).code, 0);
});
