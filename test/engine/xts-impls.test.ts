/**
 * Every native XTS implementation this CPU supports (vaes512, vaes256, aesni; native/xts-vaes.c and
 * OpenSSL's AES-NI routines) against OpenSSL's EVP xts:
 * - a differential fuzz test: random 256- and 512-bit keys, sector sizes 512-4096, IV modes, IVs near the
 *   2^32 and 2^64 wraps, unaligned and in-place buffers, counts 1..N (across the addon's 32-sector IV
 *   batches), both directions, sync and pool;
 * - the known-answer suites (IEEE 1619 and cryptsetup IV vectors, vectors.test.js) rerun in a child
 *   process with CRYPTMAP_CRYPTO_IMPL forcing each implementation (the choice is made when the addon loads);
 * - a forced implementation that cannot be served is a clear EBACKEND error, never a silent fallback.
 * Which implementations run is printed, so a CPU without VAES shows what it left out.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { describe, it } from 'node:test';
import { loadNative, nativeLoadError, XTS_IMPL_IDS, type XtsImplName } from '../../src/util/native.js';
import { xorshift64star } from '../helpers/prng.js';

function addon() {
  const a = loadNative();
  assert.ok(a, `native addon did not load (${nativeLoadError()}); build it with: node scripts/build-native.mjs`);
  return a;
}

/** xorshift64*: reproducible from the printed seed. */
const rng = xorshift64star;

const IV_MODES = ['plain', 'plain64', 'plain64be', 'essiv', 'benbi'] as const;

describe('native XTS implementations: differential fuzz against EVP', () => {
  it('vaes512 / vaes256 / aesni give EVP xts bytes for random keys, sizes, IVs and alignments', async () => {
    const a = addon();
    const impls = a.xtsImpls.filter((n) => n !== 'evp');
    console.log(`# XTS implementations usable here: ${a.xtsImpls.join(', ')} (in use: ${a.xtsImpl})`);
    assert.ok(a.xtsImpls.includes('evp'));
    assert.deepEqual(a.xtsSelfTestFailures, [], 'the CPU has these but their load-time self-test against EVP failed');
    const seed = BigInt(process.env.CRYPTMAP_FUZZ_SEED ?? Date.now());
    const r = rng(seed);
    const unaligned = (n: number) => {
      const off = 1 + r(63);
      return Buffer.alloc(n + 64).subarray(off, off + n);
    };
    const rand = (n: number) => {
      const b = Buffer.alloc(n);
      for (let i = 0; i < n; i++) b[i] = r(256);
      return b;
    };
    for (let iter = 0; iter < 120; iter++) {
      const keyBytes = r(2) ? 64 : 32;
      const sb = 512 << r(4);
      const count = 1 + r(sb === 512 ? 80 : sb === 1024 ? 40 : 20);
      const ivName = IV_MODES[r(IV_MODES.length)]!;
      const ivMode = a.ivModes[ivName]!;
      const ivStep = r(2) ? sb / 512 : 1;
      const key = rand(keyBytes);
      if (key.subarray(0, keyBytes / 2).equals(key.subarray(keyBytes / 2))) key[0]! ^= 1;
      const ivKey = ivName === 'essiv' ? createHash('sha256').update(key).digest() : null;
      // IVs just below the 2^64 wrap, the 2^32 wrap, or anywhere.
      const where = r(3);
      const ivHi = where === 0 ? 0xffffffff : where === 1 ? r(4) : r(0x100000000);
      const ivLo = where === 2 ? r(0x100000000) : 0xffffffff - r(count * ivStep + 2);
      const bytes = count * sb;
      const ctx = `seed ${seed} iter ${iter}: key ${keyBytes} sector ${sb} count ${count} ivMode ${ivName} iv ${ivHi.toString(16)}:${ivLo.toString(16)} step ${ivStep}`;
      const pt = rand(bytes);
      const ref = a.cipherCreate(a.chainModes.xts!, key, ivMode, ivKey, sb);
      a.setXtsImpl(ref, XTS_IMPL_IDS.evp);
      const want = Buffer.alloc(bytes);
      a.cipherRun(ref, true, pt, want, count, ivLo, ivHi, ivStep);
      a.cipherDispose(ref);
      for (const impl of impls) {
        const h = a.cipherCreate(a.chainModes.xts!, key, ivMode, ivKey, sb);
        a.setXtsImpl(h, XTS_IMPL_IDS[impl]);
        // Unaligned views (1..63 bytes into an allocation), out of place or in place.
        const inPlace = r(2) === 1;
        const s = unaligned(bytes);
        pt.copy(s);
        const d = inPlace ? s : unaligned(bytes);
        if (r(4) === 0) await a.cipherRunAsync(h, true, s, d, count, ivLo, ivHi, ivStep);
        else a.cipherRun(h, true, s, d, count, ivLo, ivHi, ivStep);
        assert.ok(d.equals(want), `${impl} encrypt, ${ctx}, in place ${inPlace}`);
        const back = unaligned(bytes);
        if (r(4) === 0) await a.cipherRunAsync(h, false, d, back, count, ivLo, ivHi, ivStep);
        else a.cipherRun(h, false, d, back, count, ivLo, ivHi, ivStep);
        assert.ok(back.equals(pt), `${impl} decrypt, ${ctx}`);
        a.cipherDispose(h);
      }
    }
  });

  it('equal key halves (EVP refuses them) and 384-bit keys agree with the own tweak arithmetic', () => {
    const a = addon();
    for (const keyBytes of [32, 48, 64]) {
      const key = Buffer.alloc(keyBytes, 0x5a);
      const pt = Buffer.alloc(4096 * 3);
      for (let i = 0; i < pt.length; i++) pt[i] = (i * 31) & 255;
      const run = (impl: number) => {
        const h = a.cipherCreate(a.chainModes.xts!, key, a.ivModes.plain64!, null, 4096);
        a.setXtsImpl(h, impl);
        const out = Buffer.alloc(pt.length);
        a.cipherRun(h, true, pt, out, 3, 0xfffffff0, 0xffffffff, 8);
        a.cipherDispose(h);
        return out;
      };
      const want = run(2);
      for (const impl of a.xtsImpls)
        assert.ok(run(XTS_IMPL_IDS[impl]).equals(want), `${impl}, ${keyBytes}-byte key with equal halves`);
    }
  });
});

