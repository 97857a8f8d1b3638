/**
 * The key service's root secret: 32 random bytes, created on first start, stored in the state
 * directory (mode 0700) in a file of mode 0600, either raw or wrapped by a passphrase.
 *
 * Files (only one of them exists in a state dir):
 *   root.key          32 raw bytes.
 *   root.key.wrapped  96 bytes, all integers big-endian:
 *     off len  field
 *       0   4  magic "CMRK"
 *       4   1  version = 1
 *       5   1  kdf = 2 (Argon2id; the only one defined)
 *       6   2  reserved, zero
 *       8   4  Argon2 time cost (iterations)
 *      12   4  Argon2 memory cost in KiB
 *      16   4  Argon2 parallelism (lanes)
 *      20  16  Argon2 salt (random)
 *      36  12  AES-256-GCM nonce (random)
 *      48  32  AES-256-GCM ciphertext of the root secret
 *      80  16  AES-256-GCM tag
 *   The wrapping key is Argon2id(passphrase, salt, t, m, p) with 32 bytes output; the GCM
 *   additional data is bytes 0..35 (the header with the KDF parameters and salt), so a changed
 *   parameter fails authentication just like a wrong passphrase.
 *
 * Creation is race-free: the file is written under a temporary name, fsynced, then hard-linked to
 * its final name (link fails if another process won), and the directory is fsynced.
 *
 * Trust (util/trusted-path.ts): the state dir and every directory above it must be owned by root or
 * us and not writable by others (refused otherwise, never tightened); the secret file is opened with
 * O_NOFOLLOW and must be a regular file owned by root or us, with one link and mode 0600 or tighter,
 * checked with fstat on the open descriptor. A root.key another user planted is never loaded.
 *
 * `rootFile` (the manifest's `keyService.rootSecretFile`, keyd's `--root-secret-file`): the secret is
 * kept at that path instead (another disk, a removable medium), raw or wrapped by the same format; it
 * must exist (it is never created there: a medium that is not mounted must not get a fresh secret).
 */
import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import { constants, promises as fs } from 'node:fs';
import { join, resolve } from 'node:path';
import { CryptmapError, EXIT_NO_PERMISSION, fromSystemError } from '../util/errors.js';
import { wipe } from '../util/bytes.js';
import { allocSecretBuffer, Secret } from '../util/secret.js';
import { ensureTrustedDir, readTrustedFile, resolveTrusted } from '../util/trusted-path.js';
import { ROOT_SECRET_BYTES } from './derive.js';

export const ROOT_FILE = 'root.key';
export const WRAPPED_FILE = 'root.key.wrapped';
export const WRAPPED_MAGIC = 'CMRK';
export const WRAPPED_VERSION = 1;
export const WRAPPED_KDF_ARGON2ID = 2;
export const WRAPPED_BYTES = 96;
const AAD_BYTES = 36;

export interface Argon2Params {
  timeCost: number;
  memoryKiB: number;
  parallelism: number;
}

/** Defaults for wrapping: a deliberate cost (this runs once per key service start). */
export const DEFAULT_WRAP_PARAMS: Argon2Params = { timeCost: 3, memoryKiB: 65536, parallelism: 1 };

export interface RootSecretOptions {
  /** When set, the root secret is stored wrapped by this passphrase (and must be unwrapped with it). */
  passphrase?: Secret;
  /** Argon2id parameters used when creating a wrapped file (tests use cheap ones). */
  wrapParams?: Argon2Params;
  /** Keep the root secret at this existing file (raw, or wrapped when `passphrase` is set) instead. */
  rootFile?: string;
}

export interface RootSecretResult {
  secret: Secret;
  created: boolean;
  wrapped: boolean;
  path: string;
}

/**
 * Create the state dir with mode 0700 if missing (component by component); refuse one that others
 * can read or write, or that sits below a directory another user controls.
 */
