/**
 * Progress lines as cryptsetup 2.6 prints them for long operations (src/utils_progress.c, read for the
 * format only): on a terminal one line rewritten in place ("\e[2K\r" then `Progress:  42.0%, ETA
 * 00m03s,   12 MiB written, speed  10.5 MiB/s`), a line every N seconds with --progress-frequency N,
 * `Finished, time 00m04s,   32 MiB written, speed   8.0 MiB/s` at the end; nothing in batch mode
 * (-q); --progress-json prints one JSON object a line instead (numbers as strings, as cryptsetup):
 * {"device":..,"device_bytes":..,"device_size":..,"speed":..,"eta_ms":..,"time_ms":..}.
 * Updates come at most every 0.5 s (or every N seconds); the final one always.
 */
export interface ProgressOptions {
  device: string;
  /** --progress-frequency seconds (0: the in-place terminal line, every 0.5 s). */
  frequency?: number;
  batch?: boolean;
  json?: boolean;
  write: (s: string) => void;
  /** Monotonic clock in microseconds (tests inject one). */
  nowUs?: () => number;
}

const MIN90 = 5_400_000_000;
const H36 = 129_600_000_000;

function pad2(n: number): string {
  return String(Math.floor(n)).padStart(2, '0');
}

/** cryptsetup's time_to_human_string. */
export function humanTime(us: number): string {
  const s = Math.floor(us / 1e6);
  if (us < MIN90) return `${pad2(s / 60)}m${pad2(s % 60)}s`;
  if (us < H36) return `${pad2(s / 3600)}h${pad2((s / 60) % 60)}m${pad2(s % 60)}s`;
  return `${pad2(s / 86400)} days`;
}

function units(bytes: number): string {
  const b = BigInt(Math.floor(bytes));
  const steps: Array<[bigint, string, bigint]> = [
    [1n << 32n, 'MiB', 20n],
    [1n << 42n, 'GiB', 30n],
    [1n << 52n, 'TiB', 40n],
    [1n << 62n, 'PiB', 50n],
  ];
  for (const [lim, u, sh] of steps) if (b < lim) return `${String(b >> sh).padStart(4)} ${u}`;
  return `${String(b >> 60n).padStart(4)} EiB`;
}

function speed(bps: number): string {
  let v = bps;
  let u = 'B';
  if (v > 1073741824) [v, u] = [v / 1073741824, 'GiB'];
  else if (v > 1048576) [v, u] = [v / 1048576, 'MiB'];
  else if (v > 1024) [v, u] = [v / 1024, 'KiB'];
  return `speed ${v.toFixed(1).padStart(5)} ${u}/s`;
}

export class Progress {
  readonly #o: ProgressOptions;
  readonly #now: () => number;
  #start = -1;
  #last = 0;
  #startBytes = 0;

  constructor(o: ProgressOptions) {
    this.#o = o;
    this.#now = o.nowUs ?? (() => Number(process.hrtime.bigint() / 1000n));
  }

  /** Report `bytes` of `size` done (cryptsetup's tools_progress). */
  update(size: number, bytes: number): void {
    if (!this.#o.json && this.#o.batch) return;
    const now = this.#now();
    const final = bytes === size;
    if (this.#start < 0) {
      this.#start = now;
      this.#last = now;
      this.#startBytes = bytes;
      return;
    }
    const every = this.#o.frequency ? this.#o.frequency * 1e6 : 500_000;
    if (!final && now - this.#last < every) return;
    this.#last = now;
    const tdiff = (now - this.#start) / 1e6;
    if (!(tdiff > 0)) return;
    const bps = (bytes - this.#startBytes) / tdiff;
    if (this.#o.json) {
      const eta = final || !(bps > 0) ? 0 : Math.max(0, Math.floor((size / bps - tdiff) * 1e3));
      this.#o.write(
        `${JSON.stringify({ device: this.#o.device, device_bytes: String(bytes), device_size: String(size), speed: String(Math.floor(bps)), eta_ms: String(eta), time_ms: String(Math.floor(tdiff * 1e3)) })}\n`,
      );
      return;
    }
    if (!this.#o.frequency) this.#o.write('\x1b[2K\r');
    if (final) {
      this.#o.write(`Finished, time ${humanTime(tdiff * 1e6)}, ${units(bytes)} written, ${speed(bps)}\n`);
      return;
    }
    const eta = bps > 0 ? Math.max(0, (size / bps - tdiff) * 1e6) : 0;
    const pct = ((bytes / size) * 100).toFixed(1).padStart(5);
    this.#o.write(
      `Progress: ${pct}%, ETA ${humanTime(eta)}, ${units(bytes)} written, ${speed(bps)}${this.#o.frequency ? '\n' : ''}`,
    );
  }

  /** After an interruption: end the in-place line (cryptsetup clears it). */
  interrupted(): void {
    if (!this.#o.json && !this.#o.batch && !this.#o.frequency && this.#start >= 0) this.#o.write('\x1b[2K\r');
  }
}
