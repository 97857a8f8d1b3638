/**
 * `cryptmap reencrypt` (cryptsetup 2.6 reencrypt, offline LUKS2: volume-key rotation, --encrypt, --decrypt): a thin verb over
 * src/luks/reencrypt.ts. Without --init-only/--resume-only it initialises and runs in one go, or,
 * when the header is already in reencryption (begun by cryptmap or cryptsetup), resumes.
 * SIGINT stops after the current hotzone; the device stays resumable.
 */
import { stat } from 'node:fs/promises';
import { randomUUID } from 'node:crypto';
import { isRemoteDevice } from '../../blockdev/open.js';
import {
  initDecrypt,
  initDecryptExportFile,
  initEncrypt,
  initLuks1Reencrypt,
  Luks1Volume,
  luks1ReencryptFiles,
  luks1ReencryptStale,
  luks1SlotActive,
  luks1StainedUuid,
  removeLuks1ReencryptFiles,
  runLuks1Reencrypt,
  initReencrypt,
  inReencryption,
  luks2Layout,
  type Luks2Volume,
  openLuks,
  type ReencryptLock,
  reencryptLayout,
  reencryptSegments,
  type Resilience,
  runReencrypt,
  takeReencryptLock,
  withDeviceLock,
} from '../../luks/index.js';
import type { SectorBytes } from '../../engine/types.js';
import type { BlockDevice } from '../../blockdev/types.js';
import {
  CryptmapError,
  EXIT_FAILURE,
  EXIT_WRONG_DEVICE,
  EXIT_WRONG_PARAMS,
  isCryptmapError,
} from '../../util/errors.js';
import { checkExistingFile, ensureTrustedDir } from '../../util/trusted-path.js';
import { activeInDaemon, connectDaemon } from '../daemon-client.js';
import { mapInDaemon } from './open-reencrypt.js';
import { activeByName, runOnline } from './reencrypt-online.js';
import type { CliIO, VerbMain } from '../types.js';
import {
  closeQuietly,
  createHeaderFile,
  headerPath,
  intOpt,
  keyFileSource,
  keyslotOptions,
  type LuksArgs,
  needDevice,
  openDevice,
  openHeaderFile,
  parseLuksArgs,
  progressFromOptions,
  sizeOpt,
} from './luks-common.js';
import { loadLuks, passphraseTries } from './luks-unlock.js';
import { confirm, getPassphrase, type PassphraseSource, readVolumeKeyFile } from './terminal-input.js';
import { passphrasePrompt } from '../device-name.js';

/** A size option in bytes (cryptsetup's units, luks-common sizeOpt); zero is refused. */
function bytesOpt(v: string | undefined, name: string): number | undefined {
  const n = sizeOpt(v, name);
  if (n === 0) throw new CryptmapError('EARGS', `Invalid ${name} value.`, { exitCode: EXIT_WRONG_PARAMS });
  return n;
}

/** Runs (or resumes) the reencryption on disk with SIGINT stopping it after the current hotzone. */
async function run(
  io: CliIO,
  v: LuksArgs,
  device: string,
  vol: Luks2Volume,
  pass: Uint8Array,
  dataDev: BlockDevice | undefined,
  hotzoneBytes: number | undefined,
): Promise<number> {
  const ac = new AbortController();
  const onInt = () => ac.abort();
  const progress = progressFromOptions(io, device, v);
  if (v['force-offline-reencrypt'] && !v['batch-mode'])
    io.stdout.write('Resuming LUKS reencryption in forced offline mode.\n');
  process.on('SIGINT', onInt);
  try {
    const done = await runReencrypt(vol, pass, {
      ...(dataDev ? { dataDev } : {}),
      ...(hotzoneBytes !== undefined ? { hotzoneBytes } : {}),
      signal: ac.signal,
      onProgress: (d, t) => progress.update(t, d),
    });
    if (!done) {
      progress.interrupted();
      io.stderr.write(
        '\nReencryption interrupted.\nRun cryptmap reencrypt --resume-only (or cryptsetup) to continue.\n',
      );
    }
    return 0;
  } finally {
    process.off('SIGINT', onInt);
  }
}

/**
 * cryptmap's device lock for the whole run. A reencryption holds it for minutes, every other verb
 * for moments: one not free within a second is taken as a reencryption running, refused as
 * cryptsetup refuses a second one. cryptsetup itself is kept out by its own reencryption lock,
 * which the data rewrite takes as well (cryptsetupLock).
 */
async function reencryptLock<T>(io: CliIO, path: string, fn: () => Promise<T>): Promise<T> {
  let inside = false;
  try {
    return await withDeviceLock(
      path,
      () => {
        inside = true;
        return fn();
      },
      { timeoutMs: 1000, env: io.env },
    );
  } catch (e) {
    if (!inside && isCryptmapError(e) && e.code === 'ELOCKED')
      throw new CryptmapError('EBUSY', 'Reencryption process is already running.', { exitCode: 5, cause: e });
    throw e;
  }
}

async function tryLoad(dev: BlockDevice): Promise<Luks1Volume | Luks2Volume | null> {
  try {
    return await openLuks(dev);
  } catch {
    return null;
  }
}

/**
 * cryptsetup's reencryption lock of `vol` (luks/reencrypt-lock.ts: flock on
 * /run/cryptsetup/LN_LUKS2-reencryption-UUID), taken before data is rewritten offline; refused at once
 * with cryptsetup's 'Reencryption process is already running.' (exit 5) while cryptsetup or another
 * cryptmap holds it. Online, the daemon takes it instead.
 */
