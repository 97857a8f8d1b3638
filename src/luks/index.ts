/**
 * Public API of the LUKS layer for the activation layer and the CLI.
 *
 * @example
 *   const dev = await FileDevice.open('disk.img');
 *   const vol = await openLuks(dev);                       // LUKS1 or LUKS2
 *   const { volumeKey, keyslot } = await vol.unlock(Buffer.from('passphrase'));
 *   const seg = vol.dataSegment;                           // offset, size, cipher, sector size, iv tweak
 *   ...; volumeKey.dispose();
 *
 * @module cryptmap/luks
 */
import { open as fsOpen } from 'node:fs/promises';
import type { BlockDevice } from '../blockdev/types.js';
import { CryptmapError, EXIT_WRONG_DEVICE, isCryptmapError } from '../util/errors.js';
import { logger } from '../util/log.js';
import { checkNewFileDir } from '../util/trusted-path.js';
import { hasLuks1Magic, LUKS_PHDR_BYTES, Luks1Volume } from './luks1.js';
import { hasLuks2Magic } from './luks2-disk.js';
import { Luks2Volume, readLuks2 } from './luks2.js';
import { unknownRequirements } from './luks2-json.js';
import { inReencryption } from './reencrypt.js';
import type { LuksVolume } from './types.js';
import { backupFileBytes } from './volume-common.js';

const log = logger('luks');

export type { Luks1FormatOptions } from './luks1.js';
export { Luks1Volume, validateLuks1, decodeLuks1, encodeLuks1 } from './luks1.js';
export type { Luks2FormatOptions, Luks2ReadResult } from './luks2.js';
export { Luks2Volume, readLuks2 } from './luks2.js';
export { type Luks2Layout, luks2Layout } from './luks2-format.js';
export { noKeyError } from './errors.js';
export type { L2Area, L2Config, L2Digest, L2Keyslot, L2Segment, L2Token, Luks2Json } from './luks2-json.js';
export type { Luks2BinHeader } from './luks2-disk.js';
export type { KdfParams } from '../crypto/kdf/index.js';
export type { Secret } from '../util/secret.js';
export type { CryptmapError } from '../util/errors.js';
export type { ConvertOptions } from './convert.js';
export { CHECK_NAMES, validateLuks2Json, parseJsonArea, unmetReencryptRequirement } from './luks2-json.js';
export { withDeviceLock, lockDir } from './lock.js';
export type { ReencryptLock, ReencryptLockOptions } from './reencrypt-lock.js';
export {
  CRYPTSETUP_LOCK_DIR,
  REENCRYPT_BUSY,
  reencryptLockPath,
  takeReencryptLock,
  withReencryptLock,
} from './reencrypt-lock.js';
export type {
  EncryptInitOptions,
  HotzoneHooks,
  ReencryptInitOptions,
  DecryptExportOptions,
  MappedSegment,
  ReencryptKeys,
  ReencryptLayout,
  ReencryptRunOptions,
  Resilience,
} from './reencrypt.js';
export {
  initDecrypt,
  initDecryptExport,
  initDecryptExportFile,
  initEncrypt,
  initReencrypt,
  inReencryption,
  reencryptLayout,
  reencryptProgress,
  reencryptSegments,
  runReencrypt,
  runReencryptWithKeys,
  unlockInReencryption,
  unlockReencryptKeys,
  upgradeReencryptMetadata,
  reencryptDigestMissing,
  verifyReencryptDigest,
} from './reencrypt.js';
export type { Luks1ReencryptInit, Luks1RunOptions } from './reencrypt-luks1.js';
export {
  initLuks1Reencrypt,
  LUKS1_NOMAGIC,
  luks1ReencryptFiles,
  luks1ReencryptStale,
  luks1SlotActive,
  luks1StainedUuid,
  removeLuks1ReencryptFiles,
  runLuks1Reencrypt,
} from './reencrypt-luks1.js';
export { convertLuks1ToLuks2, convertLuks2ToLuks1, planLuks1Moves } from './convert.js';
export type { TokenUnlockOptions, TokenUnlockResult } from './token-unlock.js';
export { tokenCandidates, unlockByToken } from './token-unlock.js';
/** Token handlers keyed by type: a layer above may register a type with an `open` (the unlock extension point). */
export type { TokenHandler } from './luks2-handlers.js';
export { TOKEN_HANDLERS } from './luks2-handlers.js';
export { foreignSignature } from './signatures.js';
export type * from './types.js';

/** 'luks1', 'luks2' or null, from the first bytes (isLuks; cryptsetup checks the primary magic only). */
export async function detectLuks(dev: BlockDevice): Promise<'luks1' | 'luks2' | null> {
  if (dev.sizeBytes < 512) return null;
  const b = Buffer.alloc(512);
  await dev.read(0, b);
  if (hasLuks1Magic(b)) return 'luks1';
  if (hasLuks2Magic(b) === 'primary') return 'luks2';
  return null;
}

