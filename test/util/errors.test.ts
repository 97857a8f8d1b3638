import assert from 'node:assert/strict';
import { inspect } from 'node:util';
import { test } from 'node:test';
import { fromHex, parseU64, toHex } from '../../src/util/bytes.js';
import { CryptmapError, EXIT_WRONG_DEVICE, fromSystemError, isCryptmapError } from '../../src/util/errors.js';
import { Secret } from '../../src/util/secret.js';

test('CryptmapError carries code, exit code and errno', () => {
  const e = new CryptmapError('ECIPHER_SPEC', 'bad spec', { exitCode: 4, errno: 'EIO' });
  assert.equal(e.code, 'ECIPHER_SPEC');
  assert.equal(e.exitCode, 4);
  assert.equal(e.errno, 'EIO');
  assert.ok(isCryptmapError(e, 'ECIPHER_SPEC'));
  assert.ok(!isCryptmapError(new Error('x')));
});

test('fromSystemError maps ENOENT to wrong-device exit code', () => {
  const sys = Object.assign(new Error('no such file'), { code: 'ENOENT' });
  const e = fromSystemError('EOPEN', 'cannot open /x', sys);
  assert.equal(e.exitCode, EXIT_WRONG_DEVICE);
  assert.equal(e.errno, 'ENOENT');
  assert.match(e.message, /cannot open \/x: no such file/);
});

test('hex and u64 parsing are strict', () => {
  assert.equal(toHex(fromHex('00ff')), '00ff');
  assert.throws(() => fromHex('0'), /not valid hex/);
  assert.throws(() => fromHex('zz'), /not valid hex/);
  assert.equal(parseU64('18446744073709551615', 'x'), 0xffffffffffffffffn);
  assert.throws(() => parseU64('18446744073709551616', 'x'), /64 bits/);
  assert.throws(() => parseU64('-1', 'x'), /unsigned/);
});

test('Secret redacts itself and wipes on dispose', () => {
  const bytes = Buffer.from('top secret key!!');
  const s = new Secret(bytes);
  assert.equal(String(s), '[secret 16 bytes]');
  assert.equal(JSON.stringify({ s }), '{"s":"[secret 16 bytes]"}');
  assert.equal(inspect(s), '[secret 16 bytes]');
  s.dispose();
  assert.ok(bytes.every((b) => b === 0));
  assert.throws(() => s.expose());
});
