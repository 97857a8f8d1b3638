/** `cryptmap benchmark`: table and --json shapes, option checks (tiny --seconds: no timing is asserted). */
import assert from 'node:assert/strict';
import { PassThrough } from 'node:stream';
import { describe, it } from 'node:test';
import benchmark from '../../src/cli/commands/benchmark.js';
import { isCryptmapError } from './imports.js';
import { loadNative } from '../../src/util/native.js';

async function run(args: string[], env: NodeJS.ProcessEnv = {}): Promise<{ code: number; out: string }> {
  const stdout = new PassThrough();
  const stderr = new PassThrough();
  let out = '';
  stdout.on('data', (d: Buffer) => {
    out += d.toString();
  });
  const code = await benchmark(['benchmark', ...args], { stdin: new PassThrough(), stdout, stderr, env });
  return { code, out };
}

describe('cryptmap benchmark', () => {
  it('prints a table of the default ciphers', async () => {
    const { code, out } = await run(['--seconds', '0.01']);
    assert.equal(code, 0);
    assert.match(out, /aes-xts-plain64\s+512b\s+[\d.]+ MB\/s\s+[\d.]+ MB\/s/);
    assert.match(out, /aes-cbc-plain64\s+128b/);
    // The KDFs first, in cryptsetup's format and order.
    assert.match(out, /^PBKDF2-sha1 +\d+ iterations per second for 256-bit key$/m);
    assert.match(out, /^PBKDF2-sha256 +\d+ iterations per second for 256-bit key$/m);
    assert.match(
      out,
      /^argon2id +\d+ iterations, +\d+ memory, \d parallel threads \(CPUs\) for 256-bit key \(requested 2000 ms time\)$/m,
    );
    assert.ok(out.indexOf('argon2id') < out.indexOf('Algorithm'), 'KDF lines before the cipher table');
  });

  it('measures one KDF with --pbkdf / --hash, as cryptsetup benchmark does', async () => {
    let r = await run(['--pbkdf', 'argon2i', '--iter-time', '100', '--pbkdf-memory', '32768', '--pbkdf-parallel', '1']);
    assert.equal(r.code, 0);
    assert.match(
      r.out,
      /^argon2i +\d+ iterations, +\d+ memory, 1 parallel threads \(CPUs\) for 256-bit key \(requested 100 ms time\)$/m,
    );
    assert.doesNotMatch(r.out, /Algorithm|PBKDF2/);
    r = await run(['-h', 'sha512', '--key-size', '512', '--json']);
    const rows = JSON.parse(r.out) as { pbkdf: string; hash: string; keyBits: number; iterations: number }[];
    assert.equal(rows.length, 1);
    assert.deepEqual([rows[0]!.pbkdf, rows[0]!.hash, rows[0]!.keyBits], ['pbkdf2', 'sha512', 512]);
    assert.ok(rows[0]!.iterations >= 1000);
    await assert.rejects(run(['--pbkdf', 'scrypt']), (e: unknown) => isCryptmapError(e, 'EKDF'));
  });

  it('prints JSON for one cipher, sector size and thread count', async () => {
    const { code, out } = await run([
      '--cipher',
      'aes-xts',
      '--key-size',
      '256',
      '--sector-size',
      '4096',
      '--threads',
      '2',
      '--json',
      '--seconds',
      '0.01',
    ]);
    assert.equal(code, 0);
    const rows = JSON.parse(out) as Record<string, unknown>[];
    assert.equal(rows.length, 1);
    const r = rows[0]!;
    assert.deepEqual(Object.keys(r).sort(), [
      'backend',
      'cipher',
      'decryptMBps',
      'encryptMBps',
      'implementation',
      'keyBits',
      'oneThreadDecryptMBps',
      'oneThreadEncryptMBps',
      'poolCores',
      'poolInFlight',
      'poolPerCpuRatio',
      'poolRatio',
      'poolSleepsPerRequest',
      'sectorSize',
      'threads',
    ]);
    assert.equal(r.cipher, 'aes-xts-plain64');
    assert.equal(r.backend, 'native');
    assert.equal(r.implementation, loadNative()?.xtsImpl, 'the native XTS implementation in use');
    assert.ok((r.oneThreadEncryptMBps as number) > 0 && (r.poolRatio as number) > 0);
    assert.equal(r.keyBits, 256);
    assert.equal(r.sectorSize, 4096);
    assert.equal(r.threads, 2);
    assert.equal(r.poolInFlight, 8, '4 requests in flight per thread');
    assert.ok((r.encryptMBps as number) > 0 && (r.decryptMBps as number) > 0);
  });

  it('names the native XTS implementation in use', async () => {
    const { out } = await run(['--cipher', 'aes-xts', '--seconds', '0.01']);
    const a = loadNative();
    assert.ok(a, 'native addon did not load');
    assert.match(out, new RegExp(`backend native \\(XTS: ${a.xtsImpl}\\)`));
  });

  it('--threads 2 measures one thread over the same buffers too and prints the pool ratio', async () => {
    const { out } = await run(['--cipher', 'aes-xts', '--threads', '2', '--seconds', '0.01']);
    assert.match(
      out,
      /aes-xts-plain64\s+512b\s+[\d.]+ MB\/s\s+[\d.]+ MB\/s\n# +1 thread, same buffers\s+[\d.]+ MB\/s\s+[\d.]+ MB\/s\s+pool [\d.]+x \(8 requests in flight; [\d.]+ cores used; per CPU-second [\d.]+x; [\d.]+ thread sleeps per request\)/,
    );
    const one = await run(['--cipher', 'aes-cbc', '--json', '--seconds', '0.01']);
    const rows = JSON.parse(one.out) as Record<string, unknown>[];
    assert.equal(rows[0]!.implementation, 'openssl');
    assert.equal(rows[0]!.poolRatio, undefined, 'one thread: no pool ratio');
    const js = await run(['--cipher', 'aes-xts', '--json', '--seconds', '0.01'], { CRYPTMAP_CRYPTO_BACKEND: 'js' });
    assert.equal((JSON.parse(js.out) as Record<string, unknown>[])[0]!.implementation, 'js');
  });

  it('uses the js backend when told to', async () => {
    const { out } = await run(['--cipher', 'aes-cbc-essiv:sha256', '--seconds', '0.01'], {
      CRYPTMAP_CRYPTO_BACKEND: 'js',
    });
    assert.match(out, /backend js/);
  });

  it('rejects bad options with typed errors', async () => {
    await assert.rejects(run(['--sector-size', '333']), (e: unknown) => isCryptmapError(e, 'ESECTOR_SIZE'));
    await assert.rejects(run(['--cipher', 'serpent-xts']), (e: unknown) => isCryptmapError(e, 'ECIPHER_UNSUPPORTED'));
    await assert.rejects(run(['--cipher', 'aes-xts', '--key-size', '100']), (e: unknown) =>
      isCryptmapError(e, 'EKEY_SIZE'),
    );
    await assert.rejects(run(['--threads', '0']), (e: unknown) => isCryptmapError(e, 'EINVAL'));
  });
});
