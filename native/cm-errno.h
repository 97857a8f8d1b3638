/*
 * Errors from system calls, shared by the addon's files: one way to name an errno and to throw it.
 */
#ifndef CM_ERRNO_H
#define CM_ERRNO_H
#include <node_api.h>

/* The errno's symbolic name ("ENOENT"; glibc's strerrorname_np), "EIO" for a value it does not know. */
const char *cm_errno_name(int e);
/* Throw an Error with message "<what>: <strerror(e)>", code the errno's name, errno -e and syscall
 * `what` (as Node's own system errors). */
void cm_throw_errno(napi_env env, int e, const char *what);

#endif
