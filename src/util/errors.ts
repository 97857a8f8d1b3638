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

/**
 * Every error code, with what it means, one line each: the one place a code is defined. Codes are
 * stable (tests, scripts and the control protocol match on them); the exit code and errno belong
 * to each throw site (cryptsetup gives the same condition different exit codes in different verbs).
 * A new code gets its line here (CryptmapError takes only these: another code does not compile);
 * test/util/error-codes.test.ts checks that each code is listed once and used, and that merged
 * synonyms (EREADONLY -> EROFS, ENODEVICE -> ENODEV, EREQUIREMENTS -> EREQUIREMENT, EDEVSMALL ->
 * EDEVSIZE, EUSAGE and EPARAM -> EARGS, ENODAEMON -> EDAEMON_DOWN) stay merged.
 */
export const ERROR_CODES = {
  // ---- arguments and usage ----
  EARGS: 'invalid arguments: a command-line option or operand, or a parameter of a library call',
  EINVAL: 'an invalid value passed to an internal interface (buffer, integer, thread count)',
  ERANGE: 'a request past the end of a device',
  EALIGN: 'a request or size not aligned to the block or sector size',
  EUINT: 'a text that is not an unsigned integer where one is required',
  EU64: 'a text that is not an unsigned 64-bit integer where one is required',
  EHEX: 'a text that is not valid hex',
  ESIZE: 'a size in a manifest that is not a number with a unit, or too large',
  ESECTOR_SIZE: 'an unsupported encryption sector size',
  EKEY_SIZE: 'an unsupported key size',
  EABORT: 'the user did not confirm (anything but YES)',
  EINTR: 'terminal input interrupted (Ctrl-C)',
  ETTY: 'terminal input that ended (Ctrl-D, the terminal gone) or failed before the line asked for',
  EINTERNAL: 'an unexpected failure, or an operation that needs a running agent',
  // ---- devices and I/O ----
  ENODEV: 'a device, mapping or volume that does not exist or is not active',
  ENOTBLK: 'a path that is neither a regular file nor a block device',
  EOPEN: 'a device or file that cannot be opened',
  ECREATE: 'a file or directory that cannot be created or sized',
  EPROBE: 'a volume file that cannot be opened to probe it',
  EDELETE: 'a volume file that cannot be deleted',
  EDEVSIZE: 'a device whose size is unusable: too small for what must fit, not a block multiple, or unreadable',
  EROFS: 'a write to a device or header that is open read-only',
  ECLOSED: 'a device used after close',
  EREAD: 'a read from a device failed',
  EWRITE: 'a write to a device failed',
  EFLUSH: 'a flush of a device failed',
  EDISCARD: 'a discard on a device failed',
  ESHORTIO: 'a read ended before the bytes asked for',
  EIO: 'an I/O error (every leg of a mirror failed, a thin pool failed)',
  ENOSPC: 'a thin pool out of data space',
  EFAULT_EIO: 'an I/O error injected by the fault device (tests)',
  EFAULT_ENOSPC: 'a no-space error injected by the fault device (tests)',
  EFAULT_CRASH: 'a crash or torn write injected by the fault device (tests)',
  EIOERR: 'I/O on the error target',
  ENOTSUP: 'an operation the device or target does not support',
  EOPNOTSUPP: 'a thin-pool message refused in read-only or fail mode',
  EUNSUPPORTED: 'a target feature cryptmap does not implement',
  EBUSY: 'a device, volume or resource still in use',
  EEXIST: 'a device or file that already exists',
  ELOCKED: 'a device locked by another process',
  ELOCKDIR: 'a lock directory that cannot be created or trusted',
  // ---- device mapper ----
  ENAME: 'an invalid mapped device name',
  EUUID: 'an invalid UUID (mapped device or LUKS)',
  ETABLE: 'a dm table line that does not parse',
  ETARGET: 'an unknown dm target type',
  ELOOP: 'a dm table that would map a device onto itself',
  ENOTABLE: 'a mapped device without a live table',
  ENOMSG: 'a message to a target that takes none',
  EMESSAGE: 'a target message that is not understood',
  EKEYPLACE: 'a dm-crypt key given where another argument belongs',
  EKEYREF: 'a dm-crypt key reference the key store cannot resolve',
  ENOKEYSTORE: 'a dm-crypt key reference with no key store configured',
  ETHINMETA: 'thin-pool metadata that is invalid or cannot be changed so',
  ETHINMSG: 'a thin-pool message that is refused',
  ENOSPC_METADATA: 'the thin-pool metadata device is full',
  ENODATA: 'a thin device id that does not exist in the pool',
  // ---- crypto and engine ----
  ECIPHER_SPEC: 'text that is not a dm-crypt cipher specification',
  ECIPHER_UNSUPPORTED: 'a cipher specification naming a cipher, mode or IV mode cryptmap does not support',
  ECIPHER: 'a cipher and key size unusable for keyslot or data encryption',
  EBACKEND: 'an unknown or unavailable crypto backend',
  ENATIVE: 'the native addon is unavailable or failed',
  EOVERLAP: 'source and destination buffers overlap partially',
  EDISPOSED: 'a cipher or IV generator used after dispose',
  EHASH: 'a hash algorithm that is not available',
  EAFPARAM: 'invalid anti-forensic splitter parameters',
  EKDF: 'a key derivation that failed or an unknown KDF',
  EKDFPARAM: 'invalid KDF parameters',
  EKDFLIMIT: 'KDF costs outside cryptsetup limits',
  ENOMEM: 'not enough memory (Argon2)',
  // ---- LUKS ----
  ENOTLUKS: 'a device that is not a valid LUKS device (or not the type asked for)',
  ELUKS1HDR: 'a LUKS1 header that fails a check',
  ELUKS2BIN: 'a LUKS2 binary header that is truncated or invalid',
  ELUKS2MAGIC: 'no LUKS2 magic at a header copy offset',
  ELUKS2HDRSIZE: 'an unsupported LUKS2 header size',
  ELUKS2VERSION: 'an unsupported LUKS2 version',
  ELUKS2OFFSET: 'a LUKS2 header copy at an offset other than it claims',
  ELUKS2CSUM: 'a LUKS2 header copy whose checksum fails or whose algorithm is unknown',
  ELUKS2FIELD: 'a LUKS2 binary header field that is too long',
  ELUKS2JSON: 'LUKS2 JSON metadata that does not parse or fails a named check',
  ELUKS2HDR: 'a LUKS2 header with no valid copy left',
  ELUKS2SPACE: 'LUKS2 metadata larger than the JSON area',
  ELUKS2AF: 'an unsupported anti-forensic setting in a keyslot',
  ELUKS2AREA: 'a keyslot area too small for its key',
  ELUKS2TOKEN: 'a built-in LUKS2 token with invalid fields',
  EKDFTYPE: 'a keyslot KDF type that is not supported',
  EDIGEST: 'no digest for the data segment',
  ESEGMENT: 'a LUKS2 segment that is not a crypt segment',
  EREQUIREMENT: 'a LUKS2 header with unknown mandatory requirements',
  ECONCURRENT: 'a LUKS2 header changed by someone else since it was loaded',
  EKEYSLOT: 'a keyslot that is invalid, full, inactive or unusable',
  ENOSPACE: 'no room in the keyslots area for a new keyslot',
  ENOKEY: 'no keyslot opens with this passphrase',
  EVOLUMEKEY: 'a volume key that does not match the volume',
  EKEYMISMATCH: 'a key that does not match the suspended device',
  ETOKEN: 'a LUKS2 token that is invalid, missing or in use',
  ENOTOKEN: 'a token that cannot give a passphrase',
  ETOKENLUKS1: 'a token operation on LUKS1',
  ETOKENKEYRING: 'a luks2-keyring token that cannot be read',
  ETOKENPASS: 'a token whose passphrase opens no assigned keyslot',
  EBACKUP: 'a header backup that cannot be written or restored',
  EREPAIR: 'a LUKS1 header that repair cannot fix',
  ECONVERT: 'a LUKS1/LUKS2 conversion that is refused',
  EREENCRYPT: 'a reencryption step that is refused or fails',
  // ---- passphrases and key files ----
  EKEYFILE: 'a key file that cannot be opened or read as asked',
  EPIPE: 'nothing to read on standard input',
  EPASS: 'a passphrase that is too long',
  EVERIFY: 'the two passphrases typed do not match',
  EVK: 'a volume key file of the wrong size',
  EVKFILE: 'a volume key file that cannot be written',
  EJSONFILE: 'a JSON file that cannot be read',
  EPLAINHASH: 'a plain-mode passphrase hash that is not supported',
  ECRYPTTAB: 'a crypttab line that does not parse',
  ECRYPTTAB_KEY: 'a crypttab key source that cannot be read',
  // ---- daemon, control and volumes ----
  EPROTO: 'a control protocol message that is invalid',
  EUNKNOWN_OP: 'a control operation the daemon does not know',
  EDAEMON_DOWN: 'no daemon listens on the control socket',
  EDAEMON_GONE: 'the daemon closed the connection',
  EDAEMON_TIMEOUT: 'the daemon did not answer a request in time',
  EDAEMON_PERM: 'the control socket refuses this user',
  EDAEMON_RUNNING: 'another daemon already listens on the control socket',
  EDAEMON_START: 'the daemon did not start',
  EDAEMON_CHECK: 'the daemon cannot be asked whether it has a device open',
  ECONTROL_SOCKET: 'the control socket path is taken by something else',
  EUNTRUSTED_DAEMON: 'the control socket or its peer is not trusted',
  ESHUTDOWN: 'the daemon is shutting down',
  ESUSPENDED: 'a volume that is already suspended',
  ENOTSUSPENDED: 'a volume that is not suspended',
  ESUSPEND: 'suspending a device failed',
  EREFRESH: 'reloading a device table for refresh failed',
  ERESIZE: 'reloading a device table for resize failed',
  ERUNDIR: 'a daemon runtime directory or file that cannot be created or trusted',
  ERESUME: 'resuming a device failed',
  EKEY: 'an operation that needs the volume key',
  ENOTATTACHED: 'a device that is not attached',
  EATTACH: 'attaching a device (NBD, FUSE, loop) failed',
  EKEYTYPE: 'a kernel keyring key type that is not supported',
  EUNLOCK: 'a volume whose key no keyslot accepts',
  ESWAPUNSAFE: 'swapon refused on a userspace-served volume',
  // ---- NBD ----
  ENBDOPT: 'an NBD server option out of range',
  ENBDTLS: 'an NBD TLS setting that is invalid or unusable',
  ENBDSHUTDOWN: 'the NBD server is shutting down',
  ENBDNAME: 'an NBD export name that is too long or contains NUL',
  ENBDEXISTS: 'an NBD export name already in use',
  ENBDBLOCK: 'an NBD export block size that is not supported',
  ENBDNOEXPORT: 'an NBD export that does not exist',
  ENBDBUSY: 'an NBD export still in use',
  ENBDLISTEN: 'an NBD server socket that cannot be created',
  ENBDOPEN: 'an NBD export that cannot be opened',
  ENBDLOST: 'an NBD connection lost after acknowledged writes',
  ENBDIO: 'an NBD request the server failed',
  ENBDGONE: 'an NBD server that went away',
  EURI: 'an NBD URI that does not parse',
  // ---- key service and agent ----
  EROOTSECRET: 'a root secret or derivation input that is invalid',
  EROOTFORMAT: 'a wrapped root secret file not in cryptmap format',
  EROOTPASS: 'a wrapped root secret that does not unwrap',
  ESTATEDIR: 'a state directory that cannot be created or trusted',
  EKEYREQ: 'a key request that is invalid',
  ENOROOT: 'the key service has no root secret of the generation asked for (no rotation under way)',
  EPOLICY: 'a key service policy that is invalid',
  EAUDIT: 'an audit log that cannot be opened',
  EKEYD_UNREACHABLE: 'the key service is unreachable',
  EKEYD_DENIED: 'the key service refused the request',
  EACCES: 'a key service client that may not have this key (the key service reply)',
  EKEYD_PROTO: 'the key service sent an invalid answer',
  EKEYD_ADDRESS: 'a key service address that is invalid or lacks TLS files',
  EKEYD_TLS: 'a key service TLS file that cannot be read',
  EKEYD_TOKEN: 'a key service token file that cannot be read or trusted',
  EKEYD_UNTRUSTED: 'the key service socket or its peer is not trusted',
  EKEYD_RUNNING: 'another key service already listens on the socket',
  EKEYD_SOCKET: 'the key service socket path is taken by something else',
  EKEYD_LISTEN: 'the key service socket cannot be created',
  EAGENT_RUNNING: 'an agent is running on the state directory',
  EPOOL: 'a manifest thin pool that is not open (or not in the manifest) where a volume needs it',
  EVOLUME_NAMED: 'a volume still named in the agent manifest',
  EVOLUME_BUSY: 'a volume still open, attached or mounted',
  ENOVOLUME: 'a volume that is not in the manifest',
  EMANIFEST: 'a manifest that cannot be read or is invalid',
  ESTATE: 'an agent state file that cannot be read',
  EKEYLOST: 'a per-boot volume key that is gone',
  ELEASE_HELD: 'a shared volume whose lease another host holds',
  ECOORD: 'the lease store (etcd) failed or answered unexpectedly',
  ECOORD_TIMEOUT: 'the lease store (etcd) did not answer in time',
  ECOORD_UNREACHABLE: 'the lease store (etcd) is unreachable',
  EBOOTID: 'a boot id that is invalid',
  EMOUNTPOINT: 'a mount point that is unsafe or unusable',
  EUNTRUSTED_PATH: 'a path another user could change',
  ETOOL: 'an external tool that failed or is missing',
} as const;

