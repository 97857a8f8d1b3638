/**
 * The `thin-pool` target (kernel drivers/md/dm-thin.c `pool_ctr`, `pool_status`, `pool_message`;
 * Documentation/admin-guide/device-mapper/thin-provisioning.rst): binds a metadata device and a
 * data device into a pool of data blocks that `thin` devices allocate from. The metadata format is
 * the kernel's (../thin/metadata.ts), so thin_check/thin_dump/thin_restore and the kernel read it.
 *
 * Facts taken from the kernel (learnt, not copied):
 *   - data block size: 128 to 2097152 sectors (64 KiB to 1 GiB), a multiple of 128.
 *   - features: skip_block_zeroing, ignore_discard, no_discard_passdown, read_only,
 *     error_if_no_space; the pool's data size is the target length in whole blocks.
 *   - STATUSTYPE_TABLE: `<meta dev> <data dev> <block size> <low water> <#features> <features>...`,
 *     features in the order above, each followed by a space (so is the count).
 *   - STATUSTYPE_INFO: `<transaction id> <used meta>/<total meta> <used data>/<total data>
 *     <held root|-> rw|ro|out_of_data_space ignore_discard|discard_passdown|no_discard_passdown
 *     error_if_no_space|queue_if_no_space needs_check|- <metadata low watermark> ` (trailing
 *     space), or `Fail`.
 *   - Messages: create_thin <id>, create_snap <id> <origin id>, delete <id>,
 *     set_transaction_id <current> <new>, reserve_metadata_snap, release_metadata_snap; refused in
 *     read-only or fail mode (EOPNOTSUPP); the metadata is committed after each.
 *   - Device ids are 24 bits. A pool reloaded on the same mapped device keeps its in-core state
 *     (the kernel's pool table); the new table's settings apply when it goes live.
 *
 * Choices: device arguments print as given (not as MAJ:MIN); create_snap of an origin whose thin
 * device is live and not suspended is refused with EBUSY (the kernel documents that the origin
 * must be suspended but does not check).
 */
import type { BlockDevice } from '../../blockdev/types.js';
import { CryptmapError, type ErrorCode, isCryptmapError } from '../../util/errors.js';
import { MAX_DEV_ID, ThinMetadata } from '../thin/metadata.js';
import { Pool, type PoolFeatures } from '../thin/pool.js';
import type { TargetContext, TargetInstance, TargetType } from '../types.js';
import { checkDeviceSize, passThroughCapabilities, uintArg } from './args.js';

export const DATA_BLOCK_MIN_SECTORS = 128;
export const DATA_BLOCK_MAX_SECTORS = 2097152;

/** Pools by the mapped device that holds their `thin-pool` table (the kernel's pool table). */
const pools = new Map<object, Pool>();

/** Pools by their metadata device (a file device or a mapped device): one pool per metadata device. */
const byMetadata = new Map<object, Pool>();

/** The pool whose thin-pool table lives on the mapped device `owner`, if any. */
export function poolOf(owner: object | undefined): Pool | undefined {
  return owner === undefined ? undefined : pools.get(owner);
}

const FEATURE_ORDER = [
  'skip_block_zeroing',
  'ignore_discard',
  'no_discard_passdown',
  'read_only',
  'error_if_no_space',
] as const;

function featureWords(f: PoolFeatures): string[] {
  const on: Record<(typeof FEATURE_ORDER)[number], boolean> = {
    skip_block_zeroing: !f.zeroNewBlocks,
    ignore_discard: !f.discardEnabled,
    no_discard_passdown: !f.discardPassdown,
    read_only: f.readOnly,
    error_if_no_space: f.errorIfNoSpace,
  };
  return FEATURE_ORDER.filter((w) => on[w]);
}

