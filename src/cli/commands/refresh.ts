/**
 * `cryptmap refresh NAME` (cryptsetup-refresh(8); cryptsetup 2.6 `open --refresh`): change the
 * activation flags of an active LUKS volume without closing it: `--allow-discards` and the
 * `--perf-*` flags, as given (absent = off), plus the LUKS2 header's persistent flags, as at open.
 * Like cryptsetup, the passphrase (or key file, or a token) must unlock a keyslot of the volume's
 * header; the header must be the one the mapping was made from (its UUID gives the dm uuid). The
 * daemon then checks the key is the one the volume runs with, reloads its table and swaps it in
 * (I/O drains and goes on under the new table). `--persistent` also stores the given flags in the
 * LUKS2 header, as `open --persistent` does.
 *
 * Plain volumes are not refreshed here (cryptsetup can): close and open them again.
 * Exit codes as cryptsetup: not active 4, not a LUKS volume 1, wrong passphrase 2.
 */
import { flagOfPersistent, flagsFromOptions } from '../../activate/flags.js';
import { persistentFlagsOf } from '../../activate/mapping.js';
import type { RefreshFlags } from '../../control/protocol.js';
import { CryptmapError, EXIT_WRONG_PARAMS } from '../../util/errors.js';
import { withDaemon } from '../daemon-client.js';
import type { VerbMain } from '../types.js';
import { sendActiveLuksKey } from './active-luks.js';
import { parseLuksArgs as parse } from './luks-common.js';
import { makeFlagsPersistent } from './open.js';

const refresh: VerbMain = async (argv, io) => {
  const { values: v, positionals } = parse(argv);
  if (positionals.length !== 1)
    throw new CryptmapError('EARGS', 'refresh: requires <name> as arguments', { exitCode: EXIT_WRONG_PARAMS });
  const name = positionals[0]!;
  if (v.type !== undefined && !['luks', 'luks1', 'luks2'].includes(v.type)) {
    throw new CryptmapError(
      'EARGS',
      `cryptmap refreshes LUKS volumes only (--type ${v.type}); close and open a plain volume again.`,
      { exitCode: EXIT_WRONG_PARAMS },
    );
  }
  const flags: RefreshFlags = flagsFromOptions(v);
  await withDaemon(v['runtime-dir'], io.env, async (c) => {
    const st = await sendActiveLuksKey(
      c,
      io,
      name,
      v,
      async (key) => {
        await c.call('volume.refresh', { name, flags }, { key });
      },
      (vol) => {
        // Persistent flags of the header apply on top of the command line's, as at open.
        // (With --persistent too: cryptsetup activates with them and then stores the command line's.)
        for (const f of persistentFlagsOf(vol)) flags[flagOfPersistent(f)!.field] = true;
      },
    );
    const m = st.mapping!;
    if (v.persistent) await makeFlagsPersistent(io, m.device, { ...v, header: v.header ?? m.header });
  });
  if (v.verbose) io.stdout.write('Command successful.\n');
  return 0;
};

export default refresh;