function cryptsetupLock(io: CliIO, v: LuksArgs, vol: Luks2Volume): ReencryptLock {
  return takeReencryptLock(vol.uuid, { env: io.env, disabled: v['disable-locks'] === true });
}

/** What cryptmap says to LUKS1 encryption (cryptsetup 2.6's legacy --new), which it does not do. */
const LUKS1_NOT_BUILT =
  'LUKS1 encryption of a plaintext device is not supported by cryptmap: encrypt as LUKS2 (--type luks2), then convert (cryptmap convert --type luks1) if LUKS1 is needed.';

/** cryptsetup 2.6's device states for reencrypt (src/utils_reencrypt.c device_status_info). */
type DeviceStatus = 'luks1' | 'luks1-unusable' | 'luks2' | 'luks2-reencrypt' | 'not-luks' | 'invalid';

/**
 * The state of the header at `path`: a LUKS1 device in cryptsetup's legacy reencryption has its
 * magic turned to `LUKS\xde\xad` (version 1 kept) until it finishes ('luks1-unusable'); unreadable
 * anything else is 'not-luks'; a device that cannot be opened is 'invalid' (the verb reports it).
 */
async function deviceStatus(path: string): Promise<DeviceStatus> {
  const dev = await openDevice(path, false).catch(() => undefined);
  if (!dev) return 'invalid';
  try {
    const vol = await tryLoad(dev);
    if (vol?.type === 'luks1') return 'luks1';
    if (vol?.type === 'luks2') return inReencryption((vol as Luks2Volume).jsonSnapshot()) ? 'luks2-reencrypt' : 'luks2';
    if (dev.sizeBytes < 4096) return 'not-luks';
    const b = Buffer.alloc(8);
    await dev.read(0, b);
    const unusable =
      b.subarray(0, 6).equals(Buffer.from([0x4c, 0x55, 0x4b, 0x53, 0xde, 0xad])) && b.readUInt16BE(6) === 1;
    return unusable ? 'luks1-unusable' : 'not-luks';
  } finally {
    await closeQuietly(dev);
  }
}

/**
 * cryptsetup 2.6's refusals before any work (src/utils_reencrypt.c reencrypt()), same words and
 * exit code 1: a --type that is not the device's, --resume-only of a device not in reencryption, and
 * a LUKS1 device in cryptsetup's legacy reencryption (cryptmap does not resume that format).
 */
async function checkVersions(v: LuksArgs, shown: string, st: DeviceStatus): Promise<void> {
  const conflict = (what: string) => {
    throw new CryptmapError('EINVAL', `Conflicting versions. Device ${shown} ${what}.`, { exitCode: EXIT_FAILURE });
  };
  if (st === 'luks1' && v.type === 'luks2') conflict('is LUKS1');
  if (st === 'luks1-unusable' && v.type === 'luks2') conflict('is in LUKS1 reencryption');
  if (st === 'luks2' && v.type === 'luks1') conflict('is LUKS2');
  if (st === 'luks2-reencrypt' && v.type === 'luks1') conflict('is in LUKS2 reencryption');
  if (v['resume-only'] && (st === 'luks2' || st === 'luks1' || st === 'not-luks'))
    throw new CryptmapError('EINVAL', 'Device reencryption not in progress.', { exitCode: EXIT_FAILURE });
}

function wrongParams(msg: string): never {
  throw new CryptmapError('EARGS', msg, { exitCode: EXIT_WRONG_PARAMS });
}

