// Runs the compiled test files (<dist>/test/**/*.test.js) with node's test runner.
// `--unit` leaves out files named *.interop.test.js and *.slow.test.js.
// Any further argument filters files by substring: node scripts/run-tests.mjs --unit engine
// CRYPTMAP_DIST picks another build directory (parallel builds: tsc --outDir dist-foo).
import { spawnSync } from 'node:child_process';
import { readdirSync, statSync } from 'node:fs';
import { join, resolve } from 'node:path';

const args = process.argv.slice(2);
const unitOnly = args.includes('--unit');
const filters = args.filter((a) => !a.startsWith('--'));
const root = resolve(new URL('..', import.meta.url).pathname, process.env.CRYPTMAP_DIST ?? 'dist', 'test');

function walk(dir) {
  const out = [];
  for (const name of readdirSync(dir).sort()) {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) out.push(...walk(p));
    else if (name.endsWith('.test.js')) out.push(p);
  }
  return out;
}

let files = walk(root);
if (unitOnly) files = files.filter((f) => !/\.(interop|slow)\.test\.js$/.test(f));
// Filters match the path under the test directory, not the checkout's own path (a worktree named thin).
if (filters.length) files = files.filter((f) => filters.some((s) => f.slice(root.length).includes(s)));
if (files.length === 0) {
  console.error('run-tests: no test files matched');
  process.exit(1);
}
// A test that hangs fails after 15 minutes instead of holding CI until its own deadline.
const r = spawnSync(process.execPath, ['--test', '--test-concurrency=2', '--test-timeout=900000', ...files], {
  stdio: 'inherit',
});
process.exit(r.status ?? 1);
