import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { DEFAULT_MANIFEST_YAML } from '../../src/reconciler/default-manifest.js';
import { parseManifest, parseSize } from '../../src/reconciler/manifest.js';
import { desiredVolumes } from '../../src/reconciler/plan.js';

const EXAMPLE = readFileSync(new URL('../../../examples/manifest.yaml', import.meta.url), 'utf8');

function problems(text: string): string[] {
  try {
    parseManifest(text, 'm.yaml');
  } catch (e) {
    assert.equal((e as { code?: string }).code, 'EMANIFEST');
    return (e as Error).message.split('\n');
  }
  assert.fail('expected EMANIFEST');
}

test('the example manifest parses, with defaults filled in, and is the embedded default', () => {
  assert.equal(DEFAULT_MANIFEST_YAML, EXAMPLE);
  const m = parseManifest(EXAMPLE, 'examples/manifest.yaml');
  assert.equal(m.keyService.address, 'embedded');
  assert.deepEqual(
    m.services.map((s) =>
      s.volumes.map((v) => [
        s.name,
        v.name,
        v.class,
        v.sizeBytes,
        v.filesystem,
        v.mountpoint,
        v.cipher,
        v.keySizeBits,
        v.sectorSize,
      ]),
    ),
    [
      [['web', 'cache', 'ephemeral', 64 << 20, 'ext4', '/srv/web/cache', 'aes-xts-plain64', 512, 4096]],
      [['db', 'data', 'persistent', 64 << 20, 'ext4', '/srv/db', 'aes-xts-plain64', 512, 4096]],
    ],
  );
  assert.deepEqual(
    m.swap.map((s) => [s.name, s.sizeBytes]),
    [['swap0', 64 << 20]],
  );
  assert.ok(m.services[0]!.volumes[0]!.line > 1);
  const minimal = parseManifest('version: 1\nservices:\n  - name: a\n    volumes:\n      - {name: v, size: 2M}\n');
  assert.equal(minimal.services[0]!.volumes[0]!.class, 'ephemeral');
  assert.equal(minimal.keyService.address, 'embedded');
  assert.deepEqual(minimal.swap, []);
});

test('sizes', () => {
  assert.equal(parseSize('512M'), 512 * 2 ** 20);
  assert.equal(parseSize('2G'), 2 ** 31);
  assert.equal(parseSize('4KiB'), 4096);
  for (const bad of ['0M', '12', '1.5G', '1 G', 'M', '-1M', '1m'])
    assert.throws(() => parseSize(bad), /size like 512M/);
});

test('schema errors give file, line and field path', () => {
  const text = `version: 1
services:
  - name: web
    volumes:
      - name: cache
        size: 64M
  - name: db
    volumes:
      - name: data
        size: lots
        class: forever
        colour: blue
      - size: 4M
swap:
  - name: s0
`;
  assert.deepEqual(problems(text), [
    'm.yaml:10: services[1].volumes[0].size: must be a size like 512M or 2G',
    'm.yaml:11: services[1].volumes[0].class: must be ephemeral or persistent',
    'm.yaml:12: services[1].volumes[0].colour: is not a known field',
    'm.yaml:13: services[1].volumes[1].name: is required',
    'm.yaml:15: swap[0].size: is required',
  ]);
  assert.deepEqual(problems('version: 2\n'), ['m.yaml:1: version: must be 1']);
  assert.deepEqual(problems('version: 1\nservices: {}\n'), ['m.yaml:2: services: must be a list']);
  assert.deepEqual(problems('version: 1\nkeyService:\n  address: ftp://x\n'), [
    'm.yaml:3: keyService.address: must be embedded, unix:/path/to/keyd.sock or https://host:port',
  ]);
  assert.match(problems('version: 1\nservices: [\n')[0]!, /^m\.yaml:\d+: \(syntax\): /);
  assert.match(problems('version: 1\nversion: 1\n')[0]!, /^m\.yaml:\d+: \(syntax\): .*unique/);
  assert.deepEqual(problems(''), ['m.yaml:1: (top level): the manifest is empty']);
});

