/**
 * NBD URIs (the NBD URI specification, `doc/uri.md` in the NBD project): formatting the URIs of the
 * exports cryptmap's server publishes (printed by `cryptmap status`, accepted by libnbd tools and
 * qemu), and parsing the URIs cryptmap's client (blockdev/nbd-client) connects to.
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

/** Where and how to reach an export, parsed from an NBD URI. */
export interface NbdUriTarget {
  /** The URI as given (for messages; holds no secrets: TLS parameters name files). */
  uri: string;
  tls: boolean;
  transport: { kind: 'tcp'; host: string; port: number } | { kind: 'unix'; path: string };
  /** Export name: the path without its leading '/', percent-decoded ('' = the default export). */
  exportName: string;
  /** `tls-certificates=DIR`: ca-cert.pem, client-cert.pem, client-key.pem as libnbd and qemu name them. */
  tlsCertificatesDir?: string;
  /** `x-tls-cert`, `x-tls-key`, `x-tls-ca`: files (PEM) for a client certificate and the server's CA. */
  tlsCertFile?: string;
  tlsKeyFile?: string;
  tlsCaFile?: string;
  /** `tls-verify-peer=0|1` (default 1). */
  tlsVerifyPeer: boolean;
  /** `tls-hostname`: the name the server certificate must carry (default: the URI's host). */
  tlsHostname?: string;
}

export const NBD_DEFAULT_PORT = 10809;

/** True when `s` starts like an NBD URI (`nbd://`, `nbds://`, `nbd+unix://`, `nbds+unix://`). */
export function isNbdUri(s: string): boolean {
  return /^nbds?(\+unix)?:\/\//i.test(s);
}

class UriError extends Error {}

function pctDecode(s: string, what: string): string {
  try {
    return decodeURIComponent(s);
  } catch {
    throw new UriError(`bad percent-encoding in the ${what}`);
  }
}

