/**
 * The error code registry (src/util/errors.ts ERROR_CODES): each code is defined once, with a
 * one-line meaning, and used somewhere in src/; the synonyms merged into one code stay merged.
 */
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { test } from 'node:test';
import { CryptmapError, ERROR_CODES, toErrorCode } from '../../src/util/errors.js';

const SRC = fileURLToPath(new URL('../../../src/', import.meta.url));
/** Merged synonyms: the old spelling -> the code kept. */
const MERGED: Record<string, string> = {
  EREADONLY: 'EROFS',
  ENODEVICE: 'ENODEV',
  EREQUIREMENTS: 'EREQUIREMENT',
  EDEVSMALL: 'EDEVSIZE',
  EUSAGE: 'EARGS',
  EPARAM: 'EARGS',
  ENODAEMON: 'EDAEMON_DOWN',
};

function sources(dir: string): string[] {
  return readdirSync(dir).flatMap((n) => {
    const p = join(dir, n);
    return statSync(p).isDirectory() ? sources(p) : p.endsWith('.ts') ? [p] : [];
  });
}

test('each error code is defined once in the registry, with a one-line meaning', () => {
  const text = readFileSync(join(SRC, 'util/errors.ts'), 'utf8');
  const block = text.slice(text.indexOf('export const ERROR_CODES = {'), text.indexOf('} as const;'));
  const keys = [...block.matchAll(/^ {2}([A-Z][A-Z0-9_]*): /gm)].map((m) => m[1]!);
  const seen = new Set<string>();
  for (const k of keys) {
    assert.ok(!seen.has(k), `${k} is defined twice`);
    seen.add(k);
  }
  assert.deepEqual(keys.sort(), Object.keys(ERROR_CODES).sort());
  for (const [k, meaning] of Object.entries(ERROR_CODES))
    assert.match(meaning, /^[A-Za-z][^\n]{8,}$/, `${k} needs a one-line meaning`);
  for (const [old, kept] of Object.entries(MERGED))
    assert.ok(!(old in ERROR_CODES) && kept in ERROR_CODES, `${old} is merged into ${kept}`);
});

test('every registered code is used in src/, and no merged synonym is', () => {
  const files = sources(SRC).filter((f) => !f.endsWith('util/errors.ts'));
  const all = files.map((f) => readFileSync(f, 'utf8')).join('\n');
  for (const k of Object.keys(ERROR_CODES)) assert.ok(all.includes(`'${k}'`), `${k} is registered but never used`);
  for (const old of Object.keys(MERGED))
    assert.ok(!new RegExp(`['"]${old}['"]`).test(all), `${old} is still used (merged into ${MERGED[old]})`);
});

test('a code outside the registry does not compile; one arriving at run time is checked', () => {
  // @ts-expect-error: 'ENOT_A_CODE' is not a key of ERROR_CODES (the build fails if this line compiles)
  const e = new CryptmapError('ENOT_A_CODE', 'never registered');
  assert.equal(e.code, 'ENOT_A_CODE');
  assert.equal(toErrorCode('EBUSY', 'EINTERNAL'), 'EBUSY');
  assert.equal(toErrorCode('ENOT_A_CODE', 'EINTERNAL'), 'EINTERNAL');
  assert.equal(toErrorCode('toString', 'EPROTO'), 'EPROTO');
  assert.equal(toErrorCode(7, 'ENATIVE'), 'ENATIVE');
});