const reencrypt: VerbMain = async (argv: string[], io: CliIO) => {
  const { values: v, positionals } = parseLuksArgs(argv);
  const device = needDevice(positionals, 'cryptmap reencrypt [OPTION...] <device>');
  if (v['init-only'] && v['resume-only']) wrongParams('Options --init-only and --resume-only cannot be combined.');
  if (v.encrypt && v.decrypt) wrongParams('Options --encrypt and --decrypt cannot be combined.');
  const resilience = (v.resilience ?? 'checksum') as Resilience;
  if (!['checksum', 'journal', 'none', 'datashift', 'datashift-checksum', 'datashift-journal'].includes(resilience))
    wrongParams(`Resilience mode ${v.resilience} is invalid.`);
  const reduceBytes = bytesOpt(v['reduce-device-size'], '--reduce-device-size');
  if (reduceBytes !== undefined && reduceBytes % 512 !== 0)
    wrongParams('Device size must be multiple of 512 bytes sector.');
  if (resilience === 'datashift' && reduceBytes === undefined)
    wrongParams('Resilience mode datashift can be used only with --reduce-device-size.');
  if (v.type !== undefined && !['luks', 'luks1', 'luks2'].includes(v.type)) wrongParams(`Unknown type ${v.type}.`);
  const hotzoneBytes = bytesOpt(v['hotzone-size'], '--hotzone-size');
  const keyBits = intOpt(v['key-size'], '--key-size', 8, 4096);
  if (keyBits !== undefined && keyBits % 8 !== 0) wrongParams('Key size must be a multiple of 8 bits');
  const sector = intOpt(v['sector-size'], '--sector-size', 512, 4096);
  if (sector !== undefined && ![512, 1024, 2048, 4096].includes(sector))
    wrongParams('Unsupported encryption sector size.');
  const offsetSectors = intOpt(v.offset, '--offset');
  intOpt(v['progress-frequency'], '--progress-frequency', 0, 0xffffffff);
  const passSrc = keyFileSource(v);
  if (v.encrypt) {
    const h = v.header ?? device;
    if (!v.header || (await stat(v.header).catch(() => null))) {
      const st = await deviceStatus(h);
      await checkVersions(v, h, st);
      // cryptsetup resumes its legacy reencryption of a marked LUKS1 device whatever the mode asked.
      if (st === 'luks1-unusable') return luks1Main(io, v, device, h, device, passSrc);
    }
    if (v.type === 'luks1')
      throw new CryptmapError('ENOTSUP', LUKS1_NOT_BUILT, { exitCode: EXIT_FAILURE, errno: 'ENOTSUP' });
    return encryptMain(io, v, device, {
      name: positionals[1],
      resilience,
      reduceBytes,
      hotzoneBytes,
      keyBits,
      sector,
      offsetSectors,
      passSrc,
    });
  }
  // `reencrypt NAME`: the device and header of the daemon's active volume NAME.
  let dataPath = device;
  let hdr = headerPath(v, device);
  if (!v.header && !isRemoteDevice(device) && !(await stat(device).catch(() => null))) {
    const st = await activeByName(io, v['runtime-dir'], device);
    if (st?.mapping) {
      dataPath = st.mapping.device;
      hdr = st.mapping.header ?? st.mapping.device;
    }
  }
  // cryptsetup 2.6 exports the header of an in-place LUKS2 device to a --header file that does not exist
  // yet and shifts the data down (decrypt_luks2_datashift_init).
  if (v.decrypt && v.header && !(await stat(v.header).catch(() => null))) {
    const st = await deviceStatus(device);
    if (st === 'luks2') return decryptExportMain(io, v, device, v.header, { hotzoneBytes, passSrc });
    // cryptsetup: the data device is not LUKS2 either: the header is what is missing.
    if (st !== 'luks1' && st !== 'luks1-unusable' && st !== 'luks2-reencrypt')
      throw new CryptmapError('ENODEV', `Device ${v.header} does not exist or access denied.`, { exitCode: 1 });
  }
  const status = await deviceStatus(hdr);
  await checkVersions(v, v.header ?? device, status);
  if (status === 'luks1' || status === 'luks1-unusable') return luks1Main(io, v, device, hdr, dataPath, passSrc);
  // A LUKS1 decryption whose first blocks already overwrote the header: resumed by its UUID (cryptsetup --decrypt --uuid).
  if (status === 'not-luks' && v.decrypt && v.uuid !== undefined && !v.header)
    return luks1Main(io, v, device, hdr, dataPath, passSrc);
  const dev = await openDevice(hdr, true);
  let dataDev: BlockDevice | undefined;
  try {
    if (hdr !== dataPath) dataDev = await openDevice(dataPath, true);
    return await reencryptLock(io, hdr, async () => {
      const vol = await loadLuks(dev, hdr);
      if (vol.type !== 'luks2') throw new CryptmapError('EINVAL', 'Device is not a LUKS2 device.', { exitCode: 1 });
      const l2 = vol as Luks2Volume;
      // Active in the daemon: it runs the reencryption under its live mapping (online).
      const active = await activeInDaemon(v['runtime-dir'], io.env, l2.uuid, 'reencrypt');
      if (active && v['force-offline-reencrypt'])
        throw new CryptmapError(
          'EBUSY',
          `Device ${device} is active in the cryptmap daemon (${active.name}): it cannot be reencrypted offline.`,
          { exitCode: 5 },
        );
      const running = inReencryption(l2.jsonSnapshot());
      if (v['resume-only'] && !running)
        throw new CryptmapError('EINVAL', 'Device reencryption not in progress.', { exitCode: 1 });
      if (v['init-only'] && running)
        throw new CryptmapError('EBUSY', 'LUKS2 reencryption already initialized. Aborting operation.', {
          exitCode: 1,
        });
      if (v.decrypt && !running && !v.header)
        throw new CryptmapError('EINVAL', 'LUKS2 decryption requires --header option.', { exitCode: 1 });
      const askOffline = await offlineCheck(v, device, dataPath, !!active);
      // A data shift moves the data under a live mapping: cryptmap's daemon does not do that online.
      if (active && ((!running && reduceBytes !== undefined) || (running && shiftsData(l2))))
        throw new CryptmapError(
          'EBUSY',
          `Device ${device} is active in the cryptmap daemon (${active.name}): reencryption with a data shift runs offline only; close it first.`,
          { exitCode: 5 },
        );
      // A resume checks cryptsetup's lock before asking for the passphrase; a new one takes it after init.
      let lock = running && !active ? cryptsetupLock(io, v, l2) : undefined;
      // A new volume key: a passphrase for every keyslot of the old one, each checked (keyslotPassphrases).
      const newKey = !running && !v.decrypt;
      const slotArg = intOpt(v['key-slot'], '--key-slot', 0, 31);
      const passes = newKey
        ? await keyslotPassphrases(io, l2, slotArg, passSrc, passphraseTries(io, v)).catch((e: unknown) => {
            lock?.release();
            throw e;
          })
        : undefined;
      const first = passes ? [...passes.keys()][0]! : undefined;
      const pass = passes
        ? passes.get(first!)!
        : await getPassphrase(io, passphrasePrompt(device), passSrc).catch((e: unknown) => {
            lock?.release();
            throw e;
          });
      try {
        if (askOffline) await askOfflineRun(io, device);
        if (!running && v.decrypt) {
          await initDecrypt(l2, pass, {
            ...(slotArg !== undefined ? { keySlot: slotArg } : {}),
            resilience,
            ...(v['resilience-hash'] ? { resilienceHash: v['resilience-hash'] } : {}),
            ...(dataDev ? { dataDev } : {}),
            ...(reduceBytes !== undefined ? { shiftBytes: reduceBytes } : {}),
          });
          if (v['init-only']) return 0;
        } else if (!running) {
          const ko = keyslotOptions(v, 'luks2');
          delete ko.keySlot;
          await initReencrypt(l2, pass, {
            ...ko,
            oldKeySlot: first!,
            morePassphrases: passes!,
            resilience,
            ...(v['resilience-hash'] ? { resilienceHash: v['resilience-hash'] } : {}),
            ...(v.cipher ? { cipher: v.cipher } : {}),
            ...(keyBits !== undefined ? { keyBytes: keyBits / 8 } : {}),
            ...(sector !== undefined ? { sectorBytes: sector as SectorBytes } : {}),
            ...(reduceBytes !== undefined ? { shiftBytes: reduceBytes } : {}),
          });
          if (v['init-only']) return 0;
        }
        if (active) return await runOnline(io, v, device, active.name, l2, pass, hotzoneBytes);
        lock ??= cryptsetupLock(io, v, l2);
        return await run(io, v, device, l2, pass, dataDev, hotzoneBytes);
      } finally {
        lock?.release();
        pass.fill(0);
        for (const p of passes?.values() ?? []) p.fill(0);
      }
    });
  } finally {
    await closeQuietly(dataDev);
    await closeQuietly(dev);
  }
};

