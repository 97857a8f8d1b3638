// The one option table (src/cli/options.ts) and cryptsetup's popt order rules in main: options
// before the verb, between it and its arguments, after them; `--` ends options; `-h` is --hash;
// --help / -? print usage; options an action does not take are refused (exit 1).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { checkOptionsAllowed, parseCommandLine, takesNextValue } from '../../src/cli/options.js';
import { isCryptmapError } from '../../src/util/errors.js';

test('the verb is the first word that is not an option or its value, wherever options stand', () => {
  const a = parseCommandLine(['-q', '-d', 'key', '--pbkdf=pbkdf2', 'luksFormat', 'dev', '--hash', 'sha1', 'kf']);
  assert.equal(a.verb, 'luksFormat');
  assert.deepEqual(a.positionals, ['dev', 'kf']);
  assert.deepEqual(a.values, { 'batch-mode': true, 'key-file': 'key', pbkdf: 'pbkdf2', hash: 'sha1' });
  const b = parseCommandLine(['-qvdkey', 'open', '-S1', 'dev', 'name']);
  assert.deepEqual(
    [b.verb, b.positionals, b.values],
    ['open', ['dev', 'name'], { 'batch-mode': true, verbose: true, 'key-file': 'key', 'key-slot': '1' }],
  );
});

test('`--` ends options: later words are arguments even when they start with a dash', () => {
  const a = parseCommandLine(['-q', 'isLuks', '--', '-v', '--x']);
  assert.deepEqual([a.verb, a.positionals, a.values], ['isLuks', ['-v', '--x'], { 'batch-mode': true }]);
  const b = parseCommandLine(['--', 'luksDump', 'dev']);
  assert.deepEqual([b.verb, b.positionals], ['luksDump', ['dev']]);
});

test('-h is --hash (takes a value); --help and -? ask for usage; aliases store under their option', () => {
  assert.equal(parseCommandLine(['luksFormat', '-h', 'sha512', 'd']).values.hash, 'sha512');
  assert.equal(parseCommandLine(['-?', 'open']).help, true);
  assert.equal(parseCommandLine(['open', '--help']).help, true);
  assert.equal(
    parseCommandLine(['luksDump', '--master-key-file', 'f', '--dump-master-key', 'd']).values['volume-key-file'],
    'f',
  );
  assert.equal(takesNextValue('-h'), true);
  assert.equal(takesNextValue('-qd'), true);
  assert.equal(takesNextValue('-dkey'), false);
  assert.equal(takesNextValue('--header=x'), false);
});

test('usage errors: unknown option, missing value, value on a flag, -d twice (cryptsetup: exit 1)', () => {
  const cases: [string[], RegExp][] = [
    [['open', '--no-such'], /Unknown option '--no-such'/],
    [['open', '-X'], /Unknown option '-X'/],
    [['open', 'dev', '--header'], /requires an argument/],
    [['-d'], /requires an argument/],
    [['open', '--verbose=1'], /does not take a value/],
    [['-d', '-', 'open', '-d', 'key1', 'dev', 'n'], /^Only one --key-file argument is allowed\.$/],
  ];
  for (const [argv, re] of cases) {
    assert.throws(
      () => parseCommandLine(argv),
      (e: unknown) => isCryptmapError(e) && e.exitCode === 1 && re.test(e.message),
      argv.join(' '),
    );
  }
});

test('an option the action does not take is refused as cryptsetup does', () => {
  assert.throws(
    () => checkOptionsAllowed({ 'allow-discards': true }, 'luksDump'),
    /^CryptmapError: Option --allow-discards is not allowed with luksDump action\.$/,
  );
  assert.throws(() => checkOptionsAllowed({ uuid: 'x' }, 'open'), /not allowed with open action/);
  checkOptionsAllowed({ 'allow-discards': true, 'key-file': 'k', hash: 'sha1' }, 'open');
});
