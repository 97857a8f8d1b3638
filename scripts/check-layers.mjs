// Enforces the one-way layering of ../shared/ARCHITECTURE.md: a module under src/ may import
// only from its own module, from lower layers, and from util. Prints each violation; exits 1 on any.
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';

const LAYER = {
  util: 0,
  blockdev: 1,
  crypto: 1,
  engine: 2,
  dm: 3,
  luks: 3,
  nbd: 3,
  'nbd-wire': 0,
  activate: 4,
  keyservice: 4,
  coordination: 4,
  reconciler: 5,
  control: 5,
  daemon: 6,
  cli: 7,
};
// Same-layer imports that are forbidden even though the layer number would allow them.
const FORBIDDEN = {
  luks: ['dm', 'nbd'],
  nbd: ['dm', 'luks'],
  dm: ['luks', 'nbd'],
  blockdev: ['crypto'],
  crypto: ['blockdev'],
};

const src = resolve(new URL('../src', import.meta.url).pathname);
const bad = [];
function walk(dir) {
  for (const name of readdirSync(dir)) {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) walk(p);
    else if (p.endsWith('.ts')) check(p);
  }
}
function moduleOf(file) {
  return relative(src, file).split('/')[0];
}
function check(file) {
  const from = moduleOf(file);
  const text = readFileSync(file, 'utf8');
  for (const m of text.matchAll(
    /(?:import|export)[^'"]*?from\s+['"](\.[^'"]+)['"]|import\(\s*['"](\.[^'"]+)['"]\s*\)/g,
  )) {
    const spec = m[1] ?? m[2];
    const target = resolve(dirname(file), spec);
    if (!target.startsWith(src)) continue;
    const to = moduleOf(target);
    if (to === from || to === 'util') continue;
    const lf = LAYER[from];
    const lt = LAYER[to];
    if (lf === undefined || lt === undefined) {
      bad.push(`${relative(src, file)}: unknown module in import '${spec}'`);
    } else if (lt > lf || (lt === lf && to !== from) || FORBIDDEN[from]?.includes(to)) {
      bad.push(`${relative(src, file)}: ${from} (layer ${lf}) must not import ${to} (layer ${lt})`);
    }
  }
}
walk(src);
for (const b of bad) console.error('layering: ' + b);
process.exit(bad.length ? 1 : 0);
