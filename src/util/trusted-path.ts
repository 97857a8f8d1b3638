/**
 * Trusted paths: the directories and files that the daemon, the agent and keyd create or read as
 * secrets (runtime and state dirs, sockets, root secrets, pid files, logs, lock files) must not be
 * under another local user's control. The rule, as OpenSSH's StrictModes (`safe_path`) and systemd's
 * `chase(CHASE_SAFE)` apply it:
 *
 *   every directory on the path, from `/` down to the directory itself, is owned by root or by the
 *   caller's uid and is not writable by group or others; symlinks on the way are followed only when
 *   owned by root or the caller (and the directory holding them passed the same check).
 *
 * Sticky directories (`/tmp`, mode 1777, owned by root) are accepted on the way, as systemd and the
 * kernel's protected_* sysctls accept them: in a sticky directory nobody but an entry's owner (and
 * root) can rename or remove it, so `/tmp/cryptmap-0` owned by us stays ours. They are never accepted
 * as the directory itself (a secret never sits directly in /tmp), and they are never modified.
 * OpenSSH refuses them everywhere; we follow systemd here because the non-root lock directory lives
 * under /tmp. A `mode 'root'` walk (mountpoints) trusts root alone. One more exception, for `npm start`
 * in a checkout made with umask 002: a directory of the caller (not root) that is group-writable only
 * by the caller's user private group (no other member) is accepted on the way (isCallerPrivateGroup).
 *
 * Nothing here ever chmods or chowns a directory that existed before: a directory that fails the
 * rule is refused with an error naming it and the fix. Missing directories are created one component
 * at a time with mkdir (mode 0700 unless asked otherwise) and checked again after creation (another
 * process may have won the race). Files are opened with O_NOFOLLOW (a planted symlink fails with
 * ELOOP), new ones with O_EXCL, and their owner, type and link count are checked with fstat on the
 * open descriptor, so what is checked is what is read or written.
 *
 * Files root makes where the user asks (a detached LUKS header, a header export, a header backup, a
 * volume key file) follow a narrower rule (checkNewFileDir): any owner, but no directory on the way
 * writable by others unless sticky; the file is then used only through the descriptor that created it
 * and removed only while its path still names it (unlinkIfSame).
 */
import { randomBytes } from 'node:crypto';
import {
  closeSync,
  constants,
  fstatSync,
  lstatSync,
  mkdirSync,
  openSync,
  readFileSync,
  readlinkSync,
  readSync,
  renameSync,
  type Stats,
  unlinkSync,
  writeSync,
} from 'node:fs';
import { basename, dirname, resolve } from 'node:path';
import { CryptmapError, type ErrorCode, EXIT_NO_PERMISSION, fromSystemError } from './errors.js';
import { allocSecretBuffer } from './secret.js';

export interface TrustOptions {
  /** The uid trusted besides root (default: this process's uid). */
  uid?: number;
  /**
   * `root-or-caller` (default) or `root`: only root-owned components (the agent's mountpoints);
   * `any`: a directory's owner is trusted, whoever it is (checkNewFileDir: the user named the place).
   */
  owners?: 'root-or-caller' | 'root' | 'any';
  /** A sticky directory is accepted as the directory itself too, not only on the way (checkNewFileDir). */
  stickyDir?: boolean;
  /** Error code for refusals (default EUNTRUSTED_PATH); call sites keep their established codes. */
  code?: ErrorCode;
  /** `follow` (default): trusted symlinks are followed; `refuse`: any symlink on the path is refused (mountpoints). */
  symlinks?: 'follow' | 'refuse';
}

const MAX_SYMLINKS = 40;

function callerUid(o: TrustOptions): number {
  return o.uid ?? process.getuid?.() ?? 0;
}

function refuse(o: TrustOptions, path: string, why: string, fix: string): CryptmapError {
  return new CryptmapError(o.code ?? 'EUNTRUSTED_PATH', `refusing ${path}: ${why}; ${fix}`, {
    exitCode: EXIT_NO_PERMISSION,
    errno: 'EPERM',
    context: { path },
  });
}

function ownerOk(st: Stats, o: TrustOptions): boolean {
  return o.owners === 'any' || st.uid === 0 || (o.owners !== 'root' && st.uid === callerUid(o));
}

function ownersText(o: TrustOptions): string {
  return o.owners === 'root' ? 'root' : `root or uid ${callerUid(o)}`;
}

const privateGroups = new Map<number, boolean>();

