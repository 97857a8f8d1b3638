/**
 * Argument helpers shared by the target constructors: strict counts and numbers, errors that name
 * the line, the target and the argument (through TargetContext.error).
 */
import type { BlockDevice, BlockDeviceLimits } from '../../blockdev/types.js';
import type { TargetCapabilities, TargetContext } from '../types.js';

/** Exactly `names.length` arguments, else an error listing the grammar. */
export function expectArgs(args: readonly string[], ctx: TargetContext, names: readonly string[]): void {
  if (args.length !== names.length) {
    const grammar = names.map((n) => `<${n}>`).join(' ');
    const what =
      args.length < names.length
        ? `missing <${names[args.length]}>`
        : `unexpected extra argument '${args[names.length]}'`;
    throw ctx.error(
      names[Math.min(args.length, names.length - 1)] ?? 'args',
      `${what} (expected '${ctx.targetName}${grammar ? ' ' + grammar : ''}')`,
    );
  }
}

/** An unsigned decimal that fits a safe integer (sector counts and offsets). */
export function uintArg(
  s: string,
  ctx: TargetContext,
  name: string,
  max = Math.floor(Number.MAX_SAFE_INTEGER / 512),
): number {
  if (!/^[0-9]+$/.test(s)) throw ctx.error(name, `'${s}' is not an unsigned decimal number`);
  const v = Number(s);
  if (!Number.isSafeInteger(v) || v > max) throw ctx.error(name, `'${s}' is too large (max ${max})`);
  return v;
}

/** Check that `dev` holds at least `needSectors` sectors. */
export function checkDeviceSize(
  dev: BlockDevice,
  arg: string,
  ctx: TargetContext,
  name: string,
  needSectors: number,
): void {
  const haveSectors = Math.floor(dev.sizeBytes / 512);
  if (haveSectors < needSectors) {
    throw ctx.error(
      name,
      `device ${arg} is too small: it has ${haveSectors} sectors, the target needs ${needSectors} (offset + length)`,
      'EDEVSIZE',
    );
  }
}

/** Wait for every promise (in-flight accounting stays exact, no write is left running), then throw the first failure. */
export async function settleAll(ps: Promise<void>[]): Promise<void> {
  const rs = await Promise.allSettled(ps);
  for (const r of rs) if (r.status === 'rejected') throw r.reason;
}

/** Limits of a target over several devices: the largest block sizes, the smallest request cap. */
export function combinedLimits(devs: readonly BlockDevice[]): BlockDeviceLimits {
  let lbs = 512;
  let pbs = 512;
  let max = 64 << 20;
  for (const d of devs) {
    lbs = Math.max(lbs, d.limits.logicalBlockBytes);
    pbs = Math.max(pbs, d.limits.physicalBlockBytes);
    max = Math.min(max, d.limits.maxRequestBytes);
  }
  return { logicalBlockBytes: lbs, physicalBlockBytes: pbs, maxRequestBytes: max };
}

/** Capabilities of a target that passes I/O straight to `devs`. */
export function passThroughCapabilities(devs: readonly BlockDevice[]): TargetCapabilities {
  return {
    write: devs.every((d) => d.capabilities.write),
    flush: devs.some((d) => d.capabilities.flush),
    discard: devs.every((d) => d.capabilities.discard),
    writeZeroes: devs.every((d) => d.capabilities.writeZeroes),
    multiConn: devs.every((d) => d.capabilities.multiConn),
  };
}

/** The offset on `dev` must fall on its logical block size (dm-table's alignment check). */
export function checkDeviceAlignment(
  dev: BlockDevice,
  arg: string,
  ctx: TargetContext,
  name: string,
  offsetSectors: number,
): void {
  const lbs = dev.limits.logicalBlockBytes;
  if ((offsetSectors * 512) % lbs !== 0) {
    throw ctx.error(
      name,
      `offset ${offsetSectors} is not aligned to the ${lbs}-byte logical blocks of device ${arg}`,
      'EALIGN',
    );
  }
}
