// Fuzz targets for the text parsers: cipher spec, dm table (syntax and target constructors),
// manifest, crypttab, control-socket request lines. Oracle in harness.ts.
import { test } from 'node:test';
import fc from 'fast-check';
import { parseCrypttab, plainParams } from '../../src/activate/crypttab.js';
import { parseRequest } from '../../src/control/protocol.js';
import { checkKeyBytes, parseCipherSpec } from '../../src/crypto/cipher-spec.js';
import { parseTable } from '../../src/dm/table.js';
import { parseManifest } from '../../src/reconciler/manifest.js';
import { memRegistry } from '../dm/helpers.js';
import { FAULT_TARGETS } from '../dm/fault-target.js';
import { type FuzzFn, fuzz, junk, textMutations } from './harness.js';

const T = { timeout: 120_000 };

export const CIPHER_SAMPLES = [
  'aes-xts-plain64',
  'aes-cbc-essiv:sha256',
  'aes-cbc-plain',
  'aes-ecb',
  'cipher_null-ecb',
  'capi:xts(aes)-plain64',
  'aes-cbc-benbi',
  'aes-xts-plain64be',
  'aes-cbc-null',
];
const CIPHER_ODD = [
  '',
  '-',
  ':',
  'essiv',
  'sha256',
  'plain64',
  'xts',
  'capi',
  '(',
  ')',
  'aes',
  '\0',
  '%',
  'é',
  'a'.repeat(300),
];

export const cipherSpecTarget: FuzzFn = (b) => {
  const spec = parseCipherSpec(b.toString('utf8'));
  for (const n of [0, 16, 32, 64, 65]) {
    try {
      checkKeyBytes(spec, n);
    } catch (e) {
      if (!(e instanceof Error) || e.name !== 'CryptmapError') throw e;
    }
  }
};
export const cipherSpecArb = fc.oneof(
  ...CIPHER_SAMPLES.map((s) => textMutations(s, CIPHER_ODD)),
  junk(),
  fc.constantFrom(...CIPHER_SAMPLES).map((s) => Buffer.from(s)),
);

test('fuzz: cipher spec parser', T, async () => {
  await fuzz('cipher-spec', cipherSpecArb, cipherSpecTarget, { seed: 0xc1, numRuns: 1500 });
});

const KEY128 = '0123456789abcdef'.repeat(8);
export const TABLE_SAMPLES = [
  '0 2048 linear /mem/a 0\n2048 2048 zero\n',
  `0 4096 crypt aes-xts-plain64 ${KEY128} 0 /mem/a 0 2 allow_discards sector_size:4096\n`,
  '0 1024 striped 2 8 /mem/a 0 /mem/b 0\n1024 8 error\n',
  '# comment\n0 16 fault /mem/a 0 fail_flush bad=0+1 capacity=8 rate=0.5,1,tear\n',
  `0 2048 crypt aes-cbc-essiv:sha256 ${KEY128.slice(0, 64)} 7 /mem/b 8 1 iv_large_sectors\n`,
];
const TABLE_ODD = [
  '0',
  '1',
  '-1',
  '18446744073709551615',
  '9007199254740993',
  '4096',
  'crypt',
  'linear',
  'striped',
  'zero',
  '\t',
  '\n',
  ':64:logon:x',
  '/mem/a',
  '/mem/zz',
  '253:0',
  'sector_size:',
  '99',
];

let nameSeq = 0;
const { registry } = memRegistry({ a: 4 << 20, b: 4 << 20 }, { targets: FAULT_TARGETS });

export const dmTableTarget: FuzzFn = async (b) => {
  const text = b.toString('utf8');
  parseTable(text);
  const name = `fz${nameSeq++}`;
  await registry.create(name, { table: text });
  const dev = registry.open(name);
  try {
    const buf = Buffer.alloc(512);
    await dev.read(0, buf).catch(() => undefined);
  } finally {
    await dev.close();
    await registry.remove(name, { force: true });
  }
};
export const dmTableArb = fc.oneof(...TABLE_SAMPLES.map((s) => textMutations(s, TABLE_ODD)), junk());

test('fuzz: dm table parser and target constructors', T, async () => {
  await fuzz('dm-table', dmTableArb, dmTableTarget, { seed: 0xd3, numRuns: 600 });
});

