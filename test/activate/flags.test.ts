// The activation flag table (src/activate/flags.ts) drives every site: for each row, the CLI option
// exists, the table line carries the dm word and the crypt target prints it back, status prints
// cryptsetup's word (from the mapping and from a raw table), LUKS2 and crypttab names round-trip,
// and the control protocol keeps the flag. A new row is covered by these loops without a new test.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  ACTIVATION_FLAGS,
  allFlags,
  flagOfPersistent,
  flagsFromOptions,
  persistentNames,
} from '../../src/activate/flags.js';
import { parseCrypttab } from '../../src/activate/crypttab.js';
import { type CryptMapping, cryptTableLine } from '../../src/activate/mapping.js';
import { formatStatus, rawCryptFields } from '../../src/cli/commands/status.js';
import { OPTIONS } from '../../src/cli/options.js';
import { mappingFromJson, mappingToJson } from '../../src/control/args.js';
import { InProcessDmControl } from '../../src/dm/control.js';
import { CRYPT_FLAGS } from '../../src/dm/targets/crypt.js';
import { memRegistry } from '../dm/helpers.js';

const base: CryptMapping = {
  name: 'f',
  type: 'PLAIN',
  uuid: '',
  device: '/mem/a',
  cipher: 'aes-xts-plain64',
  keyBytes: 64,
  sectorBytes: 512,
  ivOffsetSectors: 0n,
  offsetSectors: 0,
  sizeSectors: 64,
  readOnly: false,
  allowDiscards: false,
};

test('the table names every dm-crypt flag once, in the kernel order, and each name once', () => {
  assert.deepEqual(
    ACTIVATION_FLAGS.map((f) => f.dm),
    [...CRYPT_FLAGS],
  );
  for (const col of ['field', 'option', 'luks2', 'status', 'crypttab'] as const) {
    const names = ACTIVATION_FLAGS.map((f) => f[col]);
    assert.equal(new Set(names).size, names.length, `column ${col} has a duplicate`);
  }
});

test('each activation flag reaches every site', async () => {
  const key = 'ab'.repeat(64);
  for (const f of ACTIVATION_FLAGS) {
    const on = { [f.field]: true };
    // CLI: a boolean option, read into the mapping field.
    assert.equal(OPTIONS[f.option].type, 'boolean', f.option);
    assert.deepEqual(flagsFromOptions({ [f.option]: true }), on);
    // The table line, accepted by the crypt target and printed back.
    const m: CryptMapping = { ...base, ...on };
    const line = cryptTableLine(m, key);
    assert.match(line, new RegExp(` 1 ${f.dm}$`));
    const { registry } = memRegistry({ a: 1 << 20 });
    const dm = new InProcessDmControl(registry);
    await dm.create('f', { table: line });
    const [live] = await dm.table('f', { showKeys: true });
    assert.deepEqual(live!.lines, [line]);
    await dm.remove('f');
    // Status: from the mapping (open) and from a raw crypt table (dm create), the same words.
    const st = formatStatus({
      name: 'f',
      active: true,
      nbdUri: 'nbd+unix:///f',
      suspended: false,
      openCount: 1,
      nbdConnections: 0,
      mapping: mappingToJson(m) as never,
    });
    const flagsLine = `  flags:   ${f.status}${f === ACTIVATION_FLAGS.at(-1) ? '' : ' '}\n`;
    assert.ok(st.includes(flagsLine), `${f.field}: ${st}`);
    assert.ok(rawCryptFields(line, false).includes(flagsLine), f.dm);
    // LUKS2 persistent flags.
    assert.deepEqual(persistentNames(on), [f.luks2]);
    assert.equal(flagOfPersistent(f.luks2)?.field, f.field);
    // The control protocol and refresh.
    assert.equal(mappingFromJson(JSON.parse(JSON.stringify(mappingToJson(m))))[f.field], true);
    assert.equal(allFlags(on)[f.field], true);
    // crypttab accepts its option.
    assert.equal(parseCrypttab(`v /dev/x none ${f.crypttab}\n`).length, 1);
  }
});
