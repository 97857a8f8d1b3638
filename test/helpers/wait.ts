/**
 * Waiting in tests, always with a deadline and a message that says what did not happen (a test that
 * cannot finish fails; it never hangs until the runner's 15-minute timeout). Deadlines are generous:
 * they catch a hang, they are not timing assertions (a loaded 2-core machine stretches everything).
 */

export interface PollOptions {
  /** Give up after this many milliseconds. */
  deadlineMs: number;
  /** What is awaited, for the failure message ("the daemon's socket", "fio to exit"). */
  what: string;
  /** Pause between tries (default 50 ms). */
  intervalMs?: number;
  /** More words for the failure message, read when it fails (a log so far, the state seen last). */
  detail?: () => string;
}

/**
 * Call `fn` until it returns a value that is not `undefined`, `null` or `false`, and return that
 * value; a throw from `fn` counts as "not yet" (its last error is named in the failure). Fails with
 * `timed out after N ms waiting for <what>` at the deadline.
 * @example const pid = await pollUntil(() => readPid(dir), { deadlineMs: 10_000, what: 'the daemon pid file' });
 */
export async function pollUntil<T>(
  fn: () => T | undefined | null | false | Promise<T | undefined | null | false>,
  opts: PollOptions,
): Promise<T> {
  const end = Date.now() + opts.deadlineMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await fn();
      if (v !== undefined && v !== null && v !== false) return v;
    } catch (e) {
      last = e;
    }
    if (Date.now() >= end) {
      const why = last === undefined ? '' : ` (last error: ${last instanceof Error ? last.message : String(last)})`;
      const more = opts.detail ? `: ${opts.detail()}` : '';
      throw new Error(`timed out after ${opts.deadlineMs} ms waiting for ${opts.what}${why}${more}`);
    }
    await new Promise((r) => setTimeout(r, opts.intervalMs ?? 50));
  }
}

/**
 * `p`, or a failure naming `what` if it has not settled within `ms` (the promise itself is left to
 * settle later; the caller cleans up in its `finally`).
 * @example await within(c.call('daemon.ping'), 30_000, 'the ping to time out');
 */
export async function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  try {
    return await Promise.race([p, late]);
  } finally {
    clearTimeout(timer);
  }
}