/** RFC 3986 appendix B split: scheme, authority, path, query, fragment. */
const RFC3986 = /^([A-Za-z][A-Za-z0-9+.-]*):(?:\/\/([^/?#]*))?([^?#]*)(?:\?([^#]*))?(?:#(.*))?$/;

/**
 * Parse an NBD URI as the NBD URI specification (`doc/uri.md`) defines it:
 * `nbd://host[:port]/export`, `nbds://...` (TLS required), `nbd+unix:///export?socket=PATH`,
 * `nbds+unix:///export?socket=PATH`. Query parameters: `socket`, `tls-certificates=DIR`,
 * `x-tls-cert`, `x-tls-key`, `x-tls-ca` (files), `tls-verify-peer=0|1`, `tls-hostname`, `tls-type=x509`.
 * Anything else (user info, unknown parameters, TLS parameters on a non-TLS scheme, PSK) is
 * diagnosed, as the specification asks. Throws an Error whose message says what is wrong.
 *
 * @example parseNbdUri('nbd+unix:///vol?socket=/run/nbd.sock').transport // { kind: 'unix', path: '/run/nbd.sock' }
 */
export function parseNbdUri(uri: string): NbdUriTarget {
  try {
    return parse(uri);
  } catch (e) {
    if (e instanceof UriError) throw new Error(`invalid NBD URI '${uri}': ${e.message}`);
    throw e;
  }
}

function parse(uri: string): NbdUriTarget {
  const m = RFC3986.exec(uri);
  if (m === null) throw new UriError('not a URI');
  const scheme = m[1]!.toLowerCase();
  const authority = m[2];
  const path = m[3] ?? '';
  const query = m[4];
  if (m[5] !== undefined) throw new UriError('a fragment (#...) has no meaning here');
  if (!['nbd', 'nbds', 'nbd+unix', 'nbds+unix'].includes(scheme))
    throw new UriError(`unknown scheme '${scheme}' (nbd, nbds, nbd+unix, nbds+unix)`);
  const tls = scheme.startsWith('nbds');
  const unix = scheme.endsWith('+unix');
  if (path !== '' && !path.startsWith('/')) throw new UriError('the export name must follow a /');
  const exportName = pctDecode(path.slice(1), 'export name');
  if (exportName.includes('\0')) throw new UriError('the export name contains NUL');
  if (Buffer.byteLength(exportName) > 4096) throw new UriError('the export name is longer than 4096 bytes');

  const params = new Map<string, string>();
  for (const part of query === undefined || query === '' ? [] : query.split('&')) {
    const eq = part.indexOf('=');
    const k = pctDecode(eq < 0 ? part : part.slice(0, eq), 'query');
    const v = pctDecode(eq < 0 ? '' : part.slice(eq + 1), 'query');
    if (params.has(k)) throw new UriError(`query parameter '${k}' given twice`);
    params.set(k, v);
  }
  const take = (k: string): string | undefined => {
    const v = params.get(k);
    params.delete(k);
    return v;
  };

  let transport: NbdUriTarget['transport'];
  if (unix) {
    if (authority !== undefined && authority !== '')
      throw new UriError('nbd+unix URIs take no host (nbd+unix:///export?socket=PATH)');
    const socket = take('socket');
    if (socket === undefined || socket === '') throw new UriError('nbd+unix URIs need ?socket=PATH');
    transport = { kind: 'unix', path: socket };
  } else {
    if (authority === undefined || authority === '') throw new UriError('no host (nbd://HOST[:PORT]/EXPORT)');
    if (authority.includes('@'))
      throw new UriError('user info (user@) is for TLS PSK, which this client does not support');
    const am = /^(?:\[([0-9A-Fa-f:.]+)\]|([^:[\]]+))(?::([0-9]*))?$/.exec(authority);
    if (am === null) throw new UriError(`bad host '${authority}'`);
    const host = am[1] ?? pctDecode(am[2]!, 'host');
    const port = am[3] === undefined || am[3] === '' ? NBD_DEFAULT_PORT : Number(am[3]);
    if (!Number.isInteger(port) || port < 1 || port > 65535) throw new UriError(`bad port '${am[3]}'`);
    if (params.has('socket')) throw new UriError('socket= belongs to nbd+unix URIs');
    transport = { kind: 'tcp', host, port };
  }

  const t: NbdUriTarget = { uri, tls, transport, exportName, tlsVerifyPeer: true };
  const dir = take('tls-certificates');
  const cert = take('x-tls-cert');
  const key = take('x-tls-key');
  const ca = take('x-tls-ca');
  const verify = take('tls-verify-peer');
  const hostname = take('tls-hostname');
  const type = take('tls-type');
  const anyTls = [dir, cert, key, ca, verify, hostname, type].some((v) => v !== undefined);
  if (anyTls && !tls) throw new UriError(`TLS parameters need a TLS scheme (nbds://, nbds+unix://)`);
  if (type !== undefined && type !== 'x509') throw new UriError(`tls-type=${type} is not supported (x509 only)`);
  if (verify !== undefined && verify !== '0' && verify !== '1') throw new UriError('tls-verify-peer must be 0 or 1');
  if ((cert === undefined) !== (key === undefined)) throw new UriError('x-tls-cert and x-tls-key go together');
  if (dir !== undefined) t.tlsCertificatesDir = dir;
  if (cert !== undefined) t.tlsCertFile = cert;
  if (key !== undefined) t.tlsKeyFile = key;
  if (ca !== undefined) t.tlsCaFile = ca;
  if (verify === '0') t.tlsVerifyPeer = false;
  if (hostname !== undefined) t.tlsHostname = hostname;
  const rest = [...params.keys()];
  if (rest.length > 0)
    throw new UriError(`unknown query parameter${rest.length > 1 ? 's' : ''} ${rest.map((k) => `'${k}'`).join(', ')}`);
  return t;
}
