// Malformed LUKS2 headers, generated at test time from a valid image that cryptsetup makes, after the
// categories of cryptsetup's tests/generators + tests/luks2-validation-test (R = must load, F = must be
// rejected, never crash). Every case is also run through the real `cryptsetup luksDump` as the
// oracle, and cryptmap must agree with both the expectation and the oracle.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Readable, Writable } from 'node:stream';
import { before, test } from 'node:test';
import { requireTool } from '../helpers/tools.js';
import { fileTempDir } from '../helpers/tmp.js';
import { main } from '../../src/cli/main.js';
import { FAST_PBKDF } from '../helpers/luks.js';
import { jsonOf, setJson } from './helpers.js';

// biome-ignore lint/suspicious/noExplicitAny: test mutations poke at arbitrary JSON
type J = Record<string, any>;
type Case = {
  name: string;
  expect: 'R' | 'F';
  json?: (j: J) => void;
  raw?: (img: Buffer) => void;
  text?: (t: string) => Buffer;
  keepHdr1?: boolean;
};

const MD = 16384;
const dir = fileTempDir('cryptmap-gen-');
let base: Buffer;

const seg = (j: J) => j.segments['0'];
const CASES: Case[] = [
  { name: 'invalid-checksum-hdr0', expect: 'R', raw: (b) => (b[448]! ^= 1), keepHdr1: true },
  { name: 'invalid-checksum-hdr1', expect: 'R', raw: (b) => (b[MD + 448]! ^= 1), keepHdr1: true },
  {
    name: 'invalid-checksum-both-hdrs',
    expect: 'F',
    raw: (b) => {
      b[448]! ^= 1;
      b[MD + 448]! ^= 1;
    },
    keepHdr1: true,
  },
  { name: 'corrupted-hdr0-with-correct-chks', expect: 'R', text: () => Buffer.from('{"keyslots":'), keepHdr1: true },
  {
    name: 'pbkdf2-leftover-params',
    expect: 'R',
    json: (j) => Object.assign(j.keyslots['0'].kdf, { time: 4, memory: 1024 }),
  },
  {
    name: 'argon2-leftover-params',
    expect: 'R',
    json: (j) => Object.assign(j.keyslots['2'].kdf, { hash: 'sha256', iterations: 1000 }),
  },
  { name: 'non-null-byte-beyond-json0', expect: 'F', text: (t) => Buffer.from(`${t}X`) },
  {
    name: 'non-null-bytes-beyond-json0',
    expect: 'F',
    text: (t) => Buffer.concat([Buffer.from(t), Buffer.alloc(100), Buffer.from('junk')]),
  },
  { name: 'missing-trailing-null-byte-json0', expect: 'F', text: (t) => Buffer.from(t.padEnd(MD - 4096, ' ')) },
  { name: 'invalid-opening-char-json0', expect: 'F', text: (t) => Buffer.from(` ${t}`) },
  { name: 'invalid-object-type-json0', expect: 'F', json: (j) => (j.keyslots = []) },
  {
    name: 'overlapping-areas-c0',
    expect: 'F',
    json: (j) => (j.keyslots['1'].area.offset = j.keyslots['0'].area.offset),
  },
  {
    name: 'overlapping-areas-c1',
    expect: 'F',
    json: (j) => (j.keyslots['1'].area.offset = String(Number(j.keyslots['0'].area.offset) + 4096)),
  },
  { name: 'area-in-json-hdr-space', expect: 'F', json: (j) => (j.keyslots['0'].area.offset = '16384') },
  { name: 'missing-keyslot-referenced-in-digest', expect: 'F', json: (j) => j.digests['0'].keyslots.push('7') },
  { name: 'missing-segment-referenced-in-digest', expect: 'F', json: (j) => j.digests['0'].segments.push('3') },
  {
    name: 'missing-keyslot-referenced-in-token',
    expect: 'F',
    json: (j) => (j.tokens['0'] = { type: 'x', keyslots: ['5'] }),
  },
  { name: 'keyslot-missing-digest', expect: 'F', json: (j) => (j.digests['0'].keyslots = ['0', '2']) },
  { name: 'keyslot-too-many-digests', expect: 'F', json: (j) => (j.digests['1'] = structuredClone(j.digests['0'])) },
  { name: 'uint64-max-segment-size', expect: 'R', json: (j) => (seg(j).size = '18446744073709551104') },
  { name: 'uint64-overflow-segment-size', expect: 'F', json: (j) => (seg(j).size = '18446744073709551616') },
  { name: 'uint64-signed-segment-size', expect: 'F', json: (j) => (seg(j).size = '-512') },
  { name: 'segment-missing-type', expect: 'F', json: (j) => delete seg(j).type },
  { name: 'segment-wrong-type', expect: 'F', json: (j) => (seg(j).type = 42) },
  { name: 'segment-missing-offset', expect: 'F', json: (j) => delete seg(j).offset },
  { name: 'segment-wrong-offset', expect: 'F', json: (j) => (seg(j).offset = '4194305') },
  { name: 'segment-missing-size', expect: 'F', json: (j) => delete seg(j).size },
  { name: 'segment-wrong-size-0', expect: 'F', json: (j) => (seg(j).size = '0') },
  { name: 'segment-wrong-size-1', expect: 'F', json: (j) => (seg(j).size = '511') },
  { name: 'segment-wrong-size-2', expect: 'F', json: (j) => (seg(j).size = '1024x') },
  { name: 'segment-crypt-missing-encryption', expect: 'F', json: (j) => delete seg(j).encryption },
  { name: 'segment-crypt-wrong-encryption', expect: 'F', json: (j) => (seg(j).encryption = {}) },
  { name: 'segment-crypt-empty-encryption', expect: 'F', json: (j) => (seg(j).encryption = '') },
  { name: 'segment-crypt-missing-ivoffset', expect: 'F', json: (j) => delete seg(j).iv_tweak },
  { name: 'segment-crypt-wrong-ivoffset', expect: 'F', json: (j) => (seg(j).iv_tweak = '-1') },
  { name: 'segment-crypt-missing-sectorsize', expect: 'F', json: (j) => delete seg(j).sector_size },
  { name: 'segment-crypt-wrong-sectorsize-0', expect: 'F', json: (j) => (seg(j).sector_size = 0) },
  { name: 'segment-crypt-wrong-sectorsize-1', expect: 'F', json: (j) => (seg(j).sector_size = 1000) },
  { name: 'segment-crypt-wrong-sectorsize-2', expect: 'F', json: (j) => (seg(j).sector_size = '512') },
  {
    name: 'segment-unknown-type',
    expect: 'R',
    json: (j) => {
      j.segments['0'] = { type: 'some', offset: seg(j).offset, size: 'dynamic' };
    },
  },
  {
    name: 'segment-two',
    expect: 'R',
    json: (j) => {
      seg(j).size = '1048576';
      j.segments['1'] = {
        ...structuredClone(seg(j)),
        offset: String(Number(seg(j).offset) + 1048576),
        size: 'dynamic',
      };
      j.digests['0'].segments.push('1');
    },
  },
  { name: 'segment-wrong-flags', expect: 'F', json: (j) => (seg(j).flags = 'flag') },
  { name: 'segment-wrong-flags-element', expect: 'F', json: (j) => (seg(j).flags = [1]) },
  {
    name: 'segment-wrong-backup-key-0',
    expect: 'F',
    json: (j) => (j.segments['2'] = { ...structuredClone(seg(j)), flags: ['backup-final'] }),
  },
  { name: 'invalid-keyslots-size-c0', expect: 'F', json: (j) => (j.config.keyslots_size = '8388608') },
  { name: 'invalid-keyslots-size-c1', expect: 'F', json: (j) => (j.config.keyslots_size = '4161537') },
  { name: 'invalid-keyslots-size-c2', expect: 'F', json: (j) => (j.config.keyslots_size = '4096') },
  { name: 'invalid-json-size-c0', expect: 'F', json: (j) => (j.config.json_size = 'big') },
  { name: 'invalid-json-size-c2', expect: 'F', json: (j) => (j.config.json_size = '28672') },
  { name: 'invalid-tokens', expect: 'F', json: (j) => (j.tokens = { '0': { type: '', keyslots: [] } }) },
  { name: 'invalid-top-objects', expect: 'F', json: (j) => delete j.digests },
  { name: 'keyslot-invalid-area', expect: 'F', json: (j) => (j.keyslots['0'].area.type = 'cooked') },
  { name: 'keyslot-invalid-area-size', expect: 'F', json: (j) => (j.keyslots['0'].area.size = '18446744073709551615') },
  { name: 'keyslot-invalid-objects', expect: 'F', json: (j) => (j.keyslots['0'].kdf = 'pbkdf2') },
  { name: 'keyslot-invalid-af', expect: 'F', json: (j) => (j.keyslots['0'].af.type = 'luks2') },
  // json-c's depth limit: a value 32 levels down loads, 33 does not (top-level object, config, arrays).
  {
    name: 'json-depth-32',
    expect: 'R',
    text: (t) => Buffer.from(t.replace('"config":{', `"config":{"x":${'['.repeat(30)}${']'.repeat(30)},`)),
  },
  {
    name: 'json-depth-32-number',
    expect: 'R',
    text: (t) => Buffer.from(t.replace('"config":{', `"config":{"x":${'['.repeat(29)}0${']'.repeat(29)},`)),
  },
  {
    name: 'json-depth-33',
    expect: 'F',
    text: (t) => Buffer.from(t.replace('"config":{', `"config":{"x":${'['.repeat(31)}${']'.repeat(31)},`)),
  },
  {
    name: 'json-depth-33-number',
    expect: 'F',
    text: (t) => Buffer.from(t.replace('"config":{', `"config":{"x":${'['.repeat(30)}0${']'.repeat(30)},`)),
  },
  {
    name: 'json-depth-33-object',
    expect: 'F',
    text: (t) => Buffer.from(t.replace('"config":{', `"config":{"x":${'{"a":'.repeat(30)}{}${'}'.repeat(30)},`)),
  },
];

