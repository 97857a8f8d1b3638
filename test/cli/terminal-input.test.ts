// The terminal reads (commands/terminal-input.ts) settle when the terminal's input ends, as
// cryptsetup's: "Error reading passphrase from terminal." / "Error reading response from terminal."
// (exit 1), not a wait for ever; what was typed is wiped. The real-terminal comparison with cryptsetup
// is in cryptsetup-parity.interop.test.ts (R13).
import assert from 'node:assert/strict';
import { PassThrough } from 'node:stream';
import { test } from 'node:test';
import { TerminalInput } from '../../src/cli/commands/terminal-input.js';
import { CryptmapError } from '../../src/util/errors.js';
import { within } from '../helpers/wait.js';
import { Sink } from '../luks/helpers.js';

/** A terminal on standard input: a stream with isTTY and a raw-mode switch that remembers its state. */
function tty(): { stdin: PassThrough & { isTTY: boolean }; raw: () => boolean; stderr: Sink; input: TerminalInput } {
  let raw = false;
  const stdin = Object.assign(new PassThrough(), {
    isTTY: true,
    setRawMode: (on: boolean) => {
      raw = on;
    },
  });
  const stderr = new Sink();
  return { stdin, raw: () => raw, stderr, input: new TerminalInput({ stdin, stderr }) };
}

const PASS_EOF = (e: unknown) =>
  e instanceof CryptmapError &&
  e.code === 'ETTY' &&
  e.message === 'Error reading passphrase from terminal.' &&
  e.exitCode === 1;

test('a passphrase prompt whose terminal input ends fails as cryptsetup (exit 1), the typed bytes wiped', async () => {
  const t = tty();
  const typed = Buffer.from('half a pass');
  const p = t.input.getPassphrase('Enter passphrase for x: ');
  t.stdin.write(typed);
  t.stdin.end();
  await within(assert.rejects(p, PASS_EOF), 10_000, 'the prompt to fail at the end of input');
  assert.ok(
    typed.every((b) => b === 0),
    'the chunk read from the terminal was not wiped',
  );
  assert.equal(t.raw(), false, 'the terminal was left in raw mode');
  assert.equal(t.stderr.data, 'Enter passphrase for x: '); // no newline after the prompt, as cryptsetup
});

test('Ctrl-D on an empty line is the end of input; after text it is not', async () => {
  let t = tty();
  let p = t.input.getPassphrase('Enter passphrase for x: ');
  t.stdin.write(Buffer.from([0x04]));
  await within(assert.rejects(p, PASS_EOF), 10_000, 'Ctrl-D to end the prompt');
  t = tty();
  p = t.input.getPassphrase('Enter passphrase for x: ');
  t.stdin.write(Buffer.from('pw\r'));
  assert.equal((await within(p, 10_000, 'the passphrase line')).toString(), 'pw');
  assert.equal(t.stderr.data, 'Enter passphrase for x: \n');
});

test('the YES confirmation whose terminal input ends fails as cryptsetup (exit 1)', async () => {
  const t = tty();
  const p = t.input.confirm('This will overwrite data on x irrevocably.', false);
  t.stdin.end('YE');
  await within(
    assert.rejects(
      p,
      (e: unknown) =>
        e instanceof CryptmapError &&
        e.code === 'ETTY' &&
        e.message === 'Error reading response from terminal.' &&
        e.exitCode === 1,
    ),
    10_000,
    'the confirmation to fail at the end of input',
  );
  const ended = tty();
  ended.stdin.end();
  ended.stdin.resume();
  await new Promise((r) => ended.stdin.once('end', r));
  await within(
    assert.rejects(ended.input.confirm('Again?', false), (e: CryptmapError) => e.code === 'ETTY'),
    10_000,
    'a confirmation on an input that already ended to fail',
  );
});
