/**
 * The `crypt` target: dm-crypt (kernel drivers/md/dm-crypt.c; Documentation/admin-guide/
 * device-mapper/dm-crypt.rst). Sectors are run through the engine's SectorCipher on their way to
 * and from <dev>; the IV sector is (sector relative to the target start) + <iv_offset>, in 512-byte
 * units (or sector_size units with iv_large_sectors), exactly as the kernel's crypt_convert_init.
 *
 * Kernel behaviour kept: without allow_discards discards are refused; <iv_offset>, <offset> and
 * the length must be multiples of sector_size/512; `message key set|wipe` only while suspended;
 * resume refused while the key is wiped; the table line shows the key only when asked (hidden as
 * zeros of the same length, as `dmsetup table` does without --showkeys; key references and `-`
 * are always shown); optional parameters are printed back in the kernel's order.
 * Not supported yet (rejected by name): integrity:<bytes>:<type>, integrity_key_size:<n>, high_priority.
 */
import type { BlockDevice } from '../../blockdev/types.js';
import { availableParallelism } from 'node:os';
import { createSectorCipher, parseCipherSpec } from '../../engine/index.js';
import type { SectorBytes, SectorCipher } from '../../engine/index.js';
import { isPowerOfTwo, parseU64, toHex } from '../../util/bytes.js';
import { CryptmapError, type ErrorCode, isCryptmapError } from '../../util/errors.js';
import { Secret } from '../../util/secret.js';
import type { KeyRef, KeyStore, TargetInstance, TargetType } from '../types.js';
import { checkDeviceAlignment, checkDeviceSize, uintArg } from './args.js';

const KEY_TYPES = new Set(['logon', 'user', 'encrypted', 'trusted']);
/** The on/off optional parameters, in the kernel's order (activate/flags.ts maps each to cryptsetup's names). */
export const CRYPT_FLAGS = [
  'allow_discards',
  'same_cpu_crypt',
  'submit_from_crypt_cpus',
  'no_read_workqueue',
  'no_write_workqueue',
] as const;
export type CryptFlag = (typeof CRYPT_FLAGS)[number];
const UNSUPPORTED = new Set(['high_priority', 'integrity', 'integrity_key_size']);
/** 16 or more bytes of hex in a word: key material, never echoed in a message. */
const KEY_LIKE = /(^|\s)[0-9a-fA-F]{32,}(\s|$)/;
/** Kernel limit on optional parameters (crypt_ctr_optional). */
const MAX_OPT_PARAMS = 9;
/** Smallest pooled scratch buffer; smaller writes take a fresh one (cheap: Node's slab). */
const SCRATCH_MIN_BYTES = 16384;
/** Idle scratch memory kept per target. */
const SCRATCH_IDLE_BYTES = 16 << 20;
/**
 * On devices without DirectIo (mapped devices below, fault wrappers) and for requests up to
 * DIRECT_ABOVE_BYTES: writes below this are encrypted on the calling thread, larger ones in the
 * engine's crypt pool (reads keep the engine's default: the pool from 64 KiB). A hand-off to the pool
 * costs CPU (promise, references, a futex wake, the completion callback) and pays only when a core is
 * idle to take it. With two CPUs or fewer, a writing NBD client and the main thread keep both busy, so
 * writes stay on the calling thread; a reading client leaves the second core idle more often, so reads
 * keep the pool. README, "Why the data path's thresholds are what they are", has the measurements.
 */
const WRITE_ASYNC_MIN_BYTES = availableParallelism() > 2 ? 0 : 1 << 20;
/**
 * Reads from a device without DirectIo (an NBD client, mapped devices below) below this size are
 * decrypted on the calling thread when there are two CPUs or fewer: there the client reading the
 * export, the storage server and the NBD peer keep both CPUs busy, so a hand-off to the crypt pool
 * buys no parallelism and costs its wake-ups (README, "Why the data path's thresholds are what they are").
 */
const READ_ASYNC_MIN_BYTES = availableParallelism() > 2 ? 0 : 1 << 20;