/** Open a LUKS1 or LUKS2 header on `dev` (the header device when detached). */
export async function openLuks(dev: BlockDevice): Promise<Luks1Volume | Luks2Volume> {
  const t = await detectLuks(dev);
  if (t === 'luks1') return Luks1Volume.open(dev);
  if (t === 'luks2') return Luks2Volume.open(dev);
  // A LUKS2 volume with a damaged primary may still have a good secondary copy.
  try {
    await readLuks2(dev);
    return Luks2Volume.open(dev);
  } catch {
    throw new CryptmapError('ENOTLUKS', 'Device is not a valid LUKS device.', { exitCode: 1 });
  }
}

/**
 * Copy the header and keyslot areas into a new file (luksHeaderBackup); fails if the file exists.
 * Unlike cryptsetup, refused in a directory another user can rewrite (checkNewFileDir, exit 2): a
 * backup swapped there would later be restored onto the device.
 */
export async function headerBackup(dev: BlockDevice, vol: LuksVolume, file: string): Promise<void> {
  checkNewFileDir(file);
  const n = vol.headerBytes;
  const buf = Buffer.alloc(backupFileBytes(vol));
  try {
    await dev.read(0, buf.subarray(0, n));
    // As cryptsetup: when LUKS1 keyslots start at 4 KiB, the unused rest of that block is left out
    // (zeros), so a backup carries no old signature from there.
    if (vol instanceof Luks1Volume && vol.header.keyblock[0]!.keyMaterialOffset * 512 === 4096)
      buf.fill(0, LUKS_PHDR_BYTES, 4096);
    let fh: Awaited<ReturnType<typeof fsOpen>>;
    try {
      fh = await fsOpen(file, 'wx', 0o400);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      throw new CryptmapError(
        'EBACKUP',
        code === 'EEXIST'
          ? `Requested header backup file ${file} already exists.`
          : `Cannot create header backup file ${file}.`,
        {
          exitCode: 1, // cryptsetup returns -EINVAL for both
          errno: code === 'EEXIST' ? 'EEXIST' : 'EINVAL',
          cause: e,
        },
      );
    }
    try {
      await fh.writeFile(buf);
      await fh.sync();
    } finally {
      await fh.close();
    }
  } finally {
    buf.fill(0); // the keyslots' material, as cryptsetup wipes its buffer
  }
}

/** What a header restore replaces: the facts cryptsetup's question before it names (luksHeaderRestore). */
export interface RestorePlan {
  /** The backup's LUKS version. */
  type: 'luks1' | 'luks2';
  /** The version of the valid header on the device, if any. */
  deviceType: 'luks1' | 'luks2' | null;
  /** The device holds a valid header of the backup's version ("already contains"), else "does not contain". */
  replacesHeader: boolean;
  /** That header's UUID differs from the backup's. */
  otherUuid: boolean;
  /** LUKS2: that header has requirements this version does not know. */
  unknownRequirements: boolean;
  /** LUKS2: that header is in a reencryption. */
  reencryption: boolean;
}

/** Options of headerRestore: the backup's path for messages, and the question asked before the first write. */
export interface HeaderRestoreOptions {
  /** The backup's path, for messages. */
  backupPath?: string;
  /** Called after every check and before the first write; throws to stop (nothing written then). */
  confirm?: (plan: RestorePlan) => Promise<void>;
}

/**
 * The checks cryptsetup 2.6 makes before a header restore, with its messages (exit 1 each): a LUKS2
 * backup must not carry requirements this version does not know (the reencryption's are allowed);
 * a header of the backup's version already on the device must describe the same data: LUKS1 the same
 * payload offset and key size, LUKS2 (unless in a reencryption) the same data offset and the same
 * size of header and keyslot areas. Restoring another layout would map the data wrongly.
 */
function planRestore(src: LuksVolume, old: LuksVolume | null, backupPath: string): RestorePlan {
  const fail = (m: string) => new CryptmapError('EBACKUP', m, { exitCode: 1 });
  if (src instanceof Luks2Volume && unknownRequirements(src.json).length > 0)
    throw fail(`Forbidden LUKS2 requirements detected in backup ${backupPath}.`);
  const cur = old !== null && old.type === src.type ? old : null;
  const plan: RestorePlan = {
    type: src.type,
    deviceType: old?.type ?? null,
    replacesHeader: cur !== null,
    otherUuid: cur !== null && cur.uuid !== src.uuid,
    unknownRequirements: cur instanceof Luks2Volume && unknownRequirements(cur.json).length > 0,
    reencryption: cur instanceof Luks2Volume && inReencryption(cur.json),
  };
  if (cur === null) return plan;
  if (src.type === 'luks1') {
    if (
      cur.dataSegment.offsetBytes !== src.dataSegment.offsetBytes ||
      cur.dataSegment.keyBytes !== src.dataSegment.keyBytes
    )
      throw fail('Data offset or key size differs on device and backup, restore failed.');
  } else if (!plan.reencryption) {
    if (cur.dataSegment.offsetBytes !== src.dataSegment.offsetBytes)
      throw fail('Data offset differ on device and backup, restore failed.');
    if (cur.headerBytes !== src.headerBytes)
      throw fail('Binary header with keyslot areas size differ on device and backup, restore failed.');
  }
  return plan;
}

