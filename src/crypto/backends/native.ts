/**
 * The native sector-cipher backend: a thin wrapper over the N-API addon (native/cryptmap.c). One
 * native call per request with the IV loop inside; the key schedule lives in native memory behind
 * an opaque handle and is zeroed on dispose.
 */
import { wipe } from '../../util/bytes.js';
import { CryptmapError, toErrorCode } from '../../util/errors.js';
import { loadNative, type NativeAddon, type NativeKeyHandle, nativeLoadError } from '../../util/native.js';
import type { CipherSpec } from '../cipher-spec.js';
import type { IvInstance } from '../iv/index.js';
import { IV_GENERATORS } from '../iv/index.js';
import type { BackendOps, SectorRun, SectorTransform } from './types.js';

/** Chain modes cipher-spec.ts accepts ('null': the cipher_null spec), each needing an addon id. */
const CHAIN_MODES = ['xts', 'cbc', 'ecb', 'null'] as const;

let idsChecked: NativeAddon | null = null;

/**
 * The loaded addon, after checking once that it has an id for every chain mode above and every IV
 * generator of the table (iv/index.ts): an addon from another build fails here by name, instead of
 * running a sector with the wrong IV. null without the addon.
 */
function checkedAddon(): NativeAddon | null {
  const addon = loadNative();
  if (addon === null || addon === idsChecked) return addon;
  const has = (ids: Readonly<Record<string, number>> | undefined, n: string) =>
    ids !== undefined && Object.hasOwn(ids, n) && Number.isInteger(ids[n]);
  const missing = [
    ...CHAIN_MODES.filter((n) => !has(addon.chainModes, n)).map((n) => `chain mode ${n}`),
    ...Object.keys(IV_GENERATORS)
      .filter((n) => !has(addon.ivModes, n))
      .map((n) => `IV mode ${n}`),
  ];
  if (missing.length)
    throw new CryptmapError(
      'ENATIVE',
      `the native addon has no id for ${missing.join(', ')}: rebuild it (node scripts/build-native.mjs)`,
      { errno: 'ENOTSUP' },
    );
  idsChecked = addon;
  return addon;
}

/** cipherCreate's chain and ivMode ids for `spec`. */
function nativeIds(addon: NativeAddon, spec: CipherSpec): { chain: number; ivMode: number } {
  const chain = addon.chainModes[spec.cipher === 'cipher_null' ? 'null' : spec.chainMode]!;
  const ivMode = addon.ivModes[spec.ivMode ?? 'null']!;
  return { chain, ivMode };
}

/** The addon takes at most 2 GiB - 1 per call (OpenSSL lengths are int): split bigger runs. */
const MAX_PIECE_BYTES = 1 << 30;

interface Piece {
  src: Uint8Array;
  dst: Uint8Array;
  count: number;
  ivLo: number;
  ivHi: number;
}

/** Split a run into pieces of at most maxBytes (a multiple of the sector size), IVs carried on. */
export function pieces(r: SectorRun, maxBytes = MAX_PIECE_BYTES): Piece[] {
  const sectorBytes = r.src.byteLength / r.count;
  if (r.src.byteLength <= maxBytes) return [{ src: r.src, dst: r.dst, count: r.count, ivLo: r.ivLo, ivHi: r.ivHi }];
  const per = Math.floor(maxBytes / sectorBytes);
  const out: Piece[] = [];
  let iv = BigInt(r.ivHi) * 0x100000000n + BigInt(r.ivLo);
  for (let first = 0; first < r.count; first += per) {
    const count = Math.min(per, r.count - first);
    const a = first * sectorBytes;
    const b = a + count * sectorBytes;
    out.push({
      src: r.src.subarray(a, b),
      dst: r.dst.subarray(a, b),
      count,
      ivLo: Number(iv & 0xffffffffn),
      ivHi: Number(iv >> 32n),
    });
    iv += BigInt(count * r.ivStep);
  }
  return out;
}

/**
 * The requests this thread has on the crypt pool through cipherSubmit: per id, the promise's settle
 * functions and what the request must keep reachable until it ends (key handle, source, destination).
 * One table per addon (per Node environment); its callback settles a whole batch of completions in
 * one call from the pool. Per request: one N-API call and one promise (the promise form costs a
 * promise, three references and a second promise for the error mapping).
 */
class SubmitTable {
  readonly #addon: NativeAddon;
  readonly #resolve: (() => void)[] = [];
  readonly #reject: ((e: unknown) => void)[] = [];
  /** Per id: the handle, source and destination (3 slots per id). */
  readonly #hold: unknown[] = [];
  /** Per id: whether the job carried file I/O (its errors keep the addon's errno code). */
  readonly #file: boolean[] = [];
  readonly #free: number[] = [];
  readonly #ids = new Int32Array(1024);
  #flushQueued = false;

