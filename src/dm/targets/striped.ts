/**
 * The `striped` target (kernel drivers/md/dm-stripe.c; striped.rst): RAID-0 across N devices in
 * chunks of <chunk_size> sectors. Chunk c of the target lives on stripe c mod N, at chunk
 * floor(c / N) of that stripe's range.
 *
 * Checks, as the kernel's stripe_ctr and this project's brief: #stripes >= 1; chunk_size a power of
 * two and at least 8 sectors (one 4 KiB page); the target length a multiple of chunk_size * #stripes;
 * exactly 2 + 2 * #stripes arguments; every device big enough for offset + length / #stripes.
 * Status (STATUSTYPE_INFO) is `<#stripes> <dev>... ` then one letter per stripe: A (alive) or
 * D (an I/O error was seen), as dm-stripe prints it.
 */
import type { BlockDevice } from '../../blockdev/types.js';
import { isPowerOfTwo } from '../../util/bytes.js';
import type { TargetInstance, TargetType } from '../types.js';
import {
  checkDeviceAlignment,
  checkDeviceSize,
  combinedLimits,
  passThroughCapabilities,
  settleAll,
  uintArg,
} from './args.js';

const MIN_CHUNK_SECTORS = 8;

/*
 * Table grammar:  striped <#stripes> <chunk_size> <dev> <offset> [<dev> <offset>]...
 *   <#stripes>    number of devices, >= 1
 *   <chunk_size>  sectors per chunk: a power of two, >= 8
 *   <dev> <offset> one pair per stripe; offset in 512-byte sectors
 */
export const striped: TargetType = {
  name: 'striped',
  version: [1, 6, 0],
  async ctr(args, ctx): Promise<TargetInstance> {
    if (args.length < 2)
      throw ctx.error(
        args.length === 0 ? '#stripes' : 'chunk_size',
        "not enough arguments (expected 'striped <#stripes> <chunk_size> <dev> <offset>...')",
      );
    const stripes = uintArg(args[0]!, ctx, '#stripes', 1 << 20);
    if (stripes < 1) throw ctx.error('#stripes', 'must be at least 1');
    const chunkSectors = uintArg(args[1]!, ctx, 'chunk_size');
    if (!isPowerOfTwo(chunkSectors) || chunkSectors < MIN_CHUNK_SECTORS) {
      throw ctx.error(
        'chunk_size',
        `'${args[1]}' must be a power of two and at least ${MIN_CHUNK_SECTORS} sectors (4 KiB)`,
      );
    }
    if (ctx.lengthSectors % (chunkSectors * stripes) !== 0) {
      throw ctx.error(
        'chunk_size',
        `the target length ${ctx.lengthSectors} is not a multiple of chunk_size * #stripes (${chunkSectors} * ${stripes})`,
      );
    }
    if (args.length !== 2 + 2 * stripes) {
      throw ctx.error(
        args.length < 2 + 2 * stripes ? 'dev' : 'offset',
        `expected ${stripes} <dev> <offset> pairs (${2 + 2 * stripes} arguments), got ${args.length} arguments`,
      );
    }
    const widthSectors = ctx.lengthSectors / stripes;
    const devArgs: string[] = [];
    const offsets: number[] = [];
    for (let i = 0; i < stripes; i++) {
      devArgs.push(args[2 + 2 * i]!);
      offsets.push(uintArg(args[3 + 2 * i]!, ctx, `offset #${i}`));
    }
    const devs: BlockDevice[] = [];
    for (let i = 0; i < stripes; i++) {
      const d = await ctx.openDevice(devArgs[i]!, `dev #${i}`);
      checkDeviceSize(d, devArgs[i]!, ctx, `dev #${i}`, offsets[i]! + widthSectors);
      checkDeviceAlignment(d, devArgs[i]!, ctx, `offset #${i}`, offsets[i]!);
      devs.push(d);
    }
    const chunkBytes = chunkSectors * 512;
    const bases = offsets.map((o) => o * 512);
    const errors = new Array<number>(stripes).fill(0);
    const count = (i: number) => (e: unknown) => {
      errors[i]!++;
      throw e;
    };
    const counters = devs.map((_d, i) => count(i));

    /** Split by chunk; `op(stripe, devOffset, at, n)` per piece. */
    const each = (
      o: number,
      len: number,
      op: (s: number, devOffset: number, at: number, n: number) => Promise<void>,
    ): Promise<void> => {
      const ps: Promise<void>[] = [];
      let at = 0;
      while (at < len) {
        const pos = o + at;
        const chunk = Math.floor(pos / chunkBytes);
        const within = pos - chunk * chunkBytes;
        const n = Math.min(chunkBytes - within, len - at);
        const s = chunk % stripes;
        const devOffset = bases[s]! + Math.floor(chunk / stripes) * chunkBytes + within;
        ps.push(op(s, devOffset, at, n).catch(counters[s]!));
        at += n;
      }
      return ps.length === 1 ? ps[0]! : settleAll(ps);
    };
    const caps = passThroughCapabilities(devs);
    return {
      capabilities: caps,
      limits: combinedLimits(devs),
      read: (o, buf) => each(o, buf.length, (s, d, at, n) => devs[s]!.read(d, buf.subarray(at, at + n))),
      write: (o, data, flags) =>
        each(o, data.length, (s, d, at, n) => devs[s]!.write(d, data.subarray(at, at + n), flags)),
      flush: () => settleAll(devs.map((d) => d.flush())),
      discard: (o, len) => each(o, len, (s, d, _at, n) => devs[s]!.discard(d, n)),
      writeZeroes: (o, len, flags) => each(o, len, (s, d, _at, n) => devs[s]!.writeZeroes(d, n, flags)),
      status(kind) {
        if (kind === 'table')
          return `${stripes} ${chunkSectors}` + devArgs.map((d, i) => ` ${d} ${offsets[i]}`).join('');
        return (
          `${stripes} ` + devArgs.map((d) => `${d} `).join('') + ' ' + errors.map((e) => (e > 0 ? 'D' : 'A')).join('')
        );
      },
      dispose() {},
    };
  },
};
