/**
 * Verbs that change an active volume, as a user runs them against `cryptmap daemon`:
 * - `open --persistent` (cryptsetup-open(8)): the command line's activation flags go to the LUKS2
 *   header (config.flags, shown by `cryptsetup luksDump`) and apply to every later open; alone it
 *   clears them; LUKS1 warns; `--persistent --test-passphrase` is refused.
 * - `refresh` (cryptsetup-refresh(8)): new flags without closing.
 * - `resize` (cryptsetup-resize(8)): the mapping follows a grown file, or takes --size/--device-size.
 */
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { cryptmap, exec, ok, useDaemon } from './harness.js';
import { FAST_PBKDF } from '../helpers/luks.js';

const fx = useDaemon('cm-persist-');
const cm = (...args: string[]) => cryptmap(args);

async function format(type: 'luks1' | 'luks2', name: string): Promise<{ img: string; key: string }> {
  const img = join(fx.dir, `${name}.img`);
  const key = join(fx.dir, `${name}.key`);
  writeFileSync(key, `passphrase of ${name}`, { mode: 0o600 });
  writeFileSync(img, Buffer.alloc(0));
  await ok('truncate', ['-s', '32M', img]);
  await ok('cryptsetup', ['luksFormat', '--batch-mode', '--type', type, ...FAST_PBKDF, '--key-file', key, img]);
  return { img, key };
}

const flagsLine = (dump: string) => /^Flags:\s*(.*)$/m.exec(dump)?.[1]?.trim();

test('open --persistent stores the flags in the LUKS2 header (cryptsetup luksDump shows them); later opens use them; --persistent alone clears them', async () => {
  const { img, key } = await format('luks2', 'p2');
  assert.equal(flagsLine(await ok('cryptsetup', ['luksDump', img])), '(no flags)');
  const first = await cm(
    'open',
    '--runtime-dir',
    fx.run,
    '--key-file',
    key,
    '--persistent',
    '--allow-discards',
    '--perf-no_read_workqueue',
    img,
    'p2',
  );
  assert.equal(first.code, 0, first.stderr);
  assert.equal(first.stderr, '');
  assert.equal(flagsLine(await ok('cryptsetup', ['luksDump', img])), 'allow-discards no-read-workqueue');
  assert.match(
    (await cm('status', '--runtime-dir', fx.run, 'p2')).stdout,
    /^ {2}flags: {3}discards no_read_workqueue $/m,
  );
  assert.equal((await cm('close', '--runtime-dir', fx.run, 'p2')).code, 0);
  // cryptsetup still accepts the header, and a plain open now gets the stored flags.
  await ok('cryptsetup', ['open', '--test-passphrase', '--key-file', key, img]);
  assert.equal((await cm('open', '--runtime-dir', fx.run, '--key-file', key, img, 'p2')).code, 0);
  assert.match(
    (await cm('status', '--runtime-dir', fx.run, 'p2')).stdout,
    /^ {2}flags: {3}discards no_read_workqueue $/m,
  );
  assert.equal((await cm('close', '--runtime-dir', fx.run, 'p2')).code, 0);
  // --persistent with no flags: the stored flags are cleared, as cryptsetup does (after this
  // activation, which was made with the flags the header still held).
  assert.equal((await cm('open', '--runtime-dir', fx.run, '--key-file', key, '--persistent', img, 'p2')).code, 0);
  assert.equal(flagsLine(await ok('cryptsetup', ['luksDump', img])), '(no flags)');
  assert.equal((await cm('close', '--runtime-dir', fx.run, 'p2')).code, 0);
  assert.equal((await cm('open', '--runtime-dir', fx.run, '--key-file', key, img, 'p2')).code, 0);
  assert.doesNotMatch((await cm('status', '--runtime-dir', fx.run, 'p2')).stdout, /flags:/);
  assert.equal((await cm('close', '--runtime-dir', fx.run, 'p2')).code, 0);
});

