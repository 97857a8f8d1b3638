/*
 * XTS-AES over VAES + VPCLMULQDQ (IEEE Std 1619-2007 section 5; whole blocks only, as dm-crypt's
 * sectors are), written with compiler intrinsics and function-level target attributes so that the
 * rest of the addon stays generic x86-64 and non-x86 builds compile the stubs at the end.
 *
 * The method (facts learnt from Linux arch/x86/crypto/aes-xts-avx-x86_64.S and OpenSSL 3.2's AVX-512
 * XTS; no code taken from either):
 *   - a vector holds consecutive blocks (4 in a ZMM, 2 in a YMM) and the matching tweaks;
 *   - the tweaks of one sector are computed in registers: the sector's initial tweak T = AES_K2(IV) is
 *     broadcast to every 128-bit lane and lane j of vector i becomes T * x^(lanes*i + j) by 64-bit shifts
 *     and one carry-less multiply of the bits shifted out by the reduction constant 0x87; one loop
 *     iteration covers 8 vectors, and each tweak vector then advances by x^(8 * lanes), a whole-byte
 *     shift of each lane plus one carry-less multiply;
 *   - the initial tweaks of a batch of sectors are encrypted under K2 together, several per instruction;
 *   - the first AES round-key XOR and the tweak XOR are one three-way XOR (vpternlogq), and the final
 *     tweak XOR is folded into the last round key (AESENCLAST / AESDECLAST end with an XOR of the key).
 * Constant time: AES is done by the instructions (no tables); no branch depends on keys or data.
 * Round keys are kept broadcast to 64 bytes, so the rounds take them as memory operands.
 */
#include "xts-vaes.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <stdlib.h>
#include <string.h>

/* VAES / VPCLMULQDQ intrinsics need GCC 8 or clang 8; older compilers build the stubs below. */
#if defined(__x86_64__) && (defined(__clang__) ? __clang_major__ >= 8 : defined(__GNUC__) && __GNUC__ >= 8)
#define CM_HAVE_VAES 1
#endif

#if defined(CM_HAVE_VAES)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/random.h>

#define MAX_ROUNDS 14

struct cm_vaes_keys {
  /* Round keys, each repeated in the four 128-bit lanes of 64 bytes: encrypt K1, decrypt K1 (equivalent
   * inverse cipher: AESIMC of the middle keys, order reversed), encrypt K2. */
  uint8_t e1[MAX_ROUNDS + 1][64] __attribute__((aligned(64)));
  uint8_t d1[MAX_ROUNDS + 1][64] __attribute__((aligned(64)));
  uint8_t e2[MAX_ROUNDS + 1][64] __attribute__((aligned(64)));
  int rounds;
};

typedef const uint8_t (*sched)[64];

#define T_AES __attribute__((target("aes,sse4.1")))
#define T_V256 __attribute__((target("vaes,vpclmulqdq,avx2,aes,sse4.1")))
#define T_V512 __attribute__((target("vaes,vpclmulqdq,avx512f,avx512vl,avx512bw,avx2,aes,sse4.1")))
#define INLINE static inline __attribute__((always_inline))

/* ---------- key expansion (FIPS 197 section 5.2, with AESKEYGENASSIST) ---------- */

/* w0..w3 of the next round key: each word XORs all earlier words of the previous key, then g. */
INLINE T_AES __m128i kx(__m128i k, __m128i g) {
  k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
  k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
  k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
  return _mm_xor_si128(k, g);
}

/* SubWord(RotWord(last word)) ^ rcon, in all four words. */
#define SR(k, rc) _mm_shuffle_epi32(_mm_aeskeygenassist_si128((k), (rc)), 0xff)
/* SubWord(last word) (AES-256's middle step), in all four words. */
#define S(k) _mm_shuffle_epi32(_mm_aeskeygenassist_si128((k), 0), 0xaa)

