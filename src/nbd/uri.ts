/**
 * NBD URIs (the NBD URI specification, `doc/uri.md` in the NBD project) for the exports this
 * server publishes, as printed by `cryptmap status` and accepted by libnbd tools and qemu.
 */

/** `nbd+unix:///NAME?socket=PATH` (or `nbds+unix://` with TLS). */
export function nbdUnixUri(exportName: string, socketPath: string, tls = false): string {
  return `${tls ? 'nbds' : 'nbd'}+unix:///${encodeURIComponent(exportName)}?socket=${encodeURIComponent(socketPath).replace(/%2F/g, '/')}`;
}

/** `nbd://HOST:PORT/NAME` (or `nbds://` with TLS). IPv6 hosts are bracketed. */
export function nbdTcpUri(exportName: string, host: string, port: number, tls = false): string {
  const h = host.includes(':') ? `[${host}]` : host;
  return `${tls ? 'nbds' : 'nbd'}://${h}:${port}/${encodeURIComponent(exportName)}`;
}
