// LUKS2 reencryption metadata mangled as cryptsetup's tests/luks2-reencryption-mangle-test mangles it
// (the JSON rewritten in both header copies, checksums recomputed), each image then given to real
// cryptsetup 2.6 (the oracle) and to cryptmap: `open --test-passphrase` and `repair` must give the same
// exit code (and, where cryptsetup says something, the same lines) and neither may write to a header
// it refuses.
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { before, test } from 'node:test';
import { FAST_PBKDF } from '../helpers/luks.js';
import { fileTempDir } from '../helpers/tmp.js';
import { requireTool } from '../helpers/tools.js';
import { inProcessCli, interopTools, jsonOf, setJson } from './helpers.js';

const MD = 16384;
const dir = fileTempDir('cm-reenc-mangle-');
const { run, cs, image } = interopTools(() => dir);
const KEY = () => join(dir, 'key1');
const KEY2 = () => join(dir, 'key2');
const WRONG = () => join(dir, 'wrong');
// biome-ignore lint/suspicious/noExplicitAny: mangles poke at arbitrary JSON
type J = Record<string, any>;

/** The mangle test's img_prepare: luksFormat, a second passphrase (`key2`, on the old key only), reencrypt --init-only. */
let base: Buffer;

before(() => {
  requireTool('cryptsetup');
  writeFileSync(KEY(), 'passphrase one', { mode: 0o600 });
  writeFileSync(KEY2(), 'passphrase two', { mode: 0o600 });
  writeFileSync(WRONG(), 'not it', { mode: 0o600 });
  const img = image('base.img', 32 << 20);
  cs('luksFormat', '-q', ...FAST_PBKDF, '--luks2-metadata-size', String(MD), '--key-file', KEY(), img);
  cs('luksAddKey', '-q', ...FAST_PBKDF, '--key-file', KEY(), img, KEY2());
  cs('reencrypt', '--init-only', '-q', '-S', '0', '--resilience', 'none', '--key-file', KEY(), img);
  base = readFileSync(img);
});

/** A copy of the base image with `mangle` applied to its JSON metadata (both copies), as img_update_json does. */
function mangled(name: string, mangle?: (j: J) => void): string {
  const img = Buffer.from(base);
  if (mangle) {
    const j = jsonOf(img, 0);
    mangle(j);
    const text = Buffer.from(JSON.stringify(j));
    setJson(img, 0, text);
    setJson(img, MD, text);
  }
  const p = join(dir, name);
  writeFileSync(p, img);
  return p;
}

const cm = inProcessCli(dir);

/**
 * `argv` (with the image last) run by cryptsetup on one copy and by cryptmap on another: same exit
 * code, `want`; the same stderr when `sameLines`; a copy a tool refused is unchanged.
 */
async function both(
  name: string,
  mangle: ((j: J) => void) | undefined,
  argv: string[],
  want: number,
  sameLines = true,
) {
  const a = mangled(`${name}.cs`, mangle);
  const b = mangled(`${name}.cm`, mangle);
  const was = readFileSync(a);
  const theirs = run('cryptsetup', [...argv, a]);
  const ours = await cm(...argv, b);
  assert.equal(theirs.code, want, `${name}: cryptsetup ${argv.join(' ')}: ${theirs.err}`);
  assert.equal(ours.code, theirs.code, `${name}: cryptmap ${argv.join(' ')}: ${ours.err}`);
  if (sameLines) assert.equal(ours.err, theirs.err, `${name}: ${argv.join(' ')}`);
  if (want !== 0) {
    assert.ok(readFileSync(a).equals(was), `${name}: cryptsetup wrote to a header it refused`);
    assert.ok(readFileSync(b).equals(was), `${name}: cryptmap wrote to a header it refused`);
  }
}

const TEST = (key = KEY()) => ['open', '--test-passphrase', '--key-file', key];
const REPAIR = (key = KEY()) => ['repair', '-q', '--key-file', key];

test('open --test-passphrase of a header in reencryption needs both volume keys, as cryptsetup: one (-S, --unbound, a passphrase of the old key only) or none fails', async () => {
  await both('clean', undefined, TEST(), 0);
  // key2 opens the old key only: the new one is "No key available" (-EPERM, exit 2).
  await both('old-only', undefined, TEST(KEY2()), 2);
  // A wrong passphrase: the last keyslot cryptsetup tries for the old key belongs to the new one (-ENOENT, exit 1).
  await both('wrong', undefined, TEST(WRONG()), 1);
  // --key-slot or --unbound open one keyslot: the verification lacks the other key (-EINVAL, exit 1, silent).
  await both('slot', undefined, [...TEST(), '-S', '0'], 1);
  await both('unbound', undefined, [...TEST(), '--unbound'], 1);
  // repair: as the key lookup answers, silently.
  await both('repair-old-only', undefined, REPAIR(KEY2()), 2);
  await both('repair-wrong', undefined, REPAIR(WRONG()), 1);
});

test('open --test-passphrase of a header whose reencryption metadata was changed behind its digest: exit 2 with cryptsetup lines, as repair', async () => {
  const cases: Array<[string, (j: J) => void]> = [
    ['segment-2-cipher', (j) => (j.segments['2'].encryption = 'aes-cbc-null')],
    ['mode-decrypt', (j) => (j.keyslots['3'].mode = 'decrypt')],
    ['direction-backward', (j) => (j.keyslots['3'].direction = 'backward')],
    ['digest-iterations', (j) => (j.digests['2'].iterations = 1111)],
    [
      'digest-of-volume-key',
      (j) => {
        j.digests['2'] = { ...j.digests['0'], keyslots: ['3'], segments: [] };
      },
    ],
  ];
  for (const [name, mangle] of cases) {
    await both(name, mangle, TEST(), 2);
    await both(`${name}-repair`, mangle, REPAIR(), 2);
  }
  // The reencryption digest deleted: "invalid" with -ENOENT (exit 1).
  await both('no-digest', (j) => delete j.digests['2'], TEST(), 1);
});

