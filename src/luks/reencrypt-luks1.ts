/**
 * LUKS1 reencryption in cryptsetup 2.6's legacy offline format (src/utils_reencrypt_luks1.c, read
 * to learn the format, not copied), done in userspace: cryptsetup runs it through two temporary
 * device-mapper mappings, cryptmap reads and writes the device itself, so either tool resumes what the
 * other began (cryptsetup where device-mapper is available).
 *
 * The state lives in the working directory, named after the device's UUID:
 * - `LUKS-<UUID>.log`: one 512-byte sector of text (`version = 2`, `UUID = ...`, `direction = 0|1`
 *   (forward|backward), `mode = 0|1|2` (reencrypt|encrypt|decrypt), `offset = N` (bytes of the new
 *   mapping done: forward, the next byte; backward, the lowest byte done), `shift = 0`);
 * - `LUKS-<UUID>.org`: the old header and keyslots (a LUKS1 header backup), read-only;
 * - `LUKS-<UUID>.new`: the new header (same UUID and passphrases; the data offset grows by
 *   --reduce-device-size), or for decryption a `cipher_null` header with data offset 0.
 * While it runs, the device's magic is `LUKS\xde\xad` (unusable to LUKS tools); at the end the new
 * header is written over it (decryption: the data now starts at 0) and the three files go.
 *
 * Crash safety: cryptsetup writes each block in place and records progress only now and then (after
 * each block with --write-log), so a crash inside a block loses it. cryptmap records progress after
 * every block and, before a block is written, keeps the bytes it overwrites in a fourth file of its
 * own, `LUKS-<UUID>.journal` (0600, removed at the end; cryptsetup ignores it): a resume puts them back
 * first, so the block is done again from intact data.
 */
