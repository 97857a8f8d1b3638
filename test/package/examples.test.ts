/**
 * The library examples (issue 18 item 6): one per entry point of package.json `exports`, each
 * importing the package by its public name (`cryptmap/luks`) as a user's code does; inside the
 * checkout Node resolves that through the package's own "name" and "exports" (self-reference), so
 * this runs what dist/ holds. Each example runs as a child process and its output is checked; tsc
 * type-checks them (checkJs) against the published declarations. install.slow.test.ts runs them
 * again from a project that installed the packed tarball.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { checkExamples, EXAMPLE_OUTPUT } from './examples-helpers.js';

const ROOT = fileURLToPath(new URL('../../../', import.meta.url));
const EXAMPLES = join(ROOT, 'examples');
const PKG = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as {
  name: string;
  exports: Record<string, string>;
};

test('one example per package entry point, importing it by the public name', () => {
  const entries = Object.keys(PKG.exports).map((k) => k.replace(/^\.\//, ''));
  assert.deepEqual(entries.sort(), Object.keys(EXAMPLE_OUTPUT).sort(), 'EXAMPLE_OUTPUT covers package.json exports');
  const files = readdirSync(EXAMPLES).filter((f) => f.endsWith('.mjs'));
  assert.deepEqual(files.sort(), entries.map((e) => `${e}.mjs`).sort(), 'examples/*.mjs: one per entry point');
  for (const e of entries) {
    const text = readFileSync(join(EXAMPLES, `${e}.mjs`), 'utf8');
    assert.match(text, new RegExp(`from '${PKG.name}/${e}'`), `examples/${e}.mjs imports ${PKG.name}/${e}`);
    assert.doesNotMatch(text, /from '\.|\/dist\/|\/src\//, `examples/${e}.mjs imports only the public entry points`);
  }
});

test('every example runs and prints what it should (the package imported by its name)', async () => {
  await checkExamples(EXAMPLES, ROOT);
});

test('the examples type-check against the published declarations (tsc --checkJs --strict)', async () => {
  const tsc = join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc');
  const files = Object.keys(EXAMPLE_OUTPUT).map((n) => join(EXAMPLES, `${n}.mjs`));
  const r = await new Promise<{ code: number; out: string }>((res) => {
    execFile(
      process.execPath,
      [
        tsc,
        '--noEmit',
        '--allowJs',
        '--checkJs',
        '--strict',
        '--module',
        'nodenext',
        '--moduleResolution',
        'nodenext',
        '--target',
        'es2022',
        '--types',
        'node',
        '--skipLibCheck',
        ...files,
      ],
      { cwd: ROOT, timeout: 300_000, encoding: 'utf8' },
      (e, stdout, stderr) => res({ code: e ? Number((e as { code?: number }).code) || 1 : 0, out: stdout + stderr }),
    );
  });
  assert.equal(r.code, 0, `tsc on examples/:\n${r.out}`);
});
