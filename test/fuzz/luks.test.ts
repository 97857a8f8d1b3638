// Fuzz targets for the LUKS loaders. Base images come from our own luksFormat (cheap PBKDF2);
// inputs are the header areas (LUKS2: both copies; LUKS1: the first 4 KiB) after bit flips, byte
// overwrites and truncation, and, for LUKS2, JSON mutations with the checksums fixed up so they get
// past the checksum and reach the validator. Each input is loaded, dumped, and (when its KDF costs
// stay small, so a mutated iteration count cannot stall the run) unlocked with the right and a
// wrong passphrase.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import { dumpJson, dumpLuks1, dumpLuks2 } from '../../src/cli/commands/luks-dump.js';
import { decodeLuks1, Luks1Volume, Luks2Volume, openLuks } from '../../src/luks/index.js';
import { computeChecksum, LUKS2_HDR_BIN_LEN, setChecksum } from '../../src/luks/luks2-disk.js';
import { type FuzzFn, fuzz, mutations } from './harness.js';

const T = { timeout: 180_000 };
const FAST = { type: 'pbkdf2', hash: 'sha256', iterations: 1000 } as const;
const PASS = Buffer.from('fuzz passphrase');
const IMG_BYTES = 3 << 20;
const HDR = 0x4000;

interface Base {
  image: Buffer;
  /** Bytes the inputs cover (from offset 0). */
  areaBytes: number;
}

async function makeBase(kind: 'luks1' | 'luks2'): Promise<Base> {
  const dev = new MemoryDevice({ sizeBytes: IMG_BYTES });
  if (kind === 'luks2') {
    const v = await Luks2Volume.format(dev, PASS, {
      keyslot: { kdf: FAST },
      offsetBytes: 2 << 20,
      keyslotsBytes: (2 << 20) - 2 * HDR,
      digestIterations: 1000,
      label: 'fz',
    });
    await v.addKey({ passphrase: PASS }, Buffer.from('second'), {
      kdf: { type: 'argon2id', time: 1, memoryKiB: 64, parallel: 1 },
    });
    await v.importToken('{"type":"fuzz","keyslots":["0"],"x":[1,{"y":null}]}');
  } else {
    const v = await Luks1Volume.format(dev, PASS, { keyslot: { kdf: FAST }, keyBytes: 32 });
    await v.addKey({ passphrase: PASS }, Buffer.from('second'), { kdf: FAST });
  }
  const image = Buffer.alloc(IMG_BYTES);
  await dev.read(0, image);
  return { image, areaBytes: kind === 'luks2' ? 2 * HDR : 4096 };
}

const KDF_LIMITS = { iterations: 200_000, memory: 1 << 17, time: 8, cpus: 8 };

/** True when every KDF cost in a LUKS2 JSON area is small enough to run in a test. */
function cheapLuks2(jsonArea: Buffer): boolean {
  let j: unknown;
  try {
    const nul = jsonArea.indexOf(0);
    j = JSON.parse(jsonArea.subarray(0, nul < 0 ? jsonArea.length : nul).toString('utf8'));
  } catch {
    return true; // the loader refuses it anyway
  }
  let ok = true;
  const walk = (v: unknown): void => {
    if (Array.isArray(v)) v.forEach(walk);
    else if (v && typeof v === 'object') {
      for (const [k, x] of Object.entries(v)) {
        if (k in KDF_LIMITS && (typeof x !== 'number' || x > KDF_LIMITS[k as keyof typeof KDF_LIMITS])) ok = false;
        walk(x);
      }
    }
  };
  walk(j);
  return ok;
}

function target(base: Base): FuzzFn {
  return async (input) => {
    const img = Buffer.from(base.image);
    input.copy(img, 0, 0, Math.min(input.length, base.areaBytes));
    // Truncated inputs leave zeros, not the old header, behind them.
    if (input.length < base.areaBytes) img.fill(0, input.length, base.areaBytes);
    const dev = new MemoryDevice({ sizeBytes: IMG_BYTES });
    await dev.write(0, img);
    const v = await openLuks(dev);
    if (v instanceof Luks2Volume) dumpLuks2(v);
    else dumpLuks1(v, '/dev/fuzz');
    JSON.stringify(dumpJson(v));
    void v.dataSegment;
    v.keyslots();
    let cheap: boolean;
    if (v instanceof Luks2Volume)
      cheap =
        cheapLuks2(img.subarray(LUKS2_HDR_BIN_LEN, HDR)) && cheapLuks2(img.subarray(HDR + LUKS2_HDR_BIN_LEN, 2 * HDR));
    else {
      const h = decodeLuks1(img);
      cheap =
        h.mkDigestIterations <= KDF_LIMITS.iterations && h.keyblock.every((k) => k.iterations <= KDF_LIMITS.iterations);
    }
    if (!cheap) return;
    const r = await v.unlock(Buffer.from('wrong'));
    r.volumeKey.dispose();
    assert.fail('a mutated header unlocked with a wrong passphrase');
  };
}

/** Run a target, mapping "no key" (expected for the wrong passphrase) to success. */
function lenient(fn: FuzzFn): FuzzFn {
  return async (b) => {
    try {
      await fn(b);
    } catch (e) {
      if ((e as { code?: string }).code === 'ENOKEY') return;
      throw e;
    }
  };
}

