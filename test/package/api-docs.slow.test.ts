/**
 * The library's reference docs (issue 18 item 6): `npm run docs` (typedoc.json) generates HTML for the
 * five entry points of package.json `exports` from their TSDoc, and fails on any warning: an exported
 * class, interface, type, function or variable, or a method of one, without a doc comment; a link that
 * does not resolve; a public type that refers to one the entry points do not export (unless
 * typedoc.json lists it in intentionallyNotExported). Interface and class properties are not
 * required to carry a comment (requiredToBeDocumented).
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { fileTempDir } from '../helpers/tmp.js';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('../../../', import.meta.url));
const out = fileTempDir('cryptmap-api-docs-');

test('typedoc documents the five entry points with no warning', async () => {
  const typedoc = join(ROOT, 'node_modules', 'typedoc', 'bin', 'typedoc');
  assert.ok(existsSync(typedoc), 'typedoc is a devDependency (npm ci installs it)');
  const r = await new Promise<{ code: number; out: string }>((res) => {
    execFile(
      process.execPath,
      [typedoc, '--out', out],
      { cwd: ROOT, timeout: 600_000, encoding: 'utf8', maxBuffer: 16 << 20, env: { ...process.env, NO_COLOR: '1' } },
      (e, stdout, stderr) =>
        res({
          code: e ? Number((e as { code?: number }).code) || 1 : 0,
          out: stdout + stderr + (e?.killed ? '\n(killed at the 600 s deadline)' : ''),
        }),
    );
  });
  assert.equal(r.code, 0, `npm run docs failed:\n${r.out}`);
  assert.doesNotMatch(
    r.out,
    /\[warning\]|\[error\]/,
    `${r.out}\nGive the exported symbol a doc comment; export a referenced type from its entry point, or name it in typedoc.json intentionallyNotExported when it is internal.`,
  );
  const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { exports: Record<string, string> };
  for (const entry of Object.keys(pkg.exports)) {
    const page = join(out, 'modules', `cryptmap_${entry.replace(/^\.\//, '')}.html`);
    assert.ok(existsSync(page), `${page} generated for cryptmap/${entry.slice(2)}`);
  }
  const engine = readFileSync(join(out, 'modules', 'cryptmap_engine.html'), 'utf8');
  assert.match(engine, /createSectorCipher/, 'the engine page lists createSectorCipher');
});