test('open --persistent on LUKS1 activates and warns; --persistent --test-passphrase is refused', async () => {
  const { img, key } = await format('luks1', 'p1');
  const r = await cm('open', '--runtime-dir', fx.run, '--key-file', key, '--persistent', '--allow-discards', img, 'p1');
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stderr, 'Device activated but cannot make flags persistent.\n');
  assert.match((await cm('status', '--runtime-dir', fx.run, 'p1')).stdout, /flags: {3}discards/);
  assert.equal((await cm('close', '--runtime-dir', fx.run, 'p1')).code, 0);
  const t = await cm('open', '--test-passphrase', '--persistent', '--key-file', key, img);
  assert.equal(t.code, 1);
  assert.match(t.stderr, /Option --persistent is not allowed with --test-passphrase\./);
});

test('refresh changes the flags of an active LUKS volume without closing it; wrong key, plain, unknown names as cryptsetup', async () => {
  const { img, key } = await format('luks2', 'r2');
  assert.equal((await cm('open', '--runtime-dir', fx.run, '--key-file', key, img, 'r2')).code, 0);
  // Data written before the refresh reads back after it, over the same export.
  const uri = `nbd+unix:///r2?socket=${join(fx.run, 'nbd.sock')}`;
  await ok('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5c 1M 64k', uri]);
  const r = await cm(
    'refresh',
    '--runtime-dir',
    fx.run,
    '--key-file',
    key,
    '--allow-discards',
    '--perf-same_cpu_crypt',
    'r2',
  );
  assert.equal(r.code, 0, r.stderr);
  assert.match((await cm('status', '--runtime-dir', fx.run, 'r2')).stdout, /^ {2}flags: {3}discards same_cpu_crypt $/m);
  assert.match(await ok('qemu-io', ['-f', 'raw', '-c', 'read -P 0x5c 1M 64k', uri]), /read 65536\/65536 bytes/);
  assert.equal(
    flagsLine(await ok('cryptsetup', ['luksDump', img])),
    '(no flags)',
    'without --persistent the header is unchanged',
  );
  // A wrong key file: exit 2, flags unchanged.
  const wrong = join(fx.dir, 'wrong.key');
  writeFileSync(wrong, 'not the passphrase', { mode: 0o600 });
  assert.equal((await cm('refresh', '--runtime-dir', fx.run, '--key-file', wrong, 'r2')).code, 2);
  assert.match((await cm('status', '--runtime-dir', fx.run, 'r2')).stdout, /flags: {3}discards same_cpu_crypt/);
  // No flags given: back to none; with --persistent the given flags land in the header too.
  assert.equal((await cm('refresh', '--runtime-dir', fx.run, '--key-file', key, 'r2')).code, 0);
  assert.doesNotMatch((await cm('status', '--runtime-dir', fx.run, 'r2')).stdout, /flags:/);
  assert.equal(
    (await cm('refresh', '--runtime-dir', fx.run, '--key-file', key, '--persistent', '--allow-discards', 'r2')).code,
    0,
  );
  assert.equal(flagsLine(await ok('cryptsetup', ['luksDump', img])), 'allow-discards');
  assert.match((await cm('status', '--runtime-dir', fx.run, 'r2')).stdout, /^ {2}flags: {3}discards $/m);
  assert.equal((await cm('close', '--runtime-dir', fx.run, 'r2')).code, 0);
  // Not active: exit 4. A plain volume: not refreshed here, exit 1.
  const gone = await cm('refresh', '--runtime-dir', fx.run, '--key-file', key, 'r2');
  assert.equal(gone.code, 4);
  assert.match(gone.stderr, /Device r2 is not active\./);
  const plainKey = join(fx.dir, 'plain.key');
  writeFileSync(plainKey, Buffer.alloc(32, 7), { mode: 0o600 });
  assert.equal(
    (await cm('open', '--runtime-dir', fx.run, '--type', 'plain', '--key-file', plainKey, img, 'pl')).code,
    0,
  );
  const pl = await cm('refresh', '--runtime-dir', fx.run, '--key-file', plainKey, 'pl');
  assert.equal(pl.code, 1);
  assert.match(pl.stderr, /pl is not active LUKS device name or header is missing\./);
  assert.equal((await cm('close', '--runtime-dir', fx.run, 'pl')).code, 0);
});

