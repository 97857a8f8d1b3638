/** Daemon core without external tools: failure leaves nothing behind; only the owner reaches the control socket. */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { controlSocketPath, ensureRuntimeDir } from '../../src/control/runtime-dir.js';
import { ControlServer } from '../../src/control/server.js';
import { mappingFromJson, mappingToJson } from '../../src/control/args.js';
import { daemonHandlers } from '../../src/daemon/handlers.js';
import { coreIn, plainMapping } from './fixtures.js';
import type { CryptmapError } from '../../src/util/errors.js';
import { Secret } from '../../src/util/secret.js';

const setup = () => coreIn('cm-core-');
const mapping = plainMapping;

test('a mapping that fails to open leaves no device, export or key behind', async () => {
  const { dir, core } = setup();
  try {
    const key = new Secret(Buffer.alloc(64, 7).fill(9, 32));
    await assert.rejects(core.openVolume(mapping(dir, { device: join(dir, 'missing.img') }), key));
    assert.equal(core.registry.list().length, 0);
    assert.deepEqual(core.nbd.exportNames(), []);
    assert.equal(core.keyring.has('cryptmap:m0'), false);
    // Too small a device: refused by the table, nothing left.
    writeFileSync(join(dir, 'disk.img'), Buffer.alloc(512 * 16));
    await assert.rejects(core.openVolume(mapping(dir), key));
    assert.equal(core.registry.list().length, 0);
    assert.equal(core.keyring.has('cryptmap:m0'), false);
    // Right size: opens, exported under its name; close removes everything.
    writeFileSync(join(dir, 'disk.img'), Buffer.alloc(512 * 2048));
    const st = await core.openVolume(mapping(dir), key);
    assert.equal(st.active, true);
    assert.deepEqual(core.nbd.exportNames(), ['m0']);
    await assert.rejects(core.openVolume(mapping(dir), key), (e: CryptmapError) => e.exitCode === 5);
    await core.closeVolume('m0');
    assert.deepEqual(core.nbd.exportNames(), []);
    assert.equal(core.keyring.has('cryptmap:m0'), false);
    key.dispose();
  } finally {
    await core.shutdown();
    rmSync(dir, { recursive: true, force: true });
  }
});

test('mapping JSON round trip and validation of control arguments', () => {
  const m = mapping('/x', { ivOffsetSectors: 18446744073709551615n, header: '/h', keyslot: 3 });
  assert.deepEqual(mappingFromJson(JSON.parse(JSON.stringify(mappingToJson(m)))), m);
  assert.throws(() => mappingFromJson({ ...mappingToJson(m), sectorBytes: 777 }), /mapping.sectorBytes/);
  assert.throws(() => mappingFromJson({ ...mappingToJson(m), ivOffsetSectors: '-1' }), /mapping.ivOffsetSectors/);
  assert.throws(() => mappingFromJson(null), /mapping/);
});

test('the control socket refuses users other than its owner', {
  skip: process.getuid?.() !== 0 && !process.env.CI ? 'needs root to run a client as another user' : false,
}, async () => {
  const { dir, core } = setup();
  const run = join(dir, 'run');
  ensureRuntimeDir(run);
  const server = new ControlServer(daemonHandlers(core));
  await server.listen(controlSocketPath(run));
  try {
    const script = `require('net').connect(${JSON.stringify(controlSocketPath(run))}).on('connect',()=>{console.log('CONNECTED');process.exit(0)}).on('error',e=>{console.log(e.code);process.exit(0)})`;
    const r = spawnSync(process.execPath, ['-e', script], {
      uid: 65534,
      gid: 65534,
      encoding: 'utf8',
      timeout: 10_000,
    });
    assert.match(r.stdout, /EACCES|EPERM/, `nobody must not connect: ${r.stdout}${r.stderr}`);
  } finally {
    await server.close();
    await core.shutdown();
    rmSync(dir, { recursive: true, force: true });
  }
});
