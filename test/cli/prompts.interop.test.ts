// cryptsetup 2.6's questions and what follows them, with /usr/sbin/cryptsetup as the oracle: each case
// runs the same command line with cryptsetup and with cryptmap, each in a fresh directory of its own
// holding the same files (named by relative paths, so the transcripts compare as they are), on a
// pseudo-terminal (pty-dialog.py, every wait with a deadline) or with standard input a pipe; the
// transcript, the exit code and the files left must agree. None of these needs device-mapper.
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, readdirSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { FAST_PBKDF } from '../helpers/luks.js';
import { runTool } from '../helpers/tools.js';
import { fileTempDir } from '../helpers/tmp.js';
import { ENTRY } from './harness.js';
import { readVolume, startDaemon } from '../load/helpers.js';

const CS = '/usr/sbin/cryptsetup';
const CM = [process.execPath, ENTRY];
const root = fileTempDir('cryptmap-prompts-');
const PTY = fileURLToPath(new URL('../../../test/cli/pty-dialog.py', import.meta.url));
const YES = "Are you sure? (Type 'yes' in capital letters):";
const EOF: [string, string, boolean] = [YES, '\u0004', true];

let n = 0;
/** Files in `dir`: name, mode and size (what a verb left behind). */
function listing(dir: string): string {
  return readdirSync(dir)
    .sort()
    .map((f) => {
      const st = statSync(join(dir, f));
      return `${f} ${(st.mode & 0o777).toString(8)} ${st.size}`;
    })
    .join('\n');
}

/** On a pty answering `steps` ([text awaited, line sent, sent raw]), or `input` on a pipe. */
type How = { steps: [string, string | null, boolean?][] } | { input: string };

interface Run {
  /** The terminal transcript (or stdout + stderr with a pipe) and "EXIT n". */
  out: string;
  files: string;
  dir: string;
}