import { createHash } from 'node:crypto';
import { chmod, open, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { FileDevice } from '../blockdev/file.js';
import type { BlockDevice } from '../blockdev/types.js';
import { createSectorCipher } from '../engine/index.js';
import type { SectorCipher } from '../engine/types.js';
import { CryptmapError } from '../util/errors.js';
import type { Secret } from '../util/secret.js';
import { LUKS_KEY_ENABLED, LUKS_MAGIC, Luks1Volume } from './luks1.js';
import type { NewKeyslotOptions } from './types.js';
import { backupFileBytes } from './volume-common.js';

/** The magic of a LUKS1 device in legacy reencryption. */
export const LUKS1_NOMAGIC = Buffer.from([0x4c, 0x55, 0x4b, 0x53, 0xde, 0xad]);
/** The UUID of cryptsetup's fake (cipher_null) headers. */
const NO_UUID = 'cafecafe-cafe-cafe-cafe-cafecafeeeee';
const NO_OFFSET = (1n << 64n) - 1n;
const JOURNAL_MAGIC = Buffer.from('CMJNL001');

export type Luks1Mode = 'reencrypt' | 'encrypt' | 'decrypt';
const MODES: Luks1Mode[] = ['reencrypt', 'encrypt', 'decrypt'];

/** The files of a legacy reencryption of the device with `uuid`, in `dir`. */
export function luks1ReencryptFiles(
  dir: string,
  uuid: string,
): { log: string; org: string; new: string; journal: string } {
  const b = join(dir, `LUKS-${uuid}`);
  return { log: `${b}.log`, org: `${b}.org`, new: `${b}.new`, journal: `${b}.journal` };
}

interface Log {
  uuid: string;
  backward: boolean;
  mode: Luks1Mode;
  offset: bigint;
}

function fail(msg: string, exitCode = 1): never {
  throw new CryptmapError('EREENCRYPT', msg, { exitCode });
}

function formatLog(l: Log): Buffer {
  const t =
    '# LUKS reencryption log, DO NOT EDIT OR DELETE.\n' +
    `version = 2\nUUID = ${l.uuid}\ndirection = ${l.backward ? 1 : 0}\nmode = ${MODES.indexOf(l.mode)}\n` +
    `offset = ${l.offset}\nshift = 0\n# EOF\n`;
  const b = Buffer.alloc(512);
  b.write(t, 'latin1');
  return b;
}

/** Parse a log sector as cryptsetup does (parse_log): unknown lines, another UUID, a bad mode are "Wrong log format." */
function parseLog(b: Buffer, uuid: string): Log {
  const text = b.subarray(0, 511).toString('latin1').split('\0')[0]!;
  const l: Log = { uuid, backward: false, mode: 'reencrypt', offset: 0n };
  const lines = text.split('\n');
  lines.pop(); // cryptsetup parses only complete lines
  for (const line of lines) {
    if (line.startsWith('#')) continue;
    let m: RegExpExecArray | null;
    if ((m = /^version = (-?[0-9]+)/.exec(line))) {
      if (Number(m[1]) < 1 || Number(m[1]) > 2) fail('Wrong log format.');
    } else if ((m = /^UUID = (\S{1,40})/.exec(line))) {
      if (m[1] !== uuid) fail('Wrong log format.');
    } else if ((m = /^direction = (-?[0-9]+)/.exec(line))) l.backward = Number(m[1]) === 1;
    else if ((m = /^offset = ([0-9]+)/.exec(line))) l.offset = BigInt(m[1]!);
    else if (/^shift = [0-9]+/.test(line)) {
      // always 0 (cryptsetup never sets it)
    } else if ((m = /^mode = (-?[0-9]+)/.exec(line))) {
      const i = Number(m[1]);
      if (!(i >= 0 && i <= 2)) fail('Wrong log format.');
      l.mode = MODES[i]!;
    } else fail('Wrong log format.');
  }
  return l;
}

async function exists(p: string): Promise<boolean> {
  return (await stat(p).catch(() => null)) !== null;
}

/** Write `data` to a new file (exclusive, 0600 or `mode` afterwards) and fsync it. */
async function writeNewFile(path: string, data: Buffer, mode = 0o600): Promise<void> {
  const fh = await open(path, 'wx', 0o600).catch((e: NodeJS.ErrnoException) => {
    if (e.code === 'EEXIST') fail(`File ${path} already exists.`);
    throw new CryptmapError('ECREATE', `Cannot create ${path}.`, { exitCode: 1, cause: e });
  });
  try {
    await fh.write(data, 0, data.length, 0);
    await fh.sync();
  } finally {
    await fh.close();
  }
  if (mode !== 0o600) await chmod(path, mode);
}

async function writeLog(path: string, l: Log): Promise<void> {
  const fh = await open(path, 'r+');
  try {
    await fh.write(formatLog(l), 0, 512, 0);
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** Where the keyslots of a new LUKS1 header with `keyBytes`-byte keys end (LUKS_generate_phdr's layout). */
function luks1KeyslotsEnd(keyBytes: number): number {
  const stride = Math.ceil((keyBytes * 4000) / 512 / 8) * 8;
  return (8 + 8 * stride) * 512;
}

/** The UUID of a device whose LUKS1 header is in legacy reencryption (magic `LUKS\xde\xad`), else undefined. */
export async function luks1StainedUuid(dev: BlockDevice): Promise<string | undefined> {
  if (dev.sizeBytes < 4096) return undefined;
  const b = Buffer.alloc(512);
  await dev.read(0, b);
  if (!b.subarray(0, 6).equals(LUKS1_NOMAGIC) || b.readUInt16BE(6) !== 1) return undefined;
  return b
    .subarray(0xa8, 0xa8 + 40)
    .toString('latin1')
    .split('\0')[0]!;
}

async function setMagic(dev: BlockDevice, magic: Buffer): Promise<void> {
  await dev.write(0, magic);
  await dev.flush();
}

/** Options of a new legacy LUKS1 reencryption (cryptsetup reencrypt on a LUKS1 device). */
export interface Luks1ReencryptInit {
  /** 'reencrypt' (a new volume key, or the same with keepKey) or 'decrypt'. */
  mode: 'reencrypt' | 'decrypt';
  /** The passphrase of each keyslot that goes to the new header (by slot), checked by the caller. */
  passphrases: Map<number, Uint8Array>;
  cipher?: string;
  keyBytes?: number;
  hash?: string;
  /** New keyslots' KDF (pbkdf2 iterations or calibration). */
  keyslot?: NewKeyslotOptions;
  /** --keep-key: the new header keeps the volume key (only the keyslots and hash change, no data rewrite). */
  keepKey?: boolean;
  /** --volume-key-file: the new volume key. */
  volumeKey?: Uint8Array;
  /** --reduce-device-size: the new data offset is this much further (backward run). */
  reduceBytes?: number;
}

/**
 * Begin a legacy reencryption of `vol` (cryptsetup's reencrypt_luks1 up to the data copy): the log,
 * the header copies, then the device's magic made unusable. A crash before that last write leaves
 * the device as it was (`luks1ReencryptStale` tells a resume to start over).
 */
export async function initLuks1Reencrypt(
  dev: BlockDevice,
  vol: Luks1Volume,
  dir: string,
  o: Luks1ReencryptInit,
): Promise<void> {
  const f = luks1ReencryptFiles(dir, vol.uuid);
  const slots = [...o.passphrases.keys()].sort((a, b) => a - b);
  if (slots.length === 0) fail('No key available with this passphrase.', 2);
  const backward = o.reduceBytes !== undefined && o.reduceBytes > 0 && o.mode !== 'decrypt';
  const mainSlot = slots[slots.length - 1]!;
  const { volumeKey: oldVk } = await vol.unlock(o.passphrases.get(mainSlot)!, { keySlot: mainSlot });
  try {
    await writeNewFile(f.log, formatLog({ uuid: vol.uuid, backward, mode: o.mode, offset: backward ? NO_OFFSET : 0n }));
    const hb = Buffer.alloc(backupFileBytes(vol));
    await dev.read(0, hb);
    await writeNewFile(f.org, hb, 0o400);
    const newOff = o.mode === 'decrypt' ? 0 : vol.dataSegment.offsetBytes + (o.reduceBytes ?? 0);
    const vk = o.mode === 'decrypt' ? undefined : o.keepKey ? oldVk.expose() : o.volumeKey;
    const keyBytes = vk?.length ?? (o.mode === 'decrypt' ? (o.keyBytes ?? 32) : (o.keyBytes ?? oldVk.length));
    const nd = await FileDevice.openOrCreate(f.new, Math.max(newOff, luks1KeyslotsEnd(keyBytes)));
    try {
      const first = await Luks1Volume.format(nd, o.passphrases.get(slots[0]!)!, {
        cipher: o.mode === 'decrypt' ? 'cipher_null-ecb' : (o.cipher ?? vol.cipher),
        keyBytes,
        ...(vk ? { volumeKey: vk } : {}),
        hash: o.hash ?? 'sha256',
        uuid: o.mode === 'decrypt' ? NO_UUID : vol.uuid,
        offsetBytes: newOff,
        detachedHeader: newOff === 0,
        keyslot: { ...o.keyslot, keySlot: slots[0]! },
      });
      if (o.mode !== 'decrypt') {
        const { volumeKey: nk } = await first.unlock(o.passphrases.get(slots[0]!)!, { keySlot: slots[0]! });
        try {
          for (const s of slots.slice(1))
            await first.addKey({ volumeKey: nk }, o.passphrases.get(s)!, { ...o.keyslot, keySlot: s });
        } finally {
          nk.dispose();
        }
      }
      await nd.flush();
    } finally {
      await nd.close();
    }
    await setMagic(dev, LUKS1_NOMAGIC);
  } finally {
    oldVk.dispose();
  }
}

/**
 * True when the files in `dir` are of a reencryption that never began on the device (the device
 * still carries its LUKS magic and the log shows no block done): a crash during init. The caller
 * removes them and starts again.
 */
export async function luks1ReencryptStale(dev: BlockDevice, dir: string, uuid: string): Promise<boolean> {
  const f = luks1ReencryptFiles(dir, uuid);
  if (!(await exists(f.log))) return false;
  const b = Buffer.alloc(6);
  await dev.read(0, b);
  if (!b.equals(LUKS_MAGIC)) return false;
  let l: Log;
  try {
    const fh = await open(f.log, 'r');
    const s = Buffer.alloc(512);
    await fh.read(s, 0, 512, 0).finally(() => fh.close());
    l = parseLog(s, uuid);
  } catch {
    return true;
  }
  return l.offset === 0n || l.offset === NO_OFFSET || !(await exists(f.new)) || !(await exists(f.org));
}

/** Remove what a legacy reencryption left in `dir` (after it finished, or one that never began). */
export async function removeLuks1ReencryptFiles(dir: string, uuid: string): Promise<void> {
  const f = luks1ReencryptFiles(dir, uuid);
  for (const p of [f.journal, f.org, f.new, f.log]) await rm(p, { force: true });
}

/** Options of `runLuks1Reencrypt`: the data device, the keyslot, the block size, cancellation and progress. */
export interface Luks1RunOptions {
  /** The data device when the header is detached. */
  dataDev?: BlockDevice;
  /** The keyslot the passphrase is for (cryptsetup --key-slot). */
  keySlot?: number;
  /** Block size (cryptsetup --block-size, MiB; default 4 MiB). */
  blockBytes?: number;
  /** Skip the data (--keep-key: the volume key is the same). */
  keepKey?: boolean;
  /** When aborted, stops after the current block (resumable). */
  signal?: AbortSignal;
  /** Called at the start and after each block with the bytes done and the total. */
  onProgress?: (doneBytes: number, totalBytes: number) => void;
}

function cipherFor(v: Luks1Volume, key: Secret | undefined): SectorCipher | undefined {
  if (v.cipher.startsWith('cipher_null')) return undefined;
  return createSectorCipher({ spec: v.cipher, key: key!.expose(), sectorBytes: 512 });
}

/**
 * Run (or resume) the legacy reencryption of the device whose header is `hdrDev`, from the files in
 * `dir`, to the end: the data block by block from the old header's mapping to the new one's, then the
 * new header onto the device and the files removed. Returns false when stopped by `signal` (resumable).
 */
export async function runLuks1Reencrypt(
  hdrDev: BlockDevice,
  dir: string,
  uuid: string,
  passphrase: Uint8Array,
  o: Luks1RunOptions = {},
): Promise<boolean> {
  const f = luks1ReencryptFiles(dir, uuid);
  const lfh = await open(f.log, 'r').catch(() => fail(`Cannot open reencryption log file.`));
  const ls = Buffer.alloc(512);
  await lfh.read(ls, 0, 512, 0).finally(() => lfh.close());
  const log = parseLog(ls, uuid);
  if (log.mode === 'encrypt') fail('LUKS1 encryption (--new) is not supported by cryptmap; use --type luks2.');
  const od = await FileDevice.open(f.org, { readOnly: true }).catch(() => fail(`Cannot open ${f.org}.`));
  const nd = await FileDevice.open(f.new, { readOnly: false }).catch(() => fail(`Cannot open ${f.new}.`));
  let oldKey: Secret | undefined;
  let newKey: Secret | undefined;
  let oldC: SectorCipher | undefined;
  let newC: SectorCipher | undefined;
  try {
    const ov = await Luks1Volume.open(od);
    const nv = await Luks1Volume.open(nd);
    const ks = o.keySlot !== undefined ? { keySlot: o.keySlot } : {};
    oldKey = (await ov.unlock(passphrase, ks)).volumeKey;
    if (log.mode === 'reencrypt') newKey = (await nv.unlock(passphrase, ks)).volumeKey;
    const data = o.dataDev ?? hdrDev;
    const orgOff = ov.dataSegment.offsetBytes;
    const newOff = nv.dataSegment.offsetBytes;
    if (data.sizeBytes <= Math.max(orgOff, newOff)) fail('Device is too small.');
    const orgSize = data.sizeBytes - orgOff;
    const newSize = data.sizeBytes - newOff;
    const total = log.mode === 'decrypt' ? orgSize : newSize;
    if (!o.keepKey) {
      oldC = cipherFor(ov, oldKey);
      newC = cipherFor(nv, newKey);
      // Nothing done yet: the direction follows the headers (a data offset that grows must be copied
      // from the end). cryptsetup writes its first log before it sets the direction, so a run of it
      // that stopped before the copy (device-mapper missing, say) leaves "direction = 0" there.
      const untouched = log.backward ? log.offset === NO_OFFSET || log.offset >= BigInt(total) : log.offset === 0n;
      if (untouched) {
        log.backward = newOff > orgOff;
        log.offset = log.backward ? BigInt(total) : 0n;
        await writeLog(f.log, log);
      } else if (log.backward !== newOff > orgOff && newOff !== orgOff)
        fail('Reencryption log direction does not match the headers (Wrong log format).');
      let pos = log.offset;
      if (log.backward && (pos === NO_OFFSET || pos > BigInt(total))) pos = BigInt(total);
      if (!log.backward && pos > BigInt(total)) pos = BigInt(total);
      await recoverJournal(f.journal, data, pos);
      const block = o.blockBytes ?? 4 << 20;
      const buf = Buffer.alloc(Math.min(block, total));
      const cur = Buffer.alloc(buf.length);
      let p = Number(pos);
      const done = () => (log.backward ? total - p : p);
      o.onProgress?.(done(), total);
      try {
        for (;;) {
          let at: number;
          let n: number;
          if (log.backward) {
            if (p === 0) break;
            at = Math.max(0, p - block);
            n = p - at;
          } else {
            if (p >= total) break;
            at = p;
            n = Math.min(block, total - p);
          }
          if (o.signal?.aborted) return false;
          const b = buf.subarray(0, n);
          await data.read(orgOff + at, b);
          // The bytes this block overwrites, kept until the log says the block is done.
          const c = cur.subarray(0, n);
          if (orgOff === newOff) b.copy(c);
          else await data.read(newOff + at, c);
          await writeJournal(f.journal, BigInt(p), newOff + at, c);
          if (oldC) await oldC.decryptAsync(b, BigInt(at / 512));
          if (newC) await newC.encryptAsync(b, BigInt(at / 512));
          await data.write(newOff + at, b);
          await data.flush();
          p = log.backward ? at : at + n;
          log.offset = BigInt(p);
          await writeLog(f.log, log);
          o.onProgress?.(done(), total);
        }
      } finally {
        buf.fill(0);
        cur.fill(0);
      }
      // Decryption: the bytes past the plaintext (the old data offset's worth at the end) are zeroed.
      if (log.mode === 'decrypt' && newSize > orgSize) {
        await data.writeZeroes(newOff + orgSize, newSize - orgSize);
        await data.flush();
      }
    }
    if (log.mode !== 'decrypt') {
      // The new header onto the device: the keyslots, then the header behind the unusable magic, then
      // the magic alone (one sector's write), so a crash anywhere leaves a device that resumes.
      const hb = Buffer.alloc(backupFileBytes(nv));
      await nd.read(0, hb);
      if (hb.length > 4096) await hdrDev.write(4096, hb.subarray(4096));
      await hdrDev.flush();
      await hdrDev.write(6, hb.subarray(6, 4096));
      await hdrDev.flush();
      await setMagic(hdrDev, hb.subarray(0, 6));
      hb.fill(0);
    }
  } finally {
    oldC?.dispose();
    newC?.dispose();
    oldKey?.dispose();
    newKey?.dispose();
    await od.close();
    await nd.close();
  }
  await removeLuks1ReencryptFiles(dir, uuid);
  return true;
}

/** The journal: magic, the log position it belongs to, the device offset, the length, a sha256, the bytes. */
async function writeJournal(path: string, logPos: bigint, devOff: number, bytes: Buffer): Promise<void> {
  const h = Buffer.alloc(64);
  JOURNAL_MAGIC.copy(h, 0);
  h.writeBigUInt64LE(logPos, 8);
  h.writeBigUInt64LE(BigInt(devOff), 16);
  h.writeUInt32LE(bytes.length, 24);
  createHash('sha256').update(h.subarray(0, 28)).update(bytes).digest().copy(h, 28);
  const fh = await open(path, 'w', 0o600);
  try {
    await fh.write(h, 0, 64, 0);
    await fh.write(bytes, 0, bytes.length, 64);
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/**
 * A journal of the block at log position `pos` (not recorded as done): its bytes go back, so the block
 * is done again from intact data. A torn journal means its block was never written (the journal is
 * synced before the block): nothing to do.
 */
async function recoverJournal(path: string, data: BlockDevice, pos: bigint): Promise<void> {
  const fh = await open(path, 'r').catch(() => undefined);
  if (!fh) return;
  let bytes: Buffer | undefined;
  try {
    const h = Buffer.alloc(64);
    if ((await fh.read(h, 0, 64, 0)).bytesRead !== 64 || !h.subarray(0, 8).equals(JOURNAL_MAGIC)) return;
    if (h.readBigUInt64LE(8) !== pos) return;
    const off = Number(h.readBigUInt64LE(16));
    const n = h.readUInt32LE(24);
    if (n > 1 << 30) return;
    bytes = Buffer.alloc(n);
    if ((await fh.read(bytes, 0, n, 64)).bytesRead !== n) return;
    const sum = createHash('sha256').update(h.subarray(0, 28)).update(bytes).digest();
    if (!sum.equals(h.subarray(28, 60))) return;
    await data.write(off, bytes);
    await data.flush();
  } finally {
    bytes?.fill(0);
    await fh.close();
  }
}

/** Whether keyslot `i` of `vol` is active. */
export function luks1SlotActive(vol: Luks1Volume, i: number): boolean {
  return vol.header.keyblock[i]?.active === LUKS_KEY_ENABLED;
}
