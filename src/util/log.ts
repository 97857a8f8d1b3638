/**
 * Minimal structured logging to stderr. Levels: error, warn, info, debug (CRYPTMAP_LOG=debug).
 * Never pass key material: Secret values redact themselves, raw buffers must not be logged at all.
 */
const LEVELS = { error: 0, warn: 1, info: 2, debug: 3 } as const;
export type LogLevel = keyof typeof LEVELS;

let threshold: number = LEVELS[(process.env.CRYPTMAP_LOG as LogLevel) ?? 'info'] ?? LEVELS.info;
let sink: (line: string) => void = (line) => process.stderr.write(line + '\n');

export function setLogLevel(level: LogLevel): void {
  threshold = LEVELS[level];
}

/** Redirect log lines (tests capture them to check that no secret leaks). */
export function setLogSink(fn: (line: string) => void): void {
  sink = fn;
}

export interface Logger {
  error(msg: string, fields?: Record<string, unknown>): void;
  warn(msg: string, fields?: Record<string, unknown>): void;
  info(msg: string, fields?: Record<string, unknown>): void;
  debug(msg: string, fields?: Record<string, unknown>): void;
}

function fmt(v: unknown): string {
  if (typeof v === 'string') return /\s|"/.test(v) ? JSON.stringify(v) : v;
  if (typeof v === 'bigint') return v.toString();
  if (v instanceof Uint8Array) return `[${v.length} bytes]`;
  return JSON.stringify(v);
}

export function logger(component: string): Logger {
  const emit = (level: LogLevel, msg: string, fields?: Record<string, unknown>) => {
    if (LEVELS[level] > threshold) return;
    let line = `cryptmap[${component}] ${level}: ${msg}`;
    if (fields) for (const [k, v] of Object.entries(fields)) line += ` ${k}=${fmt(v)}`;
    sink(line);
  };
  return {
    error: (m, f) => emit('error', m, f),
    warn: (m, f) => emit('warn', m, f),
    info: (m, f) => emit('info', m, f),
    debug: (m, f) => emit('debug', m, f),
  };
}
