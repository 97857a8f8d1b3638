/**
 * The cryptmap manifest (docs/manifest.md): YAML naming services, their scratch volumes, swap areas
 * and the key service. Parsed with `yaml` (keeping source positions), validated against
 * MANIFEST_SCHEMA with ajv, then by ordered semantic checks. Every error reads
 * `FILE:LINE: field.path: message`, e.g.
 * `manifest.yaml:12: services[1].volumes[0].size: must be a size like 512M or 2G`.
 */
import { readFile } from 'node:fs/promises';
import { posix } from 'node:path';
import { Ajv, type ErrorObject } from 'ajv';
import { isMap, isPair, isScalar, isSeq, LineCounter, type Node, parseDocument } from 'yaml';
import { parseNbdUri } from '../nbd-wire/uri.js';
import { CryptmapError, fromSystemError } from '../util/errors.js';
import { MANIFEST_SCHEMA } from './manifest-schema.js';

export type VolumeClass = 'ephemeral' | 'persistent';
export type Filesystem = 'ext4' | 'ext3' | 'ext2' | 'none';

export const DEFAULT_CIPHER = 'aes-xts-plain64';
export const DEFAULT_KEY_BITS = 512;
export const DEFAULT_SECTOR_SIZE = 4096;
export const MIN_VOLUME_BYTES = 1024 * 1024;

/** Pool data block size by default (the kernel's minimum, 128 sectors). */
export const DEFAULT_POOL_BLOCK_BYTES = 64 * 1024;
const POOL_BLOCK_MIN_BYTES = 64 * 1024;
const POOL_BLOCK_MAX_BYTES = 1 << 30;
const POOL_METADATA_MIN_BYTES = 2 << 20;
/** The kernel's largest usable thin metadata device (THIN_METADATA_MAX_SECTORS, about 15.8 GiB). */
const POOL_METADATA_MAX_BYTES = 16 * 2 ** 30;

/**
 * Default metadata file size for `dataBytes` of data in blocks of `blockBytes`: 128 bytes per data
 * block (thin_metadata_size estimates about 32 for the mappings; a commit here writes the changed
 * trees anew beside the committed ones, so room for two copies and some), at least 4 MiB, whole MiB.
 */
export function defaultPoolMetadataBytes(dataBytes: number, blockBytes: number): number {
  const want = Math.ceil(dataBytes / blockBytes) * 128;
  return Math.min(POOL_METADATA_MAX_BYTES, Math.max(4 << 20, Math.ceil(want / (1 << 20)) * (1 << 20)));
}

/** A thin pool (docs/manifest.md "Thin pools"): files under the state directory, or named devices. */
export interface PoolSpec {
  name: string;
  /** Data size (`size`); 0 with dataDevice (the device's size). */
  sizeBytes: number;
  /** Metadata size (`metadataSize` or the default); 0 with metadataDevice. */
  metadataBytes: number;
  blockBytes: number;
  dataDevice?: string;
  metadataDevice?: string;
  line: number;
}

export interface VolumeSpec {
  name: string;
  /** As written (e.g. `64M`); empty for a volume on a `device` (its size is the export's). */
  size: string;
  /** 0 for a volume on a `device`. */
  sizeBytes: number;
  /** Shared storage: the NBD URI of the export that holds the volume (LUKS2 header + data). */
  device?: string;
  class: VolumeClass;
  filesystem: Filesystem;
  mountpoint?: string;
  cipher: string;
  keySizeBits: number;
  sectorSize: number;
  /** The thin pool the volume lives in (a thin device there), if any. */
  pool?: string;
  /** Line of the volume in the manifest (1-based). */
  line: number;
}

export interface ServiceSpec {
  name: string;
  volumes: VolumeSpec[];
  line: number;
}

export interface SwapSpec {
  name: string;
  size: string;
  sizeBytes: number;
  cipher: string;
  keySizeBits: number;
  sectorSize: number;
  line: number;
}

export interface KeyServiceRef {
  /** `embedded` (an in-process key service), `unix:/path` or `https://host:port`. */
  address: string;
  tokenFile?: string;
  tls?: { cert: string; key: string; ca: string };
  /** embedded only: wrap the root secret with the passphrase in this file (0600). */
  passphraseFile?: string;
  /** embedded only: the root secret is kept in this existing file (another path or medium). */
  rootSecretFile?: string;
}

