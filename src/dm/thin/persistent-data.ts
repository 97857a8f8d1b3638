/**
 * The kernel's persistent-data on-disk structures (drivers/md/persistent-data: dm-btree, the
 * space maps of dm-space-map-common.c / -disk.c / -metadata.c), as thin-provisioning-tools reads
 * them: fixed 4 KiB metadata blocks, each sealed with its own block number and a CRC-32C.
 *
 * Facts (learnt from the kernel and thin-provisioning-tools, not copied):
 *   - Checksum of a block: crc32c register (seed ~0, not inverted) over bytes 4..4096, XOR a
 *     per-structure constant; stored little-endian at offset 0. Every structure here keeps its own
 *     block number as a le64 at offset 8.
 *   - btree node: header {csum u32, flags u32 (1 internal, 2 leaf), blocknr u64, nr_entries u32,
 *     max_entries u32, value_size u32, padding u32} (32 bytes), then max_entries le64 keys, then
 *     max_entries values. max_entries = 3 * floor(floor(4064 / (8 + value_size)) / 3). Internal
 *     values are le64 child block numbers. Keys strictly increase; a parent's key is the lowest key
 *     of its child; nodes other than a root hold at least max_entries / 3 entries.
 *   - space map bitmap block: {csum, not_used, blocknr} (16 bytes) then 2 bits per block (the first
 *     bit of the pair is the high bit): 0, 1, 2, or 3 = "look in the ref count btree" (le32 values).
 *     16320 entries per bitmap. index_entry {blocknr le64, nr_free le32, none_free_before le32}.
 *   - disk space map (data): the index entries live in a btree keyed by bitmap number; the
 *     metadata space map keeps them in one index block {csum, padding, blocknr, 255 entries}.
 *   - space map root {nr_blocks, nr_allocated, bitmap_root, ref_count_root}, four le64.
 */
import { crc32cRaw } from '../../util/crc32c.js';
import { CryptmapError } from '../../util/errors.js';

export const MD_BLOCK_BYTES = 4096;
export const BTREE_CSUM_XOR = 121107;
export const BITMAP_CSUM_XOR = 240779;
export const INDEX_CSUM_XOR = 160478;
export const SUPERBLOCK_CSUM_XOR = 160774;

export const INTERNAL_NODE = 1;
export const LEAF_NODE = 2;
const NODE_HEADER_BYTES = 32;
const BITMAP_HEADER_BYTES = 16;
/** Blocks tracked by one bitmap block (2 bits each). */
export const ENTRIES_PER_BITMAP = (MD_BLOCK_BYTES - BITMAP_HEADER_BYTES) * 4;
/** Bitmaps the metadata space map's single index block can list. */
export const MAX_METADATA_BITMAPS = 255;
export const MAX_METADATA_BLOCKS = MAX_METADATA_BITMAPS * ENTRIES_PER_BITMAP;
/** Deepest btree accepted when reading (a 4 KiB-node btree of depth 8 holds far more than 2^64 keys). */
const MAX_DEPTH = 8;

/** Bad thin-pool metadata: the message names the check that failed (as thin_check words it). */
export function metadataError(message: string, context?: Record<string, unknown>): CryptmapError {
  return new CryptmapError('ETHINMETA', `thin-pool metadata: ${message}`, { errno: 'EINVAL', context });
}

export function blockChecksum(block: Uint8Array, xor: number): number {
  return (crc32cRaw(block, 4, MD_BLOCK_BYTES) ^ xor) >>> 0;
}

/** Write the block number at offset 8 and the checksum at offset 0. */
export function sealBlock(block: Buffer, blocknr: number, xor: number): void {
  block.writeBigUInt64LE(BigInt(blocknr), 8);
  block.writeUInt32LE(blockChecksum(block, xor), 0);
}

