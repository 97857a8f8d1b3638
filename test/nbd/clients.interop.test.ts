/**
 * The NBD server with real clients (INTEROP.md "NBD clients for tests"): nbdinfo, qemu-io, qemu-img,
 * nbdcopy, fio's nbd engine, nbdsh (libnbd's Python binding) for protocol-level cases, and TCP + TLS
 * with X.509 certificates made by openssl in a throwaway CA. Missing tools fail with the package name.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { FileDevice } from '../../src/blockdev/file.js';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import { NbdServer } from '../../src/nbd/server.js';
import { type Fixture, startServer } from './helpers.js';
import { seededBytes } from '../helpers/prng.js';
import { mustRun, runTool } from '../helpers/tools.js';

let f: Fixture;
before(async () => {
  f = await startServer({}, 64 << 20);
});
after(async () => {
  await f.close();
});

/** nbdsh runs `#!/usr/bin/env python3`; the Debian python has the nbd module, a pyenv one may not. */
const NBDSH_ENV = { ...process.env, PATH: `/usr/bin:/bin:${process.env.PATH ?? ''}` };

describe('nbdinfo', () => {
  test('size, flags and block sizes', async () => {
    const j = JSON.parse(await mustRun('nbdinfo', ['--json', f.uri()]));
    assert.equal(j.protocol, 'newstyle-fixed');
    assert.equal(j.structured, true);
    const e = j.exports[0];
    assert.equal(e['export-name'], 'disk');
    assert.equal(e['export-size'], 64 << 20);
    assert.equal(e.description, 'test disk');
    assert.equal(e.is_read_only, false);
    assert.equal(e.can_trim, true);
    assert.equal(e.can_zero, true);
    assert.equal(e.can_multi_conn, true);
    assert.equal(e.can_flush, true);
    assert.equal(e.can_fua, true);
    assert.deepEqual([e.block_size_minimum, e.block_size_preferred, e.block_size_maximum], [512, 4096, 32 << 20]);
    assert.deepEqual(e.contexts, ['base:allocation']);
    const ro = JSON.parse(await mustRun('nbdinfo', ['--json', f.uri('ro')])).exports[0];
    assert.equal(ro.is_read_only, true);
    assert.equal(ro.can_trim, false);
  });

  test('--list shows every export', async () => {
    const j = JSON.parse(await mustRun('nbdinfo', ['--json', '--list', `nbd+unix://?socket=${f.sock}`]));
    assert.deepEqual(
      j.exports.map((e: { 'export-name': string }) => e['export-name']),
      ['disk', 'ro'],
    );
  });

  test('an unknown export is an error, the server keeps serving', async () => {
    const r = await runTool('nbdinfo', [f.uri('nope')]);
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /not found|unknown|No such file/i);
  });
});

test('nbd-client (the kernel client negotiation code) lists the exports', async () => {
  const out = await mustRun('nbd-client', ['-unix', f.sock, '-l']);
  assert.match(out, /^disk: test disk$/m);
  assert.match(out, /^ro$/m);
});

describe('qemu', () => {
  test('qemu-io writes patterns and reads them back', async () => {
    const out = await mustRun('qemu-io', [
      '-f',
      'raw',
      f.uri(),
      '-c',
      'write -P 0x5a 0 1M',
      '-c',
      'write -P 0xa5 3M 64k',
      '-c',
      'write -z 1M 1M',
      '-c',
      'read -P 0x5a 0 1M',
      '-c',
      'read -P 0xa5 3M 64k',
      '-c',
      'read -P 0 1M 1M',
      '-c',
      'discard 8M 1M',
      '-c',
      'flush',
    ]);
    assert.doesNotMatch(out, /Pattern verification failed|error/i);
  });

  test('qemu-img converts a raw image in and out', async () => {
    const img = join(f.dir, 'q.raw');
    const data = seededBytes(4 << 20, 11);
    writeFileSync(img, data);
    await mustRun('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', img, f.uri()]);
    const back = join(f.dir, 'q-back.raw');
    await mustRun('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', f.uri(), back]);
    assert.ok(readFileSync(back).subarray(0, data.length).equals(data));
    const info = await mustRun('qemu-img', ['info', '--output=json', f.uri()]);
    assert.equal(JSON.parse(info)['virtual-size'], 64 << 20);
  });
});

test('nbdcopy round-trips a random image', async () => {
  const img = join(f.dir, 'rand.img');
  const data = seededBytes(64 << 20, 5);
  data.fill(0, 8 << 20, 24 << 20); // a zero run exercises holes and write-zeroes
  writeFileSync(img, data);
  await mustRun('nbdcopy', [img, f.uri()]);
  const back = join(f.dir, 'rand-back.img');
  await mustRun('nbdcopy', [f.uri(), back]);
  const h = (b: Buffer) => createHash('sha256').update(b).digest('hex');
  assert.equal(h(readFileSync(back)), h(data));
  await mustRun('nbdcopy', ['--connections=4', '--requests=16', f.uri(), back]);
  assert.equal(h(readFileSync(back)), h(data));
});