function parseFeatures(args: readonly string[], ctx: TargetContext): PoolFeatures {
  const f: PoolFeatures = {
    zeroNewBlocks: true,
    discardEnabled: true,
    discardPassdown: true,
    readOnly: false,
    errorIfNoSpace: false,
  };
  if (args.length === 0) return f;
  const n = uintArg(args[0]!, ctx, '#feature args', 0xffffffff);
  if (n !== args.length - 1)
    throw ctx.error('#feature args', `says ${n} feature arguments but ${args.length - 1} follow`);
  for (const w of args.slice(1)) {
    if (w === 'skip_block_zeroing') f.zeroNewBlocks = false;
    else if (w === 'ignore_discard') f.discardEnabled = false;
    else if (w === 'no_discard_passdown') f.discardPassdown = false;
    else if (w === 'read_only') f.readOnly = true;
    else if (w === 'error_if_no_space') f.errorIfNoSpace = true;
    else throw ctx.error('feature', `unrecognised pool feature '${w}' (known: ${FEATURE_ORDER.join(', ')})`);
  }
  return f;
}

function msgError(
  message: string,
  errno: 'EINVAL' | 'EBUSY' | 'EEXIST' | 'ENOTSUP' | 'ENOENT' = 'EINVAL',
  code: ErrorCode = 'ETHINMSG',
): CryptmapError {
  return new CryptmapError(code, message, { errno });
}

function devIdArg(s: string | undefined, what: string): number {
  if (s === undefined || !/^[0-9]+$/.test(s) || Number(s) > MAX_DEV_ID)
    throw msgError(`message received with invalid ${what}: ${s ?? '(missing)'} (0 to ${MAX_DEV_ID})`);
  return Number(s);
}

function u64Arg(s: string | undefined, what: string): bigint {
  if (s === undefined || !/^[0-9]+$/.test(s) || BigInt(s) > 0xffffffffffffffffn)
    throw msgError(`invalid ${what}: ${s ?? '(missing)'}`);
  return BigInt(s);
}

/*
 * Table grammar:
 *   thin-pool <metadata dev> <data dev> <data block size> <low water mark> [<#feature args> <feature>...]
 *   <data block size>  sectors, 128..2097152, a multiple of 128
 *   <low water mark>   free data blocks at which a dm event is raised
 *   <feature>          skip_block_zeroing | ignore_discard | no_discard_passdown | read_only | error_if_no_space
 */
export const thinPool: TargetType = {
  name: 'thin-pool',
  version: [1, 23, 0],
  async ctr(args, ctx): Promise<TargetInstance> {
    const names = ['metadata dev', 'data dev', 'data block size', 'low water mark'];
    if (args.length < 4)
      throw ctx.error(
        names[args.length]!,
        "missing argument (expected 'thin-pool <metadata dev> <data dev> <data block size> <low water mark> [<#feature args> <feature>...]')",
      );
    const [metaArg, dataArg, bsArg, lwArg] = args as [string, string, string, string];
    const blockSectors = uintArg(bsArg, ctx, 'data block size', 0xffffffff);
    if (
      blockSectors < DATA_BLOCK_MIN_SECTORS ||
      blockSectors > DATA_BLOCK_MAX_SECTORS ||
      blockSectors % DATA_BLOCK_MIN_SECTORS !== 0
    ) {
      throw ctx.error(
        'data block size',
        `invalid block size ${blockSectors} (${DATA_BLOCK_MIN_SECTORS} to ${DATA_BLOCK_MAX_SECTORS} sectors, a multiple of ${DATA_BLOCK_MIN_SECTORS})`,
      );
    }
    const lowWater = uintArg(lwArg, ctx, 'low water mark');
    const features = parseFeatures(args.slice(4), ctx);
    if (ctx.owner === undefined)
      throw ctx.error('args', 'a thin-pool table must belong to a mapped device', 'EUNSUPPORTED');
    const nrDataBlocks = Math.floor(ctx.lengthSectors / blockSectors);
    if (nrDataBlocks === 0)
      throw ctx.error('data block size', `the target (${ctx.lengthSectors} sectors) is smaller than one data block`);
    const metaDev = await ctx.openDevice(metaArg, 'metadata dev');
    const dataDev = await ctx.openDevice(dataArg, 'data dev');
    checkDeviceSize(dataDev, dataArg, ctx, 'data dev', ctx.lengthSectors);
    const owner = ctx.owner;
    const raise = ctx.event ?? (() => {});
    let pool = pools.get(owner);
    const metaKey = ctx.mappedOf?.(metaDev) ?? metaDev;
    const other = byMetadata.get(metaKey);
    if (other !== undefined && other !== pool)
      throw ctx.error('metadata dev', `${metaArg} is already in use by another thin pool`, 'EBUSY');
    if (pool !== undefined) {
      // By identity: another spelling of the same device (`m`, `/dev/mapper/m`, `253:N`) is the same device.
      if (byMetadata.get(metaKey) !== pool) {
        throw ctx.error(
          'metadata dev',
          `the pool uses metadata device ${pool.metadataArg}; a reload cannot switch it to ${metaArg}`,
          'EBUSY',
        );
      }
      if (pool.blockSectors !== blockSectors) {
        throw ctx.error(
          'data block size',
          `changing the data block size (from ${pool.blockSectors} to ${blockSectors}) is not supported`,
        );
      }
      if (nrDataBlocks < pool.md.nrDataBlocks) {
        throw ctx.error('args', `pool target (${nrDataBlocks} blocks) too small: expected ${pool.md.nrDataBlocks}`);
      }
    } else {
      if (features.readOnly) {
        const sb = Buffer.alloc(512);
        await metaDev.read(0, sb);
        if (sb.every((x) => x === 0))
          throw ctx.error(
            'metadata dev',
            'the metadata device is blank and the pool is read_only: it cannot be formatted',
          );
      }
      let md: ThinMetadata;
      try {
        md = await ThinMetadata.open(metaDev, blockSectors, nrDataBlocks);
      } catch (e) {
        if (isCryptmapError(e)) throw ctx.error('metadata dev', e.message, e.code);
        throw e;
      }
      pool = new Pool(md, metaArg, metaDev, dataDev, blockSectors, lowWater, features, raise);
      pools.set(owner, pool);
      byMetadata.set(metaKey, pool);
    }
    pool.refs++;
    return new PoolTarget(pool, owner, metaArg, dataArg, metaDev, dataDev, nrDataBlocks, lowWater, features, raise);
  },
};