/** Check the checksum and the self block number of a structure read from `location`. */
export function verifyBlock(block: Buffer, location: number, xor: number, what: string): void {
  if (block.readUInt32LE(0) !== blockChecksum(block, xor))
    throw metadataError(`bad checksum in ${what} (block ${location})`);
  const nr = readU64(block, 8);
  if (nr !== location) throw metadataError(`bad block nr in ${what} (block ${location} claims ${nr})`);
}

/** A le64 that must fit a safe integer (block numbers, keys). */
export function readU64(b: Buffer, off: number): number {
  const lo = b.readUInt32LE(off);
  const hi = b.readUInt32LE(off + 4);
  if (hi >= 0x200000)
    throw metadataError(`64-bit value at offset ${off} is too large (${(BigInt(hi) << 32n) | BigInt(lo)})`);
  return hi * 0x100000000 + lo;
}

export function writeU64(b: Buffer, off: number, v: number): void {
  b.writeUInt32LE(v >>> 0, off);
  b.writeUInt32LE(Math.floor(v / 0x100000000), off + 4);
}

export function maxEntries(valueSize: number): number {
  return 3 * Math.floor(Math.floor((MD_BLOCK_BYTES - NODE_HEADER_BYTES) / (8 + valueSize)) / 3);
}

/** Reads metadata blocks (the caller caches if it wants). */
export type BlockReader = (blocknr: number) => Promise<Buffer>;
/** Gives the next free metadata block for a structure being written. */
export type BlockAllocator = () => number;

// ------------------------------------------------------------------------------------------ btree

export interface BtreeWalk {
  /** Called for every node reached, once per reference (a shared node once per parent pointer). */
  onRef?(blocknr: number): void;
  /** With `seen`: a node already in it is counted (onRef) but not entered again (reference counting). */
  seen?: Set<number>;
  /** Called per leaf entry, in key order. */
  onValue(key: number, leaf: Buffer, valueOffset: number): void | Promise<void>;
}

/**
 * Walk the btree at `root` (value size `valueSize` in its leaves), checking every node as thin_check
 * does. Leaves are visited in key order. A node reached twice (shared between trees) is checked
 * and visited every time; `depth` bounds the recursion so a loop is an error, not a hang.
 */
export async function walkBtree(
  read: BlockReader,
  root: number,
  valueSize: number,
  what: string,
  visit: BtreeWalk,
): Promise<void> {
  const state = { lastLeafKey: -1, inTree: new Set<number>() };
  await walkNode(read, root, valueSize, what, visit, true, undefined, 0, state);
}

