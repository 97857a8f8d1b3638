/*
 * FUSE block export: serves one block device as a single regular file (`<mnt>/disk`) on a FUSE mount,
 * as qemu-storage-daemon's `--export type=fuse` does, so that a loop device can be put on it. The FUSE
 * kernel protocol is spoken directly (<linux/fuse.h>, protocol 7.38 as the kernel's Documentation/
 * filesystems/fuse.rst and the header's comments describe it); no libfuse: the protocol subset a single
 * file needs is small (INIT, LOOKUP, GETATTR, OPEN, READ, WRITE, FSYNC, FLUSH, RELEASE, dir listing),
 * and the mount is a plain mount(2) with `fd=` as root.
 *
 * Threads: `threads` native threads read /dev/fuse (one request each at a time, like libfuse's
 * multi-threaded loop). A data request is served in one of two ways:
 *   - direct: the device is a crypt mapping over a regular file and the JS side set a route
 *     (fuseSetDirect): the thread itself preads and decrypts in place, or encrypts the WRITE payload in
 *     place and pwrites, then replies: no hand-off at all (the NBD path's fused crypt job, minus the
 *     JS thread). FSYNC is fdatasync on the route's descriptor.
 *   - JS: anything else (other tables, a suspended or reloading device, discards): the thread hands
 *     the request to the JS thread through a thread-safe function and waits; JS does it through the
 *     mapped device in this thread's buffer and calls fuseComplete; the thread replies.
 * fuseSetDirect(null) stops the direct route and waits (briefly: one pread/pwrite of at most max_write
 * bytes per thread) until no thread is inside it, so the caller can then suspend the device or wipe
 * the key: after it returns no thread touches the key or the descriptor.
 *
 * INIT asks for FUSE_ASYNC_DIO (loop's direct I/O is submitted asynchronously, many requests in flight),
 * FUSE_MAX_PAGES (requests up to max_pages, at most /proc/sys/fs/fuse/max_pages_limit), FUSE_BIG_WRITES;
 * OPEN answers FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES (no page cache in the FUSE file: loop's
 * direct I/O reaches us intact, and the page cache is not doubled). max_background is raised so that
 * a deep queue (fio iodepth 32) is not capped at the kernel's default 12 background requests.
 *
 * Faults: a request past the end of the device or not aligned to the logical block size gets EINVAL;
 * I/O errors keep their errno (ENOSPC from a full backing file system reaches the writer). When the
 * process dies the kernel aborts the connection: requests then fail with ENOTCONN, never hang.
 */
#define NAPI_VERSION 8
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <node_api.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "cm-errno.h"

/* From native/cryptmap.c. */
void *cm_key_from_value(napi_env env, napi_value v);
int cm_key_sector_bytes(void *k);
int cm_key_run_inplace(void *k, int enc, uint8_t *buf, uint32_t count, uint64_t iv, uint32_t step);

#define FX_MAX_THREADS 64
#define FX_ROOT_INO 1
#define FX_FILE_INO 2
#define FX_FILE_NAME "disk"
/* Room for the largest WRITE: headers, then max_write bytes of payload. */
#define FX_HDR_ROOM 4096

enum { FX_JS_READ = 1, FX_JS_WRITE = 2, FX_JS_FSYNC = 3, FX_JS_DISCARD = 4, FX_JS_ZERO = 5 };

struct fexport;

typedef struct {
  struct fexport *ex;
  int idx;
  pthread_t th;
  uint8_t *buf; /* JS Buffer of buf_len bytes (referenced while the export lives) */
  size_t buf_len;
  napi_ref buf_ref;
  pthread_cond_t cv;
  /* JS hand-off (under ex->mu) */
  int js_done;
  int32_t js_err;
  uint32_t js_len;
  /* the request handed to JS */
  int op;
  uint64_t off;
  uint32_t len;
  uint32_t payload; /* WRITE: where the payload starts in buf */
} fthread;

typedef struct fexport {
  int fd;
  uint64_t size_bytes; /* written by fuseSetSize while threads serve: read and written atomically (fx_size) */
  uint32_t block_bytes;
  uint32_t max_write;
  int read_only;
  uint32_t uid, gid;
  int nthreads, started;
  int alive; /* threads still running (under mu) */
  pthread_mutex_t mu;
  pthread_cond_t drain_cv;
  napi_threadsafe_function tsfn;
  fthread th[FX_MAX_THREADS];
  /* direct route (under mu; fields stable while direct_inflight > 0) */
  int direct;
  int direct_inflight;
  void *key;
  napi_ref key_ref;
  int dfd;
  int64_t dbase;
  uint64_t iv_offset; /* 512-byte sectors */
  int iv_large;
  uint32_t sector_bytes;
  /* statistics */
  uint64_t n_direct, n_js, n_fsync;
  int destroyed;
} fexport;

