// NBD URI parsing against the examples of the NBD URI specification (doc/uri.md "NBD URI export
// name") and the diagnostics it asks for; round trip with the URIs cryptmap's server prints.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { isNbdUri, nbdTcpUri, nbdUnixUri, parseNbdUri } from '../../src/nbd-wire/uri.js';

test('export names as doc/uri.md tabulates them', () => {
  const cases: [string, string][] = [
    ['nbd://example.com/disk', 'disk'],
    ['nbd+unix:///disk?socket=sock', 'disk'],
    ['nbd://example.com/', ''],
    ['nbd://example.com', ''],
    ['nbd://example.com//disk', '/disk'],
    ['nbd://example.com/hello%20world', 'hello world'],
  ];
  for (const [uri, name] of cases) assert.equal(parseNbdUri(uri).exportName, name, uri);
});

test('transports, ports, IPv6, sockets and TLS parameters', () => {
  assert.deepEqual(parseNbdUri('nbd://example.com/x').transport, { kind: 'tcp', host: 'example.com', port: 10809 });
  assert.deepEqual(parseNbdUri('nbd://10.0.0.1:1234/x').transport, { kind: 'tcp', host: '10.0.0.1', port: 1234 });
  assert.deepEqual(parseNbdUri('nbd://[::1]:99/x').transport, { kind: 'tcp', host: '::1', port: 99 });
  assert.deepEqual(parseNbdUri('nbd+unix:///x?socket=/run/a%20b.sock').transport, {
    kind: 'unix',
    path: '/run/a b.sock',
  });
  assert.deepEqual(parseNbdUri('nbd+unix:///?socket=%00/abstract').transport, { kind: 'unix', path: '\0/abstract' });
  // '+' is a plain character in an RFC 3986 query, not a space.
  assert.deepEqual(parseNbdUri('nbd+unix:///x?socket=/a+b').transport, { kind: 'unix', path: '/a+b' });
  const t = parseNbdUri('nbds://h/x?tls-certificates=/etc/pki/nbd&tls-verify-peer=0&tls-hostname=storage');
  assert.equal(t.tls, true);
  assert.equal(t.tlsCertificatesDir, '/etc/pki/nbd');
  assert.equal(t.tlsVerifyPeer, false);
  assert.equal(t.tlsHostname, 'storage');
  const u = parseNbdUri('nbds+unix:///x?socket=/s&x-tls-cert=/c.pem&x-tls-key=/k.pem&x-tls-ca=/ca.pem&tls-type=x509');
  assert.deepEqual([u.tlsCertFile, u.tlsKeyFile, u.tlsCaFile, u.tlsVerifyPeer], ['/c.pem', '/k.pem', '/ca.pem', true]);
  assert.equal(isNbdUri('nbd://h/x'), true);
  assert.equal(isNbdUri('NBDS+UNIX:///x?socket=s'), true);
  assert.equal(isNbdUri('/var/lib/nbd.img'), false);
  assert.equal(isNbdUri('nbdx://h'), false);
});

test('bad URIs are diagnosed with what is wrong', () => {
  const bad: [string, RegExp][] = [
    ['http://h/x', /unknown scheme 'http'/],
    ['nbd+unix:///x', /need \?socket=PATH/],
    ['nbd+unix://host/x?socket=/s', /take no host/],
    ['nbd:///x', /no host/],
    ['nbd://h:0/x', /bad port/],
    ['nbd://h:99999/x', /bad port/],
    ['nbd://user@h/x', /user info/],
    ['nbd://h/x?socket=/s', /socket= belongs to nbd\+unix/],
    ['nbd://h/x?tls-certificates=/d', /TLS parameters need a TLS scheme/],
    ['nbds://h/x?tls-type=psk', /tls-type=psk is not supported/],
    ['nbds://h/x?tls-verify-peer=yes', /tls-verify-peer must be 0 or 1/],
    ['nbds://h/x?x-tls-cert=/c', /go together/],
    ['nbd://h/x?foo=1&bar', /unknown query parameters 'foo', 'bar'/],
    ['nbd://h/x?foo=1&foo=2', /given twice/],
    ['nbd://h/a%zz', /bad percent-encoding/],
    ['nbd://h/x%00y', /contains NUL/],
    ['nbd://h/x#frag', /fragment/],
  ];
  for (const [uri, re] of bad) assert.throws(() => parseNbdUri(uri), re, uri);
});

test("the server's own URIs parse back to their socket and export", () => {
  const u = parseNbdUri(nbdUnixUri('scratch:db/data x', '/run/cryptmap dir/nbd.sock'));
  assert.equal(u.exportName, 'scratch:db/data x');
  assert.deepEqual(u.transport, { kind: 'unix', path: '/run/cryptmap dir/nbd.sock' });
  assert.equal(parseNbdUri(nbdUnixUri('v', '/s', true)).tls, true);
  const t = parseNbdUri(nbdTcpUri('vol 1', '::1', 10810));
  assert.deepEqual(t.transport, { kind: 'tcp', host: '::1', port: 10810 });
  assert.equal(t.exportName, 'vol 1');
});
