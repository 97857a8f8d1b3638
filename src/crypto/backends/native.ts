/**
 * The native sector-cipher backend: a thin wrapper over the N-API addon (native/cryptmap.c). One
 * native call per request with the IV loop inside; the key schedule lives in native memory behind
 * an opaque handle and is zeroed on dispose.
 */
import { wipe } from '../../util/bytes.js';
import { CryptmapError } from '../../util/errors.js';
import { loadNative, type NativeAddon, type NativeKeyHandle, nativeLoadError } from '../../util/native.js';
import type { CipherSpec } from '../cipher-spec.js';
import type { IvInstance } from '../iv/index.js';
import { IV_GENERATORS } from '../iv/index.js';
import type { BackendOps, SectorRun, SectorTransform } from './types.js';

const CHAIN = { xts: 0, cbc: 1, ecb: 2 } as const;

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
    this.addon.cipherRun(this.#handle(), r.encrypt, r.src, r.dst, r.count, r.ivLo, r.ivHi, r.ivStep);
  }
  runAsync(r: SectorRun): Promise<void> {
    return this.addon.cipherRunAsync(this.#handle(), r.encrypt, r.src, r.dst, r.count, r.ivLo, r.ivHi, r.ivStep);
  }
  /** Benchmarks and tests: 0 auto, 1 EVP xts, 2 own tweaks over ECB, 3 AES-NI XTS (see NativeAddon.setXtsImpl). */
  setXtsImpl(impl: number): void {
    this.addon.setXtsImpl(this.#handle(), impl);
  }
  dispose(): void {
    if (this.#h !== null) this.addon.cipherDispose(this.#h);
    this.#h = null;
  }
}

export function nativeAvailable(): boolean {
  return loadNative() !== null;
}

export const nativeBackend: BackendOps = {
  name: 'native',
  create(spec: CipherSpec, key: Uint8Array, sectorBytes: number, iv: IvInstance | undefined): SectorTransform {
    const addon = loadNative();
    if (addon === null) {
      throw new CryptmapError('ENATIVE', `native crypto backend unavailable: ${nativeLoadError() ?? 'unknown reason'}`, { errno: 'ENOTSUP' });
    }
    const chain = spec.cipher === 'cipher_null' ? 3 : CHAIN[spec.chainMode];
    const ivMode = spec.ivMode === undefined ? 0 : (IV_GENERATORS[spec.ivMode]?.nativeMode ?? 0);
    const k = Buffer.from(key);
    try {
      return new NativeTransform(addon, addon.cipherCreate(chain, k, ivMode, iv?.nativeKey ?? null, sectorBytes));
    } finally {
      wipe(k);
    }
  },
};
