/** `luksFormat` arguments for a LUKS2 test volume that formats in milliseconds (PBKDF2, 1000 iterations). */
export const FAST_LUKS2_FORMAT = [
  'luksFormat',
  '-q',
  '--type',
  'luks2',
  '--pbkdf',
  'pbkdf2',
  '--pbkdf-force-iterations',
  '1000',
] as const;
