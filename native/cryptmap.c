/*
 * cryptmap native addon: the dm-crypt sector loop over Node's own OpenSSL (EVP symbols exported by
 * the node binary; no other library), plus three small file helpers for the file block device.
 *
 * Sector cipher (see src/util/native.ts for the JS-facing contract):
 *   - one call per request; the IV loop runs here (dm-crypt IV modes null, plain, plain64, plain64be,
 *     essiv, benbi; Linux drivers/md/dm-crypt.c "IV modes" comment);
 *   - XTS (IEEE Std 1619-2007) two ways: OpenSSL's EVP xts with the context reused and only the IV
 *     reset per sector, or our own tweak arithmetic over AES-ECB: all initial tweaks of a chunk in one
 *     ECB call under K2, per-block tweaks by doubling in GF(2^128), XOR, one ECB call under K1 for the
 *     whole chunk, XOR again. The second needs no per-sector EVP call, also handles keys with equal
 *     halves (OpenSSL refuses those for XTS encryption) and aes-192-xts;
 *   - cbc likewise calls OpenSSL's AES-NI CBC routine once per sector when available (EVP otherwise);
 *   - the key schedule lives in EVP contexts owned by a handle (an N-API external); dispose frees them
 *     (OpenSSL clears cipher contexts on free) and cleanses our key copy. Each concurrent run takes a
 *     context set from a small per-key free list, so requests on one key can run on several threads;
 *   - async runs go to our own crypt thread pool (like dm-crypt's kcryptd workqueue; size settable,
 *     default the CPU count), completions come back through a libuv async handle: no copies,
 *     buffers pinned by references until the promise settles (cipherSubmit: by the caller); while the queue is deep, completions
 *     are delivered in batches (see pool_worker);
 *   - a job may carry its file I/O (cipherRunFileAsync): pread then decrypt, or encrypt then pwrite,
 *     on the same crypt thread, so a file-backed crypt target needs one hand-off per request.
 */
#define NAPI_VERSION 8
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <node_api.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "cm-errno.h"
#include "xts-vaes.h"

#define ABI_VERSION 3

napi_status cryptmap_register_extras(napi_env env, napi_value exports); /* extras.c */

enum { CH_XTS = 0, CH_CBC = 1, CH_ECB = 2, CH_NULL = 3 };
enum { IV_NULL = 0, IV_PLAIN = 1, IV_PLAIN64 = 2, IV_PLAIN64BE = 3, IV_ESSIV = 4, IV_BENBI = 5 };
/* The ids by name, exported as `chainModes` and `ivModes`: the TS side (src/crypto/backends/native.ts)
 * reads them and checks at load that every IV generator and chain mode it knows has one. */
static const char *const CHAIN_NAMES[] = {"xts", "cbc", "ecb", "null"};
static const int CHAIN_IDS[] = {CH_XTS, CH_CBC, CH_ECB, CH_NULL};
static const char *const IV_NAMES[] = {"null", "plain", "plain64", "plain64be", "essiv", "benbi"};
static const int IV_IDS[] = {IV_NULL, IV_PLAIN, IV_PLAIN64, IV_PLAIN64BE, IV_ESSIV, IV_BENBI};
enum { XTS_AUTO = 0, XTS_EVP = 1, XTS_OWN = 2, XTS_AESNI = 3, XTS_VAES512 = 4, XTS_VAES256 = 5 };

/* XTS over VAES (xts-vaes.c): the widths usable here, the implementation chosen at load (or forced by
 * CRYPTMAP_CRYPTO_IMPL) and why a forced choice cannot be served (cipherCreate then refuses). */
static int vaes_widths, vaes_cpu, xts_default = XTS_EVP;
static char impl_error[256];

/*
 * Fast path: OpenSSL's own AES-NI XTS (and CBC) routines, called directly once per sector (no EVP dispatch,
 * no per-sector context re-initialisation). Node exports these symbols but they are not public API,
 * so they are looked up at load time with dlsym, used only when the CPU has AES-NI, and verified
 * against the EVP path on a known vector first; otherwise the EVP / own paths are used.
 * Layout of OpenSSL's AES_KEY (include/openssl/aes.h): 4*(14+1) round-key words, then rounds.
 */
typedef struct {
  uint32_t rd_key[60];
  int rounds;
} cm_aes_key;
typedef int (*aesni_set_key_fn)(const unsigned char *user_key, int bits, cm_aes_key *key);
typedef void (*aesni_xts_fn)(const unsigned char *in, unsigned char *out, size_t length, const cm_aes_key *key1, const cm_aes_key *key2, const unsigned char iv[16]);
static aesni_set_key_fn p_set_enc, p_set_dec;
static aesni_xts_fn p_xts_enc, p_xts_dec;
static int aesni_ok;
/* aesni_cbc_encrypt updates ivec in place; in == out is allowed. */
typedef void (*aesni_cbc_fn)(const unsigned char *in, unsigned char *out, size_t length, const cm_aes_key *key, unsigned char *ivec, int enc);
static aesni_cbc_fn p_cbc;
static int aesni_cbc_ok;

/* Bytes per inner chunk of the own-XTS loop: large enough to amortise the EVP calls, small enough to
 * stay in L1/L2 between the three passes. */
#define CHUNK_BYTES 16384
#define MAX_CHUNK_SECTORS (CHUNK_BYTES / 512)

typedef struct ctxset {
  struct ctxset *next;
  EVP_CIPHER_CTX *e1, *d1; /* ECB K1 (xts own, ecb) or CBC (cbc) */
  EVP_CIPHER_CTX *e2;      /* ECB K2 (xts own) */
  EVP_CIPHER_CTX *xe, *xd; /* EVP xts (when usable) */
  EVP_CIPHER_CTX *ive;     /* ESSIV ECB */
  uint8_t ivbuf[MAX_CHUNK_SECTORS * 16];
} ctxset;

/* AES-NI XTS schedules (read-only once built, so shared by all threads). */
typedef struct {
  cm_aes_key k1e, k1d, k2e;
} aesni_keys;

typedef struct {
  int chain, iv_mode, sector_bytes, xts_impl, evp_xts_ok;
  aesni_keys *ak; /* NULL unless the AES-NI path is available */
  cm_vaes_keys *vk; /* NULL unless VAES is available (xts, 32 or 64-byte keys) */
  uint8_t key[64];
  int key_len;
  uint8_t ivkey[32];
  int ivkey_len;
  pthread_mutex_t mu;
  ctxset *free_sets;
  int disposed, inflight, destroyed;
} cm_key;

/* ---------- helpers ---------- */

static void ctxset_free(ctxset *cs) {
  if (!cs) return;
  EVP_CIPHER_CTX_free(cs->e1);
  EVP_CIPHER_CTX_free(cs->d1);
  EVP_CIPHER_CTX_free(cs->e2);
  EVP_CIPHER_CTX_free(cs->xe);
  EVP_CIPHER_CTX_free(cs->xd);
  EVP_CIPHER_CTX_free(cs->ive);
  OPENSSL_cleanse(cs->ivbuf, sizeof cs->ivbuf);
  free(cs);
}

static const EVP_CIPHER *aes_ecb(int bytes) {
  return bytes == 16 ? EVP_aes_128_ecb() : bytes == 24 ? EVP_aes_192_ecb() : bytes == 32 ? EVP_aes_256_ecb() : NULL;
}
static const EVP_CIPHER *aes_cbc(int bytes) {
  return bytes == 16 ? EVP_aes_128_cbc() : bytes == 24 ? EVP_aes_192_cbc() : bytes == 32 ? EVP_aes_256_cbc() : NULL;
}

static EVP_CIPHER_CTX *mkctx(const EVP_CIPHER *c, const uint8_t *key, int enc) {
  if (!c) return NULL;
  EVP_CIPHER_CTX *x = EVP_CIPHER_CTX_new();
  if (!x) return NULL;
  if (EVP_CipherInit_ex(x, c, NULL, key, NULL, enc) != 1 || EVP_CIPHER_CTX_set_padding(x, 0) != 1) {
    EVP_CIPHER_CTX_free(x);
    return NULL;
  }
  return x;
}

static ctxset *ctxset_new(cm_key *k) {
  ctxset *cs = calloc(1, sizeof *cs);
  if (!cs) return NULL;
  int ok = 1;
  switch (k->chain) {
    case CH_XTS: {
      int half = k->key_len / 2;
      ok = (cs->e1 = mkctx(aes_ecb(half), k->key, 1)) && (cs->d1 = mkctx(aes_ecb(half), k->key, 0)) &&
           (cs->e2 = mkctx(aes_ecb(half), k->key + half, 1));
      if (ok && k->evp_xts_ok) {
        const EVP_CIPHER *x = half == 16 ? EVP_aes_128_xts() : EVP_aes_256_xts();
        ok = (cs->xe = mkctx(x, k->key, 1)) && (cs->xd = mkctx(x, k->key, 0));
      }
      break;
    }
    case CH_CBC:
      ok = (cs->e1 = mkctx(aes_cbc(k->key_len), k->key, 1)) && (cs->d1 = mkctx(aes_cbc(k->key_len), k->key, 0));
      break;
    case CH_ECB:
      ok = (cs->e1 = mkctx(aes_ecb(k->key_len), k->key, 1)) && (cs->d1 = mkctx(aes_ecb(k->key_len), k->key, 0));
      break;
    default:
      break;
  }
  if (ok && k->iv_mode == IV_ESSIV) ok = (cs->ive = mkctx(aes_ecb(k->ivkey_len), k->ivkey, 1)) != NULL;
  if (!ok) {
    ctxset_free(cs);
    return NULL;
  }
  return cs;
}

static ctxset *take_set(cm_key *k) {
  pthread_mutex_lock(&k->mu);
  ctxset *cs = k->free_sets;
  if (cs) k->free_sets = cs->next;
  pthread_mutex_unlock(&k->mu);
  return cs ? cs : ctxset_new(k);
}

static void give_set(cm_key *k, ctxset *cs) {
  pthread_mutex_lock(&k->mu);
  cs->next = k->free_sets;
  k->free_sets = cs;
  pthread_mutex_unlock(&k->mu);
}