static T_AES int expand_key(const uint8_t *key, int bytes, __m128i *rk) {
  rk[0] = _mm_loadu_si128((const __m128i *)key);
  if (bytes == 16) {
    rk[1] = kx(rk[0], SR(rk[0], 0x01));
    rk[2] = kx(rk[1], SR(rk[1], 0x02));
    rk[3] = kx(rk[2], SR(rk[2], 0x04));
    rk[4] = kx(rk[3], SR(rk[3], 0x08));
    rk[5] = kx(rk[4], SR(rk[4], 0x10));
    rk[6] = kx(rk[5], SR(rk[5], 0x20));
    rk[7] = kx(rk[6], SR(rk[6], 0x40));
    rk[8] = kx(rk[7], SR(rk[7], 0x80));
    rk[9] = kx(rk[8], SR(rk[8], 0x1b));
    rk[10] = kx(rk[9], SR(rk[9], 0x36));
    return 10;
  }
  rk[1] = _mm_loadu_si128((const __m128i *)(key + 16));
#define K256(i, rc)                           \
  rk[i] = kx(rk[(i) - 2], SR(rk[(i) - 1], rc)); \
  rk[(i) + 1] = kx(rk[(i) - 1], S(rk[i]))
  K256(2, 0x01);
  K256(4, 0x02);
  K256(6, 0x04);
  K256(8, 0x08);
  K256(10, 0x10);
  K256(12, 0x20);
#undef K256
  rk[14] = kx(rk[12], SR(rk[13], 0x40));
  return 14;
}

static void put4(uint8_t dst[64], __m128i v) {
  for (int i = 0; i < 4; i++) memcpy(dst + 16 * i, &v, 16);
}

static T_AES void keys_init(cm_vaes_keys *ks, const uint8_t *key, int half) {
  __m128i rk[MAX_ROUNDS + 1];
  int rounds = expand_key(key, half, rk);
  ks->rounds = rounds;
  for (int r = 0; r <= rounds; r++) put4(ks->e1[r], rk[r]);
  put4(ks->d1[0], rk[rounds]);
  for (int r = 1; r < rounds; r++) put4(ks->d1[r], _mm_aesimc_si128(rk[rounds - r]));
  put4(ks->d1[rounds], rk[0]);
  expand_key(key + half, half, rk);
  for (int r = 0; r <= rounds; r++) put4(ks->e2[r], rk[r]);
  OPENSSL_cleanse(rk, sizeof rk);
}

cm_vaes_keys *cm_vaes_keys_new(const uint8_t *key, int key_len) {
  if (key_len != 32 && key_len != 64) return NULL;
  cm_vaes_keys *ks = aligned_alloc(64, (sizeof *ks + 63) / 64 * 64);
  if (!ks) return NULL;
  keys_init(ks, key, key_len / 2);
  return ks;
}

void cm_vaes_keys_free(cm_vaes_keys *ks) {
  if (!ks) return;
  OPENSSL_cleanse(ks, sizeof *ks);
  free(ks);
}

/* ---------- 512-bit registers: 4 blocks a vector, 8 vectors (512 bytes) an iteration ---------- */

#define K512(s, r) _mm512_load_si512((const void *)(s)[r])

/* Each 128-bit lane times x^sh (sh per 64-bit half, the same in both halves of a lane, 0..63). */
INLINE T_V512 __m512i mulx_var512(__m512i v, __m512i sh) {
  const __m512i carry = _mm512_srlv_epi64(v, _mm512_sub_epi64(_mm512_set1_epi64(64), sh));
  const __m512i r = _mm512_xor_si512(_mm512_sllv_epi64(v, sh), _mm512_bslli_epi128(carry, 8));
  return _mm512_xor_si512(r, _mm512_clmulepi64_epi128(carry, _mm512_set1_epi64(0x87), 0x01));
}

/* Each lane times x^32: a 4-byte shift, the 32 bits shifted out reduced by one multiply. */
INLINE T_V512 __m512i mulx32_512(__m512i v) {
  const __m512i out = _mm512_bsrli_epi128(v, 12);
  return _mm512_xor_si512(_mm512_bslli_epi128(v, 4), _mm512_clmulepi64_epi128(out, _mm512_set1_epi64(0x87), 0x00));
}

INLINE T_V512 void sector512(sched k, int rounds, int enc, const uint8_t *src, uint8_t *dst, size_t bytes, __m128i t) {
  const __m512i b = _mm512_broadcast_i32x4(t);
  __m512i tw[8], d[8];
  for (int i = 0; i < 8; i++) {
    const long long s = 4 * i;
    tw[i] = mulx_var512(b, _mm512_set_epi64(s + 3, s + 3, s + 2, s + 2, s + 1, s + 1, s, s));
  }
  const __m512i k0 = K512(k, 0), kl = K512(k, rounds);
#pragma GCC unroll 1
  for (size_t off = 0; off < bytes;) {
    for (int i = 0; i < 8; i++) d[i] = _mm512_ternarylogic_epi64(_mm512_loadu_si512((const void *)(src + off + 64 * i)), tw[i], k0, 0x96);
#pragma GCC unroll 14
    for (int r = 1; r < rounds; r++) {
      const __m512i kr = K512(k, r);
      for (int i = 0; i < 8; i++) d[i] = enc ? _mm512_aesenc_epi128(d[i], kr) : _mm512_aesdec_epi128(d[i], kr);
    }
    for (int i = 0; i < 8; i++) {
      const __m512i kt = _mm512_xor_si512(kl, tw[i]);
      d[i] = enc ? _mm512_aesenclast_epi128(d[i], kt) : _mm512_aesdeclast_epi128(d[i], kt);
      _mm512_storeu_si512((void *)(dst + off + 64 * i), d[i]);
    }
    off += 512;
    for (int i = 0; i < 8; i++) tw[i] = mulx32_512(tw[i]);
  }
}