class Sink extends Writable {
  override _write(_c: Buffer, _e: string, cb: () => void) {
    cb();
  }
}

function build(c: Case): Buffer {
  const img = Buffer.from(base);
  if (c.raw) c.raw(img);
  if (c.json || c.text) {
    const j = jsonOf(img, 0);
    let text: Buffer;
    if (c.json) {
      c.json(j);
      text = Buffer.from(JSON.stringify(j));
    } else text = c.text!(JSON.stringify(j));
    setJson(img, 0, text);
  }
  if (!c.keepHdr1) Buffer.from('VACUUM').copy(img, MD); // kill the secondary so the mangled primary is all there is
  return img;
}

before(() => {
  requireTool('cryptsetup');
  const img = join(dir, 'valid.img');
  writeFileSync(img, '');
  truncateSync(img, 6 << 20);
  const key = join(dir, 'key');
  writeFileSync(key, 'valid', { mode: 0o600 });
  const cs = (...a: string[]) => assert.equal(spawnSync('cryptsetup', a).status, 0, `cryptsetup ${a.join(' ')}`);
  cs(
    'luksFormat',
    '--batch-mode',
    '--type',
    'luks2',
    ...FAST_PBKDF,
    '--key-size',
    '256',
    '--sector-size',
    '512',
    '--offset',
    '8192',
    '--key-file',
    key,
    img,
  );
  cs('luksAddKey', '--batch-mode', ...FAST_PBKDF, '--key-file', key, '--new-keyfile', key, img);
  cs(
    'luksAddKey',
    '--batch-mode',
    '--pbkdf',
    'argon2id',
    '--pbkdf-force-iterations',
    '4',
    '--pbkdf-memory',
    '32768',
    '--pbkdf-parallel',
    '1',
    '--key-file',
    key,
    '--new-keyfile',
    key,
    img,
  );
  base = readFileSync(img);
});

