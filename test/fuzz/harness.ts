/**
 * Fuzz harness shared by test/fuzz/*.test.ts, scripts/fuzz.mjs and scripts/reliability.mjs.
 *
 * A target is `(input: Buffer) => Promise<void> | void` plus a fast-check arbitrary of inputs
 * (mutations of valid inputs, random bytes). The oracle, checked for every input:
 *   - the target returns, or throws a CryptmapError (a clean reject); any other exception fails;
 *   - it settles within CRYPTMAP_FUZZ_INPUT_MS (default 5 s): async hangs fail (a synchronous
 *     endless loop is caught by the per-test timeout, and by scripts/fuzz.mjs's watchdog);
 *   - process memory (heap + array buffers) stays within CRYPTMAP_FUZZ_MAX_MIB (default 512) of
 *     where the run started.
 * Environment:
 *   CRYPTMAP_FUZZ_MS       time budget per target (default: a fixed number of runs, ~1-3 s)
 *   CRYPTMAP_FUZZ_SEED     fast-check seed (default: fixed per target, so CI is deterministic)
 *   CRYPTMAP_FUZZ_SAVE=1   write failing inputs to test/fuzz/corpus/<target>/ (scripts/fuzz.mjs)
 *   CRYPTMAP_FUZZ_INFLIGHT=FILE  write each input there before running it, so a watchdog that kills
 *                          a hung process can save the input that hung it (scripts/fuzz.mjs)
 *   CRYPTMAP_RELIABILITY_OUT  append one JSON line of figures per target/suite (the report)
 * Every file under test/fuzz/corpus/<target>/ is replayed first: found bugs stay fixed.
 */
import { createHash } from 'node:crypto';
import {
  appendFileSync,
  closeSync,
  existsSync,
  ftruncateSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { CryptmapError } from '../../src/util/errors.js';

/** The repository root (this file is compiled to <dist>/test/fuzz/harness.js). */
export const REPO_ROOT = new URL('../../../', import.meta.url).pathname;
export const CORPUS_DIR = join(REPO_ROOT, 'test', 'fuzz', 'corpus');

export type FuzzFn = (input: Buffer) => Promise<void> | void;

export interface FuzzOptions {
  /** Runs when no time budget is set (CI). */
  numRuns?: number;
  /** Default seed (overridden by CRYPTMAP_FUZZ_SEED). */
  seed: number;
  /** Per-input timeout in ms. */
  inputTimeoutMs?: number;
  /** Extra oracle after each input (e.g. server still alive, accounting back to zero). */
  after?: () => Promise<void> | void;
}

export interface FuzzResult {
  target: string;
  inputs: number;
  corpus: number;
  ms: number;
  seed: number;
  /** How inputs ended: 'ok' (accepted) or the CryptmapError code that rejected them. */
  outcomes: Record<string, number>;
}

const MiB = 1 << 20;

function memNow(): number {
  const m = process.memoryUsage();
  return m.heapUsed + m.arrayBuffers;
}

/** Append a figure for the reliability report (no-op unless CRYPTMAP_RELIABILITY_OUT is set). */
export function report(record: Record<string, unknown>): void {
  const out = process.env.CRYPTMAP_RELIABILITY_OUT;
  if (out) appendFileSync(out, `${JSON.stringify(record)}\n`);
}

const faultTotals = new Map<string, { injected: number; survived: number }>();
/** Count injected faults that the system survived (the caller asserts survival). Reported on exit. */
export function recordFaults(suite: string, injected: number, survived: number): void {
  const t = faultTotals.get(suite) ?? { injected: 0, survived: 0 };
  t.injected += injected;
  t.survived += survived;
  if (!faultTotals.has(suite)) {
    faultTotals.set(suite, t);
    if (faultTotals.size === 1) {
      process.on('exit', () => {
        for (const [s, v] of faultTotals)
          report({ kind: 'fault', suite: s, injected: v.injected, survived: v.survived });
      });
    }
  }
}

/** The oracle for one input; throws an Error describing the violation. Returns 'ok' or the reject code. */
export async function checkOne(
  target: string,
  fn: FuzzFn,
  input: Buffer,
  timeoutMs: number,
  baseMem: number,
  maxMiB: number,
): Promise<string> {
  let outcome = 'ok';
  let timer: NodeJS.Timeout | undefined;
  const hang = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`${target}: input did not settle within ${timeoutMs} ms (hang)`)),
      timeoutMs,
    );
  });
  try {
    await Promise.race([Promise.resolve().then(() => fn(input)), hang]);
  } catch (e) {
    if (!(e instanceof CryptmapError)) {
      const what = e instanceof Error ? `${e.name}: ${e.message}\n${e.stack ?? ''}` : String(e);
      throw new Error(`${target}: threw something other than a CryptmapError: ${what}`);
    }
    outcome = e.code;
  } finally {
    clearTimeout(timer);
  }
  const grew = (memNow() - baseMem) / MiB;
  if (grew > maxMiB) throw new Error(`${target}: memory grew by ${grew.toFixed(0)} MiB (limit ${maxMiB})`);
  return outcome;
}