/**
 * Requests above this size on a device that offers DirectIo (a file) go to the crypt pool as one job
 * that does the pread and the decryption, or the encryption and the pwrite: one hand-off instead of
 * two (libuv pool for the I/O, crypt pool for the cipher) and the data still in the crypt thread's
 * cache between the two steps (measurements: README, "Why the data path's thresholds are what they are").
 * Smaller requests keep the paths above: the file backend does them inline on tmpfs and the engine
 * ciphers them on the calling thread, both cheaper than any hand-off.
 */
const DIRECT_ABOVE_BYTES = 64 << 10;

/**
 * Write scratch buffers (the ciphertext of a write; the caller's data stays untouched), reused by
 * power-of-two size class like the kernel's crypt page pool: a fresh 256 KiB buffer per write costs
 * an mmap, 64 page faults and GC work on every request.
 */
class ScratchPool {
  readonly #free = new Map<number, ArrayBuffer[]>();
  #idleBytes = 0;

  acquire(n: number): Buffer {
    if (n < SCRATCH_MIN_BYTES) return Buffer.allocUnsafe(n);
    let cls = SCRATCH_MIN_BYTES;
    while (cls < n) cls *= 2;
    const ab = this.#free.get(cls)?.pop();
    if (ab === undefined) return Buffer.from(Buffer.allocUnsafeSlow(cls).buffer, 0, n);
    this.#idleBytes -= cls;
    return Buffer.from(ab, 0, n);
  }

  release(b: Buffer): void {
    const ab = b.buffer as ArrayBuffer;
    const cls = ab.byteLength;
    // Only whole buffers this pool made (power-of-two classes, view from 0) come back.
    if (
      b.length < SCRATCH_MIN_BYTES ||
      b.byteOffset !== 0 ||
      (cls & (cls - 1)) !== 0 ||
      this.#idleBytes + cls > SCRATCH_IDLE_BYTES
    )
      return;
    let list = this.#free.get(cls);
    if (list === undefined) {
      list = [];
      this.#free.set(cls, list);
    }
    list.push(ab);
    this.#idleBytes += cls;
  }

  clear(): void {
    this.#free.clear();
    this.#idleBytes = 0;
  }
}

/** A parsed <key> argument: raw hex bytes, the empty key `-`, or a key-store reference. */
type KeySource = { kind: 'hex'; bytes: number } | { kind: 'empty' } | { kind: 'ref'; ref: KeyRef };

function parseKeyRef(s: string): KeyRef | null {
  const m = /^:([0-9]+):([a-z]+):(.+)$/.exec(s);
  if (m === null) return null;
  const keyBytes = Number(m[1]);
  if (!Number.isSafeInteger(keyBytes) || keyBytes < 1 || keyBytes > 1024 || !KEY_TYPES.has(m[2]!)) return null;
  return { keyBytes, type: m[2]!, description: m[3]! };
}

/** Resolve a <key> argument into a Secret (the caller disposes it). Never puts key bytes in messages. */
async function loadKey(
  arg: string,
  keyStore: KeyStore | undefined,
  fail: (msg: string, code?: ErrorCode) => CryptmapError,
): Promise<{ source: KeySource; key: Secret }> {
  if (arg === '-') return { source: { kind: 'empty' }, key: new Secret(Buffer.alloc(0)) };
  if (arg.startsWith(':')) {
    const ref = parseKeyRef(arg);
    if (ref === null)
      throw fail("a key reference must look like ':<bytes>:<logon|user|encrypted|trusted>:<description>'");
    if (keyStore === undefined)
      throw fail(`no key store is configured to resolve the key reference '${arg}'`, 'ENOKEYSTORE');
    let key: Secret;
    try {
      key = await keyStore.resolve(ref);
    } catch (e) {
      throw fail(`the key store cannot resolve '${arg}': ${(e as Error).message}`, 'EKEYREF');
    }
    if (key.length !== ref.keyBytes) {
      const got = key.length;
      key.dispose();
      throw fail(`the key store returned ${got} bytes for '${arg}', which declares ${ref.keyBytes}`, 'EKEYREF');
    }
    return { source: { kind: 'ref', ref }, key };
  }
  if (arg.length % 2 !== 0 || !/^[0-9a-fA-F]+$/.test(arg))
    throw fail(`is not valid hex, '-' or a key reference (${arg.length} characters)`);
  return { source: { kind: 'hex', bytes: arg.length / 2 }, key: new Secret(Buffer.from(arg, 'hex')) };
}