test('cryptmap accepts and rejects mutated headers as cryptsetup does', async () => {
  const mismatches: string[] = [];
  for (const c of CASES) {
    const img = build(c);
    const ours = join(dir, `${c.name}.img`);
    const theirs = join(dir, `${c.name}.oracle.img`);
    writeFileSync(ours, img);
    writeFileSync(theirs, img);
    const code = await main(['luksDump', ours], {
      stdin: Readable.from([]) as unknown as NodeJS.ReadableStream,
      stdout: new Sink(),
      stderr: new Sink(),
      env: {},
    });
    const oracle = spawnSync('cryptsetup', ['luksDump', theirs]).status;
    const got = code === 0 ? 'R' : 'F';
    const cs = oracle === 0 ? 'R' : 'F';
    if (got !== c.expect || cs !== c.expect)
      mismatches.push(`${c.name}: expected ${c.expect}, cryptmap ${got}, cryptsetup ${cs}`);
    rmSync(ours);
    rmSync(theirs);
  }
  assert.deepEqual(mismatches, []);
});

// ---- metadata sizes (generate-luks2-metadata-size-*): all nine sizes, for the primary copy and, with
// the primary killed, for the secondary found by scanning; plus the invalid variants -------------

const MB = 1 << 20;
const SIZES: Record<string, number> = {
  '16k': 16384,
  '32k': 32768,
  '64k': 65536,
  '128k': 131072,
  '256k': 262144,
  '512k': 524288,
  '1m': MB,
  '2m': 2 * MB,
  '4m': 4 * MB,
};

