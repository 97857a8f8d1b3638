import assert from 'node:assert/strict';
import { mkdir, writeFile } from 'node:fs/promises';
import { testTempDir } from '../helpers/tmp.js';
import { join } from 'node:path';
import { test } from 'node:test';
import { parseCrypttab, plainParams, resolveCrypttabKey } from '../../src/activate/crypttab.js';
import { Secret } from '../../src/util/secret.js';

const SAMPLE = `# /etc/crypttab
# <name> <device> <key> <options>

home   UUID=2f9a1c3e-0000-4000-8000-000000000001  none   luks,discard,tries=0
data   /dev/disk/by-id/ata-X  /etc/keys/data.key  luks,header=/etc/hdr/data.img,keyfile-offset=16,keyfile-size=64,key-slot=1,nofail,noauto
swap   /dev/sda2  /dev/urandom  swap,cipher=aes-xts-plain64,size=512,sector-size=4096
scratch PARTLABEL=scratch /dev/urandom tmp=ext2,discard
legacy LABEL=old -  plain,cipher=aes-cbc-essiv:sha256,size=256,hash=sha256,offset=8,skip=16,read-only,_netdev,x-systemd.device-timeout=10s
	raw /dev/vdb
`;

test('parses fields, device forms, key sources and options', () => {
  const es = parseCrypttab(SAMPLE, '/etc/crypttab');
  assert.deepEqual(
    es.map((e) => [e.line, e.name, e.type]),
    [
      [4, 'home', 'luks'],
      [5, 'data', 'luks'],
      [6, 'swap', 'swap'],
      [7, 'scratch', 'tmp'],
      [8, 'legacy', 'plain'],
      [9, 'raw', 'luks'],
    ],
  );
  const [home, data, swap, scratch, legacy, raw] = es as [
    (typeof es)[0],
    (typeof es)[0],
    (typeof es)[0],
    (typeof es)[0],
    (typeof es)[0],
    (typeof es)[0],
  ];
  assert.deepEqual(home.device, { kind: 'uuid', value: '2f9a1c3e-0000-4000-8000-000000000001' });
  assert.deepEqual(home.key, { kind: 'prompt' });
  assert.deepEqual(home.flags, { allowDiscards: true });
  assert.equal(home.tries, 0);
  assert.deepEqual(data.key, { kind: 'file', path: '/etc/keys/data.key' });
  assert.equal(data.header, '/etc/hdr/data.img');
  assert.equal(data.keyfileOffset, 16);
  assert.equal(data.keyfileSize, 64);
  assert.equal(data.keySlot, 1);
  assert.ok(data.nofail && data.noauto);
  assert.deepEqual(swap.key, { kind: 'random', path: '/dev/urandom' });
  assert.deepEqual(plainParams(swap), {
    cipher: 'aes-xts-plain64',
    keySizeBits: 512,
    hash: 'plain',
    sectorSize: 4096,
    offsetSectors: 0,
    skipSectors: 0,
  });
  assert.deepEqual(scratch.device, { kind: 'partlabel', value: 'scratch' });
  assert.equal(scratch.tmpFilesystem, 'ext2');
  assert.deepEqual(legacy.device, { kind: 'label', value: 'old' });
  assert.ok(legacy.readonly);
  assert.deepEqual(legacy.ignored, ['_netdev', 'x-systemd.device-timeout=10s']);
  assert.deepEqual(plainParams(legacy), {
    cipher: 'aes-cbc-essiv:sha256',
    keySizeBits: 256,
    hash: 'sha256',
    sectorSize: 512,
    offsetSectors: 8,
    skipSectors: 16,
  });
  assert.equal(raw.tries, 3);
  assert.throws(() => plainParams(raw), /LUKS entry/);
});

test('systemd plain defaults: ripemd160 only for a typed passphrase', () => {
  const [typed, keyed] = parseCrypttab('a /dev/x none plain\nb /dev/y /k plain\n');
  assert.deepEqual(plainParams(typed!), {
    cipher: 'aes-cbc-essiv:sha256',
    keySizeBits: 256,
    hash: 'ripemd160',
    sectorSize: 512,
    offsetSectors: 0,
    skipSectors: 0,
  });
  assert.equal(plainParams(keyed!).hash, 'plain');
});