/** Run `args` with `bin` in a new directory prepared by `setup`: on a pty answering `steps`, or with `input` piped. */
async function run(
  bin: string[],
  setup: (dir: string) => void | Promise<void>,
  args: string[],
  how: How,
  env: NodeJS.ProcessEnv = process.env,
): Promise<Run> {
  const dir = join(root, `r${n++}`);
  mkdirSync(dir);
  await setup(dir);
  let out: string;
  if ('steps' in how) {
    const r = await runTool('python3', [PTY, JSON.stringify(how.steps), '60', ...bin, ...args], { cwd: dir, env });
    out = r.stdout.replaceAll('\r', '');
  } else {
    const r = await runTool(bin[0]!, [...bin.slice(1), ...args], { cwd: dir, input: how.input, env });
    out = `${r.stdout}${r.stderr}\nEXIT ${r.code}\n`;
  }
  // A reencryption's progress lines depend on timing: left out.
  out = out.replace(/(\x1b\[2K(Progress|Finished)[^\n\x1b]*)+/g, '');
  return { out, files: listing(dir), dir };
}

/** Both binaries, compared; cryptsetup's run is returned. */
async function same(
  setup: (dir: string) => void | Promise<void>,
  args: string[],
  how: How,
  what: string,
): Promise<{ cs: Run; cm: Run }> {
  const cs = await run([CS], setup, args, how);
  const cm = await run(CM, setup, args, how);
  assert.equal(cm.out, cs.out, `${what}: the transcript differs`);
  assert.equal(cm.files, cs.files, `${what}: the files left differ`);
  return { cs, cm };
}

function data(dir: string, name = 'd', mib = 20): void {
  writeFileSync(join(dir, name), '');
  truncateSync(join(dir, name), mib << 20);
}
function key(dir: string): void {
  writeFileSync(join(dir, 'key'), 'pw', { mode: 0o600 });
}
const dataAndKey = (dir: string) => {
  data(dir);
  key(dir);
};
const exitOf = (out: string) => Number(/EXIT (\d+)\n?$/.exec(out)?.[1]);

test('luksFormat --header FILE that does not exist: "Header file does not exist, do you want to create it?" as cryptsetup', async () => {
  const fmt = ['luksFormat', ...FAST_PBKDF, '--header', 'h', 'd', 'key'];
  // Yes: made (0600), grown to the header's size, and no "overwrite" question after it.
  const yes = await same(dataAndKey, fmt, { steps: [[YES, 'YES']] }, 'yes');
  assert.match(yes.cs.out, /Header file does not exist, do you want to create it\?/);
  assert.doesNotMatch(yes.cs.out, /overwrite/);
  assert.match(yes.cm.files, /^h 600 16777216$/m);
  assert.equal(exitOf(yes.cm.out), 0);
  // cryptsetup reads cryptmap's header, with the data device beside it.
  assert.equal((await runTool(CS, ['isLuks', join(yes.cm.dir, 'h')])).code, 0);
  // No, and the end of input: exit 2 ("Operation aborted." and a blank line), no file.
  for (const [steps, what] of [
    [[[YES, 'no']], 'no'],
    [[[YES, 'yes']], 'lower-case yes'],
    [[EOF], 'end of input'],
  ] as [[string, string | null, boolean?][], string][]) {
    const r = await same(dataAndKey, fmt, { steps }, what);
    assert.equal(exitOf(r.cm.out), 2, what);
    assert.doesNotMatch(r.cm.files, /^h /m, what);
  }
  const no = await same(dataAndKey, ['-v', ...fmt], { steps: [[YES, 'no']] }, '-v no');
  assert.match(no.cm.out, /Operation aborted\.\n\nCommand failed with code -2 \(no permission or bad passphrase\)\./);
  // -q, or standard input not a terminal: no question, the file is made.
  const cases: [How, string[], string][] = [
    [{ steps: [] }, ['-q'], '-q on a terminal'],
    [{ input: '' }, [], 'a pipe'],
  ];
  for (const [how, extra, what] of cases) {
    const r = await same(dataAndKey, [...extra, ...fmt], how, what);
    assert.equal(exitOf(r.cm.out), 0, what);
    assert.match(r.cm.files, /^h 600 16777216$/m, what);
  }
  // A directory that does not exist: "Cannot create header file h." after the question, exit 1.
  const nodir = await same(
    dataAndKey,
    ['luksFormat', ...FAST_PBKDF, '--header', 'no/h', 'd', 'key'],
    { steps: [[YES, 'YES']] },
    'no directory',
  );
  assert.match(nodir.cm.out, /Cannot create header file no\/h\.\n\nEXIT 1/);
  // An existing header file: the usual question.
  const old = await same(
    (d) => {
      dataAndKey(d);
      data(d, 'h', 1);
    },
    fmt,
    { steps: [[YES, 'YES']] },
    'existing header',
  );
  assert.match(old.cm.out, /This will overwrite data on h irrevocably\./);
});

test('luksFormat --header with a missing data device: the questions first, then exit 3 (cryptmap removes the header file it made)', async () => {
  const fmt = ['luksFormat', ...FAST_PBKDF, '--header', 'h', 'missing', 'key'];
  const existing = await same(
    (d) => {
      key(d);
      data(d, 'h', 1);
    },
    fmt,
    { steps: [[YES, 'YES']] },
    'existing header',
  );
  assert.match(
    existing.cm.out,
    /overwrite data on h irrevocably[\s\S]*Device missing does not exist or access denied\.\n\nEXIT 3/,
  );
  const cs = await run([CS], key, fmt, { steps: [[YES, 'YES']] });
  const cm = await run(CM, key, fmt, { steps: [[YES, 'YES']] });
  assert.equal(cm.out, cs.out);
  assert.match(cm.out, /Header file does not exist[\s\S]*Device missing does not exist or access denied\.\n\nEXIT 3/);
  // cryptsetup leaves the 4 KiB it made; cryptmap leaves nothing it made behind a failed format.
  assert.match(cs.files, /^h 600 4096$/m);
  assert.doesNotMatch(cm.files, /^h /m);
});

test('luksFormat wipes the signatures it found (a GPT backup header at the end too), with -q as well; -v names each', async () => {
  // A GPT (sgdisk, package gdisk): PMBR, primary header at 512 and the backup at the last sector,
  // the last outside the LUKS1 header, so only the wipe removes it.
  // One image copied for both (sgdisk picks random GUIDs).
  const template = join(root, 'gpt.img');
  data(root, 'gpt.img');
  const r = await runTool('sgdisk', ['-n', '1:2048:+8M', template]);
  assert.equal(r.code, 0, r.stderr);
  const gpt = (dir: string) => {
    key(dir);
    copyFileSync(template, join(dir, 'd'));
  };
  for (const extra of [['-v'], ['-q']]) {
    const fmt = ['luksFormat', ...extra, '--type', 'luks1', ...FAST_PBKDF, 'd', 'key'];
    const { cs, cm } = await same(gpt, fmt, { input: '' }, extra.join(' '));
    if (extra[0] === '-v')
      assert.match(
        cm.out,
        /^WARNING: Device d already contains a 'gpt' partition signature\.\n(Existing '(gpt|PMBR)' partition signature on device d will be wiped\.\n){3}Key slot 0 created\./,
      );
    // Past the LUKS1 header (2 MiB) both images are the same: what was wiped and what was left.
    const tail = (dir: string) => runTool('cmp', ['-i', `${2 << 20}`, join(cs.dir, 'd'), join(dir, 'd')]);
    assert.equal((await tail(cm.dir)).code, 0, (await tail(cm.dir)).stdout);
    const left = await runTool('wipefs', ['--no-act', '--noheadings', '--output', 'TYPE', join(cm.dir, 'd')]);
    assert.equal(left.stdout.trim(), 'crypto_LUKS');
  }
});

/** cryptmap's daemon for the plain opens (cryptsetup fails at device-mapper after its questions). */
async function withDaemon<T>(body: (env: NodeJS.ProcessEnv) => Promise<T>): Promise<T> {
  const runDir = join(root, `run${n++}`);
  const daemon = await startDaemon(runDir);
  try {
    return await body({ ...process.env, CRYPTMAP_RUNTIME_DIR: runDir });
  } finally {
    await daemon.kill();
  }
}

test('open --type plain on a device with signatures: blkid\'s notes and "Detected device signature(s) on DEV." as cryptsetup; --hash ignored with a key file', {
  timeout: 600_000,
}, async () => {
  const ext4 = async (dir: string) => {
    data(dir);
    key(dir);
    writeFileSync(join(dir, 'kf'), 'k'.repeat(64), { mode: 0o600 });
    const r = await runTool('mkfs.ext4', ['-q', '-F', join(dir, 'd')]);
    assert.equal(r.code, 0, r.stderr);
  };
  await withDaemon(async (env) => {
    const open = ['open', '--type', 'plain', 'd', 'x'];
    for (const [steps, what] of [
      [[[YES, 'no']], 'no'],
      [[EOF], 'end of input'],
    ] as [[string, string | null, boolean?][], string][]) {
      const cs = await run([CS], ext4, open, { steps });
      const cm = await run(CM, ext4, open, { steps }, env);
      assert.equal(cm.out, cs.out, what);
      assert.match(
        cm.out,
        /^WARNING: Device d already contains a 'ext4' superblock signature\.\n\nWARNING!\n========\nDetected device signature\(s\) on d\. Proceeding further may damage existing data\.\n\nAre you sure\? \(Type 'yes' in capital letters\): /,
      );
      assert.equal(exitOf(cm.out), 1, what);
    }
    // Yes, -q (no notes, no question) and --offset (no probe): then the passphrase, as cryptsetup asks
    // it ("for d"); cryptsetup stops at device-mapper there, cryptmap maps it.
    for (const [args, steps, what] of [
      [open, [[YES, 'YES']], 'yes'],
      [['-q', ...open], [], '-q'],
      [['--offset', '8', ...open], [], '--offset'],
    ] as [string[], [string, string | null, boolean?][], string][]) {
      const ask = 'Enter passphrase for d: ';
      const cs = await run([CS], ext4, args, { steps: [...steps, [ask, 'pw']] });
      const cm = await run(CM, ext4, args, { steps: [...steps, [ask, 'pw']] }, env);
      const upTo = (s: string) => s.slice(0, s.indexOf(ask) + ask.length);
      assert.ok(cs.out.includes(ask), `${what}: ${cs.out}`);
      assert.equal(upTo(cm.out), upTo(cs.out), what);
      assert.equal(exitOf(cm.out), 0, `${what}: ${cm.out}`);
      assert.equal((await runTool(process.execPath, [ENTRY, 'close', 'x'], { env })).code, 0);
    }
    // Standard input a pipe: the notes, no question.
    const cs = await run([CS], ext4, open, { input: 'pw\n' });
    const cm = await run(CM, ext4, open, { input: 'pw\n' }, env);
    const notes = (s: string) => s.split('\n').filter((l) => l.startsWith('WARNING'));
    assert.deepEqual(notes(cm.out), notes(cs.out));
    assert.equal(notes(cm.out).length, 1);
    assert.equal(exitOf(cm.out), 0, cm.out);
    await runTool(process.execPath, [ENTRY, 'close', 'x'], { env });
    // A key file is the key, raw: --hash is ignored with cryptsetup's warning (the same key as without it).
    const withHash = ['open', '--type', 'plain', '--hash', 'sha256', '-d', 'kf', 'd', 'x'];
    const hcs = await run([CS], ext4, withHash, { input: '' });
    const hcm = await run(CM, ext4, withHash, { input: '' }, env);
    assert.deepEqual(notes(hcm.out), notes(hcs.out));
    assert.equal(exitOf(hcm.out), 0, hcm.out);
    assert.ok(
      notes(hcs.out).includes('WARNING: The --hash parameter is being ignored in plain mode with keyfile specified.'),
    );
    const run2 = env.CRYPTMAP_RUNTIME_DIR!;
    const a = await readVolume(run2, 'x', 20 << 20);
    await runTool(process.execPath, [ENTRY, 'close', 'x'], { env });
    const plainDir = hcm.dir;
    const r = await runTool(process.execPath, [ENTRY, 'open', '--type', 'plain', '-q', '-d', 'kf', 'd', 'x'], {
      cwd: plainDir,
      env,
    });
    assert.equal(r.code, 0, r.stderr);
    const b = await readVolume(run2, 'x', 20 << 20);
    await runTool(process.execPath, [ENTRY, 'close', 'x'], { env });
    assert.ok(a.equals(b), 'the key file was hashed with --hash');
  });
});

test('reencrypt --encrypt: the header question with --header FILE that does not exist; the temporary header cryptsetup names without --header', async () => {
  const enc = ['reencrypt', '--encrypt', ...FAST_PBKDF];
  const pass: [string, string][] = [
    ['Enter passphrase for h: ', 'pw'],
    ['Verify passphrase: ', 'pw'],
  ];
  const yes = await same(data, [...enc, '--header', 'h', 'd'], { steps: [[YES, 'YES'], ...pass] }, 'yes');
  assert.match(yes.cm.out, /Header file does not exist, do you want to create it\?/);
  assert.equal(exitOf(yes.cm.out), 0);
  assert.equal((await runTool(CS, ['isLuks', join(yes.cm.dir, 'h')])).code, 0);
  for (const [steps, what] of [
    [[[YES, 'no']], 'no'],
    [[EOF], 'end of input'],
  ] as [[string, string | null, boolean?][], string][]) {
    const r = await same(data, [...enc, '--header', 'h', 'd'], { steps }, what);
    assert.equal(exitOf(r.cm.out), 2, what);
  }
  // Data shift: cryptsetup asks about (and prompts for) its LUKS2-temp-<UUID>.new, the UUID the device gets.
  const args = [...enc, '--reduce-device-size', '8M', 'd'];
  const steps: [string, string][] = [
    [YES, 'YES'],
    ['.new: ', 'pw'],
    ['Verify passphrase: ', 'pw'],
  ];
  const cs = await run([CS], data, args, { steps });
  const cm = await run(CM, data, args, { steps });
  const uuid = (await runTool(CS, ['luksUUID', join(cm.dir, 'd')])).stdout.trim();
  assert.match(uuid, /^[0-9a-f-]{36}$/);
  const temp = /LUKS2-temp-([0-9a-f-]{36})\.new/g;
  assert.equal(cm.out.replaceAll(uuid, 'UUID'), cs.out.replace(temp, 'LUKS2-temp-UUID.new'));
  assert.match(cm.out, new RegExp(`This will overwrite data on LUKS2-temp-${uuid}\\.new irrevocably\\.`));
  assert.equal(cm.files, cs.files);
});

test('the questions of luksKillSlot, luksRemoveKey (last keyslot), erase, convert, luksUUID, luksDump --dump-volume-key: no and the end of input as cryptsetup (message, exit code, header kept)', async () => {
  const tpl = join(root, 'luks2.img');
  data(root, 'luks2.img');
  key(root);
  const f = await runTool(CS, ['-q', 'luksFormat', '--type', 'luks2', ...FAST_PBKDF, tpl, join(root, 'key')]);
  assert.equal(f.code, 0, f.stderr);
  const setup = (dir: string) => {
    copyFileSync(tpl, join(dir, 'd'));
    key(dir);
  };
  const cases: [string[], [string, string][]][] = [
    [['luksKillSlot', 'd', '0'], []],
    [['-v', 'luksKillSlot', 'd', '0'], []],
    [['luksRemoveKey', 'd'], [['Enter passphrase to be deleted: ', 'pw']]],
    [['erase', 'd'], []],
    [['-v', 'erase', 'd'], []],
    [['convert', '--type', 'luks1', 'd'], []],
    [['luksUUID', '--uuid', '11111111-2222-3333-4444-555555555555', 'd'], []],
    [['luksDump', '--dump-volume-key', 'd'], []],
  ];
  for (const [args, before] of cases) {
    for (const [answer, what] of [
      [[YES, 'no'], 'no'],
      [EOF, 'end of input'],
    ] as [[string, string, boolean?], string][]) {
      const r = await same(setup, args, { steps: [...before, answer] }, `${args.join(' ')}: ${what}`);
      assert.notEqual(exitOf(r.cm.out), 0, `${args.join(' ')}: ${what}`);
      const dump = await runTool(CS, ['luksDump', join(r.cm.dir, 'd')]);
      assert.match(dump.stdout, /^Version:\s+2\n/m, `${args.join(' ')}: ${what}: the header is kept`);
      assert.match(dump.stdout, /^ {2}0: luks2$/m, `${args.join(' ')}: ${what}: keyslot 0 is kept`);
    }
  }
});
