/**
 * `cryptmap luksFormat <device> [<key file>]` with cryptsetup's options and behaviour
 * (cryptsetup-luksFormat(8)): YES confirmation on a terminal unless -q, passphrase with
 * verification, LUKS2 by default (--type luks1 for LUKS1), detached header with --header.
 */
import { deviceInUseError, isDeviceInUse } from '../../blockdev/exclusive.js';
import { isRemoteDevice } from '../../blockdev/open.js';
import { deviceSignatures, signatureWarnings, wipeNotes, wipeSignatures } from '../../blockdev/signatures.js';
import { stat, truncate } from 'node:fs/promises';
import { Luks1Volume, Luks2Volume, luks2Layout, withDeviceLock } from '../../luks/index.js';
import type { SectorBytes } from '../../engine/types.js';
import { CryptmapError, EXIT_FAILURE, EXIT_NOMEM, EXIT_WRONG_DEVICE, EXIT_WRONG_PARAMS } from '../../util/errors.js';
import { runTool } from '../../util/tools.js';
import type { CliIO, VerbMain } from '../types.js';
import {
  cipherOption,
  closeQuietly,
  createHeaderFile,
  intOpt,
  keyslotOptions,
  needDevice,
  openDevice,
  openHeaderFile,
  parseLuksArgs,
  sizeOpt,
} from './luks-common.js';
import { loadLuks } from './luks-unlock.js';
import { confirm, getPassphrase, readVolumeKeyFile } from './terminal-input.js';
import { passphrasePrompt } from '../device-name.js';

/** Both LUKS2 metadata copies and the keyslots area, as Luks2Volume.format lays them out (the area fills up to --offset, at most 128 MiB). */
function luks2HeaderBytes(md: number | undefined, kss: number | undefined, offsetSectors: number | undefined): number {
  return luks2Layout({
    detachedHeader: true,
    ...(md !== undefined ? { metadataBytes: md } : {}),
    ...(kss !== undefined ? { keyslotsBytes: kss } : {}),
    ...(offsetSectors !== undefined ? { offsetBytes: offsetSectors * 512 } : {}),
  }).hdrAndAreas;
}

/** LUKS1 header plus eight keyslots' key material, in bytes (the default layout, as Luks1Volume.format). */
function luks1HeaderBytes(keyBytes: number): number {
  const stride = Math.ceil((keyBytes * 4000) / 512 / 8) * 8;
  return (8 + 8 * stride) * 512;
}

/**
 * A header device that something holds (a mapping, a mount) is not formatted, as cryptsetup 2.6
 * refuses it: when blkid finds a signature on it, its signature wipe cannot open it exclusively
 * ("Cannot exclusively open X, device in use.", exit 1; src/utils_blockdev.c); otherwise crypt_format's
 * exclusive-access check fails ("Cannot use device X which is in use (already mapped or mounted).",
 * exit 5). Only block devices can be held; the data device of a detached header is not checked.
 */
async function refuseHeaderDeviceInUse(path: string): Promise<void> {
  if (isRemoteDevice(path) || !(await isDeviceInUse(path))) return;
  const signature = await runTool('blkid', ['-p', '-o', 'export', path], { timeoutMs: 30_000 }).then(
    (out) => out.trim() !== '',
    () => false, // exit 2: nothing found
  );
  if (signature)
    throw new CryptmapError('EBUSY', `Cannot exclusively open ${path}, device in use.`, {
      exitCode: EXIT_FAILURE,
      errno: 'EBUSY',
    });
  throw deviceInUseError(path);
}

/** cryptsetup's notice when the data offset is at or past the data device's end (the format still succeeds). */
async function warnNoDataRoom(io: CliIO, device: string, hdrPath: string): Promise<void> {
  if (isRemoteDevice(device) || isRemoteDevice(hdrPath)) return;
  const hdr = await openDevice(hdrPath, false);
  try {
    const vol = await loadLuks(hdr, hdrPath).catch(() => null);
    const data = hdrPath === device ? hdr : await openDevice(device, false).catch(() => null);
    try {
      if (vol && data && vol.dataSegment.offsetBytes >= data.sizeBytes)
        io.stdout.write(`Device ${device} is too small for activation, there is no remaining space for data.\n`);
    } finally {
      if (data !== hdr) await closeQuietly(data ?? undefined);
    }
  } finally {
    await closeQuietly(hdr);
  }
}

