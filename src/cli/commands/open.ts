/**
 * `cryptmap open [--type luks|luks1|luks2|plain] <device> <name>` (cryptsetup-open(8)).
 *
 * The passphrase is read and the KDF runs here, in the CLI process, as cryptsetup does; the daemon
 * gets the mapping and the volume key over its 0600 control socket and serves the mapping over NBD
 * (`cryptmap status NAME` shows the URI). `--attach` also makes it a kernel block device.
 * `--test-passphrase` only checks the passphrase (`openTestPassphrase`), without the daemon.
 * A LUKS2 header in the middle of a reencryption is opened by open-reencrypt.ts (each part with its key).
 *
 * Plain mode (cryptsetup 2.6 defaults): aes-cbc-essiv:sha256, 256-bit key, passphrase hashed with
 * ripemd160. With --key-file and no --hash, the key is read directly (key-size bytes at
 * --keyfile-offset), as cryptsetup does for plain key files.
 */
import { type ActivationFlagOption, flagsFromOptions, persistentNames } from '../../activate/flags.js';
import { type CryptMapping, prepareLoadedLuks, preparePlain } from '../../activate/mapping.js';
import { plainKeyFromPassphrase } from '../../activate/plain-key.js';
import type { ControlClient } from '../../control/client.js';
import type { VolumeStatus } from '../../control/protocol.js';
import { mappingToJson } from '../../control/args.js';
import type { SectorBytes } from '../../engine/types.js';
import { inReencryption, openLuks, withDeviceLock } from '../../luks/index.js';
import { wipe } from '../../util/bytes.js';
import { CryptmapError, EXIT_WRONG_PARAMS } from '../../util/errors.js';
import { Secret } from '../../util/secret.js';
import { withDaemon } from '../daemon-client.js';
import type { CliIO, VerbMain } from '../types.js';
import { ALIAS_TYPE } from '../verify.js';
import {
  cipherOption,
  closeQuietly,
  headerPath,
  intOpt,
  type LuksArgs,
  needDevice,
  openDevice,
  parseLuksArgs,
  requireDevice,
  sizeOpt,
} from './luks-common.js';
import { loadLuks, loadLuksForRead, testPassphrase, unlockForOpen } from './luks-unlock.js';
import { openInReencryption } from './open-reencrypt.js';
import { confirm, getPassphrase, readKeyFile } from './terminal-input.js';
import { passphrasePrompt } from '../device-name.js';
import { deviceSignatures, signatureWarnings } from '../../blockdev/signatures.js';
import { isRemoteDevice } from '../../blockdev/open.js';

type OpenArgs = LuksArgs;

/** The flags `--persistent` stores, and where the header is (open and refresh). */
export type PersistentArgs = Pick<OpenArgs, ActivationFlagOption | 'header'>;

/** Unlock test (`--test-passphrase`): tokens, then the passphrase; header recovery as cryptsetup. */
export function openTestPassphrase(io: CliIO, device: string, v: LuksArgs): Promise<number> {
  return testPassphrase(io, device, v);
}

/**
 * `--persistent` (cryptsetup 2.6 action_open_luks): after a successful activation the LUKS2 header's
 * persistent flags become exactly the flags given on this command line (none given: cleared). Where
 * that cannot be done (LUKS1, plain, a header that cannot be written) cryptsetup only says so and the
 * open still succeeds.
 */
export async function makeFlagsPersistent(io: CliIO, device: string, v: PersistentArgs): Promise<void> {
  const flags = persistentNames(flagsFromOptions(v));
  const hdr = v.header ?? device;
  try {
    const dev = await openDevice(hdr, true);
    try {
      await withDeviceLock(hdr, async () => {
        const vol = await loadLuks(dev, hdr);
        if (vol.type !== 'luks2') throw new CryptmapError('ENOTSUP', 'persistent flags need LUKS2');
        await vol.setPersistentFlags(flags);
      });
    } finally {
      await closeQuietly(dev);
    }
  } catch {
    io.stderr.write('Device activated but cannot make flags persistent.\n');
  }
}

/**
 * cryptsetup 2.6's signature check before a plain mapping (action_open_plain): blkid's notes on what is
 * on the device (not with -q) and, when it found anything, "Detected device signature(s) on DEV.
 * Proceeding further may damage existing data." (a terminal only; no: "Operation aborted.", exit 1).
 */
async function confirmNoSignatures(io: CliIO, device: string, batch: boolean | undefined): Promise<void> {
  if (isRemoteDevice(device)) return;
  const found = await deviceSignatures(device);
  if (found.length === 0 || batch) return;
  io.stdout.write(signatureWarnings(device, found));
  await confirm(io, `Detected device signature(s) on ${device}. Proceeding further may damage existing data.`, batch);
}

