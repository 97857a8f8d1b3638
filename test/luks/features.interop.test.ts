// cryptsetup 2.6 features of issue 12, with cryptsetup as the oracle both ways (compat-test2 [28],
// [33], [38], [41], [43], compat-test --align-payload, luks1-compat-test whirlpool): unbound keyslots,
// --keyslot-cipher/--keyslot-key-size, token add --key-description / unassign, luks2-keyring tokens
// read from the kernel keyring (luksAddKey --token-id / --new-token-id), --align-payload, PBKDF2 with
// whirlpool. Keyring keys go to the user keyring under unique names and are unlinked afterwards.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { copyFileSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { makeTempDir } from '../helpers/tmp.js';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { after, before, test } from 'node:test';
import { requireTool } from '../helpers/tools.js';
import { main } from '../../src/cli/main.js';
import type { CliIO } from '../../src/cli/types.js';
import { interopTools, Sink } from './helpers.js';
import { FAST_PBKDF } from '../helpers/luks.js';

const { dir, cleanup } = makeTempDir('cryptmap-features-');
const { run, cs, image } = interopTools(() => dir);
let k1 = '';
let k2 = '';
const keyIds: string[] = [];

async function cm(argv: string[], input = ''): Promise<{ code: number; out: string; err: string }> {
  const x: CliIO & { stdout: Sink; stderr: Sink } = {
    stdin: Readable.from(input ? [input] : []) as unknown as CliIO['stdin'],
    stdout: new Sink(),
    stderr: new Sink(),
    env: { ...process.env, CRYPTMAP_LOCK_DIR: join(dir, 'locks'), CRYPTMAP_RUNTIME_DIR: join(dir, 'run') },
  };
  const code = await main(argv, x);
  return { code, out: x.stdout.data, err: x.stderr.data };
}
const okCm = async (argv: string[], input = '') => {
  const r = await cm(argv, input);
  assert.equal(r.code, 0, `cryptmap ${argv.join(' ')}: ${r.err}`);
  return r.out;
};
const csIn = (args: string[], input: string) => run('cryptsetup', args, input);
const dump = (img: string) => cs('luksDump', img);
const json = (img: string) => JSON.parse(cs('luksDump', '--dump-json-metadata', img));
function keyring(desc: string, payload: string): void {
  const r = spawnSync('keyctl', ['padd', 'user', desc, '@u'], { input: payload });
  if (r.error || r.status !== 0) assert.fail(`keyctl padd failed (install keyutils): ${r.error?.message ?? r.stderr}`);
  keyIds.push(r.stdout.toString().trim());
}

before(() => {
  requireTool('cryptsetup');
  k1 = join(dir, 'k1');
  k2 = join(dir, 'k2');
  writeFileSync(k1, 'one', { mode: 0o600 });
  writeFileSync(k2, 'two', { mode: 0o600 });
});
after(() => {
  for (const id of keyIds) spawnSync('keyctl', ['unlink', id, '@u']);
  cleanup();
});

