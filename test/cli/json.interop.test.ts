/**
 * `--json` on the read verbs (issue 18 item 3): each output validates against its schema in
 * docs/json/ (ajv, strict about required fields), and agrees with the real tools where they have an
 * answer: luksDump --json's `metadata` is what `cryptsetup luksDump --dump-json-metadata` prints,
 * isLuks --json's answer is cryptsetup isLuks's exit code, dm table --json is the text table split.
 */
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { FAST_LUKS2_FORMAT } from '../helpers/luks.js';
import { fileURLToPath } from 'node:url';
import { Ajv } from 'ajv';
import { cryptmap, exec, ok, useDaemon } from './harness.js';

const SCHEMAS = fileURLToPath(new URL('../../../docs/json/', import.meta.url));
const ajv = new Ajv({ allErrors: true, strict: false });
const fx = useDaemon('cryptmap-json-');

function check(schema: string, text: string): unknown {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (e) {
    assert.fail(`not JSON (${(e as Error).message}):\n${text}`);
  }
  const validate = ajv.compile(JSON.parse(readFileSync(join(SCHEMAS, `${schema}.schema.json`), 'utf8')) as object);
  assert.ok(validate(v), `${schema}: ${ajv.errorsText(validate.errors)}\n${text}`);
  return v;
}

test('isLuks --json and luksDump --json against cryptsetup, LUKS1 and LUKS2', async () => {
  const key = join(fx.dir, 'key');
  writeFileSync(key, 'json test passphrase', { mode: 0o600 });
  for (const type of ['luks1', 'luks2']) {
    const img = join(fx.dir, `${type}.img`);
    await ok('truncate', ['-s', '20M', img]);
    await ok('cryptsetup', [
      'luksFormat',
      '--type',
      type,
      '--batch-mode',
      '--pbkdf-force-iterations',
      '1000',
      ...(type === 'luks2' ? ['--pbkdf', 'pbkdf2'] : []),
      '--key-file',
      key,
      img,
    ]);
    const is = await cryptmap(['isLuks', '--json', img]);
    assert.equal(is.code, (await exec('cryptsetup', ['isLuks', img])).code);
    assert.deepEqual(check('isLuks', is.stdout), { device: img, isLuks: true, type });
    const other = type === 'luks1' ? 'luks2' : 'luks1';
    const mismatch = await cryptmap(['isLuks', '--json', '--type', other, img]);
    assert.equal(mismatch.code, (await exec('cryptsetup', ['isLuks', '--type', other, img])).code);
    assert.equal((check('isLuks', mismatch.stdout) as { typeMatches: boolean }).typeMatches, false);
    const dump = await cryptmap(['luksDump', '--json', img]);
    assert.equal(dump.code, 0, dump.stderr);
    const d = check('luksDump', dump.stdout) as { type: string; uuid: string; metadata?: unknown };
    assert.equal(d.type, type);
    assert.equal(d.uuid, (await ok('cryptsetup', ['luksUUID', img])).trim());
    if (type === 'luks2')
      assert.deepEqual(d.metadata, JSON.parse(await ok('cryptsetup', ['luksDump', '--dump-json-metadata', img])));
  }
  const plain = join(fx.dir, 'plain.img');
  await ok('truncate', ['-s', '1M', plain]);
  const no = await cryptmap(['isLuks', '--json', plain]);
  assert.equal(no.code, 1);
  assert.deepEqual(check('isLuks', no.stdout), { device: plain, isLuks: false, type: null });
});

test('status --json, dm table|status|info|ls --json on an open volume', async () => {
  const key = join(fx.dir, 'key2');
  writeFileSync(key, 'json test passphrase', { mode: 0o600 });
  const img = join(fx.dir, 'open.img');
  await ok('truncate', ['-s', '20M', img]);
  await ok('cryptsetup', [...FAST_LUKS2_FORMAT, '--key-file', key, img]);
  const o = await cryptmap(['open', '--runtime-dir', fx.run, '--key-file', key, img, 'jvol']);
  assert.equal(o.code, 0, o.stderr);
  try {
    const st = await cryptmap(['status', '--json', '--runtime-dir', fx.run, 'jvol']);
    assert.equal(st.code, 0, st.stderr);
    const s = check('status', st.stdout) as { active: boolean; mapping: { type: string; device: string } };
    assert.equal(s.active, true);
    assert.equal(s.mapping.type, 'LUKS2');
    assert.equal(s.mapping.device, img);
    const inactive = await cryptmap(['status', '--json', '--runtime-dir', fx.run, 'nothere']);
    assert.equal(inactive.code, 4, 'exit code as without --json');
    assert.equal((check('status', inactive.stdout) as { active: boolean }).active, false);

    const tableText = await cryptmap(['dm', 'table', '--runtime-dir', fx.run, 'jvol']);
    const table = await cryptmap(['dm', 'table', '--json', '--runtime-dir', fx.run, 'jvol']);
    const t = check('dm-lines', table.stdout) as {
      devices: { name: string; targets: { start: number; length: number; targetType: string; params: string }[] }[];
    };
    assert.equal(t.devices[0]!.name, 'jvol');
    const x = t.devices[0]!.targets[0]!;
    assert.equal(`${x.start} ${x.length} ${x.targetType} ${x.params}\n`, tableText.stdout, 'the text table, split');
    assert.doesNotMatch(table.stdout, /[0-9a-f]{64}/, 'no key without --showkeys');
    const status = await cryptmap(['dm', 'status', '--json', '--runtime-dir', fx.run]);
    assert.equal(
      (check('dm-lines', status.stdout) as { devices: { targets: { targetType: string }[] }[] }).devices[0]!.targets[0]!
        .targetType,
      'crypt',
    );
    const info = await cryptmap(['dm', 'info', '--json', '--runtime-dir', fx.run, 'jvol']);
    assert.equal(
      (check('dm-info', info.stdout) as { devices: { major: number; openCount: number }[] }).devices[0]!.major,
      253,
    );
    const ls = await cryptmap(['dm', 'ls', '--json', '--runtime-dir', fx.run]);
    assert.deepEqual(
      (check('dm-ls', ls.stdout) as { devices: { name: string }[] }).devices.map((d) => d.name),
      ['jvol'],
    );
  } finally {
    const c = await cryptmap(['close', '--runtime-dir', fx.run, 'jvol']);
    assert.equal(c.code, 0, c.stderr);
  }
});

test('benchmark --json and agent status --json', async () => {
  const b = await cryptmap(['benchmark', '--json', '--cipher', 'aes-xts-plain64', '--seconds', '0.2']);
  assert.equal(b.code, 0, b.stderr);
  const r = check('benchmark', b.stdout) as { cipher: string; encryptMBps: number }[];
  assert.equal(r[0]!.cipher, 'aes-xts-plain64');
  assert.ok(r[0]!.encryptMBps > 0);
  const a = await cryptmap(['agent', 'status', '--json', '--state-dir', join(fx.dir, 'no-agent')]);
  assert.equal(a.code, 0, a.stderr);
  assert.deepEqual(check('agent-status', a.stdout), { running: false, pid: null, volumes: [] });
});