export function saveInput(target: string, input: Buffer): string {
  const dir = join(CORPUS_DIR, target);
  mkdirSync(dir, { recursive: true });
  const file = join(dir, `${createHash('sha256').update(input).digest('hex').slice(0, 16)}.bin`);
  writeFileSync(file, input);
  return file;
}

/** Replay the corpus, then fuzz; returns figures. Throws on the first oracle violation. */
export async function fuzz(
  target: string,
  arb: fc.Arbitrary<Buffer>,
  fn: FuzzFn,
  opts: FuzzOptions,
): Promise<FuzzResult> {
  const started = Date.now();
  const timeoutMs = Number(process.env.CRYPTMAP_FUZZ_INPUT_MS ?? opts.inputTimeoutMs ?? 5000);
  const maxMiB = Number(process.env.CRYPTMAP_FUZZ_MAX_MIB ?? 512);
  const baseMem = memNow();
  const dir = join(CORPUS_DIR, target);
  let corpus = 0;
  if (existsSync(dir)) {
    for (const f of readdirSync(dir).sort()) {
      await checkOne(`${target} (corpus ${f})`, fn, readFileSync(join(dir, f)), timeoutMs, baseMem, maxMiB);
      await opts.after?.();
      corpus++;
    }
  }
  const budgetMs = process.env.CRYPTMAP_FUZZ_MS ? Number(process.env.CRYPTMAP_FUZZ_MS) : undefined;
  const seed = process.env.CRYPTMAP_FUZZ_SEED ? Number(process.env.CRYPTMAP_FUZZ_SEED) : opts.seed;
  const inflightPath = process.env.CRYPTMAP_FUZZ_INFLIGHT;
  const inflight = inflightPath ? openSync(inflightPath, 'w', 0o600) : undefined;
  let inputs = 0;
  const outcomes: Record<string, number> = {};
  let failing: Buffer | undefined;
  const deadline = budgetMs === undefined ? Number.POSITIVE_INFINITY : Date.now() + budgetMs;
  const prop = fc.asyncProperty(arb, async (input) => {
    if (Date.now() > deadline) return; // budget spent: let fast-check wind down
    inputs++;
    if (inflight !== undefined) {
      writeSync(inflight, input, 0, input.length, 0);
      ftruncateSync(inflight, input.length);
    }
    try {
      const o = await checkOne(target, fn, input, timeoutMs, baseMem, maxMiB);
      outcomes[o] = (outcomes[o] ?? 0) + 1;
      await opts.after?.();
    } catch (e) {
      failing = input;
      throw e;
    }
  });
  try {
    await fc.assert(prop, {
      seed,
      numRuns: budgetMs === undefined ? (opts.numRuns ?? 200) : Number.MAX_SAFE_INTEGER,
      ...(budgetMs === undefined ? {} : { interruptAfterTimeLimit: budgetMs, markInterruptAsFailure: false }),
      endOnFailure: true,
    });
  } catch (e) {
    if (inflight !== undefined) closeSync(inflight);
    // fast-check keeps the property's own error in `cause`: show it, it names the violation.
    const cause = (e as Error).cause;
    const why = cause instanceof Error ? `\n${cause.message}` : '';
    let saved = '';
    if (failing && process.env.CRYPTMAP_FUZZ_SAVE === '1')
      saved = `\nfailing input saved to ${saveInput(target, failing)}`;
    throw new Error(`${(e as Error).message}${why}${saved}`, { cause: e });
  }
  if (inflight !== undefined) closeSync(inflight);
  const result = { target, inputs, corpus, ms: Date.now() - started, seed, outcomes };
  report({ kind: 'fuzz', ...result });
  return result;
}