/**
 * `reencrypt --decrypt --header H DEVICE` of a LUKS2 device whose header is in place, H not existing
 * yet (cryptsetup 2.6 decrypt_luks2_datashift_init): the header is exported to H (created 0600), the
 * data decrypted and moved to the device's start (datashift-checksum|journal). A failure before the
 * reencryption metadata is on H puts the device's header back and removes H, as cryptsetup does.
 */
async function decryptExportMain(
  io: CliIO,
  v: LuksArgs,
  device: string,
  headerFile: string,
  a: { hotzoneBytes: number | undefined; passSrc: Parameters<typeof getPassphrase>[2] },
): Promise<number> {
  let resilience: 'datashift-checksum' | 'datashift-journal' = 'datashift-checksum';
  if (v.resilience !== undefined) {
    if (v.resilience === 'journal' || v.resilience === 'datashift-journal') resilience = 'datashift-journal';
    else if (v.resilience === 'checksum' || v.resilience === 'datashift-checksum') resilience = 'datashift-checksum';
    else
      throw new CryptmapError(
        'EINVAL',
        'Requested --resilience option cannot be applied to current reencryption operation.',
        { exitCode: EXIT_FAILURE },
      );
  }
  await confirm(
    io,
    `Header file ${headerFile} does not exist. Do you want to initialize LUKS2 decryption of device ${device} and export LUKS2 header to file ${headerFile}?`,
    v['batch-mode'],
  );
  const dev = await openDevice(device, true);
  try {
    return await reencryptLock(io, device, async () => {
      const vol = await loadLuks(dev, device);
      if (vol.type !== 'luks2') throw new CryptmapError('EINVAL', 'Device is not a LUKS2 device.', { exitCode: 1 });
      const l2 = vol as Luks2Volume;
      const active = await activeInDaemon(v['runtime-dir'], io.env, l2.uuid, 'reencrypt');
      if (active)
        throw new CryptmapError(
          'EBUSY',
          `Device ${device} is active in the cryptmap daemon (${active.name}): decryption with the header exported runs offline only; close it first.`,
          { exitCode: 5 },
        );
      const pass = await getPassphrase(io, passphrasePrompt(device), a.passSrc);
      let lock: ReencryptLock | undefined;
      let hdrDev: BlockDevice | undefined;
      try {
        const slot = v['key-slot'] !== undefined ? { keySlot: intOpt(v['key-slot'], '--key-slot', 0, 31)! } : {};
        // Checked before H is created (cryptsetup: reencrypt_check_passphrase before the header backup).
        await l2.unlock(pass, slot).then((r) => r.volumeKey.dispose());
        lock = cryptsetupLock(io, v, l2);
        // H made, the export initialised, H removed again on a failure: the library's sequence.
        const exported = await initDecryptExportFile(dev, headerFile, pass, {
          ...slot,
          resilience,
          ...(v['resilience-hash'] ? { resilienceHash: v['resilience-hash'] } : {}),
          ...(a.hotzoneBytes !== undefined ? { movedBytes: a.hotzoneBytes } : {}),
        });
        hdrDev = exported.hdr;
        if (v['init-only']) return 0;
        return await run(io, v, device, exported.vol, pass, dev, undefined);
      } finally {
        lock?.release();
        pass.fill(0);
        await closeQuietly(hdrDev);
      }
    });
  } finally {
    await closeQuietly(dev);
  }
}

/** The reencryption on `vol`'s header moves the data (a reencryption or decryption with data shift, not --encrypt's). */
function shiftsData(vol: Luks2Volume): boolean {
  const l = reencryptLayout(vol.jsonSnapshot());
  return l.mode !== 'encrypt' && l.previous.offset !== l.final.offset;
}

