/**
 * LUKS2 JSON metadata: the model, the JSON area rules and validation as an ordered list of named
 * checks (LUKS2 On-Disk Format Specification §2.2 "JSON area", §3 "LUKS2 JSON metadata format";
 * cryptsetup lib/luks2/luks2_json_metadata.c `LUKS2_hdr_validate`, luks2_disk_metadata.c
 * `validate_json_area`). Checks reject with the section and key that failed; they never repair.
 * u64 values are decimal strings; they are parsed with parseU64-like strictness.
 */
import { CryptmapError } from '../util/errors.js';
import { LUKS2_KEYSLOTS_MAX, LUKS2_MAX_KEYSLOTS_SIZE, LUKS2_SEGMENTS_MAX, LUKS2_TOKENS_MAX } from './constants.js';
import { LUKS2_HDR_BIN_LEN, LUKS2_HDR_SIZES } from './luks2-disk.js';

/** A keyslot's `area` object (where its key material lies and how it is encrypted). */
export interface L2Area {
  type: string;
  offset: string;
  size: string;
  encryption?: string;
  key_size?: number;
  [k: string]: unknown;
}
/** One `keyslots` entry of the LUKS2 JSON metadata. */
export interface L2Keyslot {
  type: string;
  key_size: number;
  af: { type: string; stripes: number; hash: string; [k: string]: unknown };
  area: L2Area;
  kdf: {
    type: string;
    salt: string;
    hash?: string;
    iterations?: number;
    time?: number;
    memory?: number;
    cpus?: number;
    [k: string]: unknown;
  };
  priority?: number;
  [k: string]: unknown;
}
/** One `segments` entry of the LUKS2 JSON metadata. */
export interface L2Segment {
  type: string;
  offset: string;
  size: string;
  iv_tweak?: string;
  encryption?: string;
  sector_size?: number;
  flags?: string[];
  integrity?: Record<string, unknown>;
  [k: string]: unknown;
}
/** One `digests` entry of the LUKS2 JSON metadata. */
export interface L2Digest {
  type: string;
  keyslots: string[];
  segments: string[];
  hash?: string;
  iterations?: number;
  salt?: string;
  digest?: string;
  [k: string]: unknown;
}
/** One `tokens` entry of the LUKS2 JSON metadata. */
export interface L2Token {
  type: string;
  keyslots: string[];
  [k: string]: unknown;
}
/** The `config` object of the LUKS2 JSON metadata (area sizes, flags, requirements). */
export interface L2Config {
  json_size: string;
  keyslots_size: string;
  flags?: string[];
  requirements?: { mandatory?: string[]; [k: string]: unknown };
  [k: string]: unknown;
}
/** The LUKS2 JSON metadata area, as the LUKS2 on-disk format specification defines it. */
export interface Luks2Json {
  keyslots: Record<string, L2Keyslot>;
  tokens: Record<string, L2Token>;
  segments: Record<string, L2Segment>;
  digests: Record<string, L2Digest>;
  config: L2Config;
  [k: string]: unknown;
}

const U64_MAX = 0xffffffffffffffffn;

/** Requirements cryptmap knows; anything else in requirements.mandatory blocks activation and changes. */
export const KNOWN_REQUIREMENTS: readonly string[] = [];

/**
 * The online reencryption requirements cryptsetup 2.6 knows (CRYPT_REQUIREMENT_ONLINE_REENCRYPT), at
 * the index of their metadata version: legacy `online-reencrypt` 1, then 2 and 3.
 */
const ONLINE_REENCRYPT_REQUIREMENTS: readonly string[] = [
  '',
  'online-reencrypt',
  'online-reencrypt-v2',
  'online-reencrypt-v3',
];
/** Every requirement cryptsetup 2.6 knows (luks2_json_metadata.c requirements_flags). */
const CRYPTSETUP_REQUIREMENTS: readonly string[] = ['offline-reencrypt', ...ONLINE_REENCRYPT_REQUIREMENTS.slice(1)];

/**
 * A requirement that names an online reencryption, known or of a later version (cryptsetup
 * reencrypt_candidate_flag: `online-reencrypt` or `online-reencrypt-v` and digits); one is allowed,
 * and a reencrypt keyslot needs one.
 */
