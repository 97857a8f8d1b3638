/**
 * The native addon: loads (required when CRYPTMAP_REQUIRE_NATIVE=1, as CI sets), the backend choice
 * (explicit, CRYPTMAP_CRYPTO_BACKEND, default), dispose while async work is in flight, and the file
 * helpers the file block device uses (fallocate punch hole, SEEK_DATA / SEEK_HOLE).
 */
import assert from 'node:assert/strict';
import { closeSync, fstatSync, openSync, writeSync } from 'node:fs';
import { makeTempDir } from '../helpers/tmp.js';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { pieces } from '../../src/crypto/backends/native.js';
import { IV_GENERATORS } from '../../src/crypto/iv/index.js';
import { loadNative, nativeLoadError } from '../../src/util/native.js';
import { createSectorCipher, cryptPoolStats, defaultBackend, isCryptmapError, setCryptThreads } from './imports.js';

function addon() {
  const a = loadNative();
  assert.ok(
    a,
    `native addon did not load (${nativeLoadError()}); build it with: node scripts/build-native.mjs (needs g++, make, python3 and Node headers)`,
  );
  return a;
}

describe('native addon', () => {
  it('loads, and is the default backend unless CRYPTMAP_CRYPTO_BACKEND says otherwise', () => {
    if (process.env.CRYPTMAP_REQUIRE_NATIVE === '1')
      assert.ok(loadNative(), `CRYPTMAP_REQUIRE_NATIVE=1 but: ${nativeLoadError()}`);
    addon();
    assert.equal(defaultBackend({}), 'native');
    assert.equal(defaultBackend({ CRYPTMAP_CRYPTO_BACKEND: 'js' }), 'js');
    assert.equal(defaultBackend({ CRYPTMAP_CRYPTO_BACKEND: 'native' }), 'native');
    assert.throws(
      () => defaultBackend({ CRYPTMAP_CRYPTO_BACKEND: 'gpu' }),
      (e: unknown) => isCryptmapError(e, 'EBACKEND'),
    );
  });

  it('finishes in-flight async work after dispose, then refuses new work', async () => {
    addon();
    const key = Buffer.alloc(64);
    for (let i = 0; i < 64; i++) key[i] = i;
    const c = createSectorCipher({ spec: 'aes-xts-plain64', key, backend: 'native', sectorBytes: 4096 });
    const want = Buffer.alloc(1 << 20, 7);
    c.encrypt(want, 0n);
    const got = Buffer.alloc(1 << 20, 7);
    const p = c.encryptAsync(got, 0n);
    c.dispose();
    await p;
    assert.ok(got.equals(want));
    assert.throws(
      () => c.encrypt(Buffer.alloc(4096), 0n),
      (e: unknown) => isCryptmapError(e, 'EDISPOSED'),
    );
  });

  it('settles thousands of async requests in flight at once, each with its own result (completion batches beyond the id buffer)', async () => {
    addon();
    const key = Buffer.alloc(64);
    for (let i = 0; i < 64; i++) key[i] = (i * 29 + 3) & 0xff;
    const c = createSectorCipher({ spec: 'aes-xts-plain64', key, backend: 'native', asyncMinBytes: 0 });
    try {
      const n = 3000;
      const src = Array.from({ length: n }, (_, i) => Buffer.alloc(512 * (1 + (i % 3)), i & 0xff));
      const want = src.map((b, i) => {
        const out = Buffer.alloc(b.length);
        c.encrypt(b, BigInt(i * 8), out);
        return out;
      });
      const got = src.map((b) => Buffer.alloc(b.length));
      // Out-of-place and in-place requests mixed; one turn submits them all.
      await Promise.all(
        src.map((b, i) =>
          i % 2 ? c.encryptAsync(b, BigInt(i * 8), got[i]) : c.encryptAsync(got[i]!.fill(b), BigInt(i * 8)),
        ),
      );
      for (let i = 0; i < n; i++) assert.ok(got[i]!.equals(want[i]!), `request ${i}`);
      // Decryption back, and a rejected request (misaligned) among good ones does not disturb them.
      const back = await Promise.allSettled([
        ...got.map((b, i) => c.decryptAsync(b, BigInt(i * 8))),
        c.decryptAsync(Buffer.alloc(100), 0n),
      ]);
      assert.equal(back.at(-1)!.status, 'rejected');
      for (let i = 0; i < n; i++) {
        assert.equal(back[i]!.status, 'fulfilled');
        assert.ok(got[i]!.equals(src[i]!), `request ${i} back`);
      }
    } finally {
      c.dispose();
    }
  });

  it('runs lanes that reuse their buffers (jobs taken out of order for cache affinity) to the right results, on 1-3 threads', async () => {
    addon();
    const key = Buffer.alloc(64);
    for (let i = 0; i < 64; i++) key[i] = (i * 13 + 1) & 0xff;
    const c = createSectorCipher({ spec: 'aes-xts-plain64', key, backend: 'native', asyncMinBytes: 0 });
    const prev = setCryptThreads(2);
    try {
      for (const threads of [1, 2, 3]) {
        setCryptThreads(threads);
        const s0 = cryptPoolStats()!;
        // 12 lanes, each encrypting its own buffer in place 40 times (sector numbers differ per round),
        // then decrypting it back: any job run twice, skipped or run on another lane's buffer shows.
        const lanes = Array.from({ length: 12 }, (_, i) => Buffer.alloc(4096 * (1 + (i % 4)), i + 1));
        const orig = lanes.map((b) => Buffer.from(b));
        await Promise.all(
          lanes.map(async (b) => {
            for (let r = 0; r < 40; r++) await c.encryptAsync(b, BigInt(r * 64));
            for (let r = 39; r >= 0; r--) await c.decryptAsync(b, BigInt(r * 64));
          }),
        );
        for (let i = 0; i < lanes.length; i++) assert.ok(lanes[i]!.equals(orig[i]!), `${threads} threads, lane ${i}`);
        const s1 = cryptPoolStats()!;
        assert.equal(s1.jobs - s0.jobs, 12 * 80, `${threads} threads: jobs run`);
        assert.ok(s1.remoteJobs - s0.remoteJobs <= s1.jobs - s0.jobs);
      }
    } finally {
      setCryptThreads(prev);
      c.dispose();
    }
  });

  it('runs the pool in worker threads and tears it down with their environment, also with requests in flight', async () => {
    addon();
    const engine = new URL('../../src/engine/index.js', import.meta.url).href;
    // Each worker encrypts through its own pool, checks one result against the synchronous form, then
    // leaves requests in flight as it ends (or is terminated): its environment must close the pool's
    // handle (a handle left open aborts the process when the worker's loop closes).
    const code = `
      const { parentPort, workerData } = require('node:worker_threads');
      import(${JSON.stringify(engine)}).then(async ({ createSectorCipher }) => {
        const c = createSectorCipher({ spec: 'aes-xts-plain64', key: Buffer.alloc(64, 5).fill(6, 32), asyncMinBytes: 0 });
        const bufs = Array.from({ length: 8 }, (_, i) => Buffer.alloc(1 << 18, i));
        const want = Buffer.from(bufs[3]);
        c.encrypt(want, 0n);
        await Promise.all(bufs.map((b) => c.encryptAsync(b, 0n)));
        parentPort.postMessage(bufs[3].equals(want));
        for (const b of bufs) c.encryptAsync(b, 0n);
        if (workerData.hang) setInterval(() => {}, 1000);
      });`;
    const { Worker } = await import('node:worker_threads');
    const run = (hang: boolean) =>
      new Promise<boolean>((resolve, reject) => {
        const w = new Worker(code, { eval: true, workerData: { hang } });
        let ok = false;
        const deadline = setTimeout(() => {
          void w.terminate();
          reject(new Error('worker did not finish within 60 s'));
        }, 60_000);
        w.on('message', (m: boolean) => {
          ok = m;
          if (hang) void w.terminate();
        });
        w.on('error', (e) => {
          clearTimeout(deadline);
          reject(e);
        });
        w.on('exit', () => {
          clearTimeout(deadline);
          resolve(ok);
        });
      });
    assert.equal(await run(false), true, 'a worker that ends by itself');
    assert.equal(await run(true), true, 'a terminated worker');
  });

  it('has an id for every IV generator of the table and every chain mode, each distinct', () => {
    const a = addon();
    const ivs = Object.keys(IV_GENERATORS);
    for (const n of ivs) assert.ok(Number.isInteger(a.ivModes[n]), `no native id for IV mode ${n}`);
    assert.equal(new Set(ivs.map((n) => a.ivModes[n])).size, ivs.length);
    for (const n of ['xts', 'cbc', 'ecb', 'null'])
      assert.ok(Number.isInteger(a.chainModes[n]), `no native id for chain mode ${n}`);
  });

  it('rejects bad arguments at the native edge too', () => {
    const a = addon();
    const { xts, cbc } = a.chainModes;
    const { plain64, essiv } = a.ivModes;
    assert.throws(() => a.cipherCreate(xts!, Buffer.alloc(20), plain64!, null, 512));
    assert.throws(() => a.cipherCreate(cbc!, Buffer.alloc(32), essiv!, null, 512)); // essiv without its key
    const h = a.cipherCreate(xts!, Buffer.alloc(64, 1).fill(2, 32), plain64!, null, 512);
    assert.throws(() => a.cipherRun(h, true, Buffer.alloc(512), Buffer.alloc(1024), 1, 0, 0, 1));
    const b = Buffer.alloc(2048);
    assert.throws(() => a.cipherRun(h, true, b.subarray(0, 1024), b.subarray(512, 1536), 2, 0, 0, 1));
    a.cipherDispose(h);
    assert.throws(() => a.cipherRun(h, true, Buffer.alloc(512), Buffer.alloc(512), 1, 0, 0, 1));
  });

  it('punches holes and finds data and holes', () => {
    const a = addon();
    const { dir, cleanup: removeDir } = makeTempDir('cryptmap-native-');
    const file = join(dir, 'f');
    const fd = openSync(file, 'w+', 0o600);
    try {
      const mib = 1 << 20;
      writeSync(fd, Buffer.alloc(4 * mib, 0xab), 0, 4 * mib, 0);
      assert.equal(a.seekData(fd, 0), 0);
      a.punchHole(fd, mib, 2 * mib);
      assert.equal(fstatSync(fd).size, 4 * mib);
      const hole = a.seekHole(fd, 0);
      // The file system rounds to its block size; tmpfs and ext4 use 4 KiB.
      assert.ok(hole >= 0 && hole <= mib, `hole at ${hole}`);
      assert.equal(a.seekData(fd, mib), 3 * mib);
      assert.equal(a.seekData(fd, 4 * mib), -1);
      assert.equal(a.seekHole(fd, 4 * mib + 1), -1);
      a.punchHole(fd, 0, 0);
      assert.throws(
        () => a.punchHole(-1, 0, 4096),
        (e: unknown) => (e as NodeJS.ErrnoException).code === 'EBADF',
      );
    } finally {
      closeSync(fd);
      removeDir();
    }
  });

  it('names every errno the same way in all its files (strerrorname_np; no local table turning the rest into EIO)', () => {
    const a = addon();
    const code = (f: () => void) => {
      try {
        f();
      } catch (e) {
        return [(e as NodeJS.ErrnoException).code, (e as NodeJS.ErrnoException).errno];
      }
      assert.fail('no error thrown');
    };
    // sdnotify.c's own table knew six names and called the rest EIO.
    assert.deepEqual(
      code(() => a.sdNotify!('/proc/self/stat/x', 'READY=1')),
      ['ENOTDIR', -20],
    );
    assert.deepEqual(
      code(() => a.sdNotify!('/nonexistent-cryptmap/notify', 'READY=1')),
      ['ENOENT', -2],
    );
    // peercred.c had its own three names.
    assert.deepEqual(
      code(() => a.peerCred!(0x7fffffff)),
      ['EBADF', -9],
    );
    const { dir, cleanup: removeDir } = makeTempDir('cryptmap-errno-');
    const fd = openSync(join(dir, 'f'), 'w');
    try {
      assert.deepEqual(
        code(() => a.peerCred!(fd)),
        ['ENOTSOCK', -88],
      );
    } finally {
      closeSync(fd);
      removeDir();
    }
  });
});

