/**
 * LUKS2 keyslots: unlocking by priority, adding, changing, killing and moving keyslots, and where
 * their material goes in the keyslots area (LUKS2 On-Disk Format Specification §3.2-§3.4; cryptsetup
 * lib/luks2/luks2_keyslot.c, luks2_keyslot_luks2.c, lib/setup.c `crypt_keyslot_*`). Each function
 * works on the loaded header (luks2-header.ts) and writes it the crash-safe way described there:
 * new material first, then the header, then the wipe of what is no longer referenced.
 */
import { randomBytes } from 'node:crypto';
import { afSplitBytes } from '../crypto/af.js';
import { checkKeyBytes, parseCipherSpec } from '../crypto/cipher-spec.js';
import { calibrateKdf, type KdfParams } from '../crypto/kdf/index.js';
import { createSectorCipher } from '../engine/index.js';
import { alignUp } from '../util/bytes.js';
import { CryptmapError, EXIT_NO_PERMISSION, isCryptmapError } from '../util/errors.js';
import { Secret } from '../util/secret.js';
import { LUKS_SALTSIZE, LUKS_STRIPES, LUKS2_DIGEST_MIN_ITERATIONS, LUKS2_KEYSLOTS_MAX } from './constants.js';
import { noKeyError, noUsableKeyslot } from './errors.js';
import { wipeArea } from './keyslot-area.js';
import { DIGEST_HANDLERS, handlerFor, KEYSLOT_HANDLERS, kdfJson } from './luks2-handlers.js';
import { type Luks2Header, sortKeys } from './luks2-header.js';
import { firstFreeId, type L2Keyslot } from './luks2-json.js';
import type {
  KeyAuth,
  KeyslotArea,
  KeyslotInfo,
  KeyslotPriority,
  NewKeyslotOptions,
  UnlockOptions,
  UnlockResult,
} from './types.js';

/** The KDF of a new keyslot: the one given, or one calibrated to the options (default argon2id). */
export async function resolveKdf(
  opts: NewKeyslotOptions | undefined,
  keyBytes: number,
  hash: string,
): Promise<KdfParams> {
  if (opts?.kdf) return opts.kdf;
  const type = opts?.pbkdf ?? 'argon2id';
  return calibrateKdf({
    type,
    hash: opts?.hash ?? hash,
    iterTimeMs: opts?.iterTimeMs,
    maxMemoryKiB: opts?.pbkdfMemoryKiB,
    parallel: opts?.pbkdfParallel,
    keyBytes,
  });
}

/** PBKDF2 iterations of a new digest: explicit, the minimum when the KDF is forced, else benchmarked to 125 ms. */
export async function digestIterations(forced: boolean, hash: string, explicit?: number): Promise<number> {
  if (explicit !== undefined) return explicit;
  if (forced) return LUKS2_DIGEST_MIN_ITERATIONS;
  const p = await calibrateKdf({ type: 'pbkdf2', hash, iterTimeMs: 125, keyBytes: 32 });
  return p.type === 'pbkdf2' ? p.iterations : LUKS2_DIGEST_MIN_ITERATIONS;
}

function priorityName(p: number | undefined): KeyslotPriority {
  return p === 0 ? 'ignore' : p === 2 ? 'prefer' : 'normal';
}

/** Can the keyslot storage encrypt 512-byte sectors with this cipher and key size (LUKS2_keyslot_cipher_incompatible)? */
function keyslotCipherUsable(spec: string, keyBytes: number): boolean {
  if (!spec || spec.startsWith('cipher_null') || keyBytes < 1 || keyBytes > 1024) return false;
  try {
    checkKeyBytes(parseCipherSpec(spec), keyBytes);
    createSectorCipher({ spec, key: randomBytes(keyBytes), sectorBytes: 512 }).dispose();
    return true;
  } catch {
    return false;
  }
}

export function listKeyslots(h: Luks2Header): KeyslotInfo[] {
  return Object.keys(h.json.keyslots)
    .map(Number)
    .sort((a, b) => a - b)
    .map((id) => {
      const ks = h.json.keyslots[String(id)]!;
      const d = h.digestOfKeyslot(String(id));
      const unbound = d !== undefined && !h.json.digests[d]!.segments.includes('0');
      return {
        id,
        type: ks.type,
        active: true,
        priority: priorityName(ks.priority),
        kdf: ks.kdf?.type ?? '',
        ...(unbound ? { unbound } : {}),
      };
    });
}