test('mangled reencryption requirements, keyslot and segments: refused where cryptsetup refuses them (not a valid LUKS2 header, or an unknown requirement), nothing written', async () => {
  const RESUME = ['reencrypt', '--resume-only', '-q', '--force-offline-reencrypt', '--key-file', KEY()];
  const invalid: Array<[string, (j: J) => void]> = [
    // A reencrypt keyslot needs an online-reencrypt requirement, and a requirement its keyslot.
    ['requirement-x', (j) => (j.config.requirements.mandatory = ['online-reencryptx'])],
    ['no-requirement', (j) => (j.config.requirements.mandatory = [])],
    [
      'no-reencrypt-keyslot',
      (j) => {
        delete j.keyslots['3'];
        delete j.digests['2'];
      },
    ],
    // The reencrypt keyslot's key_size is 1.
    ['key-size', (j) => (j.keyslots['3'].key_size = 16)],
    // Every regular segment is like the backup-previous or the backup-final one.
    ['segment-0-cipher', (j) => (j.segments['0'].encryption = 'aes-cbc-null')],
  ];
  for (const [name, mangle] of invalid) {
    await both(name, mangle, TEST(), 1, false);
    await both(`${name}-repair`, mangle, REPAIR(), 1, false);
    await both(`${name}-resume`, mangle, RESUME, 1, false);
  }
  // A requirement cryptsetup 2.6 does not know (beside the reencryption's, or a later version alone):
  // the header loads and the passphrase tests, but it is neither repaired nor resumed.
  const unknown: Array<[string, (j: J) => void]> = [
    ['requirement-v3X', (j) => j.config.requirements.mandatory.push('online-reencrypt-v3X')],
    ['requirement-v999', (j) => (j.config.requirements.mandatory = ['online-reencrypt-v999'])],
  ];
  for (const [name, mangle] of unknown) {
    await both(name, mangle, TEST(), 0);
    await both(`${name}-repair`, mangle, REPAIR(), 1);
    await both(`${name}-resume`, mangle, RESUME, 1, false);
  }
});

test('reencryption metadata without a digest (legacy online-reencrypt, or the digest deleted): repair upgrades it as cryptsetup does, and either tool then resumes it', async () => {
  const legacy = (j: J) => {
    delete j.digests['2'];
    j.config.requirements.mandatory = ['online-reencrypt'];
  };
  // A hotzone left in progress under the legacy requirement (the mangle test's [2], journal).
  const legacyCrashed = (j: J) => {
    legacy(j);
    j.keyslots['3'].area.type = 'journal';
    const s0 = j.segments['0'];
    const size = j.keyslots['3'].area.size;
    j.segments = {
      '0': { ...s0, size, flags: ['in-reencryption'] },
      '1': { ...s0, offset: String(Number(s0.offset) + Number(size)) },
      '2': j.segments['1'],
      '3': j.segments['2'],
    };
    j.digests['0'].segments = ['1', '2'];
    j.digests['1'].segments = ['0', '3'];
  };
  const cases: Array<[string, (j: J) => void]> = [
    ['legacy', legacy],
    ['legacy-crashed', legacyCrashed],
    ['digest-deleted', (j) => delete j.digests['2']],
  ];
  for (const [name, mangle] of cases) {
    // Not opened and not resumed before the repair; a passphrase that opens no key changes nothing.
    await both(`${name}-test`, mangle, TEST(), 1);
    await both(`${name}-repair-wrong`, mangle, REPAIR(WRONG()), 1);
    await both(`${name}-repair-old-only`, mangle, REPAIR(KEY2()), 2);
    await both(name, mangle, REPAIR(), 0);
    const theirs = join(dir, `${name}.cs`);
    const ours = join(dir, `${name}.cm`);
    for (const f of [theirs, ours]) {
      const j = jsonOf(readFileSync(f), 0);
      assert.deepEqual(j.config.requirements.mandatory, ['online-reencrypt-v2'], `${f}`);
      assert.deepEqual(j.keyslots['3'].key_size, 1);
      const d = Object.values(j.digests as Record<string, J>).find((x) => x.keyslots.includes('3'));
      assert.ok(d && d.type === 'pbkdf2' && d.segments.length === 0, `${f}: no reencryption digest`);
    }
    // Each tool takes the other's upgrade: the passphrase tests, and the reencryption finishes.
    assert.equal(run('cryptsetup', TEST().concat(ours)).code, 0, `${name}: cryptsetup on cryptmap's upgrade`);
    assert.equal((await cm(...TEST(), theirs)).code, 0, `${name}: cryptmap on cryptsetup's upgrade`);
    const resume = ['reencrypt', '--resume-only', '-q', '--force-offline-reencrypt', '--key-file', KEY()];
    // (cryptsetup resumes a crashed hotzone only after its repair has recovered it; cryptmap's resume recovers it.)
    assert.equal(run('cryptsetup', REPAIR().concat(ours)).code, 0, `${name}: cryptsetup repair of cryptmap's upgrade`);
    const r1 = run('cryptsetup', resume.concat(ours));
    assert.equal(r1.code, 0, `${name}: cryptsetup resumes cryptmap's upgrade: ${r1.err}`);
    const r2 = await cm(...resume, theirs);
    assert.equal(r2.code, 0, `${name}: cryptmap resumes cryptsetup's upgrade: ${r2.err}`);
    for (const f of [theirs, ours]) assert.equal(jsonOf(readFileSync(f), 0).config.requirements, undefined, f);
  }
});
