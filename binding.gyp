{
  "targets": [
    {
      "target_name": "cryptmap",
      "sources": ["native/cryptmap.c", "native/fuse-export.c", "native/peercred.c", "native/dumpable.c", "native/xts-vaes.c", "native/extras.c", "native/sdnotify.c", "native/sockbuf.c"],
      "cflags": ["-O3", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fvisibility=hidden"],
      "cflags!": ["-O2"],
      "defines": ["OPENSSL_API_COMPAT=30000", "OPENSSL_NO_DEPRECATED"]
    }
  ]
}