export async function ensurePrivateDir(dir: string): Promise<void> {
  try {
    ensureTrustedDir(dir, { code: 'ESTATEDIR', mode: 0o700, private: true });
  } catch (e) {
    if (e instanceof CryptmapError) throw e;
    throw fromSystemError('ESTATEDIR', `cannot create state directory ${dir}`, e);
  }
}

async function argon2id(passphrase: Secret, salt: Buffer, p: Argon2Params): Promise<Buffer> {
  const argon2 = await import('argon2');
  return argon2.hash(passphrase.expose(), {
    type: argon2.argon2id,
    raw: true,
    salt,
    timeCost: p.timeCost,
    memoryCost: p.memoryKiB,
    parallelism: p.parallelism,
    hashLength: 32,
  });
}

/** Wrap a root secret into the 96-byte `root.key.wrapped` format. */
export async function wrapRootSecret(
  root: Secret,
  passphrase: Secret,
  params: Argon2Params = DEFAULT_WRAP_PARAMS,
): Promise<Buffer> {
  const out = Buffer.alloc(WRAPPED_BYTES);
  out.write(WRAPPED_MAGIC, 0, 'latin1');
  out[4] = WRAPPED_VERSION;
  out[5] = WRAPPED_KDF_ARGON2ID;
  out.writeUInt32BE(params.timeCost, 8);
  out.writeUInt32BE(params.memoryKiB, 12);
  out.writeUInt32BE(params.parallelism, 16);
  const salt = randomBytes(16);
  salt.copy(out, 20);
  const nonce = randomBytes(12);
  nonce.copy(out, 36);
  const kek = await argon2id(passphrase, salt, params);
  try {
    const c = createCipheriv('aes-256-gcm', kek, nonce);
    c.setAAD(out.subarray(0, AAD_BYTES));
    const ct = Buffer.concat([c.update(root.expose()), c.final()]);
    ct.copy(out, 48);
    c.getAuthTag().copy(out, 80);
    wipe(ct);
  } finally {
    wipe(kek);
  }
  return out;
}

/** Unwrap a `root.key.wrapped` file's bytes; wrong passphrase or tampering -> EROOTPASS. */
export async function unwrapRootSecret(file: Buffer, passphrase: Secret): Promise<Secret> {
  if (file.length !== WRAPPED_BYTES || file.toString('latin1', 0, 4) !== WRAPPED_MAGIC) {
    throw new CryptmapError(
      'EROOTFORMAT',
      `wrapped root secret file is not in cryptmap format (expected ${WRAPPED_BYTES} bytes starting with ${WRAPPED_MAGIC})`,
    );
  }
  if (file[4] !== WRAPPED_VERSION)
    throw new CryptmapError('EROOTFORMAT', `wrapped root secret version ${file[4]} is not supported (expected 1)`);
  if (file[5] !== WRAPPED_KDF_ARGON2ID)
    throw new CryptmapError(
      'EROOTFORMAT',
      `wrapped root secret kdf ${file[5]} is not supported (expected 2 = argon2id)`,
    );
  const params: Argon2Params = {
    timeCost: file.readUInt32BE(8),
    memoryKiB: file.readUInt32BE(12),
    parallelism: file.readUInt32BE(16),
  };
  if (
    params.timeCost < 1 ||
    params.timeCost > 1000 ||
    params.memoryKiB < 8 ||
    params.memoryKiB > 4 * 1024 * 1024 ||
    params.parallelism < 1 ||
    params.parallelism > 16
  ) {
    throw new CryptmapError('EROOTFORMAT', 'wrapped root secret has out-of-range Argon2 parameters');
  }
  const kek = await argon2id(passphrase, file.subarray(20, 36), params);
  try {
    const d = createDecipheriv('aes-256-gcm', kek, file.subarray(36, 48));
    d.setAAD(file.subarray(0, AAD_BYTES));
    d.setAuthTag(file.subarray(80, 96));
    const pt = d.update(file.subarray(48, 80));
    try {
      d.final();
    } catch {
      wipe(pt);
      throw new CryptmapError('EROOTPASS', 'cannot unwrap the root secret: wrong passphrase or damaged file', {
        exitCode: EXIT_NO_PERMISSION,
        errno: 'EPERM',
      });
    }
    return new Secret(pt);
  } finally {
    wipe(kek);
  }
}