/* Encrypt n 16-byte blocks in place under one schedule (the sectors' initial tweaks under K2). */
static T_V512 void ecb_enc512(sched k, int rounds, uint8_t *p, uint32_t n) {
  uint32_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512i v[4];
    for (int j = 0; j < 4; j++) v[j] = _mm512_xor_si512(_mm512_loadu_si512((const void *)(p + 16 * i + 64 * j)), K512(k, 0));
    for (int r = 1; r < rounds; r++) {
      for (int j = 0; j < 4; j++) v[j] = _mm512_aesenc_epi128(v[j], K512(k, r));
    }
    for (int j = 0; j < 4; j++) _mm512_storeu_si512((void *)(p + 16 * i + 64 * j), _mm512_aesenclast_epi128(v[j], K512(k, rounds)));
  }
  for (; i < n; i += 4) {
    const __mmask8 m = n - i >= 4 ? 0xff : (__mmask8)((1u << (2 * (n - i))) - 1);
    __m512i v = _mm512_xor_si512(_mm512_maskz_loadu_epi64(m, p + 16 * i), K512(k, 0));
    for (int r = 1; r < rounds; r++) v = _mm512_aesenc_epi128(v, K512(k, r));
    _mm512_mask_storeu_epi64(p + 16 * i, m, _mm512_aesenclast_epi128(v, K512(k, rounds)));
  }
}

/* One instance per direction and key size, so the round loop is fully unrolled. */
#define SECTORS(fn, sch, rounds, enc) \
  _Pragma("GCC unroll 1") for (uint32_t s = 0; s < n; s++) fn(sch, rounds, enc, src + s * sb, dst + s * sb, sb, _mm_loadu_si128((const __m128i *)(ivs + 16 * s)))

static T_V512 void xts512(const cm_vaes_keys *ks, int enc, const uint8_t *src, uint8_t *dst, size_t sb, uint32_t n, uint8_t *ivs) {
  ecb_enc512(ks->e2, ks->rounds, ivs, n);
  if (ks->rounds == 14) {
    if (enc) SECTORS(sector512, ks->e1, 14, 1);
    else SECTORS(sector512, ks->d1, 14, 0);
  } else {
    if (enc) SECTORS(sector512, ks->e1, 10, 1);
    else SECTORS(sector512, ks->d1, 10, 0);
  }
}

/* ---------- 256-bit registers (VEX: no AVX-512 needed): 2 blocks a vector, 8 vectors an iteration ---------- */

#define K256(s, r) _mm256_load_si256((const __m256i *)(s)[r])

INLINE T_V256 __m256i mulx_var256(__m256i v, __m256i sh) {
  const __m256i carry = _mm256_srlv_epi64(v, _mm256_sub_epi64(_mm256_set1_epi64x(64), sh));
  const __m256i r = _mm256_xor_si256(_mm256_sllv_epi64(v, sh), _mm256_bslli_epi128(carry, 8));
  return _mm256_xor_si256(r, _mm256_clmulepi64_epi128(carry, _mm256_set1_epi64x(0x87), 0x01));
}

/* Each lane times x^16. */
INLINE T_V256 __m256i mulx16_256(__m256i v) {
  const __m256i out = _mm256_bsrli_epi128(v, 14);
  return _mm256_xor_si256(_mm256_bslli_epi128(v, 2), _mm256_clmulepi64_epi128(out, _mm256_set1_epi64x(0x87), 0x00));
}

