// cryptsetup 2.6 as the oracle for what its own test suite found (issue 12 items 1-3, issue 11 items
// 12-14; ../shared/cryptsetup-suite/results.md R1-R21): every case runs the same command line with
// /usr/sbin/cryptsetup and with cryptmap on copies of one image and compares the exit code, the
// message and the header left on disk (read back by cryptsetup luksDump).
import assert from 'node:assert/strict';
import { copyFileSync, readFileSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { fileTempDir } from '../helpers/tmp.js';
import { cryptmap, ENTRY, exec, ok, type Result } from './harness.js';
import { FAST_PBKDF } from '../helpers/luks.js';

const dir = fileTempDir('cryptmap-parity-');
const CS = '/usr/sbin/cryptsetup';

let n = 0;
/** A fresh image of `mib` MiB formatted by cryptsetup with passphrase "old" (and "new" in slot 1 when `two`). */
async function image(type: 'luks1' | 'luks2', two = false, mib = 20): Promise<string> {
  const img = join(dir, `img${n++}`);
  writeFileSync(img, '');
  truncateSync(img, mib << 20);
  await ok(CS, ['-q', 'luksFormat', '--type', type, ...FAST_PBKDF, img, '-d', kf('old')]);
  if (two) await ok(CS, ['luksAddKey', ...FAST_PBKDF, img, '-d', kf('old'), kf('new')]);
  return img;
}
function kf(content: string): string {
  const f = join(dir, `key-${content}`);
  writeFileSync(f, content, { mode: 0o600 });
  return f;
}
/** Which keyslots are active, as cryptsetup luksDump reads them. */
async function slots(img: string): Promise<string> {
  const d = await ok(CS, ['luksDump', img]);
  const l1 = [...d.matchAll(/^Key Slot (\d): ENABLED/gm)].map((m) => m[1]);
  const l2 = [...d.matchAll(/^ {2}(\d+): luks2/gm)].map((m) => m[1]);
  return [...l1, ...l2].join(',');
}

interface Outcome {
  code: number;
  err: string;
  slots: string;
}
/**
 * Run `args` (IMG stands for the image) with cryptsetup and with cryptmap, each on its own copy of
 * `img`, with `input` on stdin; both outcomes must agree (exit code, last stderr line, keyslots).
 */
async function same(img: string, args: string[], input = ''): Promise<Outcome> {
  const a = `${img}.cs`;
  const b = `${img}.cm`;
  copyFileSync(img, a);
  copyFileSync(img, b);
  const sub = (p: string) => args.map((x) => (x === 'IMG' ? p : x));
  const rs: Result = await exec(CS, sub(a), input);
  const rm: Result = await cryptmap(sub(b), input);
  // The last line, with the image named IMG and a usage error's program prefix dropped.
  const last = (s: string) =>
    (s.trim().split('\n').pop() ?? '')
      .replaceAll(a, 'IMG')
      .replaceAll(b, 'IMG')
      .replace(/^\S*cryptsetup: /, '');
  const cs: Outcome = { code: rs.code, err: last(rs.stderr), slots: await slots(a).catch(() => 'not LUKS') };
  const cm: Outcome = { code: rm.code, err: last(rm.stderr), slots: await slots(b).catch(() => 'not LUKS') };
  assert.deepEqual(
    cm,
    cs,
    `cryptmap ${args.join(' ')} differs from cryptsetup (stdin ${JSON.stringify(input)}): ${rm.stderr}`,
  );
  return cm;
}

test('R1: a passphrase missing from standard input is "Nothing to read on input." (exit 1), never an empty passphrase', async () => {
  for (const type of ['luks1', 'luks2'] as const) {
    const img = await image(type);
    const r = await same(img, ['luksAddKey', ...FAST_PBKDF, 'IMG'], 'old\n');
    assert.deepEqual([r.code, r.err], [1, 'Nothing to read on input.']);
    await same(img, ['luksAddKey', ...FAST_PBKDF, 'IMG'], 'old\n\n'); // an empty line is an empty passphrase, as in cryptsetup
    await same(img, ['open', '--test-passphrase', 'IMG'], '');
    await same(img, ['luksChangeKey', ...FAST_PBKDF, 'IMG'], 'old\n');
    await same(img, ['luksRemoveKey', 'IMG'], '');
    await same(img, ['luksDump', '--dump-volume-key', '-q', 'IMG'], '');
    await same(img, ['luksConvertKey', ...FAST_PBKDF, 'IMG'], '');
  }
});

test('R2: no active keyslot is "No usable keyslot is available." (exit 1)', async () => {
  for (const type of ['luks1', 'luks2'] as const) {
    const img = await image(type);
    await ok(CS, ['-q', 'luksKillSlot', img, '0']);
    for (const args of [
      ['open', '--test-passphrase', 'IMG'],
      ['luksAddKey', ...FAST_PBKDF, 'IMG'],
      ['luksRemoveKey', 'IMG'],
      ['luksChangeKey', ...FAST_PBKDF, 'IMG'],
    ]) {
      const r = await same(img, args, 'old\nx\n');
      assert.deepEqual([r.code, r.err], [1, 'No usable keyslot is available.'], args.join(' '));
    }
  }
});

test("R3: luksKillSlot wants another keyslot's passphrase; input that ends at once skips the check; the last slot needs its own", async () => {
  for (const type of ['luks1', 'luks2'] as const) {
    const img = await image(type, true);
    assert.equal((await same(img, ['luksKillSlot', 'IMG', '1'], 'new\n')).code, 2); // the doomed slot's own passphrase
    assert.equal((await same(img, ['luksKillSlot', 'IMG', '1'], 'old\n')).slots, '0');
    assert.equal((await same(img, ['luksKillSlot', 'IMG', '1'], '')).slots, '0'); // </dev/null
    assert.equal((await same(img, ['-q', 'luksKillSlot', 'IMG', '1'], '')).slots, '0');
    assert.equal((await same(img, ['luksKillSlot', 'IMG', '1', '-d', kf('new')])).code, 2);
    assert.equal((await same(img, ['luksKillSlot', 'IMG', '3'], 'old\n')).err, 'Keyslot 3 is not active.');
    const one = await image(type);
    assert.equal((await same(one, ['luksKillSlot', 'IMG', '0'], 'wrong\n')).code, 2); // the last slot: its own passphrase
    assert.equal((await same(one, ['-q', 'luksKillSlot', 'IMG', '0'], 'old\n')).slots, '');
  }
});

// An unbounded read of /dev/zero never ends: the test's deadline fails it (no wall-clock assertion).
test('R6: key files are read bounded: /dev/zero with -l, /dev/urandom as volume key, the 8 MiB cap', {
  timeout: 300_000,
}, async () => {
  const img = await image('luks2');
  await same(img, [
    '-q',
    'luksFormat',
    ...FAST_PBKDF,
    '--volume-key-file',
    '/dev/urandom',
    '-d',
    '/dev/zero',
    '-l',
    '32',
    'IMG',
  ]);
  await same(img, ['open', '--test-passphrase', '-d', '/dev/zero', '-l', '32', 'IMG']);
  const big = join(dir, 'big');
  writeFileSync(big, Buffer.alloc((8 << 20) + 1, 1));
  const r = await same(img, ['open', '--test-passphrase', '-d', big, 'IMG']);
  assert.deepEqual([r.code, r.err], [1, 'Maximum keyfile size exceeded.']);
  const m = await cryptmap(['open', '--test-passphrase', '-d', '/dev/zero', img]);
  assert.deepEqual([m.code, m.stderr.trim()], [1, 'Maximum keyfile size exceeded.']);
});

test('R7/R9: -d twice is a usage error; -l limits a passphrase read from standard input', async () => {
  const img = await image('luks1');
  assert.equal((await same(img, ['-d', '-', 'luksOpen', '--test-passphrase', 'IMG', '-d', kf('old')], 'old')).code, 1);
  assert.equal((await same(img, ['luksRemoveKey', 'IMG', '-l', '2'], 'old\n')).code, 2); // "ol"
  await same(img, ['luksRemoveKey', 'IMG', '-l', '11'], 'old\n'); // fewer bytes than asked
  assert.equal((await same(img, ['luksRemoveKey', 'IMG', '-q', '-l', '3'], 'oldx\n')).slots, '');
});

test('R19: open --test-passphrase --volume-key-file checks the volume key (also after luksErase, with --key-size)', async () => {
  const img = await image('luks2');
  const vk = join(dir, 'vk');
  await ok(CS, ['luksDump', '--dump-volume-key', '-q', '--volume-key-file', vk, img, '-d', kf('old')]);
  assert.equal((await same(img, ['open', '--test-passphrase', '--volume-key-file', vk, 'IMG'])).code, 0);
  assert.equal((await same(img, ['open', '--test-passphrase', '--volume-key-file', '/dev/urandom', 'IMG'])).code, 2);
  await ok(CS, ['-q', 'luksErase', img]);
  assert.equal((await same(img, ['open', '--test-passphrase', '--volume-key-file', vk, 'IMG'])).code, 1);
  assert.equal(
    (await same(img, ['open', '--test-passphrase', '--volume-key-file', vk, '--key-size', '512', 'IMG'])).code,
    0,
  );
  // luksAddKey from the volume key alone: --key-size gives its size when no keyslot is left.
  assert.equal((await same(img, ['luksAddKey', ...FAST_PBKDF, '--volume-key-file', vk, 'IMG'], 'p\n')).code, 1);
  assert.equal(
    (await same(img, ['luksAddKey', ...FAST_PBKDF, '--volume-key-file', vk, '--key-size', '512', 'IMG'], 'p\n')).slots,
    '0',
  );
});

test('R5/R21: luksFormat refuses a bad LUKS1 --uuid, an --offset not a multiple of 4096 bytes, LUKS2 sizes with --type luks1', async () => {
  // An empty device: cryptsetup wipes an old header before it checks the UUID; cryptmap checks first and keeps it.
  const img = join(dir, 'blank');
  writeFileSync(img, '');
  truncateSync(img, 20 << 20);
  const cases: [string[], string][] = [
    [['--type', 'luks1', '--uuid', 'blah'], 'Wrong LUKS UUID format provided.'],
    [['--type', 'luks2', '--uuid', 'blah'], 'Wrong LUKS UUID format provided.'],
    [['--type', 'luks2', '--offset', '16385'], 'Data offset is not multiple of 4096 bytes.'],
    [['--type', 'luks1', '--luks2-metadata-size', '16k'], 'Unsupported LUKS2 metadata size options.'],
    [['--type', 'luks1', '--luks2-keyslots-size', '16m'], 'Unsupported LUKS2 metadata size options.'],
  ];
  for (const [opts, msg] of cases) {
    const r = await same(img, ['-q', 'luksFormat', ...FAST_PBKDF, ...opts, 'IMG'], 'x\n');
    assert.deepEqual([r.code, r.err], [1, msg], opts.join(' '));
  }
});

test('R18: config --subsystem clears the label (and --label the subsystem), as crypt_set_label', async () => {
  const img = await image('luks2');
  await ok(CS, ['config', img, '--label', 'L', '--subsystem', 'S']);
  await same(img, ['config', 'IMG', '--subsystem', 'X']);
  const a = join(dir, 'r18');
  copyFileSync(img, a);
  assert.equal((await cryptmap(['config', a, '--subsystem', 'X'])).code, 0);
  const d = await ok(CS, ['luksDump', a]);
  assert.match(d, /Label:\s+\(no label\)/);
  assert.match(d, /Subsystem:\s+X/);
});

test('R11 / issue 12 item 3: detached header with --offset past the device; a regular file grows to hold the header; a truncated header is refused', async () => {
  for (const type of ['luks1', 'luks2'] as const) {
    const small = join(dir, `small-${type}`);
    writeFileSync(small, '');
    truncateSync(small, 1 << 20);
    const r = await same(small, ['-q', 'luksFormat', '--type', type, ...FAST_PBKDF, 'IMG'], 'x\n');
    assert.equal(r.code, 0);
    const big = await image(type);
    const cut = join(dir, `cut-${type}`);
    writeFileSync(cut, (await import('node:fs')).readFileSync(big).subarray(0, type === 'luks1' ? 1 << 20 : 4 << 20));
    const o = await same(cut, ['open', '--test-passphrase', 'IMG'], 'old\n');
    assert.equal(o.code, 1);
    const m = await cryptmap(['luksDump', cut]);
    assert.match(
      m.stderr,
      type === 'luks1'
        ? /is too small\. \(LUKS1 requires at least 2066432 bytes\.\)/
        : /is too small\. Need at least 16777216 bytes\./,
    );
  }
  const dev = join(dir, 'data10m');
  writeFileSync(dev, '');
  truncateSync(dev, 10 << 20);
  for (const off of ['8192', '80000']) {
    const hdrs = [join(dir, `h-cs-${off}`), join(dir, `h-cm-${off}`)];
    const rs = await exec(CS, ['-q', 'luksFormat', ...FAST_PBKDF, '--header', hdrs[0]!, '--offset', off, dev], 'x\n');
    const rm = await cryptmap(['-q', 'luksFormat', ...FAST_PBKDF, '--header', hdrs[1]!, '--offset', off, dev], 'x\n');
    assert.deepEqual([rm.code, rm.stdout], [rs.code, rs.stdout], `--offset ${off}: ${rm.stderr}`);
    assert.equal(rm.code, 0);
    assert.equal((await exec(CS, ['open', '--test-passphrase', '--header', hdrs[1]!, dev], 'x\n')).code, 0);
  }
});

test('R8/R20: luksChangeKey moves a LUKS1 key to a free keyslot; LUKS2 with a full keyslots area changes it in place', async () => {
  const l1 = await image('luks1', true);
  assert.equal((await same(l1, ['luksChangeKey', ...FAST_PBKDF, 'IMG'], 'old\nx\n')).slots, '1,2');
  assert.equal((await same(l1, ['luksChangeKey', ...FAST_PBKDF, '-S', '1', 'IMG'], 'new\nx\n')).slots, '0,1'); // named: in place
  // LUKS2, 256 KiB of keyslots area: room for two 256-bit keys, none for a third copy.
  const l2 = join(dir, 'full-area');
  writeFileSync(l2, '');
  truncateSync(l2, 20 << 20);
  await ok(CS, [
    '-q',
    'luksFormat',
    '--type',
    'luks2',
    l2,
    kf('k1'),
    ...FAST_PBKDF,
    '--key-slot',
    '0',
    '--key-size',
    '256',
    '--luks2-keyslots-size',
    '256k',
  ]);
  await ok(CS, ['luksAddKey', '-q', l2, ...FAST_PBKDF, '-d', kf('k1'), '--key-slot', '1', kf('p1')]);
  assert.equal((await same(l2, ['luksChangeKey', 'IMG', ...FAST_PBKDF, '-d', kf('k1'), kf('k2')])).code, 0);
  const m = `${l2}.cm`; // what cryptmap left: the new key opens keyslot 0, the old one nothing, keyslot 1 intact
  assert.equal((await exec(CS, ['open', '--test-passphrase', '-S', '0', '-d', kf('k2'), m])).code, 0);
  assert.equal((await exec(CS, ['open', '--test-passphrase', '-d', kf('k1'), m])).code, 2);
  assert.equal((await exec(CS, ['open', '--test-passphrase', '-S', '1', '-d', kf('p1'), m])).code, 0);
});

/**
 * Run `bin args` on a pseudo-terminal, answering `steps` ([text awaited, line sent, sent raw without a
 * newline]); every wait has a deadline (pty-dialog.py). The transcript with the image named IMG and the
 * loop device LOOP.
 */
async function dialog(
  bin: string[],
  args: string[],
  steps: [string, string | null, boolean?][],
  names: Record<string, string>,
): Promise<string> {
  // the source tree's copy, from any build directory (dist or CRYPTMAP_DIST: DIR/test/cli/ is three levels deep)
  const py = fileURLToPath(new URL('../../../test/cli/pty-dialog.py', import.meta.url));
  const r = await exec('python3', [py, JSON.stringify(steps), '60', ...bin, ...args]);
  let t = r.stdout.replaceAll('\r', '');
  for (const [from, to] of Object.entries(names)) t = t.replaceAll(from, to);
  // blkid's notes on an old signature (both print them; the images differ between the runs).
  return t
    .split('\n')
    .filter((l) => !/superblock signature/.test(l))
    .join('\n');
}

test('R12: on a terminal the prompt names a loop device by its backing file; -v prints what cryptsetup prints', async () => {
  const cmBin = [process.execPath, ENTRY];
  const run = async (bin: string[]) => {
    const img = join(dir, `tty-${n++}`);
    writeFileSync(img, '');
    truncateSync(img, 10 << 20);
    const loop = (await ok('losetup', ['-f', '--show', img])).trim();
    const names = { [img]: 'IMG', [loop]: 'LOOP' };
    try {
      const out: string[] = [];
      const yes: [string, string] = ["Are you sure? (Type 'yes' in capital letters):", 'YES'];
      out.push(
        await dialog(
          bin,
          ['luksFormat', '--type', 'luks1', ...FAST_PBKDF, '-v', loop],
          [yes, [`Enter passphrase for ${img}:`, 'p0'], ['Verify passphrase:', 'p0']],
          names,
        ),
      );
      out.push(
        await dialog(
          bin,
          ['luksOpen', '-v', '-T', '2', '--test-passphrase', loop],
          [
            [`Enter passphrase for ${img}:`, 'bad'],
            [`Enter passphrase for ${img}:`, 'p0'],
          ],
          names,
        ),
      );
      out.push(
        await dialog(
          bin,
          ['luksAddKey', '-S', '2', ...FAST_PBKDF, '-v', loop],
          [
            ['Enter any existing passphrase:', 'p0'],
            ['Enter new passphrase for key slot:', 'p1'],
            ['Verify passphrase:', 'p1'],
          ],
          names,
        ),
      );
      out.push(
        await dialog(
          bin,
          ['luksChangeKey', ...FAST_PBKDF, '-v', loop],
          [
            ['Enter passphrase to be changed:', 'p0'],
            ['Enter new passphrase:', 'p2'],
            ['Verify passphrase:', 'p2'],
          ],
          names,
        ),
      );
      out.push(
        await dialog(bin, ['luksKillSlot', '-v', loop, '2'], [['Enter any remaining passphrase:', 'p2']], names),
      );
      out.push(await dialog(bin, ['erase', '-v', loop], [yes], names));
      out.push(
        await dialog(
          bin,
          ['luksOpen', '-v', '-T', '1', '--test-passphrase', loop],
          [[`Enter passphrase for ${img}:`, 'p2']],
          names,
        ),
      );
      return out;
    } finally {
      await exec('losetup', ['-d', loop]);
    }
  };
  const cs = await run([CS]);
  const cm = await run(cmBin);
  for (let i = 0; i < cs.length; i++) assert.equal(cm[i], cs[i], `dialog ${i}`);
  assert.match(cm[0]!, /Enter passphrase for IMG: /);
  assert.match(
    cm.at(-1)!,
    /No usable keyslot is available\.\nCommand failed with code -1 \(wrong or missing parameters\)\.\n\nEXIT 1/,
  );
});

test("Ctrl-D at a passphrase prompt or at the YES question ends the input: the message and exit code are cryptsetup's", async () => {
  const img = await image('luks2');
  const cmBin = [process.execPath, ENTRY];
  const eof = '\u0004';
  for (const [args, wait] of [
    [['open', '--test-passphrase', img], `Enter passphrase for ${img}:`],
    [['luksAddKey', ...FAST_PBKDF, img], 'Enter any existing passphrase:'],
    [['luksFormat', '--type', 'luks2', ...FAST_PBKDF, img], "Are you sure? (Type 'yes' in capital letters):"],
  ] as [string[], string][]) {
    const names = { [img]: 'IMG' };
    const cs = await dialog([CS], args, [[wait, eof, true]], names);
    const cm = await dialog(cmBin, args, [[wait, eof, true]], names);
    assert.equal(cm, cs, args[0]);
    assert.match(cs, /Error reading (passphrase|response) from terminal\.\n\nEXIT 1\n?$/);
  }
});

test('R2: with an unbound keyslot last, a passphrase that opens no bound keyslot is "No usable keyslot is available." (exit 1), as cryptsetup', async () => {
  const img = await image('luks2');
  await ok(CS, ['luksAddKey', '-q', ...FAST_PBKDF, '--unbound', '-s', '256', img, kf('ub')]);
  for (const pass of ['ub\n', 'wrong\n']) {
    const r = await same(img, ['open', '--test-passphrase', 'IMG'], pass);
    assert.deepEqual([r.code, r.err], [1, 'No usable keyslot is available.'], pass);
    assert.equal((await same(img, ['luksAddKey', ...FAST_PBKDF, 'IMG'], `${pass}x\n`)).code, 1);
  }
  // A bound keyslot after it: a wrong passphrase is wrong again (exit 2).
  await ok(CS, ['luksAddKey', ...FAST_PBKDF, img, '-d', kf('old'), kf('new')]);
  assert.equal((await same(img, ['open', '--test-passphrase', 'IMG'], 'wrong\n')).code, 2);
});

test('option values are checked as cryptsetup parses them (popt numbers, size units, key size, key slot): same exit code and message under --test-args', async () => {
  // compat-test [19] `create ... -l -1` must fail; `resize --device-size 1M` must work.
  const cases = [
    ['create', 'd', 'x', '-d', 'k', '-l', '-1'],
    ['create', 'd', 'x', '-d', 'k', '-l', 'x'],
    ['create', 'd', 'x', '-d', 'k', '-l', '4294967296'],
    ['create', 'd', 'x', '-d', 'k', '-l', '32'],
    ['create', 'd', 'x', '-s', '-1'],
    ['create', 'd', 'x', '-s', '255'],
    ['create', 'd', 'x', '-o', '-1'],
    ['luksAddKey', 'x', '-S', '-1'],
    ['luksAddKey', 'x', '--keyslot-key-size', '0'],
    ['luksFormat', 'x', '--align-payload', '-1'],
    ['open', 'x', '--tries', '-1'],
    ['open', 'x', '--tries', '3'],
    ['luksFormat', 'x', '--luks2-metadata-size', '16k'],
    ['luksFormat', 'x', '--luks2-metadata-size', '1q'],
    ['reencrypt', 'x', '--reduce-device-size', '2G'],
    ['reencrypt', 'x', '--reduce-device-size', '8M'],
    ['reencrypt', 'x', '--hotzone-size', '0'],
    ...['1M', '1MB', '1MiB', '1Mi', '1x', '-1', '0', '513', '1s', '512k', '1kB', '1T'].map((s) => [
      'resize',
      'd',
      '--device-size',
      s,
    ]),
  ];
  for (const args of cases) {
    const cs = await exec(CS, ['--test-args', ...args]);
    const cm = await cryptmap(['--test-args', ...args]);
    const last = (s: string) => (s.trim().split('\n').pop() ?? '').replace(/^\S*cryptsetup: /, '');
    assert.equal(cm.code, cs.code, `${args.join(' ')}: ${cm.stderr}`);
    // cryptmap says which option popt's "invalid numeric value" is about.
    assert.ok(last(cm.stderr).startsWith(last(cs.stderr)), `${args.join(' ')}: ${cm.stderr} vs ${cs.stderr}`);
  }
});

test("luksHeaderRestore: backups are cryptsetup's bytes both ways, layouts that differ are refused, the question is cryptsetup's", async () => {
  const backup = async (bin: 'cs' | 'cm', img: string) => {
    const f = join(dir, `bak${n++}`);
    if (bin === 'cs') await ok(CS, ['luksHeaderBackup', img, '--header-backup-file', f]);
    else await ok(process.execPath, [ENTRY, 'luksHeaderBackup', img, '--header-backup-file', f]);
    return f;
  };
  const l1 = await image('luks1');
  const l2 = await image('luks2');
  // LUKS1: the header and keyslots up to the last one's end (4036 sectors with 512-bit keys), padded
  // to 4 KiB; cryptmap used to write up to the payload offset (2 MiB) and refused cryptsetup's file.
  for (const img of [l1, l2]) {
    const a = readFileSync(await backup('cs', img));
    const b = readFileSync(await backup('cm', img));
    assert.ok(a.equals(b), `${img}: cryptmap's backup differs from cryptsetup's (${b.length} / ${a.length} bytes)`);
  }
  assert.equal(statSync(await backup('cs', l1)).size, 2068480);
  // Each restores the other's backup of a header that changed since (a keyslot added): slot 0 only.
  for (const [img, made] of [
    [l1, 'cs'],
    [l1, 'cm'],
    [l2, 'cs'],
    [l2, 'cm'],
  ] as const) {
    const bak = await backup(made, img);
    const changed = `${img}.${made}-later`;
    copyFileSync(img, changed);
    await ok(CS, ['luksAddKey', ...FAST_PBKDF, changed, '-d', kf('old'), kf('new')]);
    const r = await same(changed, ['luksHeaderRestore', '-q', 'IMG', '--header-backup-file', bak]);
    assert.deepEqual(r, { code: 0, err: '', slots: '0' }, `${img} from a backup made by ${made}`);
  }
  // Refused before anything is written (exit 1, the header keeps its keyslots): another data offset,
  // another keyslots area size (LUKS2), another key size (LUKS1).
  const other = async (args: string[]) => {
    const img = join(dir, `other${n++}`);
    writeFileSync(img, '');
    truncateSync(img, 40 << 20);
    await ok(CS, ['-q', 'luksFormat', ...args, ...FAST_PBKDF, img, '-d', kf('old')]);
    return backup('cs', img);
  };
  const two = await image('luks2', true, 40);
  const twoL1 = await image('luks1', true, 40);
  for (const [img, bak, msg] of [
    [
      two,
      await other(['--type', 'luks2', '--offset', '65536']),
      'Data offset differ on device and backup, restore failed.',
    ],
    [
      two,
      await other(['--type', 'luks2', '--luks2-keyslots-size', '1M', '--offset', '32768']),
      'Binary header with keyslot areas size differ on device and backup, restore failed.',
    ],
    [
      twoL1,
      await other(['--type', 'luks1', '-s', '256']),
      'Data offset or key size differs on device and backup, restore failed.',
    ],
  ] as const) {
    const r = await same(img, ['luksHeaderRestore', '-q', 'IMG', '--header-backup-file', bak]);
    assert.deepEqual(r, { code: 1, err: msg, slots: '0,1' });
  }
  // The question on a terminal, answered no: what the device holds (of the backup's version), the UUID
  // warning, and nothing after the "no" (exit 1); a LUKS1 backup onto LUKS2 also says what it found.
  const empty = join(dir, `empty${n++}`);
  writeFileSync(empty, '');
  truncateSync(empty, 20 << 20);
  const cmBin = [process.execPath, ENTRY];
  const l1other = await image('luks1');
  const seen: string[] = [];
  for (const [dev, bak] of [
    [empty, await backup('cs', l2)],
    [l2, await backup('cs', await image('luks2'))],
    [l2, await backup('cs', l1)],
    [l1other, await backup('cs', l1)],
    [l1other, await backup('cs', l2)],
  ] as const) {
    const a = `${dev}.q-cs`;
    const b = `${dev}.q-cm`;
    copyFileSync(dev, a);
    copyFileSync(dev, b);
    const steps: [string, string][] = [["Are you sure? (Type 'yes' in capital letters):", 'n']];
    const cs = await dialog([CS], ['luksHeaderRestore', a, '--header-backup-file', bak], steps, { [a]: 'DEV' });
    const cm = await dialog(cmBin, ['luksHeaderRestore', b, '--header-backup-file', bak], steps, { [b]: 'DEV' });
    assert.equal(cm, cs, `${dev} <- ${bak}`);
    assert.ok(readFileSync(b).equals(readFileSync(dev)), 'a refused restore writes nothing');
    seen.push(cs);
  }
  const all = seen.join('\n');
  for (const line of [
    'Device DEV does not contain LUKS2 header. Replacing header can destroy data on that device.',
    'Device DEV already contains LUKS2 header. Replacing header will destroy existing keyslots.',
    'WARNING: real device header has different UUID than backup!',
    'Unsupported LUKS version 2.',
    'Device DEV does not contain LUKS header. Replacing header can destroy data on that device.',
    'Device DEV already contains LUKS header. Replacing header will destroy existing keyslots.',
  ])
    assert.ok(all.includes(line), `no case printed '${line}':\n${all}`);
  assert.ok(
    seen.every((t) => /: n\n\nEXIT 1\n?$/.test(t)),
    all,
  );
});

test('reencrypt to a new key asks for the passphrase of every keyslot and keeps each (cryptsetup); a key file serves only one keyslot', async () => {
  // cryptmap used to ask once and re-wrap only the keyslot that passphrase opened: the other
  // passphrases stopped opening the volume when the reencryption finished.
  const img = await image('luks2', true);
  const args = ['reencrypt', '--force-offline-reencrypt', ...FAST_PBKDF, 'IMG'];
  const done = await same(img, args, 'old\nnew\n');
  assert.equal(done.code, 0);
  assert.equal(done.slots.split(',').length, 2, `two keyslots of the new key: ${done.slots}`);
  for (const pass of ['old', 'new'])
    assert.equal((await exec(CS, ['open', '--test-passphrase', '-d', kf(pass), `${img}.cm`])).code, 0, pass);
  // A wrong passphrase for the second keyslot: exit 2, nothing written.
  const before = readFileSync(img);
  assert.deepEqual(await same(img, args, 'old\nwrong\n'), {
    code: 2,
    err: 'No key available with this passphrase.',
    slots: '0,1',
  });
  assert.ok(readFileSync(`${img}.cm`).equals(before), 'a refused reencryption wrote to the device');
  // A key file with two keyslots active and no --key-slot: refused (exit 1); with -S it re-wraps that slot only.
  assert.deepEqual(await same(img, [...args, '-q', '-d', kf('old')]), {
    code: 1,
    err: 'Key file can be used only with --key-slot or with exactly one key slot active.',
    slots: '0,1',
  });
  assert.equal((await same(img, [...args, '-q', '-S', '1', '-d', kf('new')])).code, 0);
  // On a terminal: the same prompts, one per keyslot, a wrong passphrase asked again (--tries).
  const cmBin = [process.execPath, ENTRY];
  const steps: [string, string | null][] = [
    ['Enter passphrase for key slot 0:', 'old'],
    ['Enter passphrase for key slot 1:', 'wrong'],
    ['No key available with this passphrase.', null],
    ['Enter passphrase for key slot 1:', 'new'],
  ];
  const t: string[] = [];
  for (const bin of [[CS], cmBin]) {
    const copy = `${img}.tty${t.length}`;
    copyFileSync(img, copy);
    const out = await dialog(
      bin,
      args.map((x) => (x === 'IMG' ? copy : x)),
      steps,
      { [copy]: 'IMG' },
    );
    t.push(out.replace(/\n[^\n]*Finished, time[^\n]*/, ''));
  }
  assert.equal(t[1], t[0]);
  assert.match(t[0]!, /EXIT 0/);
});

test('reencrypt of a regular file offline: refused in batch mode, asked on a terminal, as cryptsetup 2.6 (it cannot tell whether a mapping over a loop device of the file is active)', async () => {
  const img = await image('luks2');
  const before = readFileSync(img);
  // Batch mode: refused before anything is written (exit 1).
  const refused = await same(img, ['reencrypt', '-q', ...FAST_PBKDF, 'IMG'], 'old\n');
  assert.deepEqual(refused, {
    code: 1,
    err: 'Use --force-offline-reencrypt to bypass the check and run in offline mode (dangerous!).',
    slots: '0',
  });
  assert.ok(readFileSync(`${img}.cm`).equals(before), 'a refused reencryption wrote to the device');
  assert.ok(readFileSync(`${img}.cs`).equals(before), "cryptsetup's refused reencryption wrote to the device");
  const r = await cryptmap(['reencrypt', '-q', ...FAST_PBKDF, `${img}.cm`], 'old\n');
  assert.equal(
    r.stderr,
    `Device ${img}.cm is not a block device. Can not auto-detect if it is active or not.\n` +
      'Use --force-offline-reencrypt to bypass the check and run in offline mode (dangerous!).\n',
  );
  // On a terminal: cryptsetup's question after the passphrase; no is "Operation aborted." (exit 1).
  const cmBin = [process.execPath, ENTRY];
  const steps: [string, string][] = [
    ['Enter passphrase for key slot 0:', 'old'],
    ["Are you sure? (Type 'yes' in capital letters):", 'n'],
  ];
  const t: string[] = [];
  for (const bin of [[CS], cmBin]) {
    const copy = `${img}.tty${t.length}`;
    copyFileSync(img, copy);
    t.push(await dialog(bin, ['reencrypt', ...FAST_PBKDF, copy], steps, { [copy]: 'IMG' }));
    assert.equal(await slots(copy), '0');
  }
  assert.equal(t[1], t[0]);
  assert.match(t[0]!, /Unable to decide if device IMG is activated or not\.\n.*Operation aborted\.\n.*EXIT 1/s);
  // cryptmap asks before it writes anything (cryptsetup has already added and wiped the new keyslot then).
  assert.ok(readFileSync(`${img}.tty1`).equals(before), 'an aborted reencryption wrote to the device');
  // --init-only (no data rewritten) and --force-offline-reencrypt are not refused.
  for (const flag of ['--init-only', '--force-offline-reencrypt']) {
    const done = await same(img, ['reencrypt', '-q', flag, ...FAST_PBKDF, 'IMG', '-d', kf('old')]);
    assert.equal(done.code, 0, flag);
  }
});
