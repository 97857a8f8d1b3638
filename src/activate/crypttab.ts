/**
 * systemd crypttab(5) parsing (notes C12; systemd man/crypttab.xml):
 *
 *   <name> <device> [<key file> | none | - | /dev/urandom] [<option>[,<option>...]]
 *
 * - `#` starts a comment line; blank lines are skipped; fields are separated by spaces or tabs.
 * - device: an absolute path, an NBD URI (`nbd://host/export`, `nbd+unix:///export?socket=PATH`: the
 *   NBD client opens it), or `UUID=`, `PARTUUID=`, `LABEL=`, `PARTLABEL=` (resolved later,
 *   by whoever opens the entry).
 * - key: a file path, `none`/`-`/absent (ask for a passphrase), or `/dev/urandom` (and `/dev/random`,
 *   `/dev/hw_random`): a random key, allowed only for plain, swap and tmp.
 * - options: the table OPTIONS below. Options that only steer systemd's scheduling (`_netdev`,
 *   `x-systemd.*`, `timeout=`, ...) are accepted and listed in `ignored`; the activation flags
 *   (`discard`, `same-cpu-crypt`, `submit-from-crypt-cpus`, `no-read-workqueue`, `no-write-workqueue`:
 *   ./flags.ts) are applied to the mapping as `open`'s options are; volume types and features cryptmap does not implement (`tcrypt`, `bitlk`,
 *   `tpm2-device=`, `fido2-device=`, `pkcs11-uri=`, ...) are errors naming the option; any other
 *   option is an error (never guess).
 * Errors read `FILE:LINE: message` (code ECRYPTTAB). `resolveCrypttabKey` turns an entry's key field into
 * a volume key (plain) or a passphrase (LUKS) with cryptsetup's key file semantics (notes C8).
 *
 * `swap` and `tmp` imply plain mode and a fresh format at every open; plain defaults follow
 * systemd-cryptsetup: cipher aes-cbc-essiv:sha256, 256-bit key, hash ripemd160 only when the key is
 * typed (a key file is read raw: exactly key-size bytes).
 */