const main: VerbMain = async (argv: string[], io: CliIO) => {
  const { values: v, positionals } = parseLuksArgs(argv);
  const device = needDevice(positionals, 'cryptmap luksFormat [OPTION...] <device> [<key file>]');
  const type = v.type ?? 'luks2';
  if (type !== 'luks1' && type !== 'luks2' && type !== 'luks')
    throw new CryptmapError('EARGS', `Unknown LUKS type ${type}.`, { exitCode: EXIT_WRONG_PARAMS });
  const luks = type === 'luks1' ? 'luks1' : 'luks2';
  const cipher = cipherOption(v.cipher ?? 'aes-xts-plain64');
  const keyBits = intOpt(v['key-size'], '--key-size', 8, 4096) ?? (/-xts-|^xts|xts\(/.test(cipher) ? 512 : 256);
  if (keyBits % 8 !== 0)
    throw new CryptmapError('EARGS', 'Key size must be a multiple of 8 bits', { exitCode: EXIT_WRONG_PARAMS });
  const sectorOpt = intOpt(v['sector-size'], '--sector-size', 512, 4096);
  if (sectorOpt !== undefined && ![512, 1024, 2048, 4096].includes(sectorOpt))
    throw new CryptmapError('EARGS', `Unsupported encryption sector size.`, { exitCode: EXIT_WRONG_PARAMS });
  if (luks === 'luks1' && sectorOpt !== undefined && sectorOpt !== 512)
    throw new CryptmapError('EARGS', 'Unsupported encryption sector size.', { exitCode: EXIT_WRONG_PARAMS });
  const offsetSectors = intOpt(v.offset, '--offset');
  const alignSectors = intOpt(v['align-payload'], '--align-payload', 0, 0xffffffff);
  if (alignSectors !== undefined && offsetSectors !== undefined)
    throw new CryptmapError('EARGS', 'Options --align-payload and --offset cannot be combined.', {
      exitCode: EXIT_WRONG_PARAMS,
    });
  // cryptsetup 2.6 action_luksFormat: the data offset in 4096-byte units; LUKS2-only sizes refused for LUKS1.
  if (offsetSectors !== undefined && (offsetSectors * 512) % 4096 !== 0)
    throw new CryptmapError('EARGS', 'Data offset is not multiple of 4096 bytes.', { exitCode: EXIT_WRONG_PARAMS });
  if (luks === 'luks1' && (v['luks2-metadata-size'] !== undefined || v['luks2-keyslots-size'] !== undefined)) {
    throw new CryptmapError('EARGS', 'Unsupported LUKS2 metadata size options.', { exitCode: EXIT_WRONG_PARAMS });
  }
  if (luks === 'luks1' && (v.label || v.subsystem))
    throw new CryptmapError('EARGS', 'Label and subsystem are supported only for LUKS2.', {
      exitCode: EXIT_WRONG_PARAMS,
    });
  const headerFile = v.header;
  const ks = keyslotOptions(v, luks);
  const keyFile = v['key-file'] ?? positionals[1];

  const exists = (p: string) =>
    isRemoteDevice(p) ||
    stat(p).then(
      () => true,
      () => false,
    );
  // Without --header the device is the header: crypt_init fails on a missing one before anything else.
  if (headerFile === undefined && !(await exists(device)))
    throw new CryptmapError('ENODEV', `Device ${device} does not exist or access denied.`, {
      exitCode: EXIT_WRONG_DEVICE,
    });
  // cryptsetup 2.6 luksFormat: a --header file that does not exist is made (0600, 4 KiB) after a
  // question of its own (no: exit 2), and then the "overwrite" question is not asked.
  const created = headerFile !== undefined ? await createHeaderFile(io, headerFile, v['batch-mode']) : undefined;

  let volumeKey: Buffer | undefined;
  let pass: Buffer | undefined;
  let dev: Awaited<ReturnType<typeof openDevice>> | undefined;
  let formatted = false;
  // One cleanup path: whatever fails once a secret has been read wipes it.
  try {
    // cryptsetup lists what blkid finds on the header device first (nothing with -q, as it does), and
    // wipes those signatures (with -q too) before it writes the header.
    const sigPath = headerFile ?? device;
    const signatures =
      created === undefined && !isRemoteDevice(sigPath) && (await stat(sigPath).catch(() => null)) !== null
        ? await deviceSignatures(sigPath)
        : [];
    if (!v['batch-mode']) io.stdout.write(signatureWarnings(sigPath, signatures));
    if (created === undefined)
      await confirm(io, `This will overwrite data on ${headerFile ?? device} irrevocably.`, v['batch-mode']);
    if (v['volume-key-file'] !== undefined) {
      volumeKey = await readVolumeKeyFile(v['volume-key-file'], keyBits / 8);
      if (volumeKey.length !== keyBits / 8)
        throw new CryptmapError('EVK', 'Cannot read volume key file.', { exitCode: EXIT_WRONG_PARAMS });
    }
    pass = await getPassphrase(
      io,
      // cryptsetup's prompt names the device it initialised: the header with --header.
      passphrasePrompt(headerFile ?? device),
      {
        keyFile,
        keyfileOffset: intOpt(v['keyfile-offset'], '--keyfile-offset'),
        keyfileSize: intOpt(v['keyfile-size'], '--keyfile-size'),
      },
      true,
    );
    // A missing data device with --header: crypt_format's refusal, after the questions and the passphrase
    // (exit 3 is cryptsetup's code).
    if (!(await exists(device)))
      throw new CryptmapError('ENODEV', `Device ${device} does not exist or access denied.`, { exitCode: EXIT_NOMEM });
    // A detached header file is created (or grown) to hold the metadata and keyslots.
    const hdrPath = headerFile ?? device;
    await refuseHeaderDeviceInUse(hdrPath);
    if (signatures.length > 0) {
      const wiped = await wipeSignatures(hdrPath).catch((e: unknown) => {
        throw new CryptmapError('ETOOL', 'Failed to wipe device signature.', { exitCode: EXIT_FAILURE, cause: e });
      });
      if (v.verbose) io.stdout.write(wipeNotes(hdrPath, wiped));
    }
    const md = sizeOpt(v['luks2-metadata-size'], '--luks2-metadata-size');
    const kss = sizeOpt(v['luks2-keyslots-size'], '--luks2-keyslots-size');
    const hdrNeed = headerFile ? (luks === 'luks1' ? 4096 * 512 : luks2HeaderBytes(md, kss, offsetSectors)) : 0;
    let sectorBytes = (sectorOpt ?? 512) as SectorBytes;
    if (sectorOpt === undefined && luks === 'luks2') {
      // cryptsetup picks 4096-byte sectors for images in regular files (and so cryptmap for NBD exports).
      const isFileLike = isRemoteDevice(device) || (await stat(device)).isFile();
      if (isFileLike && (offsetSectors === undefined || (offsetSectors * 512) % 4096 === 0)) sectorBytes = 4096;
      // With --align-payload, as cryptsetup's autodetection: a detached header's data offset (in
      // sectors) or the device size less the alignment must be a multiple of 4096, else 512.
      if (alignSectors) {
        const devBytes = isRemoteDevice(device) ? 0 : (await stat(device)).size;
        if (headerFile !== undefined ? alignSectors % 4096 !== 0 : (devBytes - alignSectors * 512) % 4096 !== 0)
          sectorBytes = 512;
      }
    }
    // A regular file is grown to hold the header and keyslots, as cryptsetup does (device_fallocate).
    if (!headerFile && !isRemoteDevice(device)) {
      const st = await stat(device);
      const need = luks === 'luks1' ? luks1HeaderBytes(keyBits / 8) : luks2HeaderBytes(md, kss, offsetSectors);
      if (st.isFile() && st.size < need) await truncate(device, need);
    }
    if (created !== undefined) {
      await created.growTo(hdrNeed);
      dev = created;
    } else dev = headerFile ? await openHeaderFile(headerFile, hdrNeed) : await openDevice(hdrPath, true);
    // Narrowed for the closure below.
    const fmtDev = dev;
    const fmtPass = pass;
    await withDeviceLock(hdrPath, async () => {
      const common = {
        cipher,
        keyBytes: keyBits / 8,
        ...(volumeKey ? { volumeKey } : {}),
        hash: v.hash ?? 'sha256',
        ...(v.uuid ? { uuid: v.uuid } : {}),
        ...(offsetSectors !== undefined ? { offsetBytes: offsetSectors * 512 } : {}),
        detachedHeader: headerFile !== undefined,
        ...(alignSectors ? { alignBytes: alignSectors * 512 } : {}),
        keyslot: ks,
      };
      if (luks === 'luks1') {
        await Luks1Volume.format(fmtDev, fmtPass, common);
      } else {
        await Luks2Volume.format(fmtDev, fmtPass, {
          ...common,
          sectorBytes,
          ...(v.label !== undefined ? { label: v.label } : {}),
          ...(v.subsystem !== undefined ? { subsystem: v.subsystem } : {}),
          ...(md !== undefined ? { metadataBytes: md } : {}),
          ...(kss !== undefined ? { keyslotsBytes: kss } : {}),
        });
      }
    });
    formatted = true;
  } finally {
    // cryptmap leaves no header file of its own making behind a format that failed (cryptsetup leaves 4 KiB of zeros).
    if (!formatted && created !== undefined) await created.discardCreated().catch(() => {});
    pass?.fill(0);
    volumeKey?.fill(0);
    await closeQuietly(dev ?? created);
  }
  await warnNoDataRoom(io, device, headerFile ?? device);
  if (v.verbose) io.stdout.write(`Key slot ${ks.keySlot ?? 0} created.\nCommand successful.\n`);
  return 0;
};

export default main;