export function keyslotAreas(h: Luks2Header): KeyslotArea[] {
  return Object.entries(h.json.keyslots)
    .filter(([, ks]) => ks.area?.offset !== undefined && ks.area.size !== undefined)
    .map(([id, ks]) => ({ id: Number(id), offsetBytes: Number(ks.area.offset), sizeBytes: Number(ks.area.size) }));
}

/**
 * Move a keyslot's material to a free place in the keyslots area that overlaps none of `avoid`
 * (byte ranges [start, end)), then point the header at it: copy first, header write second, so a
 * crash leaves the keyslot usable at its old or its new place. The material is position independent
 * (keyslot area IVs count from the area start). Returns false, writing nothing, when no gap fits.
 */
export async function relocateKeyslot(
  h: Luks2Header,
  slot: number,
  avoid: ReadonlyArray<readonly [number, number]>,
): Promise<boolean> {
  h.requireChangeable();
  const ks = h.json.keyslots[String(slot)];
  if (!ks?.area) throw new CryptmapError('EKEYSLOT', `Keyslot ${slot} is not active.`, { errno: 'ENOENT' });
  const size = Number(ks.area.size);
  const start = 2 * h.bin.hdrSize;
  const end = start + h.keyslotsBytes;
  const busy = [
    ...avoid.map(([a, b]) => ({ o: a, e: b })),
    ...Object.entries(h.json.keyslots)
      .filter(([id]) => id !== String(slot))
      .map(([, k]) => ({ o: Number(k.area.offset), e: Number(k.area.offset) + Number(k.area.size) })),
    { o: Number(ks.area.offset), e: Number(ks.area.offset) + size },
  ].sort((a, b) => a.o - b.o);
  let off = start;
  for (const u of busy) {
    if (u.e <= off) continue;
    if (u.o >= off + size) break;
    off = alignUp(Math.max(off, u.e), 4096);
  }
  if (off + size > end) return false;
  await h.update(async () => {
    const material = Buffer.alloc(size);
    try {
      await h.dev.read(Number(ks.area.offset), material);
      await h.dev.write(off, material);
      await h.dev.flush();
    } finally {
      material.fill(0);
    }
    ks.area.offset = String(off);
  });
  return true;
}

export async function verifyVolumeKey(h: Luks2Header, vk: Uint8Array): Promise<boolean> {
  const d = h.json.digests[h.segmentDigest()]!;
  const handler = handlerFor(DIGEST_HANDLERS, d.type);
  if (!handler) return false;
  return handler.verify(d, vk);
}

/** Slots to try, in cryptsetup's order: priority prefer, then normal (ignore only when named). */
function candidates(h: Luks2Header, keySlot?: number): string[] {
  if (keySlot !== undefined) {
    if (!h.json.keyslots[String(keySlot)]) throw noUsableKeyslot(keySlot);
    return [String(keySlot)];
  }
  const ids = Object.keys(h.json.keyslots).sort((a, b) => Number(a) - Number(b));
  const prio = (k: string) => h.json.keyslots[k]!.priority ?? 1;
  return [...ids.filter((k) => prio(k) === 2), ...ids.filter((k) => prio(k) === 1)];
}