async function exists(p: string): Promise<boolean> {
  try {
    await fs.lstat(p);
    return true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw fromSystemError('EROOTSECRET', `cannot stat ${p}`, e);
  }
}

async function readPrivateFile(p: string): Promise<Buffer> {
  // O_NOFOLLOW, then fstat: a regular file of root or ours, one link, no group/other bits.
  return readTrustedFile(p, { code: 'EROOTSECRET', private: true, maxBytes: 4096 });
}

/** Write `data` to `path` (mode 0600) atomically and exclusively; returns false if it already existed. */
async function createExclusive(dir: string, path: string, data: Buffer): Promise<boolean> {
  const tmp = join(dir, `.tmp-${process.pid}-${randomBytes(6).toString('hex')}`);
  const fh = await fs.open(
    tmp,
    constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW,
    0o600,
  );
  try {
    await fh.writeFile(data);
    await fh.sync();
  } finally {
    await fh.close();
  }
  try {
    await fs.link(tmp, path);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EEXIST') return false;
    throw e;
  } finally {
    await fs.unlink(tmp).catch(() => {});
  }
  const d = await fs.open(dir, constants.O_RDONLY);
  try {
    await d.sync();
  } finally {
    await d.close();
  }
  return true;
}

/**
 * Load the root secret from `stateDir`, creating it on first start.
 * With `passphrase`, a wrapped file is used (created if neither file exists); a raw file with a
 * passphrase given, or a wrapped file without one, is an error (never silently downgrade).
 */
export async function loadOrCreateRootSecret(
  stateDir: string,
  opts: RootSecretOptions = {},
): Promise<RootSecretResult> {
  await ensurePrivateDir(stateDir); // also with rootFile: the audit log and the socket live there
  if (opts.rootFile !== undefined) return loadRootSecretFile(opts.rootFile, opts.passphrase);
  const rawPath = join(stateDir, ROOT_FILE);
  const wrappedPath = join(stateDir, WRAPPED_FILE);
  const hasRaw = await exists(rawPath);
  const hasWrapped = await exists(wrappedPath);
  if (hasRaw && hasWrapped)
    throw new CryptmapError(
      'EROOTSECRET',
      `both ${ROOT_FILE} and ${WRAPPED_FILE} exist in ${stateDir}; remove the one not in use`,
    );
  if (opts.passphrase) {
    if (hasRaw)
      throw new CryptmapError(
        'EROOTSECRET',
        `${rawPath} is not wrapped but a passphrase was given; refusing to guess (rewrap it explicitly)`,
      );
    if (!hasWrapped) {
      const secret = new Secret(randomBytes(ROOT_SECRET_BYTES));
      const file = await wrapRootSecret(secret, opts.passphrase, opts.wrapParams);
      try {
        if (await createExclusive(stateDir, wrappedPath, file))
          return { secret, created: true, wrapped: true, path: wrappedPath };
      } catch (e) {
        secret.dispose();
        throw fromSystemError('EROOTSECRET', `cannot create ${wrappedPath}`, e);
      }
      secret.dispose(); // lost a creation race: use the winner's file
    }
    const secret = await unwrapRootSecret(await readPrivateFile(wrappedPath), opts.passphrase);
    return { secret, created: false, wrapped: true, path: wrappedPath };
  }
  if (hasWrapped)
    throw new CryptmapError('EROOTSECRET', `${wrappedPath} is wrapped by a passphrase: give --passphrase-file`);
  if (!hasRaw) {
    const secret = new Secret(randomBytes(ROOT_SECRET_BYTES));
    try {
      if (await createExclusive(stateDir, rawPath, secret.expose()))
        return { secret, created: true, wrapped: false, path: rawPath };
    } catch (e) {
      secret.dispose();
      throw fromSystemError('EROOTSECRET', `cannot create ${rawPath}`, e);
    }
    secret.dispose();
  }
  const bytes = await readPrivateFile(rawPath);
  if (bytes.length !== ROOT_SECRET_BYTES) {
    wipe(bytes);
    throw new CryptmapError('EROOTSECRET', `${rawPath} must hold exactly ${ROOT_SECRET_BYTES} bytes`);
  }
  return { secret: new Secret(bytes), created: false, wrapped: false, path: rawPath };
}