static void fx_reply(fexport *ex, uint64_t unique, int err, const void *a, size_t alen, const void *b, size_t blen) {
  struct fuse_out_header h;
  struct iovec iov[3];
  int n = 1;
  h.unique = unique;
  h.error = err ? -err : 0;
  iov[0].iov_base = &h;
  iov[0].iov_len = sizeof h;
  if (!err && alen) {
    iov[n].iov_base = (void *)a;
    iov[n++].iov_len = alen;
  }
  if (!err && blen) {
    iov[n].iov_base = (void *)b;
    iov[n++].iov_len = blen;
  }
  size_t total = 0;
  for (int i = 0; i < n; i++) total += iov[i].iov_len;
  h.len = (uint32_t)total;
  for (;;) {
    ssize_t r = writev(ex->fd, iov, n);
    if (r < 0 && errno == EINTR) continue;
    /* ENOENT: the request was interrupted meanwhile; ENODEV: unmounted. Nothing else to do. */
    break;
  }
}

static uint64_t fx_size(fexport *ex) {
  return __atomic_load_n(&ex->size_bytes, __ATOMIC_ACQUIRE);
}

static void fx_attr(fexport *ex, struct fuse_attr *a, uint64_t ino) {
  memset(a, 0, sizeof *a);
  a->ino = ino;
  a->uid = ex->uid;
  a->gid = ex->gid;
  a->blksize = 4096;
  if (ino == FX_ROOT_INO) {
    a->mode = S_IFDIR | 0700;
    a->nlink = 2;
  } else {
    a->mode = S_IFREG | (ex->read_only ? 0400 : 0600);
    a->nlink = 1;
    uint64_t size = fx_size(ex);
    a->size = size;
    a->blocks = (size + 511) / 512;
  }
}

