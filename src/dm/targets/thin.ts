/**
 * The `thin` target (kernel drivers/md/dm-thin.c `thin_ctr`, `thin_status`;
 * Documentation/admin-guide/device-mapper/thin-provisioning.rst): a thinly provisioned device of a
 * thin pool. Reads of unmapped blocks return zeros; the first write to a block allocates it from
 * the pool; writes to blocks shared with a snapshot copy them first (see ../thin/pool.ts).
 *
 * Facts taken from the kernel (learnt, not copied):
 *   - `<pool dev>` must be a mapped device with a live thin-pool table; the pool may not be
 *     suspended ("Unable to activate thin device while pool is suspended"), nor failed.
 *   - `<dev id>` (24 bits) must exist in the pool metadata (created with create_thin/create_snap).
 *   - `<external origin dev>` (opened read-only; not the pool device: "Error setting origin
 *     device"; the kernel compares the argument strings, here the opened devices are compared, so
 *     another spelling of the pool is refused too): reads of unmapped blocks come from it, zeros past its end; the first write to such a
 *     block copies the origin's block into the new one (break-on-write, as for a snapshot); a
 *     discarded block reads from the origin again. The origin is never written.
 *   - STATUSTYPE_TABLE: `<pool dev> <dev id>[ <external origin dev>]`.
 *   - STATUSTYPE_INFO: `<mapped sectors> <highest mapped sector>`, `-` for the latter when nothing
 *     is mapped; `Fail` when the pool failed.
 */
import type { BlockDevice } from '../../blockdev/types.js';
import { MAX_DEV_ID } from '../thin/metadata.js';
import type { Pool, ThinUser } from '../thin/pool.js';
import type { TargetInstance, TargetType } from '../types.js';
import { poolOf } from './thin-pool.js';
import { uintArg } from './args.js';

/*
 * Table grammar:
 *   thin <pool dev> <dev id> [<external origin dev>]
 *   <pool dev>  a mapped device whose table is a thin-pool (name, /dev/mapper/NAME or 253:MINOR)
 *   <dev id>    0..16777215, created in the pool with the create_thin or create_snap message
 *   <external origin dev>  a read-only device whose data unprovisioned blocks show
 */
export const thin: TargetType = {
  name: 'thin',
  version: [1, 23, 0],
  async ctr(args, ctx): Promise<TargetInstance> {
    if (args.length < 2 || args.length > 3) {
      throw ctx.error(
        args.length < 2 ? (args.length === 0 ? 'pool dev' : 'dev id') : 'args',
        `expected 'thin <pool dev> <dev id> [<external origin dev>]', got ${args.length} arguments`,
      );
    }
    const [poolArg, idArg] = args as [string, string];
    const devId = uintArg(idArg, ctx, 'dev id', MAX_DEV_ID);
    const originArg = args[2];
    const poolDev = await ctx.openDevice(poolArg, 'pool dev');
    const poolMd = ctx.mappedOf?.(poolDev);
    const pool = poolOf(poolMd);
    if (pool === undefined)
      throw ctx.error('pool dev', `${poolArg} is not an active thin-pool device (couldn't find pool object)`, 'ENODEV');
    const origin =
      originArg === undefined ? undefined : await ctx.openDevice(originArg, 'external origin dev', { readOnly: true });
    // By identity, not spelling: `pool`, `/dev/mapper/pool` and `253:N` are one device.
    if (origin !== undefined && (origin === poolDev || ctx.mappedOf?.(origin) === poolMd))
      throw ctx.error('external origin dev', 'error setting origin device: it is the pool device', 'EINVAL');
    if (pool.mode === 'fail') throw ctx.error('pool dev', "couldn't open thin device: the pool is in fail mode", 'EIO');
    if (pool.suspended) throw ctx.error('pool dev', 'unable to activate thin device while pool is suspended', 'EINVAL');
    const dev = pool.md.devices.get(devId);
    if (dev === undefined)
      throw ctx.error(
        'dev id',
        `couldn't open thin internal device: thin device ${devId} does not exist in the pool`,
        'ENODATA',
      );
    dev.openCount++;
    return new ThinTarget(pool, poolArg, devId, origin === undefined ? undefined : { dev: origin, arg: originArg! });
  },
};

class ThinTarget implements TargetInstance {
  readonly capabilities;
  readonly limits;
  readonly #pool: Pool;
  readonly #poolArg: string;
  readonly #devId: number;
  readonly #user: ThinUser;
  readonly #origin: BlockDevice | undefined;
  readonly #originArg: string | undefined;
  #disposed = false;

  constructor(pool: Pool, poolArg: string, devId: number, origin: { dev: BlockDevice; arg: string } | undefined) {
    this.#pool = pool;
    this.#poolArg = poolArg;
    this.#devId = devId;
    this.#origin = origin?.dev;
    this.#originArg = origin?.arg;
    this.#user = { devId, active: false };
    pool.users.add(this.#user);
    const data = pool.dataDev;
    this.capabilities = {
      write: data.capabilities.write && !pool.features.readOnly,
      flush: true,
      discard: pool.features.discardEnabled,
      writeZeroes: true,
      multiConn: data.capabilities.multiConn,
    };
    this.limits = {
      logicalBlockBytes: data.limits.logicalBlockBytes,
      physicalBlockBytes: data.limits.physicalBlockBytes,
      maxRequestBytes: data.limits.maxRequestBytes,
    };
  }

  read(o: number, buf: Uint8Array): Promise<void> {
    return this.#pool.read(this.#devId, o, buf, this.#origin);
  }
  write(o: number, data: Uint8Array, flags?: { fua?: boolean }): Promise<void> {
    return this.#pool.write(this.#devId, o, data, flags?.fua === true, this.#origin);
  }
  flush(): Promise<void> {
    return this.#pool.flush();
  }
  discard(o: number, n: number): Promise<void> {
    return this.#pool.unmap(this.#devId, o, n);
  }
  writeZeroes(o: number, n: number, flags?: { fua?: boolean; noHole?: boolean }): Promise<void> {
    return this.#pool.writeZeroes(this.#devId, o, n, flags, this.#origin);
  }
  async blockStatus(o: number, n: number) {
    return this.#pool.blockStatus(this.#devId, o, n, this.#origin);
  }

  resume(): void {
    this.#user.active = true;
  }
  postsuspend(): void {
    this.#user.active = false;
  }

  status(kind: 'table' | 'status'): string {
    if (kind === 'table')
      return `${this.#poolArg} ${this.#devId}${this.#originArg === undefined ? '' : ` ${this.#originArg}`}`;
    const p = this.#pool;
    if (p.mode === 'fail') return 'Fail';
    const d = p.md.devices.get(this.#devId);
    if (d === undefined) return '-';
    const hi = p.highestMapped(this.#devId);
    return `${d.map.size * p.blockSectors} ${hi < 0 ? '-' : (hi + 1) * p.blockSectors - 1}`;
  }

  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    this.#user.active = false;
    this.#pool.users.delete(this.#user);
    const d = this.#pool.md.devices.get(this.#devId);
    if (d !== undefined && d.openCount > 0) d.openCount--;
  }
}