test('resize follows a grown file, takes --size and --device-size, and refuses what cryptsetup refuses', async () => {
  const { img, key } = await format('luks2', 'z2');
  const dump = await ok('cryptsetup', ['luksDump', img]);
  const offsetSectors = Number(/offset:\s+(\d+) \[bytes\]/.exec(dump)?.[1]) / 512;
  assert.ok(offsetSectors > 0);
  assert.equal((await cm('open', '--runtime-dir', fx.run, '--key-file', key, img, 'z2')).code, 0);
  const uri = `nbd+unix:///z2?socket=${join(fx.run, 'nbd.sock')}`;
  const sizeOf = async () => Number((await ok('nbdinfo', ['--size', uri])).trim());
  assert.equal(await sizeOf(), 32 * 1048576 - offsetSectors * 512);
  await ok('qemu-io', ['-f', 'raw', '-c', 'write -P 0x3d 0 1M', uri]);
  // The file grows: resize without a size takes all of it (LUKS2 asks for the passphrase, as cryptsetup).
  await ok('truncate', ['-s', '64M', img]);
  const grow = await cm('resize', '--runtime-dir', fx.run, '--key-file', key, 'z2');
  assert.equal(grow.code, 0, grow.stderr);
  assert.equal(await sizeOf(), 64 * 1048576 - offsetSectors * 512);
  assert.match(
    (await cm('status', '--runtime-dir', fx.run, 'z2')).stdout,
    new RegExp(`size: {4}${(64 * 2048 - offsetSectors).toString()} sectors`),
  );
  assert.match(await ok('qemu-io', ['-f', 'raw', '-c', 'read -P 0x3d 0 1M', uri]), /read 1048576\/1048576 bytes/);
  await ok('qemu-io', ['-f', 'raw', '-c', 'write -P 0x4e 40M 1M', uri]);
  // Explicit sizes: sectors, bytes; misaligned to the 4096-byte crypto sector; larger than the device.
  assert.equal((await cm('resize', '--runtime-dir', fx.run, '--key-file', key, '--size', '40960', 'z2')).code, 0);
  assert.equal(await sizeOf(), 40960 * 512);
  assert.equal(
    (await cm('resize', '--runtime-dir', fx.run, '--key-file', key, '--device-size', '25165824', 'z2')).code,
    0,
  );
  assert.equal(await sizeOf(), 25165824);
  const odd = await cm('resize', '--runtime-dir', fx.run, '--key-file', key, '--size', '40961', 'z2');
  assert.equal(odd.code, 1);
  assert.match(odd.stderr, /Device size is not aligned to requested sector size\./);
  const big = await cm('resize', '--runtime-dir', fx.run, '--key-file', key, '--size', String(128 * 2048), 'z2');
  assert.equal(big.code, 1);
  assert.match(big.stderr, /is too small\./);
  const both = await cm('resize', '--runtime-dir', fx.run, '--size', '8', '--device-size', '4096', 'z2');
  assert.equal(both.code, 1);
  assert.match(both.stderr, /Options --device-size and --size cannot be combined\./);
  const wrong = join(fx.dir, 'wrong-z.key');
  writeFileSync(wrong, 'nope', { mode: 0o600 });
  assert.equal((await cm('resize', '--runtime-dir', fx.run, '--key-file', wrong, 'z2')).code, 2);
  assert.equal(await sizeOf(), 25165824, 'a refused resize changes nothing');
  // Back to the whole device: the data written past 24 MiB before the shrink is still there.
  assert.equal((await cm('resize', '--runtime-dir', fx.run, '--key-file', key, 'z2')).code, 0);
  assert.match(await ok('qemu-io', ['-f', 'raw', '-c', 'read -P 0x4e 40M 1M', uri]), /read 1048576\/1048576 bytes/);
  assert.equal((await cm('close', '--runtime-dir', fx.run, 'z2')).code, 0);
  const gone = await cm('resize', '--runtime-dir', fx.run, 'z2');
  assert.equal(gone.code, 4);
  // LUKS1 (key in the table, not the keyring): no passphrase needed, as cryptsetup.
  const l1 = await format('luks1', 'z1');
  assert.equal((await cm('open', '--runtime-dir', fx.run, '--key-file', l1.key, l1.img, 'z1')).code, 0);
  await ok('truncate', ['-s', '48M', l1.img]);
  const r1 = await cm('resize', '--runtime-dir', fx.run, 'z1');
  assert.equal(r1.code, 0, r1.stderr);
  const l1Offset = Number(/Payload offset:\s+(\d+)/.exec(await ok('cryptsetup', ['luksDump', l1.img]))?.[1]);
  assert.equal(
    Number((await ok('nbdinfo', ['--size', `nbd+unix:///z1?socket=${join(fx.run, 'nbd.sock')}`])).trim()),
    48 * 1048576 - l1Offset * 512,
  );
  assert.equal((await cm('close', '--runtime-dir', fx.run, 'z1')).code, 0);
});