async function walkNode(
  read: BlockReader,
  blocknr: number,
  valueSize: number,
  what: string,
  visit: BtreeWalk,
  isRoot: boolean,
  parentKey: number | undefined,
  depth: number,
  state: { lastLeafKey: number; inTree: Set<number> },
): Promise<void> {
  if (depth > MAX_DEPTH)
    throw metadataError(`${what} btree is deeper than ${MAX_DEPTH} levels (a loop?) at block ${blocknr}`);
  visit.onRef?.(blocknr);
  if (visit.seen !== undefined) {
    if (visit.seen.has(blocknr)) return;
    visit.seen.add(blocknr);
  }
  // Trees may share nodes with other trees, never within themselves: this bounds every walk.
  if (state.inTree.has(blocknr)) throw metadataError(`${what}: btree node ${blocknr} is reached twice within one tree`);
  state.inTree.add(blocknr);
  const b = await read(blocknr);
  verifyBlock(b, blocknr, BTREE_CSUM_XOR, 'btree node');
  const flags = b.readUInt32LE(4);
  const nr = b.readUInt32LE(16);
  const max = b.readUInt32LE(20);
  const vs = b.readUInt32LE(24);
  const internal = (flags & INTERNAL_NODE) !== 0;
  const leaf = (flags & LEAF_NODE) !== 0;
  if (internal === leaf)
    throw metadataError(`${what}: btree node flags ${flags} are neither internal nor leaf (block ${blocknr})`);
  const expectVs = internal ? 8 : valueSize;
  if (vs !== expectVs)
    throw metadataError(`${what}: value size mismatch: expected ${expectVs}, but got ${vs} (block ${blocknr})`);
  if ((8 + vs) * max + NODE_HEADER_BYTES > MD_BLOCK_BYTES)
    throw metadataError(`${what}: max entries too large: ${max} (block ${blocknr})`);
  if (max % 3 !== 0) throw metadataError(`${what}: max entries is not divisible by 3: ${max} (block ${blocknr})`);
  if (nr > max) throw metadataError(`${what}: bad nr_entries: ${nr} > ${max} (block ${blocknr})`);
  if (!isRoot && nr < Math.floor(max / 3)) {
    throw metadataError(
      `${what}: too few entries in btree_node: ${nr}, expected at least ${Math.floor(max / 3)} (block ${blocknr}, max_entries = ${max})`,
    );
  }
  const keys: number[] = [];
  for (let i = 0; i < nr; i++) {
    const k = readU64(b, NODE_HEADER_BYTES + 8 * i);
    if (i > 0 && k <= keys[i - 1]!)
      throw metadataError(`${what}: keys are out of order, ${k} <= ${keys[i - 1]} (block ${blocknr})`);
    keys.push(k);
  }
  if (nr > 0 && parentKey !== undefined && parentKey > keys[0]!) {
    throw metadataError(
      `${what}: parent key mismatch: parent was ${parentKey}, but lowest in node was ${keys[0]} (block ${blocknr})`,
    );
  }
  if (!isRoot && nr === 0) throw metadataError(`${what}: empty non-root btree node (block ${blocknr})`);
  const valuesAt = NODE_HEADER_BYTES + 8 * max;
  if (internal) {
    for (let i = 0; i < nr; i++) {
      const child = readU64(b, valuesAt + 8 * i);
      await walkNode(read, child, valueSize, what, visit, false, keys[i], depth + 1, state);
    }
    return;
  }
  if (nr > 0 && state.lastLeafKey >= keys[0]!) {
    throw metadataError(
      `${what}: the last key of the previous leaf was ${state.lastLeafKey} and the first key of this leaf is ${keys[0]} (block ${blocknr})`,
    );
  }
  for (let i = 0; i < nr; i++) await visit.onValue(keys[i]!, b, valuesAt + vs * i);
  if (nr > 0) state.lastLeafKey = keys[nr - 1]!;
}

/**
 * Write one btree level of `n` entries (leaves: keys and values; internal: first keys and child
 * blocks), spread evenly over the fewest nodes of type `nodeType` that hold them (at least one).
 * Returns each node's first key and block, for the level above.
 */
function writeLevel(
  n: number,
  nodeType: number,
  valueSize: number,
  keyAt: (index: number) => number,
  writeValue: (node: Buffer, offset: number, index: number) => void,
  alloc: BlockAllocator,
  out: Map<number, Buffer>,
): { key: number; block: number }[] {
  const max = maxEntries(valueSize);
  const nodes = Math.max(1, Math.ceil(n / max));
  const level: { key: number; block: number }[] = [];
  for (let j = 0, at = 0; j < nodes; j++) {
    const count = Math.floor(n / nodes) + (j < n % nodes ? 1 : 0);
    const node = Buffer.alloc(MD_BLOCK_BYTES);
    node.writeUInt32LE(nodeType, 4);
    node.writeUInt32LE(count, 16);
    node.writeUInt32LE(max, 20);
    node.writeUInt32LE(valueSize, 24);
    const valuesAt = NODE_HEADER_BYTES + 8 * max;
    for (let i = 0; i < count; i++) {
      writeU64(node, NODE_HEADER_BYTES + 8 * i, keyAt(at + i));
      writeValue(node, valuesAt + valueSize * i, at + i);
    }
    const block = alloc();
    sealBlock(node, block, BTREE_CSUM_XOR);
    out.set(block, node);
    level.push({ key: count > 0 ? keyAt(at) : 0, block });
    at += count;
  }
  return level;
}