interface EncryptArgs {
  /** cryptsetup's second argument: the name the device is activated as, for an online encryption. */
  name: string | undefined;
  resilience: Resilience;
  reduceBytes: number | undefined;
  hotzoneBytes: number | undefined;
  keyBits: number | undefined;
  sector: number | undefined;
  offsetSectors: number | undefined;
  passSrc: PassphraseSource;
}

/**
 * `reencrypt --encrypt`: a plaintext device becomes LUKS2 in place (cryptsetup 2.6 encrypt_luks2_init):
 * with --header the data stays put (forward, checksum|journal|none); without, --reduce-device-size
 * makes room for the header (datashift, backward). A device already in encryption resumes.
 */
async function encryptMain(io: CliIO, v: LuksArgs, device: string, a: EncryptArgs): Promise<number> {
  const headerFile = v.header;
  if (!headerFile && a.reduceBytes === undefined) {
    throw new CryptmapError(
      'ENOTSUP',
      'Encryption without detached header (--header) is not possible without data device size reduction (--reduce-device-size).',
      { exitCode: 1 },
    );
  }
  const md = bytesOpt(v['luks2-metadata-size'], '--luks2-metadata-size');
  let kss = bytesOpt(v['luks2-keyslots-size'], '--luks2-keyslots-size');
  if (headerFile && a.reduceBytes !== undefined) {
    // cryptsetup 2.6: the header file's keyslots area is the reduction less the metadata, and
    // luksFormat shrinks it (with a warning) to fit before a data offset given with --offset.
    const m = md ?? 0x4000;
    kss ??= a.reduceBytes - 2 * m;
    if (kss <= 0 || 2 * m + kss > a.reduceBytes)
      throw new CryptmapError('EINVAL', 'LUKS2 metadata size is larger than data shift value.', { exitCode: 1 });
    const off = (a.offsetSectors ?? 0) * 512;
    if (off > 0 && off < 2 * m + kss) {
      kss = Math.floor((off - 2 * m) / 4096) * 4096;
      if (kss > 0) io.stdout.write(`WARNING: LUKS2 keyslots area size changed to ${kss} bytes.\n`);
    }
  }
  const dataDev = await openDevice(device, true);
  let hdrDev: BlockDevice | undefined;
  let headerCreated = false;
  // Without --header cryptsetup formats a temporary header file LUKS2-temp-<UUID>.new first and names it
  // in its question and prompt; cryptmap writes no such file, but asks the same (with the UUID it uses).
  const uuid = v.uuid ?? (headerFile ? undefined : randomUUID());
  const named = headerFile ?? (uuid !== undefined ? `LUKS2-temp-${uuid}.new` : device);
  try {
    // A fresh header file grows to the metadata and keyslots size; opened once, before the lock
    // (keyed by its inode) so that the lock names the file that is written.
    if (headerFile) {
      // cryptsetup 2.6 (encrypt_luks2_init -> luksFormat): a --header file that does not exist is
      // made after a question of its own (no or the end of input: exit 2), then not "overwritten".
      const created = await createHeaderFile(io, headerFile, v['batch-mode']);
      headerCreated = created !== undefined;
      const layout = luks2Layout({
        detachedHeader: true,
        ...(md !== undefined ? { metadataBytes: md } : {}),
        ...(kss !== undefined && (a.reduceBytes === undefined || headerFile) ? { keyslotsBytes: kss } : {}),
      });
      hdrDev = created ?? (await openHeaderFile(headerFile, layout.hdrAndAreas));
      await created?.growTo(layout.hdrAndAreas);
    }
    return await reencryptLock(io, headerFile ?? device, async () => {
      const hdr = hdrDev ?? dataDev;
      const existing = await tryLoad(hdr);
      if (headerFile && !existing && (await tryLoad(dataDev)))
        throw new CryptmapError('EINVAL', `Device ${device} is already LUKS device. Aborting operation.`, {
          exitCode: 1,
        });
      if (existing && !(existing.type === 'luks2' && inReencryption((existing as Luks2Volume).jsonSnapshot()))) {
        throw new CryptmapError(
          'EINVAL',
          `Device ${headerFile ?? device} is already LUKS device. Aborting operation.`,
          { exitCode: 1 },
        );
      }
      if (v['resume-only'] && !existing)
        throw new CryptmapError('EINVAL', 'Device reencryption not in progress.', { exitCode: 1 });
      if (v['init-only'] && existing)
        throw new CryptmapError('EBUSY', 'LUKS2 reencryption already initialized. Aborting operation.', {
          exitCode: 1,
        });
      // Active in the daemon (opened in the middle of the encryption): it runs there (online).
      const active = existing
        ? await activeInDaemon(v['runtime-dir'], io.env, (existing as Luks2Volume).uuid, 'reencrypt')
        : undefined;
      if (active && v['force-offline-reencrypt'])
        throw new CryptmapError(
          'EBUSY',
          `Device ${device} is active in the cryptmap daemon (${active.name}): it cannot be encrypted offline.`,
          { exitCode: 5 },
        );
      if (!existing && !headerCreated)
        await confirm(io, `This will overwrite data on ${named} irrevocably.`, v['batch-mode']);
      let lock = existing && !active ? cryptsetupLock(io, v, existing as Luks2Volume) : undefined;
      const prompt = passphrasePrompt(existing ? device : named);
      const pass = await getPassphrase(io, prompt, a.passSrc, !existing).catch((e: unknown) => {
        lock?.release();
        throw e;
      });
      try {
        let vol = existing as Luks2Volume | null;
        if (!vol) {
          const ks = keyslotOptions(v, 'luks2');
          vol = await initEncrypt(dataDev, hdrDev, pass, {
            ...(v.cipher ? { cipher: v.cipher } : {}),
            ...(a.keyBits !== undefined ? { keyBytes: a.keyBits / 8 } : {}),
            ...(a.sector !== undefined ? { sectorBytes: a.sector as SectorBytes } : {}),
            ...(v.hash ? { hash: v.hash } : {}),
            ...(uuid ? { uuid } : {}),
            ...(v.label ? { label: v.label } : {}),
            ...(kss !== undefined ? { keyslotsBytes: kss } : {}),
            ...(md !== undefined ? { metadataBytes: md } : {}),
            ...(a.offsetSectors !== undefined ? { offsetBytes: a.offsetSectors * 512 } : {}),
            ...(a.reduceBytes !== undefined ? { reduceBytes: a.reduceBytes } : {}),
            resilience: a.resilience,
            ...(v['resilience-hash'] ? { resilienceHash: v['resilience-hash'] } : {}),
            keyslot: ks,
          });
        }
        let online = active?.name;
        if (!online && a.name !== undefined) {
          // cryptsetup's `reencrypt --encrypt DEVICE NAME`: the device is activated in the middle of
          // its encryption (each part mapped as the header says), then encrypted online.
          const st = await reencryptSegments(vol, hdrDev ? dataDev : undefined);
          if (st.hotzone)
            throw new CryptmapError(
              'EREENCRYPT',
              `Device ${device} has a hotzone left in progress: open it (that recovers it) or resume offline first.`,
              { exitCode: 1 },
            );
          const c = await connectDaemon(v['runtime-dir'], io.env);
          try {
            await mapInDaemon(c, vol, st, device, a.name, v, pass);
          } finally {
            c.close();
          }
          io.stdout.write(`${a.name} is now active and ready for online encryption.\n`);
          online = a.name;
        }
        if (v['init-only'] && !existing) return 0;
        if (online) {
          lock?.release();
          lock = undefined;
          return await runOnline(io, v, device, online, vol, pass, a.hotzoneBytes);
        }
        lock ??= cryptsetupLock(io, v, vol);
        return await run(io, v, device, vol, pass, hdrDev ? dataDev : undefined, a.hotzoneBytes);
      } finally {
        lock?.release();
        pass.fill(0);
      }
    });
  } finally {
    await closeQuietly(hdrDev);
    await closeQuietly(dataDev);
  }
}