function reencryptCandidate(x: unknown): boolean {
  return x === 'online-reencrypt' || (typeof x === 'string' && /^online-reencrypt-v[0-9]+$/.test(x));
}

/** True for an online reencryption requirement cryptsetup 2.6 knows (`online-reencrypt`, `-v2`, `-v3`). */
export function knownReencryptRequirement(x: unknown): boolean {
  return typeof x === 'string' && ONLINE_REENCRYPT_REQUIREMENTS.indexOf(x) > 0;
}

/**
 * The metadata version of the online reencryption `j` is in, when it carries a requirement for one
 * that cryptsetup 2.6 knows (LUKS2_config_get_reencrypt_version; others, such as a later version, are
 * unknown requirements and no reencryption); undefined otherwise.
 */
export function reencryptRequirementVersion(j: Luks2Json | Obj): number | undefined {
  const c = j.config;
  const m = isObj(c) && isObj(c.requirements) ? c.requirements.mandatory : undefined;
  if (!Array.isArray(m)) return undefined;
  const v = ONLINE_REENCRYPT_REQUIREMENTS.findIndex((r) => r !== '' && m.includes(r));
  return v < 0 ? undefined : v;
}

function fail(check: string, message: string, path?: string): never {
  throw new CryptmapError('ELUKS2JSON', `LUKS2 metadata invalid (${check}${path ? `: ${path}` : ''}): ${message}`, {
    context: { check, path },
  });
}

// ---- JSON area -------------------------------------------------------------------------------

/**
 * Extract the JSON text from a JSON area: it must start with '{', end at the first NUL byte and be
 * followed only by NUL bytes (validate_json_area). Returns the parsed value (not yet validated).
 */
export function parseJsonArea(area: Uint8Array): unknown {
  if (area.length === 0 || area[0] !== 0x7b) fail('json_area', "the JSON area does not start with '{'");
  const buf = Buffer.from(area.buffer, area.byteOffset, area.byteLength);
  const nul = buf.indexOf(0);
  if (nul < 0) fail('json_area', 'the JSON text is not NUL-terminated');
  for (let i = nul; i < buf.length; i++)
    if (buf[i] !== 0) fail('json_area', `non-NUL byte at JSON area offset ${i} after the JSON text`);
  const depth = nestingDepth(buf, nul);
  if (depth > JSON_MAX_NESTING)
    fail(
      'json_area',
      `JSON nested deeper than ${JSON_MAX_NESTING} levels (json-c's limit, which cryptsetup parses with)`,
    );
  let v: unknown;
  try {
    v = JSON.parse(buf.subarray(0, nul).toString('utf8'));
  } catch (e) {
    fail('json_area', `JSON does not parse (${(e as Error).message})`);
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) fail('json_area', 'the JSON text is not an object');
  return v;
}

/**
 * Deepest nesting of values that cryptsetup accepts: json-c's tokener (JSON_TOKENER_DEFAULT_DEPTH
 * 32) refuses a value 33 levels down, the top-level object being level 1 and an empty container
 * adding no level below it (cryptsetup 2.6 luksDump: `{"config":{"x":[[...[]...]]}}` loads with 30
 * arrays and is "not a valid LUKS device" with 31, or with 30 around a number). Checked before
 * JSON.parse, whose recursion a deep enough text exhausts ("Maximum call stack size exceeded").
 */
export const JSON_MAX_NESTING = 32;

/**
 * Level of the deepest value in `buf[0, end)` (strings skipped), as json-c counts it; stops once
 * past JSON_MAX_NESTING. Not a validator: JSON.parse judges the syntax afterwards.
 */