// ---- input mutators (fast-check arbitraries over a valid sample) ----

/** Flip bits, overwrite bytes, truncate or extend a valid sample. */
export function mutations(
  sample: Buffer,
  opts: { maxEdits?: number; hot?: readonly [number, number][] } = {},
): fc.Arbitrary<Buffer> {
  const n = sample.length;
  const pos =
    opts.hot && opts.hot.length > 0
      ? fc.oneof(
          fc.nat(Math.max(0, n - 1)),
          ...opts.hot.map(([a, b]) => fc.integer({ min: a, max: Math.min(b, n - 1) })),
        )
      : fc.nat(Math.max(0, n - 1));
  const edit = fc.oneof(
    fc.record({ kind: fc.constant('flip' as const), at: pos, bit: fc.nat(7) }),
    fc.record({
      kind: fc.constant('set' as const),
      at: pos,
      value: fc.oneof(fc.constantFrom(0, 0xff, 0x7f, 0x80, 0x30, 0x22, 0x7b), fc.nat(255)),
    }),
  );
  return fc
    .tuple(
      fc.array(edit, { minLength: 1, maxLength: opts.maxEdits ?? 8 }),
      fc.oneof({ weight: 4, arbitrary: fc.constant(n) }, { weight: 1, arbitrary: fc.nat(n) }),
    )
    .map(([edits, len]) => {
      const b = Buffer.from(sample.subarray(0, len));
      for (const e of edits) {
        if (e.at >= b.length) continue;
        if (e.kind === 'flip') b[e.at] = (b[e.at] ?? 0) ^ (1 << e.bit);
        else b[e.at] = e.value;
      }
      return b;
    });
}

/** Token-level mutations of a text sample: drop, duplicate, swap, replace tokens with odd ones. */
export function textMutations(sample: string, odd: readonly string[]): fc.Arbitrary<Buffer> {
  const tokens = sample.split(/(\s+|[:=,{}[\]"'#-])/).filter((t) => t.length > 0);
  const n = tokens.length;
  const edit = fc.oneof(
    fc.record({ kind: fc.constant('drop' as const), at: fc.nat(n - 1) }),
    fc.record({ kind: fc.constant('dup' as const), at: fc.nat(n - 1) }),
    fc.record({
      kind: fc.constant('put' as const),
      at: fc.nat(n - 1),
      value: fc.oneof(fc.constantFrom(...odd), fc.string({ maxLength: 12 }), fc.constantFrom(...tokens)),
    }),
  );
  return fc.array(edit, { minLength: 1, maxLength: 6 }).map((edits) => {
    const t = [...tokens];
    for (const e of edits) {
      if (e.at >= t.length) continue;
      if (e.kind === 'drop') t.splice(e.at, 1);
      else if (e.kind === 'dup') t.splice(e.at, 0, t[e.at] ?? '');
      else t[e.at] = e.value;
    }
    return Buffer.from(t.join(''));
  });
}

/** Random text and bytes, for any text parser. */
export function junk(): fc.Arbitrary<Buffer> {
  return fc.oneof(
    fc.uint8Array({ maxLength: 512 }).map((u) => Buffer.from(u)),
    fc.string({ maxLength: 256, unit: 'binary' }).map((s) => Buffer.from(s)),
  );
}