/**
 * True when `gid` is the caller's user private group (Debian/Ubuntu `USERGROUPS_ENAB`, where a
 * umask of 002 makes a user's checkout group-writable): the caller's own primary group, listed in
 * /etc/group with no member but the caller, and no other account in /etc/passwd has it as primary.
 * Group write on such a directory gives nobody else anything. Unknown to /etc/group: false.
 */
function isCallerPrivateGroup(gid: number, uid: number): boolean {
  if (uid === 0 || gid !== process.getgid?.()) return false;
  const known = privateGroups.get(gid);
  if (known !== undefined) return known;
  let ok = false;
  try {
    const passwd = readFileSync('/etc/passwd', 'utf8')
      .split('\n')
      .map((l) => l.split(':'));
    const me = passwd.find((f) => Number(f[2]) === uid)?.[0];
    const grp = readFileSync('/etc/group', 'utf8')
      .split('\n')
      .map((l) => l.split(':'))
      .find((f) => Number(f[2]) === gid && f.length >= 4);
    const members = (grp?.[3] ?? '').split(',').filter(Boolean);
    ok =
      me !== undefined &&
      grp !== undefined &&
      grp[0] === me &&
      members.every((m) => m === me) &&
      passwd.every((f) => f.length < 4 || Number(f[3]) !== gid || Number(f[2]) === uid);
  } catch {
    ok = false;
  }
  privateGroups.set(gid, ok);
  return ok;
}

/** Why the directory `path` (lstat `st`) is not trustworthy on the way to something, or undefined. */
function checkDir(path: string, st: Stats, o: TrustOptions, asAncestor: boolean): CryptmapError | undefined {
  if (!ownerOk(st, o)) {
    return refuse(
      o,
      path,
      `it belongs to uid ${st.uid}, not to ${ownersText(o)}, so that user could replace what is in it`,
      'use a directory owned by root or by you',
    );
  }
  if ((st.mode & 0o022) !== 0) {
    const stickyRoot =
      (asAncestor || o.stickyDir === true) && (st.uid === 0 || o.owners === 'any') && (st.mode & 0o1000) !== 0;
    const upg =
      (st.mode & 0o002) === 0 &&
      o.owners !== 'root' &&
      st.uid === callerUid(o) &&
      isCallerPrivateGroup(st.gid, callerUid(o));
    if (!stickyRoot && !upg) {
      const mode = (st.mode & 0o7777).toString(8);
      return refuse(
        o,
        path,
        `it is writable by group or others (mode ${mode})`,
        `run 'chmod go-w ${path}' or use another directory`,
      );
    }
  }
  return undefined;
}

export interface ResolvedPath {
  /** The path with every symlink resolved, as far as it exists. */
  real: string;
  /** Components below `real` that do not exist yet (in order). */
  missing: string[];
}

/**
 * Walk `path` from `/` and check every directory on the way and the last existing one by the rule
 * above; follow symlinks only when their owner is trusted. Returns the real path and the missing
 * tail (for the caller to create). Throws a CryptmapError naming the first bad component.
 * @example const { real, missing } = resolveTrusted('/run/cryptmap');
 */
export function resolveTrusted(path: string, o: TrustOptions = {}): ResolvedPath {
  let queue = resolve(path)
    .split('/')
    .filter((s) => s !== '' && s !== '.');
  let cur = '/';
  let curSt = lstatSync('/');
  let hops = 0;
  const ancestorCheck = (p: string, st: Stats) => {
    const bad = checkDir(p, st, o, true);
    if (bad) throw bad;
  };
  while (queue.length > 0) {
    const name = queue.shift() as string;
    if (name === '..') {
      cur = dirname(cur);
      curSt = lstatSync(cur);
      continue;
    }
    ancestorCheck(cur, curSt); // cur holds `name`: it must not be replaceable by others
    const next = cur === '/' ? `/${name}` : `${cur}/${name}`;
    let st: Stats;
    try {
      st = lstatSync(next);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') {
        const missing = [name, ...queue];
        if (missing.includes('..'))
          throw refuse(o, path, `'..' after the missing component ${next}`, 'give a path without ..');
        return { real: cur, missing };
      }
      throw fromSystemError(o.code ?? 'EUNTRUSTED_PATH', `cannot check ${next}`, e, { path: next });
    }
    if (st.isSymbolicLink()) {
      if (o.symlinks === 'refuse')
        throw refuse(o, next, 'it is a symbolic link', 'give the real path (symbolic links are not followed here)');
      if (++hops > MAX_SYMLINKS) throw refuse(o, path, 'too many levels of symbolic links', 'give the real path');
      if (!ownerOk(st, o))
        throw refuse(
          o,
          next,
          `it is a symbolic link owned by uid ${st.uid}, not by ${ownersText(o)}`,
          'give the real path, or remove the link',
        );
      const target = readlinkSync(next);
      if (target.startsWith('/')) {
        cur = '/';
        curSt = lstatSync('/');
      }
      queue = [...target.split('/').filter((s) => s !== '' && s !== '.'), ...queue];
      continue;
    }
    if (!st.isDirectory()) throw refuse(o, next, 'it is not a directory', 'give a directory');
    cur = next;
    curSt = st;
  }
  const bad = checkDir(cur, curSt, o, false);
  if (bad) throw bad;
  return { real: cur, missing: [] };
}