/** Load the root secret kept at `path` (never created there): raw 32 bytes, or wrapped with `passphrase`. */
export async function loadRootSecretFile(path: string, passphrase?: Secret): Promise<RootSecretResult> {
  const dir = resolve(path, '..');
  resolveTrusted(dir, { code: 'EROOTSECRET' });
  if (!(await exists(path))) {
    throw new CryptmapError(
      'EROOTSECRET',
      `root secret file ${path} does not exist (it is never created there: is its medium mounted?). Make one with 'cryptmap keyd --state-dir DIR${passphrase ? ' --passphrase-file F' : ''}' and move DIR/${passphrase ? WRAPPED_FILE : ROOT_FILE} there`,
      { exitCode: 4, errno: 'ENOENT' },
    );
  }
  const bytes = await readPrivateFile(path);
  const isWrapped = bytes.length === WRAPPED_BYTES && bytes.toString('latin1', 0, 4) === WRAPPED_MAGIC;
  if (passphrase) {
    try {
      if (!isWrapped)
        throw new CryptmapError(
          'EROOTSECRET',
          `${path} is not a wrapped root secret (${WRAPPED_BYTES} bytes starting with ${WRAPPED_MAGIC}) but a passphrase was given`,
        );
      return { secret: await unwrapRootSecret(bytes, passphrase), created: false, wrapped: true, path };
    } finally {
      wipe(bytes);
    }
  }
  if (isWrapped) {
    wipe(bytes);
    throw new CryptmapError('EROOTSECRET', `${path} is wrapped by a passphrase: give a passphrase file`);
  }
  if (bytes.length !== ROOT_SECRET_BYTES) {
    wipe(bytes);
    throw new CryptmapError('EROOTSECRET', `${path} must hold exactly ${ROOT_SECRET_BYTES} bytes`);
  }
  return { secret: new Secret(bytes), created: false, wrapped: false, path };
}

/**
 * Read the passphrase that wraps the root secret from `path` (keyd's `--passphrase-file`, the
 * manifest's `keyService.passphraseFile`): O_NOFOLLOW, owned by root or us, mode 0600 or tighter, at
 * most 8 KiB; a trailing newline (from `echo`) is dropped, as cryptsetup does for passphrases.
 */
export function readPassphraseFile(path: string): Secret {
  const raw = readTrustedFile(path, { code: 'EROOTPASS', private: true, maxBytes: 8192 });
  const end = raw.length > 0 && raw[raw.length - 1] === 0x0a ? raw.length - 1 : raw.length;
  const copy = allocSecretBuffer(end);
  raw.copy(copy, 0, 0, end);
  const s = new Secret(copy);
  wipe(raw);
  if (s.length === 0) {
    s.dispose();
    throw new CryptmapError('EROOTPASS', `passphrase file ${path} is empty`);
  }
  return s;
}

// ---- root rotation (docs/keyservice.md "Rotating the root secret") ----

/**
 * The file of root generation `gen` beside the current root secret file: `<file>.next` (a rotation
 * begun, not committed) and `<file>.previous` (what the last commit replaced); same format as the
 * current one (raw, or wrapped by the same passphrase).
 */
export function rootGenerationPath(currentPath: string, gen: 'next' | 'previous'): string {
  return `${currentPath}.${gen}`;
}

