/**
 * `cryptmap luksFormat <device> [<key file>]` with cryptsetup's options and behaviour
 * (cryptsetup-luksFormat(8)): YES confirmation on a terminal unless -q, passphrase with
 * verification, LUKS2 by default (--type luks1 for LUKS1), detached header with --header.
 */
import { deviceInUseError, isDeviceInUse } from '../../blockdev/exclusive.js';
import { isRemoteDevice } from '../../blockdev/open.js';
import { deviceSignatures, signatureWarnings } from '../../blockdev/signatures.js';
import { stat, truncate } from 'node:fs/promises';
import { dirname } from 'node:path';
import { Luks1Volume, Luks2Volume, luks2Layout, withDeviceLock } from '../../luks/index.js';
import type { SectorBytes } from '../../engine/types.js';
import { CryptmapError, EXIT_FAILURE, EXIT_NOMEM, EXIT_WRONG_DEVICE, EXIT_WRONG_PARAMS } from '../../util/errors.js';
import { runTool } from '../../util/tools.js';
import type { CliIO, VerbMain } from '../types.js';
import {
  cipherOption,
  closeQuietly,
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
  const headerFile = v.header;
  const ks = keyslotOptions(v, luks);
  const keyFile = v['key-file'] ?? positionals[1];

  const exists = (p: string) =>
    isRemoteDevice(p) ||
    stat(p).then(
      () => true,
      () => false,
    );
  if (!(await exists(device))) {
    const missing = (exitCode: number) =>
      new CryptmapError('ENODEV', `Device ${device} does not exist or access denied.`, { exitCode });
    if (headerFile === undefined) throw missing(EXIT_WRONG_DEVICE);
    // cryptsetup 2.6 with --header makes the header file before it looks at the data device: a header
    // that cannot be made is reported first (exit 1); then crypt_format's missing data device is exit 3
    // (cryptsetup's code; cryptmap leaves no header file behind, where cryptsetup leaves 4 KiB of zeros).
    if (!(await exists(headerFile)) && !(await exists(dirname(headerFile))))
      throw new CryptmapError('ENODEV', `Cannot create header file ${headerFile}.`, { exitCode: EXIT_FAILURE });
    throw missing(EXIT_NOMEM);
  }
  // cryptsetup lists what blkid finds on the header device first (nothing with -q, as it does).
  const sigPath = headerFile ?? device;
  if (!v['batch-mode'] && !isRemoteDevice(sigPath) && (await stat(sigPath).catch(() => null)) !== null)
    io.stdout.write(signatureWarnings(sigPath, await deviceSignatures(sigPath)));
  await confirm(io, `This will overwrite data on ${headerFile ?? device} irrevocably.`, v['batch-mode']);

  let volumeKey: Buffer | undefined;
  let pass: Buffer | undefined;
  let dev: Awaited<ReturnType<typeof openDevice>> | undefined;
  // One cleanup path: whatever fails once a secret has been read wipes it.
  try {
    if (v['volume-key-file'] !== undefined) {
      volumeKey = await readVolumeKeyFile(v['volume-key-file'], keyBits / 8);
      if (volumeKey.length !== keyBits / 8)
        throw new CryptmapError('EVK', 'Cannot read volume key file.', { exitCode: EXIT_WRONG_PARAMS });
    }
    pass = await getPassphrase(
      io,
      passphrasePrompt(device),
      {
        keyFile,
        keyfileOffset: intOpt(v['keyfile-offset'], '--keyfile-offset'),
        keyfileSize: intOpt(v['keyfile-size'], '--keyfile-size'),
      },
      true,
    );
    // A detached header file is created (or grown) to hold the metadata and keyslots.
    const hdrPath = headerFile ?? device;
    await refuseHeaderDeviceInUse(hdrPath);
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
    dev = headerFile ? await openHeaderFile(headerFile, hdrNeed) : await openDevice(hdrPath, true);
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
        if (v.label || v.subsystem)
          throw new CryptmapError('EARGS', 'Label and subsystem are supported only for LUKS2.', {
            exitCode: EXIT_WRONG_PARAMS,
          });
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
  } finally {
    pass?.fill(0);
    volumeKey?.fill(0);
    await closeQuietly(dev);
  }
  await warnNoDataRoom(io, device, headerFile ?? device);
  if (v.verbose) io.stdout.write(`Key slot ${ks.keySlot ?? 0} created.\nCommand successful.\n`);
  return 0;
};

export default main;
