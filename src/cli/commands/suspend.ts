/**
 * `cryptmap luksSuspend NAME` and `cryptmap luksResume NAME` (cryptsetup-luksSuspend(8),
 * cryptsetup-luksResume(8); behaviour of cryptsetup 2.6 src/cryptsetup.c action_luksSuspend /
 * action_luksResume and lib/setup.c crypt_suspend / crypt_resume_by_passphrase).
 *
 * luksSuspend: the daemon suspends the active LUKS volume (new I/O waits, in-flight I/O drains,
 * flush), wipes the crypt target's key and drops the volume key from its keyring. NBD clients wait.
 *
 * luksResume: as `open`, the passphrase is read and the KDF runs here. The header of the active
 * mapping (--header, else its device: a detached header must be named again, as cryptsetup needs it) is loaded; its UUID and type must match
 * the mapping's dm uuid (CRYPT-LUKS2-<uuid>-<name>), else cryptsetup's "not active LUKS device name
 * or header is missing". Then tokens, then the passphrase (prompt with --tries, or --key-file), and
 * the volume key goes to the daemon once, as raw bytes over the 0600 control socket (docs/secrets.md),
 * which puts it back in its keyring, sends `key set :<bytes>:logon:cryptmap:<name>` and resumes.
 * A wrong passphrase leaves the device suspended (exit 2, retryable).
 *
 * Messages and exit codes (cryptsetup 2.6.1): not active "Device NAME is not active." 4; not a
 * LUKS volume 1; already suspended / not suspended 1; wrong passphrase 2.
 */
import { CryptmapError, EXIT_FAILURE, EXIT_WRONG_PARAMS } from '../../util/errors.js';
import { withDaemon } from '../daemon-client.js';
import type { CliIO, VerbMain } from '../types.js';
import { sendActiveLuksKey } from './active-luks.js';
import { parseLuksArgs } from './luks-common.js';

/** cryptsetup's help_args: "<action>: requires <device> as arguments", exit 1. */
function needName(verb: string, positionals: string[]): string {
  if (positionals.length !== 1)
    throw new CryptmapError('EARGS', `${verb}: requires <device> as arguments`, { exitCode: EXIT_WRONG_PARAMS });
  return positionals[0]!;
}

export const luksSuspend: VerbMain = async (argv, io) => {
  const { values: v, positionals } = parseLuksArgs(argv);
  const name = needName('luksSuspend', positionals);
  // --header is accepted as cryptsetup does; the daemon knows the volume's type without it.
  await withDaemon(v['runtime-dir'], io.env, async (c) => {
    await c.call('volume.suspend', { name });
  });
  if (v.verbose) io.stdout.write('Command successful.\n');
  return 0;
};

export const luksResume: VerbMain = async (argv, io) => {
  const { values: v, positionals } = parseLuksArgs(argv);
  const name = needName('luksResume', positionals);
  const reqType = v.type;
  if (reqType !== undefined && !['luks', 'luks1', 'luks2'].includes(reqType)) {
    // cryptsetup returns -EINVAL here without a message; say why.
    throw new CryptmapError('EARGS', `luksResume works on LUKS devices only (--type ${reqType}).`, {
      exitCode: EXIT_WRONG_PARAMS,
    });
  }
  return withDaemon(v['runtime-dir'], io.env, async (c) => {
    await sendActiveLuksKey(
      c,
      io,
      name,
      v,
      async (key) => {
        await c.call('volume.resume', { name, ...(v['disable-keyring'] ? { disableKeyring: true } : {}) }, { key });
      },
      (_vol, st) => {
        if (!st.suspended)
          throw new CryptmapError('ENOTSUSPENDED', `Volume ${name} is not suspended.`, { exitCode: EXIT_FAILURE });
      },
    );
    if (v.verbose) io.stdout.write('Command successful.\n');
    return 0;
  });
};

const main: VerbMain = (argv: string[], io: CliIO) =>
  argv[0] === 'luksResume' ? luksResume(argv, io) : luksSuspend(argv, io);
export default main;
