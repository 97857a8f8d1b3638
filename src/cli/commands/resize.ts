/**
 * `cryptmap resize NAME [--size SECTORS | --device-size BYTES]` (cryptsetup-resize(8); cryptsetup 2.6
 * action_resize and lib/setup.c crypt_resize): the daemon measures the volume's device again (a file
 * that was extended, a block device that grew) and reloads the mapping with the new size; without a
 * size, all of the device after the data offset, rounded down to the crypto sector. It changes only how
 * much of the device the mapping shows, never the device or the LUKS header.
 *
 * LUKS2 volumes need the passphrase (or key file, or a token), as cryptsetup asks for it when the
 * volume key lives in the keyring: the CLI unlocks a keyslot of the volume's header and the daemon
 * checks the key is the running one. LUKS1 and plain volumes resize without it.
 * New NBD connections see the new size; connected clients keep the size they negotiated.
 * Exit codes as cryptsetup: not active 4; misaligned, too large, wrong passphrase 1/2.
 */
import { keyLocation } from '../../activate/mapping.js';
import type { OpArgs } from '../../control/protocol.js';
import { CryptmapError, EXIT_WRONG_PARAMS } from '../../util/errors.js';
import { withDaemon } from '../daemon-client.js';
import type { VerbMain } from '../types.js';
import { activeVolume, headerMissing, notLuks, sendActiveVolumeKey } from './active-luks.js';
import { intOpt, parseLuksArgs as parse, sizeOpt } from './luks-common.js';

const resize: VerbMain = async (argv, io) => {
  const { values: v, positionals } = parse(argv);
  if (positionals.length !== 1)
    throw new CryptmapError('EARGS', 'resize: requires <name> as arguments', { exitCode: EXIT_WRONG_PARAMS });
  const name = positionals[0]!;
  if (v.size !== undefined && v['device-size'] !== undefined) {
    throw new CryptmapError('EARGS', 'Options --device-size and --size cannot be combined.', {
      exitCode: EXIT_WRONG_PARAMS,
    });
  }
  let sizeSectors = intOpt(v.size, '--size', 1);
  if (v['device-size'] !== undefined) {
    const bytes = sizeOpt(v['device-size'], '--device-size')!;
    if (bytes % 512 !== 0)
      throw new CryptmapError('EARGS', 'Device size must be multiple of 512 bytes sector.', {
        exitCode: EXIT_WRONG_PARAMS,
      });
    sizeSectors = bytes / 512;
  }
  await withDaemon(v['runtime-dir'], io.env, async (c) => {
    const active = await activeVolume(c, name);
    // cryptsetup: a detached header not given again leaves the device typeless, and crypt_resize refuses it.
    if (headerMissing(active.st.mapping, v.header)) throw notLuks(name);
    const req: OpArgs<'volume.resize'> = { name, ...(sizeSectors === undefined ? {} : { sizeSectors }) };
    // cryptsetup action_resize asks for the passphrase only when the volume key is in the kernel keyring.
    const m = active.st.mapping;
    if (m === undefined || keyLocation(m) !== 'keyring') await c.call('volume.resize', req);
    else
      await sendActiveVolumeKey(io, name, active, v, async (key) => {
        await c.call('volume.resize', req, { key });
      });
  });
  if (v.verbose) io.stdout.write('Command successful.\n');
  return 0;
};

export default resize;