test('unbound keyslots: added by either tool, tested and dumped by the other; never open the volume', async () => {
  const img = image('ub.img');
  cs('-q', 'luksFormat', '--type', 'luks2', ...FAST_PBKDF, img, k1, '--key-slot', '5');
  // cryptmap adds, cryptsetup sees "(unbound)" and tests it
  await okCm(['luksAddKey', '-q', ...FAST_PBKDF, '--unbound', '-s', '72', '-S', '2', img], 'ub2\n');
  assert.match(dump(img), /^ {2}2: luks2 \(unbound\)$/m);
  assert.equal(csIn(['open', '-S2', '--test-passphrase', img], 'ub2\n').code, 0);
  assert.equal(csIn(['open', '--unbound', '--test-passphrase', img], 'ub2\n').code, 0);
  // cryptsetup adds with a given key, cryptmap tests and dumps it
  const kf = join(dir, 'uk');
  writeFileSync(kf, Buffer.alloc(64, 0x5a), { mode: 0o600 });
  assert.equal(
    csIn(
      ['luksAddKey', '-q', ...FAST_PBKDF, '--unbound', '-s', '512', '-S', '3', '--volume-key-file', kf, img],
      'ub3\n',
    ).code,
    0,
  );
  assert.equal((await cm(['open', '-S3', '--test-passphrase', img], 'ub3\n')).code, 0);
  assert.equal((await cm(['open', '--unbound', '--test-passphrase', img], 'ub3\n')).code, 0);
  const out = join(dir, 'uk.out');
  const d = await okCm(['luksDump', '-q', '--unbound', '-S3', '--volume-key-file', out, img], 'ub3\n');
  assert.match(d, /^Key bits:\t512$/m);
  assert.ok(readFileSync(out).equals(readFileSync(kf)));
  const hex = await okCm(['luksDump', '-q', '--unbound', '-S3', img], 'ub3\n');
  assert.equal(
    /Unbound Key:\t(.*)/.exec(hex)?.[1],
    /Unbound Key:\t(.*)/.exec(csIn(['luksDump', '-q', '--unbound', '-S3', img], 'ub3\n').out)?.[1],
  );
  // refusals, as cryptsetup
  const cases: [string[], string, RegExp][] = [
    [['luksAddKey', '-q', '--unbound', img], 'x\n', /^Key size is required with --unbound option\.$/m],
    [['luksAddKey', '-q', ...FAST_PBKDF, '-S5', '--unbound', '-s', '32', img], 'x\n', /Key slot 5 is full/],
    [['luksDump', '--unbound', img], '', /^Keyslot specification is required\.$/m],
    [['luksDump', '-q', '--unbound', '-S5', img], 'one\n', /^Keyslot 5 does not contain unbound key\.$/m],
    [['open', '-S2', img, 'x'], 'ub2\n', /Option --unbound|No usable keyslot is available\.|daemon/],
    [['open', '--unbound', img, 'x'], 'ub2\n', /^Option --unbound cannot be used without --test-passphrase\.$/m],
  ];
  for (const [args, input, msg] of cases) {
    const real = csIn(args, input);
    const r = await cm(args, input);
    assert.equal(r.code, real.code, `${args.join(' ')}: cryptmap ${r.code} (${r.err.trim()}), cryptsetup ${real.code}`);
    assert.match(r.err, msg, args.join(' '));
  }
  // An unbound passphrase cannot add a keyslot. (cryptsetup reports the last keyslot it tried in its
  // JSON order, here -ENOENT, exit 1; cryptmap's header keeps keyslots in numeric order and says exit 2.)
  const viaUnbound = await cm(['luksAddKey', '-q', ...FAST_PBKDF, img], 'ub2\nnew\n');
  assert.notEqual(viaUnbound.code, 0);
  assert.notEqual(csIn(['luksAddKey', '-q', ...FAST_PBKDF, img], 'ub2\nnew\n').code, 0);
  // luksChangeKey keeps it unbound; luksKillSlot removes it and its digest
  await okCm(['luksChangeKey', '-q', ...FAST_PBKDF, '-S', '2', img], 'ub2\nub2b\n');
  assert.match(dump(img), /^ {2}2: luks2 \(unbound\)$/m);
  assert.equal(csIn(['open', '-S2', '--test-passphrase', img], 'ub2b\n').code, 0);
  await okCm(['luksKillSlot', '-q', img, '2', '-d', k1]);
  assert.doesNotMatch(dump(img), /2: luks2/);
  assert.equal(Object.keys(json(img).digests).length, 2);
});