async function loadGeneration(path: string, wrapped: boolean, passphrase?: Secret): Promise<Secret | undefined> {
  if (!(await exists(path))) return undefined;
  const bytes = await readPrivateFile(path);
  try {
    if (wrapped) {
      if (!passphrase)
        throw new CryptmapError('EROOTSECRET', `${path} is wrapped by a passphrase: give a passphrase file`);
      return await unwrapRootSecret(bytes, passphrase);
    }
    if (bytes.length !== ROOT_SECRET_BYTES)
      throw new CryptmapError('EROOTSECRET', `${path} must hold exactly ${ROOT_SECRET_BYTES} bytes`);
    return Secret.copyOf(bytes);
  } finally {
    wipe(bytes);
  }
}

/** The next and previous root secrets beside `current` (loaded by loadOrCreateRootSecret), where they exist. */
export async function loadRootGenerations(
  current: Pick<RootSecretResult, 'path' | 'wrapped'>,
  passphrase?: Secret,
): Promise<{ next?: Secret; previous?: Secret }> {
  const next = await loadGeneration(rootGenerationPath(current.path, 'next'), current.wrapped, passphrase);
  let previous: Secret | undefined;
  try {
    previous = await loadGeneration(rootGenerationPath(current.path, 'previous'), current.wrapped, passphrase);
  } catch (e) {
    next?.dispose();
    throw e;
  }
  return { ...(next ? { next } : {}), ...(previous ? { previous } : {}) };
}

/**
 * Begin a root rotation: a new random root secret in `<current>.next` (wrapped like the current one),
 * created atomically and exclusively. Returns false when one was begun already (it is kept: the
 * volumes rewrapped so far use it).
 */
export async function beginRootRotation(
  current: Pick<RootSecretResult, 'path' | 'wrapped'>,
  passphrase?: Secret,
  wrapParams?: Argon2Params,
): Promise<boolean> {
  const path = rootGenerationPath(current.path, 'next');
  if (current.wrapped && !passphrase)
    throw new CryptmapError('EROOTSECRET', `${current.path} is wrapped by a passphrase: give a passphrase file`);
  const secret = new Secret(randomBytes(ROOT_SECRET_BYTES));
  try {
    const data = current.wrapped ? await wrapRootSecret(secret, passphrase!, wrapParams) : Buffer.from(secret.expose());
    try {
      return await createExclusive(resolve(path, '..'), path, data);
    } catch (e) {
      throw fromSystemError('EROOTSECRET', `cannot create ${path}`, e);
    } finally {
      wipe(data);
    }
  } finally {
    secret.dispose();
  }
}

/**
 * Commit a root rotation: the current root secret file is copied to `<current>.previous` (replacing
 * an older one), then `<current>.next` is renamed over the current file (atomic), and the directory
 * synced. A crash anywhere leaves a state a second commit finishes; ENOROOT when none was begun.
 */
export async function commitRootRotation(currentPath: string): Promise<void> {
  const next = rootGenerationPath(currentPath, 'next');
  const previous = rootGenerationPath(currentPath, 'previous');
  if (!(await exists(next)))
    throw new CryptmapError('ENOROOT', `no root rotation in progress (${next} does not exist)`, { exitCode: 1 });
  const dir = resolve(currentPath, '..');
  // The file that becomes the root secret passes the same checks as one loaded (regular, private, ours).
  wipe(await readPrivateFile(next));
  const cur = await readPrivateFile(currentPath);
  try {
    await fs.unlink(previous).catch((e: NodeJS.ErrnoException) => {
      if (e.code !== 'ENOENT') throw fromSystemError('EROOTSECRET', `cannot remove ${previous}`, e);
    });
    if (!(await createExclusive(dir, previous, cur)))
      throw new CryptmapError('EROOTSECRET', `${previous} appeared while committing: another commit runs?`);
  } finally {
    wipe(cur);
  }
  await fs.rename(next, currentPath);
  const d = await fs.open(dir, constants.O_RDONLY);
  try {
    await d.sync();
  } finally {
    await d.close();
  }
}