static int full_pio(int wr, int fd, uint8_t *p, size_t n, int64_t off) {
  while (n > 0) {
    ssize_t r = wr ? pwrite(fd, p, n, (off_t)off) : pread(fd, p, n, (off_t)off);
    if (r < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (r == 0) return wr ? ENOSPC : EIO;
    p += r;
    n -= (size_t)r;
    off += r;
  }
  return 0;
}

/* IV sector of device byte offset `off` (dm-crypt: sector relative to the target + iv_offset). */
static uint64_t fx_iv(fexport *ex, uint64_t off, uint32_t *step) {
  uint64_t first = off / 512 + ex->iv_offset;
  uint32_t spb = ex->sector_bytes / 512;
  if (ex->iv_large) {
    *step = 1;
    return first / spb;
  }
  *step = spb;
  return first;
}

/* Direct route: 1 when served (reply sent), 0 when the request must go to JS. */
static int fx_direct(fexport *ex, fthread *t, int op, uint64_t unique, uint64_t off, uint32_t len, uint8_t *data) {
  pthread_mutex_lock(&ex->mu);
  if (!ex->direct) {
    pthread_mutex_unlock(&ex->mu);
    return 0;
  }
  ex->direct_inflight++;
  ex->n_direct++;
  pthread_mutex_unlock(&ex->mu);
  int err = 0;
  uint32_t step;
  uint64_t iv = fx_iv(ex, off, &step);
  uint32_t count = len / ex->sector_bytes;
  if (op == FUSE_READ) {
    err = full_pio(0, ex->dfd, t->buf, len, ex->dbase + (int64_t)off);
    if (!err && count && !cm_key_run_inplace(ex->key, 0, t->buf, count, iv, step)) err = EIO;
  } else if (op == FUSE_WRITE) {
    if (count && !cm_key_run_inplace(ex->key, 1, data, count, iv, step)) err = EIO;
    if (!err) err = full_pio(1, ex->dfd, data, len, ex->dbase + (int64_t)off);
  } else {
    if (fdatasync(ex->dfd) != 0) err = errno;
  }
  pthread_mutex_lock(&ex->mu);
  if (--ex->direct_inflight == 0) pthread_cond_broadcast(&ex->drain_cv);
  pthread_mutex_unlock(&ex->mu);
  if (op == FUSE_READ) {
    fx_reply(ex, unique, err, t->buf, len, NULL, 0);
  } else if (op == FUSE_WRITE) {
    struct fuse_write_out wo = {.size = len};
    fx_reply(ex, unique, err, &wo, sizeof wo, NULL, 0);
  } else {
    fx_reply(ex, unique, err, NULL, 0, NULL, 0);
  }
  return 1;
}

/* Hand the request to JS and wait for fuseComplete. Returns the errno (0 = done). */
static int fx_js(fexport *ex, fthread *t, int op, uint64_t off, uint32_t len, uint32_t payload) {
  pthread_mutex_lock(&ex->mu);
  t->op = op;
  t->off = off;
  t->len = len;
  t->payload = payload;
  t->js_done = 0;
  ex->n_js++;
  pthread_mutex_unlock(&ex->mu);
  if (napi_call_threadsafe_function(ex->tsfn, t, napi_tsfn_blocking) != napi_ok) return EIO;
  pthread_mutex_lock(&ex->mu);
  while (!t->js_done) pthread_cond_wait(&t->cv, &ex->mu);
  int err = t->js_err;
  pthread_mutex_unlock(&ex->mu);
  return err;
}

static void fx_init(fexport *ex, uint64_t unique, const struct fuse_init_in *in) {
  struct fuse_init_out o;
  memset(&o, 0, sizeof o);
  o.major = FUSE_KERNEL_VERSION;
  o.minor = FUSE_KERNEL_MINOR_VERSION;
  if (in->major < 7 || (in->major == 7 && in->minor < 28)) {
    fx_reply(ex, unique, EPROTO, NULL, 0, NULL, 0);
    return;
  }
  if (in->major > 7) {
    /* The kernel offers a newer major: answer with ours only, it will send INIT again. */
    fx_reply(ex, unique, 0, &o, 8, NULL, 0);
    return;
  }
  o.max_readahead = in->max_readahead;
  uint32_t want = FUSE_ASYNC_DIO | FUSE_MAX_PAGES | FUSE_BIG_WRITES | FUSE_ASYNC_READ;
  o.flags = in->flags & want;
  o.max_background = 256;
  o.congestion_threshold = 192;
  o.max_write = ex->max_write;
  o.time_gran = 1;
  o.max_pages = (uint16_t)(ex->max_write / 4096);
  fx_reply(ex, unique, 0, &o, sizeof o, NULL, 0);
}

/* A request at [off, off+len) on a file of `size` bytes (the caller's one fx_size() of the request: a
 * resize may run meanwhile): 0 when served here, else an errno. */
static int fx_check(fexport *ex, uint64_t size, uint64_t off, uint32_t len) {
  if (off % ex->block_bytes || len % ex->block_bytes) return EINVAL;
  if (off > size || len > size - off) return EINVAL;
  return 0;
}

static void fx_request(fexport *ex, fthread *t, size_t n) {
  struct fuse_in_header *in = (struct fuse_in_header *)t->buf;
  if (n < sizeof *in || in->len != n) return;
  uint8_t *arg = t->buf + sizeof *in;
  uint64_t unique = in->unique;
  uint32_t op = in->opcode;
  switch (op) {
    case FUSE_INIT:
      fx_init(ex, unique, (struct fuse_init_in *)arg);
      return;
    case FUSE_DESTROY:
      fx_reply(ex, unique, 0, NULL, 0, NULL, 0);
      return;
    case FUSE_FORGET:
    case FUSE_BATCH_FORGET:
    case FUSE_INTERRUPT:
      return; /* no reply */
    case FUSE_LOOKUP: {
      if (in->nodeid != FX_ROOT_INO || strcmp((char *)arg, FX_FILE_NAME) != 0) {
        fx_reply(ex, unique, ENOENT, NULL, 0, NULL, 0);
        return;
      }
      struct fuse_entry_out e;
      memset(&e, 0, sizeof e);
      e.nodeid = FX_FILE_INO;
      e.entry_valid = 1;
      e.attr_valid = 1;
      fx_attr(ex, &e.attr, FX_FILE_INO);
      fx_reply(ex, unique, 0, &e, sizeof e, NULL, 0);
      return;
    }
    case FUSE_GETATTR:
    case FUSE_SETATTR: {
      if (in->nodeid != FX_ROOT_INO && in->nodeid != FX_FILE_INO) {
        fx_reply(ex, unique, ENOENT, NULL, 0, NULL, 0);
        return;
      }
      if (op == FUSE_SETATTR) {
        const struct fuse_setattr_in *s = (const struct fuse_setattr_in *)arg;
        /* The size is the device's; only a no-op truncate (O_TRUNC of the same size) is allowed. */
        if ((s->valid & FATTR_SIZE) && s->size != fx_size(ex)) {
          fx_reply(ex, unique, EPERM, NULL, 0, NULL, 0);
          return;
        }
        if (s->valid & (FATTR_MODE | FATTR_UID | FATTR_GID)) {
          fx_reply(ex, unique, EPERM, NULL, 0, NULL, 0);
          return;
        }
      }
      struct fuse_attr_out a;
      memset(&a, 0, sizeof a);
      a.attr_valid = 1;
      fx_attr(ex, &a.attr, in->nodeid);
      fx_reply(ex, unique, 0, &a, sizeof a, NULL, 0);
      return;
    }
    case FUSE_OPEN: {
      const struct fuse_open_in *o = (const struct fuse_open_in *)arg;
      if (in->nodeid != FX_FILE_INO) {
        fx_reply(ex, unique, EISDIR, NULL, 0, NULL, 0);
        return;
      }
      if (ex->read_only && (o->flags & O_ACCMODE) != O_RDONLY) {
        fx_reply(ex, unique, EROFS, NULL, 0, NULL, 0);
        return;
      }
      struct fuse_open_out oo;
      memset(&oo, 0, sizeof oo);
      oo.open_flags = FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES;
      fx_reply(ex, unique, 0, &oo, sizeof oo, NULL, 0);
      return;
    }
    case FUSE_OPENDIR: {
      struct fuse_open_out oo;
      memset(&oo, 0, sizeof oo);
      fx_reply(ex, unique, in->nodeid == FX_ROOT_INO ? 0 : ENOTDIR, &oo, sizeof oo, NULL, 0);
      return;
    }
    case FUSE_READDIR: {
      const struct fuse_read_in *r = (const struct fuse_read_in *)arg;
      uint8_t out[256];
      size_t used = 0;
      const char *names[3] = {".", "..", FX_FILE_NAME};
      uint64_t inos[3] = {FX_ROOT_INO, FX_ROOT_INO, FX_FILE_INO};
      uint32_t types[3] = {S_IFDIR >> 12, S_IFDIR >> 12, S_IFREG >> 12};
      for (uint64_t i = r->offset; i < 3; i++) {
        size_t nl = strlen(names[i]);
        size_t sz = FUSE_DIRENT_ALIGN(FUSE_NAME_OFFSET + nl);
        if (used + sz > r->size || used + sz > sizeof out) break;
        struct fuse_dirent *d = (struct fuse_dirent *)(out + used);
        memset(d, 0, sz);
        d->ino = inos[i];
        d->off = i + 1;
        d->namelen = (uint32_t)nl;
        d->type = types[i];
        memcpy(d->name, names[i], nl);
        used += sz;
      }
      fx_reply(ex, unique, 0, out, used, NULL, 0);
      return;
    }
    case FUSE_RELEASE:
    case FUSE_RELEASEDIR:
    case FUSE_FSYNCDIR:
    case FUSE_FLUSH: /* close(2) of the FUSE file: durability is FSYNC's business */
      fx_reply(ex, unique, 0, NULL, 0, NULL, 0);
      return;
    case FUSE_STATFS: {
      struct fuse_statfs_out s;
      memset(&s, 0, sizeof s);
      s.st.bsize = 4096;
      s.st.frsize = 4096;
      s.st.blocks = fx_size(ex) / 4096;
      s.st.files = 1;
      s.st.namelen = 255;
      fx_reply(ex, unique, 0, &s, sizeof s, NULL, 0);
      return;
    }
    case FUSE_ACCESS:
      fx_reply(ex, unique, 0, NULL, 0, NULL, 0);
      return;
    case FUSE_READ: {
      const struct fuse_read_in *r = (const struct fuse_read_in *)arg;
      uint64_t off = r->offset;
      uint32_t len = r->size;
      if (len > ex->max_write) len = ex->max_write;
      /* A regular file: reading at or after the end gives 0 bytes, a read across it is short. */
      uint64_t size = fx_size(ex); /* one value for both checks: a resize may run meanwhile */
      if (off >= size) {
        fx_reply(ex, unique, 0, NULL, 0, NULL, 0);
        return;
      }
      if (len > size - off) len = (uint32_t)(size - off);
      int err = fx_check(ex, size, off, len);
      if (err) {
        fx_reply(ex, unique, err, NULL, 0, NULL, 0);
        return;
      }
      if (fx_direct(ex, t, FUSE_READ, unique, off, len, NULL)) return;
      err = fx_js(ex, t, FX_JS_READ, off, len, 0);
      fx_reply(ex, unique, err, t->buf, len, NULL, 0);
      return;
    }
    case FUSE_WRITE: {
      const struct fuse_write_in *w = (const struct fuse_write_in *)arg;
      uint32_t payload = (uint32_t)(sizeof *in + sizeof *w);
      uint64_t off = w->offset;
      uint32_t len = w->size;
      int err = ex->read_only ? EROFS : n < payload || n - payload < len ? EINVAL : fx_check(ex, fx_size(ex), off, len);
      if (err) {
        fx_reply(ex, unique, err, NULL, 0, NULL, 0);
        return;
      }
      if (fx_direct(ex, t, FUSE_WRITE, unique, off, len, t->buf + payload)) return;
      err = fx_js(ex, t, FX_JS_WRITE, off, len, payload);
      struct fuse_write_out wo = {.size = len};
      fx_reply(ex, unique, err, &wo, sizeof wo, NULL, 0);
      return;
    }
    case FUSE_FSYNC: {
      pthread_mutex_lock(&ex->mu);
      ex->n_fsync++;
      pthread_mutex_unlock(&ex->mu);
      if (ex->read_only) {
        fx_reply(ex, unique, 0, NULL, 0, NULL, 0);
        return;
      }
      if (fx_direct(ex, t, FUSE_FSYNC, unique, 0, 0, NULL)) return;
      fx_reply(ex, unique, fx_js(ex, t, FX_JS_FSYNC, 0, 0, 0), NULL, 0, NULL, 0);
      return;
    }
    case FUSE_FALLOCATE: {
      const struct fuse_fallocate_in *f = (const struct fuse_fallocate_in *)arg;
      int js = 0;
      if (f->mode == (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)) js = FX_JS_DISCARD;
      else if (f->mode == FALLOC_FL_ZERO_RANGE || f->mode == (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)) js = FX_JS_ZERO;
      int err = !js ? EOPNOTSUPP : ex->read_only ? EROFS : f->length > UINT32_MAX ? EINVAL : fx_check(ex, fx_size(ex), f->offset, (uint32_t)f->length);
      if (!err) err = fx_js(ex, t, js, f->offset, (uint32_t)f->length, 0);
      fx_reply(ex, unique, err, NULL, 0, NULL, 0);
      return;
    }
    default:
      fx_reply(ex, unique, ENOSYS, NULL, 0, NULL, 0);
      return;
  }
}

static void *fx_thread(void *arg) {
  fthread *t = arg;
  fexport *ex = t->ex;
  for (;;) {
    ssize_t n = read(ex->fd, t->buf, t->buf_len);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN || errno == ENOENT) continue;
      break; /* ENODEV: unmounted or aborted */
    }
    fx_request(ex, t, (size_t)n);
  }
  pthread_mutex_lock(&ex->mu);
  ex->alive--;
  pthread_mutex_unlock(&ex->mu);
  return NULL;
}

