/**
 * dm-crypt `essiv:<hash>`: IV = E_salt(le64(sector) || 0...) with salt = hash(key), a single-block
 * ECB encryption with the same cipher family keyed by the salt, whose key length is the digest
 * length (AES-256 for sha256 even when the data key is AES-128). Linux crypto/essiv.c,
 * cryptsetup lib/crypto_backend/crypto_storage.c `crypt_sector_iv_init` (hash_size-byte ECB key).
 */
import { createCipheriv, createHash } from 'node:crypto';
import { wipe } from '../../util/bytes.js';
import { CryptmapError } from '../../util/errors.js';
import { plain64 } from './plain64.js';
import { IV_BYTES, type IvInstance, type IvOps } from './types.js';

export const essiv: IvOps = {
  name: 'essiv',
  options: '<hash>',
  init(ctx): IvInstance {
    const hash = ctx.spec.ivOpts ?? '';
    const salt = createHash(hash).update(ctx.key).digest();
    if (salt.length !== 16 && salt.length !== 24 && salt.length !== 32) {
      wipe(salt);
      throw new CryptmapError(
        'ECIPHER_SPEC',
        `essiv:${hash}: a ${salt.length * 8}-bit digest is not a valid aes key size for the IV cipher`,
        {
          context: { spec: ctx.spec.spec },
        },
      );
    }
    const algo = `aes-${salt.length * 8}-ecb`;
    let ecb: ReturnType<typeof createCipheriv> | null = createCipheriv(algo, salt, null).setAutoPadding(false);
    const counter = plain64.init(ctx);
    return {
      nativeKey: salt,
      generate(out, count, lo, hi, step) {
        if (ecb === null) throw new CryptmapError('EDISPOSED', 'essiv IV generator used after dispose');
        counter.generate(out, count, lo, hi, step);
        const n = count * IV_BYTES;
        const enc = ecb.update(out.subarray(0, n));
        out.set(enc);
        wipe(enc);
      },
      dispose() {
        wipe(salt);
        ecb = null;
      },
    };
  },
};
