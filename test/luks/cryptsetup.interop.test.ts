// Interop with cryptsetup 2.6 (Debian cryptsetup-bin) and qemu-img (qemu-utils), both directions
// (issue 4 §7). Cheap KDFs except where noted. Images live in a 0700 temp dir removed afterwards.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { chmodSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { before, test } from 'node:test';
import { cryptsetupVolumeKey, requireTool } from '../helpers/tools.js';
import { fileTempDir } from '../helpers/tmp.js';
import { FileDevice } from '../../src/blockdev/file.js';
import { createSectorCipher } from '../../src/engine/index.js';
import { openLuks } from '../../src/luks/index.js';
import { inProcessCli, interopTools } from './helpers.js';
import { FAST_PBKDF } from '../helpers/luks.js';

const dir = fileTempDir('cryptmap-luks-');
const { run, cs, image } = interopTools(() => dir);
const FAST_ARGON = [
  '--pbkdf',
  'argon2id',
  '--pbkdf-force-iterations',
  '4',
  '--pbkdf-memory',
  '32768',
  '--pbkdf-parallel',
  '1',
];

function keyFile(name: string, content: string | Buffer): string {
  const p = join(dir, name);
  writeFileSync(p, content, { mode: 0o600 });
  return p;
}
const cm = inProcessCli(dir);
function vkFromCryptsetup(img: string, key: string, extra: string[] = []): string {
  return cryptsetupVolumeKey(key, img, extra).toString('hex');
}
async function vkFromCryptmap(img: string, pass: Buffer, header?: string): Promise<string> {
  const dev = await FileDevice.open(header ?? img, { readOnly: true });
  try {
    const v = await openLuks(dev);
    const r = await v.unlock(pass);
    const hex = r.volumeKey.expose().toString('hex');
    r.volumeKey.dispose();
    return hex;
  } finally {
    await dev.close();
  }
}

before(() => {
  requireTool('cryptsetup');
});

test('cryptsetup-made LUKS2 volumes open in cryptmap with the same volume key', async () => {
  const key = keyFile('k1', 'pass one');
  const cases: [string, string[]][] = [
    ['xts4k', ['--cipher', 'aes-xts-plain64', '--sector-size', '4096']],
    ['xts512', ['--cipher', 'aes-xts-plain64', '--key-size', '256', '--sector-size', '512']],
    ['cbc', ['--cipher', 'aes-cbc-essiv:sha256', '--key-size', '256']],
    [
      'argon',
      [...FAST_ARGON.slice(0, 0), '--label', 'lbl', '--luks2-metadata-size', '64k', '--luks2-keyslots-size', '1m'],
    ],
  ];
  for (const [name, opts] of cases) {
    const img = image(`${name}.img`);
    const kdf = name === 'argon' ? FAST_ARGON : FAST_PBKDF;
    cs('luksFormat', '--batch-mode', '--type', 'luks2', ...kdf, '--key-file', key, ...opts, img);
    assert.equal(await vkFromCryptmap(img, Buffer.from('pass one')), vkFromCryptsetup(img, key), name);
  }
});