test('--keyslot-cipher/--keyslot-key-size: luksFormat, luksAddKey, luksChangeKey, luksConvertKey, unbound; cryptsetup opens them', async () => {
  const img = image('kc.img');
  const KC = ['--keyslot-cipher', 'aes-cbc-plain64', '--keyslot-key-size', '128'];
  await okCm(['luksFormat', '-q', '--type', 'luks2', img, k1, ...FAST_PBKDF, '--key-slot', '0', ...KC]);
  await okCm(['luksAddKey', '-q', img, '-d', k1, k2, ...FAST_PBKDF, '--key-slot', '1', ...KC]);
  await okCm(['luksAddKey', '-q', img, '-d', k1, k2, ...FAST_PBKDF, '--key-slot', '2']);
  await okCm(['luksChangeKey', img, ...FAST_PBKDF, '-d', k2, k1, '--key-slot', '2', ...KC]);
  await okCm(['luksAddKey', '-q', ...FAST_PBKDF, '--key-slot', '21', '--unbound', '-s', '72', ...KC, img], 'p3\n');
  await okCm(['luksAddKey', '-q', ...FAST_PBKDF, '--key-slot', '22', '--unbound', '-s', '72', img], 'p3\n');
  await okCm(['luksConvertKey', '--key-slot', '22', img, ...KC], 'p3\n');
  const j = json(img);
  for (const s of ['0', '1', '2', '21', '22']) {
    assert.equal(j.keyslots[s].area.encryption, 'aes-cbc-plain64', s);
    assert.equal(j.keyslots[s].area.key_size, 16, s);
  }
  assert.match(dump(img), /^ {2}0: luks2\n(.*\n){0,8}\tCipher: +aes-cbc-plain64\n\tCipher key: 128 bits$/m);
  assert.equal(run('cryptsetup', ['open', '--test-passphrase', '-d', k1, '-S', '0', img]).code, 0);
  assert.equal(run('cryptsetup', ['open', '--test-passphrase', '-d', k2, '-S', '1', img]).code, 0);
  assert.equal(run('cryptsetup', ['open', '--test-passphrase', '-d', k1, '-S', '2', img]).code, 0);
  assert.equal(csIn(['open', '--test-passphrase', '-S', '22', img], 'p3\n').code, 0);
  // and what cryptsetup wrote, cryptmap opens
  const other = image('kc2.img');
  cs('-q', 'luksFormat', '--type', 'luks2', other, k1, ...FAST_PBKDF, ...KC);
  assert.equal((await cm(['open', '--test-passphrase', '-d', k1, other])).code, 0);
  for (const [args, msg] of [
    [
      ['luksFormat', '-q', '--type', 'luks2', img, k1, ...FAST_PBKDF, '--keyslot-cipher', 'aes-cbc-plain64'],
      /^Options --keyslot-cipher and --keyslot-key-size must be used together\.$/m,
    ],
    [
      ['luksFormat', '-q', '--type', 'luks1', img, k1, ...FAST_PBKDF, ...KC],
      /^Keyslot encryption parameters can be set only for LUKS2 device\.$/m,
    ],
  ] as [string[], RegExp][]) {
    const r = await cm(args);
    assert.equal(r.code, 1, r.err);
    assert.match(r.err, msg);
  }
});

