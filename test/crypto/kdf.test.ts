// KDF vectors. PBKDF2: RFC 6070 §2 (sha1) and RFC 7914 §11 (sha256). Argon2: outputs of the
// reference `argon2` CLI (Debian package argon2, version 0x13) computed on 2026-11-28:
//   echo -n password | argon2 somesalt -id -t 2 -m 16 -p 4 -l 32 -r
//   echo -n password | argon2 somesalt -i  -t 3 -m 12 -p 1 -l 32 -r
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { test } from 'node:test';
import { argon2, calibrateKdf, deriveKey, pbkdf2 } from '../../src/crypto/kdf/index.js';

test('PBKDF2-SHA1 RFC 6070 vectors', async () => {
  assert.equal(
    (await pbkdf2('sha1', Buffer.from('password'), Buffer.from('salt'), 1, 20)).toString('hex'),
    '0c60c80f961f0e71f3a9b524af6012062fe037a6',
  );
  assert.equal(
    (await pbkdf2('sha1', Buffer.from('password'), Buffer.from('salt'), 4096, 20)).toString('hex'),
    '4b007901b765489abead49d926f721d065a429c1',
  );
});

test('PBKDF2-SHA256 RFC 7914 vector', async () => {
  const out = await pbkdf2('sha256', Buffer.from('passwd'), Buffer.from('salt'), 1, 64);
  assert.equal(out.toString('hex').slice(0, 32), '55ac046e56e3089fec1691c22544b605');
});

test('Argon2id and Argon2i match the reference CLI', async () => {
  const id = await argon2('argon2id', Buffer.from('password'), Buffer.from('somesalt'), 2, 1 << 16, 4, 32);
  assert.equal(id.toString('hex'), '1a9677b0afe81fda7b548895e7a1bfeb8668ffc19a530e37e088a668fab1c02a');
  const i = await deriveKey(
    { type: 'argon2i', time: 3, memoryKiB: 1 << 12, parallel: 1 },
    Buffer.from('password'),
    Buffer.from('somesalt'),
    32,
  );
  assert.equal(i.toString('hex'), '896874eaf0fc172dbbc1ff67a67e855d68825f82baa56e947b5067cf3d3b67c0');
});

test("argon2's prebuilt binary for this platform loads and hashes on this Node (an install with --ignore-scripts uses it)", () => {
  // argon2 0.45.x's linux-x64 prebuilt crashed Node 20 at load (SIGSEGV in napi_module_register_by_symbol):
  // its install script saw that and compiled from source, but `npm install --ignore-scripts` kept the
  // prebuilt and luksFormat's default Argon2id exited 139. A child process, since that crash is a signal.
  const pkgDir = dirname(createRequire(import.meta.url).resolve('argon2/package.json'));
  const platformDir = join(pkgDir, 'prebuilds', `${process.platform}-${process.arch}`);
  assert.ok(existsSync(platformDir), `argon2 ships a prebuilt binary for ${process.platform}-${process.arch}`);
  const glibc = Boolean(
    (process.report.getReport() as { header?: { glibcVersionRuntime?: string } }).header?.glibcVersionRuntime,
  );
  const binaries = readdirSync(platformDir).filter((f) => f.endsWith('.node') && f.includes(glibc ? 'glibc' : 'musl'));
  assert.equal(binaries.length, 1, `one ${glibc ? 'glibc' : 'musl'} binary in ${platformDir}: ${binaries.join(', ')}`);
  const script = `const b = require(${JSON.stringify(join(platformDir, binaries[0]!))});
if (typeof b.hash !== 'function') throw new Error('no hash in the binding');
require(${JSON.stringify(pkgDir)}).hash('password', { raw: true, salt: Buffer.from('somesalt'), type: 2, timeCost: 2, memoryCost: 1 << 16, parallelism: 4, hashLength: 32 })
  .then((h) => process.stdout.write(h.toString('hex')));`;
  const r = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8', timeout: 60_000 });
  assert.equal(r.signal, null, `loading ${binaries[0]} killed node with ${r.signal}`);
  assert.equal(r.status, 0, r.stderr);
  assert.equal(r.stdout, '1a9677b0afe81fda7b548895e7a1bfeb8668ffc19a530e37e088a668fab1c02a');
});

test("whirlpool through OpenSSL's legacy provider (native addon): NESSIE vector, PBKDF2", async () => {
  const { digest } = await import('../../src/crypto/kdf/hash.js');
  // ISO/IEC 10118-3 / NESSIE: Whirlpool of the empty string.
  assert.equal(
    digest('whirlpool').toString('hex'),
    '19fa61d75522a4669b44e39c1d2e1726c530232130d407f89afee0964997f7a73e83be698b288febcf88e3e03c4f0757ea8964e59b63d93708b138cc42a66eb3',
  );
  assert.equal((await pbkdf2('whirlpool', Buffer.from('a'), Buffer.from('b'), 1000, 32)).length, 32);
});

test('unknown hash is a clear error', async () => {
  await assert.rejects(pbkdf2('stribog512', Buffer.from('a'), Buffer.from('b'), 1000, 32), { code: 'EHASH' });
});

test('calibration respects minimums', async () => {
  const p = await calibrateKdf({ type: 'pbkdf2', hash: 'sha256', iterTimeMs: 1, keyBytes: 32 });
  assert.equal(p.type, 'pbkdf2');
  assert.ok(p.type === 'pbkdf2' && p.iterations >= 1000);
  const a = await calibrateKdf({ type: 'argon2id', iterTimeMs: 1, maxMemoryKiB: 1024, parallel: 1, keyBytes: 32 });
  assert.ok(a.type === 'argon2id' && a.time >= 4 && a.memoryKiB >= 32 && a.memoryKiB <= 1024);
});
