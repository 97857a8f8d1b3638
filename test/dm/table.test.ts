// Table syntax: strict parsing with line/argument errors, and round trips parse(format(x)) = x
// for every target type (crypt with keys shown), including non-canonical input forms.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { MAX_TABLE_SECTORS, parseTable } from '../../src/dm/table.js';
import { memRegistry, xtsKey } from './helpers.js';

const MiB = 1 << 20;

test('parseTable reads dmsetup lines, skipping blanks and comments', () => {
  const lines = parseTable('# a comment\n\n0 100 linear /dev/x 0\r\n  100\t28 zero\n');
  assert.deepEqual(lines, [
    { line: 3, startSectors: 0, lengthSectors: 100, target: 'linear', args: ['/dev/x', '0'] },
    { line: 4, startSectors: 100, lengthSectors: 28, target: 'zero', args: [] },
  ]);
});

test('parseTable errors name the line and the problem', () => {
  const cases: [string, RegExp][] = [
    ['', /the table is empty/],
    ['# only a comment', /the table is empty/],
    ['0 100', /table line 1: expected '<start> <length> <target> \[<args>...\]', got '0 100'/],
    ['x 100 zero', /table line 1: <start>: 'x' is not an unsigned decimal number/],
    ['0 -1 zero', /table line 1: <length>: '-1' is not an unsigned decimal number/],
    [`0 ${MAX_TABLE_SECTORS + 1} zero`, /table line 1: <length>: .* is too large/],
    ['0 0 zero', /table line 1: <length> must not be zero/],
    ['8 100 zero', /table line 1: <start> 8: the first target must start at sector 0/],
    [
      '0 100 zero\n101 1 zero',
      /table line 2: <start> 101 leaves a gap after the previous target, which ends at sector 100/,
    ],
    ['0 100 zero\n\n99 1 zero', /table line 3: <start> 99 overlaps the previous target, which ends at sector 100/],
    [`0 ${MAX_TABLE_SECTORS} zero\n${MAX_TABLE_SECTORS} 1 zero`, /table line 2: the table is larger than/],
    ['0 1 ze/ro', /table line 1: <target> 'ze\/ro' is not a valid target name/],
  ];
  for (const [text, re] of cases) assert.throws(() => parseTable(text), re, text);
});