function nestingDepth(buf: Buffer, end: number): number {
  const open: number[] = []; // 0x7b '{' or 0x5b '['
  let max = 0;
  let inString = false;
  let valueNext = true; // the next token starts a value (not an object key)
  let emptyOk = false; // ...unless it closes an empty array
  for (let i = 0; i < end; i++) {
    const c = buf[i]!;
    if (inString) {
      if (c === 0x5c)
        i++; // backslash: skip the escaped byte
      else if (c === 0x22) inString = false;
      continue;
    }
    if (c === 0x20 || c === 0x09 || c === 0x0a || c === 0x0d) continue;
    if (valueNext && !(emptyOk && c === 0x5d)) {
      const level = open.length + 1;
      if (level > max && (max = level) > JSON_MAX_NESTING) return max;
    }
    valueNext = false;
    emptyOk = false;
    if (c === 0x22) inString = true;
    else if (c === 0x7b) open.push(c);
    else if (c === 0x5b) {
      open.push(c);
      valueNext = emptyOk = true;
    } else if (c === 0x7d || c === 0x5d) open.pop();
    else if (c === 0x3a) valueNext = true;
    else if (c === 0x2c && open[open.length - 1] === 0x5b) valueNext = true;
  }
  return max;
}

/** The compact on-disk text (json-c PLAIN|NOSLASHESCAPE: no whitespace, '/' not escaped). */
export function serializeJson(j: Luks2Json): string {
  return JSON.stringify(j);
}

/** The JSON area for a given metadata size: text then NUL bytes. */
export function buildJsonArea(j: Luks2Json, hdrSize: number): Buffer {
  const text = Buffer.from(serializeJson(j), 'utf8');
  const area = Buffer.alloc(hdrSize - LUKS2_HDR_BIN_LEN);
  if (text.length >= area.length)
    throw new CryptmapError('ELUKS2SPACE', 'Not enough space in header json area for new metadata.', {
      errno: 'ENOSPC',
    });
  text.copy(area);
  return area;
}

// ---- helpers ---------------------------------------------------------------------------------

type Obj = Record<string, unknown>;
function isObj(v: unknown): v is Obj {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}
function numbered(s: string): boolean {
  return /^[0-9]*$/.test(s);
}
/** strtoull semantics as cryptsetup uses them: decimal digits only, no overflow. */
export function u64(s: unknown): bigint | null {
  if (typeof s !== 'string' || !/^[0-9]+$/.test(s)) return null;
  const v = BigInt(s);
  return v > U64_MAX ? null : v;
}
function needObj(o: Obj, key: string, check: string, path: string): Obj {
  const v = o[key];
  if (!isObj(v)) fail(check, `missing "${key}" (object)`, path);
  return v;
}
function needStr(o: Obj, key: string, check: string, path: string): string {
  const v = o[key];
  if (typeof v !== 'string' || v.length < 1) fail(check, `missing "${key}" (string)`, path);
  return v;
}
function needInt(o: Obj, key: string, check: string, path: string): number {
  const v = o[key];
  if (typeof v !== 'number' || !Number.isInteger(v)) fail(check, `missing "${key}" (int)`, path);
  return v;
}
function needArr(o: Obj, key: string, check: string, path: string): unknown[] {
  const v = o[key];
  if (!Array.isArray(v)) fail(check, `missing "${key}" (array)`, path);
  return v;
}
function isU32(n: number): boolean {
  return n >= 0 && n <= 0xffffffff;
}
function refsExist(arr: unknown[], section: Obj, check: string, path: string): void {
  arr.forEach((r, i) => {
    if (typeof r !== 'string') fail(check, `illegal value type at index ${i}`, path);
    if (!isObj(section[r])) fail(check, `references missing ${r}`, path);
  });
}
function segmentIsBackup(s: Obj): boolean {
  const f = s.flags;
  return Array.isArray(f) && f.some((x) => typeof x === 'string' && x.startsWith('backup-'));
}

/** Keyslot, digest and token handlers validate their own type-specific fields. */
export interface TypeValidators {
  keyslot(type: string): ((ks: Obj, path: string) => void) | undefined;
  token(type: string): ((tok: Obj, path: string) => void) | undefined;
}

// ---- the checks (order as LUKS2_hdr_validate) -------------------------------------------------

interface Ctx {
  j: Obj;
  jsonAreaBytes: number;
  validators: TypeValidators | undefined;
}
type Check = { name: string; run(c: Ctx): void };