const VECTORS = fileURLToPath(new URL('./vectors.test.js', import.meta.url));

function child(env: Record<string, string | undefined>, args: string[]) {
  // Without NODE_TEST_CONTEXT the child reports to its own stdout, not to this test runner.
  const { NODE_TEST_CONTEXT: _, ...base } = process.env;
  return spawnSync(process.execPath, args, { encoding: 'utf8', env: { ...base, ...env }, timeout: 120_000 });
}

describe('CRYPTMAP_CRYPTO_IMPL', () => {
  const a = loadNative();
  const engineUrl = new URL('../../src/engine/index.js', import.meta.url).href;
  const FORCED_FAILS = `
import { createSectorCipher } from ${JSON.stringify(engineUrl)};
try {
  createSectorCipher({ spec: 'aes-xts-plain64', key: Buffer.alloc(64, 1).fill(2, 32) });
  throw new Error('created a cipher');
} catch (e) {
  if (e.code !== 'EBACKEND' || !/CRYPTMAP_CRYPTO_IMPL/.test(e.message)) throw e;
  console.log(e.message);
}
`;

  for (const impl of ['vaes512', 'vaes256', 'aesni', 'evp'] as XtsImplName[]) {
    it(`${impl}: IEEE 1619 and cryptsetup IV vectors (or a clear error where this CPU lacks it)`, () => {
      assert.ok(a, `native addon did not load (${nativeLoadError()})`);
      if (!a.xtsImpls.includes(impl)) {
        console.log(`# ${impl}: not supported by this CPU/OS; checking that forcing it is refused`);
        const r = child({ CRYPTMAP_CRYPTO_IMPL: impl }, ['--input-type=module', '-e', FORCED_FAILS]);
        assert.equal(r.status, 0, r.stderr + r.stdout);
        return;
      }
      const r = child({ CRYPTMAP_CRYPTO_IMPL: impl }, [VECTORS]);
      assert.equal(r.status, 0, `vectors under CRYPTMAP_CRYPTO_IMPL=${impl}:\n${r.stdout.slice(-3000)}\n${r.stderr}`);
      assert.match(r.stdout, new RegExp(`native XTS implementation: ${impl}`));
    });
  }

  it('an implementation that cannot be served, or an unknown name, is an EBACKEND error naming the variable', () => {
    for (const env of [
      { CRYPTMAP_CRYPTO_IMPL: 'vaes512', CRYPTMAP_NO_AESNI: '1' },
      { CRYPTMAP_CRYPTO_IMPL: 'aesni', CRYPTMAP_NO_AESNI: '1' },
      { CRYPTMAP_CRYPTO_IMPL: 'gpu' },
    ]) {
      const r = child(env, ['--input-type=module', '-e', FORCED_FAILS]);
      assert.equal(r.status, 0, `${JSON.stringify(env)}: ${r.stderr}`);
      assert.match(
        r.stdout,
        env.CRYPTMAP_CRYPTO_IMPL === 'gpu' ? /must be vaes512, vaes256, aesni or evp/ : /is not available here/,
      );
    }
  });
});
