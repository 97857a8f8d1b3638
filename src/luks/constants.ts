/**
 * Limits and sizes of the LUKS formats, in one place for LUKS1, LUKS2 and the conversion between them
 * (LUKS On-Disk Format Specification 1.2.3 §2.4; LUKS2 On-Disk Format Specification §3; cryptsetup
 * lib/luks1/luks.h, lib/luks2/luks2.h).
 */

/** Anti-forensic stripes of every keyslot (LUKS1 `stripes`, LUKS2 `af.stripes`). */
export const LUKS_STRIPES = 4000;
/** Bytes of a keyslot's KDF salt (LUKS1 `passwordSalt`, LUKS2 `kdf.salt`). */
export const LUKS_SALTSIZE = 32;

/** LUKS2 keyslots, tokens and segments a header may hold. */
export const LUKS2_KEYSLOTS_MAX = 32;
export const LUKS2_TOKENS_MAX = 32;
export const LUKS2_SEGMENTS_MAX = 32;
/** Largest LUKS2 keyslots area (config.keyslots_size). */
export const LUKS2_MAX_KEYSLOTS_SIZE = 0x8000000;
/** Default LUKS2 metadata size (one copy: binary header and JSON area) and data offset. */
export const LUKS2_DEFAULT_METADATA_BYTES = 0x4000;
export const LUKS2_DEFAULT_DATA_OFFSET_BYTES = 0x1000000;
/** Digest PBKDF2 iterations when the KDF is forced (cryptsetup uses the minimum then). */
export const LUKS2_DIGEST_MIN_ITERATIONS = 1000;