const CHECKS: Check[] = [
  {
    name: 'top_level',
    run({ j }) {
      for (const k of ['keyslots', 'tokens', 'segments', 'digests', 'config'])
        if (!isObj(j[k])) fail('top_level', `missing "${k}" (object)`);
    },
  },
  {
    name: 'requirements',
    run({ j }) {
      const config = j.config as Obj;
      if (!('requirements' in config)) return;
      const req = config.requirements;
      if (!isObj(req)) fail('requirements', 'requirements is not an object', 'config');
      if (!('mandatory' in req)) return;
      const m = req.mandatory;
      if (!Array.isArray(m)) fail('requirements', 'mandatory is not an array', 'config.requirements');
      let online = 0;
      for (const x of m) {
        if (typeof x !== 'string') fail('requirements', 'mandatory holds a non-string', 'config.requirements');
        if (reencryptCandidate(x)) online++;
      }
      if (online > 1) fail('requirements', 'multiple online reencryption requirement flags');
    },
  },
  {
    name: 'tokens',
    run({ j }) {
      const tokens = j.tokens as Obj;
      const keyslots = j.keyslots as Obj;
      const keys = Object.keys(tokens);
      if (keys.length > LUKS2_TOKENS_MAX) fail('tokens', 'too many tokens');
      for (const k of keys) {
        const p = `tokens.${k}`;
        if (!numbered(k)) fail('tokens', 'key is not in numbered form', p);
        const t = tokens[k];
        if (!isObj(t)) fail('tokens', 'not an object', p);
        needStr(t, 'type', 'tokens', p);
        refsExist(needArr(t, 'keyslots', 'tokens', p), keyslots, 'tokens', p);
      }
    },
  },
  {
    name: 'digests',
    run({ j }) {
      const digests = j.digests as Obj;
      for (const k of Object.keys(digests)) {
        const p = `digests.${k}`;
        if (!numbered(k)) fail('digests', 'key is not in numbered form', p);
        const d = digests[k];
        if (!isObj(d)) fail('digests', 'not an object', p);
        needStr(d, 'type', 'digests', p);
        const ks = needArr(d, 'keyslots', 'digests', p);
        const ss = needArr(d, 'segments', 'digests', p);
        refsExist(ks, j.keyslots as Obj, 'digests', p);
        refsExist(ss, j.segments as Obj, 'digests', p);
      }
    },
  },
  {
    name: 'segments',
    run({ j }) {
      const segments = j.segments as Obj;
      const keys = Object.keys(segments);
      if (keys.length < 1) fail('segments', 'empty segments section');
      if (keys.length > LUKS2_SEGMENTS_MAX) fail('segments', 'too many segments');
      let firstBackup = -1;
      for (const k of keys) {
        const p = `segments.${k}`;
        if (!numbered(k) || k === '') fail('segments', 'key is not in numbered form', p);
        const s = segments[k];
        if (!isObj(s)) fail('segments', 'not an object', p);
        const type = needStr(s, 'type', 'segments', p);
        const offStr = needStr(s, 'offset', 'segments', p);
        const sizeStr = needStr(s, 'size', 'segments', p);
        const offset = u64(offStr);
        if (offset === null) fail('segments', `illegal offset '${offStr}'`, p);
        let size = 0n;
        if (sizeStr !== 'dynamic') {
          const v = u64(sizeStr);
          if (v === null || v === 0n) fail('segments', `illegal size '${sizeStr}'`, p);
          size = v;
        }
        if (offset % 512n !== 0n) fail('segments', 'offset is not aligned to 512 bytes', p);
        if (size % 512n !== 0n) fail('segments', 'size is not aligned to 512 bytes', p);
        if ('flags' in s) {
          const f = s.flags;
          if (!Array.isArray(f) || f.some((x) => typeof x !== 'string'))
            fail('segments', 'flags must be an array of strings', p);
        }
        const i = Number(k);
        if (segmentIsBackup(s)) {
          if (firstBackup < 0 || i < firstBackup) firstBackup = i;
        } else if (firstBackup >= 0 && i >= firstBackup)
          fail('segments', `regular segment ${i} is behind backup segment ${firstBackup}`);
        if (type === 'crypt' || type === 'hw-opal-crypt') validateCryptSegment(s, p, size, j.digests as Obj, k);
      }
      if (firstBackup === 0) fail('segments', 'no regular segment');
      if (firstBackup >= keys.length)
        fail('segments', `gap between the regular segments and backup segment ${firstBackup}`);
      const regular = firstBackup < 0 ? keys.length : firstBackup;
      const iv: { offset: bigint; length: bigint }[] = [];
      for (let i = 0; i < regular; i++) {
        const s = segments[String(i)];
        if (!isObj(s)) fail('segments', `gap at key ${i}`);
        const size = s.size === 'dynamic' ? U64_MAX : u64(s.size)!;
        iv.push({ offset: u64(s.offset)!, length: size });
      }
      for (let i = 0; i < iv.length; i++) {
        const a = iv[i]!;
        if (a.length === U64_MAX && i !== iv.length - 1)
          fail('segments', 'only the last regular segment may have dynamic size');
        for (let k = 0; k < iv.length; k++) {
          if (k === i) continue;
          const b = iv[k]!;
          if (b.length !== U64_MAX && b.offset > U64_MAX - b.length) fail('segments', 'segment offset+size overflows');
          if (a.offset >= b.offset && (b.length === U64_MAX || a.offset < b.offset + b.length))
            fail('segments', `segments ${i} and ${k} overlap`);
        }
      }
      for (let i = regular; i < keys.length; i++) if (!isObj(segments[String(i)])) fail('segments', `gap at key ${i}`);
      if (reencryptRequirementVersion(j) !== undefined) reencryptSegmentsMatch(segments, regular, keys.length);
    },
  },
  {
    name: 'keyslots',
    run({ j }) {
      const keyslots = j.keyslots as Obj;
      if (Object.keys(keyslots).length > LUKS2_KEYSLOTS_MAX) fail('keyslots', 'too many keyslots');
      for (const k of Object.keys(keyslots)) {
        const p = `keyslots.${k}`;
        if (!numbered(k)) fail('keyslots', 'key is not in numbered form', p);
        const ks = keyslots[k];
        if (!isObj(ks)) fail('keyslots', 'not an object', p);
        needStr(ks, 'type', 'keyslots', p);
        const ksz = needInt(ks, 'key_size', 'keyslots', p);
        if (!isU32(ksz)) fail('keyslots', `illegal key_size ${ksz}`, p);
      }
    },
  },
  {
    name: 'config',
    run({ j }) {
      const config = j.config as Obj;
      const js = u64(needStr(config, 'json_size', 'config', 'config'));
      if (js === null) fail('config', 'illegal json_size', 'config');
      const kss = u64(needStr(config, 'keyslots_size', 'config', 'config'));
      if (kss === null) fail('config', 'illegal keyslots_size', 'config');
      const metadata = js + BigInt(LUKS2_HDR_BIN_LEN);
      if (!(LUKS2_HDR_SIZES as readonly number[]).map(BigInt).includes(metadata))
        fail('config', `unsupported metadata size ${metadata}`, 'config.json_size');
      if (kss % 4096n !== 0n || kss > BigInt(LUKS2_MAX_KEYSLOTS_SIZE))
        fail('config', `unsupported keyslots_size ${kss}`, 'config.keyslots_size');
      const segOff = minimalSegmentOffset(j.segments as Obj);
      if (segOff !== 0n && (segOff < kss || segOff - kss < 2n * metadata))
        fail('config', `keyslots_size ${kss} is too large for data offset ${segOff}`, 'config.keyslots_size');
      if ('flags' in config) {
        const f = config.flags;
        if (!Array.isArray(f) || f.some((x) => typeof x !== 'string'))
          fail('config', 'flags must be an array of strings', 'config.flags');
      }
    },
  },
  {
    name: 'areas',
    run({ j }) {
      const keyslots = j.keyslots as Obj;
      const config = j.config as Obj;
      const metadata = u64(config.json_size)! + BigInt(LUKS2_HDR_BIN_LEN);
      const end = 2n * metadata + u64(config.keyslots_size)!;
      const iv: { offset: bigint; length: bigint; k: string }[] = [];
      for (const k of Object.keys(keyslots)) {
        const p = `keyslots.${k}.area`;
        const area = needObj(keyslots[k] as Obj, 'area', 'areas', `keyslots.${k}`);
        needStr(area, 'type', 'areas', p);
        const o = u64(needStr(area, 'offset', 'areas', p));
        const l = u64(needStr(area, 'size', 'areas', p));
        if (o === null || l === null) fail('areas', 'illegal keyslot area values', p);
        iv.push({ offset: o, length: l, k });
      }
      for (const a of iv) {
        const p = `keyslots.${a.k}.area`;
        if (a.offset < 2n * metadata) fail('areas', `area offset ${a.offset} is inside the header`, p);
        if (a.length === 0n) fail('areas', 'area length must be greater than zero', p);
        if (a.offset > U64_MAX - a.length) fail('areas', 'area offset+size overflows', p);
        if (a.offset + a.length > end)
          fail('areas', `area [${a.offset}, ${a.offset + a.length}) overflows the keyslots area (ends at ${end})`, p);
        for (const b of iv) {
          if (a === b) continue;
          if (b.offset > U64_MAX - b.length) fail('areas', 'area offset+size overflows', `keyslots.${b.k}.area`);
          if (a.offset >= b.offset && a.offset < b.offset + b.length)
            fail('areas', `areas of keyslots ${a.k} and ${b.k} overlap`, p);
        }
      }
    },
  },
  {
    name: 'json_size',
    run({ j, jsonAreaBytes }) {
      const config = j.config as Obj;
      if (u64(config.json_size) !== BigInt(jsonAreaBytes))
        fail('json_size', 'JSON area size does not match the binary header', 'config.json_size');
      if (Buffer.byteLength(JSON.stringify(j), 'utf8') > jsonAreaBytes)
        fail('json_size', 'JSON does not fit in the designated area');
    },
  },
  {
    name: 'keyslot_types',
    run({ j, validators }) {
      const keyslots = j.keyslots as Obj;
      const digests = j.digests as Obj;
      let reencrypt = 0;
      for (const k of Object.keys(keyslots)) {
        const ks = keyslots[k] as Obj;
        const type = ks.type as string;
        const v = validators?.keyslot(type);
        if (!v) continue;
        v(ks, `keyslots.${k}`);
        if (type === 'luks2') {
          const n = Object.values(digests).filter(
            (d) => isObj(d) && Array.isArray(d.keyslots) && d.keyslots.includes(k),
          ).length;
          if (n !== 1) fail('keyslot_types', `keyslot ${k} is not assigned to exactly one digest`, `keyslots.${k}`);
        }
        if (type === 'reencrypt') reencrypt++;
      }
      // LUKS2_keyslots_validate: an online reencryption needs its keyslot, and the keyslot its requirement.
      if (validators && reencrypt === 0 && reencryptRequirementVersion(j) !== undefined)
        fail('keyslot_types', 'online reencryption requirement without a reencrypt keyslot');
      const mandatory = (j.config as L2Config).requirements?.mandatory ?? [];
      if (reencrypt > 0 && !mandatory.some(reencryptCandidate))
        fail('keyslot_types', 'reencrypt keyslot without an online reencryption requirement');
      if (reencrypt > 1) fail('keyslot_types', 'too many reencryption keyslots');
    },
  },
  {
    name: 'token_types',
    run({ j, validators }) {
      const tokens = j.tokens as Obj;
      for (const k of Object.keys(tokens)) {
        const t = tokens[k] as Obj;
        validators?.token(t.type as string)?.(t, `tokens.${k}`);
      }
    },
  },
];