/**
 * Restore a header backup (luksHeaderRestore): the backup must be a valid LUKS header; afterwards the
 * device's header and keyslot areas are byte for byte the backup's. Written so that a crash between
 * any two writes leaves the device openable with the old or the restored secrets:
 *  1. keyslots of the volume on the device whose material the restore would change are first moved
 *     to free space the backup does not use (LUKS2 `relocateKeyslot`: copy, then header write);
 *  2. every changed part of the keyslot region outside the old header's live keyslots is written;
 *  3. the header copies (LUKS2: primary, then secondary; the copy with the higher seqid wins while they
 *     differ) - from here the restored header is in charge;
 *  4. the rest of the changes (the old keyslots' material, now unreferenced).
 * Not crash-safe, with a warning: an old LUKS1 header whose keyslots collide with the backup's (LUKS1
 * keyslots cannot move), or a LUKS2 keyslots area with no room to move them; and a restore that
 * changes the metadata size while old keyslots sit where the new header copies go. `opts.confirm`
 * sees the plan after cryptsetup's checks (planRestore) and before the first write.
 */
export async function headerRestore(
  dev: BlockDevice,
  backup: BlockDevice,
  opts: HeaderRestoreOptions = {},
): Promise<LuksVolume> {
  // cryptsetup: -EINVAL (exit 1) for a backup that is not a usable LUKS header.
  const src = await openLuks(backup).catch((e) => {
    if (isCryptmapError(e, 'ENOTLUKS'))
      throw new CryptmapError('EBACKUP', 'Header backup file does not contain compatible LUKS header.', {
        exitCode: 1,
        cause: e,
      });
    if (isCryptmapError(e) && e.code !== 'ENOMEM' && e.code !== 'EIO') {
      throw new CryptmapError('EBACKUP', 'Backup file does not contain valid LUKS header.', {
        exitCode: 1,
        cause: e,
        context: { why: e.message },
      });
    }
    throw e;
  });
  const n = src.headerBytes;
  if (n > backup.sizeBytes)
    throw new CryptmapError('EBACKUP', 'Backup file does not contain valid LUKS header.', { exitCode: 1 });
  const old = await openLuks(dev).catch(() => null);
  const plan = planRestore(src, old, opts.backupPath ?? 'file');
  await opts.confirm?.(plan);
  if (n > dev.sizeBytes)
    throw new CryptmapError('EBACKUP', 'Device is too small for the header backup.', { exitCode: EXIT_WRONG_DEVICE });
  const buf = Buffer.alloc(n);
  await backup.read(0, buf);
  const hdrBytes = src.type === 'luks2' ? 2 * src.metadataBytes : 4096;
  const cur = Buffer.alloc(n);
  await dev.read(0, cur);
  const differs = (o: number, e: number) => !buf.subarray(o, e).equals(cur.subarray(o, e));
  const overlap = (a: Range, b: Range): Range | null =>
    a[0] < b[1] && b[0] < a[1] ? [Math.max(a[0], b[0]), Math.min(a[1], b[1])] : null;
  const span = (a: { offsetBytes: number; sizeBytes: number }): Range => [a.offsetBytes, a.offsetBytes + a.sizeBytes];
  const newAreas = src.keyslotAreas().map(span);
  let oldLive: Range[] = [];
  if (old) {
    const keep: Range[] = [[0, hdrBytes], ...newAreas];
    for (const a of old.keyslotAreas()) {
      const clash = keep.some((b) => {
        const o = overlap(span(a), b);
        return o !== null && differs(o[0], Math.min(o[1], n));
      });
      if (!clash) continue;
      const moved =
        old.type === 'luks2' &&
        (await old.relocateKeyslot(a.id, keep).catch((e) => {
          if (isCryptmapError(e)) return false; // e.g. unknown requirements: cannot change that header
          throw e;
        }));
      if (!moved)
        log.warn('header restore overwrites a live keyslot before the new header is written; not crash-safe', {
          keyslot: a.id,
        });
    }
    await dev.read(0, cur);
    oldLive = old.keyslotAreas().map(span);
  }
  // Changed runs of 4 KiB blocks in the keyslot region, split into before and after the header switch.
  const now: Range[] = [];
  const later: Range[] = [];
  for (let o = hdrBytes; o < n; o += 4096) {
    const e = Math.min(o + 4096, n);
    if (!differs(o, e)) continue;
    const list = oldLive.some((r) => overlap([o, e], r) !== null) ? later : now;
    const last = list[list.length - 1];
    if (last && last[1] === o) last[1] = e;
    else list.push([o, e]);
  }
  for (const [o, e] of now) await dev.write(o, buf.subarray(o, e));
  await dev.flush();
  if (src.type === 'luks2') {
    const md = src.metadataBytes;
    await dev.write(0, buf.subarray(0, md));
    await dev.flush();
    await dev.write(md, buf.subarray(md, 2 * md));
  } else {
    await dev.write(0, buf.subarray(0, hdrBytes));
  }
  await dev.flush();
  for (const [o, e] of later) await dev.write(o, buf.subarray(o, e));
  await dev.flush();
  return openLuks(dev);
}

type Range = [number, number];