/**
 * Write a btree holding `keys` (sorted, unique) bottom up into `out`, leaves filled evenly so every
 * non-root node holds at least a third of its capacity. Returns the root block (an empty leaf
 * when there are no keys).
 */
export function buildBtree(
  keys: ArrayLike<number>,
  valueSize: number,
  writeValue: (node: Buffer, offset: number, index: number) => void,
  alloc: BlockAllocator,
  out: Map<number, Buffer>,
): number {
  let level = writeLevel(keys.length, LEAF_NODE, valueSize, (i) => keys[i]!, writeValue, alloc, out);
  while (level.length > 1) {
    const below = level;
    level = writeLevel(
      below.length,
      INTERNAL_NODE,
      8,
      (i) => below[i]!.key,
      (node, offset, i) => writeU64(node, offset, below[i]!.block),
      alloc,
      out,
    );
  }
  return level[0]!.block;
}

/** Number of blocks buildBtree writes for `n` keys of `valueSize` (to plan space before writing). */
export function btreeBlocks(n: number, valueSize: number): number {
  let total = Math.max(1, Math.ceil(n / maxEntries(valueSize)));
  let m = total;
  const intMax = maxEntries(8);
  while (m > 1) {
    m = Math.ceil(m / intMax);
    total += m;
  }
  return total;
}

// ------------------------------------------------------------------------------------ space maps

export interface SpaceMapRoot {
  nrBlocks: number;
  nrAllocated: number;
  bitmapRoot: number;
  refCountRoot: number;
}

export function readSpaceMapRoot(b: Buffer, off: number): SpaceMapRoot {
  return {
    nrBlocks: readU64(b, off),
    nrAllocated: readU64(b, off + 8),
    bitmapRoot: readU64(b, off + 16),
    refCountRoot: readU64(b, off + 24),
  };
}

export function writeSpaceMapRoot(b: Buffer, off: number, r: SpaceMapRoot): void {
  writeU64(b, off, r.nrBlocks);
  writeU64(b, off + 8, r.nrAllocated);
  writeU64(b, off + 16, r.bitmapRoot);
  writeU64(b, off + 24, r.refCountRoot);
}

interface IndexEntry {
  blocknr: number;
  nrFree: number;
  noneFreeBefore: number;
}

export function bitmapCount(nrBlocks: number): number {
  return Math.ceil(nrBlocks / ENTRIES_PER_BITMAP);
}

/**
 * Write the bitmap blocks of a space map whose counts are `counts` (length >= nrBlocks) into the
 * pre-allocated `bitmapBlocks`; returns their index entries and the blocks whose count exceeds 2
 * (for the ref count btree).
 */
function writeBitmaps(
  counts: Uint32Array,
  nrBlocks: number,
  bitmapBlocks: readonly number[],
  out: Map<number, Buffer>,
): { index: IndexEntry[]; overflow: number[] } {
  const index: IndexEntry[] = [];
  const overflow: number[] = [];
  for (let bi = 0; bi < bitmapBlocks.length; bi++) {
    const bm = Buffer.alloc(MD_BLOCK_BYTES);
    const first = bi * ENTRIES_PER_BITMAP;
    const n = Math.min(ENTRIES_PER_BITMAP, nrBlocks - first);
    let nrFree = 0;
    let noneFreeBefore = -1;
    for (let i = 0; i < n; i++) {
      const c = counts[first + i]!;
      if (c === 0) {
        nrFree++;
        if (noneFreeBefore < 0) noneFreeBefore = i;
        continue;
      }
      const v = c > 2 ? 3 : c;
      if (c > 2) overflow.push(first + i);
      const bit = (i & 3) * 2;
      // The first bit of the pair is the high bit of the 2-bit count.
      bm[BITMAP_HEADER_BYTES + (i >> 2)]! |= ((v >> 1) << bit) | ((v & 1) << (bit + 1));
    }
    sealBlock(bm, bitmapBlocks[bi]!, BITMAP_CSUM_XOR);
    out.set(bitmapBlocks[bi]!, bm);
    index.push({ blocknr: bitmapBlocks[bi]!, nrFree, noneFreeBefore: noneFreeBefore < 0 ? n : noneFreeBefore });
  }
  return { index, overflow };
}