function keyText(source: KeySource, key: Secret | null, showKeys: boolean): string {
  switch (source.kind) {
    case 'empty':
      return '-';
    case 'ref':
      return `:${source.ref.keyBytes}:${source.ref.type}:${source.ref.description}`;
    case 'hex':
      return showKeys && key !== null ? toHex(key.expose()) : '0'.repeat(source.bytes * 2);
  }
}

/*
 * Table grammar:
 *   crypt <cipher> <key> <iv_offset> <dev> <offset> [<#opt_params> <opt_params>...]
 *   <cipher>     dm-crypt cipher spec (aes-xts-plain64, capi:xts(aes)-plain64, ...)
 *   <key>        hex, '-' (empty key, cipher_null) or :<bytes>:<logon|user|encrypted|trusted>:<desc>
 *   <iv_offset>  added to the sector number for the IV, 512-byte units (u64)
 *   <dev>        file path, block device or mapped device name
 *   <offset>     start of the encrypted data on <dev>, 512-byte sectors
 *   opt params:  allow_discards same_cpu_crypt submit_from_crypt_cpus no_read_workqueue
 *                no_write_workqueue sector_size:<512..4096, power of two> iv_large_sectors
 */
export const crypt: TargetType = {
  name: 'crypt',
  version: [1, 24, 0],
  async ctr(args, ctx): Promise<TargetInstance> {
    if (args.length < 5) {
      const names = ['cipher', 'key', 'iv_offset', 'dev', 'offset'];
      throw ctx.error(
        names[args.length]!,
        "missing argument (expected 'crypt <cipher> <key> <iv_offset> <dev> <offset> [<#opt_params> <opt_params>...]')",
      );
    }
    const [cipherArg, keyArg, ivArg, devArg, offArg, ...rest] = args as [
      string,
      string,
      string,
      string,
      string,
      ...string[],
    ];
    // A <key> in the wrong place (arguments swapped) must not be echoed by the checks below.
    for (const [name, arg] of [
      ['cipher', cipherArg],
      ['iv_offset', ivArg],
      ['offset', offArg],
      ['opt_params', rest.join(' ')],
    ] as const) {
      if (KEY_LIKE.test(arg))
        throw ctx.error(
          name,
          `has ${arg.length} hex digits (not shown): is the <key> in the wrong place?`,
          'EKEYPLACE',
        );
    }

    // Optional parameters first: they decide sector_size, which the other checks need.
    const flags = new Set<CryptFlag>();
    let sectorBytes: SectorBytes = 512;
    let ivLargeSectors = false;
    if (rest.length > 0) {
      const n = uintArg(rest[0]!, ctx, '#opt_params', 1000);
      if (n > MAX_OPT_PARAMS)
        throw ctx.error('#opt_params', `${n} is more than the ${MAX_OPT_PARAMS} optional parameters dm-crypt accepts`);
      if (rest.length - 1 !== n)
        throw ctx.error('#opt_params', `says ${n} optional parameters but ${rest.length - 1} follow`);
      for (const opt of rest.slice(1)) {
        const name = opt.split(':')[0]!;
        if ((CRYPT_FLAGS as readonly string[]).includes(opt)) flags.add(opt as CryptFlag);
        else if (opt === 'iv_large_sectors') ivLargeSectors = true;
        else if (name === 'sector_size' && opt.startsWith('sector_size:')) {
          const v = opt.slice('sector_size:'.length);
          const b = /^[0-9]+$/.test(v) ? Number(v) : Number.NaN;
          if (!isPowerOfTwo(b) || b < 512 || b > 4096)
            throw ctx.error('opt_params', `'${opt}': sector_size must be a power of two from 512 to 4096`);
          sectorBytes = b as SectorBytes;
        } else if (UNSUPPORTED.has(name)) {
          throw ctx.error('opt_params', `'${opt}' is not supported by cryptmap yet`, 'EUNSUPPORTED');
        } else throw ctx.error('opt_params', `unknown optional parameter '${opt}'`);
      }
    }
    const step = sectorBytes / 512;

    try {
      parseCipherSpec(cipherArg);
    } catch (e) {
      throw ctx.error('cipher', (e as Error).message, isCryptmapError(e) ? e.code : 'ECIPHER');
    }
    let ivOffsetSectors: bigint;
    try {
      ivOffsetSectors = parseU64(ivArg, '<iv_offset>');
    } catch {
      throw ctx.error('iv_offset', `'${ivArg}' is not an unsigned 64-bit decimal number`);
    }
    if (ivOffsetSectors % BigInt(step) !== 0n)
      throw ctx.error('iv_offset', `${ivArg} is not a multiple of sector_size/512 (${step})`);
    const offsetSectors = uintArg(offArg, ctx, 'offset');
    if (offsetSectors % step !== 0)
      throw ctx.error('offset', `${offArg} is not a multiple of sector_size/512 (${step})`);
    if (ctx.lengthSectors % step !== 0)
      throw ctx.error(
        'opt_params',
        `the target length ${ctx.lengthSectors} is not a multiple of sector_size/512 (${step})`,
      );

    const { source, key: firstKey } = await loadKey(keyArg, ctx.keyStore, (m, code) => ctx.error('key', m, code));
    let key: Secret | null = firstKey;
    let cipher: SectorCipher | null = null;
    const make = (k: Secret): SectorCipher =>
      createSectorCipher({
        spec: cipherArg,
        key: k.expose(),
        sectorBytes,
        ivLargeSectors,
        ivOffsetSectors,
        sameCpu: flags.has('same_cpu_crypt'),
      });
    const scratch = new ScratchPool();
    const dispose = () => {
      scratch.clear();
      cipher?.dispose();
      cipher = null;
      key?.dispose();
      key = null;
    };
    try {
      try {
        cipher = make(firstKey);
      } catch (e) {
        throw ctx.error('key', (e as Error).message, isCryptmapError(e) ? e.code : 'EKEY');
      }
      const dev: BlockDevice = await ctx.openDevice(devArg, 'dev');
      checkDeviceSize(dev, devArg, ctx, 'dev', offsetSectors + ctx.lengthSectors);
      checkDeviceAlignment(dev, devArg, ctx, 'offset', offsetSectors);
      const base = offsetSectors * 512;
      const allowDiscards = flags.has('allow_discards');

      const live = (): SectorCipher => {
        if (cipher === null)
          throw new CryptmapError('ENOKEY', `I/O on crypt target (table line ${ctx.line}) while its key is wiped`, {
            errno: 'EIO',
          });
        return cipher;
      };
      const instance: TargetInstance = {
        capabilities: {
          write: dev.capabilities.write,
          flush: dev.capabilities.flush,
          discard: allowDiscards && dev.capabilities.discard,
          writeZeroes: false,
          multiConn: dev.capabilities.multiConn,
        },
        limits: {
          logicalBlockBytes: Math.max(sectorBytes, dev.limits.logicalBlockBytes),
          physicalBlockBytes: Math.max(sectorBytes, dev.limits.physicalBlockBytes),
          maxRequestBytes: dev.limits.maxRequestBytes,
        },
        async read(o, buf) {
          const c = live();
          const direct = dev.directIo;
          if (direct !== undefined && buf.length > DIRECT_ABOVE_BYTES) {
            await direct.run('read', base + o, buf.length, (fd, at) =>
              c.readDecryptAsync(fd, at, buf, BigInt(o / 512)),
            );
            return;
          }
          await dev.read(base + o, buf);
          if (direct === undefined && buf.length < READ_ASYNC_MIN_BYTES) c.decrypt(buf, BigInt(o / 512));
          else await c.decryptAsync(buf, BigInt(o / 512));
        },
        async write(o, data, wflags) {
          const c = live();
          const direct = dev.directIo;
          if (direct !== undefined && data.length > DIRECT_ABOVE_BYTES) {
            // An NBD WRITE payload (scratch) is encrypted in place, anything else into a pooled copy.
            const copy = wflags?.scratch ? null : scratch.acquire(data.length);
            try {
              await direct.run('write', base + o, data.length, (fd, at) =>
                c.encryptWriteAsync(fd, at, data, BigInt(o / 512), copy ?? data),
              );
            } finally {
              if (copy !== null) scratch.release(copy);
            }
            if (wflags?.fua) await dev.flush();
            return;
          }
          if (wflags?.scratch) {
            // The caller gave up the plaintext (an NBD WRITE payload): encrypt in place, no copy.
            if (data.length < WRITE_ASYNC_MIN_BYTES) c.encrypt(data, BigInt(o / 512));
            else await c.encryptAsync(data, BigInt(o / 512));
            await dev.write(base + o, data, wflags);
            return;
          }
          const buf = scratch.acquire(data.length);
          try {
            if (data.length < WRITE_ASYNC_MIN_BYTES) c.encrypt(data, BigInt(o / 512), buf);
            else await c.encryptAsync(data, BigInt(o / 512), buf);
            await dev.write(base + o, buf, wflags);
          } finally {
            scratch.release(buf);
          }
        },
        flush: () => dev.flush(),
        async discard(o, n) {
          if (!allowDiscards) {
            throw new CryptmapError(
              'ENOTSUP',
              `crypt target (table line ${ctx.line}) refuses discards: its table has no allow_discards`,
              { errno: 'ENOTSUP' },
            );
          }
          await dev.discard(base + o, n);
        },
        status(kind, showKeys) {
          if (kind === 'status') return '';
          const opts: string[] = [];
          for (const f of CRYPT_FLAGS) if (flags.has(f)) opts.push(f);
          if (sectorBytes !== 512) opts.push(`sector_size:${sectorBytes}`);
          if (ivLargeSectors) opts.push('iv_large_sectors');
          const head = `${cipherArg} ${keyText(source, key, showKeys)} ${ivOffsetSectors} ${devArg} ${offsetSectors}`;
          return opts.length === 0 ? head : `${head} ${opts.length} ${opts.join(' ')}`;
        },
        async message(margs, suspended) {
          if (
            margs[0] !== 'key' ||
            !((margs[1] === 'set' && margs.length === 3) || (margs[1] === 'wipe' && margs.length === 2))
          ) {
            // Only the first two words are echoed: a malformed 'key set' may carry key hex after them.
            throw new CryptmapError(
              'EMESSAGE',
              `crypt target: unrecognised message '${margs.slice(0, 2).join(' ')}' with ${margs.length} words (expected 'key set <key>' or 'key wipe')`,
            );
          }
          if (!suspended)
            throw new CryptmapError('EMESSAGE', 'crypt target: the device must be suspended for key manipulation');
          if (margs[1] === 'wipe') {
            dispose();
            return '';
          }
          const fail = (m: string, code?: ErrorCode) =>
            new CryptmapError(code ?? 'EMESSAGE', `crypt target: new <key> ${m}`);
          const next = await loadKey(margs[2]!, ctx.keyStore, fail);
          const wantBytes = source.kind === 'hex' ? source.bytes : source.kind === 'ref' ? source.ref.keyBytes : 0;
          if (next.key.length !== wantBytes) {
            const got = next.key.length;
            next.key.dispose();
            throw fail(`has ${got} bytes; this table's key has ${wantBytes}`);
          }
          let nextCipher: SectorCipher;
          try {
            nextCipher = make(next.key);
          } catch (e) {
            next.key.dispose();
            throw fail((e as Error).message);
          }
          dispose();
          cipher = nextCipher;
          key = next.key;
          Object.assign(source, next.source);
          return '';
        },
        preresume() {
          if (cipher === null)
            throw new CryptmapError(
              'ENOKEY',
              `aborting resume: the crypt key of table line ${ctx.line} is not set (message 'key set <key>' first)`,
            );
        },
        dispose,
      };
      return instance;
    } catch (e) {
      dispose();
      throw e;
    }
  },
};