/** Where single-writer leases of shared volumes live (issue 15 item 4). */
export interface CoordinationRef {
  etcd: string[];
  /** Lease TTL in seconds (default 10). */
  ttl?: number;
  /** etcd key prefix (default /cryptmap/leases/). */
  prefix?: string;
  /** https:// endpoints: etcd's CA, and a client certificate and key for --client-cert-auth (paths; relative to the manifest). */
  tls?: { ca: string; cert?: string; key?: string };
  /** etcd password authentication: the user and a 0600 file holding its password. */
  user?: string;
  passwordFile?: string;
}

export interface Manifest {
  version: 1;
  file: string;
  keyService: KeyServiceRef;
  coordination?: CoordinationRef;
  services: ServiceSpec[];
  swap: SwapSpec[];
  pools: PoolSpec[];
}

export interface ManifestProblem {
  file: string;
  line: number;
  path: string;
  message: string;
}

const UNITS: Record<string, number> = { K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 };

/** `512M` -> 536870912. Binary units (K = 1024); `MiB` and `M` mean the same. */
export function parseSize(s: string): number {
  const m = /^([1-9][0-9]{0,15})(K|M|G|T)(iB)?$/.exec(s);
  if (!m) throw new CryptmapError('ESIZE', `'${s}' must be a size like 512M or 2G`);
  const n = Number(m[1]) * UNITS[m[2]!]!;
  if (!Number.isSafeInteger(n)) throw new CryptmapError('ESIZE', `'${s}' is too large`);
  return n;
}

let validator: ReturnType<Ajv['compile']> | undefined;
function validate() {
  if (!validator) {
    const ajv = new Ajv({ allErrors: true, verbose: true, strict: true });
    ajv.addKeyword({ keyword: 'x-message', schemaType: 'string' });
    validator = ajv.compile(MANIFEST_SCHEMA);
  }
  return validator;
}

type Seg = string | number;

function pathText(path: Seg[]): string {
  let s = '';
  for (const p of path) s += typeof p === 'number' ? `[${p}]` : s === '' ? p : `.${p}`;
  return s || '(top level)';
}

/** The line of the node at `path` (the key's line for a map entry), or of its nearest ancestor. */
function lineOf(doc: ReturnType<typeof parseDocument>, lc: LineCounter, path: Seg[]): number {
  let node: unknown = doc.contents;
  let line = node && (node as Node).range ? lc.linePos((node as Node).range![0]).line : 1;
  for (const seg of path) {
    let next: unknown;
    let keyNode: unknown;
    if (isMap(node)) {
      const pair = node.items.find((p) => isPair(p) && isScalar(p.key) && p.key.value === seg);
      keyNode = pair?.key;
      next = pair?.value;
    } else if (isSeq(node) && typeof seg === 'number') {
      next = node.items[seg];
      keyNode = next;
    }
    const r = (keyNode as Node | undefined)?.range;
    if (!r) break;
    line = lc.linePos(r[0]).line;
    node = next;
  }
  return line;
}

function pointerToPath(p: string): Seg[] {
  if (p === '') return [];
  return p
    .slice(1)
    .split('/')
    .map((s) => s.replace(/~1/g, '/').replace(/~0/g, '~'))
    .map((s) => (/^[0-9]+$/.test(s) ? Number(s) : s));
}

function describe(e: ErrorObject): { path: Seg[]; message: string } {
  const path = pointerToPath(e.instancePath);
  switch (e.keyword) {
    case 'required':
      return { path: [...path, (e.params as { missingProperty: string }).missingProperty], message: 'is required' };
    case 'additionalProperties':
      return {
        path: [...path, (e.params as { additionalProperty: string }).additionalProperty],
        message: 'is not a known field',
      };
    default: {
      const custom = (e.parentSchema as Record<string, unknown> | undefined)?.['x-message'];
      if (typeof custom === 'string' && e.keyword !== 'type') return { path, message: custom };
      if (e.keyword === 'type')
        return {
          path,
          message: `must be ${e.params.type === 'array' ? 'a list' : e.params.type === 'object' ? 'a mapping' : `a ${e.params.type}`}`,
        };
      return { path, message: e.message ?? 'is invalid' };
    }
  }
}

function fail(problems: ManifestProblem[]): never {
  const lines = problems.map((p) => `${p.file}:${p.line}: ${p.path}: ${p.message}`);
  throw new CryptmapError('EMANIFEST', lines.join('\n'), { context: { problems } });
}