/* ---------- N-API ---------- */

#define FCHECK(env, call)                                                  \
  do {                                                                     \
    if ((call) != napi_ok) {                                               \
      napi_throw_error((env), "ENATIVE", "N-API call failed: " #call);     \
      return NULL;                                                         \
    }                                                                      \
  } while (0)

static void fx_call_js(napi_env env, napi_value cb, void *context, void *data) {
  fthread *t = data;
  if (env == NULL) return;
  napi_value args[5], undef;
  napi_create_int32(env, t->idx, &args[0]);
  napi_create_int32(env, t->op, &args[1]);
  napi_create_double(env, (double)t->off, &args[2]);
  napi_create_uint32(env, t->len, &args[3]);
  napi_create_uint32(env, t->payload, &args[4]);
  napi_get_undefined(env, &undef);
  napi_call_function(env, undef, cb, 5, args, NULL);
}

static fexport *fx_get(napi_env env, napi_value v) {
  void *p = NULL;
  napi_valuetype t;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_external || napi_get_value_external(env, v, &p) != napi_ok || !p) {
    napi_throw_type_error(env, "EINVAL", "not a FUSE export handle");
    return NULL;
  }
  return p;
}

static void fx_finalize(napi_env env, void *data, void *hint) {
  /*
   * The JS handle is gone. After fuseDestroy no thread is left and nothing refers to the struct: free
   * it. Without fuseDestroy (a crash path, process exit) threads may still use it: it stays.
   *
   * No call of the thread-safe function can still be queued here (its data points into ex->th[]):
   * the only caller is fx_js, on a FUSE thread, which queues one call and then blocks until
   * fuseComplete, and JS calls fuseComplete only from the request that call delivered (fx_call_js
   * ran, the queue entry is consumed). So a queued call means a thread blocked in fx_js, hence alive
   * > 0, and fuseDestroy refuses (EBUSY) until every thread has returned from fx_thread; destroyed is
   * set only after that, with the threads joined and the function released, so no call can be queued
   * afterwards either. The context pointer (ex) is not used by Node when the released function closes
   * (no finalize callback), so freeing ex before that close is safe. fuseStart's failure path frees
   * ex after an abort release with no thread started: nothing was ever queued.
   */
  (void)env;
  (void)hint;
  fexport *ex = data;
  if (!ex || !ex->destroyed) return;
  for (int i = 0; i < ex->nthreads; i++) pthread_cond_destroy(&ex->th[i].cv);
  pthread_cond_destroy(&ex->drain_cv);
  pthread_mutex_destroy(&ex->mu);
  free(ex);
}