/** Header copy at `off` with hdr_size `size` (bin header bytes taken from the valid image's copy at `from`). */
function putCopy(img: Buffer, from: number, off: number, size: number, json: string, hdrSizeField = size): void {
  const bin = Buffer.from(base.subarray(from, from + 4096));
  bin.writeBigUInt64BE(BigInt(hdrSizeField), 8);
  bin.writeBigUInt64BE(BigInt(off), 256);
  bin.fill(0, 448, 512);
  const area = Buffer.alloc(size - 4096);
  area.write(json, 'utf8');
  createHash('sha256').update(bin).update(area).digest().copy(bin, 448);
  bin.copy(img, off);
  area.copy(img, off + 4096);
}

type MdCase = {
  name: string;
  expect: 'R' | 'F';
  size: number;
  kill: 'primary' | 'secondary';
  json?: (j: J, size: number) => void;
  bogusHdrSize?: boolean;
};

function mdJson(j: J, size: number, overlapJson = false): void {
  const diff = 2 * (size - MD) - (overlapJson ? 1 : 0);
  for (const ks of Object.values(j.keyslots) as J[]) ks.area.offset = String(Number(ks.area.offset) + diff);
  j.config.json_size = String(size - 4096);
  j.segments['0'].offset = '16777216';
}

const MD_CASES: MdCase[] = [
  ...Object.entries(SIZES).flatMap(([n, size]): MdCase[] => [
    { name: `metadata-size-${n}`, expect: 'R', size, kill: 'secondary' },
    { name: `metadata-size-${n}-secondary`, expect: 'R', size, kill: 'primary' },
  ]),
  {
    name: 'metadata-size-64k-inv-area-c0',
    expect: 'F',
    size: SIZES['64k']!,
    kill: 'secondary',
    json: (j, s) => mdJson(j, s, true),
  },
  {
    name: 'metadata-size-64k-inv-area-c1',
    expect: 'F',
    size: SIZES['64k']!,
    kill: 'secondary',
    json: (j, s) => {
      mdJson(j, s);
      const last = Object.keys(j.keyslots).sort((a, b) => Number(b) - Number(a))[0]!;
      j.keyslots[last].area.offset = String(
        Number(j.config.keyslots_size) + 2 * s - Number(j.keyslots[last].area.size) + 1,
      );
    },
  },
  {
    name: 'metadata-size-64k-inv-keyslots-size-c0',
    expect: 'F',
    size: SIZES['64k']!,
    kill: 'secondary',
    json: (j, s) => {
      mdJson(j, s);
      j.config.keyslots_size = String(16777216 - 2 * s + 4096);
    },
  },
  { name: 'metadata-size-invalid', expect: 'F', size: SIZES['1m']!, kill: 'secondary', bogusHdrSize: true },
  { name: 'metadata-size-invalid-secondary', expect: 'F', size: SIZES['1m']!, kill: 'primary', bogusHdrSize: true },
];

function buildMd(c: MdCase): Buffer {
  const img = Buffer.alloc(Math.max(base.length, 2 * c.size));
  base.copy(img);
  img.fill(0, 0, 2 * c.size);
  const j = jsonOf(base, 0);
  (c.json ?? mdJson)(j, c.size);
  const text = JSON.stringify(j);
  const bogus = c.bogusHdrSize ? c.size * 2048 : c.size;
  putCopy(img, 0, 0, c.size, text, c.kill === 'secondary' || !c.bogusHdrSize ? bogus : c.size);
  putCopy(img, MD, c.size, c.size, text, bogus);
  Buffer.from('VACUUM').copy(img, c.kill === 'primary' ? 0 : c.size);
  return img;
}

