/**
 * `cryptmap open <device> [<name>]` (cryptsetup-open(8)). Only `--test-passphrase` is handled here
 * (`openTestPassphrase`): it checks that a passphrase unlocks a keyslot, without activating anything.
 * Activation proper goes through the daemon (wired by the activation layer); until then `open`
 * without --test-passphrase reports that the daemon is not running.
 */
import { openLuks } from '../../luks/index.js';
import { CryptmapError, EXIT_WRONG_PARAMS } from '../../util/errors.js';
import type { CliIO, VerbMain } from '../types.js';
import { closeQuietly, getPassphrase, headerPath, intOpt, type LuksArgs, needDevice, openDevice, parseLuksArgs } from './luks-common.js';

/** Unlock test: exit 0 when the passphrase opens a keyslot, 2 ("No key available with this passphrase.") otherwise. */
export async function openTestPassphrase(io: CliIO, device: string, v: LuksArgs): Promise<number> {
  if (v.type && !['luks', 'luks1', 'luks2'].includes(v.type)) throw new CryptmapError('EARGS', `Device type ${v.type} is not supported with --test-passphrase.`, { exitCode: EXIT_WRONG_PARAMS });
  const hdr = headerPath(v, device);
  const dev = await openDevice(hdr, false);
  try {
    const vol = await openLuks(dev).catch((e) => {
      if (e instanceof CryptmapError && e.code === 'ENOTLUKS') throw new CryptmapError('ENOTLUKS', `Device ${hdr} is not a valid LUKS device.`, { exitCode: 1 });
      throw e;
    });
    if (v.type && v.type !== 'luks' && v.type !== vol.type) throw new CryptmapError('ENOTLUKS', `Device ${hdr} is not a valid ${v.type.toUpperCase()} device.`, { exitCode: 1 });
    const tries = v['key-file'] !== undefined || !io.stdin.isTTY ? 1 : (intOpt(v.tries, '--tries', 1) ?? 3);
    for (let i = 0; ; i++) {
      const pass = await getPassphrase(io, `Enter passphrase for ${device}: `, {
        keyFile: v['key-file'],
        keyfileOffset: intOpt(v['keyfile-offset'], '--keyfile-offset'),
        keyfileSize: intOpt(v['keyfile-size'], '--keyfile-size'),
      });
      try {
        const r = await vol.unlock(pass, { keySlot: intOpt(v['key-slot'], '--key-slot') });
        r.volumeKey.dispose();
        if (v.verbose) io.stdout.write(`Key slot ${r.keyslot} unlocked.\nCommand successful.\n`);
        return 0;
      } catch (e) {
        if (!(e instanceof CryptmapError && e.code === 'ENOKEY') || i + 1 >= tries) throw e;
        io.stderr.write(`${e.message}\n`);
      } finally {
        pass.fill(0);
      }
    }
  } finally {
    await closeQuietly(dev);
  }
}

const main: VerbMain = async (argv: string[], io: CliIO) => {
  const { values: v, positionals } = parseLuksArgs(argv);
  const device = needDevice(positionals, 'cryptmap open [OPTION...] <device> <name>');
  if (v['test-passphrase']) return openTestPassphrase(io, device, v);
  io.stderr.write("cryptmap: the daemon is not running (start it with 'cryptmap daemon')\n");
  return 1;
};

export default main;
