/**
 * Thin-pool metadata (kernel drivers/md/dm-thin-metadata.c; the same layout thin_check, thin_dump
 * and thin_restore read and write): a superblock in block 0, a space map for the metadata blocks,
 * a space map for the data blocks, a btree of device details and a two-level mapping btree
 * (thin dev id -> (virtual block -> data block and time)).
 *
 * Facts (learnt from the kernel and thin-provisioning-tools, not copied):
 *   - superblock: csum @0, flags @4 (bit 0 needs_check), blocknr @8, uuid[16] @16, magic 27022010
 *     @32, version @40, time @44, trans_id @48, held_root @56, data space map root @64 and metadata
 *     space map root @192 (128 bytes each), data_mapping_root @320, device_details_root @328,
 *     data_block_size (sectors) @336, metadata_block_size (8) @340, metadata_nr_blocks @344,
 *     compat/compat_ro/incompat flags @352/356/360; checksum XOR 160774.
 *   - device details value (24 bytes): mapped_blocks le64, transaction_id le64, creation_time le32,
 *     snapshotted_time le32. Mapping value: data block << 24 | time (24 bits).
 *   - A snapshot bumps the pool time; origin and snapshot get snapshotted_time = the new time; a
 *     mapping is shared when its device's snapshotted_time is later than the mapping's time.
 *   - Commit (dm_tm_commit): every other block is written and flushed first, the superblock last,
 *     then flushed. A block freed in a transaction is not reused before the commit.
 *
 * How cryptmap commits (a choice; the kernel instead shadows only the btree paths it changed):
 * the in-core state (devices, mappings, data counts) is written as a new image into metadata
 * blocks the last committed image does not use, then the superblock switches to it. A crash at any
 * write leaves the previous commit intact. The mapping btree of a device whose mappings did not
 * change is kept as committed; the others, the device details, the top level and both space maps
 * are written anew, so a commit costs O(mappings of the changed devices + data blocks / 16320) and
 * the metadata device needs room for two copies of what changes. Mapping btrees are never shared
 * between devices in what cryptmap writes (snapshots share data blocks, counted in the data space
 * map); a held metadata snapshot may share a device's unchanged btree with the current image.
 */
import type { BlockDevice } from '../../blockdev/types.js';
import { CryptmapError } from '../../util/errors.js';
import {
  MAX_METADATA_BLOCKS,
  MD_BLOCK_BYTES,
  SUPERBLOCK_CSUM_XOR,
  type SpaceMapRoot,
  buildBtree,
  metadataError,
  planMetadataSpaceMap,
  readDiskSpaceMap,
  readMetadataSpaceMap,
  readSpaceMapRoot,
  readU64,
  sealBlock,
  verifyBlock,
  walkBtree,
  writeDiskSpaceMap,
  writeMetadataSpaceMap,
  writeSpaceMapRoot,
  writeU64,
} from './persistent-data.js';

export const THIN_SUPERBLOCK_MAGIC = 27022010;
export const THIN_VERSION = 2;
export const THIN_METADATA_BLOCK_SECTORS = MD_BLOCK_BYTES / 512;
export const NEEDS_CHECK_FLAG = 1;
/** Thin device ids are 24 bits. */
export const MAX_DEV_ID = 0xffffff;
/** Mapping values pack the time in 24 bits; in-core they are block * 2^24 + time (safe below 2^29 blocks). */
const TIME_MOD = 0x1000000;
export const MAX_DATA_BLOCKS = 2 ** 29;
const DETAILS_VALUE_BYTES = 24;

const SB = {
  csum: 0,
  flags: 4,
  blocknr: 8,
  magic: 32,
  version: 40,
  time: 44,
  transId: 48,
  heldRoot: 56,
  dataSmRoot: 64,
  metadataSmRoot: 192,
  dataMappingRoot: 320,
  deviceDetailsRoot: 328,
  dataBlockSize: 336,
  metadataBlockSize: 340,
  metadataNrBlocks: 344,
  compatFlags: 352,
  compatRoFlags: 356,
  incompatFlags: 360,
} as const;