static int get_u32(napi_env env, napi_value v, uint32_t *out) {
  return napi_get_value_uint32(env, v, out) == napi_ok;
}

/*
 * fuseStart(mountPoint, sizeBytes, blockBytes, maxWrite, readOnly, buffers[], onRequest): open /dev/fuse,
 * mount it on mountPoint (root: mount(2) with fd=), start one thread per buffer (each buffer at least
 * maxWrite + 4096 bytes). onRequest(thread, op, offset, length, payloadAt) runs on the JS thread for
 * requests that need it; the JS side answers with fuseComplete(h, thread, errno, 0).
 */
static napi_value fuse_start(napi_env env, napi_callback_info info) {
  size_t argc = 7;
  napi_value a[7];
  FCHECK(env, napi_get_cb_info(env, info, &argc, a, NULL, NULL));
  char mnt[4096];
  size_t mlen;
  double size;
  uint32_t block, maxw, nbuf;
  bool ro, isarr;
  if (argc < 7 || napi_get_value_string_utf8(env, a[0], mnt, sizeof mnt, &mlen) != napi_ok || mlen >= sizeof mnt - 1 ||
      napi_get_value_double(env, a[1], &size) != napi_ok || !(size >= 0) || size > 9007199254740991.0 || !get_u32(env, a[2], &block) ||
      !get_u32(env, a[3], &maxw) || napi_get_value_bool(env, a[4], &ro) != napi_ok || napi_is_array(env, a[5], &isarr) != napi_ok || !isarr ||
      napi_get_array_length(env, a[5], &nbuf) != napi_ok || nbuf < 1 || nbuf > FX_MAX_THREADS || (block != 512 && block != 1024 && block != 2048 && block != 4096) ||
      maxw < 4096 || maxw > (1u << 24) || maxw % 4096) {
    napi_throw_type_error(env, "EINVAL", "fuseStart(mountPoint, sizeBytes, blockBytes, maxWrite, readOnly, buffers, onRequest): bad arguments");
    return NULL;
  }
  fexport *ex = calloc(1, sizeof *ex);
  if (!ex) {
    napi_throw_error(env, "ENOMEM", "out of memory");
    return NULL;
  }
  ex->fd = -1;
  ex->dfd = -1;
  ex->size_bytes = (uint64_t)size;
  ex->block_bytes = block;
  ex->max_write = maxw;
  ex->read_only = ro;
  ex->uid = getuid();
  ex->gid = getgid();
  ex->nthreads = (int)nbuf;
  pthread_mutex_init(&ex->mu, NULL);
  pthread_cond_init(&ex->drain_cv, NULL);
  for (uint32_t i = 0; i < nbuf; i++) {
    napi_value b;
    uint8_t *p;
    size_t l;
    bool is_ta;
    napi_typedarray_type tt;
    napi_value ab;
    size_t bo;
    if (napi_get_element(env, a[5], i, &b) != napi_ok || napi_is_typedarray(env, b, &is_ta) != napi_ok || !is_ta ||
        napi_get_typedarray_info(env, b, &tt, &l, (void **)&p, &ab, &bo) != napi_ok || tt != napi_uint8_array || l < (size_t)maxw + FX_HDR_ROOM) {
      napi_throw_type_error(env, "EINVAL", "fuseStart: each buffer must be a Uint8Array of maxWrite + 4096 bytes");
      goto fail;
    }
    fthread *t = &ex->th[i];
    t->ex = ex;
    t->idx = (int)i;
    t->buf = p;
    t->buf_len = l;
    pthread_cond_init(&t->cv, NULL);
    napi_create_reference(env, b, 1, &t->buf_ref);
  }
  napi_value name;
  napi_create_string_utf8(env, "cryptmap.fuseExport", NAPI_AUTO_LENGTH, &name);
  if (napi_create_threadsafe_function(env, a[6], NULL, name, 0, 1, NULL, NULL, ex, fx_call_js, &ex->tsfn) != napi_ok) {
    napi_throw_error(env, "ENATIVE", "cannot create the FUSE request callback");
    goto fail;
  }
  napi_unref_threadsafe_function(env, ex->tsfn);
  ex->fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
  if (ex->fd < 0) {
    cm_throw_errno(env, errno, "open /dev/fuse");
    goto fail;
  }
  char opts[256];
  snprintf(opts, sizeof opts, "fd=%d,rootmode=40000,user_id=%u,group_id=%u,max_read=%u", ex->fd, ex->uid, ex->gid, maxw);
  if (mount("cryptmap", mnt, "fuse.cryptmap", MS_NOSUID | MS_NODEV | MS_NOEXEC, opts) != 0) {
    cm_throw_errno(env, errno, "mount fuse");
    goto fail;
  }
  ex->alive = 0;
  for (int i = 0; i < ex->nthreads; i++) {
    if (pthread_create(&ex->th[i].th, NULL, fx_thread, &ex->th[i]) != 0) break;
    ex->started++;
    pthread_mutex_lock(&ex->mu);
    ex->alive++;
    pthread_mutex_unlock(&ex->mu);
  }
  if (ex->started == 0) {
    umount2(mnt, MNT_DETACH);
    napi_throw_error(env, "EAGAIN", "cannot start the FUSE threads");
    goto fail;
  }
  napi_value ext;
  FCHECK(env, napi_create_external(env, ex, fx_finalize, NULL, &ext));
  return ext;
fail:
  if (ex->fd >= 0) close(ex->fd);
  if (ex->tsfn) napi_release_threadsafe_function(ex->tsfn, napi_tsfn_abort);
  for (int i = 0; i < FX_MAX_THREADS; i++)
    if (ex->th[i].buf_ref) napi_delete_reference(env, ex->th[i].buf_ref);
  free(ex);
  return NULL;
}