test('errors give file, line and the option, and name unsupported features', () => {
  const bad: [string, RegExp][] = [
    ['\n\nx /dev/a none tcrypt', /^ct:3: option 'tcrypt' is not supported: TrueCrypt/],
    ['x /dev/a none bitlk', /^ct:1: option 'bitlk' is not supported: BitLocker/],
    ['x /dev/a none luks,tpm2-device=auto', /option 'tpm2-device' is not supported: TPM2/],
    ['x /dev/a none fido2-device=auto', /'fido2-device' is not supported/],
    ['x /dev/a none pkcs11-uri=auto', /'pkcs11-uri' is not supported/],
    ['x /dev/a none frobnicate', /ct:1: unknown option 'frobnicate'/],
    ['x /dev/a none size=300', /multiple of 8/],
    ['x /dev/a none plain,sector-size=1000', /power of two/],
    ['x /dev/a none discard=1', /takes no value/],
    ['x /dev/a none cipher=', /needs a value/],
    ['x /dev/a /dev/urandom luks', /random key.*unreadable/],
    ['x /dev/a none luks,offset=8', /offset= applies to plain devices only/],
    ['x /dev/a none luks,plain', /contradict/],
    ['x /dev/a none swap,tmp', /contradict/],
    ['x /dev/a none plain,key-slot=1', /LUKS devices only/],
    ['x /dev/a none swap,read-only', /contradicts swap/],
    ['x relative none', /absolute path/],
    ['x ID=3 none', /only UUID=/],
    ['x /dev/a key', /key file 'key' must be an absolute path/],
    ['x /dev/a none luks extra', /5 fields/],
    ['x', /at least a name and a device/],
    ['a/b /dev/a', /name 'a\/b'/],
    ['x /dev/a\nx /dev/b', /ct:2: name 'x' was already used on line 1/],
    ['x /dev/a none plain,sector-size=4096,offset=3', /not a multiple of sector-size/],
    ['x /dev/a none tries=x', /unsigned number/],
    ['x /dev/a none luks,,discard', /empty option/],
  ];
  for (const [text, re] of bad) {
    assert.throws(
      () => parseCrypttab(text, 'ct'),
      (e: Error & { code?: string }) => {
        assert.equal(e.code, 'ECRYPTTAB', text);
        assert.match(e.message, re, text);
        return true;
      },
    );
  }
});

test('key resolution: key files with offset/size, random keys, key dirs, typed passphrases', async (t) => {
  const dir = testTempDir(t, 'cryptmap-ct-');
  const kf = join(dir, 'k');
  await writeFile(kf, Buffer.from(Array.from({ length: 100 }, (_, i) => i)), { mode: 0o600 });
  const text = [
    `lk /dev/a ${kf} luks,keyfile-offset=10,keyfile-size=5`,
    `lw /dev/a ${kf} luks`,
    `pl /dev/a ${kf} plain,size=256,keyfile-offset=1`,
    `sw /dev/a /dev/urandom swap,size=512`,
    'pp /dev/a none plain,hash=sha256',
    'lp /dev/a none luks',
    'kd /dev/a none plain,size=128',
    `short /dev/a ${kf} plain,size=512,keyfile-offset=60`,
    `big /dev/a ${join(dir, 'big')} luks`,
    `lwo /dev/a ${kf} luks,keyfile-offset=90`,
  ].join('\n');
  const e = Object.fromEntries(parseCrypttab(text, 'ct').map((x) => [x.name, x]));
  const hex = async (name: string, o = {}) => {
    const k = await resolveCrypttabKey(e[name]!, { keyDirs: [join(dir, 'keys.d')], ...o });
    return [k.kind, (k.kind === 'volumeKey' ? k.key : k.passphrase).expose().toString('hex')];
  };
  assert.deepEqual(await hex('lk'), ['passphrase', '0a0b0c0d0e']);
  assert.equal((await hex('lw'))[1]!.length, 200);
  assert.deepEqual(await hex('pl'), [
    'volumeKey',
    Buffer.from(Array.from({ length: 32 }, (_, i) => i + 1)).toString('hex'),
  ]);
  const r1 = await hex('sw');
  const r2 = await hex('sw');
  assert.equal(r1[1]!.length, 128);
  assert.notEqual(r1[1], r2[1]);
  const ask = async () => Secret.copyOf(Buffer.from('xxx'));
  assert.deepEqual(await hex('pp', { askPassphrase: ask }), [
    'volumeKey',
    'cd2eb0837c9b4c962c22d2ff8b5441b7b45805887f051d39bf133b583baf6860',
  ]);
  assert.deepEqual(await hex('lp', { askPassphrase: ask }), ['passphrase', '787878']);
  await assert.rejects(resolveCrypttabKey(e.lp!, { keyDirs: [] }), /needs a passphrase/);
  await mkdir(join(dir, 'keys.d'));
  await writeFile(join(dir, 'keys.d', 'kd.key'), Buffer.alloc(16, 0xaa), { mode: 0o600 });
  assert.deepEqual(await hex('kd'), ['volumeKey', 'aa'.repeat(16)]);
  await assert.rejects(
    resolveCrypttabKey(e.short!),
    /ct:8: short: key file .* has 40 bytes after keyfile-offset=60; 64 needed/,
  );
  // Whole-file reads: the rest after an offset; a file past the 8 MiB limit is refused.
  assert.deepEqual(await hex('lwo'), ['passphrase', '5a5b5c5d5e5f60616263']);
  await writeFile(join(dir, 'big'), Buffer.alloc(8192 * 1024 + 1, 1), { mode: 0o600 });
  await assert.rejects(
    resolveCrypttabKey(e.big!),
    /ct:9: big: key file .* is larger than 8388608 bytes; set keyfile-size=/,
  );
});

test('an NBD URI is a device (the NBD client opens it); a bad one is diagnosed', () => {
  const [e] = parseCrypttab(
    'vol nbd+unix:///data?socket=/run/nbd.sock /k luks,_netdev\nrem nbds://storage:10809/db none luks\n',
  );
  assert.deepEqual(e!.device, { kind: 'path', path: 'nbd+unix:///data?socket=/run/nbd.sock' });
  assert.throws(() => parseCrypttab('vol nbd+unix:///data /k luks\n', 'ct'), /ct:1: .*need \?socket=PATH/);
});
