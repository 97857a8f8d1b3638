/*
 * prctl(PR_SET_DUMPABLE) for the processes that hold keys (issue 11 item 8): with the flag off, the
 * kernel writes no core dump of the process, and /proc/PID/mem and ptrace are closed to processes
 * of the same uid that are not root (prctl(2), proc(5) "/proc/pid/mem"). Node has no API for it.
 * dumpable(flag?) -> boolean: sets the flag when given (true/false), returns PR_GET_DUMPABLE after.
 * Throws an Error whose `code` is the errno name on failure. Registered by cryptmap.c's init through
 * cryptmap_register_dumpable(); kept in its own file so other addon functions do not touch it.
 */
#define NAPI_VERSION 8
#define _GNU_SOURCE
#include <errno.h>
#include <node_api.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include "cm-errno.h"

void cryptmap_register_dumpable(napi_env env, napi_value exports);

static napi_value dumpable(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value a[1];
  if (napi_get_cb_info(env, info, &argc, a, NULL, NULL) != napi_ok) return NULL;
  if (argc >= 1) {
    napi_valuetype t;
    bool on;
    if (napi_typeof(env, a[0], &t) != napi_ok || (t != napi_undefined && napi_get_value_bool(env, a[0], &on) != napi_ok)) {
      napi_throw_type_error(env, "EINVAL", "expected (flag?: boolean)");
      return NULL;
    }
    if (t != napi_undefined && prctl(PR_SET_DUMPABLE, on ? 1 : 0, 0, 0, 0) != 0) {
      cm_throw_errno(env, errno, "prctl(PR_SET_DUMPABLE)");
      return NULL;
    }
  }
  napi_value out;
  napi_get_boolean(env, prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 1, &out);
  return out;
}

/*
 * wipeFreedMemory(on: boolean) -> boolean: glibc's M_PERTURB (mallopt(3)): while on, free() fills
 * every released heap chunk with a fixed byte. Node copies a socket read that came in shorter than its
 * 64 KiB read buffer into a buffer of the right size and frees the first one as it is; a volume key
 * that crossed the control socket stays readable in that freed chunk until malloc reuses it. The
 * daemon turns this on while a control connection is open (util/freed-memory.ts). Returns false
 * where the C library has no M_PERTURB (musl): nothing is changed there.
 */
static napi_value wipe_freed_memory(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value a[1];
  bool on = false;
  if (napi_get_cb_info(env, info, &argc, a, NULL, NULL) != napi_ok) return NULL;
  if (argc < 1 || napi_get_value_bool(env, a[0], &on) != napi_ok) {
    napi_throw_type_error(env, "EINVAL", "expected (on: boolean)");
    return NULL;
  }
  bool done = false;
#if defined(__GLIBC__) && defined(M_PERTURB)
  done = mallopt(M_PERTURB, on ? 0xa5 : 0) == 1;
#endif
  napi_value out;
  napi_get_boolean(env, done, &out);
  return out;
}

void cryptmap_register_dumpable(napi_env env, napi_value exports) {
  napi_property_descriptor d[] = {
      {"dumpable", NULL, dumpable, NULL, NULL, NULL, napi_enumerable, NULL},
      {"wipeFreedMemory", NULL, wipe_freed_memory, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  napi_define_properties(env, exports, 2, d);
}