/* fuseComplete(h, thread, errno): the JS side finished the request it was handed. */
static napi_value fuse_complete(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value a[3];
  FCHECK(env, napi_get_cb_info(env, info, &argc, a, NULL, NULL));
  fexport *ex = argc < 3 ? NULL : fx_get(env, a[0]);
  if (!ex) return NULL;
  uint32_t idx, err;
  if (!get_u32(env, a[1], &idx) || idx >= (uint32_t)ex->nthreads || !get_u32(env, a[2], &err)) {
    napi_throw_range_error(env, "EINVAL", "fuseComplete(h, thread, errno): bad arguments");
    return NULL;
  }
  fthread *t = &ex->th[idx];
  pthread_mutex_lock(&ex->mu);
  t->js_err = (int32_t)err;
  t->js_done = 1;
  pthread_cond_signal(&t->cv);
  pthread_mutex_unlock(&ex->mu);
  return NULL;
}

/* Stop the direct route and wait until no thread is inside it. Call with ex->mu unlocked. */
static void fx_direct_off(napi_env env, fexport *ex) {
  pthread_mutex_lock(&ex->mu);
  ex->direct = 0;
  while (ex->direct_inflight > 0) pthread_cond_wait(&ex->drain_cv, &ex->mu);
  pthread_mutex_unlock(&ex->mu);
  if (ex->key_ref) napi_delete_reference(env, ex->key_ref);
  ex->key_ref = NULL;
  ex->key = NULL;
  ex->dfd = -1;
}