test('resize over a loop device: the loop device takes its grown backing file first (as cryptsetup, LOOP_SET_CAPACITY); --device-size takes cryptsetup units', async () => {
  // compat-test [19]: plain `create` on a loop device, `truncate -s 16M` of its file, `resize` -> 32765 sectors.
  const img = join(fx.dir, 'loop-z.img');
  writeFileSync(img, Buffer.alloc(0));
  await ok('truncate', ['-s', '10M', img]);
  const loop = (await ok('losetup', ['-f', '--show', img])).trim();
  try {
    const pass = 'loop passphrase\n';
    const o = await cryptmap(
      ['create', '--runtime-dir', fx.run, 'zl', loop, '--hash', 'sha256', '--offset', '3', '--skip', '4'],
      pass,
    );
    assert.equal(o.code, 0, o.stderr);
    const size = async () =>
      /size:\s+(\d+) sectors/.exec((await cm('status', '--runtime-dir', fx.run, 'zl')).stdout)?.[1];
    assert.equal(await size(), String(20480 - 3));
    for (const [arg, sectors] of [
      ['1M', '2048'],
      ['512k', '1024'],
      ['1MiB', '2048'],
      ['1000s', '1000'],
      ['1MB', undefined],
    ] as const) {
      const r = await cm('resize', '--runtime-dir', fx.run, 'zl', '--device-size', arg);
      if (sectors === undefined) {
        // 1 MB = 1000000 bytes, not a multiple of 512: refused before anything is asked, as cryptsetup.
        assert.equal(r.code, 1);
        assert.match(r.stderr, /Device size must be multiple of 512 bytes sector\./);
      } else {
        assert.equal(r.code, 0, `--device-size ${arg}: ${r.stderr}`);
        assert.equal(await size(), sectors, `--device-size ${arg}`);
      }
    }
    await ok('truncate', ['-s', '16M', img]);
    const grow = await cm('-q', 'resize', '--runtime-dir', fx.run, 'zl');
    assert.equal(grow.code, 0, grow.stderr);
    assert.equal(await size(), String(32768 - 3));
    assert.equal(Number((await ok('blockdev', ['--getsz', loop])).trim()), 32768, 'the loop device grew');
    assert.equal((await cm('remove', '--runtime-dir', fx.run, 'zl')).code, 0);
  } finally {
    await ok('losetup', ['-d', loop]);
  }
});