/**
 * The segments of a header in online reencryption (validate_reencrypt_segments): a `backup-previous`
 * and a `backup-final` segment among the backups, and each regular segment like one of them (the one
 * `in-reencryption` like the final one): the same type and, crypt, the same cipher and sector size.
 */
function reencryptSegmentsMatch(segments: Obj, regular: number, count: number): void {
  let previous: Obj | undefined;
  let final: Obj | undefined;
  for (let i = regular; i < count; i++) {
    const s = segments[String(i)] as Obj;
    const f = s.flags as unknown[] | undefined;
    if (f?.includes('backup-final')) final = s;
    else if (f?.includes('backup-previous')) previous = s;
  }
  if (!final || !previous) fail('segments', 'a reencryption backup segment is missing');
  const like = (a: Obj, b: Obj) =>
    a.type === b.type && (a.type !== 'crypt' || (a.sector_size === b.sector_size && a.encryption === b.encryption));
  for (let i = 0; i < regular; i++) {
    const s = segments[String(i)] as Obj;
    const hot = (s.flags as unknown[] | undefined)?.includes('in-reencryption');
    if (hot ? !like(s, final) : !like(s, final) && !like(s, previous))
      fail(
        'segments',
        `segment ${i} is like neither the backup-previous nor the backup-final segment`,
        `segments.${i}`,
      );
  }
}

