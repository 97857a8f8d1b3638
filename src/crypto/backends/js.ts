/**
 * The pure TypeScript sector-cipher backend over node:crypto (no native code). Correct first, not
 * fast: it is the fallback when the addon is absent and the reference the native backend is
 * tested against.
 *
 * - xts: computed here over AES-ECB (IEEE 1619 section 5.3): all initial tweaks of a request in one
 *   ECB call under K2, per-block tweaks by GF(2^128) doubling, then one ECB call under K1. Doing XTS
 *   ourselves also covers keys whose halves are equal (OpenSSL 3 refuses those for XTS encryption)
 *   and aes-192-xts (48-byte keys), which node:crypto lacks.
 * - cbc: encryption is serial within a sector, and every node:crypto call allocates its output. Long
 *   runs go block column by block column: block b of a sector needs only block b-1 of the same
 *   sector, so one ECB call encrypts block b of every sector (sectorBytes/16 calls per run, however
 *   long). Shorter runs (see COLUMN_MIN_SECTORS_PER_BLOCK) chain one CBC cipher object across the
 *   sectors instead, folding each sector's IV into its first block. Decryption is one ECB call plus
 *   XORs (in place safe: blocks run backwards).
 * - ecb: one call. cipher_null: copy.
 *
 * node:crypto keeps its own copy of the key schedule inside OpenSSL until the cipher objects are
 * garbage collected; dispose drops our references and wipes our key copies (see docs/secrets.md).
 */
import { type Cipher, createCipheriv, createDecipheriv, type Decipher } from 'node:crypto';
import { endianness } from 'node:os';
import { wipe } from '../../util/bytes.js';
import { CryptmapError } from '../../util/errors.js';
import type { CipherSpec } from '../cipher-spec.js';
import { IV_BYTES, type IvInstance } from '../iv/index.js';
import type { BackendOps, SectorRun, SectorTransform } from './types.js';
import { gfDouble } from './xts-math.js';

type Ecb = Cipher | Decipher;

const LITTLE_ENDIAN = endianness() === 'LE';

/**
 * CBC encryption goes column-wise once a run has this many sectors per 16-byte block of a sector
 * (512-byte sectors: 128 and up). Below it, the per-column gather/scatter and the sectorBytes/16 calls
 * cost more than the per-sector calls they save (README, "Why the data path's thresholds are what they
 * are", has the measurement).
 */
const COLUMN_MIN_SECTORS_PER_BLOCK = 4;

function ecb(key: Uint8Array, encrypt: boolean): Ecb {
  const algo = `aes-${key.length * 8}-ecb`;
  return (encrypt ? createCipheriv(algo, key, null) : createDecipheriv(algo, key, null)).setAutoPadding(false);
}

function xorInto(dst: Uint8Array, a: Uint8Array, b: Uint8Array, n: number): void {
  for (let i = 0; i < n; i++) dst[i] = a[i]! ^ b[i]!;
}

function disposedError(): CryptmapError {
  return new CryptmapError('EDISPOSED', 'sector cipher used after dispose');
}

function makeIvs(iv: IvInstance | undefined, r: SectorRun): Buffer {
  const ivs = Buffer.alloc(r.count * IV_BYTES);
  iv?.generate(ivs, r.count, r.ivLo, r.ivHi, r.ivStep);
  return ivs;
}