static void key_destroy(cm_key *k) {
  if (k->destroyed) return;
  k->destroyed = 1;
  pthread_mutex_lock(&k->mu);
  ctxset *cs = k->free_sets;
  k->free_sets = NULL;
  pthread_mutex_unlock(&k->mu);
  while (cs) {
    ctxset *n = cs->next;
    ctxset_free(cs);
    cs = n;
  }
  OPENSSL_cleanse(k->key, sizeof k->key);
  OPENSSL_cleanse(k->ivkey, sizeof k->ivkey);
  if (k->ak) {
    OPENSSL_cleanse(k->ak, sizeof *k->ak);
    free(k->ak);
    k->ak = NULL;
  }
  cm_vaes_keys_free(k->vk);
  k->vk = NULL;
}

/* CBC: k1e/k1d are the encrypt/decrypt schedules of the whole key (k2e unused). */
static int aesni_cbc_keys_init(aesni_keys *ak, const uint8_t *key, int key_len) {
  return p_set_enc(key, key_len * 8, &ak->k1e) == 0 && p_set_dec(key, key_len * 8, &ak->k1d) == 0;
}

static int aesni_keys_init(aesni_keys *ak, const uint8_t *key, int key_len) {
  int bits = key_len * 4;
  return p_set_enc(key, bits, &ak->k1e) == 0 && p_set_dec(key, bits, &ak->k1d) == 0 && p_set_enc(key + key_len / 2, bits, &ak->k2e) == 0;
}