function validateCryptSegment(s: Obj, p: string, size: bigint, digests: Obj, key: string): void {
  const ivStr = needStr(s, 'iv_tweak', 'segments', p);
  needStr(s, 'encryption', 'segments', p);
  const ss = needInt(s, 'sector_size', 'segments', p);
  if ('integrity' in s) {
    const integ = s.integrity;
    if (!isObj(integ)) fail('segments', 'integrity is not an object', p);
    for (const f of ['type', 'journal_encryption', 'journal_integrity'])
      needStr(integ, f, 'segments', `${p}.integrity`);
  }
  // dm-crypt takes 512..4096, a power of two (LUKS2 spec: 512, 1024, 2048 or 4096). cryptsetup's
  // own validation checks only "non-zero multiple of 512" and fails later, at activation.
  if (ss !== 512 && ss !== 1024 && ss !== 2048 && ss !== 4096)
    fail('segments', `illegal sector_size ${ss} (must be 512, 1024, 2048 or 4096)`, p);
  if (u64(ivStr) === null) fail('segments', `illegal iv_tweak '${ivStr}'`, p);
  if (size % BigInt(ss) !== 0n) fail('segments', `size is not aligned to sector_size ${ss}`, p);
  const has = Object.values(digests).some((d) => isObj(d) && Array.isArray(d.segments) && d.segments.includes(key));
  if (!has) fail('segments', 'crypt segment is not assigned to a digest', p);
}

