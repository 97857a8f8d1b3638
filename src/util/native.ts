/**
 * Loader for cryptmap's optional native addon (native/cryptmap.c, built by node-gyp into
 * build/Release/cryptmap.node at the package root). Layer 0 so that blockdev (file helpers) and
 * crypto (sector ciphers) can both use it.
 *
 * `loadNative()` returns the addon or null, cached. It does not look at CRYPTMAP_CRYPTO_BACKEND:
 * that variable only steers the crypto backend choice (crypto/backends), never the file helpers.
 */
import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** XTS implementations of the addon, as CRYPTMAP_CRYPTO_IMPL names them. */
export type XtsImplName = 'vaes512' | 'vaes256' | 'aesni' | 'evp';

/** setXtsImpl's number for each CRYPTMAP_CRYPTO_IMPL name. */
export const XTS_IMPL_IDS: Readonly<Record<XtsImplName, number>> = Object.freeze({
  evp: 1,
  aesni: 3,
  vaes512: 4,
  vaes256: 5,
});

/** Opaque key handle owned by the addon (an N-API external). */
export type NativeKeyHandle = { readonly __brand: 'cryptmap-native-key' };

export interface NativeAddon {
  /** ABI version of the addon's JS interface; bumped on incompatible change. */
  readonly abiVersion: number;
  /** True when OpenSSL's AES-NI XTS routine was found and passed the load-time self-test. */
  readonly aesniXts: boolean;
  /** Same for OpenSSL's AES-NI CBC routine (used for cbc per sector). */
  readonly aesniCbc: boolean;
  /**
   * The XTS implementation chosen at load (native/xts-vaes.c for the vaes ones): the fastest one this
   * CPU and OS support that passed its self-test against EVP, or CRYPTMAP_CRYPTO_IMPL's.
   */
  readonly xtsImpl: XtsImplName;
  /** Every XTS implementation usable here, fastest first ('evp' always). */
  readonly xtsImpls: readonly XtsImplName[];
  /** VAES implementations the CPU and OS support that failed the load-time self-test (left out). */
  readonly xtsSelfTestFailures: readonly XtsImplName[];
  /** Why CRYPTMAP_CRYPTO_IMPL cannot be served (cipherCreate then throws EBACKEND with it), else null. */
  readonly cryptoImplError: string | null;
  /** The `chain` ids cipherCreate takes, by chain mode name (xts, cbc, ecb; null for cipher_null). */
  readonly chainModes: Readonly<Record<string, number>>;
  /** The `ivMode` ids cipherCreate takes, by dm-crypt IV mode name (essiv's ivKey is the salt). */
  readonly ivModes: Readonly<Record<string, number>>;
  /** Create a key handle (chain and ivMode from chainModes and ivModes). The addon copies key and ivKey. */
  cipherCreate(
    chain: number,
    key: Uint8Array,
    ivMode: number,
    ivKey: Uint8Array | null,
    sectorBytes: number,
  ): NativeKeyHandle;
  /** Transform `count` sectors from src to dst (same length; the same bytes or disjoint). */
  cipherRun(
    h: NativeKeyHandle,
    encrypt: boolean,
    src: Uint8Array,
    dst: Uint8Array,
    count: number,
    ivLo: number,
    ivHi: number,
    ivStep: number,
  ): void;
  /** The same on the addon's crypt thread pool (see setPoolThreads); resolves when done. */
  cipherRunAsync(
    h: NativeKeyHandle,
    encrypt: boolean,
    src: Uint8Array,
    dst: Uint8Array,
    count: number,
    ivLo: number,
    ivHi: number,
    ivStep: number,
  ): Promise<void>;
  /**
   * cipherRunAsync fused with file I/O in the same crypt-thread job: decrypting, src is first filled by
   * pread(fd, fileOffset); encrypting, dst is written by pwrite(fd, fileOffset) afterwards. Rejects with
   * `code` = errno name and `errno` set on an I/O error, `code` ESHORTIO at end of file.
   */
  cipherRunFileAsync(
    h: NativeKeyHandle,
    encrypt: boolean,
    src: Uint8Array,
    dst: Uint8Array,
    count: number,
    ivLo: number,
    ivHi: number,
    ivStep: number,
    fd: number,
    fileOffset: number,
  ): Promise<void>;
  /**
   * cipherRunAsync (or, with fd and fileOffset, cipherRunFileAsync) without a promise: the pool reports
   * `id` (a non-negative int32) to the callback given to poolBind when the job ends. The caller keeps h,
   * src and dst reachable until then (the addon does not reference them). Optional: an addon built
   * before it was added lacks it (the promise forms are used then).
   */
  cipherSubmit?(
    h: NativeKeyHandle,
    encrypt: boolean,
    src: Uint8Array,
    dst: Uint8Array,
    count: number,
    ivLo: number,
    ivHi: number,
    ivStep: number,
    id: number,
    fd?: number,
    fileOffset?: number,
  ): void;
  /**
   * cipherSubmit's completion callback for this Node environment: the pool writes finished ids into
   * `ids` and calls callback(n) for the first n of them (several calls when more finished at once than
   * `ids` holds); a failed job calls callback(-1, id, error), error's `code` ENATIVE, ESHORTIO or the
   * errno name of a failed pread/pwrite (with `errno`). Bind once, before the first cipherSubmit.
   */
  poolBind?(callback: (n: number, id?: number, error?: unknown) => void, ids: Int32Array): void;
  /**
   * Queue the jobs cipherSubmit staged since the last call (cipherSubmit only stages: the jobs of one
   * turn of the event loop go to the pool's queue together, one lock and at most one wake-up per idle
   * thread). Call it after the last cipherSubmit of a turn, e.g. from a microtask.
   */
  poolFlush?(): void;
  /** Wipe and free the key schedule (deferred until in-flight async runs finish). Idempotent. */
  cipherDispose(h: NativeKeyHandle): void;
  /**
   * XTS implementation selector (benchmarks, tests): 0 auto (xtsImpl), 1 EVP xts with the IV reset per
   * sector, 2 own tweaks over ECB, 3 OpenSSL's AES-NI XTS per sector, 4 VAES on 512-bit registers, 5 VAES
   * on 256-bit registers. A choice that cannot serve the key falls back to the next one down (vaes512,
   * vaes256, aesni, evp, own; equal halves or aes-192: own / aesni).
   */
  setXtsImpl(h: NativeKeyHandle, impl: number): void;
  /**
   * Number of crypt pool threads that take requests (1..256; default: online CPUs). Process-wide
   * (per Node environment), like dm-crypt's kcryptd. Returns the previous value.
   */
  setPoolThreads(n: number): number;
  /**
   * The crypt pool's state (metrics): threads that take requests, threads started, threads running a
   * job now, jobs waiting for a thread and their bytes, jobs not yet delivered to JS; and counters
   * since the pool started: jobs run, wake-ups of the JS thread (each delivers a batch of
   * completions), times a thread went to sleep for want of work, yields to the JS thread, jobs run on
   * the CPU that last ran a job on their buffer (or on a buffer new to the pool) and jobs run elsewhere,
   * jobs the JS thread ran itself (it works the queue while it has nothing else to do). Optional:
   * an addon built before it was added lacks it (and the counters).
   */
  poolStats?(): {
    threads: number;
    started: number;
    busy: number;
    queued: number;
    queuedBytes: number;
    inflight: number;
    jobs?: number;
    wakeups?: number;
    sleeps?: number;
    yields?: number;
    localJobs?: number;
    remoteJobs?: number;
    callerJobs?: number;
  };
  /** fallocate(PUNCH_HOLE | KEEP_SIZE); throws an Error with `code` = errno name on failure. */
  punchHole(fd: number, offsetBytes: number, lengthBytes: number): void;
  /** lseek(SEEK_DATA); -1 on ENXIO (no data at or after offset); throws on other errors. */
  seekData(fd: number, offsetBytes: number): number;
  /** lseek(SEEK_HOLE); -1 on ENXIO; throws on other errors. */
  seekHole(fd: number, offsetBytes: number): number;
  /**
   * getsockopt(SO_PEERCRED) on a connected Unix socket (native/peercred.c). Optional: an addon built
   * before it was added lacks it (util/peercred.ts then reports the credentials as unknown).
   */
  peerCred?(fd: number): { pid: number; uid: number; gid: number };
  /**
   * setsockopt(SO_SNDBUF, bytes) on an AF_UNIX socket (native/sockbuf.c): the resulting SO_SNDBUF, or 0
   * (nothing done) for another family. Optional: an addon built before it was added lacks it.
   */
  unixSendBuffer?(fd: number, bytes: number): number;
  /** prctl(PR_SET_DUMPABLE, flag) when a flag is given; PR_GET_DUMPABLE after (native/dumpable.c). */
  dumpable?(flag?: boolean): boolean;
  /** glibc M_PERTURB on or off: free() overwrites released heap chunks (native/dumpable.c). */
  wipeFreedMemory?(on: boolean): boolean;
  /**
   * The payload of the kernel keyring key of type "user" named `description`, looked up as
   * request_key(2) does (thread, process, session keyrings); null when none is reachable
   * (native/extras.c). The caller wipes the buffer.
   */
  keyringReadUser?(description: string): Buffer | null;
  /** Load OpenSSL's legacy provider (whirlpool) into Node's OpenSSL; true when it is loaded. */
  loadLegacyProvider?(): boolean;
  /**
   * flock(2) that never blocks (native/extras.c): `op` is LOCK_SH|LOCK_NB, LOCK_EX|LOCK_NB or LOCK_UN
   * (FLOCK below). true when done, false when another open file holds a conflicting lock; throws an
   * Error with `code` = errno name on other failures. Optional: an addon built before it was added
   * lacks it.
   */
  flock?(fd: number, op: number): boolean;
  /**
   * Send one datagram to the AF_UNIX SOCK_DGRAM socket `address` ('/path' or '@abstract'), as
   * sd_notify(3) does (native/sdnotify.c); throws an Error with `code` = errno name on failure.
   */
  sdNotify?(address: string, message: string): void;
}

