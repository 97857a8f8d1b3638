/*
 * SO_PEERCRED for Unix sockets (issue 11 item 3): Node has no API for the credentials of the process
 * at the other end of a connected Unix socket. peerCred(fd) -> { pid, uid, gid } as the kernel
 * recorded them at connect()/listen() time (socket(7), SO_PEERCRED); throws an Error whose `code` is
 * the errno name (ENOTSOCK, EBADF, ...) on failure. Registered by cryptmap.c's init through
 * cryptmap_register_peercred(); kept in its own file so other addon functions do not touch it.
 */
#define NAPI_VERSION 8
#define _GNU_SOURCE
#include <errno.h>
#include <node_api.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include "cm-errno.h"

void cryptmap_register_peercred(napi_env env, napi_value exports);

static napi_value peer_cred(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value a[1];
  int32_t fd;
  if (napi_get_cb_info(env, info, &argc, a, NULL, NULL) != napi_ok || argc < 1 || napi_get_value_int32(env, a[0], &fd) != napi_ok || fd < 0) {
    napi_throw_type_error(env, "EINVAL", "expected (fd)");
    return NULL;
  }
  struct ucred cr;
  socklen_t len = sizeof cr;
  memset(&cr, 0, sizeof cr);
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &len) != 0) {
    cm_throw_errno(env, errno, "getsockopt(SO_PEERCRED)");
    return NULL;
  }
  napi_value out, v;
  if (napi_create_object(env, &out) != napi_ok) return NULL;
  napi_create_int64(env, (int64_t)cr.pid, &v);
  napi_set_named_property(env, out, "pid", v);
  napi_create_int64(env, (int64_t)cr.uid, &v);
  napi_set_named_property(env, out, "uid", v);
  napi_create_int64(env, (int64_t)cr.gid, &v);
  napi_set_named_property(env, out, "gid", v);
  return out;
}

void cryptmap_register_peercred(napi_env env, napi_value exports) {
  napi_property_descriptor d = {"peerCred", NULL, peer_cred, NULL, NULL, NULL, napi_enumerable, NULL};
  napi_define_properties(env, exports, 1, &d);
}