static inline void st_le64(uint8_t *p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static inline void st_be64(uint8_t *p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[7 - i] = (uint8_t)(v >> (8 * i));
}
static inline uint64_t ld64(const uint8_t *p) {
  uint64_t v;
  memcpy(&v, p, 8);
  return v;
}
static inline void st64(uint8_t *p, uint64_t v) {
  memcpy(p, &v, 8);
}

/* IVs for n sectors starting at IV sector s, advancing by step. Returns 0 on EVP failure. */
static int gen_ivs(cm_key *k, ctxset *cs, uint8_t *out, uint32_t n, uint64_t s, uint32_t step) {
  memset(out, 0, (size_t)n * 16);
  switch (k->iv_mode) {
    case IV_PLAIN:
      for (uint32_t i = 0; i < n; i++, s += step) {
        uint32_t lo = (uint32_t)s;
        out[i * 16] = (uint8_t)lo;
        out[i * 16 + 1] = (uint8_t)(lo >> 8);
        out[i * 16 + 2] = (uint8_t)(lo >> 16);
        out[i * 16 + 3] = (uint8_t)(lo >> 24);
      }
      break;
    case IV_PLAIN64:
    case IV_ESSIV:
      for (uint32_t i = 0; i < n; i++, s += step) st_le64(out + i * 16, s);
      break;
    case IV_PLAIN64BE:
      for (uint32_t i = 0; i < n; i++, s += step) st_be64(out + i * 16 + 8, s);
      break;
    case IV_BENBI:
      for (uint32_t i = 0; i < n; i++, s += step) st_be64(out + i * 16 + 8, (s << 5) + 1);
      break;
    default:
      break;
  }
  if (k->iv_mode == IV_ESSIV) {
    int outl;
    if (EVP_CipherUpdate(cs->ive, out, &outl, out, (int)n * 16) != 1) return 0;
  }
  return 1;
}

/* tweak *= alpha in GF(2^128), little-endian 64-bit halves. */
static inline void gf_double(uint64_t *lo, uint64_t *hi) {
  uint64_t carry = *hi >> 63;
  *hi = (*hi << 1) | (*lo >> 63);
  *lo = (*lo << 1) ^ (0x87 & (0 - carry));
}

static int run_xts_own(cm_key *k, ctxset *cs, int enc, const uint8_t *src, uint8_t *dst, uint32_t count, uint64_t s, uint32_t step) {
  const size_t sb = (size_t)k->sector_bytes;
  const uint32_t per = (uint32_t)(CHUNK_BYTES / sb) ? (uint32_t)(CHUNK_BYTES / sb) : 1;
  const size_t blocks = sb / 16;
  EVP_CIPHER_CTX *c1 = enc ? cs->e1 : cs->d1;
  while (count > 0) {
    uint32_t n = count < per ? count : per;
    int outl;
    if (!gen_ivs(k, cs, cs->ivbuf, n, s, step)) return 0;
    if (EVP_CipherUpdate(cs->e2, cs->ivbuf, &outl, cs->ivbuf, (int)n * 16) != 1) return 0;
    for (uint32_t i = 0; i < n; i++) {
      uint64_t tl = ld64(cs->ivbuf + i * 16), th = ld64(cs->ivbuf + i * 16 + 8);
      const uint8_t *p = src + i * sb;
      uint8_t *q = dst + i * sb;
      for (size_t b = 0; b < blocks; b++, p += 16, q += 16) {
        st64(q, ld64(p) ^ tl);
        st64(q + 8, ld64(p + 8) ^ th);
        gf_double(&tl, &th);
      }
    }
    if (EVP_CipherUpdate(c1, dst, &outl, dst, (int)(n * sb)) != 1) return 0;
    for (uint32_t i = 0; i < n; i++) {
      uint64_t tl = ld64(cs->ivbuf + i * 16), th = ld64(cs->ivbuf + i * 16 + 8);
      uint8_t *q = dst + i * sb;
      for (size_t b = 0; b < blocks; b++, q += 16) {
        st64(q, ld64(q) ^ tl);
        st64(q + 8, ld64(q + 8) ^ th);
        gf_double(&tl, &th);
      }
    }
    src += n * sb;
    dst += n * sb;
    s += (uint64_t)n * step;
    count -= n;
  }
  return 1;
}

/* Per sector: reset the IV of a reused EVP context (xts or cbc), one update per sector. */
static int run_per_sector(cm_key *k, ctxset *cs, EVP_CIPHER_CTX *c, const uint8_t *src, uint8_t *dst, uint32_t count, uint64_t s, uint32_t step) {
  const size_t sb = (size_t)k->sector_bytes;
  while (count > 0) {
    uint32_t n = count < MAX_CHUNK_SECTORS ? count : MAX_CHUNK_SECTORS;
    if (!gen_ivs(k, cs, cs->ivbuf, n, s, step)) return 0;
    for (uint32_t i = 0; i < n; i++) {
      int outl;
      if (EVP_CipherInit_ex(c, NULL, NULL, NULL, cs->ivbuf + i * 16, -1) != 1) return 0;
      if (EVP_CipherUpdate(c, dst, &outl, src, (int)sb) != 1) return 0;
      src += sb;
      dst += sb;
    }
    s += (uint64_t)n * step;
    count -= n;
  }
  return 1;
}

static int run_xts_aesni(cm_key *k, ctxset *cs, int enc, const uint8_t *src, uint8_t *dst, uint32_t count, uint64_t s, uint32_t step) {
  const size_t sb = (size_t)k->sector_bytes;
  const cm_aes_key *k1 = enc ? &k->ak->k1e : &k->ak->k1d;
  aesni_xts_fn f = enc ? p_xts_enc : p_xts_dec;
  while (count > 0) {
    uint32_t n = count < MAX_CHUNK_SECTORS ? count : MAX_CHUNK_SECTORS;
    if (!gen_ivs(k, cs, cs->ivbuf, n, s, step)) return 0;
    for (uint32_t i = 0; i < n; i++) {
      f(src, dst, sb, k1, &k->ak->k2e, cs->ivbuf + i * 16);
      src += sb;
      dst += sb;
    }
    s += (uint64_t)n * step;
    count -= n;
  }
  return 1;
}

static int run_xts_vaes(cm_key *k, ctxset *cs, int width, int enc, const uint8_t *src, uint8_t *dst, uint32_t count, uint64_t s, uint32_t step) {
  const size_t sb = (size_t)k->sector_bytes;
  while (count > 0) {
    uint32_t n = count < MAX_CHUNK_SECTORS ? count : MAX_CHUNK_SECTORS;
    if (!gen_ivs(k, cs, cs->ivbuf, n, s, step)) return 0;
    cm_vaes_xts(k->vk, width, enc, src, dst, sb, n, cs->ivbuf);
    src += n * sb;
    dst += n * sb;
    s += (uint64_t)n * step;
    count -= n;
  }
  return 1;
}

/* The XTS implementation serving k: the one asked for if it can, else the next one down. */
static int xts_impl_of(cm_key *k) {
  int impl = k->xts_impl == XTS_AUTO ? xts_default : k->xts_impl;
  if (impl == XTS_VAES512 && !(k->vk && (vaes_widths & CM_VAES_512))) impl = XTS_VAES256;
  if (impl == XTS_VAES256 && !(k->vk && (vaes_widths & CM_VAES_256))) impl = XTS_AESNI;
  if (impl == XTS_AESNI && !k->ak) impl = XTS_EVP;
  if (impl == XTS_EVP && !k->evp_xts_ok) impl = XTS_OWN;
  return impl;
}

static int run_cbc_aesni(cm_key *k, ctxset *cs, int enc, const uint8_t *src, uint8_t *dst, uint32_t count, uint64_t s, uint32_t step) {
  const size_t sb = (size_t)k->sector_bytes;
  const cm_aes_key *key = enc ? &k->ak->k1e : &k->ak->k1d;
  uint8_t iv[16];
  while (count > 0) {
    uint32_t n = count < MAX_CHUNK_SECTORS ? count : MAX_CHUNK_SECTORS;
    if (!gen_ivs(k, cs, cs->ivbuf, n, s, step)) return 0;
    for (uint32_t i = 0; i < n; i++) {
      memcpy(iv, cs->ivbuf + i * 16, 16);
      p_cbc(src, dst, sb, key, iv, enc);
      src += sb;
      dst += sb;
    }
    s += (uint64_t)n * step;
    count -= n;
  }
  OPENSSL_cleanse(iv, sizeof iv);
  return 1;
}

/* The whole request; returns 1 on success. */
static int run(cm_key *k, int enc, const uint8_t *src, uint8_t *dst, uint32_t count, uint64_t s, uint32_t step) {
  if (k->chain == CH_NULL) {
    if (dst != src) memmove(dst, src, (size_t)count * k->sector_bytes);
    return 1;
  }
  ctxset *cs = take_set(k);
  if (!cs) return 0;
  int ok;
  switch (k->chain) {
    case CH_XTS:
      switch (xts_impl_of(k)) {
        case XTS_VAES512: ok = run_xts_vaes(k, cs, CM_VAES_512, enc, src, dst, count, s, step); break;
        case XTS_VAES256: ok = run_xts_vaes(k, cs, CM_VAES_256, enc, src, dst, count, s, step); break;
        case XTS_AESNI: ok = run_xts_aesni(k, cs, enc, src, dst, count, s, step); break;
        case XTS_EVP: ok = run_per_sector(k, cs, enc ? cs->xe : cs->xd, src, dst, count, s, step); break;
        default: ok = run_xts_own(k, cs, enc, src, dst, count, s, step); break;
      }
      break;
    case CH_CBC:
      ok = k->ak ? run_cbc_aesni(k, cs, enc, src, dst, count, s, step) : run_per_sector(k, cs, enc ? cs->e1 : cs->d1, src, dst, count, s, step);
      break;
    default: {
      int outl;
      ok = EVP_CipherUpdate(enc ? cs->e1 : cs->d1, dst, &outl, src, (int)((size_t)count * k->sector_bytes)) == 1;
      break;
    }
  }
  if (ok) {
    give_set(k, cs);
  } else {
    ctxset_free(cs); /* an EVP failure may leave the context in an unknown state */
  }
  return ok;
}

/* ---------- N-API glue ---------- */

#define CHECK(env, call)                                          \
  do {                                                            \
    if ((call) != napi_ok) {                                      \
      napi_throw_error((env), "ENATIVE", "N-API call failed: " #call); \
      return NULL;                                                \
    }                                                             \
  } while (0)

static int get_bytes(napi_env env, napi_value v, uint8_t **data, size_t *len) {
  bool is_ta;
  if (napi_is_typedarray(env, v, &is_ta) != napi_ok || !is_ta) return 0;
  napi_typedarray_type t;
  size_t n;
  void *p;
  napi_value ab;
  size_t off;
  if (napi_get_typedarray_info(env, v, &t, &n, &p, &ab, &off) != napi_ok || t != napi_uint8_array) return 0;
  *data = (uint8_t *)p;
  *len = n;
  return 1;
}

static void finalize_key(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  cm_key *k = data;
  key_destroy(k);
  pthread_mutex_destroy(&k->mu);
  OPENSSL_cleanse(k, sizeof *k);
  free(k);
}

static cm_key *get_key(napi_env env, napi_value v) {
  napi_valuetype t;
  void *p = NULL;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_external || napi_get_value_external(env, v, &p) != napi_ok || !p) {
    napi_throw_type_error(env, "EINVAL", "not a cryptmap key handle");
    return NULL;
  }
  return p;
}

/* cipherCreate(chain, key, ivMode, ivKey|null, sectorBytes) */
static napi_value cipher_create(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value a[5];
  CHECK(env, napi_get_cb_info(env, info, &argc, a, NULL, NULL));
  int32_t chain, iv_mode, sb;
  uint8_t *key, *ivkey = NULL;
  size_t key_len, ivkey_len = 0;
  napi_valuetype t4;
  if (argc < 5 || napi_get_value_int32(env, a[0], &chain) != napi_ok || napi_get_value_int32(env, a[2], &iv_mode) != napi_ok ||
      napi_get_value_int32(env, a[4], &sb) != napi_ok || !get_bytes(env, a[1], &key, &key_len) || napi_typeof(env, a[3], &t4) != napi_ok) {
    napi_throw_type_error(env, "EINVAL", "cipherCreate(chain, key, ivMode, ivKey, sectorBytes): bad arguments");
    return NULL;
  }
  if (t4 != napi_null && t4 != napi_undefined && !get_bytes(env, a[3], &ivkey, &ivkey_len)) {
    napi_throw_type_error(env, "EINVAL", "cipherCreate: ivKey must be a Uint8Array or null");
    return NULL;
  }
  int good_sb = sb == 512 || sb == 1024 || sb == 2048 || sb == 4096;
  int good_key = chain == CH_NULL || (chain == CH_XTS && (key_len == 32 || key_len == 48 || key_len == 64)) ||
                 ((chain == CH_CBC || chain == CH_ECB) && (key_len == 16 || key_len == 24 || key_len == 32));
  int good_iv = iv_mode >= IV_NULL && iv_mode <= IV_BENBI &&
                (iv_mode != IV_ESSIV || (ivkey && (ivkey_len == 16 || ivkey_len == 24 || ivkey_len == 32)));
  if (!good_sb || !good_key || !good_iv || chain < CH_XTS || chain > CH_NULL) {
    napi_throw_range_error(env, "EINVAL", "cipherCreate: unsupported chain, key length, IV mode or sector size");
    return NULL;
  }
  if (impl_error[0]) {
    napi_throw_error(env, "EBACKEND", impl_error);
    return NULL;
  }
  cm_key *k = calloc(1, sizeof *k);
  if (!k) {
    napi_throw_error(env, "ENOMEM", "out of memory");
    return NULL;
  }
  pthread_mutex_init(&k->mu, NULL);
  k->chain = chain;
  k->iv_mode = iv_mode;
  k->sector_bytes = sb;
  k->xts_impl = XTS_AUTO;
  if (chain != CH_NULL) {
    memcpy(k->key, key, key_len);
    k->key_len = (int)key_len;
  }
  if (iv_mode == IV_ESSIV) {
    memcpy(k->ivkey, ivkey, ivkey_len);
    k->ivkey_len = (int)ivkey_len;
  }
  k->evp_xts_ok = chain == CH_XTS && key_len != 48 && CRYPTO_memcmp(k->key, k->key + key_len / 2, key_len / 2) != 0;
  if ((chain == CH_XTS && aesni_ok) || (chain == CH_CBC && aesni_cbc_ok)) {
    k->ak = aligned_alloc(64, (sizeof(aesni_keys) + 63) / 64 * 64);
    if (k->ak && !(chain == CH_XTS ? aesni_keys_init(k->ak, k->key, (int)key_len) : aesni_cbc_keys_init(k->ak, k->key, (int)key_len))) {
      OPENSSL_cleanse(k->ak, sizeof *k->ak);
      free(k->ak);
      k->ak = NULL;
    }
  }
  if (chain == CH_XTS && vaes_widths) k->vk = cm_vaes_keys_new(k->key, (int)key_len);
  /* Build one context set now so bad keys fail here, not on first use. */
  if (chain != CH_NULL) {
    ctxset *cs = ctxset_new(k);
    if (!cs) {
      key_destroy(k);
      pthread_mutex_destroy(&k->mu);
      free(k);
      napi_throw_error(env, "ENATIVE", "OpenSSL refused the key");
      return NULL;
    }
    give_set(k, cs);
  }
  napi_value ext;
  if (napi_create_external(env, k, finalize_key, NULL, &ext) != napi_ok) {
    key_destroy(k);
    pthread_mutex_destroy(&k->mu);
    free(k);
    napi_throw_error(env, "ENATIVE", "napi_create_external failed");
    return NULL;
  }
  return ext;
}

typedef struct {
  cm_key *k;
  int enc;
  uint8_t *src, *dst;
  uint32_t count, step;
  uint64_t s;
} run_args;

/* Parses (h, enc, src, dst, count, ivLo, ivHi, ivStep); throws and returns 0 on bad input. */
static int parse_run(napi_env env, napi_callback_info info, napi_value *a, run_args *r) {
  size_t argc = 8;
  if (napi_get_cb_info(env, info, &argc, a, NULL, NULL) != napi_ok || argc < 8) {
    napi_throw_type_error(env, "EINVAL", "cipherRun: 8 arguments expected");
    return 0;
  }
  r->k = get_key(env, a[0]);
  if (!r->k) return 0;
  bool enc;
  uint32_t lo, hi;
  size_t sl, dl;
  if (napi_get_value_bool(env, a[1], &enc) != napi_ok || !get_bytes(env, a[2], &r->src, &sl) || !get_bytes(env, a[3], &r->dst, &dl) ||
      napi_get_value_uint32(env, a[4], &r->count) != napi_ok || napi_get_value_uint32(env, a[5], &lo) != napi_ok ||
      napi_get_value_uint32(env, a[6], &hi) != napi_ok || napi_get_value_uint32(env, a[7], &r->step) != napi_ok) {
    napi_throw_type_error(env, "EINVAL", "cipherRun: bad arguments");
    return 0;
  }
  r->enc = enc;
  r->s = ((uint64_t)hi << 32) | lo;
  if (r->k->disposed) {
    napi_throw_error(env, "EDISPOSED", "sector cipher used after dispose");
    return 0;
  }
  if (sl != dl || sl != (size_t)r->count * (size_t)r->k->sector_bytes || sl > 0x7fffffff) {
    napi_throw_range_error(env, "EINVAL", "cipherRun: buffer lengths do not match count * sectorBytes (or exceed 2 GiB)");
    return 0;
  }
  if (r->src != r->dst && r->src < r->dst + dl && r->dst < r->src + sl) {
    napi_throw_range_error(env, "EOVERLAP", "cipherRun: source and destination overlap partially");
    return 0;
  }
  return 1;
}

static napi_value cipher_run(napi_env env, napi_callback_info info) {
  napi_value a[8];
  run_args r;
  if (!parse_run(env, info, a, &r)) return NULL;
  if (r.count > 0 && !run(r.k, r.enc, r.src, r.dst, r.count, r.s, r.step)) {
    napi_throw_error(env, "ENATIVE", "OpenSSL cipher operation failed");
  }
  return NULL;
}

/*
 * The crypt thread pool (dm-crypt's kcryptd): a fixed set of worker threads per Node environment,
 * a FIFO of requests, and completions delivered to the JS thread through a libuv async handle (one wake-up per batch).
 * Requests queue when all threads are busy, so a pool of N threads stays saturated with more than N
 * requests in flight. Its size is settable (setPoolThreads) and defaults to the online CPU count.
 */
#define MAX_POOL_THREADS 256
/* Queued work per thread, in time, below which a completion wakes the JS thread at once (see
 * pool_worker): more than the JS thread needs, once it has the CPU, to take a batch of completions
 * and submit the next requests. Time, not bytes: the same queue is 3x more work on AES-NI than on
 * VAES, and more again with the file I/O a job may carry. */
#define WAKE_AHEAD_NS 50000.0
/* Jobs of at least this (estimated) time yield to the JS thread at the end of the queue (see
 * pool_worker): 1 MiB of vaes512 is ~50 us, 64 KiB ~4 us. */
#define YIELD_MIN_JOB_NS 20000.0
/* A completion never waits longer than this for its wake-up, however deep the queue stays (new
 * requests may keep arriving while old ones complete): bounds the latency batching adds. */
#define WAKE_MAX_DELAY_NS 1000000LL

/*
 * Cache affinity. A job prefers the CPU that last ran a job on its destination buffer: a buffer
 * written on another CPU is read from that CPU's caches, and on this machine (a VM whose two vCPUs
 * do not share an L3: a cache line's round trip between them takes ~430 ns) reading and rewriting a
 * MiB the other vCPU wrote takes 25 us against 10 us for one this vCPU wrote, while vaes512 encrypts
 * a MiB in ~40 us. Buffers are recycled (the NBD server's receive pool, the benchmark's lanes), so a
 * thread takes the first of the first AFF_SCAN queued jobs whose buffer it ran last (or that no
 * thread ran yet), else the first job: never idle while work is queued. The first job is passed
 * over at most AFF_MAX_SKIPS times, so none waits long behind later ones.
 */
#define AFF_SLOTS 64
#define AFF_SCAN 16
#define AFF_MAX_SKIPS 8

static int64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* File I/O fused with a job (cipherRunFileAsync): pread before decrypting, pwrite after encrypting. */
enum { IO_NONE = 0, IO_PREAD = 1, IO_PWRITE = 2 };

typedef struct job {
  struct job *next;
  napi_deferred deferred; /* promise jobs (cipherRunAsync); NULL for submitted ones (cipherSubmit) */
  napi_ref h_ref, src_ref, dst_ref;
  int32_t id; /* submitted jobs: the caller's id, reported to the completion callback */
  run_args r;
  int io, fd;
  int64_t foff;
  int ok;
  int err; /* errno of the failed pread/pwrite; -1: end of file in a pread; 0: none */
  int skips; /* times a thread took a later job for cache affinity while this one was first (pool_take) */
} job;

/* pread/pwrite all of n bytes (short transfers retried, EINTR retried). 0, an errno, or -1 at end of file. */
static int full_io(int io, int fd, uint8_t *p, size_t n, int64_t off) {
  while (n > 0) {
    ssize_t r = io == IO_PREAD ? pread(fd, p, n, (off_t)off) : pwrite(fd, p, n, (off_t)off);
    if (r < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (r == 0) return io == IO_PREAD ? -1 : EIO;
    p += r;
    n -= (size_t)r;
    off += r;
  }
  return 0;
}

/* The work of one job on a crypt thread. */
static void job_run(job *j) {
  run_args *r = &j->r;
  size_t len = (size_t)r->count * (size_t)r->k->sector_bytes;
  if (j->io == IO_PREAD && (j->err = full_io(IO_PREAD, j->fd, r->src, len, j->foff)) != 0) {
    j->ok = 0;
    return;
  }
  j->ok = r->count == 0 || run(r->k, r->enc, r->src, r->dst, r->count, r->s, r->step);
  if (j->ok && j->io == IO_PWRITE && (j->err = full_io(IO_PWRITE, j->fd, r->dst, len, j->foff)) != 0) j->ok = 0;
}

typedef struct {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  job *head, *tail;         /* queued, not started */
  long queued;              /* length of head..tail */
  size_t queued_bytes;      /* their payload */
  job *done_head, *done_tail; /* finished, not yet delivered to JS */
  int notified;             /* a wake-up of the JS thread is pending */
  int js_working;           /* the JS thread runs queued jobs and takes completions each loop turn (pool_on_idle) */
  int64_t done_since_ns;    /* when the done list last became non-empty */
  double ns_per_byte;       /* a job's time per byte, lower envelope (0: none measured yet) */
  double n_jobs, n_wakes, n_sleeps, n_yields; /* counters (poolStats) */
  double n_local, n_remote; /* jobs run on the CPU that last ran a job on their buffer, and elsewhere */
  double n_caller;          /* jobs the JS thread ran (pool_on_idle) */
  double n_idle_yields;     /* yields of a crypt thread waiting for the JS thread to refill the queue */
  /* The CPU that last ran a job on each recent destination buffer (pool_take), direct-mapped. */
  struct {
    const uint8_t *buf;
    int cpu;
  } aff[AFF_SLOTS];
  pthread_t th[MAX_POOL_THREADS];
  int started, want, stop;
  int busy;                 /* threads running a job (metrics) */
  int sleepers;             /* threads waiting on cv */
  job *stage_head, *stage_tail; /* submitted (cipherSubmit), not yet queued (poolFlush); JS thread only */
  long staged;
  size_t staged_bytes;
  /* Wake-ups of the JS thread: a libuv async handle of the environment's loop (uv_async_send is
   * lock-free; a thread-safe function's queue takes a mutex its caller holds across the eventfd write,
   * on which the JS thread then blocked), referenced while jobs are in flight. */
  uv_async_t *async;
  uv_idle_t *idle; /* active while the JS thread works the queue (pool_on_idle) */
  napi_env env;
  napi_ref resource;
  napi_async_context actx;
  napi_async_cleanup_hook_handle cleanup;
  long inflight; /* JS thread only */
  /* cipherSubmit's completion callback and the Int32Array it reads the finished ids from (poolBind). */
  napi_ref done_cb, done_ids;
  int32_t *ids;
  size_t ids_cap;
} pool_t;

typedef struct {
  pool_t *pool;
  int index;
} worker_arg;

/* The Error a failed job settles with: code ENATIVE, ESHORTIO or the errno name (with errno, syscall). */
static napi_value job_error(napi_env env, job *j) {
  napi_value v;
  {
    napi_value code, msg;
    char text[160];
    const char *c = "ENATIVE";
    if (j->err == -1) {
      c = "ESHORTIO";
      snprintf(text, sizeof text, "end of file reading %zu bytes at %lld", (size_t)j->r.count * (size_t)j->r.k->sector_bytes, (long long)j->foff);
    } else if (j->err != 0) {
      c = cm_errno_name(j->err);
      snprintf(text, sizeof text, "%s of %zu bytes at %lld: %s", j->io == IO_PREAD ? "pread" : "pwrite", (size_t)j->r.count * (size_t)j->r.k->sector_bytes,
               (long long)j->foff, strerror(j->err));
    } else {
      snprintf(text, sizeof text, "OpenSSL cipher operation failed");
    }
    napi_create_string_utf8(env, c, NAPI_AUTO_LENGTH, &code);
    napi_create_string_utf8(env, text, NAPI_AUTO_LENGTH, &msg);
    napi_create_error(env, code, msg, &v);
    if (j->err > 0) {
      napi_value en;
      napi_create_int32(env, -j->err, &en);
      napi_set_named_property(env, v, "errno", en);
      napi_set_named_property(env, v, "syscall", msg);
    }
  }
  return v;
}

/* A promise job's end (cipherRunAsync): settle its promise, drop its references. */
static void job_finish(napi_env env, job *j) {
  napi_value v;
  if (j->ok) {
    napi_get_undefined(env, &v);
    napi_resolve_deferred(env, j->deferred, v);
  } else {
    napi_reject_deferred(env, j->deferred, job_error(env, j));
  }
  napi_delete_reference(env, j->h_ref);
  napi_delete_reference(env, j->src_ref);
  napi_delete_reference(env, j->dst_ref);
}

/* cb(n): the first n ids of the bound Int32Array finished; cb(-1, id, error): job id failed. */
static void call_done(napi_env env, pool_t *p, int32_t n, int32_t failed, napi_value err) {
  napi_value cb, recv, argv[3];
  if (napi_get_reference_value(env, p->done_cb, &cb) != napi_ok || napi_get_undefined(env, &recv) != napi_ok) return;
  napi_create_int32(env, n, &argv[0]);
  size_t argc = 1;
  if (n < 0) {
    napi_create_int32(env, failed, &argv[1]);
    argv[2] = err;
    argc = 3;
  }
  if (napi_call_function(env, recv, cb, argc, argv, NULL) == napi_pending_exception) {
    napi_value e;
    if (napi_get_and_clear_last_exception(env, &e) == napi_ok) napi_fatal_exception(env, e);
  }
}

/* On the JS thread, in a callback scope (microtasks run after): deliver every finished job (one wake-up may carry many). */
static void pool_deliver(napi_env env, pool_t *p) {
  pthread_mutex_lock(&p->mu);
  job *j = p->done_head;
  p->done_head = p->done_tail = NULL;
  p->notified = 0;
  pthread_mutex_unlock(&p->mu);
  /* Submitted jobs' ids are reported together (one JS call per ids_cap of them), failures one by one. */
  int32_t n_ids = 0;
  while (j) {
    job *n = j->next;
    cm_key *k = j->r.k;
    k->inflight--;
    if (k->disposed && k->inflight == 0) key_destroy(k);
    if (j->deferred) {
      job_finish(env, j);
    } else if (!j->ok) {
      napi_handle_scope scope;
      if (napi_open_handle_scope(env, &scope) == napi_ok) {
        call_done(env, p, -1, j->id, job_error(env, j));
        napi_close_handle_scope(env, scope);
      }
    } else {
      p->ids[n_ids++] = j->id;
      if ((size_t)n_ids == p->ids_cap) {
        call_done(env, p, n_ids, 0, NULL);
        n_ids = 0;
      }
    }
    free(j);
    if (--p->inflight == 0) uv_unref((uv_handle_t *)p->async);
    j = n;
  }
  if (n_ids > 0) call_done(env, p, n_ids, 0, NULL);
}

/* On the JS thread: deliver in a callback scope, as a thread-safe function would. */
static void pool_deliver_scoped(pool_t *p) {
  napi_env env = p->env;
  napi_handle_scope hs;
  if (napi_open_handle_scope(env, &hs) != napi_ok) return;
  napi_value res;
  napi_callback_scope cs;
  if (napi_get_reference_value(env, p->resource, &res) == napi_ok && napi_open_callback_scope(env, res, p->actx, &cs) == napi_ok) {
    pool_deliver(env, p);
    napi_close_callback_scope(env, cs);
  }
  napi_close_handle_scope(env, hs);
}

/* The async handle's callback (JS thread): a crypt thread finished jobs. */
static void pool_on_async(uv_async_t *h) {
  pool_deliver_scoped(h->data);
}

static unsigned aff_slot(const uint8_t *buf) {
  return (unsigned)(((uintptr_t)buf >> 6) * 0x9E3779B97F4A7C15ULL >> 58) & (AFF_SLOTS - 1);
}

/* The CPU that last ran a job on buf, or -1 (p->mu held). */
static int aff_cpu(pool_t *p, const uint8_t *buf) {
  unsigned i = aff_slot(buf);
  return p->aff[i].buf == buf ? p->aff[i].cpu : -1;
}

/* Unlink and return the job this thread, on `cpu`, runs next (p->mu held, queue not empty); see AFF_SLOTS. */
static job *pool_take(pool_t *p, int cpu) {
  job *prev = NULL, *j = p->head;
  int local = 0;
  if (cpu >= 0 && j->skips < AFF_MAX_SKIPS) {
    for (int n = 0; j && n < AFF_SCAN; prev = j, j = j->next, n++) {
      int c = aff_cpu(p, j->r.dst);
      if (c == cpu || c < 0) {
        local = 1;
        break;
      }
    }
    if (!local) {
      prev = NULL;
      j = p->head;
    } else if (j != p->head) {
      p->head->skips++;
    }
  }
  if (prev) prev->next = j->next;
  else p->head = j->next;
  if (p->tail == j) p->tail = prev;
  if (local) p->n_local++;
  else p->n_remote++;
  return j;
}

/*
 * Caller runs. On 2 CPUs the JS thread is a third thread beside 2 crypt threads, and each wake-up of
 * it cost the crypt threads ~13% of their time in this VM (perf, vaes512, 1 MiB jobs, 8 in flight:
 * the eventfd write with its cross-CPU wake-up 4.7%, the reschedule interrupt preempting the other
 * crypt thread 5.9%, the yield 2.3%), on top of its own ~8 ms per GiB. So after queuing jobs the JS
 * thread, instead of sleeping in epoll until a completion wakes it, runs queued jobs itself from a
 * libuv idle handle (one loop turn: jobs up to CALLER_RUN_NS, then it delivers every finished job;
 * the loop polls I/O without blocking between turns), and while it does, the crypt threads leave
 * their completions on the done list without waking it. It takes a job only while more are queued
 * than there are crypt threads (the last ones are theirs: a crypt thread left without work while
 * the JS thread runs a long job would idle), and never one with file I/O (a pread may block). When
 * it finds none it stops, delivers what finished, and completions wake it again as before. A loop
 * turn lasts at most about one job longer (1 MiB: ~40 us vaes512, ~180 us aesni).
 */
#define CALLER_RUN_NS 40000
/* A crypt thread that finds the queue empty while the JS thread works it yields up to this many
 * times before it sleeps: on 2 CPUs the JS thread is then often waiting for this CPU (a crypt thread
 * preempted it) with the completions that refill the queue, and a sleep would cost a futex wake-up
 * once it has flushed them. */
#define IDLE_YIELDS 16

/* Unlink the first job without file I/O among the first AFF_SCAN, preferring one whose buffer `cpu`
 * ran last; NULL when there is none (p->mu held). */
static job *pool_take_caller(pool_t *p, int cpu) {
  job *prev = NULL, *first = NULL, *first_prev = NULL, *j = p->head;
  for (int n = 0; j && n < AFF_SCAN; prev = j, j = j->next, n++) {
    if (j->io != IO_NONE) continue;
    int c = aff_cpu(p, j->r.dst);
    if (c == cpu || c < 0) break;
    if (!first) {
      first = j;
      first_prev = prev;
    }
  }
  if (!(j && j->io == IO_NONE)) {
    if (!first) return NULL;
    j = first;
    prev = first_prev;
    p->n_remote++;
  } else {
    p->n_local++;
  }
  if (j != p->head) p->head->skips++;
  if (prev) prev->next = j->next;
  else p->head = j->next;
  if (p->tail == j) p->tail = prev;
  return j;
}

/* A finished job onto the done list (p->mu held). */
static void pool_done(pool_t *p, job *j, int cpu, int64_t t) {
  j->next = NULL;
  p->n_jobs++;
  if (cpu >= 0) {
    unsigned slot = aff_slot(j->r.dst);
    p->aff[slot].buf = j->r.dst;
    p->aff[slot].cpu = cpu;
  }
  if (p->done_tail) {
    p->done_tail->next = j;
  } else {
    p->done_head = j;
    p->done_since_ns = t;
  }
  p->done_tail = j;
}

/* The idle handle's callback (JS thread, each loop turn while js_working): see CALLER_RUN_NS. */
static void pool_on_idle(uv_idle_t *h) {
  pool_t *p = h->data;
  int64_t t0 = now_ns(), t = t0;
  int cpu = sched_getcpu();
  for (;;) {
    pthread_mutex_lock(&p->mu);
    job *j = p->queued > p->want ? pool_take_caller(p, cpu) : NULL;
    if (j) {
      p->queued--;
      p->queued_bytes -= (size_t)j->r.count * (size_t)j->r.k->sector_bytes;
      p->busy++;
      p->n_caller++;
    } else {
      p->js_working = 0; /* from here on, completions wake this thread */
    }
    pthread_mutex_unlock(&p->mu);
    if (!j) {
      uv_idle_stop(h);
      break;
    }
    job_run(j);
    t = now_ns();
    pthread_mutex_lock(&p->mu);
    p->busy--;
    pool_done(p, j, cpu, t);
    pthread_mutex_unlock(&p->mu);
    if (t - t0 >= CALLER_RUN_NS) break;
  }
  pool_deliver_scoped(p);
}

/* After jobs were queued (JS thread, p->mu held): the JS thread works the queue from the next loop turn. */
static void pool_caller_start(pool_t *p) {
  if (p->idle && !p->js_working && p->head) {
    p->js_working = 1;
    uv_idle_start(p->idle, pool_on_idle);
  }
}

static void *pool_worker(void *arg) {
  worker_arg *wa = arg;
  pool_t *p = wa->pool;
  int idx = wa->index;
  free(wa);
  pthread_setname_np(pthread_self(), "cryptmap-crypt"); /* for top -H, perf and /proc/PID/task */
  for (;;) {
    int cpu = sched_getcpu(), yields = 0;
    pthread_mutex_lock(&p->mu);
    while (!p->stop && (p->head == NULL || idx >= p->want)) {
      if (p->js_working && idx < p->want && yields < IDLE_YIELDS) {
        /* See IDLE_YIELDS. */
        yields++;
        p->n_idle_yields++;
        pthread_mutex_unlock(&p->mu);
        sched_yield();
        pthread_mutex_lock(&p->mu);
        continue;
      }
      p->n_sleeps++;
      p->sleepers++;
      pthread_cond_wait(&p->cv, &p->mu);
      p->sleepers--;
    }
    if (p->stop) {
      pthread_mutex_unlock(&p->mu);
      return NULL;
    }
    job *j = pool_take(p, cpu);
    p->queued--;
    size_t bytes = (size_t)j->r.count * (size_t)j->r.k->sector_bytes;
    p->queued_bytes -= bytes;
    p->busy++;
    pthread_mutex_unlock(&p->mu);
    int64_t t0 = now_ns();
    job_run(j);
    /*
     * Completion batching. Each wake-up of the JS thread costs an eventfd write, often an IPI and two
     * context switches (on a 2-CPU machine the JS thread preempts a crypt thread), which measured as
     * ~15% of two cores at 10k requests/s. While more jobs are queued than there are threads and they
     * hold more than WAKE_AHEAD_NS of work per thread, the JS thread is not needed to keep the pool
     * busy, so the completion waits on the done list and the wake-up is sent once the queue runs
     * short: light loads and small requests complete at once, deep queues of large requests deliver
     * completions in batches. The last job always notifies (queue empty), and no completion waits
     * more than WAKE_MAX_DELAY_NS. The work is estimated from the time jobs took per byte (wall time,
     * filtered below; a thread's CPU time would cost two system calls per job, ~5% of the CPU in a VM).
     */
    int64_t t = now_ns();
    cpu = sched_getcpu();
    pthread_mutex_lock(&p->mu);
    p->busy--;
    if (bytes > 0) {
      /* The lower envelope of the jobs' time per byte: a job another process preempted says nothing
       * about the work (a jump after one such job delayed the wake-ups of 4 KiB reads), so a faster
       * job pulls the estimate down at once and a slower one (at most 2x) up slowly. */
      double x = (double)(t - t0) / (double)bytes, e = p->ns_per_byte;
      p->ns_per_byte = e == 0 ? x : x < e ? e + (x - e) / 4 : e + ((x < 2 * e ? x : 2 * e) - e) / 64;
    }
    pool_done(p, j, cpu, t);
    int notified = p->notified, pending = notified || p->js_working; /* js_working: it takes them itself */
    double ahead_ns = (double)p->queued_bytes * p->ns_per_byte / p->want;
    int wake = !pending && (p->queued <= p->want || ahead_ns <= WAKE_AHEAD_NS || t - p->done_since_ns >= WAKE_MAX_DELAY_NS);
    if (wake) {
      p->notified = 1;
      p->n_wakes++;
    }
    int yield = (notified || wake) && p->queued <= p->want && (double)bytes * p->ns_per_byte >= YIELD_MIN_JOB_NS;
    if (yield) p->n_yields++;
    pthread_mutex_unlock(&p->mu);
    if (wake) uv_async_send(p->async);
    /*
     * Hand the CPU to the JS thread. With every CPU running a crypt thread (2 threads on 2 CPUs), the
     * woken JS thread waits on a run queue until a crypt thread sleeps or its time slice (milliseconds)
     * ends. With long jobs (1 MiB: ~50-60 us of VAES) the threads then finish the queue, sleep, and one
     * CPU idles while the JS thread takes the batch and submits the next requests (measured, 8 x 1 MiB
     * in flight: threads asleep ~25% of the time, 0.2 sleeps per job; on an idle 2-CPU machine the pool
     * reached 1.64x of one thread). So, once at most one job per thread is left, a thread that finishes
     * a long job while a wake-up is pending yields: if the JS thread waits on this CPU it runs now and
     * refills the queue while the other thread keeps working (asleep <3% of the time, no sleeps).
     * Short jobs do not yield: there a yield costs more (a context switch per small batch; 64 KiB jobs
     * took 1.7x the CPU per request) than the brief idle while the JS thread takes a large batch.
     * Spinning before sleeping was tried too and saved nothing measurable.
     */
    if (yield) sched_yield();
  }
}

static void handle_free(uv_handle_t *h) {
  free(h);
}

static void pool_free(uv_handle_t *h) {
  pool_t *p = h->data;
  napi_remove_async_cleanup_hook(p->cleanup);
  free(h);
  free(p);
}

/* Environment teardown: stop the threads, drop what never finished, close the handle (then pool_free). */
static void pool_cleanup(napi_async_cleanup_hook_handle handle, void *arg) {
  pool_t *p = arg;
  p->cleanup = handle;
  pthread_mutex_lock(&p->mu);
  p->stop = 1;
  pthread_cond_broadcast(&p->cv);
  pthread_mutex_unlock(&p->mu);
  for (int i = 0; i < p->started; i++) pthread_join(p->th[i], NULL);
  /* Jobs never run or never delivered are abandoned with the environment; their buffers belong to it. */
  while (p->head) {
    job *n = p->head->next;
    free(p->head);
    p->head = n;
  }
  while (p->done_head) {
    job *n = p->done_head->next;
    free(p->done_head);
    p->done_head = n;
  }
  while (p->stage_head) {
    job *n = p->stage_head->next;
    free(p->stage_head);
    p->stage_head = n;
  }
  pthread_cond_destroy(&p->cv);
  pthread_mutex_destroy(&p->mu);
  if (p->idle) uv_close((uv_handle_t *)p->idle, handle_free);
  uv_close((uv_handle_t *)p->async, pool_free);
}

static pool_t *get_pool(napi_env env) {
  pool_t *p = NULL;
  if (napi_get_instance_data(env, (void **)&p) == napi_ok && p) return p;
  p = calloc(1, sizeof *p);
  if (!p) return NULL;
  /* Adaptive: the JS thread and the crypt threads hold it for a few instructions, and a contended
   * lock that sleeps at once costs a futex system call on each side (microseconds in a VM). */
  pthread_mutexattr_t ma;
  pthread_mutexattr_init(&ma);
  pthread_mutexattr_settype(&ma, PTHREAD_MUTEX_ADAPTIVE_NP);
  pthread_mutex_init(&p->mu, &ma);
  pthread_mutexattr_destroy(&ma);
  pthread_cond_init(&p->cv, NULL);
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  p->want = n < 1 ? 1 : n > MAX_POOL_THREADS ? MAX_POOL_THREADS : (int)n;
  napi_value name, res;
  uv_loop_t *loop;
  p->env = env;
  p->async = malloc(sizeof *p->async);
  if (!p->async || napi_get_uv_event_loop(env, &loop) != napi_ok || napi_create_string_utf8(env, "cryptmap.cryptPool", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_object(env, &res) != napi_ok || napi_create_reference(env, res, 1, &p->resource) != napi_ok ||
      napi_async_init(env, res, name, &p->actx) != napi_ok || uv_async_init(loop, p->async, pool_on_async) != 0) {
    /* (a reference or async context made before the failure goes with the environment) */
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->mu);
    free(p->async);
    free(p);
    return NULL;
  }
  p->async->data = p;
  uv_unref((uv_handle_t *)p->async);
  /* (without the idle handle the JS thread just does not run jobs: see CALLER_RUN_NS) */
  p->idle = malloc(sizeof *p->idle);
  if (p->idle && uv_idle_init(loop, p->idle) != 0) {
    free(p->idle);
    p->idle = NULL;
  }
  if (p->idle) {
    p->idle->data = p;
    uv_unref((uv_handle_t *)p->idle);
  }
  napi_set_instance_data(env, p, NULL, NULL);
  napi_add_async_cleanup_hook(env, pool_cleanup, p, NULL);
  return p;
}

/* Start threads up to p->want (JS thread). Returns 0 when none could be started. */
static int pool_grow(pool_t *p) {
  while (p->started < p->want) {
    worker_arg *wa = malloc(sizeof *wa);
    if (!wa) break;
    wa->pool = p;
    wa->index = p->started;
    if (pthread_create(&p->th[p->started], NULL, pool_worker, wa) != 0) {
      free(wa);
      break;
    }
    p->started++;
  }
  return p->started > 0;
}

/*
 * Queue a job on the pool; a[] as parsed by parse_run. id < 0: a promise job (cipherRunAsync), its
 * handle and buffers referenced until it settles; returns the promise. id >= 0: a submitted job
 * (cipherSubmit), whose caller keeps the handle and buffers reachable until the completion callback
 * reports id; returns undefined. NULL when thrown.
 */
static napi_value submit(napi_env env, napi_value *a, run_args r, int io, int fd, int64_t foff, int32_t id) {
  pool_t *p = get_pool(env);
  if (!p || !pool_grow(p)) {
    napi_throw_error(env, "ENATIVE", "cannot start the crypt thread pool");
    return NULL;
  }
  if (id >= 0 && !p->done_cb) {
    napi_throw_error(env, "ENATIVE", "cipherSubmit before poolBind");
    return NULL;
  }
  napi_value promise;
  job *j = calloc(1, sizeof *j);
  if (!j) {
    napi_throw_error(env, "ENOMEM", "out of memory");
    return NULL;
  }
  j->r = r;
  j->io = io;
  j->fd = fd;
  j->foff = foff;
  j->id = id;
  if (id < 0) {
    if (napi_create_promise(env, &j->deferred, &promise) != napi_ok || napi_create_reference(env, a[0], 1, &j->h_ref) != napi_ok ||
        napi_create_reference(env, a[2], 1, &j->src_ref) != napi_ok || napi_create_reference(env, a[3], 1, &j->dst_ref) != napi_ok) {
      /* (a promise whose deferred is dropped stays pending; the throw is what the caller sees) */
      if (j->h_ref) napi_delete_reference(env, j->h_ref);
      if (j->src_ref) napi_delete_reference(env, j->src_ref);
      free(j);
      napi_throw_error(env, "ENATIVE", "N-API call failed in cipherRunAsync");
      return NULL;
    }
  } else {
    napi_get_undefined(env, &promise);
  }
  r.k->inflight++;
  if (p->inflight++ == 0) uv_ref((uv_handle_t *)p->async);
  if (id >= 0) {
    /* Staged: poolFlush queues the whole batch under one lock, with one wake-up per idle thread. */
    if (p->stage_tail) p->stage_tail->next = j;
    else p->stage_head = j;
    p->stage_tail = j;
    p->staged++;
    p->staged_bytes += (size_t)r.count * (size_t)r.k->sector_bytes;
    return promise;
  }
  pthread_mutex_lock(&p->mu);
  if (p->tail) p->tail->next = j;
  else p->head = j;
  p->tail = j;
  p->queued++;
  p->queued_bytes += (size_t)r.count * (size_t)r.k->sector_bytes;
  /* After setPoolThreads shrank the pool, idle threads above `want` also wait on cv: a signal could
   * wake only one of those, and the job would wait forever. */
  if (p->started > p->want) pthread_cond_broadcast(&p->cv);
  else pthread_cond_signal(&p->cv);
  pool_caller_start(p);
  pthread_mutex_unlock(&p->mu);
  return promise;
}

/* poolFlush(): queue the jobs cipherSubmit staged since the last flush, and wake idle threads for them. */
static napi_value pool_flush(napi_env env, napi_callback_info info) {
  (void)info;
  pool_t *p = get_pool(env);
  if (!p || !p->stage_head) return NULL;
  pthread_mutex_lock(&p->mu);
  if (p->tail) p->tail->next = p->stage_head;
  else p->head = p->stage_head;
  p->tail = p->stage_tail;
  p->queued += p->staged;
  p->queued_bytes += p->staged_bytes;
  if (p->started > p->want) {
    pthread_cond_broadcast(&p->cv); /* see submit */
  } else {
    long wake = p->staged < p->sleepers ? p->staged : p->sleepers;
    for (long i = 0; i < wake; i++) pthread_cond_signal(&p->cv);
  }
  pool_caller_start(p);
  pthread_mutex_unlock(&p->mu);
  p->stage_head = p->stage_tail = NULL;
  p->staged = 0;
  p->staged_bytes = 0;
  return NULL;
}

static napi_value cipher_run_async(napi_env env, napi_callback_info info) {
  napi_value a[8];
  run_args r;
  if (!parse_run(env, info, a, &r)) return NULL;
  return submit(env, a, r, IO_NONE, -1, 0, -1);
}

/* An id argument of cipherSubmit: a non-negative int32. */
static int get_id(napi_env env, napi_value v, int32_t *id) {
  if (napi_get_value_int32(env, v, id) == napi_ok && *id >= 0) return 1;
  napi_throw_type_error(env, "EINVAL", "cipherSubmit: id must be a non-negative 32-bit integer");
  return 0;
}

/*
 * cipherSubmit(h, enc, src, dst, count, ivLo, ivHi, ivStep, id[, fd, fileOffset]): cipherRunAsync (or,
 * with fd, cipherRunFileAsync) without a promise: the completion callback given to poolBind reports id.
 * The caller keeps h, src and dst reachable until then (nothing here references them): one N-API call
 * and no V8 handles per request, where the promise form creates a promise and three references. The
 * job is staged until poolFlush() queues it with the others submitted since the last flush.
 */
static napi_value cipher_submit(napi_env env, napi_callback_info info) {
  napi_value a[11];
  run_args r;
  size_t argc = 11;
  if (napi_get_cb_info(env, info, &argc, a, NULL, NULL) != napi_ok || (argc != 9 && argc != 11)) {
    napi_throw_type_error(env, "EINVAL", "cipherSubmit: 9 or 11 arguments expected");
    return NULL;
  }
  int32_t id;
  if (!parse_run(env, info, a, &r) || !get_id(env, a[8], &id)) return NULL;
  if (argc == 9) return submit(env, a, r, IO_NONE, -1, 0, id);
  int32_t fd;
  int64_t foff;
  double d;
  if (napi_get_value_int32(env, a[9], &fd) != napi_ok || fd < 0 || napi_get_value_double(env, a[10], &d) != napi_ok || !(d >= 0) || d > 9007199254740991.0 ||
      (double)(foff = (int64_t)d) != d) {
    napi_throw_range_error(env, "EINVAL", "cipherSubmit: fd must be a descriptor and fileOffset a non-negative integer");
    return NULL;
  }
  return submit(env, a, r, r.enc ? IO_PWRITE : IO_PREAD, fd, foff, id);
}

/*
 * poolBind(callback, ids): the completion callback of cipherSubmit for this environment. The pool
 * writes finished ids into the Int32Array `ids` and calls callback(n) for the first n of them (several
 * calls when a batch holds more than ids.length); a failed job calls callback(-1, id, error) (error's
 * code: ENATIVE, ESHORTIO or the errno name of the failed pread/pwrite, with errno and syscall). Bind
 * once, before the first cipherSubmit; binding again replaces both.
 */
static napi_value pool_bind(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value a[2];
  CHECK(env, napi_get_cb_info(env, info, &argc, a, NULL, NULL));
  napi_valuetype t;
  bool is_ta = false;
  napi_typedarray_type tt;
  size_t len = 0;
  void *data = NULL;
  if (argc < 2 || napi_typeof(env, a[0], &t) != napi_ok || t != napi_function || napi_is_typedarray(env, a[1], &is_ta) != napi_ok || !is_ta ||
      napi_get_typedarray_info(env, a[1], &tt, &len, &data, NULL, NULL) != napi_ok || tt != napi_int32_array || len == 0) {
    napi_throw_type_error(env, "EINVAL", "poolBind(callback, ids): a function and a non-empty Int32Array");
    return NULL;
  }
  pool_t *p = get_pool(env);
  if (!p) {
    napi_throw_error(env, "ENATIVE", "cannot create the crypt thread pool");
    return NULL;
  }
  napi_ref cb, ids;
  CHECK(env, napi_create_reference(env, a[0], 1, &cb));
  if (napi_create_reference(env, a[1], 1, &ids) != napi_ok) {
    napi_delete_reference(env, cb);
    napi_throw_error(env, "ENATIVE", "N-API call failed in poolBind");
    return NULL;
  }
  if (p->done_cb) napi_delete_reference(env, p->done_cb);
  if (p->done_ids) napi_delete_reference(env, p->done_ids);
  p->done_cb = cb;
  p->done_ids = ids;
  p->ids = data;
  p->ids_cap = len;
  return NULL;
}

/*
 * cipherRunFileAsync(h, enc, src, dst, count, ivLo, ivHi, ivStep, fd, fileOffset): one crypt-thread job
 * that, decrypting, first preads src from fd at fileOffset, or, encrypting, pwrites dst afterwards.
 * The caller keeps fd open until the promise settles.
 */
static napi_value cipher_run_file_async(napi_env env, napi_callback_info info) {
  napi_value a[10];
  run_args r;
  size_t argc = 10;
  if (napi_get_cb_info(env, info, &argc, a, NULL, NULL) != napi_ok || argc < 10) {
    napi_throw_type_error(env, "EINVAL", "cipherRunFileAsync: 10 arguments expected");
    return NULL;
  }
  if (!parse_run(env, info, a, &r)) return NULL;
  int32_t fd;
  int64_t foff;
  double d;
  if (napi_get_value_int32(env, a[8], &fd) != napi_ok || fd < 0 || napi_get_value_double(env, a[9], &d) != napi_ok || !(d >= 0) || d > 9007199254740991.0 ||
      (double)(foff = (int64_t)d) != d) {
    napi_throw_range_error(env, "EINVAL", "cipherRunFileAsync: fd must be a descriptor and fileOffset a non-negative integer");
    return NULL;
  }
  return submit(env, a, r, r.enc ? IO_PWRITE : IO_PREAD, fd, foff, -1);
}

/* poolStats() -> { threads, started, busy, queued, queuedBytes, inflight, jobs, wakeups, sleeps, yields }:
 * the crypt pool's state for metrics (threads: how many take requests; busy: running a job now;
 * queued: waiting for a thread; inflight: submitted and not yet delivered to JS) and counters since it
 * started (jobs run, wake-ups of the JS thread, thread sleeps for want of work, yields; see pool_worker). */
static napi_value pool_stats(napi_env env, napi_callback_info info) {
  (void)info;
  pool_t *p = get_pool(env);
  if (!p) {
    napi_throw_error(env, "ENATIVE", "cannot create the crypt thread pool");
    return NULL;
  }
  pthread_mutex_lock(&p->mu);
  double v[13] = {p->want,   p->started, p->busy,   (double)p->queued, (double)p->queued_bytes, (double)p->inflight,
                  p->n_jobs, p->n_wakes, p->n_sleeps, p->n_yields,       p->n_local,               p->n_remote, p->n_caller};
  pthread_mutex_unlock(&p->mu);
  static const char *const names[13] = {"threads", "started", "busy",   "queued",    "queuedBytes", "inflight",  "jobs",
                                        "wakeups", "sleeps",  "yields", "localJobs", "remoteJobs",  "callerJobs"};
  napi_value out, x;
  CHECK(env, napi_create_object(env, &out));
  for (int i = 0; i < 13; i++) {
    CHECK(env, napi_create_double(env, v[i], &x));
    CHECK(env, napi_set_named_property(env, out, names[i], x));
  }
  return out;
}

/* setPoolThreads(n): how many pool threads take requests (1..256). Returns the previous value. */
static napi_value set_pool_threads(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value a[1];
  CHECK(env, napi_get_cb_info(env, info, &argc, a, NULL, NULL));
  int32_t n;
  if (argc < 1 || napi_get_value_int32(env, a[0], &n) != napi_ok || n < 1 || n > MAX_POOL_THREADS) {
    napi_throw_range_error(env, "EINVAL", "setPoolThreads: 1..256 threads");
    return NULL;
  }
  pool_t *p = get_pool(env);
  if (!p) {
    napi_throw_error(env, "ENATIVE", "cannot create the crypt thread pool");
    return NULL;
  }
  int prev = p->want;
  pthread_mutex_lock(&p->mu);
  p->want = n;
  pthread_cond_broadcast(&p->cv);
  pthread_mutex_unlock(&p->mu);
  napi_value out;
  CHECK(env, napi_create_int32(env, prev, &out));
  return out;
}

static napi_value cipher_dispose(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value a[1];
  CHECK(env, napi_get_cb_info(env, info, &argc, a, NULL, NULL));
  if (argc < 1) return NULL;
  cm_key *k = get_key(env, a[0]);
  if (!k) return NULL;
  k->disposed = 1;
  if (k->inflight == 0) key_destroy(k);
  return NULL;
}

static napi_value set_xts_impl(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value a[2];
  CHECK(env, napi_get_cb_info(env, info, &argc, a, NULL, NULL));
  cm_key *k = argc < 2 ? NULL : get_key(env, a[0]);
  if (!k) return NULL;
  int32_t impl;
  if (napi_get_value_int32(env, a[1], &impl) != napi_ok || impl < XTS_AUTO || impl > XTS_VAES256) {
    napi_throw_range_error(env, "EINVAL", "setXtsImpl: 0 (auto), 1 (evp), 2 (own), 3 (aesni), 4 (vaes512) or 5 (vaes256)");
    return NULL;
  }
  k->xts_impl = impl;
  return NULL;
}

/* ---------- for native/fuse-export.c (its threads run a request on a key the JS side keeps alive) ---------- */

void *cm_key_from_value(napi_env env, napi_value v) {
  cm_key *k = get_key(env, v);
  if (k && k->disposed) {
    napi_throw_error(env, "EDISPOSED", "sector cipher used after dispose");
    return NULL;
  }
  return k;
}
int cm_key_sector_bytes(void *k) {
  return ((cm_key *)k)->sector_bytes;
}
int cm_key_run_inplace(void *k, int enc, uint8_t *buf, uint32_t count, uint64_t iv, uint32_t step) {
  return run((cm_key *)k, enc, buf, buf, count, iv, step);
}
void cm_fuse_register(napi_env env, napi_value exports);

/* ---------- file helpers ---------- */

const char *cm_errno_name(int e) {
  const char *name = strerrorname_np(e);
  return name ? name : "EIO";
}

void cm_throw_errno(napi_env env, int e, const char *what) {
  char msg[160];
  snprintf(msg, sizeof msg, "%s: %s", what, strerror(e));
  napi_value code, m, err, num, sc;
  napi_create_string_utf8(env, cm_errno_name(e), NAPI_AUTO_LENGTH, &code);
  napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &m);
  napi_create_error(env, code, m, &err);
  napi_create_int32(env, -e, &num);
  napi_set_named_property(env, err, "errno", num);
  napi_create_string_utf8(env, what, NAPI_AUTO_LENGTH, &sc);
  napi_set_named_property(env, err, "syscall", sc);
  napi_throw(env, err);
}

static int get_fd_off(napi_env env, napi_callback_info info, size_t want, int32_t *fd, int64_t *v) {
  size_t argc = 3;
  napi_value a[3];
  if (napi_get_cb_info(env, info, &argc, a, NULL, NULL) != napi_ok || argc < want || napi_get_value_int32(env, a[0], fd) != napi_ok) goto bad;
  for (size_t i = 1; i < want; i++) {
    if (napi_get_value_int64(env, a[i], &v[i - 1]) != napi_ok || v[i - 1] < 0) goto bad;
  }
  return 1;
bad:
  napi_throw_type_error(env, "EINVAL", "expected (fd, non-negative offsets)");
  return 0;
}

static napi_value punch_hole(napi_env env, napi_callback_info info) {
  int32_t fd;
  int64_t v[2];
  if (!get_fd_off(env, info, 3, &fd, v)) return NULL;
  if (v[1] == 0) return NULL;
  if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)v[0], (off_t)v[1]) != 0) cm_throw_errno(env, errno, "fallocate");
  return NULL;
}

