/**
 * LUKS2 tokens: import, export, removal, luks2-keyring tokens and keyslot assignment (LUKS2 On-Disk
 * Format Specification §3.5; cryptsetup lib/luks2/luks2_token.c, `cryptsetup token`). Each change is
 * one header write (luks2-header.ts); the header is reloaded when the write fails.
 */
import { CryptmapError } from '../util/errors.js';
import { LUKS2_KEYSLOTS_MAX, LUKS2_TOKENS_MAX } from './constants.js';
import { handlerFor, TOKEN_HANDLERS } from './luks2-handlers.js';
import { type Luks2Header, sortKeys } from './luks2-header.js';
import type { L2Token } from './luks2-json.js';

/** Add a token (JSON text or object); returns its id. Built-in types are validated. */
export async function importToken(h: Luks2Header, token: string | L2Token, tokenId?: number): Promise<number> {
  h.requireChangeable();
  let t: unknown;
  try {
    t = typeof token === 'string' ? JSON.parse(token) : structuredClone(token);
  } catch {
    throw new CryptmapError('ETOKEN', 'Failed to parse token JSON.');
  }
  if (typeof t !== 'object' || t === null || Array.isArray(t))
    throw new CryptmapError('ETOKEN', 'Token JSON is not an object.');
  const tok = t as L2Token;
  if (typeof tok.type !== 'string' || !tok.type) throw new CryptmapError('ETOKEN', 'Token is missing its type.');
  if (tok.type.startsWith('luks2-') && !handlerFor(TOKEN_HANDLERS, tok.type))
    throw new CryptmapError('ETOKEN', `Token type ${tok.type} is reserved.`);
  if (!Array.isArray(tok.keyslots)) throw new CryptmapError('ETOKEN', 'Token is missing its keyslots array.');
  for (const k of tok.keyslots)
    if (typeof k !== 'string' || !h.json.keyslots[k])
      throw new CryptmapError('ETOKEN', `Token references missing keyslot ${String(k)}.`);
  let id = tokenId;
  if (id === undefined) {
    id = 0;
    while (h.json.tokens[String(id)]) id++;
  }
  if (!Number.isInteger(id) || id < 0 || id >= LUKS2_TOKENS_MAX)
    throw new CryptmapError('ETOKEN', `Token ${id} is invalid.`);
  if (h.json.tokens[String(id)]) throw new CryptmapError('ETOKEN', `Token ${id} is already in use.`);
  handlerFor(TOKEN_HANDLERS, tok.type)?.validate(tok, `tokens.${id}`);
  const newId = id;
  await h.update(() => {
    h.json.tokens[String(newId)] = tok;
    sortKeys(h.json);
  });
  return id;
}

/** The token's JSON text (compact, as cryptsetup token export prints it). */
export function exportToken(h: Luks2Header, tokenId: number): string {
  const t = h.json.tokens[String(tokenId)];
  if (!t) throw new CryptmapError('ETOKEN', `Token ${tokenId} is not in use.`, { errno: 'ENOENT' });
  return JSON.stringify(t);
}

export async function removeToken(h: Luks2Header, tokenId: number): Promise<void> {
  h.requireChangeable();
  if (!h.json.tokens[String(tokenId)])
    throw new CryptmapError('ETOKEN', `Token ${tokenId} is not in use.`, { errno: 'ENOENT' });
  await h.update(() => {
    delete h.json.tokens[String(tokenId)];
  });
}

/**
 * cryptsetup token add --key-description: a luks2-keyring token ({"type","keyslots","key_description"}
 * in that order) assigned to `keySlot`, to every keyslot when none is given, or to none with
 * `unbound`; one header write. The id is `tokenId` or the lowest free one. Returns the id.
 */
export async function addKeyringToken(
  h: Luks2Header,
  keyDescription: string,
  opts: { tokenId?: number; keySlot?: number; unbound?: boolean } = {},
): Promise<number> {
  h.requireChangeable();
  if (!keyDescription)
    throw new CryptmapError('ETOKEN', '--key-description parameter is mandatory for token add action.', {
      exitCode: 1,
    });
  let id = opts.tokenId;
  if (id !== undefined) {
    if (!Number.isInteger(id) || id < 0 || id >= LUKS2_TOKENS_MAX)
      throw new CryptmapError('ETOKEN', `Token ${id} is invalid.`, { exitCode: 1 });
    if (h.json.tokens[String(id)]) throw new CryptmapError('ETOKEN', `Token ${id} in use.`, { exitCode: 1 });
  } else {
    id = 0;
    while (h.json.tokens[String(id)]) id++;
    if (id >= LUKS2_TOKENS_MAX)
      throw new CryptmapError('ETOKEN', `Failed to add luks2-keyring token ${id}.`, { exitCode: 1 });
  }
  if (opts.keySlot !== undefined && !h.json.keyslots[String(opts.keySlot)])
    throw new CryptmapError('EKEYSLOT', `Keyslot ${opts.keySlot} is not active.`, { exitCode: 1 });
  const keyslots = opts.unbound
    ? []
    : opts.keySlot !== undefined
      ? [String(opts.keySlot)]
      : Object.keys(h.json.keyslots);
  const newId = id;
  await h.update(() => {
    h.json.tokens[String(newId)] = { type: 'luks2-keyring', keyslots, key_description: keyDescription };
  });
  return id;
}

/** cryptsetup token unassign --token-id T --key-slot S: the keyslot leaves the token's list. */
export async function unassignToken(h: Luks2Header, tokenId: number, keySlot: number): Promise<void> {
  h.requireChangeable();
  const failed = () =>
    new CryptmapError('ETOKEN', `Failed to unassign token ${tokenId} from keyslot ${keySlot}.`, { exitCode: 1 });
  if (
    !Number.isInteger(tokenId) ||
    tokenId < 0 ||
    tokenId >= LUKS2_TOKENS_MAX ||
    !Number.isInteger(keySlot) ||
    keySlot < 0 ||
    keySlot >= LUKS2_KEYSLOTS_MAX
  )
    throw failed();
  const tok = h.json.tokens[String(tokenId)];
  if (!tok?.keyslots.includes(String(keySlot)))
    throw new CryptmapError('ETOKEN', `Token ${tokenId} is not assigned to keyslot ${keySlot}.`, {
      exitCode: 1,
      errno: 'ENOENT',
    });
  await h.update(() => {
    tok.keyslots = tok.keyslots.filter((k) => k !== String(keySlot));
  });
}