export interface ThinDevice {
  readonly id: number;
  transactionId: bigint;
  creationTime: number;
  snapshottedTime: number;
  /** virtual block -> data block * 2^24 + time. */
  map: Map<number, number>;
  /** Thin targets using the device (delete refuses while > 0). */
  openCount: number;
  /** The mappings changed since the last commit (set by every writer of `map`). */
  changed: boolean;
  /** This device's mapping btree in the committed image (reused while unchanged). */
  committed?: { root: number; blocks: number[] };
}

export function packBlockTime(block: number, time: number): number {
  return block * TIME_MOD + time;
}
export function blockOf(v: number): number {
  return Math.floor(v / TIME_MOD);
}
export function timeOf(v: number): number {
  return v % TIME_MOD;
}

function outOfMetadataSpace(need: string): CryptmapError {
  return new CryptmapError('ENOSPC_METADATA', `thin-pool metadata device is full (${need})`, { errno: 'ENOSPC' });
}

/** Reads metadata blocks through a small cache (shared nodes are read once). */
function reader(dev: BlockDevice) {
  const cache = new Map<number, Buffer>();
  const nrBlocks = Math.floor(dev.sizeBytes / MD_BLOCK_BYTES);
  return async (b: number): Promise<Buffer> => {
    if (b >= nrBlocks) throw metadataError(`block ${b} is beyond the metadata device (${nrBlocks} blocks)`);
    let buf = cache.get(b);
    if (buf === undefined) {
      buf = Buffer.alloc(MD_BLOCK_BYTES);
      await dev.read(b * MD_BLOCK_BYTES, buf);
      if (cache.size > 4096) cache.clear();
      cache.set(b, buf);
    }
    return buf;
  };
}

export class ThinMetadata {
  readonly dev: BlockDevice;
  readonly dataBlockSectors: number;
  nrMetaBlocks: number;
  nrDataBlocks: number;
  transactionId = 0n;
  time = 0;
  flags = 0;
  readonly devices = new Map<number, ThinDevice>();
  /** Data block reference counts now, and as of the last commit (freed blocks wait for a commit). */
  dataCounts: Uint32Array;
  committedDataCounts: Uint32Array;
  /** Metadata block counts of the committed image (what the next image must not overwrite). */
  committedMeta: Uint32Array;
  /** Metadata snapshot (held root) and the counts of the blocks it keeps. */
  heldRoot = 0;
  heldCounts = new Map<number, number>();
  /** Changed since the last commit. */
  dirty = false;
  #freeData = 0;
  #allocCursor = 0;

  private constructor(dev: BlockDevice, dataBlockSectors: number, nrMetaBlocks: number, nrDataBlocks: number) {
    this.dev = dev;
    this.dataBlockSectors = dataBlockSectors;
    this.nrMetaBlocks = nrMetaBlocks;
    this.nrDataBlocks = nrDataBlocks;
    this.dataCounts = new Uint32Array(nrDataBlocks);
    this.committedDataCounts = new Uint32Array(nrDataBlocks);
    this.committedMeta = new Uint32Array(nrMetaBlocks);
    this.#freeData = nrDataBlocks;
  }

  /** Metadata blocks a device of `sizeBytes` offers (capped as the kernel caps it). */
  static metadataBlocksOf(sizeBytes: number): number {
    return Math.min(Math.floor(sizeBytes / MD_BLOCK_BYTES), MAX_METADATA_BLOCKS);
  }

