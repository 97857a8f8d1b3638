/**
 * The IV generator table, keyed by dm-crypt IV mode name (see types.ts): the one list of supported
 * IV modes. cipher-spec.ts accepts exactly these names and prints them in its "not supported" error;
 * the native backend (backends/native.ts) checks at load that the addon has an id for each.
 * Adding an IV mode: a generator file here, its entry below, and its loop in native/cryptmap.c.
 */
import { benbi } from './benbi.js';
import { essiv } from './essiv.js';
import { nullIv } from './null.js';
import { plain } from './plain.js';
import { plain64 } from './plain64.js';
import { plain64be } from './plain64be.js';
import type { IvOps } from './types.js';

export type { IvInitContext, IvInstance, IvOps } from './types.js';
export { IV_BYTES } from './types.js';

export const IV_GENERATORS = Object.freeze({
  plain,
  plain64,
  plain64be,
  essiv,
  benbi,
  null: nullIv,
}) satisfies Readonly<Record<string, IvOps>>;

/** A dm-crypt IV mode cryptmap supports: a key of IV_GENERATORS. */
export type IvModeName = keyof typeof IV_GENERATORS;

/** The generator for `name`, looked up among the table's own keys only (not `toString`, `__proto__`). */
export function ivGenerator(name: string): IvOps | undefined {
  return Object.hasOwn(IV_GENERATORS, name) ? IV_GENERATORS[name as IvModeName] : undefined;
}

/** The supported IV modes as error messages list them: `plain, plain64, plain64be, essiv:<hash>, benbi, null`. */
export function supportedIvModes(): string {
  return Object.values(IV_GENERATORS as Readonly<Record<string, IvOps>>)
    .map((g) => (g.options === undefined ? g.name : `${g.name}:${g.options}`))
    .join(', ');
}
