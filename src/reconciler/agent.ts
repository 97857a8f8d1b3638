/**
 * The agent's control loop around apply (what `cryptmap agent` and `npm start` run, once the data
 * path is wired in as VolumePorts): reconcile, and while some volume waits for the key service,
 * reconcile again every `intervalMs` until it converges or the signal aborts; on shutdown, tear
 * everything down (persistent volumes closed and kept, ephemeral volumes and swap deleted, per-boot
 * keys wiped).
 *
 * Boot id: `/proc/sys/kernel/random/boot_id` (a new value after every reboot), or `--boot-id` in tests.
 */
import { readFile } from 'node:fs/promises';
import { CryptmapError } from '../util/errors.js';
import { type ApplyOptions, type ApplyReport, apply } from './apply.js';

export const BOOT_ID_PATH = '/proc/sys/kernel/random/boot_id';

/** The current boot id, or `override` when given (validated: 1-128 of [A-Za-z0-9._-]). */
export async function readBootId(override?: string, path = BOOT_ID_PATH): Promise<string> {
  if (override !== undefined) {
    if (!/^[A-Za-z0-9._-]{1,128}$/.test(override))
      throw new CryptmapError('EBOOTID', `--boot-id '${override}' must be 1-128 letters, digits, . _ -`);
    return override;
  }
  try {
    const id = (await readFile(path, 'utf8')).trim();
    if (id !== '') return id;
  } catch {}
  throw new CryptmapError('EBOOTID', `cannot read ${path}; give --boot-id`);
}

export interface LoopOptions extends ApplyOptions {
  /** Wait between reconciliations while a volume waits for keys (default 5 s). */
  intervalMs?: number;
  signal?: AbortSignal;
  onReport?: (r: ApplyReport) => void;
}

function wait(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((res) => {
    if (signal?.aborted) return res();
    const t = setTimeout(done, ms);
    function done() {
      clearTimeout(t);
      signal?.removeEventListener('abort', done);
      res();
    }
    signal?.addEventListener('abort', done, { once: true });
  });
}

/** Reconcile until nothing waits for the key service any more (or aborted); returns the last report. */
export async function reconcileUntilSettled(opts: LoopOptions): Promise<ApplyReport> {
  const sleep = opts.sleep ?? ((ms: number) => wait(ms, opts.signal));
  for (;;) {
    const r = await apply(opts);
    opts.onReport?.(r);
    if (!r.retryLater || opts.signal?.aborted) return r;
    await sleep(opts.intervalMs ?? 5000);
    if (opts.signal?.aborted) return r;
  }
}

/** Tear down every volume the record knows (see ApplyOptions.mode `shutdown`). */
export function shutdown(opts: Omit<ApplyOptions, 'targets' | 'mode'>): Promise<ApplyReport> {
  return apply({ ...opts, targets: [], mode: 'shutdown' });
}
