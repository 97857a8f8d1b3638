/**
 * The built-in target types, keyed by their table name (the ops-table registry the core consults).
 */
import type { TargetType } from '../types.js';
import { crypt } from './crypt.js';
import { error } from './error.js';
import { linear } from './linear.js';
import { mirror } from './mirror.js';
import { striped } from './striped.js';
import { thin } from './thin.js';
import { thinPool } from './thin-pool.js';
import { zero } from './zero.js';

/** The built-in target types by table name: linear, striped, mirror, zero, error, crypt, thin-pool, thin. */
export const BUILTIN_TARGETS: Readonly<Record<string, TargetType>> = Object.freeze({
  crypt,
  error,
  linear,
  mirror,
  striped,
  thin,
  'thin-pool': thinPool,
  zero,
});

export { crypt, error, linear, mirror, striped, thin, thinPool, zero };