/** A registered error code (ERROR_CODES): the compiler refuses a code that is not listed there. */
export type ErrorCode = keyof typeof ERROR_CODES;

/**
 * A code that arrives at run time (a daemon's reply, the addon's exception) as an ErrorCode: itself
 * when it is registered, else `fallback` (an unknown code never reaches a caller that matches on codes).
 */
export function toErrorCode(code: unknown, fallback: ErrorCode): ErrorCode {
  return typeof code === 'string' && Object.hasOwn(ERROR_CODES, code) ? (code as ErrorCode) : fallback;
}

export type Errno =
  | 'EIO'
  | 'EINVAL'
  | 'EPERM'
  | 'ENOSPC'
  | 'ENOMEM'
  | 'ENOTSUP'
  | 'EOVERFLOW'
  | 'ESHUTDOWN'
  | 'ENOENT'
  | 'EBUSY'
  | 'EEXIST';

export interface ErrorOptions {
  /** cryptsetup-style exit code for the CLI (default EXIT_WRONG_PARAMS). */
  exitCode?: number;
  /** POSIX errno name for protocol edges (default EINVAL). */
  errno?: Errno;
  /** Where it happened: offsets, lengths, device names, field paths. Never secrets. */
  context?: Record<string, unknown>;
  cause?: unknown;
}