test('semantic errors give file, line and field path', () => {
  const text = `version: 1
keyService:
  address: https://keys.example:7443
services:
  - name: a
    volumes:
      - {name: v, size: 4M, mountpoint: /srv/x}
      - {name: v, size: 4M, mountpoint: /srv/x}
      - {name: w, size: 4M, filesystem: none, mountpoint: /srv/w}
      - {name: x, size: 512K}
      - {name: y, size: 6K, sectorSize: 4096, cipher: aes-xts-plain64, keySize: 128}
  - name: a
    volumes: []
swap:
  - {name: s, size: 1M}
  - {name: s, size: 1M, mountpoint: /x}
`;
  assert.deepEqual(problems(text), ['m.yaml:16: swap[1].mountpoint: is not a known field']);
  assert.deepEqual(problems(text.replace(', mountpoint: /x', '')), [
    'm.yaml:2: keyService.tls: an https key service needs tls.cert, tls.key and tls.ca',
    "m.yaml:8: services[0].volumes[1].name: volume 'v' is already defined in service 'a'",
    'm.yaml:8: services[0].volumes[1].mountpoint: is already used by a/v',
    'm.yaml:9: services[0].volumes[2].mountpoint: a volume with filesystem none cannot be mounted',
    'm.yaml:10: services[0].volumes[3].size: must be at least 1M',
    'm.yaml:11: services[0].volumes[4].keySize: XTS needs two keys: 256 or 512 bits',
    'm.yaml:11: services[0].volumes[4].size: must be a multiple of the sector size (4096 bytes)',
    'm.yaml:11: services[0].volumes[4].size: must be at least 1M',
    "m.yaml:12: services[1].name: service 'a' is already defined (services[0])",
    "m.yaml:16: swap[1].name: swap 's' is already defined",
  ]);
});

test('keyService.passphraseFile and rootSecretFile: embedded only', () => {
  const m = parseManifest(
    'version: 1\nkeyService:\n  address: embedded\n  passphraseFile: secrets/root.pass\n  rootSecretFile: /media/key/root.key.wrapped\n',
  );
  assert.equal(m.keyService.passphraseFile, 'secrets/root.pass');
  assert.equal(m.keyService.rootSecretFile, '/media/key/root.key.wrapped');
  assert.throws(
    () => parseManifest('version: 1\nkeyService:\n  address: unix:/run/keyd.sock\n  rootSecretFile: /x\n'),
    /keyService\.rootSecretFile.*embedded key service only/s,
  );
  assert.throws(
    () => parseManifest('version: 1\nkeyService:\n  address: embedded\n  passphraseFile: ""\n'),
    /passphraseFile/,
  );
});

test("a volume on shared storage: device is an NBD URI, persistent, its size is the export's", () => {
  const m = parseManifest(
    'version: 1\nservices:\n  - name: db\n    volumes:\n      - {name: data, class: persistent, device: "nbd+unix:///vol?socket=/run/s.sock", mountpoint: /srv/db}\n',
  );
  const v = m.services[0]!.volumes[0]!;
  assert.equal(v.device, 'nbd+unix:///vol?socket=/run/s.sock');
  assert.equal(v.sizeBytes, 0);
  assert.equal(v.size, '');
  const base = 'version: 1\nservices:\n  - name: db\n    volumes:\n';
  assert.deepEqual(problems(`${base}      - {name: a, class: persistent, device: /dev/sdb}\n`), [
    'm.yaml:5: services[0].volumes[0].device: must be an NBD URI: nbd://host[:port]/export, nbds://..., nbd+unix:///export?socket=PATH',
  ]);
  assert.deepEqual(
    problems(
      `${base}      - {name: a, class: persistent, device: "nbd+unix:///x", size: 8M}\n      - {name: b, device: "nbd://h/e"}\n      - {name: c}\n`,
    ),
    [
      "m.yaml:5: services[0].volumes[0].device: invalid NBD URI 'nbd+unix:///x': nbd+unix URIs need ?socket=PATH",
      "m.yaml:5: services[0].volumes[0].size: must not be given with device: the volume's size is the export's",
      'm.yaml:6: services[0].volumes[1].class: a volume on a shared device must be persistent (ephemeral volumes stay node-local files)',
      'm.yaml:7: services[0].volumes[2].size: is required',
    ],
  );
  // The volume's target: path is the URI, no file under the volume directory.
  const t = desiredVolumes(m, '/var/lib/cryptmap/volumes')[0]!;
  assert.equal(t.path, v.device);
  assert.equal(t.device, v.device);
});

test('two volumes on one export are refused, naming both, however the URIs spell it; XTS keys checked on device volumes too', () => {
  const base = 'version: 1\nservices:\n  - name: db\n    volumes:\n';
  assert.deepEqual(
    problems(
      `${base}      - {name: a, class: persistent, device: "nbd://store/vol"}\n  - name: web\n    volumes:\n      - {name: b, class: persistent, device: "nbd://STORE:10809/vol"}\n      - {name: c, class: persistent, device: "nbd://store/other"}\n`,
    ),
    [
      'm.yaml:8: services[1].volumes[0].device: web/b and db/a name the same export (nbd://STORE:10809/vol and nbd://store/vol): two volumes on one export destroy each other; give each its own',
    ],
  );
  assert.deepEqual(
    problems(
      `${base}      - {name: a, class: persistent, device: "nbd+unix:///e?socket=/run/s.sock"}\n      - {name: b, class: persistent, device: "nbd+unix:///e?socket=/run/./s.sock"}\n`,
    ),
    [
      'm.yaml:6: services[0].volumes[1].device: db/b and db/a name the same export (nbd+unix:///e?socket=/run/./s.sock and nbd+unix:///e?socket=/run/s.sock): two volumes on one export destroy each other; give each its own',
    ],
  );
  // Different exports on one server, or one export name on two servers, are fine.
  parseManifest(
    `${base}      - {name: a, class: persistent, device: "nbd://store/x"}\n      - {name: b, class: persistent, device: "nbd://store2/x"}\n`,
  );
  assert.deepEqual(problems(`${base}      - {name: a, class: persistent, device: "nbd://store/x", keySize: 128}\n`), [
    'm.yaml:5: services[0].volumes[0].keySize: XTS needs two keys: 256 or 512 bits',
  ]);
});