class PoolTarget implements TargetInstance {
  readonly capabilities;
  readonly limits;
  readonly #pool: Pool;
  readonly #owner: object;
  readonly #metaArg: string;
  readonly #dataArg: string;
  readonly #metaDev: BlockDevice;
  readonly #dataDev: BlockDevice;
  readonly #nrDataBlocks: number;
  readonly #lowWater: number;
  readonly #features: PoolFeatures;
  readonly #raise: () => void;
  #disposed = false;

  constructor(
    pool: Pool,
    owner: object,
    metaArg: string,
    dataArg: string,
    metaDev: BlockDevice,
    dataDev: BlockDevice,
    nrDataBlocks: number,
    lowWater: number,
    features: PoolFeatures,
    raise: () => void,
  ) {
    this.#pool = pool;
    this.#owner = owner;
    this.#metaArg = metaArg;
    this.#dataArg = dataArg;
    this.#metaDev = metaDev;
    this.#dataDev = dataDev;
    this.#nrDataBlocks = nrDataBlocks;
    this.#lowWater = lowWater;
    this.#features = features;
    this.#raise = raise;
    this.capabilities = passThroughCapabilities([dataDev]);
    this.limits = dataDev.limits;
  }

  // I/O on the pool device itself goes to the data device, as the kernel's pool_map remaps it.
  read(o: number, buf: Uint8Array): Promise<void> {
    return this.#dataDev.read(o, buf);
  }
  write(o: number, data: Uint8Array, flags?: { fua?: boolean }): Promise<void> {
    return this.#dataDev.write(o, data, flags);
  }
  flush(): Promise<void> {
    return this.#dataDev.flush();
  }
  discard(o: number, n: number): Promise<void> {
    return this.#dataDev.discard(o, n);
  }

  preresume(): void {
    this.#pool.rebind(this.#metaDev, this.#dataDev, this.#nrDataBlocks, this.#lowWater, this.#features, this.#raise);
  }

  resume(): void {
    this.#pool.releaseThinIo();
  }