async function dumpBoth(img: Buffer, name: string, sizeBytes: number): Promise<{ ours: number; theirs: number }> {
  const ours = join(dir, `${name}.img`);
  const theirs = join(dir, `${name}.oracle.img`);
  for (const p of [ours, theirs]) {
    writeFileSync(p, img);
    truncateSync(p, sizeBytes);
  }
  const code = await main(['luksDump', ours], {
    stdin: Readable.from([]) as unknown as NodeJS.ReadableStream,
    stdout: new Sink(),
    stderr: new Sink(),
    env: { ...process.env, CRYPTMAP_LOCK_DIR: join(dir, 'locks') },
  });
  const oracle = spawnSync('cryptsetup', ['luksDump', theirs]).status;
  rmSync(ours);
  rmSync(theirs);
  return { ours: code, theirs: oracle ?? -1 };
}

test('all nine metadata sizes, primary and secondary copy, and their invalid variants', async () => {
  const mismatches: string[] = [];
  for (const c of MD_CASES) {
    const r = await dumpBoth(buildMd(c), c.name, 20 * MB);
    const got = r.ours === 0 ? 'R' : 'F';
    const cs = r.theirs === 0 ? 'R' : 'F';
    if (got !== c.expect || cs !== c.expect)
      mismatches.push(`${c.name}: expected ${c.expect}, cryptmap ${got}, cryptsetup ${cs}`);
  }
  assert.deepEqual(mismatches, []);
});

// ---- "T" cases (generate-luks2-non-compact-json-*token-0): valid but non-compact JSON with a token 0;
// `token remove --token-id 0` must leave compact JSON followed only by NUL bytes in both copies -----

function nonCompact(fill4k: boolean): Buffer {
  const j = jsonOf(base, 0);
  j.tokens['0'] = { type: 'a', keyslots: [] };
  const compact = JSON.stringify(j);
  const pad = fill4k ? ' '.repeat(4096 - (compact.length % 4096)) : ' ';
  const text = compact.replace('"type":"luks2"', `"type":${pad}"luks2"`);
  const img = Buffer.from(base);
  putCopy(img, 0, 0, MD, text);
  putCopy(img, MD, MD, MD, text);
  return img;
}

function jsonAreaCompact(img: Buffer, off: number): boolean {
  const area = img.subarray(off + 4096, off + MD);
  const end = area.indexOf(0);
  const text = area.subarray(0, end).toString();
  return end > 0 && area.subarray(end).every((b) => b === 0) && text === JSON.stringify(JSON.parse(text));
}

test('token remove on non-compact JSON rewrites compact JSON with no trailing bytes (cryptsetup "T" cases)', async () => {
  for (const [name, fill] of [
    ['non-compact-json-token-0', false],
    ['non-compact-json-4k-token-0', true],
  ] as const) {
    const img = nonCompact(fill);
    const ours = join(dir, `${name}.img`);
    const theirs = join(dir, `${name}.oracle.img`);
    writeFileSync(ours, img);
    writeFileSync(theirs, img);
    const code = await main(['token', 'remove', '--token-id', '0', ours], {
      stdin: Readable.from([]) as unknown as NodeJS.ReadableStream,
      stdout: new Sink(),
      stderr: new Sink(),
      env: { ...process.env, CRYPTMAP_LOCK_DIR: join(dir, 'locks') },
    });
    assert.equal(code, 0, name);
    assert.equal(spawnSync('cryptsetup', ['token', 'remove', '--token-id', '0', theirs]).status, 0, `${name}: oracle`);
    for (const [who, p] of [
      ['cryptmap', ours],
      ['cryptsetup', theirs],
    ] as const) {
      const b = readFileSync(p);
      assert.ok(jsonAreaCompact(b, 0) && jsonAreaCompact(b, MD), `${name}: ${who} left non-compact bytes`);
      assert.deepEqual(jsonOf(b, 0).tokens, {}, `${name}: ${who}`);
    }
    assert.equal(
      spawnSync('cryptsetup', ['luksDump', ours]).status,
      0,
      `${name}: cryptsetup rejects cryptmap's result`,
    );
    rmSync(ours);
    rmSync(theirs);
  }
});