/*
 * fuseSetDirect(h, null) stops the direct route (waits for it to drain);
 * fuseSetDirect(h, keyHandle, fd, fileBaseBytes, ivOffsetLo, ivOffsetHi, ivLargeSectors) starts it:
 * requests then run on the FUSE threads (pread+decrypt, encrypt+pwrite, fdatasync on fd). The caller
 * keeps fd open and the key alive until it has stopped the route.
 */
static napi_value fuse_set_direct(napi_env env, napi_callback_info info) {
  size_t argc = 7;
  napi_value a[7];
  FCHECK(env, napi_get_cb_info(env, info, &argc, a, NULL, NULL));
  fexport *ex = argc < 2 ? NULL : fx_get(env, a[0]);
  if (!ex) return NULL;
  fx_direct_off(env, ex);
  napi_valuetype t;
  if (napi_typeof(env, a[1], &t) != napi_ok || t == napi_null || t == napi_undefined) return NULL;
  int32_t fd;
  double base;
  uint32_t lo, hi;
  bool large;
  void *k = cm_key_from_value(env, a[1]);
  if (!k) return NULL;
  if (argc < 7 || napi_get_value_int32(env, a[2], &fd) != napi_ok || fd < 0 || napi_get_value_double(env, a[3], &base) != napi_ok || !(base >= 0) ||
      base > 9007199254740991.0 || !get_u32(env, a[4], &lo) || !get_u32(env, a[5], &hi) || napi_get_value_bool(env, a[6], &large) != napi_ok) {
    napi_throw_type_error(env, "EINVAL", "fuseSetDirect(h, key, fd, fileBase, ivOffsetLo, ivOffsetHi, ivLargeSectors): bad arguments");
    return NULL;
  }
  uint32_t sb = (uint32_t)cm_key_sector_bytes(k);
  /* Every request is aligned to the export's block: the route must see whole key sectors only, or the
   * tail of a request below one key sector would be written without encryption. A larger key sector
   * (after a reload) is refused here and the JS path serves the export. */
  if (sb == 0 || ex->block_bytes % sb != 0) {
    napi_throw_range_error(env, "EINVAL", "fuseSetDirect: the key sector size is larger than the export's block size");
    return NULL;
  }
  napi_create_reference(env, a[1], 1, &ex->key_ref);
  pthread_mutex_lock(&ex->mu);
  ex->key = k;
  ex->dfd = fd;
  ex->dbase = (int64_t)base;
  ex->iv_offset = ((uint64_t)hi << 32) | lo;
  ex->iv_large = large;
  ex->sector_bytes = sb;
  ex->direct = 1;
  pthread_mutex_unlock(&ex->mu);
  return NULL;
}