/**
 * cryptsetup 2.6 runs a reencryption offline only where it can tell that nothing has the device open
 * (reencrypt_hint_force_offline_reencrypt, get_active_device_name): a regular file it cannot tell
 * about (a kernel mapping over a loop device of it would be corrupted). So for a data device that is a
 * regular file, not active in cryptmap's daemon (that one cryptmap can tell, and then runs online), with
 * neither --force-offline-reencrypt nor --active-name, and not --init-only (which rewrites no data):
 * in batch mode it is refused with cryptsetup's words (exit 1); otherwise true: the run asks
 * (askOfflineRun) after the passphrase, as cryptsetup.
 */
async function offlineCheck(v: LuksArgs, device: string, dataPath: string, active: boolean): Promise<boolean> {
  if (active || v['force-offline-reencrypt'] || v['active-name'] !== undefined || v['init-only']) return false;
  if (isRemoteDevice(dataPath) || !(await stat(dataPath).catch(() => null))?.isFile()) return false;
  if (v['batch-mode'])
    throw new CryptmapError(
      'EINVAL',
      `Device ${device} is not a block device. Can not auto-detect if it is active or not.\n` +
        'Use --force-offline-reencrypt to bypass the check and run in offline mode (dangerous!).',
      { exitCode: 1 },
    );
  return true;
}

/** cryptsetup's question before an offline run on a regular file (no: "Operation aborted.", exit 1). */
async function askOfflineRun(io: CliIO, device: string): Promise<void> {
  io.stdout.write(`Device ${device} is not a block device.\n`);
  await confirm(
    io,
    `Unable to decide if device ${device} is activated or not.\n` +
      'Are you sure you want to proceed with reencryption in offline mode?\n' +
      'It may lead to data corruption if the device is actually activated.\n' +
      'To run reencryption in online mode, use --active-name parameter instead.\n',
    false,
  );
}

/**
 * The passphrases a reencryption to a new volume key needs, by keyslot, as cryptsetup 2.6 asks for
 * them (fill_keyslot_passwords): with --key-slot N only N's; else one per active keyslot of the volume
 * key, "Enter passphrase for key slot N: ", each checked against its keyslot (asked again up to --tries
 * times on a terminal), so that every passphrase
 * still opens the volume afterwards (a keyslot without one would be gone at the end). A key file
 * serves only one keyslot: with several active and no --key-slot it is refused, as cryptsetup does.
 */