INLINE T_V256 void sector256(sched k, int rounds, int enc, const uint8_t *src, uint8_t *dst, size_t bytes, __m128i t) {
  const __m256i b = _mm256_broadcastsi128_si256(t);
  __m256i tw[8], d[8];
  for (int i = 0; i < 8; i++) {
    const long long s = 2 * i;
    tw[i] = mulx_var256(b, _mm256_set_epi64x(s + 1, s + 1, s, s));
  }
  const __m256i k0 = K256(k, 0), kl = K256(k, rounds);
#pragma GCC unroll 1
  for (size_t off = 0; off < bytes;) {
    for (int i = 0; i < 8; i++) d[i] = _mm256_xor_si256(_mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(src + off + 32 * i)), tw[i]), k0);
#pragma GCC unroll 14
    for (int r = 1; r < rounds; r++) {
      const __m256i kr = K256(k, r);
      for (int i = 0; i < 8; i++) d[i] = enc ? _mm256_aesenc_epi128(d[i], kr) : _mm256_aesdec_epi128(d[i], kr);
    }
    for (int i = 0; i < 8; i++) {
      const __m256i kt = _mm256_xor_si256(kl, tw[i]);
      d[i] = enc ? _mm256_aesenclast_epi128(d[i], kt) : _mm256_aesdeclast_epi128(d[i], kt);
      _mm256_storeu_si256((__m256i *)(dst + off + 32 * i), d[i]);
    }
    off += 256;
    for (int i = 0; i < 8; i++) tw[i] = mulx16_256(tw[i]);
  }
}

static T_V256 void ecb_enc256(sched k, int rounds, uint8_t *p, uint32_t n) {
  uint32_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256i v[4];
    for (int j = 0; j < 4; j++) v[j] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(p + 16 * i + 32 * j)), K256(k, 0));
    for (int r = 1; r < rounds; r++) {
      for (int j = 0; j < 4; j++) v[j] = _mm256_aesenc_epi128(v[j], K256(k, r));
    }
    for (int j = 0; j < 4; j++) _mm256_storeu_si256((__m256i *)(p + 16 * i + 32 * j), _mm256_aesenclast_epi128(v[j], K256(k, rounds)));
  }
  for (; i < n; i++) {
    __m128i v = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(p + 16 * i)), _mm_load_si128((const __m128i *)k[0]));
    for (int r = 1; r < rounds; r++) v = _mm_aesenc_si128(v, _mm_load_si128((const __m128i *)k[r]));
    _mm_storeu_si128((__m128i *)(p + 16 * i), _mm_aesenclast_si128(v, _mm_load_si128((const __m128i *)k[rounds])));
  }
}

static T_V256 void xts256(const cm_vaes_keys *ks, int enc, const uint8_t *src, uint8_t *dst, size_t sb, uint32_t n, uint8_t *ivs) {
  ecb_enc256(ks->e2, ks->rounds, ivs, n);
  if (ks->rounds == 14) {
    if (enc) SECTORS(sector256, ks->e1, 14, 1);
    else SECTORS(sector256, ks->d1, 14, 0);
  } else {
    if (enc) SECTORS(sector256, ks->e1, 10, 1);
    else SECTORS(sector256, ks->d1, 10, 0);
  }
}

void cm_vaes_xts(const cm_vaes_keys *ks, int width, int enc, const uint8_t *src, uint8_t *dst, size_t sector_bytes, uint32_t n, uint8_t *ivs) {
  if (width == CM_VAES_512) xts512(ks, enc, src, dst, sector_bytes, n, ivs);
  else xts256(ks, enc, src, dst, sector_bytes, n, ivs);
}

/* ---------- detection and self-test ---------- */

static uint64_t xgetbv0(void) {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return ((uint64_t)hi << 32) | lo;
}

/* What CPUID and the OS's enabled XSAVE state features (XCR0) allow. */
static int cpu_widths(void) {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
  const int aes = (c >> 25) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, sse41 = (c >> 19) & 1;
  if (!aes || !osxsave || !avx || !sse41) return 0;
  if (__get_cpuid_max(0, NULL) < 7) return 0;
  __cpuid_count(7, 0, a, b, c, d);
  const int avx2 = (b >> 5) & 1, avx512f = (b >> 16) & 1, avx512bw = (b >> 30) & 1, avx512vl = (b >> 31) & 1;
  const int vaes = (c >> 9) & 1, vpclmul = (c >> 10) & 1;
  const uint64_t xcr0 = xgetbv0();
  const int ymm_os = (xcr0 & 0x6) == 0x6;    /* SSE + AVX state */
  const int zmm_os = (xcr0 & 0xe6) == 0xe6;  /* + opmask, ZMM_Hi256, Hi16_ZMM */
  int w = 0;
  if (vaes && vpclmul && avx2 && ymm_os) w |= CM_VAES_256;
  if ((w & CM_VAES_256) && avx512f && avx512bw && avx512vl && zmm_os) w |= CM_VAES_512;
  return w;
}