test('several keyslots with gaps, keyfile offset and size, argon2i, wrong passphrase', async () => {
  const key = keyFile('k2', 'first');
  const big = keyFile('k2big', Buffer.concat([Buffer.from('XXXX'), Buffer.from('secret-part'), Buffer.from('tail\n')]));
  const img = image('slots.img');
  cs('luksFormat', '--batch-mode', ...FAST_PBKDF, '--key-file', key, img);
  cs(
    'luksAddKey',
    '--batch-mode',
    ...FAST_PBKDF,
    '--key-file',
    key,
    '--key-slot',
    '5',
    '--new-keyfile',
    big,
    '--new-keyfile-offset',
    '4',
    '--new-keyfile-size',
    '11',
    img,
  );
  cs(
    'luksAddKey',
    '--batch-mode',
    '--pbkdf',
    'argon2i',
    '--pbkdf-force-iterations',
    '4',
    '--pbkdf-memory',
    '32768',
    '--pbkdf-parallel',
    '1',
    '--key-file',
    key,
    '--key-slot',
    '9',
    '--new-keyfile',
    keyFile('k9', 'argon-i'),
    img,
  );
  const vk = vkFromCryptsetup(img, key);
  assert.equal(await vkFromCryptmap(img, Buffer.from('secret-part')), vk);
  assert.equal(await vkFromCryptmap(img, Buffer.from('argon-i')), vk);
  const r = await cm(
    'open',
    '--test-passphrase',
    '--key-file',
    big,
    '--keyfile-offset',
    '4',
    '--keyfile-size',
    '11',
    img,
  );
  assert.equal(r.code, 0, r.err);
  const bad = await cm('open', '--test-passphrase', '--key-file', big, img);
  assert.equal(bad.code, 2);
  assert.equal(bad.err, 'No key available with this passphrase.\n');
});

test('cryptmap-made LUKS2 passes cryptsetup: dump, test-passphrase, addKey, repair; same luksDump text', async () => {
  const key = keyFile('k3', 'made by cryptmap');
  const img = image('cm2.img');
  let r = await cm(
    'luksFormat',
    '-q',
    '--type',
    'luks2',
    ...FAST_PBKDF,
    '--key-file',
    key,
    '--label',
    'cm',
    '--subsystem',
    'sys',
    img,
  );
  assert.equal(r.code, 0, r.err);
  r = await cm('luksAddKey', ...FAST_ARGON, '--key-file', key, '--key-slot', '3', img, keyFile('k3b', 'second'));
  assert.equal(r.code, 0, r.err);
  r = await cm(
    'token',
    'import',
    '--token-id',
    '2',
    '--json-file',
    keyFile('tok.json', '{"type":"luks2-keyring","keyslots":["3"],"key_description":"d"}'),
    img,
  );
  assert.equal(r.code, 0, r.err);
  r = await cm('config', '--priority', 'prefer', '--key-slot', '3', img);
  assert.equal(r.code, 0, r.err);
  const ours = await cm('luksDump', img);
  assert.equal(ours.out, cs('luksDump', img));
  const oursJson = await cm('luksDump', '--dump-json-metadata', img);
  assert.equal(oursJson.out, cs('luksDump', '--dump-json-metadata', img));
  cs('open', '--test-passphrase', '--key-file', key, img);
  cs('open', '--test-passphrase', '--key-file', join(dir, 'k3b'), img);
  cs('luksAddKey', '--batch-mode', ...FAST_PBKDF, '--key-file', key, '--new-keyfile', keyFile('k3c', 'third'), img);
  const rep = run('cryptsetup', ['repair', '--batch-mode', img]);
  assert.equal(rep.code, 0, rep.err);
  assert.equal(rep.err, '');
  assert.equal(await vkFromCryptmap(img, Buffer.from('third')), vkFromCryptsetup(img, key));
  // our dump of their changes, and their verification of ours
  assert.equal((await cm('luksDump', img)).out, cs('luksDump', img));
  const dk = await cm('luksDump', '--dump-volume-key', '-q', '--key-file', key, img);
  assert.equal(dk.out, cs('luksDump', '--dump-volume-key', '--batch-mode', '--key-file', key, img));
  // --volume-key-file as cryptsetup: a new owner-read-only file; an existing one is refused, untouched.
  const vkOurs = join(dir, 'vk-ours');
  const dkf = await cm('luksDump', '--dump-volume-key', '-q', '--key-file', key, '--volume-key-file', vkOurs, img);
  assert.equal(dkf.code, 0, dkf.err);
  assert.equal(statSync(vkOurs).mode & 0o777, 0o400);
  assert.equal(readFileSync(vkOurs).toString('hex'), vkFromCryptsetup(img, key));
  const existing = keyFile('vk-existing', 'old');
  chmodSync(existing, 0o644);
  const refused = await cm(
    'luksDump',
    '--dump-volume-key',
    '-q',
    '--key-file',
    key,
    '--volume-key-file',
    existing,
    img,
  );
  assert.equal(
    refused.code,
    run('cryptsetup', ['luksDump', '--dump-volume-key', '-q', '--key-file', key, '--volume-key-file', existing, img])
      .code,
  );
  assert.equal(refused.code, 1);
  assert.equal(readFileSync(existing, 'utf8'), 'old');
  // Same exit code and message as cryptsetup: an inactive --key-slot (-ENOENT), a backup over an
  // existing file, a restore from a missing, foreign or truncated backup (-EINVAL); luksDump
  // --dump-volume-key ignores --key-slot.
  const truncated = join(dir, 'backup-truncated');
  cs('luksHeaderBackup', img, '--header-backup-file', join(dir, 'backup-whole'));
  writeFileSync(truncated, readFileSync(join(dir, 'backup-whole')).subarray(0, 8192));
  for (const args of [
    ['luksHeaderRestore', '-q', img, '--header-backup-file', join(dir, 'no-such-backup')],
    ['luksHeaderRestore', '-q', img, '--header-backup-file', existing],
    ['luksHeaderRestore', '-q', img, '--header-backup-file', truncated],
    ['token', 'import', '--json-file', join(dir, 'no-such.json'), img],
    ['open', '--test-passphrase', '--key-slot', '30', '--key-file', key, img],
    ['luksHeaderBackup', img, '--header-backup-file', existing],
    ['luksDump', '--dump-volume-key', '-q', '--key-slot', '30', '--key-file', key, img],
  ]) {
    const ours = await cm(...args);
    const theirs = run('cryptsetup', args);
    assert.equal(ours.code, theirs.code, `${args[0]}: ours ${ours.err} theirs ${theirs.err}`);
    assert.equal(ours.err, theirs.err);
    assert.equal(ours.out, theirs.out);
  }
  r = await cm('luksChangeKey', ...FAST_PBKDF, '--key-file', key, img, keyFile('k3d', 'changed'));
  assert.equal(r.code, 0, r.err);
  cs('open', '--test-passphrase', '--key-file', join(dir, 'k3d'), img);
  assert.notEqual(run('cryptsetup', ['open', '--test-passphrase', '--key-file', key, img]).code, 0);
  r = await cm('luksUUID', '-q', '--uuid', '01234567-89ab-cdef-0123-456789abcdef', img);
  assert.equal(r.code, 0, r.err);
  assert.equal(cs('luksUUID', img), '01234567-89ab-cdef-0123-456789abcdef\n');
});