  /**
   * Open the metadata on `dev`, or format it when block 0 is all zeros (as the kernel does on
   * first activation). `nrDataBlocks` is the pool's data size now: the data space map grows to it.
   */
  static async open(dev: BlockDevice, dataBlockSectors: number, nrDataBlocks: number): Promise<ThinMetadata> {
    const nrMeta = ThinMetadata.metadataBlocksOf(dev.sizeBytes);
    if (nrMeta < 16) throw metadataError(`the metadata device is too small (${dev.sizeBytes} bytes; at least 64 KiB)`);
    if (nrDataBlocks >= MAX_DATA_BLOCKS)
      throw metadataError(`${nrDataBlocks} data blocks are more than cryptmap supports (${MAX_DATA_BLOCKS})`);
    const sb = Buffer.alloc(MD_BLOCK_BYTES);
    await dev.read(0, sb);
    if (sb.every((x) => x === 0)) {
      const md = new ThinMetadata(dev, dataBlockSectors, nrMeta, nrDataBlocks);
      md.committedMeta[0] = 1;
      md.dirty = true;
      await md.commit();
      return md;
    }
    return ThinMetadata.#read(dev, sb, dataBlockSectors, nrMeta, nrDataBlocks);
  }

  static async #read(
    dev: BlockDevice,
    sb: Buffer,
    dataBlockSectors: number,
    nrMeta: number,
    nrDataBlocks: number,
  ): Promise<ThinMetadata> {
    const read = reader(dev);
    const sbr = (b: Buffer, at: number, what: string): void => {
      if (b.readUInt32LE(SB.magic) !== THIN_SUPERBLOCK_MAGIC || b.readUInt32LE(SB.magic + 4) !== 0) {
        throw metadataError(
          `${what}: bad magic ${b.readBigUInt64LE(SB.magic)} (expected ${THIN_SUPERBLOCK_MAGIC}); not thin-pool metadata`,
        );
      }
      verifyBlock(b, at, SUPERBLOCK_CSUM_XOR, what);
    };
    sbr(sb, 0, 'superblock');
    const version = sb.readUInt32LE(SB.version);
    if (version < 1 || version > THIN_VERSION)
      throw metadataError(`superblock: unsupported metadata version ${version}`);
    const incompat = sb.readUInt32LE(SB.incompatFlags);
    if (incompat !== 0) throw metadataError(`superblock: unsupported incompatible features 0x${incompat.toString(16)}`);
    const mbs = sb.readUInt32LE(SB.metadataBlockSize);
    if (mbs !== THIN_METADATA_BLOCK_SECTORS)
      throw metadataError(`superblock: metadata block size ${mbs} sectors, expected ${THIN_METADATA_BLOCK_SECTORS}`);
    const dbs = sb.readUInt32LE(SB.dataBlockSize);
    if (dbs !== dataBlockSectors) {
      throw new CryptmapError(
        'ETHINMETA',
        `changing the data block size (from ${dbs} to ${dataBlockSectors}) is not supported`,
        { errno: 'EINVAL' },
      );
    }
    const metaRoot = readSpaceMapRoot(sb, SB.metadataSmRoot);
    const dataRoot = readSpaceMapRoot(sb, SB.dataSmRoot);
    if (metaRoot.nrBlocks > nrMeta) {
      throw metadataError(
        `metadata space map has ${metaRoot.nrBlocks} blocks but the metadata device holds only ${nrMeta}`,
      );
    }
    if (dataRoot.nrBlocks > nrDataBlocks) {
      throw new CryptmapError(
        'ETHINMETA',
        `pool target (${nrDataBlocks} blocks) too small: expected ${dataRoot.nrBlocks}`,
        { errno: 'EINVAL' },
      );
    }
    const md = new ThinMetadata(dev, dataBlockSectors, nrMeta, nrDataBlocks);
    md.flags = sb.readUInt32LE(SB.flags);
    md.time = sb.readUInt32LE(SB.time);
    md.transactionId = sb.readBigUInt64LE(SB.transId);
    md.heldRoot = readU64(sb, SB.heldRoot);

    // Metadata blocks in use: the space map's own view (conservative: every counted block is kept).
    const metaCounts = await readMetadataSpaceMap(read, metaRoot);
    md.committedMeta.set(metaCounts.subarray(0, Math.min(metaCounts.length, nrMeta)));
    if (md.committedMeta[0] === 0) throw metadataError('metadata space map: the superblock (block 0) is not counted');

    // Device details.
    const details = new Map<number, { mapped: number; trans: bigint; ctime: number; stime: number }>();
    await walkBtree(read, readU64(sb, SB.deviceDetailsRoot), DETAILS_VALUE_BYTES, 'device details tree', {
      onValue(key, leaf, off) {
        if (key > MAX_DEV_ID) throw metadataError(`device details tree: device id ${key} is larger than ${MAX_DEV_ID}`);
        details.set(key, {
          mapped: readU64(leaf, off),
          trans: leaf.readBigUInt64LE(off + 8),
          ctime: leaf.readUInt32LE(off + 16),
          stime: leaf.readUInt32LE(off + 20),
        });
      },
    });
    // Mapping tree, top level then each device's tree.
    const roots = new Map<number, number>();
    await walkBtree(read, readU64(sb, SB.dataMappingRoot), 8, 'mapping tree (top level)', {
      onValue(key, leaf, off) {
        roots.set(key, readU64(leaf, off));
      },
    });
    for (const id of details.keys()) if (!roots.has(id)) throw metadataError(`missing all mappings for devices: ${id}`);
    for (const id of roots.keys())
      if (!details.has(id)) throw metadataError(`missing devices: ${id} (it has mappings but no details)`);
    const expected = new Uint32Array(nrDataBlocks);
    for (const [id, root] of roots) {
      const d = details.get(id)!;
      const map = new Map<number, number>();
      await walkBtree(read, root, 8, `mapping tree of thin device ${id}`, {
        onValue(key, leaf, off) {
          const lo = leaf.readUInt32LE(off);
          const hi = leaf.readUInt32LE(off + 4);
          const block = hi * 256 + (lo >>> 24);
          if (block >= dataRoot.nrBlocks)
            throw metadataError(
              `thin device ${id} maps block ${key} to data block ${block}, beyond the ${dataRoot.nrBlocks} data blocks`,
            );
          expected[block]!++;
          map.set(key, packBlockTime(block, lo & 0xffffff));
        },
      });
      md.devices.set(id, {
        id,
        transactionId: d.trans,
        creationTime: d.ctime,
        snapshottedTime: d.stime,
        map,
        openCount: 0,
        changed: true,
      });
    }
    // Data space map: its counts must cover every mapping (thin_check: "data reference counts differ").
    const dataCounts = await readDiskSpaceMap(read, dataRoot, 'data space map');
    for (let b = 0; b < dataRoot.nrBlocks; b++) {
      if (dataCounts[b]! < expected[b]!) {
        throw metadataError(
          `data reference counts differ for block ${b}, expected ${expected[b]}, but got ${dataCounts[b]}`,
        );
      }
    }
    // Leaked data blocks (counted but unmapped) are freed: the counts follow the mappings.
    md.dataCounts.set(expected);
    md.committedDataCounts.set(dataCounts);
    md.#recountFree();
    if (dataRoot.nrBlocks !== nrDataBlocks || metaRoot.nrBlocks !== nrMeta) md.dirty = true;

    if (md.heldRoot !== 0) await md.#countHeld(read);
    return md;
  }

  /** The blocks a metadata snapshot keeps: its superblock copy and the trees it names. */
  async #countHeld(read: (b: number) => Promise<Buffer>): Promise<void> {
    const counts = new Map<number, number>();
    const inc = (b: number): void => {
      counts.set(b, (counts.get(b) ?? 0) + 1);
    };
    const hb = await read(this.heldRoot);
    verifyBlock(hb, this.heldRoot, SUPERBLOCK_CSUM_XOR, 'metadata snapshot superblock');
    inc(this.heldRoot);
    const seen = new Set<number>();
    await walkBtree(read, readU64(hb, SB.deviceDetailsRoot), DETAILS_VALUE_BYTES, 'metadata snapshot device details', {
      onRef: inc,
      seen,
      onValue() {},
    });
    const subRoots: number[] = [];
    await walkBtree(read, readU64(hb, SB.dataMappingRoot), 8, 'metadata snapshot mapping tree', {
      onRef: inc,
      seen,
      onValue(_k, leaf, off) {
        subRoots.push(readU64(leaf, off));
      },
    });
    for (const r of subRoots)
      await walkBtree(read, r, 8, 'metadata snapshot mapping tree', { onRef: inc, seen, onValue() {} });
    this.heldCounts = counts;
  }

  #recountFree(): void {
    let free = 0;
    for (let b = 0; b < this.nrDataBlocks; b++)
      if (this.dataCounts[b] === 0 && this.committedDataCounts[b] === 0) free++;
    this.#freeData = free;
  }

  /** Data blocks not used now (including those freed in this transaction). */
  get freeDataBlocks(): number {
    let n = 0;
    for (let b = 0; b < this.nrDataBlocks; b++) if (this.dataCounts[b] === 0) n++;
    return n;
  }

  /** Data blocks allocatable before the next commit. */
  get allocatableDataBlocks(): number {
    return this.#freeData;
  }

  /** Metadata blocks the committed image (and a held snapshot) uses. */
  get usedMetadataBlocks(): number {
    let n = 0;
    for (let b = 0; b < this.nrMetaBlocks; b++) if (this.committedMeta[b] !== 0) n++;
    return n;
  }

  /** A free data block (count 0 now and at the last commit), its count set to 1; undefined when none. */
  allocDataBlock(): number | undefined {
    if (this.#freeData === 0) return undefined;
    const n = this.nrDataBlocks;
    for (let i = 0; i < n; i++) {
      const b = (this.#allocCursor + i) % n;
      if (this.dataCounts[b] === 0 && this.committedDataCounts[b] === 0) {
        this.dataCounts[b] = 1;
        this.#freeData--;
        this.#allocCursor = (b + 1) % n;
        this.dirty = true;
        return b;
      }
    }
    this.#freeData = 0;
    return undefined;
  }

  /** Drop one reference to a data block; returns the new count. */
  decData(b: number): number {
    const c = --this.dataCounts[b]!;
    this.dirty = true;
    return c;
  }

  /** Grow the data space map (pool resize); shrinking is refused by the caller. */
  growData(nrDataBlocks: number): void {
    if (nrDataBlocks <= this.nrDataBlocks) return;
    const grow = (a: Uint32Array): Uint32Array => {
      const n = new Uint32Array(nrDataBlocks);
      n.set(a);
      return n;
    };
    this.dataCounts = grow(this.dataCounts);
    this.committedDataCounts = grow(this.committedDataCounts);
    this.#freeData += nrDataBlocks - this.nrDataBlocks;
    this.nrDataBlocks = nrDataBlocks;
    this.dirty = true;
  }

  // ------------------------------------------------------------------------ device operations

  createThin(id: number): void {
    if (this.devices.has(id))
      throw new CryptmapError('EEXIST', `thin device ${id} already exists`, { errno: 'EEXIST' });
    this.devices.set(id, {
      id,
      transactionId: this.transactionId,
      creationTime: this.time,
      snapshottedTime: this.time,
      map: new Map(),
      openCount: 0,
      changed: true,
    });
    this.dirty = true;
  }

  createSnap(id: number, originId: number): void {
    if (this.devices.has(id))
      throw new CryptmapError('EEXIST', `thin device ${id} already exists`, { errno: 'EEXIST' });
    const origin = this.devices.get(originId);
    if (origin === undefined)
      throw new CryptmapError('ENODATA', `origin thin device ${originId} does not exist`, { errno: 'ENOENT' });
    this.time++;
    for (const v of origin.map.values()) this.dataCounts[blockOf(v)]!++;
    origin.snapshottedTime = this.time;
    this.devices.set(id, {
      id,
      transactionId: this.transactionId,
      creationTime: this.time,
      snapshottedTime: this.time,
      map: new Map(origin.map),
      openCount: 0,
      changed: true,
    });
    this.dirty = true;
  }

  deleteThin(id: number): void {
    const d = this.devices.get(id);
    if (d === undefined) throw new CryptmapError('ENODATA', `thin device ${id} does not exist`, { errno: 'ENOENT' });
    if (d.openCount > 0) throw new CryptmapError('EBUSY', `thin device ${id} is open`, { errno: 'EBUSY' });
    for (const v of d.map.values()) this.dataCounts[blockOf(v)]!--;
    this.devices.delete(id);
    this.dirty = true;
  }

  setTransactionId(current: bigint, next: bigint): void {
    if (current !== this.transactionId) {
      throw new CryptmapError(
        'EINVAL',
        `mismatched transaction id: the pool's is ${this.transactionId}, the message says ${current}`,
        { errno: 'EINVAL' },
      );
    }
    this.transactionId = next;
    this.dirty = true;
  }

  /** Keep the committed trees as a metadata snapshot (held root); commits first. */
  async reserveMetadataSnap(): Promise<void> {
    if (this.heldRoot !== 0)
      throw new CryptmapError('EBUSY', 'a metadata snapshot is already held', { errno: 'EBUSY' });
    this.dirty = true;
    await this.commit();
    // The committed image's superblock and trees stay: copy the superblock to a free block.
    const sb = Buffer.alloc(MD_BLOCK_BYTES);
    await this.dev.read(0, sb);
    const read = reader(this.dev);
    let at = 1;
    while (at < this.nrMetaBlocks && this.committedMeta[at] !== 0) at++;
    if (at >= this.nrMetaBlocks) throw outOfMetadataSpace('no block for the metadata snapshot');
    writeU64(sb, SB.heldRoot, 0);
    sealBlock(sb, at, SUPERBLOCK_CSUM_XOR);
    await this.dev.write(at * MD_BLOCK_BYTES, sb);
    this.heldRoot = at;
    await this.#countHeld(read);
    this.dirty = true;
    await this.commit();
  }

  async releaseMetadataSnap(): Promise<void> {
    if (this.heldRoot === 0) throw new CryptmapError('EINVAL', 'no metadata snapshot is held', { errno: 'EINVAL' });
    this.heldRoot = 0;
    this.heldCounts = new Map();
    this.dirty = true;
    await this.commit();
  }

  // ------------------------------------------------------------------------------------ commit

  /**
   * Write the in-core state as a new image into blocks the committed image does not use, flush,
   * then write the superblock and flush. Throws ENOSPC_METADATA (before writing anything) when the
   * metadata device has no room for the new image.
   */
  async commit(): Promise<void> {
    if (!this.dirty) return;
    const nrMeta = this.nrMetaBlocks;
    const used = new Uint32Array(nrMeta);
    used[0] = 1;
    for (const [b, c] of this.heldCounts) used[b] = c;
    let cursor = 1;
    const alloc = (): number => {
      while (cursor < nrMeta && (this.committedMeta[cursor] !== 0 || used[cursor] !== 0)) cursor++;
      if (cursor >= nrMeta)
        throw outOfMetadataSpace(`${nrMeta} blocks cannot hold a new copy of the metadata next to the committed one`);
      used[cursor] = 1;
      return cursor++;
    };
    const out = new Map<number, Buffer>();
    const plan = planMetadataSpaceMap(nrMeta, alloc);
    const ids = [...this.devices.keys()].sort((a, b) => a - b);
    const devs = ids.map((id) => this.devices.get(id)!);
    const detailsRoot = buildBtree(
      ids,
      DETAILS_VALUE_BYTES,
      (node, off, i) => {
        const d = devs[i]!;
        writeU64(node, off, d.map.size);
        node.writeBigUInt64LE(d.transactionId, off + 8);
        node.writeUInt32LE(d.creationTime >>> 0, off + 16);
        node.writeUInt32LE(d.snapshottedTime >>> 0, off + 20);
      },
      alloc,
      out,
    );
    // A device whose mappings did not change keeps its committed btree (its root gains a
    // reference when a held metadata snapshot also points at it); the others are written anew.
    const rebuilt: [ThinDevice, { root: number; blocks: number[] }][] = [];
    const subRoots = devs.map((d) => {
      if (!d.changed && d.committed !== undefined) {
        const { root, blocks } = d.committed;
        if (this.heldCounts.has(root)) used[root]!++;
        else for (const b of blocks) used[b] = 1;
        return root;
      }
      const keys = Float64Array.from(d.map.keys()).sort();
      const blocks: number[] = [];
      const root = buildBtree(
        keys,
        8,
        (node, off, i) => {
          const v = d.map.get(keys[i]!)!;
          const block = blockOf(v);
          // le64 block << 24 | time, written as two le32 halves.
          node.writeUInt32LE((((block & 0xff) << 24) | timeOf(v)) >>> 0, off);
          node.writeUInt32LE(Math.floor(block / 256), off + 4);
        },
        () => {
          const b = alloc();
          blocks.push(b);
          return b;
        },
        out,
      );
      rebuilt.push([d, { root, blocks }]);
      return root;
    });
    const mappingRoot = buildBtree(ids, 8, (node, off, i) => writeU64(node, off, subRoots[i]!), alloc, out);
    const dataRoot: SpaceMapRoot = writeDiskSpaceMap(this.dataCounts, this.nrDataBlocks, alloc, out);
    const metaRoot = writeMetadataSpaceMap(plan, used, nrMeta, alloc, out);

    const sb = Buffer.alloc(MD_BLOCK_BYTES);
    sb.writeUInt32LE(this.flags >>> 0, SB.flags);
    sb.writeUInt32LE(THIN_SUPERBLOCK_MAGIC, SB.magic);
    sb.writeUInt32LE(THIN_VERSION, SB.version);
    sb.writeUInt32LE(this.time >>> 0, SB.time);
    sb.writeBigUInt64LE(this.transactionId, SB.transId);
    writeU64(sb, SB.heldRoot, this.heldRoot);
    writeSpaceMapRoot(sb, SB.dataSmRoot, dataRoot);
    writeSpaceMapRoot(sb, SB.metadataSmRoot, metaRoot);
    writeU64(sb, SB.dataMappingRoot, mappingRoot);
    writeU64(sb, SB.deviceDetailsRoot, detailsRoot);
    sb.writeUInt32LE(this.dataBlockSectors, SB.dataBlockSize);
    sb.writeUInt32LE(THIN_METADATA_BLOCK_SECTORS, SB.metadataBlockSize);
    writeU64(sb, SB.metadataNrBlocks, nrMeta);
    sealBlock(sb, 0, SUPERBLOCK_CSUM_XOR);

    // Snapshot the counts this image describes before any await (I/O may change them meanwhile).
    const dataSnapshot = this.dataCounts.slice();
    this.dirty = false;
    for (const [d] of rebuilt) d.changed = false;
    try {
      const blocks = [...out.keys()].sort((a, b) => a - b);
      for (let i = 0; i < blocks.length; i += 32) {
        await Promise.all(blocks.slice(i, i + 32).map((b) => this.dev.write(b * MD_BLOCK_BYTES, out.get(b)!)));
      }
      await this.dev.flush();
      await this.dev.write(0, sb);
      await this.dev.flush();
    } catch (e) {
      this.dirty = true;
      for (const [d] of rebuilt) d.changed = true;
      throw e;
    }
    for (const [d, c] of rebuilt) d.committed = c;
    this.committedMeta = used;
    this.committedDataCounts = dataSnapshot;
    this.#recountFree();
  }
}
