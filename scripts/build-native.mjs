// Builds the optional native sector-cipher addon (native/, binding.gyp) with node-gyp against
// Node's own headers and bundled OpenSSL. A failed build is not fatal: cryptmap falls back to
// the pure TypeScript backend and says so (`cryptmap benchmark` prints the backend in use).
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';

if (!existsSync(new URL('../binding.gyp', import.meta.url))) process.exit(0);
const r = spawnSync('node-gyp', ['rebuild'], { stdio: 'inherit', shell: false });
if (r.error || r.status !== 0) {
  console.warn('cryptmap: native addon build failed; the js backend will be used.');
  if (process.env.CRYPTMAP_REQUIRE_NATIVE === '1') process.exit(1);
}