export async function unlock(h: Luks2Header, passphrase: Uint8Array, opts: UnlockOptions = {}): Promise<UnlockResult> {
  // cryptsetup's answer is the last keyslot's of each priority class (LUKS2_keyslot_open_priority):
  // 'wrong' for a passphrase that did not open it, 'unusable' for a keyslot it could not try (an
  // unbound one, no digest); the prefer class's 'wrong' outranks the normal class's 'unusable'.
  const last: Record<'prefer' | 'normal', 'wrong' | 'unusable'> = { prefer: 'unusable', normal: 'unusable' };
  for (const k of candidates(h, opts.keySlot)) {
    const ks = h.json.keyslots[k]!;
    const cls = (ks.priority ?? 1) === 2 ? 'prefer' : 'normal';
    last[cls] = 'unusable';
    const handler = handlerFor(KEYSLOT_HANDLERS, ks.type);
    if (!handler?.open) continue;
    const dId = h.digestOfKeyslot(k);
    if (dId === undefined) continue;
    const d = h.json.digests[dId]!;
    // Keyslots of other segments (unbound keys) only when asked for (LUKS2_keyslot_for_segment), of
    // one digest only when that is asked for (LUKS2_keyslot_open_by_digest).
    if (opts.digest !== undefined ? dId !== opts.digest : !opts.anySegment && !d.segments.includes('0')) continue;
    let vk: Buffer;
    last[cls] = 'wrong';
    try {
      vk = await handler.open(h.dev, ks, passphrase);
    } catch (e) {
      // Memory exhaustion is reported; a slot we cannot run (unknown KDF, cipher) is skipped.
      // So is a KDF cost past cryptsetup's limits ("Keyslot open failed.", as cryptsetup).
      if (isCryptmapError(e) && (e.code === 'ENOMEM' || e.code === 'EIO' || e.code === 'EKDFLIMIT')) throw e;
      if (isCryptmapError(e) && opts.keySlot !== undefined && e.code !== 'ENOKEY') throw e;
      continue;
    }
    let ok = false;
    try {
      ok = (await handlerFor(DIGEST_HANDLERS, d.type)?.verify(d, vk)) === true;
    } finally {
      // A slot whose key does not verify (or whose digest throws) leaves no copy behind.
      if (!ok) vk.fill(0);
    }
    if (ok) return { volumeKey: new Secret(vk), keyslot: Number(k) };
  }
  // -ENOENT (exit 1): no keyslot, or the last one tried could not be used; -EPERM (exit 2): a wrong passphrase.
  if (last.prefer === 'wrong' || last.normal === 'wrong') throw noKeyError();
  throw new CryptmapError('EKEYSLOT', 'No usable keyslot is available.', { exitCode: 1, errno: 'ENOENT' });
}

async function authenticate(h: Luks2Header, auth: KeyAuth): Promise<Secret> {
  if ('passphrase' in auth) return (await unlock(h, auth.passphrase)).volumeKey;
  if (!(await verifyVolumeKey(h, auth.volumeKey.expose())))
    throw new CryptmapError('EVOLUMEKEY', 'Volume key does not match the volume.', {
      exitCode: EXIT_NO_PERMISSION,
      errno: 'EPERM',
    });
  return Secret.copyOf(auth.volumeKey.expose());
}

/** First gap in the keyslots area of `bytes` (LUKS2_find_area_gap). */
function findArea(h: Luks2Header, bytes: number): number {
  const start = 2 * h.bin.hdrSize;
  const end = start + h.keyslotsBytes;
  const used = Object.values(h.json.keyslots)
    .map((ks) => ({ o: Number(ks.area.offset), e: Number(ks.area.offset) + Number(ks.area.size) }))
    .sort((a, b) => a.o - b.o);
  let off = start;
  for (const u of used) {
    if (u.e <= off) continue;
    if (u.o >= off + bytes) break;
    off = Math.max(off, u.e);
  }
  if (off + bytes > end) throw new CryptmapError('ENOSPACE', 'No space for new keyslot.', { errno: 'ENOSPC' });
  return off;
}

function freeSlot(h: Luks2Header, want?: number): string {
  if (want !== undefined) {
    if (!Number.isInteger(want) || want < 0 || want >= LUKS2_KEYSLOTS_MAX)
      throw new CryptmapError('EKEYSLOT', `Key slot ${want} is invalid.`);
    if (h.json.keyslots[String(want)])
      throw new CryptmapError('EKEYSLOT', `Key slot ${want} is full, please select another one.`);
    return String(want);
  }
  for (let i = 0; i < LUKS2_KEYSLOTS_MAX; i++) if (!h.json.keyslots[String(i)]) return String(i);
  throw new CryptmapError('EKEYSLOT', 'All key slots full.');
}

/** Key size of the volume key (segment 0's digest), 0 when no keyslot holds it. */
function volumeKeyBytes(h: Luks2Header): number {
  const d = Object.values(h.json.digests).find((x) => x.segments.includes('0'));
  const k = d?.keyslots.find((id) => h.json.keyslots[id]);
  return k === undefined ? 0 : h.json.keyslots[k]!.key_size;
}