function minimalSegmentOffset(segments: Obj): bigint {
  let min: bigint | null = null;
  for (const s of Object.values(segments)) {
    if (!isObj(s) || segmentIsBackup(s)) continue;
    const o = u64(s.offset);
    if (o !== null && (min === null || o < min)) min = o;
  }
  return min ?? 0n;
}

/** Names of the checks in the order they run (for reports and tests). */
export const CHECK_NAMES: readonly string[] = CHECKS.map((c) => c.name);

/**
 * Validate parsed JSON metadata against the binary header's JSON area size. Throws ELUKS2JSON naming
 * the check and the key path; returns the value typed as Luks2Json.
 */
export function validateLuks2Json(j: unknown, jsonAreaBytes: number, validators?: TypeValidators): Luks2Json {
  if (!isObj(j)) fail('top_level', 'metadata is not an object');
  const ctx: Ctx = { j, jsonAreaBytes, validators };
  for (const c of CHECKS) c.run(ctx);
  return j as Luks2Json;
}

/** Sorted numeric ids of a section. */
export function ids(section: Record<string, unknown>): number[] {
  return Object.keys(section)
    .map(Number)
    .sort((a, b) => a - b);
}

/** Unknown mandatory requirements (refuse activation and changes when non-empty). */
export function unknownRequirements(j: Luks2Json): string[] {
  const m = j.config.requirements?.mandatory ?? [];
  return m.filter((x) => !KNOWN_REQUIREMENTS.includes(x));
}

/**
 * Why `j`'s requirements refuse an operation that a reencryption in progress allows (activating or
 * repairing it; cryptsetup LUKS2_unmet_requirements with the online reencryption masked): one cryptsetup
 * 2.6 does not know, or the legacy offline reencryption. Undefined when none does.
 */
export function unmetReencryptRequirement(j: Luks2Json): string | undefined {
  const m = j.config.requirements?.mandatory ?? [];
  if (m.some((x) => !CRYPTSETUP_REQUIREMENTS.includes(x))) return 'Unmet LUKS2 requirements detected.';
  if (m.includes('offline-reencrypt'))
    return 'Operation incompatible with device marked for legacy reencryption. Aborting.';
  return undefined;
}

/** The lowest id not yet used in a keyslots, digests, segments or tokens object. */
export function firstFreeId(objects: Record<string, unknown>): number {
  let id = 0;
  while (objects[String(id)] !== undefined) id++;
  return id;
}