  constructor(addon: NativeAddon) {
    this.#addon = addon;
    addon.poolBind!(this.#done, this.#ids);
  }

  #done = (n: number, id?: number, error?: unknown): void => {
    if (n < 0) {
      const reject = this.#reject[id!]!;
      const file = this.#file[id!]!;
      this.#release(id!);
      reject(file ? fileError(error) : nativeError(error));
      return;
    }
    const ids = this.#ids;
    for (let i = 0; i < n; i++) {
      const x = ids[i]!;
      const resolve = this.#resolve[x]!;
      this.#release(x);
      resolve();
    }
  };

  #flush = (): void => {
    this.#flushQueued = false;
    this.#addon.poolFlush!();
  };

  #release(id: number): void {
    const hold = this.#hold;
    hold[3 * id] = hold[3 * id + 1] = hold[3 * id + 2] = undefined;
    this.#resolve[id] = noop;
    this.#reject[id] = noop;
    this.#free.push(id);
  }

  submit(h: NativeKeyHandle, r: SectorRun, fd: number, fileOffset: number): Promise<void> {
    const id = this.#free.length > 0 ? this.#free.pop()! : this.#resolve.length;
    try {
      if (fd < 0) this.#addon.cipherSubmit!(h, r.encrypt, r.src, r.dst, r.count, r.ivLo, r.ivHi, r.ivStep, id);
      else this.#addon.cipherSubmit!(h, r.encrypt, r.src, r.dst, r.count, r.ivLo, r.ivHi, r.ivStep, id, fd, fileOffset);
    } catch (e) {
      this.#free.push(id);
      return Promise.reject(nativeError(e));
    }
    if (!this.#flushQueued) {
      // Requests submitted in this turn (the continuations of a batch of completions) reach the
      // pool's queue together: one lock and one wake-up per idle thread for the batch.
      // (A reaction on a settled promise: queueMicrotask wraps each callback in an AsyncResource.)
      this.#flushQueued = true;
      SETTLED.then(this.#flush);
    }
    const hold = this.#hold;
    hold[3 * id] = h;
    hold[3 * id + 1] = r.src;
    hold[3 * id + 2] = r.dst;
    this.#file[id] = fd >= 0;
    return new Promise<void>((resolve, reject) => {
      this.#resolve[id] = resolve;
      this.#reject[id] = reject;
    });
  }
}

function noop(): void {}

const SETTLED = Promise.resolve();

let submitTable: SubmitTable | null = null;

/** The submit table of `addon`, or null when the addon has no cipherSubmit (an older build). */
function submitTableOf(addon: NativeAddon): SubmitTable | null {
  if (
    typeof addon.cipherSubmit !== 'function' ||
    typeof addon.poolBind !== 'function' ||
    typeof addon.poolFlush !== 'function'
  )
    return null;
  submitTable ??= new SubmitTable(addon);
  return submitTable;
}

