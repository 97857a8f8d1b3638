/*
 * XTS-AES (IEEE Std 1619-2007, whole 16-byte blocks: no ciphertext stealing) over VAES + VPCLMULQDQ,
 * four blocks per instruction on 512-bit registers or two on 256-bit ones. See xts-vaes.c.
 */
#ifndef CRYPTMAP_XTS_VAES_H
#define CRYPTMAP_XTS_VAES_H

#include <stddef.h>
#include <stdint.h>

/* Bits of cm_vaes_probe()'s answer: which widths this CPU and OS run and which passed the self-test. */
enum { CM_VAES_256 = 1, CM_VAES_512 = 2 };

typedef struct cm_vaes_keys cm_vaes_keys;

/*
 * CPUID + XGETBV (the OS saves the YMM / ZMM and opmask state) for each width, then a self-test of each
 * usable width against OpenSSL's EVP aes-128-xts and aes-256-xts on random keys, data and IVs. Returns
 * the widths that passed; *cpu gets those the CPU and OS support. Call once at load; 0 off x86-64.
 */
int cm_vaes_probe(int *cpu);

/* Key schedules for an XTS key of 32 or 64 bytes (K1 || K2); NULL for other lengths or on OOM. */
cm_vaes_keys *cm_vaes_keys_new(const uint8_t *key, int key_len);

/* Wipes and frees the schedules; NULL is fine. */
void cm_vaes_keys_free(cm_vaes_keys *ks);

/*
 * n sectors of sector_bytes (a multiple of 512) from src to dst (the same buffer or disjoint), width
 * CM_VAES_512 or CM_VAES_256 (one cm_vaes_probe() reported). ivs holds the n 16-byte IVs and is
 * overwritten with the encrypted initial tweaks (caller wipes it).
 */
void cm_vaes_xts(const cm_vaes_keys *ks, int width, int enc, const uint8_t *src, uint8_t *dst, size_t sector_bytes, uint32_t n, uint8_t *ivs);

#endif