test('pools: sizes, block size, named devices, and volumes naming them', () => {
  const m = parseManifest(
    'version: 1\npools:\n  - {name: main, size: 1G}\n  - {name: p2, size: 128M, metadataSize: 8M, blockSize: 256K}\nservices:\n  - name: db\n    volumes:\n      - {name: data, size: 8M, pool: main}\n',
  );
  assert.deepEqual(
    m.pools.map((p) => [p.name, p.sizeBytes, p.metadataBytes, p.blockBytes]),
    [
      ['main', 1 << 30, 4 << 20, 65536],
      ['p2', 128 << 20, 8 << 20, 256 << 10],
    ],
  );
  assert.equal(m.services[0]!.volumes[0]!.pool, 'main');
  assert.deepEqual(
    problems(`version: 1
pools:
  - {name: a, size: 64M, blockSize: 96K}
  - {name: a, size: 100K}
  - {name: c}
  - {name: d, dataDevice: /dev/vdb}
  - {name: e, dataDevice: /dev/vdb, metadataDevice: /dev/vdb, size: 1G}
  - {name: f, size: 64M, metadataSize: 1M}
services:
  - name: s
    volumes:
      - {name: v, size: 8M, pool: nope}
      - {name: w, class: persistent, device: "nbd://h/e", pool: a}
`),
    [
      'm.yaml:3: pools[0].blockSize: must be 64K to 1G, a multiple of 64K (the kernel: 128 to 2097152 sectors)',
      "m.yaml:4: pools[1].name: pool 'a' is already defined",
      'm.yaml:4: pools[1].size: must be a multiple of the block size (65536 bytes)',
      'm.yaml:5: pools[2].size: is required (or dataDevice and metadataDevice)',
      'm.yaml:6: pools[3].metadataDevice: is required with the other device',
      'm.yaml:7: pools[4].metadataDevice: must not be the data device',
      "m.yaml:7: pools[4].size: must not be given with devices: the sizes are the devices'",
      'm.yaml:8: pools[5].metadataSize: must be 2M to 16G',
      "m.yaml:12: services[0].volumes[0].pool: no pool 'nope' is defined (pools: a, c, d, e, f)",
      'm.yaml:13: services[0].volumes[1].pool: a volume on a shared device cannot be in a pool',
    ],
  );
});

test('coordination: TLS and password auth for etcd; https needs tls.ca, cert and key together, user with passwordFile', () => {
  const m = parseManifest(
    'version: 1\ncoordination:\n  etcd: ["https://10.0.0.5:2379"]\n  tls: {ca: etcd-ca.pem, cert: node.pem, key: node.key}\n  user: cryptmap\n  passwordFile: /etc/cryptmap/etcd.password\n',
  );
  assert.deepEqual(m.coordination, {
    etcd: ['https://10.0.0.5:2379'],
    tls: { ca: 'etcd-ca.pem', cert: 'node.pem', key: 'node.key' },
    user: 'cryptmap',
    passwordFile: '/etc/cryptmap/etcd.password',
  });
  const c = (body: string) => problems(`version: 1\ncoordination:\n${body}`);
  assert.deepEqual(c('  etcd: ["https://e:2379"]\n'), [
    'm.yaml:2: coordination.tls: https:// etcd endpoints need tls.ca',
  ]);
  assert.deepEqual(c('  etcd: ["http://e:2379"]\n  tls: {ca: a.pem}\n'), [
    'm.yaml:4: coordination.tls: applies to https:// etcd endpoints only',
  ]);
  assert.deepEqual(c('  etcd: ["https://e:2379"]\n  tls: {ca: a.pem, cert: c.pem}\n'), [
    'm.yaml:4: coordination.tls: a client certificate needs both cert and key',
  ]);
  assert.deepEqual(c('  etcd: ["http://e:2379"]\n  user: u\n'), [
    'm.yaml:4: coordination.user: user and passwordFile go together',
  ]);
  assert.deepEqual(c('  etcd: ["http://a:2379", "https://b:2379"]\n  tls: {ca: a.pem}\n'), [
    'm.yaml:3: coordination.etcd: must be all https:// or all http:// endpoints',
  ]);
});
