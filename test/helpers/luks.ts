/** The PBKDF arguments of a keyslot that opens in milliseconds (PBKDF2, 1000 iterations), for cryptsetup and cryptmap alike. */
export const FAST_PBKDF = ['--pbkdf', 'pbkdf2', '--pbkdf-force-iterations', '1000'] as const;

/** `luksFormat` arguments for a LUKS2 test volume that formats in milliseconds. */
export const FAST_LUKS2_FORMAT = ['luksFormat', '-q', '--type', 'luks2', ...FAST_PBKDF] as const;