  /**
   * As the kernel's pool suspend: the thin devices' I/O is held (and drained, within
   * HOLD_DRAIN_TIMEOUT_MS) until resume, then the metadata committed (commits are serialised, so
   * one with I/O still in flight is as safe as a thin device's flush).
   */
  async postsuspend(): Promise<void> {
    await this.#pool.holdThinIo();
    await this.#pool.commit().catch(() => {});
  }

  status(kind: 'table' | 'status'): string {
    const p = this.#pool;
    if (kind === 'table') {
      const fw = featureWords(this.#features);
      return `${this.#metaArg} ${this.#dataArg} ${p.blockSectors} ${this.#lowWater} ${fw.length} ${fw.map((w) => `${w} `).join('')}`;
    }
    if (p.mode === 'fail') return 'Fail';
    const md = p.md;
    const usedData = md.nrDataBlocks - md.freeDataBlocks;
    const f = p.features;
    return (
      `${md.transactionId} ${md.usedMetadataBlocks}/${md.nrMetaBlocks} ${usedData}/${md.nrDataBlocks} ` +
      `${md.heldRoot !== 0 ? md.heldRoot : '-'} ` +
      `${p.mode === 'out_of_data_space' ? 'out_of_data_space' : p.mode === 'ro' ? 'ro' : 'rw'} ` +
      `${!f.discardEnabled ? 'ignore_discard' : f.discardPassdown ? 'discard_passdown' : 'no_discard_passdown'} ` +
      `${f.errorIfNoSpace ? 'error_if_no_space' : 'queue_if_no_space'} ` +
      `${md.flags & 1 ? 'needs_check' : '-'} ${p.metadataThreshold()} `
    );
  }

  async message(args: string[]): Promise<string> {
    const p = this.#pool;
    if (p.mode === 'ro' || p.mode === 'fail') {
      throw msgError('unable to service pool target messages in READ_ONLY or FAIL mode', 'ENOTSUP', 'EOPNOTSUPP');
    }
    // dmsetup joins the message words with spaces and the kernel splits them again (dm_split_args).
    const [cmd, ...rest] = args
      .join(' ')
      .trim()
      .split(/\s+/)
      .filter((w) => w !== '');
    const count = (n: number): void => {
      if (rest.length !== n)
        throw msgError(`wrong number of arguments for '${cmd}' message: ${rest.length} (expected ${n})`);
    };
    const md = p.md;
    switch (cmd) {
      case 'create_thin':
        count(1);
        md.createThin(devIdArg(rest[0], 'device id'));
        break;
      case 'create_snap': {
        count(2);
        const id = devIdArg(rest[0], 'device id');
        const origin = devIdArg(rest[1], 'origin device id');
        for (const u of p.users) {
          if (u.devId === origin && u.active)
            throw msgError(
              `the origin thin device ${origin} is active: suspend it before taking a snapshot`,
              'EBUSY',
              'EBUSY',
            );
        }
        md.createSnap(id, origin);
        break;
      }
      case 'delete':
        count(1);
        md.deleteThin(devIdArg(rest[0], 'device id'));
        break;
      case 'set_transaction_id':
        count(2);
        md.setTransactionId(u64Arg(rest[0], 'current transaction id'), u64Arg(rest[1], 'new transaction id'));
        break;
      case 'reserve_metadata_snap':
        count(0);
        await p.metadataOp((m) => m.reserveMetadataSnap());
        break;
      case 'release_metadata_snap':
        count(0);
        await p.metadataOp((m) => m.releaseMetadataSnap());
        break;
      default:
        throw msgError(
          `unrecognised thin pool target message received: ${cmd ?? '(none)'} (known: create_thin, create_snap, delete, set_transaction_id, reserve_metadata_snap, release_metadata_snap)`,
        );
    }
    await p.commit();
    return '';
  }

  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    const p = this.#pool;
    if (--p.refs === 0) {
      if (pools.get(this.#owner) === p) pools.delete(this.#owner);
      for (const [k, v] of byMetadata) if (v === p) byMetadata.delete(k);
      p.mode = 'fail';
      p.wakeSpaceWaiters();
      p.releaseThinIo();
    }
  }
}
