/*
 * A larger send buffer for a connected Unix stream socket (issue 15 performance): Node has no
 * SO_SNDBUF for net sockets. A Unix stream socket's sender is charged for the bytes its peer has not
 * read yet, up to SO_SNDBUF (net.core.wmem_default, 208 KiB, by default; socket(7), unix(7)), so a
 * 256 KiB NBD payload never fits in one write and every request costs extra partial writes and event
 * loop rounds on both ends. unixSendBuffer(fd, bytes) -> the SO_SNDBUF the kernel then reports (it
 * doubles the request and caps it at net.core.wmem_max), or 0 when fd is not an AF_UNIX socket (TCP
 * tunes its own buffers; setting SO_SNDBUF there would turn that off). Throws an Error whose `code` is
 * the errno name on failure. Registered by cryptmap.c's init through cryptmap_register_sockbuf().
 */
#define NAPI_VERSION 8
#define _GNU_SOURCE
#include <errno.h>
#include <node_api.h>
#include <sys/socket.h>

#include "cm-errno.h"

void cryptmap_register_sockbuf(napi_env env, napi_value exports);

static napi_value unix_send_buffer(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value a[2];
  int32_t fd, bytes;
  if (napi_get_cb_info(env, info, &argc, a, NULL, NULL) != napi_ok || argc < 2 || napi_get_value_int32(env, a[0], &fd) != napi_ok || fd < 0 ||
      napi_get_value_int32(env, a[1], &bytes) != napi_ok || bytes <= 0) {
    napi_throw_type_error(env, "EINVAL", "expected (fd, bytes > 0)");
    return NULL;
  }
  int domain = 0, val = 0;
  socklen_t len = sizeof domain;
  if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) != 0) {
    cm_throw_errno(env, errno, "getsockopt(SO_DOMAIN)");
    return NULL;
  }
  if (domain == AF_UNIX) {
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes) != 0) {
      cm_throw_errno(env, errno, "setsockopt(SO_SNDBUF)");
      return NULL;
    }
    len = sizeof val;
    if (getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &val, &len) != 0) {
      cm_throw_errno(env, errno, "getsockopt(SO_SNDBUF)");
      return NULL;
    }
  }
  napi_value out;
  napi_create_int32(env, val, &out);
  return out;
}

void cryptmap_register_sockbuf(napi_env env, napi_value exports) {
  napi_property_descriptor d = {"unixSendBuffer", NULL, unix_send_buffer, NULL, NULL, NULL, napi_enumerable, NULL};
  napi_define_properties(env, exports, 1, &d);
}