export interface EnsureDirOptions extends TrustOptions {
  /** Mode for directories created here (default 0700). */
  mode?: number;
  /**
   * The directory itself must have no group or other permission bits at all (default true: it
   * holds secrets or sockets). A pre-existing one with wider bits is refused, never tightened.
   */
  private?: boolean;
}

/**
 * Make sure the directory `path` exists and is trusted (see the file comment): check the existing
 * part, create the rest one component at a time with `mode`, check each created component again.
 * Returns the real path (symlinks resolved); use it for everything opened below.
 * @example const dir = ensureTrustedDir('/run/cryptmap', { code: 'ERUNDIR' });
 */
export function ensureTrustedDir(path: string, o: EnsureDirOptions = {}): string {
  const { real, missing } = resolveTrusted(path, o);
  let cur = real;
  for (const name of missing) {
    const next = cur === '/' ? `/${name}` : `${cur}/${name}`;
    try {
      mkdirSync(next, { mode: o.mode ?? 0o700 });
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST')
        throw fromSystemError(o.code ?? 'EUNTRUSTED_PATH', `cannot create directory ${next}`, e, { path: next });
    }
    const st = lstatSync(next);
    if (!st.isDirectory())
      throw refuse(o, next, 'something other than a directory appeared there while it was being created', 'remove it');
    const bad = checkDir(next, st, o, false);
    if (bad) throw bad;
    cur = next;
  }
  if (o.private !== false) {
    const st = lstatSync(cur);
    if ((st.mode & 0o077) !== 0) {
      const mode = (st.mode & 0o7777).toString(8);
      throw refuse(
        o,
        cur,
        `it is accessible by group or others (mode ${mode}) and holds private files`,
        `run 'chmod 700 ${cur}' if it is yours, or use another directory`,
      );
    }
  }
  return cur;
}

export interface FileCheck extends TrustOptions {
  /** Refuse a file with any group or other permission bit (secrets). Default: only g/o write refused. */
  private?: boolean;
}

/** Check an open descriptor: a regular file, one link, trusted owner, no g/o write (or no g/o bits). */
function checkOpenFile(fd: number, path: string, o: FileCheck): Stats {
  const st = fstatSync(fd);
  if (!st.isFile()) throw refuse(o, path, 'it is not a regular file', 'remove it');
  if (!ownerOk(st, o))
    throw refuse(
      o,
      path,
      `it belongs to uid ${st.uid}, not to ${ownersText(o)}`,
      'remove it; it was not created by cryptmap',
    );
  if (st.nlink !== 1)
    throw refuse(o, path, `it has ${st.nlink} hard links`, 'remove it; it was not created by cryptmap');
  const mask = o.private ? 0o077 : 0o022;
  if ((st.mode & mask) !== 0) {
    const mode = (st.mode & 0o7777).toString(8);
    throw refuse(
      o,
      path,
      `it is ${o.private ? 'accessible' : 'writable'} by group or others (mode ${mode})`,
      `run 'chmod ${o.private ? '600' : 'go-w'} ${path}' if it is yours`,
    );
  }
  return st;
}

/**
 * Open an existing file with O_NOFOLLOW and check it with fstat (see checkOpenFile). Returns the
 * descriptor; the caller closes it. A symlink fails (ELOOP) with a refusal naming the path.
 */
export function openTrustedFile(path: string, flags: number, o: FileCheck = {}): number {
  let fd: number;
  try {
    fd = openSync(path, flags | constants.O_NOFOLLOW, 0o600); // the mode applies only when flags create it
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ELOOP')
      throw refuse(o, path, 'it is a symbolic link', 'remove the link');
    throw fromSystemError(o.code ?? 'EUNTRUSTED_PATH', `cannot open ${path}`, e, { path });
  }
  try {
    checkOpenFile(fd, path, o);
  } catch (e) {
    closeSync(fd);
    throw e;
  }
  return fd;
}