/**
 * Keyslot area encryption (crypt_keyslot_get_encryption): --keyslot-cipher/--keyslot-key-size when
 * given; else the data cipher with the volume key's size, when that cipher can encrypt 512-byte
 * keyslot sectors; else aes-xts-plain64 with a 512-bit key.
 */
export function keyslotEncryption(
  h: Luks2Header,
  opts: NewKeyslotOptions | undefined,
  vkBytes: number,
): { encryption: string; keyBytes: number } {
  if (opts?.keyslotCipher !== undefined || opts?.keyslotKeyBytes !== undefined) {
    const encryption = opts.keyslotCipher ?? '';
    const keyBytes = opts.keyslotKeyBytes ?? 0;
    if (!keyslotCipherUsable(encryption, keyBytes))
      throw new CryptmapError(
        'ECIPHER',
        `Cipher ${encryption} (key size ${keyBytes * 8} bits) is not available for keyslot encryption.`,
        { exitCode: 1 },
      );
    return { encryption, keyBytes };
  }
  const cipher = h.json.segments['0']?.encryption ?? 'aes-xts-plain64';
  if (vkBytes > 0 && !cipher.startsWith('cipher_null') && keyslotCipherUsable(cipher, vkBytes))
    return { encryption: cipher, keyBytes: vkBytes };
  return { encryption: 'aes-xts-plain64', keyBytes: 64 };
}

/** Build keyslot `slot` in a free area and write its material (the header is not written here). */
export async function storeKeyslot(
  h: Luks2Header,
  slot: number | string,
  vk: Uint8Array,
  passphrase: Uint8Array,
  kdf: KdfParams,
  digestId: string,
  enc: { encryption: string; keyBytes: number },
): Promise<L2Keyslot> {
  const areaBytes = alignUp(afSplitBytes(vk.length, LUKS_STRIPES), 4096);
  const offset = findArea(h, areaBytes);
  const ks: L2Keyslot = {
    type: 'luks2',
    key_size: vk.length,
    af: { type: 'luks1', stripes: LUKS_STRIPES, hash: kdf.type === 'pbkdf2' ? kdf.hash : 'sha256' },
    area: {
      type: 'raw',
      offset: String(offset),
      size: String(areaBytes),
      encryption: enc.encryption,
      key_size: enc.keyBytes,
    },
    kdf: kdfJson(kdf, randomBytes(LUKS_SALTSIZE)),
  };
  // In the metadata before the material is written: a failed update (Luks2Header.update) then wipes it.
  h.json.keyslots[String(slot)] = ks;
  await KEYSLOT_HANDLERS.luks2!.store!(h.dev, ks, passphrase, vk);
  const d = h.json.digests[digestId]!;
  if (!d.keyslots.includes(String(slot))) d.keyslots.push(String(slot));
  sortKeys(h.json);
  return ks;
}

export async function addKey(
  h: Luks2Header,
  auth: KeyAuth,
  newPassphrase: Uint8Array,
  opts: NewKeyslotOptions & { assignTokens?: number[] } = {},
): Promise<number> {
  h.requireChangeable();
  const slot = freeSlot(h, opts.keySlot);
  for (const t of opts.assignTokens ?? [])
    if (!h.json.tokens[String(t)])
      throw new CryptmapError('ETOKEN', `Token ${t} is not in use.`, { exitCode: 1, errno: 'ENOENT' });
  const vk = await authenticate(h, auth);
  try {
    const kdf = await resolveKdf(opts, vk.length, opts.hash ?? 'sha256');
    await h.update(async () => {
      await storeKeyslot(
        h,
        slot,
        vk.expose(),
        newPassphrase,
        kdf,
        h.segmentDigest(),
        keyslotEncryption(h, opts, vk.length),
      );
      // A keyslot whose passphrase came from a token is assigned to it in the same header write.
      for (const t of opts.assignTokens ?? []) {
        const tok = h.json.tokens[String(t)]!;
        if (!tok.keyslots.includes(slot)) tok.keyslots.push(slot);
      }
    });
    return Number(slot);
  } finally {
    vk.dispose();
  }
}