test('open --device-size: a plain mapping of that many bytes (cryptsetup action_open_plain: --size in sectors), checked as cryptsetup checks it; a LUKS open ignores it as cryptsetup 2.6 does', async () => {
  const img = join(fx.dir, 'devsize.img');
  writeFileSync(img, Buffer.alloc(0));
  await ok('truncate', ['-s', '8M', img]);
  const plain = ['open', '--runtime-dir', fx.run, '--type', 'plain', '--hash', 'sha256', img, 'ds'];
  const status = async () => {
    const out = (await cm('status', '--runtime-dir', fx.run, 'ds')).stdout;
    return [/offset:\s+(\d+) sectors/.exec(out)?.[1], /size:\s+(\d+) sectors/.exec(out)?.[1]];
  };
  for (const extra of [
    ['--device-size', '1M'],
    ['--size', '2048'],
  ]) {
    const r = await cryptmap([...plain, '--offset', '4096', ...extra], 'pw\n');
    assert.equal(r.code, 0, `${extra.join(' ')}: ${r.stderr}`);
    assert.deepEqual(await status(), ['4096', '2048'], extra.join(' '));
    const uri = `nbd+unix:///ds?socket=${join(fx.run, 'nbd.sock')}`;
    assert.equal(Number((await ok('nbdinfo', ['--size', uri])).trim()), 1 << 20);
    assert.equal((await cm('close', '--runtime-dir', fx.run, 'ds')).code, 0);
  }
  // Refused before anything is read, with cryptsetup's messages (cryptsetup itself prints them too).
  for (const [extra, message] of [
    [['--device-size', '1000'], 'Device size must be multiple of 512 bytes sector.'],
    [['--device-size', '1M', '--size', '100'], 'Options --device-size and --size cannot be combined.'],
  ] as const) {
    const cs = await cryptmap([...plain, ...extra], 'pw\n');
    const real = await exec('/usr/sbin/cryptsetup', [
      'open',
      '--type',
      'plain',
      '--hash',
      'sha256',
      img,
      'ds',
      ...extra,
    ]);
    assert.deepEqual([cs.code, real.code], [1, 1], extra.join(' '));
    assert.equal(cs.stderr, `${message}\n`);
    assert.match(real.stderr, new RegExp(`cryptsetup: ${message.replaceAll('.', '\\.')}\\n$`));
  }
  // Past the device's end: cryptsetup's device_block_adjust messages, EINVAL (exit 1); nothing mapped.
  for (const [extra, message] of [
    [['--device-size', '16M'], `Device ${img} is too small.`],
    [['--device-size', '1M', '--offset', '16384'], `Requested offset is beyond real size of device ${img}.`],
  ] as const) {
    const r = await cryptmap([...plain, ...extra], 'pw\n');
    assert.deepEqual([r.code, r.stderr], [1, `${message}\n`], extra.join(' '));
    assert.equal((await cm('status', '--runtime-dir', fx.run, 'ds')).code, 4);
  }
  // LUKS: accepted and ignored (action_open_luks never reads it): the whole data segment is mapped.
  const { img: luks, key } = await format('luks2', 'dsl');
  const r = await cm('open', '--runtime-dir', fx.run, '--key-file', key, '--device-size', '1M', luks, 'ds');
  assert.equal(r.code, 0, r.stderr);
  const offset = Number(/offset:\s+(\d+) \[bytes\]/.exec(await ok('cryptsetup', ['luksDump', luks]))?.[1]);
  assert.deepEqual(await status(), [String(offset / 512), String((32 << 20) / 512 - offset / 512)]);
  assert.equal((await cm('close', '--runtime-dir', fx.run, 'ds')).code, 0);
});