async function keyslotPassphrases(
  io: CliIO,
  vol: Luks2Volume,
  slotArg: number | undefined,
  passSrc: PassphraseSource,
  tries: number,
): Promise<Map<number, Buffer>> {
  const active = vol
    .keyslots()
    .filter((k) => k.active && !k.unbound)
    .map((k) => k.id);
  if (slotArg === undefined && passSrc?.keyFile !== undefined && active.length > 1)
    throw new CryptmapError(
      'EINVAL',
      'Key file can be used only with --key-slot or with exactly one key slot active.',
      {
        exitCode: 1,
      },
    );
  const passes = new Map<number, Buffer>();
  try {
    for (const slot of slotArg !== undefined ? [slotArg] : active) {
      for (let i = 0; ; i++) {
        const p = await getPassphrase(io, `Enter passphrase for key slot ${slot}: `, passSrc);
        try {
          (await vol.unlock(p, { keySlot: slot })).volumeKey.dispose();
          passes.set(slot, p);
          break;
        } catch (e) {
          p.fill(0);
          if (!isCryptmapError(e) || (e.code !== 'ENOKEY' && e.code !== 'EKEYSLOT')) throw e;
          if (i + 1 >= tries) noKey();
          io.stderr.write(`${NO_KEY}\n`);
        }
      }
    }
    return passes;
  } catch (e) {
    for (const p of passes.values()) p.fill(0);
    throw e;
  }
}

/**
 * The legacy files of `uuid` in the working directory `dir`, each that exists checked to be ours
 * (checkExistingFile): the directory may be sticky (/tmp, a tmpfs mount, as cryptsetup users run it),
 * where another user can plant a file under these names (a journal written to the device on resume,
 * a log, a header copy) but not replace one of ours.
 */
function legacyFiles(dir: string, uuid: string): ReturnType<typeof luks1ReencryptFiles> {
  const files = luks1ReencryptFiles(dir, uuid);
  for (const f of Object.values(files)) checkExistingFile(f);
  return files;
}

const NO_KEY = 'No key available with this passphrase.';

function noKey(): never {
  throw new CryptmapError('ENOKEY', NO_KEY, { exitCode: 2, errno: 'EPERM' });
}

/**
 * A LUKS1 device (cryptsetup 2.6's legacy reencryption, src/luks/reencrypt-luks1.ts): begun here or
 * resumed from the log and header files in the working directory (begun by cryptsetup or cryptmap;
 * the device's magic is then `LUKS\xde\xad`). Keyslots as cryptsetup: without --key-slot or a key
 * file, a passphrase for each active keyslot, all of them kept; with --key-slot N only N; a key file
 * only for the one active keyslot or with --key-slot.
 */
