/*
 * Two small helpers outside the sector cipher (see src/util/native.ts for the JS-facing contract):
 *
 *   - keyringReadUser(description): the payload of the kernel keyring key of type "user" with that
 *     description, found as cryptsetup's luks2-keyring token finds it (request_key(2) with no
 *     callout: the thread, process and session keyrings, then the user keyrings they link), read with
 *     keyctl(KEYCTL_READ). null when no such key is reachable. The temporary copy is cleansed.
 *   - loadLegacyProvider(): loads OpenSSL's "legacy" provider (next to "default") into Node's own
 *     OpenSSL, which Node only does for --openssl-legacy-provider, so that hashes LUKS1 headers may
 *     name but OpenSSL 3 keeps there (whirlpool) work for PBKDF2 and the AF splitter. Idempotent.
 *   - flock(fd, op): flock(2) without blocking (Node has none): op is one of LOCK_SH|LOCK_NB,
 *     LOCK_EX|LOCK_NB or LOCK_UN, so the JS thread never waits on another process. true when done,
 *     false when another holder has it (EWOULDBLOCK); any other failure throws with the errno's name.
 *     cryptsetup's reencryption lock is an flock (src/luks/reencrypt-lock.ts).
 */
#define NAPI_VERSION 8
#define _GNU_SOURCE
#include <errno.h>
#include "cm-errno.h"
#include <linux/keyctl.h>
#include <node_api.h>
#include <openssl/crypto.h>
#include <openssl/provider.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/syscall.h>
#include <unistd.h>

#define XCHECK(env, call)                                                   \
  do {                                                                      \
    if ((call) != napi_ok) {                                                \
      napi_throw_error((env), NULL, "cryptmap native: N-API call failed"); \
      return NULL;                                                          \
    }                                                                       \
  } while (0)

static napi_value keyring_read_user(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  XCHECK(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  char desc[4096];
  size_t len = 0;
  if (argc < 1 || napi_get_value_string_utf8(env, argv[0], desc, sizeof desc, &len) != napi_ok || len == 0 || len >= sizeof desc - 1) {
    napi_throw_type_error(env, NULL, "keyringReadUser: description must be a non-empty string");
    return NULL;
  }
  napi_value nul;
  XCHECK(env, napi_get_null(env, &nul));
  long id = syscall(SYS_request_key, "user", desc, NULL, 0);
  if (id < 0) return nul;
  long size = syscall(SYS_keyctl, KEYCTL_READ, id, NULL, 0);
  if (size < 0 || size > (1 << 20)) return nul;
  /* The key may change between the two calls: read until the buffer was large enough. */
  for (int tries = 0; tries < 4; tries++) {
    size_t cap = (size_t)size + 1;
    char *buf = malloc(cap);
    if (!buf) {
      napi_throw_error(env, "ENOMEM", "keyringReadUser: out of memory");
      return NULL;
    }
    long got = syscall(SYS_keyctl, KEYCTL_READ, id, buf, cap);
    if (got < 0) {
      OPENSSL_cleanse(buf, cap);
      free(buf);
      return nul;
    }
    if ((size_t)got <= cap) {
      void *data;
      napi_value out;
      napi_status st = napi_create_buffer_copy(env, (size_t)got, buf, &data, &out);
      OPENSSL_cleanse(buf, cap);
      free(buf);
      XCHECK(env, st);
      return out;
    }
    OPENSSL_cleanse(buf, cap);
    free(buf);
    size = got;
  }
  return nul;
}

static napi_value load_legacy_provider(napi_env env, napi_callback_info info) {
  (void)info;
  static OSSL_PROVIDER *def, *legacy;
  if (!def) def = OSSL_PROVIDER_load(NULL, "default");
  if (!legacy) legacy = OSSL_PROVIDER_load(NULL, "legacy");
  napi_value r;
  XCHECK(env, napi_get_boolean(env, def != NULL && legacy != NULL, &r));
  return r;
}

static napi_value flock_fd(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  XCHECK(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t fd = -1, op = 0;
  if (argc < 2 || napi_get_value_int32(env, argv[0], &fd) != napi_ok || fd < 0 ||
      napi_get_value_int32(env, argv[1], &op) != napi_ok ||
      (op != (LOCK_SH | LOCK_NB) && op != (LOCK_EX | LOCK_NB) && op != LOCK_UN)) {
    napi_throw_type_error(env, NULL, "flock: a descriptor and LOCK_SH|LOCK_NB, LOCK_EX|LOCK_NB or LOCK_UN");
    return NULL;
  }
  int r;
  do r = flock(fd, op);
  while (r != 0 && errno == EINTR);
  if (r != 0 && errno != EWOULDBLOCK) {
    cm_throw_errno(env, errno, "flock");
    return NULL;
  }
  napi_value out;
  XCHECK(env, napi_get_boolean(env, r == 0, &out));
  return out;
}

/** Adds the helpers above to the addon's exports (called from cryptmap.c's init). */
napi_status cryptmap_register_extras(napi_env env, napi_value exports) {
  napi_property_descriptor d[] = {
      {"keyringReadUser", NULL, keyring_read_user, NULL, NULL, NULL, napi_enumerable, NULL},
      {"loadLegacyProvider", NULL, load_legacy_provider, NULL, NULL, NULL, napi_enumerable, NULL},
      {"flock", NULL, flock_fd, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  return napi_define_properties(env, exports, sizeof d / sizeof d[0], d);
}