/**
 * If `path` exists, it must pass openTrustedFile's checks (a regular file of a trusted owner, one
 * link, no symlink, not writable by group or others); a missing file is fine. For files kept in a
 * sticky directory (the LUKS1 reencryption's working directory may be /tmp or a tmpfs mount): there
 * another user can create a file under a name we use next but cannot rename or remove one of ours, so
 * a file that passes stays ours, and one planted before is refused here.
 */
export function checkExistingFile(path: string, o: FileCheck = {}): void {
  try {
    lstatSync(path);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw fromSystemError(o.code ?? 'EUNTRUSTED_PATH', `cannot look at ${path}`, e, { path });
  }
  closeSync(openTrustedFile(path, constants.O_RDONLY, o));
}

/**
 * Read a whole trusted file (O_NOFOLLOW, fstat checks), at most `maxBytes` (default 1 MiB; more is
 * refused). The caller owns (and wipes, for secrets) the returned buffer.
 * @example const key = readTrustedFile(join(dir, 'root.key'), { private: true, maxBytes: 64 });
 */
export function readTrustedFile(path: string, o: FileCheck & { maxBytes?: number } = {}): Buffer {
  const max = o.maxBytes ?? 1 << 20;
  const fd = openTrustedFile(path, constants.O_RDONLY, o);
  try {
    const buf = Buffer.alloc(max + 1);
    let n = 0;
    for (;;) {
      const r = readSync(fd, buf, n, buf.length - n, null);
      if (r === 0) break;
      n += r;
      if (n > max) {
        buf.fill(0);
        throw refuse(o, path, `it is longer than ${max} bytes`, 'give the right file');
      }
    }
    const out = allocSecretBuffer(n); // its own memory, not Node's shared pool, so a wipe reaches every byte
    buf.copy(out, 0, 0, n);
    buf.fill(0);
    return out;
  } finally {
    closeSync(fd);
  }
}

/**
 * Open `path` for appending (logs): O_APPEND|O_CREAT|O_NOFOLLOW, mode 0600 when created; an existing
 * file must pass the fstat checks (ours or root's, one link, not writable by group or others).
 */
export function openTrustedAppend(path: string, o: TrustOptions = {}): number {
  return openTrustedFile(path, constants.O_WRONLY | constants.O_APPEND | constants.O_CREAT, { ...o, private: false });
}

function openNoFollow(path: string, flags: number, mode: number, o: TrustOptions): number {
  try {
    return openSync(path, flags | constants.O_NOFOLLOW, mode);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ELOOP')
      throw refuse(o, path, 'it is a symbolic link', 'remove the link');
    throw fromSystemError(o.code ?? 'EUNTRUSTED_PATH', `cannot create ${path}`, e, { path });
  }
}

/**
 * Create a new file exclusively (O_CREAT|O_EXCL|O_NOFOLLOW, `mode`, default 0600) and write `data`.
 * Throws EEXIST (as a Node error with that code) when something is already there.
 */
export function createExclusiveFile(path: string, data: Uint8Array | string, mode = 0o600): void {
  const fd = openSync(path, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, mode);
  try {
    writeAll(fd, typeof data === 'string' ? Buffer.from(data) : data);
  } finally {
    closeSync(fd);
  }
}

function writeAll(fd: number, data: Uint8Array): void {
  let off = 0;
  while (off < data.length) off += writeSync(fd, data, off, data.length - off);
}

/**
 * The rule for a file root creates where the user asks (a detached LUKS header, a header backup, a
 * volume key file): no directory from `/` down to the one that will hold it lets another user rename
 * or replace what is in it, that is none is writable by group or others unless it is sticky (`/tmp`:
 * there nobody but the file's owner and root can rename or remove it, so it is accepted as the
 * directory itself too). A directory's owner is trusted, whoever it is: the user named a place in it,
 * as cryptsetup takes it. Without this a file created there exclusively could be renamed away and
 * replaced by the time it is reopened, written again or removed (another user's header written or
 * removed by root, or the user's header swapped for a forged one). cryptsetup does not refuse; we do
 * (refuse, never fix). A missing directory is not refused here: the create fails on it.
 * @example checkNewFileDir('/srv/hdr.img'); // throws EUNTRUSTED_PATH for /srv mode 0777
 */