test('a FileDevice export: qemu-io writes with FUA and flush land in the file', async () => {
  const path = join(f.dir, 'backing.img');
  const dev = await FileDevice.create(path, 8 << 20);
  f.server.addExport('file', { device: dev });
  try {
    const j = JSON.parse(await mustRun('nbdinfo', ['--json', f.uri('file')])).exports[0];
    assert.equal(j.can_flush, true);
    assert.equal(j.can_fua, true);
    await mustRun('qemu-io', [
      '-f',
      'raw',
      f.uri('file'),
      '-c',
      'write -f -P 0x42 0 1M',
      '-c',
      'write -P 0x43 2M 64k',
      '-c',
      'flush',
      '-c',
      'read -P 0x42 0 1M',
    ]);
    const onDisk = readFileSync(path);
    assert.ok(onDisk.subarray(0, 1 << 20).every((b) => b === 0x42));
    assert.ok(onDisk.subarray(2 << 20, (2 << 20) + 65536).every((b) => b === 0x43));
  } finally {
    await f.server.removeExport('file');
    await dev.close();
  }
});

describe('fio nbd engine with verify=crc32c', () => {
  for (const [jobs, depth, rw] of [
    [1, 1, 'randwrite'],
    [2, 8, 'randrw'],
    [4, 32, 'randwrite'],
  ] as const) {
    test(`${jobs} job(s), iodepth ${depth}, ${rw}`, async () => {
      const r = await runTool(
        'fio',
        [
          '--name=verify',
          '--ioengine=nbd',
          `--uri=${f.uri()}`,
          `--rw=${rw}`,
          '--bs=4k',
          '--bsrange=4k-64k',
          `--iodepth=${depth}`,
          `--numjobs=${jobs}`,
          '--size=4M',
          '--offset_increment=8M',
          '--verify=crc32c',
          '--verify_fatal=1',
          '--verify_state_save=0',
          '--randseed=1234',
          '--runtime=30',
          '--output-format=json',
        ],
        { timeoutMs: 90_000 },
      );
      assert.equal(r.code, 0, r.stderr + r.stdout);
      const j = JSON.parse(r.stdout.slice(r.stdout.indexOf('{')));
      for (const job of j.jobs) assert.equal(job.error, 0, `fio job error ${job.error}`);
    });
  }
});

test('nbdsh: protocol-level cases through libnbd with client-side checks off', async () => {
  const script = String.raw`
import errno
def expect_err(fn, code, what):
    try:
        fn()
    except nbd.Error as e:
        assert e.errno in (code, errno.errorcode[code]), "%s: errno %s, wanted %s" % (what, e.errno, code)
        return
    raise AssertionError(what + ": no error")

h = nbd.NBD()
h.set_strict_mode(0)
h.add_meta_context("base:allocation")
h.set_export_name("disk")
h.connect_unix(SOCK)
size = h.get_size()
assert size == 64 << 20
assert h.can_multi_conn() and h.can_fua() and h.can_zero() and h.can_fast_zero() and h.can_trim() and h.can_cache()
assert h.can_meta_context("base:allocation")
h.pwrite(b"\x11" * 65536, 1 << 20, nbd.CMD_FLAG_FUA)
assert h.pread(65536, 1 << 20) == b"\x11" * 65536
expect_err(lambda: h.pread(512, size), errno.EINVAL, "read past end")
expect_err(lambda: h.pwrite(b"x" * 512, size), errno.ENOSPC, "write past end")
expect_err(lambda: h.pread(512, 100), errno.EINVAL, "unaligned read")
expect_err(lambda: h.pread(100, 0), errno.EINVAL, "unaligned length")
expect_err(lambda: h.zero(512, size), errno.ENOSPC, "zero past end")
h.zero(4096, 1 << 20, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(4096, 1 << 20) == bytes(4096)
h.zero(1 << 20, 2 << 20, nbd.CMD_FLAG_FAST_ZERO)
h.trim(65536, 4 << 20)
h.cache(65536, 0)
h.flush()
# block status: trim 32M..48M (the memory device makes holes), data at 40M..40M+64k
h.trim(16 << 20, 32 << 20)
h.pwrite(b"\x22" * 65536, 40 << 20)
seen = []
def cb(meta, off, entries, err):
    seen.append((meta, off, list(entries)))
h.block_status(16 << 20, 32 << 20, cb)
assert seen[0][0] == "base:allocation", seen
assert seen[0][2][:4] == [8 << 20, 3, 65536, 0], seen
# many requests in flight
wbufs = [nbd.Buffer.from_bytearray(bytearray([i]) * 4096) for i in range(64)]
for i in range(64):
    h.aio_pwrite(wbufs[i], (16 << 20) + i * 4096)
while h.aio_in_flight() > 0:
    h.poll(-1)
rbufs = [nbd.Buffer(4096) for i in range(64)]
for i in range(64):
    h.aio_pread(rbufs[i], (16 << 20) + i * 4096)
while h.aio_in_flight() > 0:
    h.poll(-1)
for i in range(64):
    assert rbufs[i].to_bytearray() == bytearray([i]) * 4096, i
h.shutdown()
ro = nbd.NBD()
ro.set_strict_mode(0)
ro.set_export_name("ro")
ro.connect_unix(SOCK)
assert ro.is_read_only()
expect_err(lambda: ro.pwrite(b"x" * 512, 0), errno.EPERM, "write to read-only")
expect_err(lambda: ro.trim(512, 0), errno.EPERM, "trim on read-only")
ro.shutdown()
# option mode: list, info, go
o = nbd.NBD()
o.set_opt_mode(True)
o.connect_unix(SOCK)
names = []
o.opt_list(lambda name, desc: names.append(name))
assert names == ["disk", "ro"], names
o.set_export_name("nope")
expect_err(lambda: o.opt_info(), errno.ENOENT, "info on unknown export")
o.set_export_name("ro")
o.opt_info()
assert o.get_size() == 1 << 20
o.set_export_name("disk")
o.opt_go()
assert o.get_size() == 64 << 20
o.shutdown()
print("NBDSH-OK")
`.replaceAll('SOCK', JSON.stringify(f.sock));
  const out = await mustRun('nbdsh', ['-c', script], { env: NBDSH_ENV });
  assert.match(out, /NBDSH-OK/);
});

