/**
 * Temporary directories in tests: private (0700, another local user cannot plant files in them) and
 * always removed, whether the test passes or fails. `fileTempDir` lives for a test file,
 * `testTempDir` for one test, `makeTempDir` when the caller orders the removal itself (after it has
 * stopped what still uses the directory: a daemon, a mount).
 */
import { chmodSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, type TestContext } from 'node:test';

/** A new private directory `<base>/<prefix>XXXXXX` and the function that removes it (and all in it). */
export function makeTempDir(prefix = 'cryptmap-test-', base = tmpdir()): { dir: string; cleanup: () => void } {
  const dir = mkdtempSync(join(base, prefix));
  chmodSync(dir, 0o700);
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

/** A private directory for this test file, removed after its tests (a top-level `after`). */
export function fileTempDir(prefix?: string, base?: string): string {
  const { dir, cleanup } = makeTempDir(prefix, base);
  after(cleanup);
  return dir;
}

/** A private directory for test `t`, removed in `t.after` (after the test body and its `finally`). */
export function testTempDir(t: TestContext, prefix?: string, base?: string): string {
  const { dir, cleanup } = makeTempDir(prefix, base);
  t.after(cleanup);
  return dir;
}