test('token add --key-description / unassign: the JSON cryptsetup writes, its checks and exit codes', async () => {
  const img = image('tk.img');
  cs('-q', 'luksFormat', '--type', 'luks2', ...FAST_PBKDF, img, k1);
  cs('luksAddKey', '-q', ...FAST_PBKDF, '-S', '4', '-d', k1, img, k2);
  const a = join(dir, 'tk-a.img');
  copyFileSync(img, a);
  for (const args of [
    ['--key-description', 'cm:t0', '--token-id', '3'],
    ['--key-description', 'cm:t1', '--key-slot', '4'],
    ['--key-description', 'cm:t2', '--unbound'],
  ]) {
    cs('token', 'add', a, ...args);
    await okCm(['token', 'add', img, ...args]);
  }
  assert.deepEqual(json(img).tokens, json(a).tokens);
  const cases: string[][] = [
    ['token', 'add', img, '--key-description', 'x', '--token-id', '3'],
    ['token', 'add', img, '--key-description', 'x', '--key-slot', '5'],
    ['token', 'add', img],
    ['token', 'add', img, '--key-description', 'x', '-S', '0', '--unbound'],
    ['token', 'remove', img, '--unbound', '--token-id', '0'],
    ['token', 'unassign', '--token-id', '3', img],
    ['token', 'unassign', '-S0', img],
    ['token', 'unassign', '--token-id', '3', '-S44', img],
    ['token', 'unassign', '--token-id', '44', '-S0', img],
    ['token', 'unassign', '--token-id', '7', '-S0', img],
    ['token', 'frob', img],
  ];
  for (const c of cases) {
    const real = run('cryptsetup', c);
    const r = await cm(c);
    assert.equal(r.code, real.code, `${c.join(' ')}: cryptmap ${r.code} (${r.err.trim()}), cryptsetup ${real.code}`);
    const msg = real.err
      .trim()
      .split('\n')
      .pop()!
      .replace(/^cryptsetup: /, '');
    assert.ok(r.err.includes(msg), `${c.join(' ')}: cryptsetup says "${msg}", cryptmap "${r.err.trim()}"`);
  }
  await okCm(['token', 'unassign', '--token-id', '3', '-S0', img]);
  cs('token', 'unassign', '--token-id', '3', '-S0', a);
  assert.deepEqual(json(img).tokens, json(a).tokens);
  const again = await cm(['token', 'unassign', '--token-id', '3', '-S0', img]);
  assert.equal(again.code, 1);
  assert.match(again.err, /^Token 3 is not assigned to keyslot 0\.$/m);
});

test('luks2-keyring tokens: cryptmap unlocks with the kernel keyring; luksAddKey --token-id / --new-token-id as cryptsetup ([43])', async () => {
  const t0 = `cryptmap-test:${process.pid}:t0`;
  const t1 = `cryptmap-test:${process.pid}:t1`;
  keyring(t0, 'pw1');
  keyring(t1, 'pwW');
  const img = image('kr.img');
  csIn(['luksFormat', '-q', '--type', 'luks2', ...FAST_PBKDF, img], 'pw1\n');
  cs('token', 'add', img, '--key-description', t0, '--token-id', '0', '-S0');
  await okCm(['token', 'add', img, '--key-description', t1, '--token-id', '1', '--unbound']);
  assert.equal((await cm(['open', '--token-only', '--test-passphrase', img])).code, 0);
  const tokOpens = (id: string) =>
    run('cryptsetup', ['open', '-q', '--test-passphrase', '--token-only', '--token-id', id, img]).code === 0;
  // pass token
  await okCm(['luksAddKey', '-q', '-S7', '--new-token-id', '1', ...FAST_PBKDF, img], 'pw1\n');
  assert.ok(tokOpens('1'));
  assert.deepEqual(json(img).tokens['1'].keyslots, ['7']);
  cs('luksKillSlot', '-q', img, '7');
  assert.ok(!tokOpens('1'));
  // file token (-S is the old keyslot when --new-key-slot is given)
  writeFileSync(k1, 'pw1');
  await okCm(['luksAddKey', '-q', ...FAST_PBKDF, '-S0', '--new-key-slot', '7', '--new-token-id', '1', '-d', k1, img]);
  assert.ok(tokOpens('1'));
  cs('luksKillSlot', '-q', img, '7');
  // token pass, token file, token token
  await okCm(['luksAddKey', '-q', ...FAST_PBKDF, '-S7', '--token-id', '0', img], 'pw4\npw4\n');
  assert.equal(csIn(['open', '-q', '--test-passphrase', '-S7', img], 'pw4\n').code, 0);
  await okCm(['luksAddKey', '-q', ...FAST_PBKDF, '-S8', '--token-id', '0', img, k2]);
  assert.equal(run('cryptsetup', ['open', '-q', '--test-passphrase', '-S8', '-d', k2, img]).code, 0);
  await okCm(['luksAddKey', '-q', ...FAST_PBKDF, '-S9', '--token-id', '0', '--new-token-id', '1', img]);
  assert.ok(tokOpens('1'));
  // what cryptmap cannot find in the keyring is exit 2, as cryptsetup
  const gone = image('kr2.img');
  csIn(['luksFormat', '-q', '--type', 'luks2', ...FAST_PBKDF, gone], 'pw1\n');
  cs('token', 'add', gone, '--key-description', `cryptmap-test:${process.pid}:nosuch`);
  const real = run('cryptsetup', ['open', '--token-only', '--test-passphrase', gone]).code;
  assert.equal((await cm(['open', '--token-only', '--test-passphrase', gone])).code, real);
});