test('key location as cryptsetup 2.6 reports it: LUKS2 in the keyring unless opened or resumed with --disable-keyring (then resize asks no passphrase), LUKS1 and plain in dm-crypt (compat-test2 [19], [32])', async () => {
  const { img, key } = await format('luks2', 'kl2');
  const location = async () =>
    /key location: (\S+)/.exec((await cm('status', '--runtime-dir', fx.run, 'kl')).stdout)?.[1];
  let r = await cm('open', '--runtime-dir', fx.run, '--disable-keyring', '--key-file', key, img, 'kl');
  assert.equal(r.code, 0, r.stderr);
  assert.equal(await location(), 'dm-crypt');
  // The key is not in the keyring: cryptsetup resizes without asking (empty stdin).
  r = await cryptmap(['-q', 'resize', '--runtime-dir', fx.run, '--size', '96', 'kl'], '\n');
  assert.equal(r.code, 0, r.stderr);
  // luksResume without --disable-keyring puts it in the keyring: resize needs the passphrase again.
  assert.equal((await cm('luksSuspend', '--runtime-dir', fx.run, 'kl')).code, 0);
  assert.equal((await cm('luksResume', '--runtime-dir', fx.run, '--key-file', key, 'kl')).code, 0);
  assert.equal(await location(), 'keyring');
  r = await cryptmap(['-q', 'resize', '--runtime-dir', fx.run, '--size', '88', 'kl'], '\n');
  assert.equal(r.code, 2, r.stderr);
  assert.equal((await cm('luksSuspend', '--runtime-dir', fx.run, 'kl')).code, 0);
  r = await cm('luksResume', '--runtime-dir', fx.run, '--disable-keyring', '--key-file', key, 'kl');
  assert.equal(r.code, 0, r.stderr);
  assert.equal(await location(), 'dm-crypt');
  assert.equal((await cm('close', '--runtime-dir', fx.run, 'kl')).code, 0);
  // LUKS1 and plain: dm-crypt (cryptsetup uses the keyring for LUKS2 only).
  const l1 = await format('luks1', 'kl1');
  assert.equal((await cm('open', '--runtime-dir', fx.run, '--key-file', l1.key, l1.img, 'kl')).code, 0);
  assert.equal(await location(), 'dm-crypt');
  assert.equal((await cm('close', '--runtime-dir', fx.run, 'kl')).code, 0);
  assert.equal((await cryptmap(['create', '--runtime-dir', fx.run, 'kl', l1.img, '--hash', 'sha256'], 'p\n')).code, 0);
  assert.equal(await location(), 'dm-crypt');
  assert.equal((await cm('close', '--runtime-dir', fx.run, 'kl')).code, 0);
});

test('-c as cryptsetup reads it (crypt_parse_name_and_mode): null is cipher_null-ecb (a LUKS2 volume that opens, suspends and resumes, compat-test2 [26]), a bare cipher is <cipher>-cbc-plain', async () => {
  const img = join(fx.dir, 'null.img');
  writeFileSync(img, Buffer.alloc(0));
  await ok('truncate', ['-s', '20M', img]);
  const fast = [...FAST_PBKDF];
  let r = await cryptmap(['-q', 'luksFormat', '-c', 'null', ...fast, '--type', 'luks2', img], 'pw\n');
  assert.equal(r.code, 0, r.stderr);
  assert.match(await ok('cryptsetup', ['luksDump', img]), /^\s+cipher: cipher_null-ecb$/m);
  assert.equal((await exec('cryptsetup', ['open', '--test-passphrase', img], 'pw\n')).code, 0);
  r = await cryptmap(['-q', 'luksOpen', '--runtime-dir', fx.run, img, 'cn'], 'pw\n');
  assert.equal(r.code, 0, r.stderr);
  assert.equal((await cm('luksSuspend', '--runtime-dir', fx.run, 'cn')).code, 0);
  assert.match((await cm('status', '--runtime-dir', fx.run, 'cn')).stdout, /\(suspended\)/);
  assert.equal((await cryptmap(['luksResume', '--runtime-dir', fx.run, 'cn'], 'pw\n')).code, 0);
  assert.equal((await cm('close', '--runtime-dir', fx.run, 'cn')).code, 0);
  r = await cryptmap(['create', '--runtime-dir', fx.run, 'cn', img, '-c', 'aes', '--hash', 'sha256'], 'pw\n');
  assert.equal(r.code, 0, r.stderr);
  assert.match((await cm('status', '--runtime-dir', fx.run, 'cn')).stdout, /^ {2}cipher: {2}aes-cbc-plain$/m);
  assert.equal((await cm('close', '--runtime-dir', fx.run, 'cn')).code, 0);
});