static napi_value seek_whence(napi_env env, napi_callback_info info, int whence, const char *name) {
  int32_t fd;
  int64_t v[1];
  if (!get_fd_off(env, info, 2, &fd, v)) return NULL;
  off_t r = lseek(fd, (off_t)v[0], whence);
  if (r < 0) {
    if (errno == ENXIO) r = -1;
    else {
      cm_throw_errno(env, errno, name);
      return NULL;
    }
  }
  napi_value out;
  CHECK(env, napi_create_int64(env, (int64_t)r, &out));
  return out;
}

static napi_value seek_data(napi_env env, napi_callback_info info) {
  return seek_whence(env, info, SEEK_DATA, "lseek(SEEK_DATA)");
}
static napi_value seek_hole(napi_env env, napi_callback_info info) {
  return seek_whence(env, info, SEEK_HOLE, "lseek(SEEK_HOLE)");
}

/* Look up OpenSSL's AES-NI XTS routines and check them against EVP on IEEE 1619 vector 10 data. */
static void aesni_probe(void) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  const char *forced = getenv("CRYPTMAP_CRYPTO_IMPL");
  if (!__builtin_cpu_supports("aes") || getenv("CRYPTMAP_NO_AESNI") || (forced && strcmp(forced, "evp") == 0)) return;
  p_set_enc = (aesni_set_key_fn)dlsym(RTLD_DEFAULT, "aesni_set_encrypt_key");
  p_set_dec = (aesni_set_key_fn)dlsym(RTLD_DEFAULT, "aesni_set_decrypt_key");
  p_xts_enc = (aesni_xts_fn)dlsym(RTLD_DEFAULT, "aesni_xts_encrypt");
  p_xts_dec = (aesni_xts_fn)dlsym(RTLD_DEFAULT, "aesni_xts_decrypt");
  if (!p_set_enc || !p_set_dec || !p_xts_enc || !p_xts_dec) return;
  uint8_t key[64], iv[16] = {0xff}, pt[512], a[512], b[512], c[512];
  for (int i = 0; i < 64; i++) key[i] = (uint8_t)(i * 37 + 11);
  for (int i = 0; i < 512; i++) pt[i] = (uint8_t)i;
  aesni_keys *ak = aligned_alloc(64, (sizeof(aesni_keys) + 63) / 64 * 64);
  EVP_CIPHER_CTX *x = EVP_CIPHER_CTX_new();
  int outl, good = ak && x && aesni_keys_init(ak, key, 64) && EVP_CipherInit_ex(x, EVP_aes_256_xts(), NULL, key, iv, 1) == 1 &&
                   EVP_CipherUpdate(x, a, &outl, pt, 512) == 1;
  if (good) {
    p_xts_enc(pt, b, 512, &ak->k1e, &ak->k2e, iv);
    p_xts_dec(b, c, 512, &ak->k1d, &ak->k2e, iv);
    good = memcmp(a, b, 512) == 0 && memcmp(c, pt, 512) == 0;
  }
  aesni_ok = good;
  /* CBC: aesni_cbc_encrypt against EVP aes-256-cbc, both directions, in place for decryption. */
  p_cbc = (aesni_cbc_fn)dlsym(RTLD_DEFAULT, "aesni_cbc_encrypt");
  if (p_cbc && ak && x) {
    uint8_t civ[16];
    good = aesni_cbc_keys_init(ak, key, 32) && EVP_CipherInit_ex(x, EVP_aes_256_cbc(), NULL, key, iv, 1) == 1 &&
           EVP_CIPHER_CTX_set_padding(x, 0) == 1 && EVP_CipherUpdate(x, a, &outl, pt, 512) == 1;
    if (good) {
      memcpy(civ, iv, 16);
      p_cbc(pt, b, 512, &ak->k1e, civ, 1);
      good = memcmp(a, b, 512) == 0;
      memcpy(civ, iv, 16);
      p_cbc(b, b, 512, &ak->k1d, civ, 0);
      good = good && memcmp(b, pt, 512) == 0;
    }
    aesni_cbc_ok = good;
  }
  EVP_CIPHER_CTX_free(x);
  if (ak) {
    OPENSSL_cleanse(ak, sizeof *ak);
    free(ak);
  }
