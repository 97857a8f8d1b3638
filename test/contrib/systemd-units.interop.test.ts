/**
 * contrib/systemd (issue 18 item 1): `systemd-analyze verify` accepts every unit with no warning (an
 * unknown key or a bad value is only a warning to it, so stderr must be empty), with ExecStart= pointed
 * at this checkout's bin/cryptmap.js (verify wants the binary to exist); and the properties the issue
 * names are there.
 */
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { testTempDir } from '../helpers/tmp.js';
import { runTool } from '../helpers/tools.js';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('../../../', import.meta.url));
const UNITS = join(ROOT, 'contrib', 'systemd');
const BIN = join(ROOT, 'bin', 'cryptmap.js');

function unit(name: string): string {
  return readFileSync(join(UNITS, name), 'utf8');
}

test('systemd-analyze verify accepts the units without a warning', async (t) => {
  const dir = testTempDir(t, 'cryptmap-units-');
  const names = readdirSync(UNITS).filter((n) => /\.(service|socket)$/.test(n));
  assert.deepEqual(names.sort(), [
    'cryptmap-agent.service',
    'cryptmap-daemon.service',
    'cryptmap-daemon.socket',
    'cryptmap-keyd.service',
  ]);
  for (const n of names) writeFileSync(join(dir, n), unit(n).replaceAll('/usr/bin/cryptmap ', `${BIN} `));
  const r = await runTool('systemd-analyze', ['verify', ...names.map((n) => join(dir, n))]);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stderr.trim(), '', 'systemd-analyze warned');
});

test('each service is Type=notify with a restart policy, no core dumps and a capability bounding set', () => {
  for (const n of ['cryptmap-keyd.service', 'cryptmap-daemon.service', 'cryptmap-agent.service']) {
    const u = unit(n);
    for (const line of [
      'Type=notify',
      'Restart=on-failure',
      'NoNewPrivileges=yes',
      'LimitCORE=0',
      'UMask=0077',
      'WatchdogSec=60s',
    ]) {
      assert.ok(u.split('\n').includes(line), `${n}: ${line}`);
    }
    assert.match(u, /^CapabilityBoundingSet=/m, n);
    assert.match(u, /^ExecStart=\/usr\/bin\/cryptmap (keyd|daemon|agent) /m, n);
  }
  assert.match(unit('cryptmap-keyd.service'), /^CapabilityBoundingSet=$/m, 'keyd needs no capability');
  assert.match(unit('cryptmap-keyd.service'), /^ProtectSystem=strict$/m);
  assert.match(unit('cryptmap-daemon.service'), /^RuntimeDirectory=cryptmap\nRuntimeDirectoryMode=0700$/m);
  assert.match(unit('cryptmap-daemon.service'), /^PrivateTmp=yes$/m);
  assert.match(
    unit('cryptmap-daemon.socket'),
    /^ListenStream=\/run\/cryptmap\/control\.sock\nSocketMode=0600\nDirectoryMode=0700\nFileDescriptorName=control$/m,
  );
  assert.match(unit('cryptmap-agent.service'), /^After=.*cryptmap-keyd\.service$/m);
});