test('--align-payload: the data offset cryptsetup computes (LUKS1, LUKS2, detached header); with --offset a usage error', async () => {
  const offsetOf = (img: string) => {
    const d = dump(img);
    const l1 = /Payload offset:\s+(\d+)/.exec(d);
    return l1 ? Number(l1[1]) * 512 : Number(/^\s+offset: (\d+) \[bytes\]/m.exec(d)![1]);
  };
  const cases: string[][] = [
    ['--type', 'luks1', '--align-payload', '4097'],
    ['--type', 'luks1', '--align-payload', '1'],
    ['--type', 'luks2', '--align-payload', '5'],
    ['--type', 'luks2', '--sector-size', '2048', '--align-payload', '32'],
    ['--type', 'luks2', '--sector-size', '4096', '--align-payload', '32768'],
  ];
  for (const c of cases) {
    const a = image('al-a.img', 40 << 20);
    const b = image('al-b.img', 40 << 20);
    cs('-q', 'luksFormat', ...FAST_PBKDF, ...c, a, k1);
    await okCm(['luksFormat', '-q', ...FAST_PBKDF, ...c, b, k1]);
    assert.equal(offsetOf(b), offsetOf(a), c.join(' '));
    if (c[1] === 'luks2')
      assert.equal(json(b).segments['0'].sector_size, json(a).segments['0'].sector_size, c.join(' '));
    assert.equal(run('cryptsetup', ['open', '--test-passphrase', '-d', k1, b]).code, 0);
  }
  const dev = image('al-d.img', 40 << 20);
  const hdr = join(dir, 'al-h.img');
  rmSync(hdr, { force: true });
  await okCm([
    'luksFormat',
    '-q',
    ...FAST_PBKDF,
    '--type',
    'luks2',
    dev,
    '--header',
    hdr,
    '--align-payload',
    '4096',
    k1,
  ]);
  assert.match(dump(hdr), new RegExp(`offset: ${4096 * 512} \\[bytes\\]`));
  const both = await cm([
    'luksFormat',
    '-q',
    ...FAST_PBKDF,
    '--type',
    'luks2',
    dev,
    '--align-payload',
    '16384',
    '--offset',
    '16384',
    k1,
  ]);
  assert.equal(both.code, 1);
  assert.match(both.err, /^Options --align-payload and --offset cannot be combined\.$/m);
});

test('PBKDF2 with whirlpool (LUKS1): cryptsetup-made headers open in cryptmap and the other way round', async () => {
  const a = image('wp-a.img', 4 << 20);
  cs('-q', 'luksFormat', '--type', 'luks1', '--hash', 'whirlpool', '--pbkdf-force-iterations', '1000', a, k1);
  assert.equal((await cm(['open', '--test-passphrase', '-d', k1, a])).code, 0);
  const b = image('wp-b.img', 4 << 20);
  await okCm(['luksFormat', '-q', '--type', 'luks1', '--hash', 'whirlpool', '--pbkdf-force-iterations', '1000', b, k1]);
  assert.match(dump(b), /Hash spec:\s+whirlpool/);
  assert.equal(run('cryptsetup', ['open', '--test-passphrase', '-d', k1, b]).code, 0);
});