async function luks1Main(
  io: CliIO,
  v: LuksArgs,
  device: string,
  hdrPath: string,
  dataPath: string,
  passSrc: PassphraseSource,
): Promise<number> {
  const slotArg = v['key-slot'] !== undefined ? Number(v['key-slot']) : undefined;
  if (slotArg !== undefined && !(slotArg >= 0 && slotArg < 8))
    throw new CryptmapError('EINVAL', 'Key slot is invalid.', { exitCode: 1 });
  if (v['init-only'] || v['resume-only'])
    throw new CryptmapError('EINVAL', 'LUKS1 reencryption cannot be split into --init-only and --resume-only.', {
      exitCode: 1,
    });
  const forced = v['pbkdf-force-iterations'] !== undefined ? Number(v['pbkdf-force-iterations']) : undefined;
  if (forced !== undefined && forced < 1000)
    throw new CryptmapError('EARGS', 'Forced iteration count is too low for pbkdf2 (minimum is 1000).', {
      exitCode: 1,
    });
  const blockMiB = intOpt(v['block-size'], '--block-size', 1, 64) ?? 4;
  // The legacy files (log, header copies, cryptmap's journal with the bytes a block overwrites) live in
  // the working directory, as cryptsetup keeps them. A directory another user can write to could hold
  // a planted journal (written to the device on resume) or a symlink (followed by root): refused,
  // unless it is sticky (/tmp, a tmpfs mount), where each file is checked to be ours (legacyFiles).
  const dir = ensureTrustedDir(process.cwd(), { private: false, stickyDir: true });
  const dev = await openDevice(hdrPath, true);
  let dataDev: BlockDevice | undefined;
  try {
    if (dataPath !== hdrPath) dataDev = await openDevice(dataPath, true);
    return await reencryptLock(io, hdrPath, async () => {
      let uuid = await luks1StainedUuid(dev);
      let vol: Luks1Volume | undefined;
      if (uuid === undefined && v.decrypt && v.uuid !== undefined) {
        if (!/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(v.uuid))
          throw new CryptmapError('EINVAL', 'Provided UUID is invalid.', { exitCode: 1 });
        if ((await stat(legacyFiles(dir, v.uuid).log).catch(() => null)) === null)
          throw new CryptmapError(
            'EINVAL',
            'No decryption in progress, provided UUID can be used only to resume suspended decryption process.',
            { exitCode: 1 },
          );
        uuid = v.uuid;
      }
      if (uuid === undefined) {
        vol = await Luks1Volume.open(dev);
        uuid = vol.uuid;
        legacyFiles(dir, uuid);
        if (await luks1ReencryptStale(dev, dir, uuid)) await removeLuks1ReencryptFiles(dir, uuid);
      }
      const files = legacyFiles(dir, uuid);
      const inProgress = (await stat(files.log).catch(() => null)) !== null;
      if (!inProgress && !vol)
        throw new CryptmapError(
          'ENOTLUKS',
          `Device ${device} is in LUKS1 reencryption but its log ${files.log} is not in the working directory.`,
          { exitCode: 1 },
        );
      const keepKey = v['keep-key'] === true;
      const ac = new AbortController();
      const onInt = () => ac.abort();
      const progress = progressFromOptions(io, device, v);
      const passes = new Map<number, Buffer>();
      try {
        let runPass: Buffer;
        let runSlot: number | undefined;
        if (inProgress) {
          io.stdout.write(`Log file ${files.log.slice(dir.length + 1)} exists, resuming reencryption.\n`);
          const prompt =
            slotArg !== undefined ? `Enter passphrase for key slot ${slotArg}: ` : 'Enter any existing passphrase: ';
          runPass = await getPassphrase(io, prompt, passSrc);
          passes.set(-1, runPass);
          runSlot = slotArg;
        } else {
          const l1 = vol!;
          const active = [0, 1, 2, 3, 4, 5, 6, 7].filter((i) => luks1SlotActive(l1, i));
          const check = async (pass: Buffer, slot: number | undefined): Promise<number> => {
            try {
              return (await l1.unlock(pass, slot !== undefined ? { keySlot: slot } : {})).keyslot;
            } catch (e) {
              if (isCryptmapError(e) && (e.code === 'ENOKEY' || e.code === 'EKEYSLOT')) noKey();
              throw e;
            }
          };
          if (slotArg !== undefined && !active.includes(slotArg))
            throw new CryptmapError('EKEYSLOT', `Keyslot ${slotArg} is not active.`, { exitCode: 1 });
          if (passSrc.keyFile !== undefined) {
            const p = await getPassphrase(io, '', passSrc);
            passes.set(-1, p);
            const r = await check(p, slotArg);
            if (slotArg === undefined && active.length !== 1)
              throw new CryptmapError(
                'EINVAL',
                'Key file can be used only with --key-slot or with exactly one key slot active.',
                { exitCode: 1 },
              );
            passes.set(r, p);
          } else if (slotArg !== undefined || v.decrypt) {
            const prompt =
              slotArg !== undefined ? `Enter passphrase for key slot ${slotArg}: ` : 'Enter any existing passphrase: ';
            const p = await getPassphrase(io, prompt, passSrc);
            passes.set(-1, p);
            passes.set(await check(p, slotArg), p);
          } else {
            for (const i of active) {
              const p = await getPassphrase(io, `Enter passphrase for key slot ${i}: `, passSrc);
              passes.set(-1 - i - 1, p);
              passes.set(await check(p, i), p);
            }
          }
          const slots = [...passes.keys()].filter((k) => k >= 0).sort((a, b) => a - b);
          runSlot = slots[slots.length - 1]!;
          runPass = passes.get(runSlot)!;
          const ko = keyslotOptions(v, 'luks1');
          delete ko.keySlot;
          const keyBits = intOpt(v['key-size'], '--key-size', 8, 4096);
          const keyBytes = keepKey ? l1.header.keyBytes : keyBits !== undefined ? keyBits / 8 : l1.header.keyBytes;
          let vk: Buffer | undefined;
          if (v['volume-key-file'] !== undefined && !keepKey && !v.decrypt)
            vk = await readVolumeKeyFile(v['volume-key-file'], keyBytes);
          try {
            await initLuks1Reencrypt(dev, l1, dir, {
              mode: v.decrypt ? 'decrypt' : 'reencrypt',
              passphrases: new Map(slots.map((s) => [s, passes.get(s)!])),
              ...(v.cipher ? { cipher: v.cipher } : {}),
              keyBytes,
              ...(v.hash ? { hash: v.hash } : {}),
              keyslot: ko,
              keepKey,
              ...(vk ? { volumeKey: vk } : {}),
              ...(v['reduce-device-size'] !== undefined
                ? { reduceBytes: sizeOpt(v['reduce-device-size'], '--reduce-device-size') }
                : {}),
            });
          } finally {
            vk?.fill(0);
          }
        }
        process.on('SIGINT', onInt);
        try {
          const done = await runLuks1Reencrypt(dev, dir, uuid, runPass, {
            ...(dataDev ? { dataDev } : {}),
            ...(runSlot !== undefined ? { keySlot: runSlot } : {}),
            blockBytes: blockMiB << 20,
            keepKey,
            signal: ac.signal,
            onProgress: (d, t) => progress.update(t, d),
          }).catch((e: unknown) => {
            if (isCryptmapError(e) && (e.code === 'ENOKEY' || e.code === 'EKEYSLOT')) noKey();
            throw e;
          });
          if (!done) {
            progress.interrupted();
            io.stderr.write('\nReencryption interrupted.\n');
          }
        } finally {
          process.off('SIGINT', onInt);
        }
        return 0;
      } finally {
        for (const p of new Set(passes.values())) p.fill(0);
      }
    });
  } finally {
    await closeQuietly(dataDev);
    await closeQuietly(dev);
  }
}

/** cryptsetup 2.6's reencrypt reports a missing device with exit 1 (its other actions: 4). */
const main: VerbMain = async (argv, io) => {
  try {
    return await reencrypt(argv, io);
  } catch (e) {
    if (isCryptmapError(e) && e.code === 'ENODEV' && e.exitCode === EXIT_WRONG_DEVICE)
      throw new CryptmapError(e.code, e.message, { exitCode: EXIT_FAILURE, cause: e });
    throw e;
  }
};

export default main;
