/*
 * sd_notify(3) for the daemons run by systemd (issue 18): one datagram on the AF_UNIX SOCK_DGRAM
 * socket that $NOTIFY_SOCKET names (a path, or '@name' for the abstract namespace). Node's dgram has
 * no Unix datagram sockets, hence this. sdNotify(address, message) -> undefined; throws an Error whose
 * `code` is the errno name on failure. The protocol (newline-separated KEY=VALUE assignments, one
 * datagram, credentials checked by the receiver through SCM_CREDENTIALS) is described in sd_notify(3);
 * nothing here is taken from libsystemd. Registered by cryptmap.c's init through
 * cryptmap_register_sdnotify(); kept in its own file so other addon functions do not touch it.
 */
#define NAPI_VERSION 8
#define _GNU_SOURCE
#include <errno.h>
#include <node_api.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "cm-errno.h"

void cryptmap_register_sdnotify(napi_env env, napi_value exports);

static napi_value sd_notify_send(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value a[2];
  char addr[sizeof(((struct sockaddr_un *)0)->sun_path) + 1];
  char msg[4096];
  size_t alen = 0, mlen = 0;
  if (napi_get_cb_info(env, info, &argc, a, NULL, NULL) != napi_ok || argc < 2 ||
      napi_get_value_string_utf8(env, a[0], addr, sizeof addr, &alen) != napi_ok ||
      napi_get_value_string_utf8(env, a[1], msg, sizeof msg, &mlen) != napi_ok) {
    napi_throw_type_error(env, "EINVAL", "expected (address, message)");
    return NULL;
  }
  struct sockaddr_un sa;
  memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  if (alen < 2 || (addr[0] != '/' && addr[0] != '@') || alen >= sizeof sa.sun_path) {
    cm_throw_errno(env, alen >= sizeof sa.sun_path ? ENAMETOOLONG : ENOENT, "NOTIFY_SOCKET");
    return NULL;
  }
  if (mlen >= sizeof msg - 1) {
    cm_throw_errno(env, EMSGSIZE, "sd_notify message");
    return NULL;
  }
  memcpy(sa.sun_path, addr, alen);
  socklen_t salen;
  if (addr[0] == '@') {
    sa.sun_path[0] = '\0'; /* abstract namespace: no terminating NUL, the length says where it ends */
    salen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + alen);
  } else {
    salen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + alen + 1);
  }
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    cm_throw_errno(env, errno, "socket(AF_UNIX, SOCK_DGRAM)");
    return NULL;
  }
  ssize_t n;
  do {
    n = sendto(fd, msg, mlen, MSG_NOSIGNAL, (struct sockaddr *)&sa, salen);
  } while (n < 0 && errno == EINTR);
  int e = errno;
  close(fd);
  if (n < 0) {
    cm_throw_errno(env, e, "sendto(NOTIFY_SOCKET)");
    return NULL;
  }
  return NULL;
}

void cryptmap_register_sdnotify(napi_env env, napi_value exports) {
  napi_property_descriptor d = {"sdNotify", NULL, sd_notify_send, NULL, NULL, NULL, napi_enumerable, NULL};
  napi_define_properties(env, exports, 1, &d);
}