class NativeTransform implements SectorTransform {
  #h: NativeKeyHandle | null;
  constructor(
    readonly addon: NativeAddon,
    h: NativeKeyHandle,
  ) {
    this.#h = h;
  }
  #handle(): NativeKeyHandle {
    if (this.#h === null) throw new CryptmapError('EDISPOSED', 'sector cipher used after dispose');
    return this.#h;
  }
  run(r: SectorRun): void {
    const h = this.#handle();
    try {
      for (const p of pieces(r)) this.addon.cipherRun(h, r.encrypt, p.src, p.dst, p.count, p.ivLo, p.ivHi, r.ivStep);
    } catch (e) {
      throw nativeError(e);
    }
  }
  runAsync(r: SectorRun): Promise<void> {
    const h = this.#handle();
    // The JS thread's work per request is the pool's main overhead: one N-API call and one promise.
    const table = submitTableOf(this.addon);
    if (table !== null && r.src.byteLength <= MAX_PIECE_BYTES) return table.submit(h, r, -1, 0);
    const ps = pieces(r);
    const p =
      ps.length === 1
        ? this.addon.cipherRunAsync(h, r.encrypt, r.src, r.dst, r.count, r.ivLo, r.ivHi, r.ivStep)
        : Promise.all(
            ps.map((x) => this.addon.cipherRunAsync(h, r.encrypt, x.src, x.dst, x.count, x.ivLo, x.ivHi, r.ivStep)),
          ).then(() => undefined);
    return p.catch(rethrowNative);
  }
  runFileAsync(r: SectorRun, fd: number, fileOffsetBytes: number): Promise<void> {
    const h = this.#handle();
    const table = submitTableOf(this.addon);
    if (table !== null && r.src.byteLength <= MAX_PIECE_BYTES) return table.submit(h, r, fd, fileOffsetBytes);
    const sectorBytes = r.src.byteLength / r.count;
    const ps = pieces(r);
    const one = (x: Piece, off: number) =>
      this.addon.cipherRunFileAsync(h, r.encrypt, x.src, x.dst, x.count, x.ivLo, x.ivHi, r.ivStep, fd, off);
    let off = fileOffsetBytes;
    const p =
      ps.length === 1
        ? one(ps[0]!, off)
        : Promise.all(
            ps.map((x) => {
              const at = off;
              off += x.count * sectorBytes;
              return one(x, at);
            }),
          ).then(() => undefined);
    return p.catch((e: unknown) => {
      throw fileError(e);
    });
  }
  /** Benchmarks and tests: 0 auto, 1 EVP xts, 2 own over ECB, 3 AES-NI, 4 vaes512, 5 vaes256 (see NativeAddon.setXtsImpl). */
  setXtsImpl(impl: number): void {
    this.addon.setXtsImpl(this.#handle(), impl);
  }
  dispose(): void {
    if (this.#h !== null) this.addon.cipherDispose(this.#h);
    this.#h = null;
  }
}

/** Errors from the addon become CryptmapErrors with the addon's code (ENATIVE, EINVAL, ...). */
function nativeError(e: unknown): CryptmapError {
  if (e instanceof CryptmapError) return e;
  const code = (e as { code?: unknown }).code;
  const message = e instanceof Error ? e.message : String(e);
  return new CryptmapError(toErrorCode(code, 'ENATIVE'), `native sector cipher: ${message}`, {
    errno: code === 'EINVAL' || code === 'EOVERLAP' ? 'EINVAL' : 'EIO',
    cause: e,
  });
}

/** A file job's error: I/O errors keep the addon's errno code (the device layer reports them); others become CryptmapErrors. */
function fileError(e: unknown): unknown {
  const code = (e as { code?: unknown }).code;
  if ((e as { errno?: unknown }).errno !== undefined || code === 'ESHORTIO') return e;
  return nativeError(e);
}

function rethrowNative(e: unknown): never {
  throw nativeError(e);
}

/** True when the native addon (built by `npm ci` from native/) loaded; false means the js backend only. */
export function nativeAvailable(): boolean {
  return loadNative() !== null;
}

/** The native addon's XTS implementation in use (vaes512, vaes256, aesni or evp), or null without the addon. */
export function nativeXtsImpl(): string | null {
  return loadNative()?.xtsImpl ?? null;
}

export const nativeBackend: BackendOps = {
  name: 'native',
  create(spec: CipherSpec, key: Uint8Array, sectorBytes: number, iv: IvInstance | undefined): SectorTransform {
    const addon = checkedAddon();
    if (addon === null) {
      throw new CryptmapError(
        'ENATIVE',
        `native crypto backend unavailable: ${nativeLoadError() ?? 'unknown reason'}`,
        { errno: 'ENOTSUP' },
      );
    }
    const { chain, ivMode } = nativeIds(addon, spec);
    const k = Buffer.from(key);
    try {
      return new NativeTransform(addon, addon.cipherCreate(chain, k, ivMode, iv?.nativeKey ?? null, sectorBytes));
    } catch (e) {
      throw nativeError(e);
    } finally {
      wipe(k);
    }
  },
};

/**
 * A native key handle for `spec` (dm-crypt syntax) with its own copy of the key, for native code that
 * runs requests without the engine (the FUSE export's direct route, daemon/fuse-export.ts). null when
 * the addon is not loaded. The caller disposes it (wipes and frees the schedule).
 */
export function createNativeKey(
  spec: CipherSpec,
  key: Uint8Array,
  sectorBytes: number,
): { handle: NativeKeyHandle; dispose(): void } | null {
  const addon = checkedAddon();
  if (addon === null) return null;
  const iv = spec.ivMode === undefined ? undefined : IV_GENERATORS[spec.ivMode].init({ spec, key });
  try {
    const { chain, ivMode } = nativeIds(addon, spec);
    const k = Buffer.from(key);
    try {
      const handle = addon.cipherCreate(chain, k, ivMode, iv?.nativeKey ?? null, sectorBytes);
      return { handle, dispose: () => addon.cipherDispose(handle) };
    } finally {
      wipe(k);
    }
  } finally {
    iv?.dispose();
  }
}
