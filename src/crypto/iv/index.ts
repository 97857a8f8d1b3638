/** The IV generator table, keyed by dm-crypt IV mode name (see types.ts). */
import { benbi } from './benbi.js';
import { essiv } from './essiv.js';
import { nullIv } from './null.js';
import { plain } from './plain.js';
import { plain64 } from './plain64.js';
import { plain64be } from './plain64be.js';
import type { IvOps } from './types.js';

export type { IvInitContext, IvInstance, IvOps } from './types.js';
export { IV_BYTES } from './types.js';

export const IV_GENERATORS: Readonly<Record<string, IvOps>> = Object.freeze({
  plain,
  plain64,
  plain64be,
  essiv,
  benbi,
  null: nullIv,
});
