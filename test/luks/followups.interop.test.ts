// Issue 4 follow-ups, with cryptsetup 2.6 as the oracle: unlock by token (--token-id, --token-only,
// --token-type; luks2-keyring without its key in the kernel keyring), tokens of unknown type kept byte-for-byte,
// load-time recovery of a damaged LUKS2 header copy (cryptsetup must find nothing left to repair),
// LUKS1 repair (same bytes as cryptsetup's), and no verb writing to a file that is not LUKS.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { before, test } from 'node:test';
import { seededBytes } from '../helpers/prng.js';
import { requireTool } from '../helpers/tools.js';
import { fileTempDir } from '../helpers/tmp.js';
import { FileDevice } from '../../src/blockdev/file.js';
import { parseLuksArgs } from '../../src/cli/commands/luks-common.js';
import { testPassphrase } from '../../src/cli/commands/luks-unlock.js';
import { main } from '../../src/cli/main.js';
import type { CliIO } from '../../src/cli/types.js';
import { type Luks2Volume, openLuks, unlockByToken } from '../../src/luks/index.js';
import { isCryptmapError } from '../../src/util/errors.js';
import { interopTools, Sink } from './helpers.js';
import { FAST_PBKDF } from '../helpers/luks.js';

const dir = fileTempDir('cryptmap-luks-fu-');
const { run, cs, image } = interopTools(() => dir);
let key = '';
const MD = 16384;

function io(input: string[] = [], tty = false): CliIO & { stdout: Sink; stderr: Sink } {
  const stdin = Readable.from(input) as unknown as CliIO['stdin'];
  if (tty) Object.assign(stdin, { isTTY: true });
  return {
    stdin,
    stdout: new Sink(),
    stderr: new Sink(),
    env: { ...process.env, CRYPTMAP_LOCK_DIR: join(dir, 'locks') },
  };
}
async function cm(
  argv: string[],
  opts: { input?: string[]; tty?: boolean } = {},
): Promise<{ code: number; out: string; err: string }> {
  const x = io(opts.input, opts.tty);
  const code = await main(argv, x);
  return { code, out: x.stdout.data, err: x.stderr.data };
}
/** `open --test-passphrase` through luks-common's testPassphrase (what open.ts calls), exit code as main reports it. */
async function cmTest(args: string[]): Promise<{ code: number; out: string; err: string }> {
  const x = io();
  const { values: v, positionals } = parseLuksArgs(['open', ...args]);
  let code: number;
  try {
    code = await testPassphrase(x, positionals[0]!, v);
  } catch (e) {
    if (!isCryptmapError(e)) throw e;
    x.stderr.write(`${e.message}\n`);
    code = e.exitCode;
  }
  return { code, out: x.stdout.data, err: x.stderr.data };
}
const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

before(() => {
  requireTool('cryptsetup');
  key = join(dir, 'key');
  writeFileSync(key, 'pw', { mode: 0o600 });
});

const UNKNOWN_TOKEN = '{"type":"example-plugin","keyslots":["0"],"nested":{"a":[1,"2",{"b":null}],"s":"x y"},"n":-3.5}';