#endif
}

void cryptmap_register_peercred(napi_env env, napi_value exports); /* peercred.c */
void cryptmap_register_dumpable(napi_env env, napi_value exports); /* dumpable.c */
void cryptmap_register_sdnotify(napi_env env, napi_value exports); /* sdnotify.c */
void cryptmap_register_sockbuf(napi_env env, napi_value exports);  /* sockbuf.c */
static const char *const XTS_NAMES[] = {"auto", "evp", "own", "aesni", "vaes512", "vaes256"};

/* After aesni_probe: VAES widths, then the default XTS implementation or CRYPTMAP_CRYPTO_IMPL's. */
static void impl_probe(void) {
  aesni_probe();
  const char *forced = getenv("CRYPTMAP_CRYPTO_IMPL");
  if (forced && !*forced) forced = NULL;
  if (!getenv("CRYPTMAP_NO_AESNI") && !(forced && strcmp(forced, "evp") == 0)) vaes_widths = cm_vaes_probe(&vaes_cpu);
  xts_default = vaes_widths & CM_VAES_512 ? XTS_VAES512 : vaes_widths & CM_VAES_256 ? XTS_VAES256 : aesni_ok ? XTS_AESNI : XTS_EVP;
  if (!forced) return;
  int want = -1;
  for (int i = XTS_EVP; i <= XTS_VAES256; i++)
    if (i != XTS_OWN && strcmp(forced, XTS_NAMES[i]) == 0) want = i;
  const int have = want == XTS_VAES512 ? (vaes_widths & CM_VAES_512) != 0 : want == XTS_VAES256 ? (vaes_widths & CM_VAES_256) != 0 : want == XTS_AESNI ? aesni_ok : want == XTS_EVP;
  if (want < 0) {
    snprintf(impl_error, sizeof impl_error, "CRYPTMAP_CRYPTO_IMPL must be vaes512, vaes256, aesni or evp (or unset), not '%.40s'", forced);
  } else if (!have) {
    snprintf(impl_error, sizeof impl_error,
             "CRYPTMAP_CRYPTO_IMPL=%s is not available here (%s); this machine supports: %s%s%sevp", forced,
             want == XTS_AESNI ? "needs AES-NI and OpenSSL's aesni_xts routines, not disabled by CRYPTMAP_NO_AESNI"
                               : "needs VAES, VPCLMULQDQ, AVX2 (and AVX512F/VL/BW for vaes512) with the OS saving those registers, and a passed self-test",
             vaes_widths & CM_VAES_512 ? "vaes512, " : "", vaes_widths & CM_VAES_256 ? "vaes256, " : "", aesni_ok ? "aesni, " : "");
  } else {
    xts_default = want;
  }
}