test('data written by cryptsetup reencrypt --encrypt decrypts in cryptmap', async () => {
  const plain = randomBytes(2 << 20);
  const img = join(dir, 'enc.img');
  writeFileSync(img, Buffer.concat([plain, Buffer.alloc(16 << 20)]));
  const key = keyFile('k4', 'data');
  cs(
    'reencrypt',
    '--encrypt',
    '--type',
    'luks2',
    '--reduce-device-size',
    '16M',
    '--batch-mode',
    ...FAST_PBKDF,
    '--key-file',
    key,
    img,
  );
  const dev = await FileDevice.open(img, { readOnly: true });
  try {
    const v = await openLuks(dev);
    const { volumeKey } = await v.unlock(Buffer.from('data'));
    const seg = v.dataSegment;
    const buf = Buffer.alloc(plain.length);
    await dev.read(seg.offsetBytes, buf);
    const c = createSectorCipher({ spec: seg.cipher, key: volumeKey.expose(), sectorBytes: seg.sectorBytes });
    c.decrypt(buf, 0n);
    c.dispose();
    volumeKey.dispose();
    assert.ok(buf.equals(plain));
  } finally {
    await dev.close();
  }
});

test('data written by cryptmap (detached header) reads back through cryptsetup reencrypt --decrypt', async () => {
  const key = keyFile('k5', 'detached');
  const hdr = join(dir, 'hdr.img');
  const data = image('data.img', 2 << 20);
  const r = await cm(
    'luksFormat',
    '-q',
    ...FAST_PBKDF,
    '--key-file',
    key,
    '--header',
    hdr,
    '--sector-size',
    '512',
    data,
  );
  assert.equal(r.code, 0, r.err);
  const plain = randomBytes(2 << 20);
  const dev = await FileDevice.open(hdr, { readOnly: true });
  const v = await openLuks(dev);
  const { volumeKey } = await v.unlock(Buffer.from('detached'));
  assert.equal(v.dataSegment.offsetBytes, 0);
  const enc = Buffer.from(plain);
  const c = createSectorCipher({
    spec: v.dataSegment.cipher,
    key: volumeKey.expose(),
    sectorBytes: v.dataSegment.sectorBytes,
  });
  c.encrypt(enc, 0n);
  c.dispose();
  volumeKey.dispose();
  await dev.close();
  writeFileSync(data, enc);
  cs('open', '--test-passphrase', '--key-file', key, '--header', hdr, data);
  cs('reencrypt', '--decrypt', '--batch-mode', '--force-offline-reencrypt', '--key-file', key, '--header', hdr, data);
  assert.ok(readFileSync(data).equals(plain));
});