export const MANIFEST_SAMPLE = `version: 1
keyService:
  address: embedded
services:
  - name: web
    volumes:
      - name: cache
        size: 64M
        class: ephemeral
        filesystem: ext4
        mountpoint: /srv/web/cache
  - name: db
    volumes:
      - name: data
        size: 128M
        class: persistent
        cipher: aes-xts-plain64
        keySize: 512
        sectorSize: 4096
swap:
  - name: swap0
    size: 64M
`;
const YAML_ODD = [
  '',
  ' ',
  '\n',
  '- ',
  ': ',
  '&a',
  '*a',
  '<<: *a',
  '!!binary',
  '{',
  '[',
  '"',
  "'",
  '~',
  'null',
  '1e400',
  '0x10',
  '-1',
  '16E',
  '64M',
  '0.5G',
  'ext4',
  'none',
  '/',
  '..',
  'version',
  'services',
  'volumes',
  '? ',
];
export const manifestTarget: FuzzFn = (b) => {
  parseManifest(b.toString('utf8'), 'fuzz.yaml');
};
export const manifestArb = fc.oneof(textMutations(MANIFEST_SAMPLE, YAML_ODD), junk());

test('fuzz: manifest parser', T, async () => {
  await fuzz('manifest', manifestArb, manifestTarget, { seed: 0x3a, numRuns: 400 });
});

export const CRYPTTAB_SAMPLE = `# /etc/crypttab
home   UUID=2f9a1c3e-0000-4000-8000-000000000001  none   luks,discard,tries=0
data   /dev/disk/by-id/ata-X  /etc/keys/data.key  luks,header=/etc/hdr/data.img,keyfile-offset=16,keyfile-size=64,key-slot=1,nofail
swap   /dev/sda2  /dev/urandom  swap,cipher=aes-xts-plain64,size=512,sector-size=4096
scratch PARTLABEL=scratch /dev/urandom tmp=ext2,discard
legacy LABEL=old -  plain,cipher=aes-cbc-essiv:sha256,size=256,hash=sha256,offset=8,skip=16,read-only
`;
const CRYPTTAB_ODD = [
  '',
  ',',
  '=',
  'UUID=',
  'size=',
  'offset=',
  '-1',
  '99999999999999999999',
  'cipher=',
  'plain',
  'luks',
  'tcrypt',
  'bitlk',
  'keyfile-size=0',
  'sector-size=3',
  '\\',
  '"',
  "'",
  '\\x41',
];
export const crypttabTarget: FuzzFn = (b) => {
  for (const e of parseCrypttab(b.toString('utf8'), 'fuzz')) {
    if (e.type === 'plain' || e.type === 'swap' || e.type === 'tmp') plainParams(e);
  }
};
export const crypttabArb = fc.oneof(textMutations(CRYPTTAB_SAMPLE, CRYPTTAB_ODD), junk());

test('fuzz: crypttab parser', T, async () => {
  await fuzz('crypttab', crypttabArb, crypttabTarget, { seed: 0x7ab, numRuns: 600 });
});

const REQ_SAMPLES = [
  '{"id":1,"op":"volume.status","args":{"name":"x"}}',
  '{"id":2,"op":"dm.create","args":{"name":"a","table":"0 8 zero"}}',
  '{"id":3,"op":"daemon.ping"}',
];
const JSON_ODD = [
  '{',
  '}',
  '[',
  ']',
  'null',
  '1e999',
  '-0',
  '"__proto__"',
  '"constructor"',
  '9007199254740993',
  '"\\u0000"',
  'true',
  ',',
  ':',
];
export const controlLineTarget: FuzzFn = (b) => {
  parseRequest(b.toString('utf8'));
};
export const controlLineArb = fc.oneof(
  ...REQ_SAMPLES.map((s) => textMutations(s, JSON_ODD)),
  fc.jsonValue().map((v) => Buffer.from(JSON.stringify(v) ?? 'null')),
  fc
    .record({ id: fc.oneof(fc.integer(), fc.double(), fc.string()), op: fc.string(), args: fc.jsonValue() })
    .map((v) => Buffer.from(JSON.stringify(v))),
  junk(),
);

test('fuzz: control request line parser', T, async () => {
  await fuzz('control-line', controlLineArb, controlLineTarget, { seed: 0xc0, numRuns: 800 });
});