function writeIndexEntry(b: Buffer, off: number, e: IndexEntry): void {
  writeU64(b, off, e.blocknr);
  b.writeUInt32LE(e.nrFree, off + 8);
  b.writeUInt32LE(e.noneFreeBefore, off + 12);
}

function countAllocated(counts: Uint32Array, nrBlocks: number): number {
  let n = 0;
  for (let i = 0; i < nrBlocks; i++) if (counts[i] !== 0) n++;
  return n;
}

/** Blocks writeDiskSpaceMap will allocate for `nrBlocks` entries of which `overflow` exceed 2. */
export function diskSpaceMapBlocks(nrBlocks: number, overflow: number): number {
  const bitmaps = bitmapCount(nrBlocks);
  return bitmaps + btreeBlocks(bitmaps, 16) + btreeBlocks(overflow, 4);
}

/** Write a disk space map (the data space map) with `counts`; returns its root. */
export function writeDiskSpaceMap(
  counts: Uint32Array,
  nrBlocks: number,
  alloc: BlockAllocator,
  out: Map<number, Buffer>,
): SpaceMapRoot {
  const bitmapBlocks = Array.from({ length: bitmapCount(nrBlocks) }, () => alloc());
  const { index, overflow } = writeBitmaps(counts, nrBlocks, bitmapBlocks, out);
  const indexKeys = index.map((_, i) => i);
  const bitmapRoot = buildBtree(indexKeys, 16, (node, off, i) => writeIndexEntry(node, off, index[i]!), alloc, out);
  const refCountRoot = buildBtree(
    overflow,
    4,
    (node, off, i) => node.writeUInt32LE(counts[overflow[i]!]!, off),
    alloc,
    out,
  );
  return { nrBlocks, nrAllocated: countAllocated(counts, nrBlocks), bitmapRoot, refCountRoot };
}

/**
 * Blocks of a metadata space map, allocated before its counts are known (it counts itself): the
 * index block and one bitmap per 16320 blocks.
 */
export interface MetadataSpaceMapPlan {
  indexBlock: number;
  bitmapBlocks: number[];
}

export function planMetadataSpaceMap(nrBlocks: number, alloc: BlockAllocator): MetadataSpaceMapPlan {
  const indexBlock = alloc();
  return { indexBlock, bitmapBlocks: Array.from({ length: bitmapCount(nrBlocks) }, () => alloc()) };
}

/**
 * Write the metadata space map: its ref count btree first (for blocks counted above 2; its own
 * blocks are counted through `onAlloc`... the caller's allocator), then bitmaps and the index
 * block from the final `counts`.
 */
export function writeMetadataSpaceMap(
  plan: MetadataSpaceMapPlan,
  counts: Uint32Array,
  nrBlocks: number,
  alloc: BlockAllocator,
  out: Map<number, Buffer>,
): SpaceMapRoot {
  const over: number[] = [];
  for (let i = 0; i < nrBlocks; i++) if (counts[i]! > 2) over.push(i);
  const refCountRoot = buildBtree(over, 4, (node, off, i) => node.writeUInt32LE(counts[over[i]!]!, off), alloc, out);
  const { index } = writeBitmaps(counts, nrBlocks, plan.bitmapBlocks, out);
  const ib = Buffer.alloc(MD_BLOCK_BYTES);
  for (let i = 0; i < index.length; i++) writeIndexEntry(ib, 16 + 16 * i, index[i]!);
  sealBlock(ib, plan.indexBlock, INDEX_CSUM_XOR);
  out.set(plan.indexBlock, ib);
  return { nrBlocks, nrAllocated: countAllocated(counts, nrBlocks), bitmapRoot: plan.indexBlock, refCountRoot };
}