/** Parse and validate a manifest's text. Throws EMANIFEST listing every problem found. */
export function parseManifest(text: string, file = 'manifest.yaml'): Manifest {
  const lc = new LineCounter();
  const doc = parseDocument(text, { lineCounter: lc, keepSourceTokens: true, uniqueKeys: true, prettyErrors: false });
  if (doc.errors.length > 0) {
    fail(
      doc.errors.map((e) => ({
        file,
        line: e.linePos?.[0]?.line ?? 1,
        path: '(syntax)',
        message: e.message.split('\n')[0]!,
      })),
    );
  }
  // toJS throws (ReferenceError) on an alias to an undefined anchor and on alias bombs
  // (maxAliasCount): a manifest problem, not a crash.
  let data: unknown;
  try {
    data = doc.toJS({ maxAliasCount: 100 }) as unknown;
  } catch (e) {
    fail([{ file, line: 1, path: '(syntax)', message: e instanceof Error ? e.message : String(e) }]);
  }
  if (data === null || data === undefined)
    fail([{ file, line: 1, path: '(top level)', message: 'the manifest is empty' }]);
  const v = validate();
  if (!v(data)) {
    const seen = new Set<string>();
    const problems: ManifestProblem[] = [];
    for (const e of v.errors ?? []) {
      if (e.keyword === 'if') continue;
      const d = describe(e);
      const key = `${pathText(d.path)}|${d.message}`;
      if (seen.has(key)) continue;
      seen.add(key);
      problems.push({ file, line: lineOf(doc, lc, d.path), path: pathText(d.path), message: d.message });
    }
    problems.sort((a, b) => a.line - b.line);
    fail(problems);
  }
  const raw = data as {
    keyService?: KeyServiceRef;
    coordination?: CoordinationRef;
    services?: { name: string; volumes: Record<string, unknown>[] }[];
    swap?: Record<string, unknown>[];
    pools?: Record<string, unknown>[];
  };
  const problems: ManifestProblem[] = [];
  const problem = (path: Seg[], message: string) =>
    problems.push({ file, line: lineOf(doc, lc, path), path: pathText(path), message });

  const keyService: KeyServiceRef = raw.keyService ?? { address: 'embedded' };
  if (keyService.address.startsWith('https://') && !keyService.tls)
    problem(['keyService', 'tls'], 'an https key service needs tls.cert, tls.key and tls.ca');
  if (!keyService.address.startsWith('https://') && keyService.tls)
    problem(['keyService', 'tls'], 'applies to https key services only');
  if (keyService.tokenFile && !/^(unix:)?\//.test(keyService.address))
    problem(['keyService', 'tokenFile'], 'applies to unix socket key services only');
  for (const k of ['passphraseFile', 'rootSecretFile'] as const) {
    if (keyService[k] !== undefined && keyService.address !== 'embedded')
      problem(
        ['keyService', k],
        'applies to the embedded key service only (a keyd has its own --passphrase-file and --root-secret-file)',
      );
  }

  const pools: PoolSpec[] = [];
  (raw.pools ?? []).forEach((rp, i) => {
    const pp: Seg[] = ['pools', i];
    const pool: PoolSpec = {
      name: rp.name as string,
      sizeBytes: 0,
      metadataBytes: 0,
      blockBytes: rp.blockSize === undefined ? DEFAULT_POOL_BLOCK_BYTES : parseSize(rp.blockSize as string),
      line: lineOf(doc, lc, pp),
    };
    if (pools.some((o) => o.name === pool.name)) problem([...pp, 'name'], `pool '${pool.name}' is already defined`);
    const blockOk =
      pool.blockBytes >= POOL_BLOCK_MIN_BYTES &&
      pool.blockBytes <= POOL_BLOCK_MAX_BYTES &&
      pool.blockBytes % POOL_BLOCK_MIN_BYTES === 0;
    if (!blockOk)
      problem([...pp, 'blockSize'], 'must be 64K to 1G, a multiple of 64K (the kernel: 128 to 2097152 sectors)');
    const dev = rp.dataDevice !== undefined || rp.metadataDevice !== undefined;
    if (dev) {
      if (rp.dataDevice === undefined || rp.metadataDevice === undefined)
        problem(
          [...pp, rp.dataDevice === undefined ? 'dataDevice' : 'metadataDevice'],
          'is required with the other device',
        );
      if (rp.dataDevice !== undefined && rp.dataDevice === rp.metadataDevice)
        problem([...pp, 'metadataDevice'], 'must not be the data device');
      for (const k of ['size', 'metadataSize'] as const)
        if (rp[k] !== undefined) problem([...pp, k], "must not be given with devices: the sizes are the devices'");
      if (rp.dataDevice !== undefined) pool.dataDevice = rp.dataDevice as string;
      if (rp.metadataDevice !== undefined) pool.metadataDevice = rp.metadataDevice as string;
    } else if (rp.size === undefined) problem([...pp, 'size'], 'is required (or dataDevice and metadataDevice)');
    else {
      pool.sizeBytes = parseSize(rp.size as string);
      if (blockOk && (pool.sizeBytes % pool.blockBytes !== 0 || pool.sizeBytes < pool.blockBytes))
        problem([...pp, 'size'], `must be a multiple of the block size (${pool.blockBytes} bytes)`);
      pool.metadataBytes =
        rp.metadataSize === undefined
          ? defaultPoolMetadataBytes(pool.sizeBytes, pool.blockBytes)
          : parseSize(rp.metadataSize as string);
      if (pool.metadataBytes < POOL_METADATA_MIN_BYTES || pool.metadataBytes > POOL_METADATA_MAX_BYTES)
        problem([...pp, 'metadataSize'], 'must be 2M to 16G');
    }
    pools.push(pool);
  });

  const coord = raw.coordination;
  if (coord) {
    const https = coord.etcd.filter((u) => u.startsWith('https://')).length;
    if (https > 0 && https < coord.etcd.length)
      problem(['coordination', 'etcd'], 'must be all https:// or all http:// endpoints');
    if (https > 0 && !coord.tls) problem(['coordination', 'tls'], 'https:// etcd endpoints need tls.ca');
    if (https === 0 && coord.tls) problem(['coordination', 'tls'], 'applies to https:// etcd endpoints only');
    if (coord.tls && (coord.tls.cert === undefined) !== (coord.tls.key === undefined))
      problem(['coordination', 'tls'], 'a client certificate needs both cert and key');
    if ((coord.user === undefined) !== (coord.passwordFile === undefined))
      problem(
        ['coordination', coord.user === undefined ? 'passwordFile' : 'user'],
        'user and passwordFile go together',
      );
  }

  const services: ServiceSpec[] = [];
  const serviceNames = new Map<string, number>();
  const mountpoints = new Map<string, string>();
  /** The cipher and, for a volume with a `size` (not on a device: its size is the export's), the size. */
  const checkCrypto = (path: Seg[], cipher: string, keySizeBits: number, sector: number, sizeBytes?: number) => {
    if (/-xts-/.test(cipher) && keySizeBits === 128)
      problem([...path, 'keySize'], 'XTS needs two keys: 256 or 512 bits');
    if (sizeBytes === undefined) return;
    if (sizeBytes % sector !== 0) problem([...path, 'size'], `must be a multiple of the sector size (${sector} bytes)`);
    if (sizeBytes < MIN_VOLUME_BYTES) problem([...path, 'size'], 'must be at least 1M');
  };
  /** One export per volume: where it is (transport and export name, however the URI spells them) -> which volume. */
  const devices = new Map<string, { id: string; uri: string }>();
  (raw.services ?? []).forEach((s, i) => {
    const sp: Seg[] = ['services', i];
    if (serviceNames.has(s.name))
      problem([...sp, 'name'], `service '${s.name}' is already defined (services[${serviceNames.get(s.name)}])`);
    serviceNames.set(s.name, i);
    const volNames = new Set<string>();
    const volumes: VolumeSpec[] = s.volumes.map((rv, j) => {
      const vp: Seg[] = [...sp, 'volumes', j];
      const vol: VolumeSpec = {
        name: rv.name as string,
        size: (rv.size as string | undefined) ?? '',
        sizeBytes: rv.size === undefined ? 0 : parseSize(rv.size as string),
        class: (rv.class as VolumeClass | undefined) ?? 'ephemeral',
        filesystem: (rv.filesystem as Filesystem | undefined) ?? 'ext4',
        cipher: (rv.cipher as string | undefined) ?? DEFAULT_CIPHER,
        keySizeBits: (rv.keySize as number | undefined) ?? DEFAULT_KEY_BITS,
        sectorSize: (rv.sectorSize as number | undefined) ?? DEFAULT_SECTOR_SIZE,
        line: lineOf(doc, lc, vp),
      };
      if (rv.mountpoint !== undefined) vol.mountpoint = rv.mountpoint as string;
      if (rv.pool !== undefined) {
        vol.pool = rv.pool as string;
        if (!pools.some((p) => p.name === vol.pool))
          problem(
            [...vp, 'pool'],
            `no pool '${vol.pool}' is defined (${pools.length === 0 ? 'the manifest has no pools section' : `pools: ${[...new Set(pools.map((p) => p.name))].join(', ')}`})`,
          );
        if (rv.device !== undefined) problem([...vp, 'pool'], 'a volume on a shared device cannot be in a pool');
      }
      if (rv.device !== undefined) {
        vol.device = rv.device as string;
        try {
          const t = parseNbdUri(vol.device);
          const where =
            t.transport.kind === 'unix'
              ? `unix:${posix.normalize(t.transport.path)}`
              : `tcp:${t.transport.host.toLowerCase()}:${t.transport.port}`;
          const key = `${where}/${t.exportName}`;
          const id = `${s.name}/${vol.name}`;
          const other = devices.get(key);
          if (other)
            problem(
              [...vp, 'device'],
              `${id} and ${other.id} name the same export (${vol.device}${other.uri !== vol.device ? ` and ${other.uri}` : ''}): two volumes on one export destroy each other; give each its own`,
            );
          else devices.set(key, { id, uri: vol.device });
        } catch (e) {
          problem([...vp, 'device'], (e as Error).message);
        }
        if (rv.size !== undefined)
          problem([...vp, 'size'], "must not be given with device: the volume's size is the export's");
        if (vol.class !== 'persistent')
          problem(
            [...vp, 'class'],
            'a volume on a shared device must be persistent (ephemeral volumes stay node-local files)',
          );
      } else if (rv.size === undefined) problem([...vp, 'size'], 'is required');
      if (volNames.has(vol.name))
        problem([...vp, 'name'], `volume '${vol.name}' is already defined in service '${s.name}'`);
      volNames.add(vol.name);
      checkCrypto(vp, vol.cipher, vol.keySizeBits, vol.sectorSize, rv.size !== undefined ? vol.sizeBytes : undefined);
      if (vol.mountpoint !== undefined) {
        if (vol.filesystem === 'none')
          problem([...vp, 'mountpoint'], 'a volume with filesystem none cannot be mounted');
        if (
          posix.normalize(vol.mountpoint) !== vol.mountpoint ||
          vol.mountpoint === '/' ||
          vol.mountpoint.endsWith('/')
        ) {
          problem([...vp, 'mountpoint'], 'must be a normalized absolute path other than /');
        }
        const other = mountpoints.get(vol.mountpoint);
        if (other) problem([...vp, 'mountpoint'], `is already used by ${other}`);
        mountpoints.set(vol.mountpoint, `${s.name}/${vol.name}`);
      }
      return vol;
    });
    services.push({ name: s.name, volumes, line: lineOf(doc, lc, sp) });
  });
  const swapNames = new Set<string>();
  const swap: SwapSpec[] = (raw.swap ?? []).map((rs, i) => {
    const p: Seg[] = ['swap', i];
    const sw: SwapSpec = {
      name: rs.name as string,
      size: rs.size as string,
      sizeBytes: parseSize(rs.size as string),
      cipher: (rs.cipher as string | undefined) ?? DEFAULT_CIPHER,
      keySizeBits: (rs.keySize as number | undefined) ?? DEFAULT_KEY_BITS,
      sectorSize: (rs.sectorSize as number | undefined) ?? DEFAULT_SECTOR_SIZE,
      line: lineOf(doc, lc, p),
    };
    if (swapNames.has(sw.name)) problem([...p, 'name'], `swap '${sw.name}' is already defined`);
    swapNames.add(sw.name);
    checkCrypto(p, sw.cipher, sw.keySizeBits, sw.sectorSize, sw.sizeBytes);
    return sw;
  });
  if (problems.length > 0) fail(problems.sort((a, b) => a.line - b.line));
  const m: Manifest = { version: 1, file, keyService, services, swap, pools };
  if (raw.coordination) m.coordination = raw.coordination;
  return m;
}

/** Read and parse a manifest file. */
export async function loadManifest(path: string): Promise<Manifest> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (e) {
    throw fromSystemError('EMANIFEST', `cannot read manifest ${path}`, e);
  }
  return parseManifest(text, path);
}