/* fuseSetSize(h, sizeBytes): the device was resized (the file's size follows). */
static napi_value fuse_set_size(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value a[2];
  FCHECK(env, napi_get_cb_info(env, info, &argc, a, NULL, NULL));
  fexport *ex = argc < 2 ? NULL : fx_get(env, a[0]);
  double size;
  if (!ex) return NULL;
  if (napi_get_value_double(env, a[1], &size) != napi_ok || !(size >= 0) || size > 9007199254740991.0) {
    napi_throw_range_error(env, "EINVAL", "fuseSetSize: bad size");
    return NULL;
  }
  __atomic_store_n(&ex->size_bytes, (uint64_t)size, __ATOMIC_RELEASE);
  return NULL;
}

/*
 * fuseInvalidate(h): tell the kernel the file's attributes changed (FUSE_NOTIFY_INVAL_INODE, attributes
 * only), so the next stat sees a new size after fuseSetSize.
 */
static napi_value fuse_invalidate(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value a[1];
  FCHECK(env, napi_get_cb_info(env, info, &argc, a, NULL, NULL));
  fexport *ex = argc < 1 ? NULL : fx_get(env, a[0]);
  if (!ex || ex->fd < 0) return NULL;
  struct fuse_out_header h = {.unique = 0, .error = FUSE_NOTIFY_INVAL_INODE};
  struct fuse_notify_inval_inode_out n = {.ino = FX_FILE_INO, .off = -1, .len = 0};
  struct iovec iov[2] = {{&h, sizeof h}, {&n, sizeof n}};
  h.len = sizeof h + sizeof n;
  if (writev(ex->fd, iov, 2) < 0 && errno != ENOENT) cm_throw_errno(env, errno, "FUSE_NOTIFY_INVAL_INODE");
  return NULL;
}

/* fuseStats(h): { threads (still running), direct, js, fsync } request counts. */
static napi_value fuse_stats(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value a[1];
  FCHECK(env, napi_get_cb_info(env, info, &argc, a, NULL, NULL));
  fexport *ex = argc < 1 ? NULL : fx_get(env, a[0]);
  if (!ex) return NULL;
  pthread_mutex_lock(&ex->mu);
  double v[4] = {ex->alive, (double)ex->n_direct, (double)ex->n_js, (double)ex->n_fsync};
  int direct = ex->direct;
  pthread_mutex_unlock(&ex->mu);
  const char *names[4] = {"threads", "direct", "js", "fsync"};
  napi_value o, x;
  FCHECK(env, napi_create_object(env, &o));
  for (int i = 0; i < 4; i++) {
    napi_create_double(env, v[i], &x);
    napi_set_named_property(env, o, names[i], x);
  }
  napi_get_boolean(env, direct, &x);
  napi_set_named_property(env, o, "directOn", x);
  return o;
}

/*
 * fuseDestroy(h): after the mount is gone (threads exited: fuseStats().threads == 0), join the threads,
 * close /dev/fuse and drop the references. Throws EBUSY while threads still run.
 */
static napi_value fuse_destroy(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value a[1];
  FCHECK(env, napi_get_cb_info(env, info, &argc, a, NULL, NULL));
  fexport *ex = argc < 1 ? NULL : fx_get(env, a[0]);
  if (!ex) return NULL;
  if (ex->destroyed) return NULL;
  pthread_mutex_lock(&ex->mu);
  int alive = ex->alive;
  pthread_mutex_unlock(&ex->mu);
  if (alive > 0) {
    napi_throw_error(env, "EBUSY", "fuseDestroy: the FUSE threads still run (unmount first)");
    return NULL;
  }
  for (int i = 0; i < ex->started; i++) pthread_join(ex->th[i].th, NULL);
  fx_direct_off(env, ex);
  close(ex->fd);
  ex->fd = -1;
  napi_release_threadsafe_function(ex->tsfn, napi_tsfn_release);
  for (int i = 0; i < ex->nthreads; i++) {
    napi_delete_reference(env, ex->th[i].buf_ref);
    ex->th[i].buf_ref = NULL;
  }
  ex->destroyed = 1; /* freed by fx_finalize once the JS handle is collected */
  return NULL;
}

void cm_fuse_register(napi_env env, napi_value exports) {
  napi_property_descriptor d[] = {
      {"fuseStart", NULL, fuse_start, NULL, NULL, NULL, napi_enumerable, NULL},
      {"fuseComplete", NULL, fuse_complete, NULL, NULL, NULL, napi_enumerable, NULL},
      {"fuseSetDirect", NULL, fuse_set_direct, NULL, NULL, NULL, napi_enumerable, NULL},
      {"fuseSetSize", NULL, fuse_set_size, NULL, NULL, NULL, napi_enumerable, NULL},
      {"fuseInvalidate", NULL, fuse_invalidate, NULL, NULL, NULL, napi_enumerable, NULL},
      {"fuseStats", NULL, fuse_stats, NULL, NULL, NULL, napi_enumerable, NULL},
      {"fuseDestroy", NULL, fuse_destroy, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  napi_define_properties(env, exports, sizeof d / sizeof d[0], d);
}
