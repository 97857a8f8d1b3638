// Builds the optional native sector-cipher addon (native/, binding.gyp) with node-gyp against
// Node's own headers and bundled OpenSSL (npm's nodedir; no download needed when the headers are
// installed, as with Debian/NodeSource packages). A failed build is not fatal: cryptmap falls back to
// the pure TypeScript backend and says so (`cryptmap benchmark` prints the backend in use), unless
// CRYPTMAP_REQUIRE_NATIVE=1 (CI), where it fails the install.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = dirname(dirname(fileURLToPath(import.meta.url)));
if (!existsSync(join(root, 'binding.gyp'))) process.exit(0);

/** node-gyp: npm tells scripts where its bundled copy is; else next to this node's npm; else PATH. */
function nodeGyp() {
  const candidates = [
    process.env.npm_config_node_gyp,
    join(
      dirname(process.execPath),
      '..',
      'lib',
      'node_modules',
      'npm',
      'node_modules',
      'node-gyp',
      'bin',
      'node-gyp.js',
    ),
  ];
  for (const c of candidates) if (c && existsSync(c)) return [process.execPath, [c]];
  return ['node-gyp', []];
}

const [cmd, pre] = nodeGyp();
const args = [...pre, 'rebuild'];
// Use the installed headers (they include Node's OpenSSL) when npm did not say otherwise.
if (!process.env.npm_config_nodedir && existsSync('/usr/include/node/node_api.h')) args.push('--nodedir=/usr');
const r = spawnSync(cmd, args, { cwd: root, stdio: 'inherit', shell: false });
if (r.error || r.status !== 0) {
  console.warn('cryptmap: native addon build failed; the js backend will be used.');
  if (process.env.CRYPTMAP_REQUIRE_NATIVE === '1') process.exit(1);
}