async function preparePlainFromArgs(
  io: CliIO,
  device: string,
  name: string,
  v: OpenArgs,
): Promise<{ mapping: CryptMapping; volumeKey: Secret }> {
  const cipher = cipherOption(v.cipher ?? 'aes-cbc-essiv:sha256');
  const keyBits = intOpt(v['key-size'], '--key-size', 8, 4096) ?? 256;
  if (keyBits % 8 !== 0)
    throw new CryptmapError('EARGS', 'Key size must be a multiple of 8 bits', { exitCode: EXIT_WRONG_PARAMS });
  const keyBytes = keyBits / 8;
  // Every option is checked before the key exists, so no failure below leaves it unwiped.
  const sector = intOpt(v['sector-size'], '--sector-size') ?? 512;
  if (![512, 1024, 2048, 4096].includes(sector))
    throw new CryptmapError('EARGS', `Unsupported encryption sector size ${sector}.`, { exitCode: EXIT_WRONG_PARAMS });
  const offset = intOpt(v.offset, '--offset');
  const skip = intOpt(v.skip, '--skip');
  // --device-size (bytes, a multiple of 512: options.ts) is --size in sectors (cryptsetup action_open_plain).
  const deviceBytes = sizeOpt(v['device-size'], '--device-size');
  const size = deviceBytes !== undefined ? deviceBytes / 512 : intOpt(v.size, '--size', 1);
  // cryptsetup 2.6 action_open_plain: a key file (not standard input) is the key itself, read raw
  // (--hash ignored, with a warning); "plain" is no hash. Standard input and the terminal are hashed.
  const keyFile = v['key-file'];
  const direct = keyFile !== undefined && keyFile !== '-';
  let hash = direct ? undefined : (v.hash ?? 'ripemd160');
  if (direct && !v['batch-mode'] && v.hash !== undefined)
    io.stdout.write('WARNING: The --hash parameter is being ignored in plain mode with keyfile specified.\n');
  if (hash === 'plain') hash = undefined;
  if (direct && !v['batch-mode'] && v['keyfile-size'] !== undefined)
    io.stdout.write(
      'WARNING: The --keyfile-size option is being ignored, the read size is the same as the encryption key size.\n',
    );
  // Then blkid's look at the device (not with --offset): its notes, and a question when it found any.
  if (!offset) await confirmNoSignatures(io, device, v['batch-mode']);
  let key: Secret;
  if (direct) {
    const raw = await readKeyFile(io, {
      keyFile,
      keyfileOffset: intOpt(v['keyfile-offset'], '--keyfile-offset'),
      keyfileSize: keyBytes,
    });
    key = new Secret(raw);
  } else {
    const pass = await getPassphrase(io, passphrasePrompt(device), {
      keyFile,
      keyfileOffset: intOpt(v['keyfile-offset'], '--keyfile-offset'),
      keyfileSize: keyFile !== undefined && hash === undefined ? keyBytes : intOpt(v['keyfile-size'], '--keyfile-size'),
    });
    try {
      key = plainKeyFromPassphrase(pass, hash ?? 'plain', keyBytes);
    } finally {
      wipe(pass);
    }
  }
  const opts: Parameters<typeof preparePlain>[0] = {
    name,
    device,
    key,
    cipher,
    sectorBytes: sector as SectorBytes,
    readOnly: v.readonly ?? false,
    allowDiscards: v['allow-discards'] ?? false,
    ivLargeSectors: v['iv-large-sectors'] ?? false,
  };
  if (offset !== undefined) opts.offsetSectors = offset;
  if (skip !== undefined) opts.skipSectors = skip;
  if (size !== undefined) opts.sizeSectors = size;
  try {
    return { mapping: { ...(await preparePlain(opts)), ...flagsFromOptions(v) }, volumeKey: key };
  } catch (e) {
    key.dispose();
    throw e;
  }
}

async function prepareLuksFromArgs(
  io: CliIO,
  device: string,
  name: string,
  v: OpenArgs,
): Promise<{ mapping: CryptMapping; volumeKey: Secret }> {
  // One load: load-time header recovery (a damaged copy is rewritten from the good one, as
  // cryptsetup does), then the mapping from that same loaded volume.
  const { dev, vol } = await loadLuksForRead(headerPath(v, device), v);
  let r: { mapping: CryptMapping; volumeKey: Secret };
  try {
    const o: Parameters<typeof prepareLoadedLuks>[2] = {
      name,
      device,
      unlock: () => unlockForOpen(io, vol, device, v),
      readOnly: v.readonly ?? false,
      allowDiscards: v['allow-discards'] ?? false,
    };
    if (v.header !== undefined) o.header = v.header;
    r = await prepareLoadedLuks(vol, dev, o);
  } finally {
    try {
      await vol.close();
    } finally {
      await closeQuietly(dev);
    }
  }
  if (v.type && v.type !== 'luks' && v.type.toUpperCase() !== r.mapping.type) {
    r.volumeKey.dispose();
    throw new CryptmapError('ENOTLUKS', `Device ${device} is not a valid ${v.type.toUpperCase()} device.`, {
      exitCode: 1,
    });
  }
  const mapping: CryptMapping = { ...r.mapping, ...flagsFromOptions(v) };
  if (v['disable-keyring'] && mapping.type === 'LUKS2') mapping.keyNotInKeyring = true;
  return { mapping, volumeKey: r.volumeKey };
}