test('open --token-*: same exit codes as cryptsetup; a luks2-keyring token whose key is not in the kernel keyring says so', async () => {
  const img = image('tok.img');
  cs('luksFormat', '--batch-mode', '--type', 'luks2', ...FAST_PBKDF, '--key-file', key, img);
  cs('token', 'add', '--key-description', 'cryptmap:test', img);
  assert.equal(run('cryptsetup', ['token', 'import', img], UNKNOWN_TOKEN).code, 0);
  const cases: string[][] = [
    ['--token-only'],
    ['--token-only', '--token-id', '0'],
    ['--token-only', '--token-id', '1'],
    ['--token-only', '--token-id', '5'],
    ['--token-only', '--token-type', 'luks2-keyring'],
    ['--token-only', '--token-type', 'example-plugin'],
    ['--token-only', '--token-type', 'nosuch'],
    ['--token-id', '0', '--key-file', key],
    ['--token-type', 'example-plugin', '--key-file', key],
    ['--key-file', key],
  ];
  for (const c of cases) {
    const oracle = run('cryptsetup', ['open', '--test-passphrase', ...c, img]).code;
    const ours = await cmTest([...c, img]);
    assert.equal(ours.code, oracle, `${c.join(' ')}: cryptmap ${ours.code} (${ours.err.trim()}), cryptsetup ${oracle}`);
  }
  const kr = await cmTest(['--token-only', '--token-id', '0', img]);
  assert.match(kr.err, /no key "cryptmap:test" of type user in the kernel keyring/);
  const none = await cmTest(['--token-only', '--token-id', '1', img]);
  assert.match(none.err, /No usable token is available\./);
  const typed = await cmTest(['--token-only', '--token-type', 'nosuch', img]);
  assert.match(typed.err, /No usable token \(type nosuch\) is available\./);
  // Falling back to the key file after the keyring token: the reason is still shown.
  const fb = await cmTest(['--token-id', '0', '--key-file', key, img]);
  assert.equal(fb.code, 0);
  assert.match(fb.err, /kernel keyring/);

  // Library level: the error codes the activation layer sees.
  const dev = await FileDevice.open(img, { readOnly: true });
  try {
    const vol = (await openLuks(dev)) as Luks2Volume;
    await assert.rejects(
      unlockByToken(vol, { tokenId: 0 }),
      (e) => isCryptmapError(e) && e.code === 'ETOKENKEYRING' && e.exitCode === 2,
    );
    await assert.rejects(
      unlockByToken(vol, { tokenType: 'example-plugin' }),
      (e) => isCryptmapError(e) && e.code === 'ENOTOKEN' && e.exitCode === 1,
    );
    await assert.rejects(
      unlockByToken(vol, { tokenId: 0, keySlot: 3 }),
      (e) => isCryptmapError(e) && e.code === 'ENOTOKEN',
    );
  } finally {
    await dev.close();
  }
});

test('a token of unknown type survives import and every key change byte for byte', async () => {
  const img = image('keep.img');
  const k2 = join(dir, 'k2');
  const k3 = join(dir, 'k3');
  writeFileSync(k2, 'second', { mode: 0o600 });
  writeFileSync(k3, 'third', { mode: 0o600 });
  cs('luksFormat', '--batch-mode', '--type', 'luks2', ...FAST_PBKDF, '--key-file', key, img);
  const tokFile = join(dir, 'tok.json');
  writeFileSync(tokFile, UNKNOWN_TOKEN);
  const want = JSON.stringify(JSON.parse(UNKNOWN_TOKEN));
  assert.equal((await cm(['token', 'import', '--json-file', tokFile, '--token-id', '3', img])).code, 0);
  const exported = async () => {
    const r = await cm(['token', 'export', '--token-id', '3', img]);
    assert.equal(r.code, 0, r.err);
    return r.out;
  };
  assert.equal(await exported(), want);
  const steps: string[][] = [
    ['luksAddKey', ...FAST_PBKDF, '--key-file', key, img, k2],
    ['luksChangeKey', ...FAST_PBKDF, '--key-file', key, img, k3],
    ['luksKillSlot', '-q', '--key-file', k3, img, '1'],
    ['luksAddKey', ...FAST_PBKDF, '--key-file', k3, '--key-slot', '5', img, k2],
    ['config', '--label', 'kept', '--subsystem', 'tokens', img],
    ['config', '--priority', 'prefer', '--key-slot', '5', img],
    ['luksUUID', '-q', '--uuid', '12345678-1234-1234-1234-123456789abc', img],
  ];
  for (const s of steps) {
    const r = await cm(s);
    assert.equal(r.code, 0, `${s.join(' ')}: ${r.err}`);
    assert.equal(await exported(), want, `after ${s[0]}`);
    assert.equal(cs('token', 'export', '--token-id', '3', img), want, `cryptsetup export after ${s[0]}`);
  }
  // Removing the last keyslot a token names unassigns it, as cryptsetup does; the rest is unchanged.
  assert.equal((await cm(['luksKillSlot', '-q', '--key-file', k2, img, '0'])).code, 0);
  assert.deepEqual(JSON.parse(await exported()), { ...JSON.parse(UNKNOWN_TOKEN), keyslots: [] });
  assert.equal(run('cryptsetup', ['luksDump', img]).code, 0);
});

/** Flip a checksum byte of the copy at `off`, or roll it back to an older copy. */
function damage(
  img: string,
  how: 'primary-csum' | 'secondary-csum' | 'primary-zero' | 'secondary-stale' | 'primary-stale',
  older?: Buffer,
): void {
  const b = readFileSync(img);
  if (how === 'primary-csum') b[448]! ^= 0x5a;
  if (how === 'secondary-csum') b[MD + 448]! ^= 0x5a;
  if (how === 'primary-zero') b.fill(0, 0, 4096);
  if (how === 'secondary-stale') older!.copy(b, MD, MD, 2 * MD);
  if (how === 'primary-stale') older!.copy(b, 0, 0, MD);
  writeFileSync(img, b);
}
const seqid = (b: Buffer, off: number) => b.readBigUInt64BE(off + 16);
const salt = (b: Buffer, off: number) => b.subarray(off + 104, off + 168).toString('hex');