/**
 * cryptmap's error: a stable `code` (ERROR_CODES), a message a person can act on, cryptsetup's exit
 * code, the errno for protocol edges, and context (never secrets).
 */
export class CryptmapError extends Error {
  readonly code: ErrorCode;
  readonly exitCode: number;
  readonly errno: Errno;
  readonly context: Record<string, unknown> | undefined;

  constructor(code: ErrorCode, message: string, options: ErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'CryptmapError';
    this.code = code;
    this.exitCode = options.exitCode ?? EXIT_WRONG_PARAMS;
    this.errno = options.errno ?? 'EINVAL';
    this.context = options.context;
  }
}

/** True when `e` is a CryptmapError, optionally with the given code. */
export function isCryptmapError(e: unknown, code?: ErrorCode): e is CryptmapError {
  return e instanceof CryptmapError && (code === undefined || e.code === code);
}

/** Map a Node system error (fs, net) to a CryptmapError, keeping its errno where we know it. */
export function fromSystemError(
  code: ErrorCode,
  message: string,
  e: unknown,
  context?: Record<string, unknown>,
): CryptmapError {
  const sys = (e as NodeJS.ErrnoException | undefined)?.code;
  const errno: Errno =
    sys === 'ENOSPC'
      ? 'ENOSPC'
      : sys === 'EPERM' || sys === 'EACCES' || sys === 'EROFS'
        ? 'EPERM'
        : sys === 'ENOENT'
          ? 'ENOENT'
          : sys === 'ENOMEM'
            ? 'ENOMEM'
            : 'EIO';
  const exitCode =
    errno === 'ENOENT'
      ? EXIT_WRONG_DEVICE
      : errno === 'EPERM'
        ? EXIT_NO_PERMISSION
        : errno === 'ENOMEM'
          ? EXIT_NOMEM
          : EXIT_FAILURE;
  const detail = e instanceof Error ? e.message : String(e);
  return new CryptmapError(code, `${message}: ${detail}`, { errno, exitCode, context, cause: e });
}