test('LUKS1 both ways, and qemu-img LUKS1 images', async () => {
  const key = keyFile('k6', 'luks one');
  const a = image('l1a.img', 4 << 20);
  cs('luksFormat', '--batch-mode', '--type', 'luks1', '--pbkdf-force-iterations', '1000', '--key-file', key, a);
  assert.equal(await vkFromCryptmap(a, Buffer.from('luks one')), vkFromCryptsetup(a, key));
  const b = image('l1b.img', 4 << 20);
  let r = await cm('luksFormat', '-q', '--type', 'luks1', '--pbkdf-force-iterations', '1000', '--key-file', key, b);
  assert.equal(r.code, 0, r.err);
  r = await cm('luksAddKey', '--pbkdf-force-iterations', '1000', '--key-file', key, b, keyFile('k6b', 'two'));
  assert.equal(r.code, 0, r.err);
  cs('open', '--test-passphrase', '--key-file', join(dir, 'k6b'), b);
  assert.equal((await cm('luksDump', b)).out, cs('luksDump', b).replace(`for ${b}`, `for ${b}`));
  requireTool('qemu-img');
  const q = join(dir, 'q.img');
  let ok = false;
  for (let i = 0; i < 5 && !ok; i++) {
    rmSync(q, { force: true });
    ok =
      run('qemu-img', [
        'create',
        '-f',
        'luks',
        '--object',
        `secret,id=s0,file=${key}`,
        '-o',
        'key-secret=s0,iter-time=10',
        q,
        '8M',
      ]).code === 0;
  }
  assert.ok(ok, 'qemu-img create -f luks failed');
  const w = run('qemu-io', [
    '--object',
    `secret,id=s0,file=${key}`,
    '--image-opts',
    `driver=luks,key-secret=s0,file.filename=${q}`,
    '-c',
    'write -P 0xab 0 1M',
  ]);
  assert.equal(w.code, 0, w.err);
  const dev = await FileDevice.open(q, { readOnly: true });
  try {
    const v = await openLuks(dev);
    assert.equal(v.type, 'luks1');
    const { volumeKey } = await v.unlock(Buffer.from('luks one'));
    const buf = Buffer.alloc(1 << 20);
    await dev.read(v.dataSegment.offsetBytes, buf);
    const c = createSectorCipher({ spec: v.dataSegment.cipher, key: volumeKey.expose(), sectorBytes: 512 });
    c.decrypt(buf, 0n);
    c.dispose();
    volumeKey.dispose();
    assert.ok(buf.every((x) => x === 0xab));
  } finally {
    await dev.close();
  }
});