test('a damaged or stale LUKS2 header copy is rewritten from the good one on load; cryptsetup then repairs nothing', async () => {
  const base = image('rec.img');
  cs('luksFormat', '--batch-mode', '--type', 'luks2', ...FAST_PBKDF, '--key-file', key, base);
  const older = readFileSync(base);
  cs('config', '--label', 'newer', base);
  const cases = ['primary-csum', 'secondary-csum', 'primary-zero', 'secondary-stale', 'primary-stale'] as const;
  const verbs: { name: string; run: (img: string) => Promise<{ code: number; err: string }> }[] = [
    { name: 'luksDump', run: (img) => cm(['luksDump', img]) },
    { name: 'open --test-passphrase', run: (img) => cmTest(['--key-file', key, img]) },
    { name: 'luksUUID', run: (img) => cm(['luksUUID', img]) },
    { name: 'luksAddKey', run: (img) => cm(['luksAddKey', ...FAST_PBKDF, '--key-file', key, img, key]) },
  ];
  for (const how of cases) {
    for (const verb of verbs) {
      const img = join(dir, `rec-${how}.img`);
      copyFileSync(base, img);
      damage(img, how, older);
      const before = readFileSync(img);
      const r = await verb.run(img);
      assert.equal(r.code, 0, `${how} ${verb.name}: ${r.err}`);
      const after = readFileSync(img);
      const label = `${how} / ${verb.name}`;
      // Header copies valid, cryptsetup has nothing left to recover: running it on a copy changes no byte.
      const probe = join(dir, 'probe.img');
      copyFileSync(img, probe);
      assert.equal(run('cryptsetup', ['luksDump', probe]).code, 0, label);
      assert.ok(readFileSync(probe).equals(after), `${label}: cryptsetup still had to repair the header`);
      assert.equal(seqid(after, 0), seqid(after, MD), label);
      if (verb.name !== 'luksAddKey') {
        // The good copy is untouched; the rewritten one has a fresh salt and the good one's seqid.
        const goodOff = how.startsWith('primary') ? MD : 0;
        const badOff = MD - goodOff;
        assert.ok(
          after.subarray(goodOff, goodOff + MD).equals(before.subarray(goodOff, goodOff + MD)),
          `${label}: good copy changed`,
        );
        assert.notEqual(salt(after, badOff), salt(after, goodOff), `${label}: salt not fresh`);
        assert.notEqual(salt(after, badOff), salt(before, badOff), `${label}: salt not fresh`);
        assert.equal(seqid(after, badOff), seqid(before, goodOff), label);
        assert.ok(after.subarray(2 * MD).equals(before.subarray(2 * MD)), `${label}: keyslot or data area changed`);
      }
      assert.equal(run('cryptsetup', ['open', '--test-passphrase', '--key-file', key, img]).code, 0, label);
    }
  }
});

test('load-time recovery writes nothing with --readonly, nor over a primary area holding another format (repair does)', async () => {
  const base = image('ro.img');
  cs('luksFormat', '--batch-mode', '--type', 'luks2', ...FAST_PBKDF, '--key-file', key, base);
  const img = join(dir, 'ro-damaged.img');
  copyFileSync(base, img);
  damage(img, 'primary-csum');
  const before = sha(readFileSync(img));
  assert.equal((await cm(['luksDump', '--readonly', img])).code, 0);
  assert.equal((await cmTest(['--readonly', '--key-file', key, img])).code, 0);
  assert.equal(sha(readFileSync(img)), before);
  // An ext4 superblock magic inside the damaged primary area: left alone (explicit repair only).
  const b = readFileSync(img);
  b.fill(0, 0, 4096);
  b.writeUInt16LE(0xef53, 0x438);
  writeFileSync(img, b);
  const amb = sha(b);
  assert.equal((await cm(['luksDump', img])).code, 0);
  assert.equal(sha(readFileSync(img)), amb);
  // The explicit repair (confirmed with -q) does overwrite it; cryptsetup then finds nothing to repair.
  assert.equal((await cm(['repair', '-q', img])).code, 0);
  const repaired = readFileSync(img);
  assert.notEqual(sha(repaired), amb);
  const probe = join(dir, 'ro-probe.img');
  copyFileSync(img, probe);
  assert.equal(run('cryptsetup', ['luksDump', probe]).code, 0);
  assert.ok(readFileSync(probe).equals(repaired), 'cryptsetup still had to repair the header');
  // A healthy LUKS2 header: repair writes nothing, as cryptsetup's.
  const healthy = sha(readFileSync(base));
  const r = await cm(['repair', '-q', '-v', base]);
  assert.equal(r.code, 0);
  assert.match(r.err, /No known problems detected for LUKS header\./);
  assert.equal(sha(readFileSync(base)), healthy);
});