class JsXts implements SectorTransform {
  #k1e: Ecb | null;
  #k1d: Ecb | null;
  #k2e: Ecb | null;
  constructor(
    key: Uint8Array,
    readonly sectorBytes: number,
    readonly iv: IvInstance | undefined,
  ) {
    const half = key.length / 2;
    const k1 = Buffer.from(key.subarray(0, half));
    const k2 = Buffer.from(key.subarray(half));
    this.#k1e = ecb(k1, true);
    this.#k1d = ecb(k1, false);
    this.#k2e = ecb(k2, true);
    wipe(k1, k2);
  }
  run(r: SectorRun): void {
    if (this.#k2e === null || this.#k1e === null || this.#k1d === null) throw disposedError();
    if (!LITTLE_ENDIAN) {
      this.#runBytes(r);
      return;
    }
    // Word-wise on aligned copies: 32-bit XORs and tweak doubling on four little-endian words.
    const n = r.count * this.sectorBytes;
    const ivs = makeIvs(this.iv, r);
    const t0 = this.#k2e.update(ivs);
    const T = new Uint32Array(r.count * 4);
    new Uint8Array(T.buffer).set(t0);
    const x = new Uint32Array(n / 4);
    const xb = new Uint8Array(x.buffer);
    xb.set(r.src);
    const tw = new Uint32Array(n / 4);
    const wordsPerSector = this.sectorBytes / 4;
    for (let s = 0, w = 0; s < r.count; s++) {
      let a = T[s * 4]!;
      let b = T[s * 4 + 1]!;
      let c = T[s * 4 + 2]!;
      let d = T[s * 4 + 3]!;
      for (const end = w + wordsPerSector; w < end; w += 4) {
        tw[w] = a;
        tw[w + 1] = b;
        tw[w + 2] = c;
        tw[w + 3] = d;
        x[w] = x[w]! ^ a;
        x[w + 1] = x[w + 1]! ^ b;
        x[w + 2] = x[w + 2]! ^ c;
        x[w + 3] = x[w + 3]! ^ d;
        const carry = d >>> 31;
        d = ((d << 1) | (c >>> 31)) >>> 0;
        c = ((c << 1) | (b >>> 31)) >>> 0;
        b = ((b << 1) | (a >>> 31)) >>> 0;
        a = ((a << 1) ^ (carry * 0x87)) >>> 0;
      }
    }
    const y = (r.encrypt ? this.#k1e : this.#k1d).update(xb);
    xb.set(y);
    for (let i = 0; i < x.length; i++) x[i] = x[i]! ^ tw[i]!;
    r.dst.set(xb);
    wipe(xb, y, new Uint8Array(tw.buffer), t0);
  }
  /** Byte-wise variant for big-endian hosts. */
  #runBytes(r: SectorRun): void {
    const n = r.count * this.sectorBytes;
    const ivs = makeIvs(this.iv, r);
    const t0 = this.#k2e!.update(ivs);
    const tw = Buffer.allocUnsafe(n);
    const blocks = this.sectorBytes / 16;
    for (let s = 0; s < r.count; s++) {
      let off = s * this.sectorBytes;
      tw.set(t0.subarray(s * 16, s * 16 + 16), off);
      for (let b = 1; b < blocks; b++, off += 16) gfDouble(tw, off, off + 16);
    }
    const x = Buffer.allocUnsafe(n);
    xorInto(x, r.src, tw, n);
    const y = (r.encrypt ? this.#k1e! : this.#k1d!).update(x);
    xorInto(r.dst, y, tw, n);
    wipe(x, y, tw, t0);
  }
  runAsync(r: SectorRun): Promise<void> {
    return runAsSync(this, r);
  }
  dispose(): void {
    this.#k1e = this.#k1d = this.#k2e = null;
  }
}

class JsCbc implements SectorTransform {
  #key: Buffer | null;
  #e: Ecb | null;
  #d: Ecb | null;
  readonly #columnMinSectors: number;
  constructor(
    key: Uint8Array,
    readonly sectorBytes: number,
    readonly iv: IvInstance | undefined,
  ) {
    this.#key = Buffer.from(key);
    this.#e = ecb(this.#key, true);
    this.#d = ecb(this.#key, false);
    this.#columnMinSectors = COLUMN_MIN_SECTORS_PER_BLOCK * (sectorBytes / 16);
  }
  run(r: SectorRun): void {
    const key = this.#key;
    const e = this.#e;
    const d = this.#d;
    if (key === null || e === null || d === null) throw disposedError();
    const sb = this.sectorBytes;
    const ivs = makeIvs(this.iv, r);
    if (r.encrypt && r.count >= this.#columnMinSectors) {
      this.#encryptColumns(e, r, ivs);
    } else if (r.encrypt) {
      // One CBC object for the run: its chaining value after sector i-1 is that sector's last
      // ciphertext block c; feeding P0 ^ IV_i ^ c makes the cipher see P0 ^ IV_i, as dm-crypt does.
      const c = createCipheriv(`aes-${key.length * 8}-cbc`, key, ivs.subarray(0, 16)).setAutoPadding(false);
      const scratch = Buffer.allocUnsafe(sb);
      for (let s = 0; s < r.count; s++) {
        const off = s * sb;
        scratch.set(r.src.subarray(off, off + sb));
        if (s > 0) {
          for (let i = 0; i < 16; i++) scratch[i] = scratch[i]! ^ ivs[s * 16 + i]! ^ r.dst[off - 16 + i]!;
        }
        const out = c.update(scratch);
        r.dst.set(out, off);
      }
      wipe(scratch);
    } else {
      const y = d.update(r.src);
      for (let s = 0; s < r.count; s++) {
        const off = s * sb;
        // Backwards so that in place (dst === src) every ciphertext block is read before it is overwritten.
        for (let b = sb - 16; b > 0; b -= 16) {
          for (let i = 0; i < 16; i++) r.dst[off + b + i] = y[off + b + i]! ^ r.src[off + b - 16 + i]!;
        }
        for (let i = 0; i < 16; i++) r.dst[off + i] = y[off + i]! ^ ivs[s * 16 + i]!;
      }
      wipe(y);
    }
  }
  /**
   * Encrypt block column by block column on an aligned copy (32-bit words): column b holds block b
   * of every sector, XORed with its chaining value (the sector's IV, then its ciphertext block b-1).
   */
  #encryptColumns(e: Ecb, r: SectorRun, ivs: Buffer): void {
    const wordsPerSector = this.sectorBytes / 4;
    const x = new Uint32Array((r.count * this.sectorBytes) / 4);
    const xb = new Uint8Array(x.buffer);
    xb.set(r.src);
    const col = new Uint32Array(r.count * 4);
    const colBytes = new Uint8Array(col.buffer);
    const chain = new Uint32Array(r.count * 4);
    const chainBytes = new Uint8Array(chain.buffer);
    chainBytes.set(ivs);
    for (let w0 = 0; w0 < wordsPerSector; w0 += 4) {
      for (let i = 0, w = w0; i < col.length; i += 4, w += wordsPerSector) {
        col[i] = x[w]! ^ chain[i]!;
        col[i + 1] = x[w + 1]! ^ chain[i + 1]!;
        col[i + 2] = x[w + 2]! ^ chain[i + 2]!;
        col[i + 3] = x[w + 3]! ^ chain[i + 3]!;
      }
      const y = e.update(colBytes);
      chainBytes.set(y);
      for (let i = 0, w = w0; i < chain.length; i += 4, w += wordsPerSector) {
        x[w] = chain[i]!;
        x[w + 1] = chain[i + 1]!;
        x[w + 2] = chain[i + 2]!;
        x[w + 3] = chain[i + 3]!;
      }
    }
    r.dst.set(xb);
    wipe(xb, colBytes, chainBytes);
  }
  runAsync(r: SectorRun): Promise<void> {
    return runAsSync(this, r);
  }
  dispose(): void {
    wipe(this.#key);
    this.#key = null;
    this.#e = null;
    this.#d = null;
  }
}

class JsEcb implements SectorTransform {
  #e: Ecb | null;
  #d: Ecb | null;
  constructor(key: Uint8Array) {
    this.#e = ecb(key, true);
    this.#d = ecb(key, false);
  }
  run(r: SectorRun): void {
    const c = r.encrypt ? this.#e : this.#d;
    if (c === null) throw disposedError();
    const y = c.update(r.src);
    r.dst.set(y);
    wipe(y);
  }
  runAsync(r: SectorRun): Promise<void> {
    return runAsSync(this, r);
  }
  dispose(): void {
    this.#e = this.#d = null;
  }
}

class JsNull implements SectorTransform {
  #live = true;
  run(r: SectorRun): void {
    if (!this.#live) throw disposedError();
    if (r.dst !== r.src) r.dst.set(r.src);
  }
  runAsync(r: SectorRun): Promise<void> {
    return runAsSync(this, r);
  }
  dispose(): void {
    this.#live = false;
  }
}

async function runAsSync(t: SectorTransform, r: SectorRun): Promise<void> {
  t.run(r);
}

export const jsBackend: BackendOps = {
  name: 'js',
  create(spec: CipherSpec, key: Uint8Array, sectorBytes: number, iv: IvInstance | undefined): SectorTransform {
    if (spec.cipher === 'cipher_null') return new JsNull();
    switch (spec.chainMode) {
      case 'xts':
        return new JsXts(key, sectorBytes, iv);
      case 'cbc':
        return new JsCbc(key, sectorBytes, iv);
      case 'ecb':
        return new JsEcb(key);
    }
  },
};