import { isNbdUri, parseNbdUri } from '../nbd-wire/uri.js';
import { randomBytes } from 'node:crypto';
import { type FileHandle, open, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { CryptmapError, fromSystemError } from '../util/errors.js';
import { Secret } from '../util/secret.js';
import { ACTIVATION_FLAGS, type ActivationFlags } from './flags.js';
import { plainKeyFromPassphrase } from './plain-key.js';

export type CrypttabType = 'luks' | 'plain' | 'swap' | 'tmp';

export type DeviceRef =
  | { kind: 'path'; path: string }
  | { kind: 'uuid' | 'partuuid' | 'label' | 'partlabel'; value: string };

export type KeySource = { kind: 'prompt' } | { kind: 'file'; path: string } | { kind: 'random'; path: string };

export interface CrypttabEntry {
  file: string;
  line: number;
  name: string;
  device: DeviceRef;
  key: KeySource;
  type: CrypttabType;
  cipher?: string;
  keySizeBits?: number;
  hash?: string;
  sectorSize?: number;
  /** Start of the data in the backing device (plain only), 512-byte sectors: the dm table `offset`. */
  offsetSectors?: number;
  /** IV skip (plain only), 512-byte sectors: the dm table `iv_offset` (the IV of the first data sector). */
  skipSectors?: number;
  keyfileOffset?: number;
  keyfileSize?: number;
  keySlot?: number;
  header?: string;
  /** File system made by `tmp` (default ext4). */
  tmpFilesystem?: string;
  /** The activation flags set by options (./flags.ts; absent = off), applied as `open`'s options. */
  flags: ActivationFlags;
  readonly: boolean;
  noauto: boolean;
  nofail: boolean;
  /** Passphrase attempts; 0 = unlimited (systemd default 3). */
  tries: number;
  /** Accepted options that do not concern cryptmap (scheduling, kernel workqueues). */
  ignored: string[];
}

/** The parameters a plain/swap/tmp entry opens with, defaults filled in. */
export interface PlainParams {
  cipher: string;
  keySizeBits: number;
  /** cryptsetup --hash value; `plain` = no hashing (key files, random keys). */
  hash: string;
  sectorSize: number;
  offsetSectors: number;
  skipSectors: number;
}

export const SYSTEMD_PLAIN_CIPHER = 'aes-cbc-essiv:sha256';
export const SYSTEMD_PLAIN_KEY_BITS = 256;
export const SYSTEMD_PLAIN_HASH = 'ripemd160';
const RANDOM_KEY_FILES = new Set(['/dev/urandom', '/dev/random', '/dev/hw_random']);

interface Ctx {
  e: CrypttabEntry;
  types: Set<CrypttabType>;
  fail(msg: string): never;
}

type OptionSpec = {
  value: 'none' | 'required' | 'optional';
  apply(ctx: Ctx, value: string | undefined, name: string): void;
};

function uint(ctx: Ctx, name: string, v: string, max = 0xffffffff): number {
  if (!/^[0-9]{1,10}$/.test(v) || Number(v) > max) ctx.fail(`option ${name}= needs an unsigned number, got '${v}'`);
  return Number(v);
}

const flag = (f: 'readonly' | 'noauto' | 'nofail', on: boolean): OptionSpec => ({
  value: 'none',
  apply: (c) => {
    c.e[f] = on;
  },
});
const typeOpt = (t: CrypttabType): OptionSpec => ({
  value: t === 'tmp' ? 'optional' : 'none',
  apply: (c, v) => {
    c.types.add(t);
    if (t === 'tmp') {
      if (v !== undefined && !/^[a-z0-9]+$/.test(v)) c.fail(`option tmp= needs a file system type, got '${v}'`);
      c.e.tmpFilesystem = v ?? 'ext4';
    }
  },
});
const ignore: OptionSpec = {
  value: 'optional',
  apply: (c, v, name) => {
    c.e.ignored.push(v === undefined ? name : `${name}=${v}`);
  },
};
const unsupported = (why: string): OptionSpec => ({
  value: 'optional',
  apply: (c, _v, name) => c.fail(`option '${name}' is not supported: ${why}`),
});

/** Every option cryptmap knows, keyed by its crypttab spelling. */
const OPTIONS: Record<string, OptionSpec> = {
  luks: typeOpt('luks'),
  plain: typeOpt('plain'),
  swap: typeOpt('swap'),
  tmp: typeOpt('tmp'),
  cipher: {
    value: 'required',
    apply: (c, v) => {
      if (!/^[A-Za-z0-9:()_,-]+$/.test(v!)) c.fail(`option cipher= '${v}' is not a cipher specification`);
      c.e.cipher = v;
    },
  },
  size: {
    value: 'required',
    apply: (c, v) => {
      const n = uint(c, 'size', v!, 4096);
      if (n === 0 || n % 8 !== 0)
        c.fail(`option size= is the key size in bits and must be a positive multiple of 8, got ${n}`);
      c.e.keySizeBits = n;
    },
  },
  hash: {
    value: 'required',
    apply: (c, v) => {
      if (!/^[a-z0-9-]+(:[0-9]+)?$/i.test(v!)) c.fail(`option hash= '${v}' is not a hash name`);
      c.e.hash = v;
    },
  },
  'sector-size': {
    value: 'required',
    apply: (c, v) => {
      const n = uint(c, 'sector-size', v!);
      if (n < 512 || n > 4096 || (n & (n - 1)) !== 0)
        c.fail(`option sector-size= must be a power of two from 512 to 4096, got ${n}`);
      c.e.sectorSize = n;
    },
  },
  offset: {
    value: 'required',
    apply: (c, v) => void (c.e.offsetSectors = uint(c, 'offset', v!, Number.MAX_SAFE_INTEGER)),
  },
  skip: { value: 'required', apply: (c, v) => void (c.e.skipSectors = uint(c, 'skip', v!, Number.MAX_SAFE_INTEGER)) },
  'keyfile-offset': {
    value: 'required',
    apply: (c, v) => void (c.e.keyfileOffset = uint(c, 'keyfile-offset', v!, Number.MAX_SAFE_INTEGER)),
  },
  'keyfile-size': {
    value: 'required',
    apply: (c, v) => {
      const n = uint(c, 'keyfile-size', v!, 8192 * 1024);
      if (n === 0) c.fail('option keyfile-size= must be positive');
      c.e.keyfileSize = n;
    },
  },
  'key-slot': { value: 'required', apply: (c, v) => void (c.e.keySlot = uint(c, 'key-slot', v!, 31)) },
  header: {
    value: 'required',
    apply: (c, v) => {
      if (!v!.startsWith('/')) c.fail(`option header= needs an absolute path, got '${v}'`);
      c.e.header = v;
    },
  },
  tries: { value: 'required', apply: (c, v) => void (c.e.tries = uint(c, 'tries', v!, 1000)) },
  readonly: flag('readonly', true),
  'read-only': flag('readonly', true),
  noauto: flag('noauto', true),
  auto: flag('noauto', false),
  nofail: flag('nofail', true),
  fail: flag('nofail', false),
  // Scheduling and kernel tuning: meaningful to systemd or dm-crypt only.
  _netdev: ignore,
  'x-initrd.attach': ignore,
  timeout: ignore,
  'keyfile-timeout': ignore,
  headless: ignore,
  // Activation flags (./flags.ts), as `open --allow-discards`, `--perf-same_cpu_crypt`...
  ...Object.fromEntries(
    ACTIVATION_FLAGS.map((f): [string, OptionSpec] => [
      f.crypttab,
      {
        value: 'none',
        apply: (c) => {
          c.e.flags[f.field] = true;
        },
      },
    ]),
  ),
  // Not implemented: named so the error says what and why.
  tcrypt: unsupported('TrueCrypt/VeraCrypt volumes are not implemented (use luks or plain)'),
  'tcrypt-hidden': unsupported('TrueCrypt/VeraCrypt volumes are not implemented'),
  'tcrypt-system': unsupported('TrueCrypt/VeraCrypt volumes are not implemented'),
  'tcrypt-keyfile': unsupported('TrueCrypt/VeraCrypt volumes are not implemented'),
  'tcrypt-veracrypt': unsupported('TrueCrypt/VeraCrypt volumes are not implemented'),
  'veracrypt-pim': unsupported('TrueCrypt/VeraCrypt volumes are not implemented'),
  bitlk: unsupported('BitLocker volumes are not implemented (use luks or plain)'),
  'tpm2-device': unsupported('TPM2 enrollment is not implemented; use a key file or the cryptmap key service'),
  'tpm2-pcrs': unsupported('TPM2 enrollment is not implemented'),
  'tpm2-pin': unsupported('TPM2 enrollment is not implemented'),
  'tpm2-signature': unsupported('TPM2 enrollment is not implemented'),
  'tpm2-measure-pcr': unsupported('TPM2 enrollment is not implemented'),
  'tpm2-measure-bank': unsupported('TPM2 enrollment is not implemented'),
  'tpm2-pcrlock': unsupported('TPM2 enrollment is not implemented'),
  'fido2-device': unsupported('FIDO2 tokens are not implemented; use a key file or the cryptmap key service'),
  'fido2-cid': unsupported('FIDO2 tokens are not implemented'),
  'fido2-rp': unsupported('FIDO2 tokens are not implemented'),
  'pkcs11-uri': unsupported('PKCS#11 tokens are not implemented; use a key file or the cryptmap key service'),
  'token-timeout': unsupported('LUKS2 tokens (TPM2, FIDO2, PKCS#11) are not implemented'),
  'try-empty-password': unsupported('empty passphrases are not tried'),
  verify: unsupported('passphrases are not read twice (no interactive prompt in cryptmap crypttab)'),
  'password-echo': unsupported('no interactive prompt in cryptmap crypttab'),
  'keyfile-erase': unsupported('cryptmap never deletes key files'),
  'link-volume-key': unsupported('the kernel keyring is not used'),
  'fixate-volume-key': unsupported('fixate-volume-key is not implemented'),
  integrity: unsupported('dm-integrity is not implemented'),
  loopaes: unsupported('loop-AES volumes are not implemented'),
};

function parseDevice(ctx: Ctx, s: string): DeviceRef {
  if (isNbdUri(s)) {
    try {
      parseNbdUri(s);
    } catch (e) {
      ctx.fail((e as Error).message);
    }
    return { kind: 'path', path: s };
  }
  const m = /^(UUID|PARTUUID|LABEL|PARTLABEL)=(.+)$/.exec(s);
  if (m) return { kind: m[1]!.toLowerCase() as 'uuid', value: m[2]! };
  if (/^[A-Z]+=/.test(s))
    ctx.fail(`device '${s}': only UUID=, PARTUUID=, LABEL=, PARTLABEL= or an absolute path are understood`);
  if (!s.startsWith('/')) ctx.fail(`device '${s}' must be an absolute path or UUID=/PARTUUID=/LABEL=/PARTLABEL=`);
  return { kind: 'path', path: s };
}

function parseKey(ctx: Ctx, s: string | undefined): KeySource {
  if (s === undefined || s === 'none' || s === '-') return { kind: 'prompt' };
  if (RANDOM_KEY_FILES.has(s)) return { kind: 'random', path: s };
  if (!s.startsWith('/')) ctx.fail(`key file '${s}' must be an absolute path, 'none', '-' or /dev/urandom`);
  return { kind: 'file', path: s };
}

/** Ordered checks on a parsed entry: each names the option at fault. */
function validate(ctx: Ctx): void {
  const { e, types } = ctx;
  if (types.has('luks') && types.size > 1) ctx.fail(`options ${[...types].join(' and ')} contradict each other`);
  if (types.has('swap') && types.has('tmp')) ctx.fail('options swap and tmp contradict each other');
  e.type = types.has('swap') ? 'swap' : types.has('tmp') ? 'tmp' : types.has('plain') ? 'plain' : 'luks';
  if (e.type === 'luks') {
    if (e.key.kind === 'random')
      ctx.fail(
        `a random key (${e.key.path}) makes sense only for plain, swap or tmp: a LUKS volume would be unreadable`,
      );
    for (const [k, v] of [
      ['offset', e.offsetSectors],
      ['skip', e.skipSectors],
      ['hash', e.hash],
    ] as const) {
      if (v !== undefined) ctx.fail(`option ${k}= applies to plain devices only (LUKS keeps it in its header)`);
    }
  } else {
    if (e.keySlot !== undefined) ctx.fail('option key-slot= applies to LUKS devices only');
    if (e.header !== undefined) ctx.fail('option header= applies to LUKS devices only');
    if ((e.type === 'swap' || e.type === 'tmp') && e.readonly)
      ctx.fail(`option read-only contradicts ${e.type} (formatted at every open)`);
  }
  if (e.sectorSize !== undefined && e.offsetSectors !== undefined && e.offsetSectors % (e.sectorSize / 512) !== 0) {
    ctx.fail(`option offset=${e.offsetSectors} is not a multiple of sector-size=${e.sectorSize} (in 512-byte sectors)`);
  }
}

/** Parse a whole crypttab file. `file` is used in error messages only. */
export function parseCrypttab(text: string, file = 'crypttab'): CrypttabEntry[] {
  const out: CrypttabEntry[] = [];
  const names = new Map<string, number>();
  text.split('\n').forEach((raw, i) => {
    const line = i + 1;
    const s = raw.replace(/\r$/, '').trim();
    if (s === '' || s.startsWith('#')) return;
    const fail = (msg: string): never => {
      throw new CryptmapError('ECRYPTTAB', `${file}:${line}: ${msg}`, { context: { file, line } });
    };
    const fields = s.split(/[ \t]+/);
    if (fields.length < 2) fail('needs at least a name and a device');
    if (fields.length > 4)
      fail(
        `has ${fields.length} fields; expected name, device, key file, options (options are comma-separated, without spaces)`,
      );
    const [name, dev, keyField, opts] = fields as [string, string, string?, string?];
    if (!/^[A-Za-z0-9][A-Za-z0-9._+@-]{0,126}$/.test(name))
      fail(`name '${name}' must be letters, digits and . _ + @ - (no '/')`);
    if (names.has(name)) fail(`name '${name}' was already used on line ${names.get(name)}`);
    names.set(name, line);
    const e: CrypttabEntry = {
      file,
      line,
      name,
      device: { kind: 'path', path: '' },
      key: { kind: 'prompt' },
      type: 'luks',
      flags: {},
      readonly: false,
      noauto: false,
      nofail: false,
      tries: 3,
      ignored: [],
    };
    const ctx: Ctx = { e, types: new Set(), fail };
    e.device = parseDevice(ctx, dev);
    e.key = parseKey(ctx, keyField);
    if (opts !== undefined && opts !== '' && opts !== '-' && opts !== 'none') {
      for (const o of opts.split(',')) {
        if (o === '') fail('empty option (two commas in a row?)');
        const eq = o.indexOf('=');
        const key = eq < 0 ? o : o.slice(0, eq);
        const value = eq < 0 ? undefined : o.slice(eq + 1);
        const spec: OptionSpec =
          (Object.hasOwn(OPTIONS, key) ? OPTIONS[key] : key.startsWith('x-systemd.') ? ignore : undefined) ??
          fail(`unknown option '${key}'`);
        if (spec.value === 'none' && value !== undefined) fail(`option '${key}' takes no value`);
        if (spec.value === 'required' && (value === undefined || value === '')) fail(`option '${key}=' needs a value`);
        spec.apply(ctx, value, key);
      }
    }
    validate(ctx);
    out.push(e);
  });
  return out;
}

/** The parameters a plain, swap or tmp entry opens with (systemd-cryptsetup defaults filled in). */
export function plainParams(e: CrypttabEntry): PlainParams {
  if (e.type === 'luks')
    throw new CryptmapError('ECRYPTTAB', `${e.file}:${e.line}: ${e.name} is a LUKS entry, not plain`);
  return {
    cipher: e.cipher ?? SYSTEMD_PLAIN_CIPHER,
    keySizeBits: e.keySizeBits ?? SYSTEMD_PLAIN_KEY_BITS,
    // Key files and random keys are used raw; a typed passphrase is hashed.
    hash: e.key.kind === 'prompt' ? (e.hash ?? SYSTEMD_PLAIN_HASH) : 'plain',
    sectorSize: e.sectorSize ?? 512,
    offsetSectors: e.offsetSectors ?? 0,
    skipSectors: e.skipSectors ?? 0,
  };
}

/** What an entry's key source yields: the volume key itself (plain, swap, tmp) or a passphrase (LUKS). */
export type CrypttabKey = { kind: 'volumeKey'; key: Secret } | { kind: 'passphrase'; passphrase: Secret };

export interface CrypttabKeyOptions {
  /** Asked when the key field is `none`/`-` and no key file is found in `keyDirs`. */
  askPassphrase?: (prompt: string) => Promise<Secret>;
  /** Where systemd looks for `<name>.key` when no key file is given. */
  keyDirs?: string[];
}

/** cryptsetup's compiled key file limit (`default-keyfile-size-maxkb` = 8192). */
export const KEYFILE_MAX_BYTES = 8192 * 1024;
export const SYSTEMD_KEY_DIRS = ['/etc/cryptsetup-keys.d', '/run/cryptsetup-keys.d'];

async function readKeyFile(e: CrypttabEntry, path: string, exact?: number): Promise<Buffer> {
  const where = `${e.file}:${e.line}: ${e.name}`;
  let fh: FileHandle;
  try {
    fh = await open(path, 'r');
  } catch (err) {
    throw fromSystemError('ECRYPTTAB_KEY', `${where}: cannot open key file ${path}`, err);
  }
  try {
    const offset = e.keyfileOffset ?? 0;
    // Without a size, read the whole file (up to the limit + 1, to notice a larger one): size the
    // buffer from the file rather than allocating 8 MiB for a 32-byte key (devices report size 0).
    let want = e.keyfileSize ?? exact ?? KEYFILE_MAX_BYTES + 1;
    if (e.keyfileSize === undefined && exact === undefined) {
      const st = await fh.stat();
      if (st.isFile()) want = Math.min(want, Math.max(0, st.size - offset));
    }
    const buf = Buffer.alloc(want);
    let got = 0;
    try {
      while (got < want) {
        const { bytesRead } = await fh.read(buf, got, want - got, offset + got);
        if (bytesRead === 0) break;
        got += bytesRead;
      }
    } catch (err) {
      buf.fill(0);
      throw fromSystemError('ECRYPTTAB_KEY', `${where}: cannot read key file ${path}`, err);
    }
    if (e.keyfileSize === undefined && exact === undefined && got > KEYFILE_MAX_BYTES) {
      buf.fill(0);
      throw new CryptmapError(
        'ECRYPTTAB_KEY',
        `${where}: key file ${path} is larger than ${KEYFILE_MAX_BYTES} bytes; set keyfile-size=`,
      );
    }
    const need = e.keyfileSize ?? exact;
    if (need !== undefined && got < need) {
      buf.fill(0);
      throw new CryptmapError(
        'ECRYPTTAB_KEY',
        `${where}: key file ${path} has ${got} bytes after keyfile-offset=${offset}; ${need} needed`,
      );
    }
    const out = Buffer.from(buf.subarray(0, got));
    buf.fill(0);
    return out;
  } finally {
    await fh.close();
  }
}

async function exists(p: string): Promise<boolean> {
  try {
    await stat(p);
    return true;
  } catch {
    return false;
  }
}

/**
 * Resolve an entry's key the way systemd-cryptsetup and cryptsetup do:
 * - random (`/dev/urandom`): a fresh volume key from the CSPRNG (plain, swap, tmp only);
 * - a key file: for LUKS the passphrase is the file's bytes (after keyfile-offset, at most
 *   keyfile-size, else the whole file up to 8 MiB); for plain the file is the volume key itself
 *   (exactly key-size bytes, no hashing);
 * - `none`: `<name>.key` in /etc/cryptsetup-keys.d or /run/cryptsetup-keys.d if present, else a
 *   typed passphrase (plain: hashed per `hash=`, default ripemd160; see plain-key.ts).
 */
export async function resolveCrypttabKey(e: CrypttabEntry, opts: CrypttabKeyOptions = {}): Promise<CrypttabKey> {
  const plain = e.type !== 'luks' ? plainParams(e) : undefined;
  const keyBytes = plain ? plain.keySizeBits / 8 : 0;
  if (e.key.kind === 'random') return { kind: 'volumeKey', key: new Secret(randomBytes(keyBytes)) };
  let file = e.key.kind === 'file' ? e.key.path : undefined;
  if (file === undefined) {
    for (const d of opts.keyDirs ?? SYSTEMD_KEY_DIRS) {
      const p = join(d, `${e.name}.key`);
      if (await exists(p)) {
        file = p;
        break;
      }
    }
  }
  if (file !== undefined) {
    const bytes = await readKeyFile(e, file, plain ? keyBytes : undefined);
    if (!plain) return { kind: 'passphrase', passphrase: new Secret(bytes) };
    if (bytes.length !== keyBytes) {
      bytes.fill(0);
      throw new CryptmapError(
        'ECRYPTTAB_KEY',
        `${e.file}:${e.line}: ${e.name}: keyfile-size=${e.keyfileSize} differs from the key size (${keyBytes} bytes)`,
      );
    }
    return { kind: 'volumeKey', key: new Secret(bytes) };
  }
  if (!opts.askPassphrase) {
    throw new CryptmapError(
      'ECRYPTTAB_KEY',
      `${e.file}:${e.line}: ${e.name} needs a passphrase and none can be asked for here`,
      { exitCode: 2 },
    );
  }
  const pass = await opts.askPassphrase(`Please enter passphrase for disk ${e.name}: `);
  if (!plain) return { kind: 'passphrase', passphrase: pass };
  try {
    return { kind: 'volumeKey', key: plainKeyFromPassphrase(pass.expose(), plain.hash, keyBytes) };
  } finally {
    pass.dispose();
  }
}