test('LUKS1 repair: the same bytes as cryptsetup repair (hash lower-casing, damaged inactive keyslot)', async () => {
  const base = image('l1.img', 4 << 20);
  cs('luksFormat', '--batch-mode', '--type', 'luks1', '--pbkdf-force-iterations', '1000', '--key-file', key, base);
  const mutations: Record<string, (b: Buffer) => void> = {
    'upper-case hash': (b) => b.write('SHA256', 72, 'latin1'),
    'inactive slot offset': (b) => b.writeUInt32BE(9999, 208 + 3 * 48 + 40),
    'inactive slot stripes': (b) => b.writeUInt32BE(4001, 208 + 5 * 48 + 44),
    both: (b) => {
      b.write('SHA256', 72, 'latin1');
      b.writeUInt32BE(12345, 208 + 7 * 48 + 40);
    },
  };
  for (const [name, mutate] of Object.entries(mutations)) {
    const b = readFileSync(base);
    mutate(b);
    const ours = join(dir, 'l1-ours.img');
    const theirs = join(dir, 'l1-theirs.img');
    writeFileSync(ours, b);
    writeFileSync(theirs, b);
    const oracle = run('cryptsetup', ['repair', '--batch-mode', theirs]).code;
    const r = await cm(['repair', '--batch-mode', ours]);
    assert.equal(r.code, oracle, `${name}: ${r.err}`);
    assert.ok(readFileSync(ours).equals(readFileSync(theirs)), `${name}: repaired bytes differ from cryptsetup's`);
    assert.equal(run('cryptsetup', ['open', '--test-passphrase', '--key-file', key, ours]).code, 0, name);
  }
  // An intact header: nothing written.
  const intact = join(dir, 'l1-intact.img');
  copyFileSync(base, intact);
  assert.equal((await cm(['repair', '--batch-mode', intact])).code, 0);
  assert.ok(readFileSync(intact).equals(readFileSync(base)));
});

test('no verb writes to a file that is not LUKS (batch mode, key files given); luksFormat/restore ask first', async () => {
  // Deterministic non-LUKS content: an xorshift stream with an ext4 magic and a stray "LUKS" text.
  const size = 8 << 20;
  const b = Buffer.alloc(size);
  seededBytes(64 << 10, 0x9e3779b9).copy(b);
  b.writeUInt16LE(0xef53, 0x438);
  b.write('LUKS is not here', 20000, 'latin1');
  const img = join(dir, 'plain.img');
  writeFileSync(img, b);
  const want = sha(b);
  const backup = join(dir, 'hdr.bak');
  const luks = image('donor.img');
  cs('luksFormat', '--batch-mode', '--type', 'luks2', ...FAST_PBKDF, '--key-file', key, luks);
  cs('luksHeaderBackup', '--header-backup-file', backup, luks);
  const tokFile = join(dir, 'plain-tok.json');
  writeFileSync(tokFile, UNKNOWN_TOKEN);
  const verbs: string[][] = [
    ['isLuks', img],
    ['isLuks', '-v', '--type', 'luks2', img],
    ['luksDump', img],
    ['luksDump', '--dump-json-metadata', img],
    ['luksDump', '-q', '--dump-volume-key', '--key-file', key, img],
    ['luksDump', '--json', img],
    ['luksUUID', img],
    ['luksUUID', '-q', '--uuid', '12345678-1234-1234-1234-123456789abc', img],
    ['luksAddKey', '-q', ...FAST_PBKDF, '--key-file', key, img, key],
    ['luksChangeKey', '-q', ...FAST_PBKDF, '--key-file', key, img, key],
    ['luksRemoveKey', '-q', '--key-file', key, img],
    ['luksKillSlot', '-q', img, '0'],
    ['luksHeaderBackup', '--header-backup-file', join(dir, 'never.bak'), img],
    ['config', '--label', 'x', img],
    ['config', '--priority', 'prefer', '--key-slot', '0', img],
    ['repair', '-q', img],
    ['erase', '-q', img],
    ['luksErase', '-q', img],
    ['token', 'import', '--json-file', tokFile, img],
    ['token', 'export', '--token-id', '0', img],
    ['token', 'remove', '--token-id', '0', img],
  ];
  for (const argv of verbs) {
    const r = await cm(argv);
    assert.notEqual(r.code, 0, `${argv.join(' ')} succeeded on a non-LUKS file`);
    assert.equal(sha(readFileSync(img)), want, `${argv.join(' ')} wrote to a non-LUKS file`);
  }
  for (const args of [
    ['--key-file', key, img],
    ['--token-only', img],
  ]) {
    const r = await cmTest(args);
    assert.notEqual(r.code, 0);
    assert.equal(sha(readFileSync(img)), want, `open --test-passphrase ${args.join(' ')} wrote to a non-LUKS file`);
  }
  // The verbs that do overwrite ask on a terminal; anything but YES aborts without a write.
  for (const argv of [
    ['luksFormat', '--type', 'luks2', ...FAST_PBKDF, '--key-file', key, img],
    ['luksHeaderRestore', '--header-backup-file', backup, img],
  ]) {
    const r = await cm(argv, { input: ['no\n'], tty: true });
    assert.equal(r.code, 1, `${argv[0]}: ${r.err}`);
    assert.equal(sha(readFileSync(img)), want, `${argv[0]} wrote without confirmation`);
  }
});