export function checkNewFileDir(path: string, o: TrustOptions = {}): void {
  resolveTrusted(dirname(resolve(path)), { ...o, owners: 'any', stickyDir: true });
}

/** A file's identity (fstat's st_dev and st_ino), to tell whether a path still names it. */
export interface FileIdentity {
  dev: number;
  ino: number;
}

/**
 * Remove `path` only when it still names the file `id` (lstat, same st_dev and st_ino): a file that
 * was renamed away and replaced is left alone, the replacement too. Keep a descriptor of the file open
 * until this returns, so that its inode number cannot be reused by a replacement. Returns whether it
 * was removed; other errors than ENOENT are thrown.
 */
export function unlinkIfSame(path: string, id: FileIdentity): boolean {
  let st: Stats;
  try {
    st = lstatSync(path);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw e;
  }
  if (st.dev !== id.dev || st.ino !== id.ino) return false;
  unlinkSync(path);
  return true;
}

/**
 * Replace `path` with a file holding `data` (pid files): written under a fresh name in the same
 * directory with O_EXCL|O_NOFOLLOW, then renamed over `path`. rename never follows a symlink at
 * `path`, so a planted link is replaced, not written through.
 */
export function writeFileReplacing(path: string, data: Uint8Array | string, mode = 0o600, o: TrustOptions = {}): void {
  const tmp = `${dirname(path)}/.${basename(path)}.${process.pid}.${randomBytes(4).toString('hex')}`;
  const fd = openNoFollow(tmp, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, mode, o);
  try {
    writeAll(fd, typeof data === 'string' ? Buffer.from(data) : data);
  } finally {
    closeSync(fd);
  }
  try {
    renameSync(tmp, path);
  } catch (e) {
    try {
      unlinkSync(tmp);
    } catch {}
    throw fromSystemError(o.code ?? 'EUNTRUSTED_PATH', `cannot write ${path}`, e, { path });
  }
}

/**
 * Check a Unix socket path before connecting to it: its directory is trusted (the rule above, the
 * directory itself may be readable by others) and the socket is a socket owned by root or the
 * caller, not a symlink, not writable by group or others. Returns nothing; throws a refusal. An
 * ENOENT or EACCES on the socket itself is passed through as the Node error (the caller reports
 * "not running" or "permission denied" as before).
 */
export function checkTrustedSocket(path: string, o: TrustOptions = {}): void {
  resolveTrusted(dirname(path), o);
  const st = lstatSync(path);
  if (st.isSymbolicLink()) throw refuse(o, path, 'it is a symbolic link', 'point at the real socket');
  if (!st.isSocket()) throw refuse(o, path, 'it is not a socket', 'point at the daemon socket');
  if (!ownerOk(st, o))
    throw refuse(
      o,
      path,
      `it belongs to uid ${st.uid}, not to ${ownersText(o)}: another user is listening there`,
      'use the socket of a daemon run by root or by you',
    );
  if ((st.mode & 0o022) !== 0)
    throw refuse(
      o,
      path,
      `it is writable by group or others (mode ${(st.mode & 0o777).toString(8)})`,
      'restart the daemon that owns it',
    );
}

/** Directories never used as mountpoints: mounting over them hides (or replaces) the system. */
export const SYSTEM_DIRECTORIES: readonly string[] = [
  '/',
  '/etc',
  '/usr',
  '/boot',
  '/proc',
  '/sys',
  '/dev',
  '/run',
  '/bin',
  '/sbin',
  '/lib',
  '/lib64',
  '/var',
  '/root',
  '/home',
  '/tmp',
];

/**
 * The agent's mountpoints (it runs as root and mounts volumes there): resolved component by
 * component without following any symlink, every component owned by root and not writable by
 * group or others (a service user who owns a parent could otherwise point it at /etc), never a
 * system directory; missing components are created (mode 0755). Returns the path to mount on.
 * @example await run('mount', [dev, ensureMountpoint('/srv/db')]);
 */
export function ensureMountpoint(path: string, code: ErrorCode = 'EMOUNTPOINT'): string {
  const o: EnsureDirOptions = { owners: 'root', symlinks: 'refuse', code, mode: 0o755, private: false };
  const abs = resolve(path);
  if (SYSTEM_DIRECTORIES.includes(abs))
    throw refuse(o, abs, 'it is a system directory', 'choose a mountpoint below /srv or /mnt');
  return ensureTrustedDir(abs, o);
}
