/**
 * Test-only dm `fault` target: `linear` plus src/blockdev/fault.ts (in the spirit of the kernel's
 * dm-flakey and dm-dust). Plug it into a DeviceRegistry with `targets: FAULT_TARGETS`.
 *
 * Table grammar:  fault <dev> <offset> [<word>...]
 *   <dev> <offset>        as for linear (offset in 512-byte sectors)
 *   fail_reads            every read fails with EIO
 *   fail_writes           every write fails with EIO
 *   fail_flush            every flush fails with EIO
 *   bad=<sector>+<count>  I/O touching these target sectors fails with EIO (repeatable)
 *   capacity=<sectors>    thin: writes needing more distinct space fail with ENOSPC
 *   crash_after=<n>       mutating calls after the n-th fail and reach nothing
 *   rate=<p>,<seed>[,<kind>]  seeded fraction of writes fault (kind fail|short|tear|crash)
 * Messages (dmsetup message <dev> 0 ...): the same words plus `clear`; `<word> off` removes one.
 */
import type { FaultPlan, FaultRange, WriteFaultKind } from '../../src/blockdev/fault.js';
import { FaultDevice } from '../../src/blockdev/fault.js';
import { BUILTIN_TARGETS } from '../../src/dm/targets/index.js';
import type { TargetContext, TargetInstance, TargetType } from '../../src/dm/types.js';

interface Words {
  failReads: boolean;
  failWrites: boolean;
  failFlush: boolean;
  bad: { startSectors: number; countSectors: number }[];
  capacitySectors?: number;
  crashAfter?: number;
  rate?: { probability: number; seed: number; kind: WriteFaultKind };
}

function parseWords(words: readonly string[], w: Words, err: (m: string) => Error): void {
  for (let i = 0; i < words.length; i++) {
    const word = words[i] ?? '';
    const off = words[i + 1] === 'off';
    if (off) i++;
    const [k, v] = word.split('=', 2) as [string, string | undefined];
    const num = (s: string | undefined): number => {
      if (s === undefined || !/^[0-9]+$/.test(s)) throw err(`'${word}': expected an unsigned number`);
      return Number(s);
    };
    switch (k) {
      case 'fail_reads':
        w.failReads = !off;
        break;
      case 'fail_writes':
        w.failWrites = !off;
        break;
      case 'fail_flush':
        w.failFlush = !off;
        break;
      case 'bad': {
        if (off) {
          w.bad = [];
          break;
        }
        const m = /^([0-9]+)\+([0-9]+)$/.exec(v ?? '');
        if (!m) throw err(`'${word}': expected bad=<sector>+<count>`);
        w.bad.push({ startSectors: Number(m[1]), countSectors: Number(m[2]) });
        break;
      }
      case 'capacity':
        if (off) delete w.capacitySectors;
        else w.capacitySectors = num(v);
        break;
      case 'crash_after':
        if (off) delete w.crashAfter;
        else w.crashAfter = num(v);
        break;
      case 'rate': {
        if (off) {
          delete w.rate;
          break;
        }
        const [p, s, kind = 'fail'] = (v ?? '').split(',');
        const probability = Number(p);
        if (!(probability >= 0 && probability <= 1) || !['fail', 'short', 'tear', 'crash'].includes(kind))
          throw err(`'${word}': expected rate=<0..1>,<seed>[,fail|short|tear|crash]`);
        w.rate = { probability, seed: num(s), kind: kind as WriteFaultKind };
        break;
      }
      case 'clear':
        w.failReads = w.failWrites = w.failFlush = false;
        w.bad = [];
        delete w.capacitySectors;
        delete w.crashAfter;
        delete w.rate;
        break;
      default:
        throw err(`unknown fault word '${word}'`);
    }
  }
}

function planOf(w: Words, baseBytes: number, lengthBytes: number): FaultPlan {
  const bad: FaultRange[] = w.bad.map((b) => ({
    offsetBytes: baseBytes + b.startSectors * 512,
    lengthBytes: b.countSectors * 512,
  }));
  if (w.failReads) bad.push({ offsetBytes: baseBytes, lengthBytes, ops: ['read'] });
  if (w.failWrites) bad.push({ offsetBytes: baseBytes, lengthBytes, ops: ['write'] });
  const plan: FaultPlan = { badRanges: bad, failFlushes: w.failFlush };
  if (w.capacitySectors !== undefined) plan.capacityBytes = w.capacitySectors * 512;
  if (w.crashAfter !== undefined) plan.crashAfterWrites = w.crashAfter;
  if (w.rate) plan.rate = w.rate;
  return plan;
}

export const fault: TargetType = {
  name: 'fault',
  version: [0, 1, 0],
  async ctr(args, ctx: TargetContext): Promise<TargetInstance> {
    if (args.length < 2) throw ctx.error('dev', "expected 'fault <dev> <offset> [<word>...]'");
    const [devArg, offArg, ...rest] = args as [string, string, ...string[]];
    if (!/^[0-9]+$/.test(offArg)) throw ctx.error('offset', `'${offArg}' is not an unsigned decimal number`);
    const offsetSectors = Number(offArg);
    const w: Words = { failReads: false, failWrites: false, failFlush: false, bad: [] };
    parseWords(rest, w, (m) => ctx.error('fault', m));
    const dev = await ctx.openDevice(devArg, 'dev');
    const base = offsetSectors * 512;
    const lengthBytes = ctx.lengthSectors * 512;
    if (dev.sizeBytes < base + lengthBytes) throw ctx.error('dev', `device ${devArg} is too small`, 'EDEVSIZE');
    const fd = new FaultDevice(dev, planOf(w, base, lengthBytes));
    return {
      capabilities: {
        write: dev.capabilities.write,
        flush: true,
        discard: dev.capabilities.discard,
        writeZeroes: dev.capabilities.writeZeroes,
        multiConn: dev.capabilities.multiConn,
      },
      limits: dev.limits,
      read: (o, buf) => fd.read(base + o, buf),
      write: (o, data, flags) => fd.write(base + o, data, flags),
      flush: () => fd.flush(),
      discard: (o, n) => fd.discard(base + o, n),
      writeZeroes: (o, n, flags) => fd.writeZeroes(base + o, n, flags),
      status: (kind) =>
        kind === 'table'
          ? [devArg, offArg, ...rest].join(' ')
          : `writes=${fd.stats.writes} flushes=${fd.stats.flushes} injected=${JSON.stringify(fd.stats.injected)}`,
      async message(margs) {
        parseWords(margs, w, (m) => ctx.error('message', m));
        fd.plan = planOf(w, base, lengthBytes);
        return '';
      },
      dispose() {},
    };
  },
};

/** The built-in targets plus `fault`. */
export const FAULT_TARGETS: Readonly<Record<string, TargetType>> = Object.freeze({ ...BUILTIN_TARGETS, fault });