/** flock(2)'s operation bits (Linux <sys/file.h>), for NativeAddon.flock. */
export const FLOCK = Object.freeze({ LOCK_SH: 1, LOCK_EX: 2, LOCK_NB: 4, LOCK_UN: 8 });

export const NATIVE_ABI_VERSION = 3;

let cached: NativeAddon | null | undefined;
let loadError: string | undefined;

/** The package root: the nearest ancestor directory with a package.json named cryptmap. */
export function packageRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const pj = join(dir, 'package.json');
    if (existsSync(pj)) {
      try {
        if ((JSON.parse(readFileSync(pj, 'utf8')) as { name?: string }).name === 'cryptmap') return dir;
      } catch {
        // not ours; keep walking
      }
    }
    const up = dirname(dir);
    if (up === dir) throw new Error('cryptmap package root not found');
    dir = up;
  }
}

/** The native addon, or null when it is not built or fails to load (see nativeLoadError()). */
export function loadNative(): NativeAddon | null {
  if (cached !== undefined) return cached;
  try {
    const file = join(packageRoot(), 'build', 'Release', 'cryptmap.node');
    if (!existsSync(file)) {
      loadError = `${file} not found (build it with: node scripts/build-native.mjs)`;
      cached = null;
      return null;
    }
    const addon = createRequire(import.meta.url)(file) as NativeAddon;
    if (addon.abiVersion !== NATIVE_ABI_VERSION) {
      loadError = `${file} has ABI ${addon.abiVersion}, expected ${NATIVE_ABI_VERSION}: rebuild it`;
      cached = null;
      return null;
    }
    cached = addon;
  } catch (e) {
    loadError = e instanceof Error ? e.message : String(e);
    cached = null;
  }
  return cached;
}

/** Why loadNative() returned null, if it did. */
export function nativeLoadError(): string | undefined {
  loadNative();
  return loadError;
}