/** True when `hdr` holds a LUKS2 header in reencryption (unreadable or other headers: false, the open reports them). */
async function inReencryptionAt(hdr: string): Promise<boolean> {
  const dev = await openDevice(hdr, false).catch(() => undefined);
  if (!dev) return false;
  try {
    const vol = await openLuks(dev);
    return vol.type === 'luks2' && inReencryption(vol.jsonSnapshot());
  } catch {
    return false;
  } finally {
    await closeQuietly(dev);
  }
}

/** Send an unlocked mapping to the daemon (the key as raw bytes after the request, control/protocol.ts; wiped here afterwards). */
export async function sendOpen(
  c: ControlClient,
  mapping: CryptMapping,
  volumeKey: Secret,
  opts: { shared?: boolean } = {},
): Promise<VolumeStatus> {
  try {
    const args = { mapping: mappingToJson(mapping), ...(opts.shared ? { shared: true } : {}) };
    return await c.call('volume.open', args, { key: volumeKey.expose() });
  } finally {
    volumeKey.dispose();
  }
}

const main: VerbMain = async (argv: string[], io: CliIO) => {
  const { values: v, positionals } = parseLuksArgs(argv);
  const alias = ALIAS_TYPE[argv[0]!];
  if (alias !== undefined) v.type = alias;
  if (argv[0] === 'create' && positionals.length >= 2)
    [positionals[0], positionals[1]] = [positionals[1]!, positionals[0]!];
  // cryptsetup 2.6 verify_open. LUKS opens take --size and --device-size and ignore them, as cryptsetup.
  if (v['device-size'] !== undefined && v.size !== undefined)
    throw new CryptmapError('EARGS', 'Options --device-size and --size cannot be combined.', {
      exitCode: EXIT_WRONG_PARAMS,
    });
  // --shared only for plain (open without --type is LUKS).
  if (v.shared && v.type !== 'plain')
    throw new CryptmapError('EARGS', 'Option --shared is allowed only for open of plain device.', {
      exitCode: EXIT_WRONG_PARAMS,
    });
  if (v.unbound && v.type !== undefined && !v.type.startsWith('luks'))
    throw new CryptmapError('EARGS', 'Option --unbound is allowed only for open of luks device.', {
      exitCode: EXIT_WRONG_PARAMS,
    });
  if (v.unbound && !v['test-passphrase'])
    throw new CryptmapError('EARGS', 'Option --unbound cannot be used without --test-passphrase.', {
      exitCode: EXIT_WRONG_PARAMS,
    });
  const device = needDevice(positionals, 'cryptmap open [OPTION...] <device> <name>');
  if (v.persistent && v['test-passphrase']) {
    throw new CryptmapError('EARGS', 'Option --persistent is not allowed with --test-passphrase.', {
      exitCode: EXIT_WRONG_PARAMS,
    });
  }
  // cryptsetup looks at the header, then the data device, before anything else (crypt_init_data_device):
  // a missing one is exit 4 for every type, with --test-passphrase too and before a passphrase is read.
  if (v.header !== undefined) await requireDevice(v.header);
  await requireDevice(device);
  if (v['test-passphrase']) return openTestPassphrase(io, device, v);
  if (positionals.length !== 2)
    throw new CryptmapError('EARGS', 'Command requires device and mapped name as arguments.', {
      exitCode: EXIT_WRONG_PARAMS,
    });
  const name = positionals[1]!;
  const type = v.type ?? 'luks';
  if (!['luks', 'luks1', 'luks2', 'plain'].includes(type)) {
    throw new CryptmapError('EARGS', `Unsupported device type ${type} (cryptmap opens luks, luks1, luks2 and plain).`, {
      exitCode: EXIT_WRONG_PARAMS,
    });
  }
  // Reach the daemon first: no point running a KDF when nothing can take the mapping.
  return withDaemon(v['runtime-dir'], io.env, async (client) => {
    // A LUKS2 header in the middle of a reencryption: each part mapped with its key (open-reencrypt.ts).
    let st =
      (type === 'luks' || type === 'luks2') && (await inReencryptionAt(headerPath(v, device)))
        ? await openInReencryption(io, client, device, name, v)
        : null;
    let keyslot: number | undefined;
    if (!st) {
      const { mapping, volumeKey } =
        type === 'plain'
          ? await preparePlainFromArgs(io, device, name, v)
          : await prepareLuksFromArgs(io, device, name, v);
      st = await sendOpen(client, mapping, volumeKey, { shared: v.shared === true });
      keyslot = mapping.keyslot;
    }
    if (v.persistent) await makeFlagsPersistent(io, device, v);
    if (v.verbose && keyslot !== undefined && keyslot >= 0) io.stdout.write(`Key slot ${keyslot} unlocked.\n`);
    if (v.attach) {
      const info = await client.call('attach', { name, readOnly: v.readonly === true });
      io.stdout.write(`${info.devicePath}\n`);
    } else if (v.verbose) io.stdout.write(`${st.nbdUri}\n`);
    if (v.verbose) io.stdout.write('Command successful.\n');
    return 0;
  });
};

export default main;