test('luksConvertKey rewrites a keyslot under another PBKDF (argon2id -> pbkdf2 for bootloaders, and back); cryptsetup agrees', async () => {
  const img = image('convert.img');
  cs(
    'luksFormat',
    '-q',
    '--type',
    'luks2',
    '--pbkdf',
    'argon2id',
    '--pbkdf-memory',
    '32768',
    '--pbkdf-force-iterations',
    '4',
    '--pbkdf-parallel',
    '1',
    '--key-file',
    key,
    img,
  );
  const slot0 = (dump: string) => dump.slice(dump.indexOf('Keyslots:'), dump.indexOf('Tokens:'));
  assert.match(slot0(cs('luksDump', img)), /PBKDF:\s+argon2id/);
  let r = await cm(['luksConvertKey', '-v', ...FAST_PBKDF, '--key-file', key, img]);
  assert.equal(r.code, 0, r.err);
  assert.match(r.out, /Key slot 0 created\.\nCommand successful\./);
  const dump = slot0(cs('luksDump', img));
  assert.match(dump, /PBKDF:\s+pbkdf2/);
  assert.match(dump, /Iterations:\s+1000/);
  cs('open', '--test-passphrase', '--key-file', key, img);
  // And back, on an explicit keyslot.
  r = await cm([
    'luksConvertKey',
    '--pbkdf',
    'argon2id',
    '--pbkdf-memory',
    '32768',
    '--pbkdf-force-iterations',
    '4',
    '--key-slot',
    '0',
    '--key-file',
    key,
    img,
  ]);
  assert.equal(r.code, 0, r.err);
  assert.match(slot0(cs('luksDump', img)), /PBKDF:\s+argon2id/);
  cs('open', '--test-passphrase', '--key-file', key, img);
  // Wrong passphrase: exit 2, nothing changed. Inactive keyslot, LUKS1: exit 1 with cryptsetup's messages.
  const wrong = join(dir, 'wrong-convert');
  writeFileSync(wrong, 'nope', { mode: 0o600 });
  const before = readFileSync(img);
  r = await cm(['luksConvertKey', ...FAST_PBKDF, '--key-file', wrong, img]);
  assert.equal(r.code, 2);
  assert.ok(readFileSync(img).equals(before), 'a refused conversion writes nothing');
  r = await cm(['luksConvertKey', ...FAST_PBKDF, '--key-slot', '5', '--key-file', key, img]);
  assert.equal(r.code, 1);
  assert.match(r.err, /Keyslot 5 is not active\./);
  const l1 = image('convert1.img');
  cs('luksFormat', '-q', '--type', 'luks1', ...FAST_PBKDF, '--key-file', key, l1);
  r = await cm(['luksConvertKey', ...FAST_PBKDF, '--key-file', key, l1]);
  assert.equal(r.code, 1);
  assert.match(r.err, /is not a valid LUKS2 device\./);
});