function bitmapValue(bm: Buffer, i: number): number {
  const byte = bm[BITMAP_HEADER_BYTES + (i >> 2)]!;
  const bit = (i & 3) * 2;
  return (((byte >> bit) & 1) << 1) | ((byte >> (bit + 1)) & 1);
}

/** Counts from bitmaps plus the ref count btree (for entries marked 3). */
async function readCounts(
  read: BlockReader,
  bitmaps: readonly number[],
  nrBlocks: number,
  refCountRoot: number,
  what: string,
  into: Uint32Array,
  onBlock?: (b: number) => void,
): Promise<void> {
  const big = new Set<number>();
  for (let bi = 0; bi < bitmaps.length; bi++) {
    onBlock?.(bitmaps[bi]!);
    const bm = await read(bitmaps[bi]!);
    verifyBlock(bm, bitmaps[bi]!, BITMAP_CSUM_XOR, `${what} bitmap`);
    const first = bi * ENTRIES_PER_BITMAP;
    const n = Math.min(ENTRIES_PER_BITMAP, nrBlocks - first);
    for (let i = 0; i < n; i++) {
      const v = bitmapValue(bm, i);
      into[first + i] = v;
      if (v === 3) big.add(first + i);
    }
  }
  await walkBtree(read, refCountRoot, 4, `${what} ref count tree`, {
    onRef: onBlock,
    onValue(key, leaf, off) {
      if (key >= nrBlocks)
        throw metadataError(`${what}: ref count entry for block ${key} beyond the ${nrBlocks} blocks`);
      const c = leaf.readUInt32LE(off);
      if (into[key] !== 3)
        throw metadataError(`${what}: ref count tree holds block ${key} whose bitmap entry is ${into[key]}`);
      into[key] = c;
      big.delete(key);
    },
  });
  if (big.size > 0)
    throw metadataError(`${what}: block ${[...big][0]} is marked as counted in the ref count tree, which lacks it`);
}

/** Read a disk space map (data): the counts of its `root.nrBlocks` blocks. */
export async function readDiskSpaceMap(
  read: BlockReader,
  root: SpaceMapRoot,
  what: string,
  onBlock?: (b: number) => void,
): Promise<Uint32Array> {
  const n = bitmapCount(root.nrBlocks);
  const bitmaps: number[] = [];
  await walkBtree(read, root.bitmapRoot, 16, `${what} index`, {
    onRef: onBlock,
    onValue(key, leaf, off) {
      if (key !== bitmaps.length)
        throw metadataError(`${what}: index entry ${key} out of sequence (expected ${bitmaps.length})`);
      bitmaps.push(readU64(leaf, off));
    },
  });
  if (bitmaps.length !== n)
    throw metadataError(`${what}: ${bitmaps.length} bitmaps for ${root.nrBlocks} blocks, expected ${n}`);
  const counts = new Uint32Array(root.nrBlocks);
  await readCounts(read, bitmaps, root.nrBlocks, root.refCountRoot, what, counts, onBlock);
  return counts;
}

/** Read the metadata space map: the counts of its `root.nrBlocks` blocks. */
export async function readMetadataSpaceMap(read: BlockReader, root: SpaceMapRoot): Promise<Uint32Array> {
  const what = 'metadata space map';
  const n = bitmapCount(root.nrBlocks);
  if (n > MAX_METADATA_BITMAPS)
    throw metadataError(`${what}: ${root.nrBlocks} blocks need ${n} bitmaps, more than ${MAX_METADATA_BITMAPS}`);
  const ib = await read(root.bitmapRoot);
  verifyBlock(ib, root.bitmapRoot, INDEX_CSUM_XOR, `${what} index`);
  const bitmaps: number[] = [];
  for (let i = 0; i < n; i++) bitmaps.push(readU64(ib, 16 + 16 * i));
  const counts = new Uint32Array(root.nrBlocks);
  await readCounts(read, bitmaps, root.nrBlocks, root.refCountRoot, what, counts);
  return counts;
}