/* One width against EVP: both key sizes, 512- and 4096-byte sectors, IVs across the 2^64 wrap. */
static int self_test(int width) {
  enum { BYTES = 3 * 4096 };
  uint8_t key[64], *pt = malloc(BYTES), *a = malloc(BYTES), *b = malloc(BYTES), ivs[3 * 8 * 16], iv[16];
  EVP_CIPHER_CTX *x = EVP_CIPHER_CTX_new();
  int good = pt && a && b && x;
  /* Random data, but never wait for the entropy pool (early boot): a fixed pattern then. */
  if (good && (getrandom(key, sizeof key, GRND_NONBLOCK) != (ssize_t)sizeof key || getrandom(pt, BYTES, GRND_NONBLOCK) != BYTES)) {
    for (size_t i = 0; i < sizeof key; i++) key[i] = (uint8_t)(i * 73 + 19);
    for (size_t i = 0; i < BYTES; i++) pt[i] = (uint8_t)(i * 151 + (i >> 8));
  }
  for (int kl = 32; good && kl <= 64; kl += 32) {
    if (CRYPTO_memcmp(key, key + kl / 2, kl / 2) == 0) key[0] ^= 1; /* EVP refuses equal halves */
    cm_vaes_keys *ks = cm_vaes_keys_new(key, kl);
    good = ks != NULL;
    for (size_t sb = 512; good && sb <= 4096; sb *= 8) {
      const uint32_t n = (uint32_t)(BYTES / sb);
      const uint64_t first = UINT64_MAX - 1;
      for (int enc = 1; good && enc >= 0; enc--) {
        const uint8_t *in = enc ? pt : a;
        for (uint32_t s = 0; good && s < n; s++) {
          uint64_t v = first + s;
          memset(iv, 0, 16);
          for (int i = 0; i < 8; i++) iv[i] = (uint8_t)(v >> (8 * i));
          memcpy(ivs + 16 * s, iv, 16);
          int outl;
          good = EVP_CipherInit_ex(x, kl == 32 ? EVP_aes_128_xts() : EVP_aes_256_xts(), NULL, key, iv, enc) == 1 &&
                 EVP_CipherUpdate(x, (enc ? a : b) + s * sb, &outl, in + s * sb, (int)sb) == 1;
        }
        if (!good) break;
        /* ours, in place on a copy: encrypt pt -> compare with a; decrypt a -> compare with pt */
        uint8_t *mine = malloc(BYTES);
        if (!mine) {
          good = 0;
          break;
        }
        memcpy(mine, in, BYTES);
        cm_vaes_xts(ks, width, enc, mine, mine, sb, n, ivs);
        good = memcmp(mine, enc ? a : pt, BYTES) == 0 && (enc || memcmp(b, pt, BYTES) == 0);
        free(mine);
      }
    }
    cm_vaes_keys_free(ks);
  }
  EVP_CIPHER_CTX_free(x);
  OPENSSL_cleanse(key, sizeof key);
  OPENSSL_cleanse(ivs, sizeof ivs);
  free(pt);
  free(a);
  free(b);
  return good;
}

int cm_vaes_probe(int *cpu) {
  const int w = *cpu = cpu_widths();
  int ok = 0;
  if ((w & CM_VAES_256) && self_test(CM_VAES_256)) ok |= CM_VAES_256;
  if ((w & CM_VAES_512) && self_test(CM_VAES_512)) ok |= CM_VAES_512;
  return ok;
}

#else /* not x86-64 (or an old compiler): no VAES; the addon uses its AES-NI or EVP paths */

struct cm_vaes_keys {
  int unused;
};
int cm_vaes_probe(int *cpu) {
  *cpu = 0;
  return 0;
}
cm_vaes_keys *cm_vaes_keys_new(const uint8_t *key, int key_len) {
  (void)key;
  (void)key_len;
  return NULL;
}
void cm_vaes_keys_free(cm_vaes_keys *ks) {
  free(ks);
}
void cm_vaes_xts(const cm_vaes_keys *ks, int width, int enc, const uint8_t *src, uint8_t *dst, size_t sector_bytes, uint32_t n, uint8_t *ivs) {
  (void)ks, (void)width, (void)enc, (void)src, (void)dst, (void)sector_bytes, (void)n, (void)ivs;
}

#endif