describe('TCP and TLS with X.509 certificates', () => {
  let server: NbdServer;
  let port = 0;
  let pki = '';
  let clientDir = '';
  let plainOnly = '';

  before(async () => {
    pki = join(f.dir, 'pki');
    clientDir = join(f.dir, 'client-pki');
    plainOnly = join(f.dir, 'ca-only');
    const sh = String.raw`set -e
mkdir -p "$P" "$C" "$O"; cd "$P"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca-key.pem -out ca-cert.pem -days 2 -subj "/CN=cryptmap test CA" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout server-key.pem -out server.csr -subj "/CN=localhost" 2>/dev/null
printf "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n" > server.ext
openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -out server-cert.pem -days 2 -extfile server.ext 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout client-key.pem -out client.csr -subj "/CN=client" 2>/dev/null
printf "extendedKeyUsage=clientAuth\n" > client.ext
openssl x509 -req -in client.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -out client-cert.pem -days 2 -extfile client.ext 2>/dev/null
cp ca-cert.pem client-cert.pem client-key.pem "$C"/
cp ca-cert.pem "$O"/
chmod 600 "$P"/*-key.pem "$C"/client-key.pem`;
    await mustRun('openssl', ['version']);
    await mustRun('sh', ['-c', sh], { env: { ...process.env, P: pki, C: clientDir, O: plainOnly } });
    server = new NbdServer({
      tls: 'require',
      tlsCredentials: {
        key: readFileSync(join(pki, 'server-key.pem')),
        cert: readFileSync(join(pki, 'server-cert.pem')),
        ca: readFileSync(join(pki, 'ca-cert.pem')),
        verifyClient: true,
      },
    });
    server.addExport('secure', { device: new MemoryDevice({ sizeBytes: 16 << 20 }) });
    port = (await server.listenTcp(0, '127.0.0.1')).port;
  });
  after(async () => {
    await server.close();
  });

  test('nbdinfo over nbds:// with a client certificate', async () => {
    const j = JSON.parse(
      await mustRun('nbdinfo', ['--json', `nbds://localhost:${port}/secure?tls-certificates=${clientDir}`]),
    );
    assert.equal(j.TLS, true);
    assert.equal(j.exports[0]['export-size'], 16 << 20);
  });

  test('nbdcopy round trip over TLS', async () => {
    const img = join(f.dir, 'tls.img');
    const data = seededBytes(16 << 20, 77);
    writeFileSync(img, data);
    const uri = `nbds://localhost:${port}/secure?tls-certificates=${clientDir}`;
    await mustRun('nbdcopy', [img, uri]);
    const back = join(f.dir, 'tls-back.img');
    await mustRun('nbdcopy', [uri, back]);
    assert.ok(readFileSync(back).equals(data));
  });

  test('plaintext is refused (TLS required), and so is a client without a certificate', async () => {
    const plain = await runTool('nbdinfo', [`nbd://localhost:${port}/secure`]);
    assert.notEqual(plain.code, 0);
    const nocert = await runTool('nbdinfo', [`nbds://localhost:${port}/secure?tls-certificates=${plainOnly}`]);
    assert.notEqual(nocert.code, 0);
    const ok = await runTool('nbdinfo', ['--size', `nbds://localhost:${port}/secure?tls-certificates=${clientDir}`]);
    assert.equal(ok.stdout.trim(), String(16 << 20));
  });
});