/* exports[prop] = { names[i]: ids[i], ... } */
static napi_status export_ids(napi_env env, napi_value exports, const char *prop, const char *const names[], const int ids[], size_t n) {
  napi_value obj, v;
  napi_status st = napi_create_object(env, &obj);
  for (size_t i = 0; st == napi_ok && i < n; i++) {
    st = napi_create_int32(env, ids[i], &v);
    if (st == napi_ok) st = napi_set_named_property(env, obj, names[i], v);
  }
  return st == napi_ok ? napi_set_named_property(env, exports, prop, obj) : st;
}

static napi_value init(napi_env env, napi_value exports) {
  static pthread_once_t once = PTHREAD_ONCE_INIT;
  pthread_once(&once, impl_probe);
  napi_property_descriptor d[] = {
      {"cipherCreate", NULL, cipher_create, NULL, NULL, NULL, napi_enumerable, NULL},
      {"cipherRun", NULL, cipher_run, NULL, NULL, NULL, napi_enumerable, NULL},
      {"cipherRunAsync", NULL, cipher_run_async, NULL, NULL, NULL, napi_enumerable, NULL},
      {"cipherRunFileAsync", NULL, cipher_run_file_async, NULL, NULL, NULL, napi_enumerable, NULL},
      {"cipherSubmit", NULL, cipher_submit, NULL, NULL, NULL, napi_enumerable, NULL},
      {"poolBind", NULL, pool_bind, NULL, NULL, NULL, napi_enumerable, NULL},
      {"poolFlush", NULL, pool_flush, NULL, NULL, NULL, napi_enumerable, NULL},
      {"cipherDispose", NULL, cipher_dispose, NULL, NULL, NULL, napi_enumerable, NULL},
      {"setXtsImpl", NULL, set_xts_impl, NULL, NULL, NULL, napi_enumerable, NULL},
      {"setPoolThreads", NULL, set_pool_threads, NULL, NULL, NULL, napi_enumerable, NULL},
      {"poolStats", NULL, pool_stats, NULL, NULL, NULL, napi_enumerable, NULL},
      {"punchHole", NULL, punch_hole, NULL, NULL, NULL, napi_enumerable, NULL},
      {"seekData", NULL, seek_data, NULL, NULL, NULL, napi_enumerable, NULL},
      {"seekHole", NULL, seek_hole, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  CHECK(env, napi_define_properties(env, exports, sizeof d / sizeof d[0], d));
  cm_fuse_register(env, exports);
  CHECK(env, cryptmap_register_extras(env, exports));
  napi_value ver;
  CHECK(env, napi_create_int32(env, ABI_VERSION, &ver));
  CHECK(env, napi_set_named_property(env, exports, "abiVersion", ver));
  CHECK(env, export_ids(env, exports, "chainModes", CHAIN_NAMES, CHAIN_IDS, sizeof CHAIN_IDS / sizeof CHAIN_IDS[0]));
  CHECK(env, export_ids(env, exports, "ivModes", IV_NAMES, IV_IDS, sizeof IV_IDS / sizeof IV_IDS[0]));
  napi_value fast;
  CHECK(env, napi_get_boolean(env, aesni_ok, &fast));
  CHECK(env, napi_set_named_property(env, exports, "aesniXts", fast));
  CHECK(env, napi_get_boolean(env, aesni_cbc_ok, &fast));
  CHECK(env, napi_set_named_property(env, exports, "aesniCbc", fast));
  cryptmap_register_peercred(env, exports);
  cryptmap_register_dumpable(env, exports);
  cryptmap_register_sdnotify(env, exports);
  cryptmap_register_sockbuf(env, exports);
  napi_value v, list;
  CHECK(env, napi_create_string_utf8(env, XTS_NAMES[xts_default], NAPI_AUTO_LENGTH, &v));
  CHECK(env, napi_set_named_property(env, exports, "xtsImpl", v));
  CHECK(env, napi_create_array(env, &list));
  const int avail[] = {vaes_widths & CM_VAES_512, vaes_widths & CM_VAES_256, aesni_ok, 1};
  const int ids[] = {XTS_VAES512, XTS_VAES256, XTS_AESNI, XTS_EVP};
  for (uint32_t i = 0, n = 0; i < 4; i++) {
    if (!avail[i]) continue;
    CHECK(env, napi_create_string_utf8(env, XTS_NAMES[ids[i]], NAPI_AUTO_LENGTH, &v));
    CHECK(env, napi_set_element(env, list, n++, v));
  }
  CHECK(env, napi_set_named_property(env, exports, "xtsImpls", list));
  /* Widths the CPU has whose self-test failed: the tests require this to be empty. */
  CHECK(env, napi_create_array(env, &list));
  const int failed = vaes_cpu & ~vaes_widths;
  for (uint32_t i = 0, n = 0; i < 2; i++) {
    if (!(failed & (i == 0 ? CM_VAES_512 : CM_VAES_256))) continue;
    CHECK(env, napi_create_string_utf8(env, XTS_NAMES[i == 0 ? XTS_VAES512 : XTS_VAES256], NAPI_AUTO_LENGTH, &v));
    CHECK(env, napi_set_element(env, list, n++, v));
  }
  CHECK(env, napi_set_named_property(env, exports, "xtsSelfTestFailures", list));
  if (impl_error[0]) CHECK(env, napi_create_string_utf8(env, impl_error, NAPI_AUTO_LENGTH, &v));
  else CHECK(env, napi_get_null(env, &v));
  CHECK(env, napi_set_named_property(env, exports, "cryptoImplError", v));
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