describe('native XTS implementations agree', () => {
  for (const [impl, name] of [
    [1, 'EVP per sector'],
    [2, 'own tweaks over ECB'],
    [3, 'AES-NI per sector'],
  ] as const) {
    it(`${name} matches the js backend (distinct and equal key halves, 512 and 4096 sectors)`, () => {
      const a = addon();
      for (const keyBytes of [32, 48, 64]) {
        for (const equal of [false, true]) {
          for (const sb of [512, 4096] as const) {
            const key = Buffer.alloc(keyBytes);
            for (let i = 0; i < keyBytes; i++) key[i] = (i * 29 + keyBytes) & 0xff;
            if (equal) key.copy(key, keyBytes / 2, 0, keyBytes / 2);
            const data = Buffer.alloc(sb * 40);
            for (let i = 0; i < data.length; i++) data[i] = (i * 7 + (i >> 9)) & 0xff;
            const js = createSectorCipher({ spec: 'aes-xts-plain64', key, sectorBytes: sb, backend: 'js' });
            const want = Buffer.alloc(data.length);
            js.encrypt(data, 0xfffffff8n, want);
            js.dispose();
            const h = a.cipherCreate(a.chainModes.xts!, key, a.ivModes.plain64!, null, sb);
            a.setXtsImpl(h, impl);
            const got = Buffer.alloc(data.length);
            a.cipherRun(h, true, data, got, 40, 0xfffffff8, 0, sb / 512);
            assert.ok(got.equals(want), `key ${keyBytes} equal ${equal} sector ${sb}`);
            a.cipherRun(h, false, got, got, 40, 0xfffffff8, 0, sb / 512);
            assert.ok(got.equals(data));
            a.cipherDispose(h);
          }
        }
      }
    });
  }
});

describe('native request splitting', () => {
  it('splits runs over the per-call limit and carries the IV sector across pieces and the 2^32 boundary', () => {
    const src = Buffer.alloc(4096 * 10);
    const dst = Buffer.alloc(4096 * 10);
    const ps = pieces({ encrypt: true, src, dst, count: 10, ivLo: 0xffffffe8, ivHi: 7, ivStep: 8 }, 4096 * 3);
    assert.deepEqual(
      ps.map((p) => [p.count, p.ivHi, p.ivLo, p.src.byteOffset - src.byteOffset, p.dst.byteLength]),
      [
        [3, 7, 0xffffffe8, 0, 12288],
        [3, 8, 0x00000000, 12288, 12288],
        [3, 8, 0x00000018, 24576, 12288],
        [1, 8, 0x00000030, 36864, 4096],
      ],
    );
    assert.equal(pieces({ encrypt: true, src, dst, count: 10, ivLo: 0, ivHi: 0, ivStep: 1 }).length, 1);
  });
});