test('targets reject malformed arguments, naming line, target and argument', async () => {
  const { registry } = memRegistry({ a: MiB, b: MiB });
  const key = xtsKey().toString('hex');
  const cases: [string, RegExp][] = [
    [
      '0 8 nosuch',
      /table line 1: unknown target type 'nosuch' \(known: crypt, error, linear, mirror, striped, thin, thin-pool, zero\)/,
    ],
    ['0 8 zero extra', /table line 1: zero <args>: unexpected extra argument 'extra' \(expected 'zero'\)/],
    ['0 8 error 1', /table line 1: error <args>: unexpected extra argument '1'/],
    ['0 8 linear /mem/a', /table line 1: linear <offset>: missing <offset> \(expected 'linear <dev> <offset>'\)/],
    ['0 8 linear /mem/a 0 9', /table line 1: linear <offset>: unexpected extra argument '9'/],
    ['0 8 linear /mem/a x', /table line 1: linear <offset>: 'x' is not an unsigned decimal number/],
    ['0 8 linear /mem/a 99999999999999999999', /table line 1: linear <offset>: '99999999999999999999' is too large/],
    ['0 8 linear /mem/nope 0', /table line 1: linear <dev>: cannot open \/mem\/nope/],
    [
      '0 2048 linear /mem/a 8',
      /table line 1: linear <dev>: device \/mem\/a is too small: it has 2048 sectors, the target needs 2056/,
    ],
    ['0 16 striped', /table line 1: striped <#stripes>: not enough arguments/],
    ['0 16 striped 0 8', /table line 1: striped <#stripes>: must be at least 1/],
    ['0 16 striped 2 12 /mem/a 0 /mem/b 0', /striped <chunk_size>: '12' must be a power of two and at least 8 sectors/],
    ['0 16 striped 2 4 /mem/a 0 /mem/b 0', /striped <chunk_size>: '4' must be a power of two/],
    [
      '0 24 striped 2 8 /mem/a 0 /mem/b 0',
      /striped <chunk_size>: the target length 24 is not a multiple of chunk_size \* #stripes \(8 \* 2\)/,
    ],
    ['0 16 striped 2 8 /mem/a 0', /striped <dev>: expected 2 <dev> <offset> pairs \(6 arguments\), got 4 arguments/],
    ['0 16 striped 1 8 /mem/a 0 /mem/b', /striped <offset>: expected 1 <dev> <offset> pairs/],
    ['0 16 striped 2 8 /mem/a 0 /mem/b x', /striped <offset #1>: 'x' is not an unsigned decimal number/],
    [
      '0 4096 striped 2 8 /mem/a 0 /mem/b 1',
      /striped <dev #1>: device \/mem\/b is too small: it has 2048 sectors, the target needs 2049/,
    ],
    ['0 8 crypt aes-xts-plain64', /table line 1: crypt <key>: missing argument/],
    [`0 8 crypt aes-nope-plain64 ${key} 0 /mem/a 0`, /table line 1: crypt <cipher>:/],
    [
      `0 8 crypt aes-xts-plain64 xyz 0 /mem/a 0`,
      /crypt <key>: is not valid hex, '-' or a key reference \(3 characters\)/,
    ],
    [
      `0 8 crypt aes-xts-plain64 ${key.slice(0, 30)} 0 /mem/a 0`,
      /crypt <key>: cipher 'aes-xts-plain64' takes a key of/,
    ],
    [
      `0 8 crypt aes-xts-plain64 ${key} -1 /mem/a 0`,
      /crypt <iv_offset>: '-1' is not an unsigned 64-bit decimal number/,
    ],
    [`0 8 crypt aes-xts-plain64 ${key} 0 /mem/a x`, /crypt <offset>: 'x' is not an unsigned decimal number/],
    [
      `0 8 crypt aes-xts-plain64 ${key} 0 /mem/a 0 2 allow_discards`,
      /crypt <#opt_params>: says 2 optional parameters but 1 follow/,
    ],
    [
      `0 8 crypt aes-xts-plain64 ${key} 0 /mem/a 0 10 a b c d e f g h i j`,
      /crypt <#opt_params>: 10 is more than the 9 optional parameters/,
    ],
    [`0 8 crypt aes-xts-plain64 ${key} 0 /mem/a 0 1 fast`, /crypt <opt_params>: unknown optional parameter 'fast'/],
    [
      `0 8 crypt aes-xts-plain64 ${key} 0 /mem/a 0 1 high_priority`,
      /crypt <opt_params>: 'high_priority' is not supported by cryptmap yet/,
    ],
    [
      `0 8 crypt aes-xts-plain64 ${key} 0 /mem/a 0 1 integrity:28:aead`,
      /crypt <opt_params>: 'integrity:28:aead' is not supported by cryptmap yet/,
    ],
    [`0 8 crypt aes-xts-plain64 ${key} 0 /mem/a 0 1 integrity_key_size:32`, /'integrity_key_size:32' is not supported/],
    [
      `0 8 crypt aes-xts-plain64 ${key} 0 /mem/a 0 1 sector_size:1000`,
      /'sector_size:1000': sector_size must be a power of two from 512 to 4096/,
    ],
    [
      `0 8 crypt aes-xts-plain64 ${key} 0 /mem/a 0 1 sector_size:8192`,
      /sector_size must be a power of two from 512 to 4096/,
    ],
    [
      `0 8 crypt aes-xts-plain64 ${key} 4 /mem/a 0 1 sector_size:4096`,
      /crypt <iv_offset>: 4 is not a multiple of sector_size\/512 \(8\)/,
    ],
    [
      `0 8 crypt aes-xts-plain64 ${key} 0 /mem/a 4 1 sector_size:4096`,
      /crypt <offset>: 4 is not a multiple of sector_size\/512 \(8\)/,
    ],
    [
      `0 12 crypt aes-xts-plain64 ${key} 0 /mem/a 0 1 sector_size:4096`,
      /crypt <opt_params>: the target length 12 is not a multiple of sector_size\/512 \(8\)/,
    ],
    [`0 4096 crypt aes-xts-plain64 ${key} 0 /mem/a 0`, /crypt <dev>: device \/mem\/a is too small/],
    [
      `0 8 crypt aes-xts-plain64 :64:bogus:k 0 /mem/a 0`,
      /crypt <key>: a key reference must look like ':<bytes>:<logon\|user\|encrypted\|trusted>:<description>'/,
    ],
    [
      `0 8 crypt aes-xts-plain64 :64:logon:k 0 /mem/a 0`,
      /crypt <key>: no key store is configured to resolve the key reference ':64:logon:k'/,
    ],
    [
      `0 4 zero\n4 8 crypt aes-xts-plain64 ${key} 0 /mem/a 0 1 sector_size:4096`,
      /table line 1: zero: <start> and <length> must be multiples of the table's logical block size \(4096 bytes = 8 sectors\)/,
    ],
  ];
  for (const [text, re] of cases) {
    await assert.rejects(registry.create('x', { table: text }), re, text);
    assert.equal(registry.find('x'), undefined, 'registry unchanged after a failed create');
  }
  for (const text of ['0 8 crypt aes-xts-plain64', `0 8 crypt aes-xts-plain64 ${key} 0 /mem/a 0 1 fast`]) {
    // Messages never contain key material.
    await assert.rejects(registry.create('x', { table: text }), (e: Error) => !e.message.includes(key));
  }
});

/** Build, format (keys shown), rebuild from the formatted text: the text must be a fixed point. */
async function roundTrip(text: string, expected?: string): Promise<void> {
  const { registry } = memRegistry({ a: MiB, b: MiB, c: MiB });
  const d1 = await registry.create('one', { table: text });
  const f1 = d1.liveTable!.format('table', true).join('\n');
  if (expected !== undefined) assert.equal(f1, expected);
  const d2 = await registry.create('two', { table: f1 });
  const f2 = d2.liveTable!.format('table', true).join('\n');
  assert.equal(f2, f1);
  const strip = (t: string) => parseTable(t).map(({ line: _l, ...rest }) => rest);
  assert.deepEqual(strip(f2), strip(f1));
  await registry.closeAll();
}

test('round trip for every target, canonical forms', async () => {
  const key = xtsKey(7).toString('hex');
  await roundTrip('0 2048 linear /mem/a 0');
  await roundTrip('0 1024 linear /mem/a 1024\n1024 8 zero\n1032 8 error');
  await roundTrip('0 2048 striped 2 8 /mem/a 0 /mem/b 1024');
  await roundTrip('0 1536 striped 3 512 /mem/a 0 /mem/b 0 /mem/c 0');
  await roundTrip(`0 2048 crypt aes-xts-plain64 ${key} 0 /mem/a 0`);
  await roundTrip(`0 1024 crypt aes-cbc-essiv:sha256 ${key.slice(0, 64)} 7 /mem/a 512 1 allow_discards`);
  await roundTrip('0 1024 crypt cipher_null-ecb - 0 /mem/a 0');
  // Non-canonical input comes back in the kernel's order, with sector_size:512 dropped.
  await roundTrip(
    `0 1024 crypt aes-xts-plain64 ${key.toUpperCase()} 16 /mem/a 8 7 iv_large_sectors no_write_workqueue sector_size:4096 no_read_workqueue submit_from_crypt_cpus same_cpu_crypt allow_discards`,
    `0 1024 crypt aes-xts-plain64 ${key} 16 /mem/a 8 7 allow_discards same_cpu_crypt submit_from_crypt_cpus no_read_workqueue no_write_workqueue sector_size:4096 iv_large_sectors`,
  );
  await roundTrip(
    `0 1024 crypt aes-xts-plain64 ${key} 0 /mem/a 0 1 sector_size:512`,
    `0 1024 crypt aes-xts-plain64 ${key} 0 /mem/a 0`,
  );
});

test('round trip for random tables (fast-check, seeded)', async () => {
  const key = xtsKey(9).toString('hex');
  const line = fc.oneof(
    fc
      .record({ t: fc.constant('zero'), len: fc.integer({ min: 1, max: 64 }) })
      .map((r) => ({ len: r.len * 8, args: 'zero' })),
    fc.record({ len: fc.integer({ min: 1, max: 64 }) }).map((r) => ({ len: r.len * 8, args: 'error' })),
    fc
      .record({ len: fc.integer({ min: 1, max: 64 }), off: fc.integer({ min: 0, max: 64 }) })
      .map((r) => ({ len: r.len * 8, args: `linear /mem/a ${r.off * 8}` })),
    fc
      .record({
        stripes: fc.integer({ min: 1, max: 3 }),
        chunkShift: fc.integer({ min: 3, max: 5 }),
        n: fc.integer({ min: 1, max: 4 }),
        off: fc.integer({ min: 0, max: 8 }),
      })
      .map((r) => {
        const chunk = 1 << r.chunkShift;
        const devs = ['/mem/a', '/mem/b', '/mem/c'].slice(0, r.stripes).map((d, i) => `${d} ${r.off * (i + 1)}`);
        return { len: chunk * r.stripes * r.n, args: `striped ${r.stripes} ${chunk} ${devs.join(' ')}` };
      }),
    fc
      .record({
        len: fc.integer({ min: 1, max: 64 }),
        iv: fc.bigInt({ min: 0n, max: (1n << 61n) - 1n }),
        flags: fc.subarray(['allow_discards', 'same_cpu_crypt', 'iv_large_sectors', 'sector_size:4096']),
      })
      .map((r) => {
        const opts = r.flags.length ? ` ${r.flags.length} ${r.flags.join(' ')}` : '';
        return { len: r.len * 8, args: `crypt aes-xts-plain64 ${key} ${r.iv * 8n} /mem/b 64${opts}` };
      }),
  );
  await fc.assert(
    fc.asyncProperty(fc.array(line, { minLength: 1, maxLength: 4 }), async (ls) => {
      let start = 0;
      const text = ls
        .map((l) => {
          const s = `${start} ${l.len} ${l.args}`;
          start += l.len;
          return s;
        })
        .join('\n');
      await roundTrip(text);
    }),
    { seed: 20261128, numRuns: 40 },
  );
});
