/**
 * cryptmap's version, read once from the package.json at the package root (what `npm pack` ships),
 * for `cryptmap --version` and the metrics' build info.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { packageRoot } from './native.js';

let cached: string | undefined;

/** The package version ('0.1.0'), or 'unknown' when the package.json cannot be read. */
export function cryptmapVersion(): string {
  if (cached !== undefined) return cached;
  try {
    const v = (JSON.parse(readFileSync(join(packageRoot(), 'package.json'), 'utf8')) as { version?: unknown }).version;
    cached = typeof v === 'string' ? v : 'unknown';
  } catch {
    cached = 'unknown';
  }
  return cached;
}
