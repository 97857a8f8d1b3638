/**
 * Errors with a stable code, a message a person can act on, and context.
 *
 * Every failure that reaches a user is a `CryptmapError`. `code` is stable (tests and scripts match
 * on it, never on the message); `exitCode` follows cryptsetup's RETURN CODES so the CLI can exit
 * with it; `errno` is the POSIX name a protocol edge (NBD) maps the failure to.
 * Messages never contain key material or passphrases.
 */

/** cryptsetup(8) RETURN CODES. */
export const EXIT_OK = 0;
export const EXIT_WRONG_PARAMS = 1;
export const EXIT_NO_PERMISSION = 2;
export const EXIT_NOMEM = 3;
export const EXIT_WRONG_DEVICE = 4;
export const EXIT_BUSY = 5;
export const EXIT_FAILURE = 1;

export type Errno = 'EIO' | 'EINVAL' | 'EPERM' | 'ENOSPC' | 'ENOMEM' | 'ENOTSUP' | 'EOVERFLOW' | 'ESHUTDOWN' | 'ENOENT' | 'EBUSY' | 'EEXIST';

export interface ErrorOptions {
  /** cryptsetup-style exit code for the CLI (default EXIT_WRONG_PARAMS). */
  exitCode?: number;
  /** POSIX errno name for protocol edges (default EINVAL). */
  errno?: Errno;
  /** Where it happened: offsets, lengths, device names, field paths. Never secrets. */
  context?: Record<string, unknown>;
  cause?: unknown;
}

export class CryptmapError extends Error {
  readonly code: string;
  readonly exitCode: number;
  readonly errno: Errno;
  readonly context: Record<string, unknown> | undefined;

  constructor(code: string, message: string, options: ErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'CryptmapError';
    this.code = code;
    this.exitCode = options.exitCode ?? EXIT_WRONG_PARAMS;
    this.errno = options.errno ?? 'EINVAL';
    this.context = options.context;
  }
}

/** True when `e` is a CryptmapError, optionally with the given code. */
export function isCryptmapError(e: unknown, code?: string): e is CryptmapError {
  return e instanceof CryptmapError && (code === undefined || e.code === code);
}

/** Map a Node system error (fs, net) to a CryptmapError, keeping its errno where we know it. */
export function fromSystemError(code: string, message: string, e: unknown, context?: Record<string, unknown>): CryptmapError {
  const sys = (e as NodeJS.ErrnoException | undefined)?.code;
  const errno: Errno =
    sys === 'ENOSPC' ? 'ENOSPC' : sys === 'EPERM' || sys === 'EACCES' || sys === 'EROFS' ? 'EPERM' : sys === 'ENOENT' ? 'ENOENT' : sys === 'ENOMEM' ? 'ENOMEM' : 'EIO';
  const exitCode = errno === 'ENOENT' ? EXIT_WRONG_DEVICE : errno === 'EPERM' ? EXIT_NO_PERMISSION : errno === 'ENOMEM' ? EXIT_NOMEM : EXIT_FAILURE;
  const detail = e instanceof Error ? e.message : String(e);
  return new CryptmapError(code, `${message}: ${detail}`, { errno, exitCode, context, cause: e });
}
