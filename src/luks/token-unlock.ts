/**
 * Unlocking a LUKS2 volume through its tokens (LUKS2 On-Disk Format Specification §3.5 tokens;
 * cryptsetup lib/luks2/luks2_token.c `LUKS2_token_open_and_activate`, `LUKS2_keyslot_open_by_token`;
 * cryptsetup-open(8) --token-id, --token-only, --token-type).
 *
 * A token's handler (TOKEN_HANDLERS in luks2-handlers.ts, keyed by the token's JSON `type`) turns the
 * token into a passphrase, which is then tried on the keyslots the token lists (priority prefer, then
 * normal; a slot with priority ignore only when named with keySlot). Tokens without an `open` handler
 * (external plugin types such as systemd-tpm2 or systemd-fido2) are kept intact but are not usable
 * here. `luks2-keyring` reads its passphrase from the kernel keyring (the "user" key named by
 * key_description, found as request_key(2) finds it) through the native addon.
 *
 * Outcomes, as cryptsetup's exit codes: no usable token at all -> ENOTOKEN, exit 1 ("No usable token
 * is available." / "No usable token (type T) is available."); a usable token whose passphrase opens
 * none of its keyslots -> ETOKENPASS, exit 2; a handler's own error (e.g. the keyring one, exit 2).
 */
import { CryptmapError, EXIT_NO_PERMISSION, EXIT_WRONG_PARAMS, isCryptmapError } from '../util/errors.js';
import { handlerFor, TOKEN_HANDLERS } from './luks2-handlers.js';
import type { LuksVolume, UnlockResult } from './types.js';

/** Which tokens `unlockByToken` tries and what their handlers may use. */
export interface TokenUnlockOptions {
  /** Only this token (cryptsetup --token-id). */
  tokenId?: number;
  /** Only tokens of this type (cryptsetup --token-type). */
  tokenType?: string;
  /** Only this keyslot (cryptsetup --key-slot). */
  keySlot?: number;
}

/** An unlock by token: the volume key, its keyslot and the token that gave the passphrase. */
export interface TokenUnlockResult extends UnlockResult {
  tokenId: number;
}

/** What token unlocking needs from a volume (Luks2Volume provides it; LUKS1 has no tokens). */
interface TokenVolume {
  readonly type: LuksVolume['type'];
  readonly json?: {
    tokens: Record<string, { type: string; keyslots: string[] }>;
    keyslots: Record<string, { priority?: number }>;
  };
  unlock(passphrase: Uint8Array, opts?: { keySlot?: number }): Promise<UnlockResult>;
}

function noUsableToken(type: string | undefined): CryptmapError {
  return new CryptmapError(
    'ENOTOKEN',
    type !== undefined ? `No usable token (type ${type}) is available.` : 'No usable token is available.',
    {
      exitCode: EXIT_WRONG_PARAMS,
      errno: 'ENOENT',
    },
  );
}

/** The token's keyslots in the order they are tried. */
function tokenSlots(vol: TokenVolume, slots: string[], keySlot: number | undefined): string[] {
  const ks = vol.json!.keyslots;
  const present = slots.filter((k) => ks[k] !== undefined).sort((a, b) => Number(a) - Number(b));
  if (keySlot !== undefined) return present.filter((k) => k === String(keySlot));
  const prio = (k: string) => ks[k]!.priority ?? 1;
  return [...present.filter((k) => prio(k) === 2), ...present.filter((k) => prio(k) === 1)];
}

/** List the token ids a request would try, in order (for messages and tests). */
export function tokenCandidates(vol: TokenVolume, opts: TokenUnlockOptions = {}): number[] {
  if (vol.type !== 'luks2' || !vol.json) return [];
  const tokens = vol.json.tokens;
  const ids = Object.keys(tokens)
    .map(Number)
    .sort((a, b) => a - b);
  return ids.filter(
    (id) =>
      (opts.tokenId === undefined || id === opts.tokenId) &&
      (opts.tokenType === undefined || tokens[String(id)]!.type === opts.tokenType),
  );
}

/** Unlock with tokens (see the file comment for the outcomes). The caller disposes the volume key. */
export async function unlockByToken(vol: TokenVolume, opts: TokenUnlockOptions = {}): Promise<TokenUnlockResult> {
  if (vol.type !== 'luks2' || !vol.json) {
    throw new CryptmapError('ETOKENLUKS1', 'Tokens are supported only for LUKS2 devices.', {
      exitCode: EXIT_WRONG_PARAMS,
      errno: 'EINVAL',
    });
  }
  const tokens = vol.json.tokens;
  let lastError: CryptmapError | undefined;
  let usable = false;
  for (const id of tokenCandidates(vol, opts)) {
    const tok = tokens[String(id)]!;
    const handler = handlerFor(TOKEN_HANDLERS, tok.type);
    if (!handler?.open) continue;
    const slots = tokenSlots(vol, tok.keyslots, opts.keySlot);
    if (slots.length === 0) continue;
    usable = true;
    let pass: Buffer;
    try {
      pass = await handler.open(tok as unknown as Record<string, unknown>, id);
    } catch (e) {
      if (!isCryptmapError(e)) throw e;
      lastError = e;
      continue;
    }
    try {
      for (const k of slots) {
        try {
          const r = await vol.unlock(pass, { keySlot: Number(k) });
          return { ...r, tokenId: id };
        } catch (e) {
          if (!isCryptmapError(e) || e.code === 'ENOMEM' || e.code === 'EIO') throw e;
        }
      }
    } finally {
      pass.fill(0);
    }
    lastError = new CryptmapError(
      'ETOKENPASS',
      `Token ${id} cannot unlock assigned keyslot(s) (wrong keyslot passphrase).`,
      {
        exitCode: EXIT_NO_PERMISSION,
        errno: 'EPERM',
      },
    );
  }
  if (!usable) throw noUsableToken(opts.tokenType);
  throw lastError!;
}