/** Structured JSON edits on a LUKS2 area pair, checksums recomputed so the validator sees them. */
function luks2JsonMutations(base: Base): fc.Arbitrary<Buffer> {
  const area = base.image.subarray(LUKS2_HDR_BIN_LEN, HDR);
  const text = area.subarray(0, area.indexOf(0)).toString('utf8');
  const json = JSON.parse(text) as Record<string, unknown>;
  const paths: string[][] = [];
  const collect = (v: unknown, p: string[]) => {
    paths.push(p);
    if (v && typeof v === 'object') for (const [k, x] of Object.entries(v)) collect(x, [...p, k]);
  };
  collect(json, []);
  const odd = fc.oneof(
    fc.constantFrom<unknown>(
      null,
      true,
      0,
      -1,
      1.5,
      '',
      '-1',
      '0',
      '1',
      '4096',
      '18446744073709551615',
      '18446744073709551616',
      '9007199254740993',
      'dynamic',
      '00',
      ' 1',
      '1e3',
      'aes-xts-plain64',
      'pbkdf2',
      'argon2id',
      'luks2',
      'sha256',
      'crypt',
      'raw',
      [],
      {},
      ['0'],
      ['99'],
      { '0': {} },
    ),
    fc.jsonValue({ maxDepth: 2 }),
    fc.string({ maxLength: 20 }),
    fc.integer(),
  );
  const edit = fc.record({
    path: fc.constantFrom(...paths.filter((p) => p.length > 0)),
    kind: fc.constantFrom('set', 'delete', 'add'),
    value: odd,
    key: fc.constantFrom('0', '1', '31', '32', 'x', '__proto__', 'type', 'size', 'offset'),
  });
  return fc.array(edit, { minLength: 1, maxLength: 4 }).map((edits) => {
    const j = structuredClone(json);
    for (const e of edits) {
      let parent: Record<string, unknown> = j;
      for (const k of e.path.slice(0, -1)) {
        const next = parent[k];
        if (!next || typeof next !== 'object') return encodePair(base, JSON.stringify(j));
        parent = next as Record<string, unknown>;
      }
      const last = e.path[e.path.length - 1] as string;
      if (e.kind === 'set') parent[last] = e.value;
      else if (e.kind === 'delete') delete parent[last];
      else {
        const tgt = parent[last];
        if (tgt && typeof tgt === 'object' && !Array.isArray(tgt))
          Object.defineProperty(tgt, e.key, { value: e.value, enumerable: true, writable: true, configurable: true });
      }
    }
    return encodePair(base, JSON.stringify(j));
  });
}

/** Both header copies with `jsonText` in their JSON areas and valid checksums. */
function encodePair(base: Base, jsonText: string): Buffer {
  const out = Buffer.from(base.image.subarray(0, 2 * HDR));
  for (const off of [0, HDR]) {
    const areaBytes = HDR - LUKS2_HDR_BIN_LEN;
    const area = Buffer.alloc(areaBytes);
    Buffer.from(jsonText).copy(area, 0, 0, areaBytes - 1);
    area.copy(out, off + LUKS2_HDR_BIN_LEN);
    fixChecksum(out, off);
  }
  return out;
}

function fixChecksum(buf: Buffer, off: number): void {
  const bin = buf.subarray(off, off + LUKS2_HDR_BIN_LEN);
  const area = buf.subarray(off + LUKS2_HDR_BIN_LEN, off + HDR);
  setChecksum(bin, computeChecksum('sha256', bin, area));
}

/** Byte mutations of the binary headers, with the checksums fixed up half of the time. */
function luks2BinMutations(base: Base): fc.Arbitrary<Buffer> {
  const hot: [number, number][] = [
    [0, 512],
    [HDR, HDR + 512],
  ];
  return fc.tuple(mutations(base.image.subarray(0, 2 * HDR), { hot }), fc.boolean()).map(([b, fix]) => {
    if (fix && b.length === 2 * HDR) {
      fixChecksum(b, 0);
      fixChecksum(b, HDR);
    }
    return b;
  });
}

let luks2: Base | undefined;
let luks1: Base | undefined;
export async function luks2Fuzz(): Promise<{ fn: FuzzFn; arb: fc.Arbitrary<Buffer> }> {
  luks2 ??= await makeBase('luks2');
  return {
    fn: lenient(target(luks2)),
    arb: fc.oneof(
      luks2JsonMutations(luks2),
      luks2BinMutations(luks2),
      mutations(luks2.image.subarray(LUKS2_HDR_BIN_LEN, 2 * HDR), { maxEdits: 3 }).map((m) =>
        Buffer.concat([luks2!.image.subarray(0, LUKS2_HDR_BIN_LEN), m]),
      ),
    ),
  };
}
export async function luks1Fuzz(): Promise<{ fn: FuzzFn; arb: fc.Arbitrary<Buffer> }> {
  luks1 ??= await makeBase('luks1');
  return { fn: lenient(target(luks1)), arb: mutations(luks1.image.subarray(0, 4096), { hot: [[0, 592]] }) };
}

test('fuzz: LUKS2 loader (binary header and JSON)', T, async () => {
  const { fn, arb } = await luks2Fuzz();
  await fuzz('luks2', arb, fn, { seed: 0x1c2, numRuns: 150 });
});

test('fuzz: LUKS1 loader', T, async () => {
  const { fn, arb } = await luks1Fuzz();
  await fuzz('luks1', arb, fn, { seed: 0x1c1, numRuns: 200 });
});