/**
 * Add a keyslot holding a key that is not the volume key (cryptsetup luksAddKey --unbound,
 * crypt_keyslot_add_by_key with CRYPT_VOLUME_KEY_NO_SEGMENT): `key` or a random key of `keyBytes`,
 * under a new pbkdf2 digest assigned to no segment. Such a keyslot never opens the volume; `unlock`
 * with `anySegment` tests its passphrase and returns its key. Returns the keyslot number.
 */
export async function addUnboundKeyslot(
  h: Luks2Header,
  newPassphrase: Uint8Array,
  opts: NewKeyslotOptions & { keyBytes: number; key?: Uint8Array },
): Promise<number> {
  h.requireChangeable();
  const keyBytes = opts.key?.length ?? opts.keyBytes;
  if (!Number.isInteger(keyBytes) || keyBytes < 1 || keyBytes > 512)
    throw new CryptmapError('EARGS', 'Invalid key size.', { exitCode: 1 });
  const slot = freeSlot(h, opts.keySlot);
  const key = opts.key ? Buffer.from(opts.key) : randomBytes(keyBytes);
  try {
    const hash = opts.hash ?? 'sha256';
    const kdf = await resolveKdf(opts, keyBytes, hash);
    const digest = await DIGEST_HANDLERS.pbkdf2!.create(key, {
      hash,
      iterations: await digestIterations(opts.kdf !== undefined, hash),
    });
    await h.update(async () => {
      const dId = firstFreeId(h.json.digests);
      h.json.digests[String(dId)] = { ...digest, keyslots: [], segments: [] };
      const enc = keyslotEncryption(h, opts, volumeKeyBytes(h));
      await storeKeyslot(h, slot, key, newPassphrase, kdf, String(dId), enc);
    });
    return Number(slot);
  } finally {
    key.fill(0);
  }
}

export async function changeKey(
  h: Luks2Header,
  oldPassphrase: Uint8Array,
  newPassphrase: Uint8Array,
  opts: NewKeyslotOptions = {},
): Promise<number> {
  h.requireChangeable();
  // Any segment, as cryptsetup's crypt_keyslot_change_by_passphrase: an unbound keyslot stays unbound.
  const { volumeKey, keyslot } = await unlock(h, oldPassphrase, { keySlot: opts.keySlot, anySegment: true });
  const old = h.json.keyslots[String(keyslot)]!;
  const oldArea = { o: Number(old.area.offset), n: Number(old.area.size) };
  let ks: L2Keyslot;
  let inPlace = false;
  try {
    const kdf = await resolveKdf(opts, volumeKey.length, opts.hash ?? 'sha256');
    // New material goes into a free area while the old slot stays intact; then one header write swaps them.
    ks = await h.update(async () => {
      const tmpSlot = `${keyslot}`;
      delete h.json.keyslots[tmpSlot];
      h.json.keyslots['__old'] = old;
      let stored: L2Keyslot;
      try {
        const dId = h.digestOfKeyslot(tmpSlot) ?? h.segmentDigest();
        const bound = h.json.digests[dId]!.segments.includes('0');
        const store = () =>
          storeKeyslot(
            h,
            tmpSlot,
            volumeKey.expose(),
            newPassphrase,
            kdf,
            dId,
            keyslotEncryption(h, opts, bound ? volumeKey.length : volumeKeyBytes(h)),
          );
        try {
          stored = await store();
        } catch (e) {
          if (!isCryptmapError(e, 'ENOSPACE')) throw e;
          // No room for a second copy: the keyslot is overwritten in place, as cryptsetup does (its old
          // area is reused; a crash before the header write loses this keyslot).
          delete h.json.keyslots['__old'];
          inPlace = true;
          stored = await store();
        }
      } finally {
        delete h.json.keyslots['__old'];
      }
      if (old.priority !== undefined) stored.priority = old.priority;
      h.json.keyslots[tmpSlot] = stored;
      sortKeys(h.json);
      return stored;
    });
  } finally {
    volumeKey.dispose();
  }
  // The header now names the new material; the old goes (in place, only what the new area does not
  // cover). A failure here is reported; the new passphrase is already in force.
  const nO = Number(ks.area.offset);
  const nE = nO + Number(ks.area.size);
  const oE = oldArea.o + oldArea.n;
  if (!inPlace || nE <= oldArea.o || nO >= oE) await wipeArea(h.dev, oldArea.o, oldArea.n);
  else {
    if (oldArea.o < nO) await wipeArea(h.dev, oldArea.o, nO - oldArea.o);
    if (oE > nE) await wipeArea(h.dev, nE, oE - nE);
  }
  return keyslot;
}

