/**
 * Backend choice for sector ciphers: an explicit request, else CRYPTMAP_CRYPTO_BACKEND=native|js,
 * else native when the addon loads (required when CRYPTMAP_CRYPTO_IMPL names one of its XTS
 * implementations), else js.
 */
import { CryptmapError } from '../../util/errors.js';
import { jsBackend } from './js.js';
import { nativeLoadError } from '../../util/native.js';
import { nativeAvailable, nativeBackend } from './native.js';
import type { BackendName, BackendOps } from './types.js';

export type { BackendName, BackendOps, SectorRun, SectorTransform } from './types.js';

export const BACKENDS: Readonly<Record<BackendName, BackendOps>> = Object.freeze({
  native: nativeBackend,
  js: jsBackend,
});

/** The backend used when none is asked for. */
export function defaultBackend(env: NodeJS.ProcessEnv = process.env): BackendName {
  const forced = env.CRYPTMAP_CRYPTO_BACKEND;
  if (forced !== undefined && forced !== '') {
    if (forced !== 'native' && forced !== 'js') {
      throw new CryptmapError('EBACKEND', `CRYPTMAP_CRYPTO_BACKEND must be 'native' or 'js', not '${forced}'`);
    }
    return forced;
  }
  const impl = env.CRYPTMAP_CRYPTO_IMPL;
  if (impl !== undefined && impl !== '') {
    // An implementation of the native addon was asked for: never fall back to js silently.
    if (!nativeAvailable())
      throw new CryptmapError(
        'EBACKEND',
        `CRYPTMAP_CRYPTO_IMPL=${impl} needs the native addon, which did not load: ${nativeLoadError() ?? 'unknown reason'}`,
      );
    return 'native';
  }
  return nativeAvailable() ? 'native' : 'js';
}
