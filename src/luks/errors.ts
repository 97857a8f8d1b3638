/**
 * The unlock errors LUKS1 and LUKS2 report alike, with cryptsetup's messages and exit codes
 * (lib/setup.c: -EPERM for a passphrase no keyslot accepts, -ENOENT for a named keyslot that is not active).
 */
import { CryptmapError, EXIT_NO_PERMISSION } from '../util/errors.js';

/** cryptsetup's answer to a passphrase no keyslot takes: `ENOKEY`, 'No key available with this passphrase.', exit 2. */
export function noKeyError(): CryptmapError {
  return new CryptmapError('ENOKEY', 'No key available with this passphrase.', {
    exitCode: EXIT_NO_PERMISSION,
    errno: 'EPERM',
  });
}

/** Unlock with a named --key-slot that is not active: cryptsetup's -ENOENT (exit 1) and its message. */
export function noUsableKeyslot(slot: number): CryptmapError {
  return new CryptmapError('EKEYSLOT', 'No usable keyslot is available.', {
    exitCode: 1,
    errno: 'ENOENT',
    context: { keyslot: slot },
  });
}