export async function killSlot(h: Luks2Header, slot: number): Promise<void> {
  h.requireChangeable();
  const k = String(slot);
  const ks = h.json.keyslots[k];
  if (!ks) throw new CryptmapError('EKEYSLOT', `Keyslot ${slot} is not active.`, { errno: 'ENOENT' });
  await h.update(() => {
    delete h.json.keyslots[k];
    for (const d of Object.values(h.json.digests)) d.keyslots = d.keyslots.filter((x) => x !== k);
    for (const t of Object.values(h.json.tokens)) t.keyslots = t.keyslots.filter((x) => x !== k);
  });
  if (ks.area?.offset !== undefined && ks.area.size !== undefined)
    await wipeArea(h.dev, Number(ks.area.offset), Number(ks.area.size));
}

/** cryptsetup config --priority: 'normal' removes the field, as cryptsetup does. */
export async function setPriority(h: Luks2Header, slot: number, priority: KeyslotPriority): Promise<void> {
  h.requireChangeable();
  if (!h.json.keyslots[String(slot)])
    throw new CryptmapError('EKEYSLOT', `Keyslot ${slot} is not active.`, { errno: 'ENOENT' });
  await h.update(() => {
    const ks = h.json.keyslots[String(slot)]!;
    if (priority === 'normal') delete ks.priority;
    else ks.priority = priority === 'ignore' ? 0 : 2;
  });
}

/** luksErase: every keyslot goes from the header, then their areas are wiped. */
export async function eraseKeyslots(h: Luks2Header): Promise<void> {
  h.requireChangeable();
  const areas = Object.values(h.json.keyslots).map((ks) => ({
    o: Number(ks.area?.offset ?? 0),
    n: Number(ks.area?.size ?? 0),
  }));
  await h.update(() => {
    for (const k of Object.keys(h.json.keyslots)) delete h.json.keyslots[k];
    for (const d of Object.values(h.json.digests)) d.keyslots = [];
    for (const t of Object.values(h.json.tokens)) t.keyslots = [];
  });
  for (const a of areas) if (a.n > 0) await wipeArea(h.dev, a.o, a.n);
}

/**
 * Store a keyslot for `vk` under `passphrase` with a new digest bound to no segment (cryptsetup's
 * CRYPT_VOLUME_KEY_NO_SEGMENT: the reencryption's new key) and write the header. Returns
 * the keyslot and digest ids. With `digest` (the id an earlier call returned for the same `vk`),
 * the keyslot joins that digest instead (CRYPT_VOLUME_KEY_DIGEST_REUSE: a further passphrase for the
 * new key).
 */
export async function addUnboundKey(
  h: Luks2Header,
  vk: Uint8Array,
  passphrase: Uint8Array,
  opts: NewKeyslotOptions & { digest?: string } = {},
): Promise<{ keyslot: number; digest: string }> {
  h.requireChangeable();
  const slot = freeSlot(h, opts.keySlot);
  const hash = opts.hash ?? 'sha256';
  const kdf = await resolveKdf(opts, vk.length, hash);
  const reuse = opts.digest;
  if (reuse !== undefined && !(await DIGEST_HANDLERS.pbkdf2!.verify(h.json.digests[reuse]!, vk)))
    throw new CryptmapError('EINVAL', `digest ${reuse} is not the digest of this key`);
  const d =
    reuse === undefined
      ? await DIGEST_HANDLERS.pbkdf2!.create(vk, {
          hash,
          iterations: await digestIterations(opts.kdf !== undefined, hash, undefined),
        })
      : undefined;
  return h.update(async () => {
    const id = reuse ?? String(firstFreeId(h.json.digests));
    if (d !== undefined) h.json.digests[id] = { ...d, keyslots: [], segments: [] };
    // The new key's keyslot area is encrypted with the cipher of the segment it will protect.
    await storeKeyslot(h, slot, vk, passphrase, kdf, String(id), keyslotEncryption(h, opts, vk.length));
    return { keyslot: Number(slot), digest: String(id) };
  });
}
