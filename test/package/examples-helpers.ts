/**
 * What each library example must print and how to run them (examples.test.ts from the checkout,
 * install.slow.test.ts from a project that installed the packed tarball).
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { join } from 'node:path';

/** What each example must print (every line it prints on success is checked by one of these). */
export const EXAMPLE_OUTPUT: Record<string, RegExp[]> = {
  engine: [
    /^backend: (native|js), key: 32 bytes, sector: 512 bytes$/m,
    /^IEEE 1619 vector 4: match$/m,
    /^decrypted: plaintext back$/m,
  ],
  blockdev: [
    /^size: 1048576 bytes/m,
    /^read back at 64 KiB: bbbb\.\.\. ok$/m,
    /^after write zeroes at 0: zeroes$/m,
    // Without the addon (an install with --ignore-scripts) a file reports no allocation.
    /^extents: (0\+65536 (hole )?zero, 65536\+4096, 69632\+978944 (hole )?zero|not reported \(.*\))$/m,
  ],
  dm: [
    /^part\t\(253:0\)\nsecret\t\(253:1\)$/m,
    /^secret: 0 2048 crypt aes-xts-plain64 0{128} 0 part 0$/m,
    /^read through secret: plaintext$/m,
    /^in the file: dm-crypt ciphertext$/m,
  ],
  luks: [
    /^detected: luks2$/m,
    /^label: example, cipher: aes-xts-plain64, key: 512 bits, data at 16 MiB$/m,
    /^wrong passphrase: ENOKEY: No key available with this passphrase\.$/m,
    /^unlocked with keyslot 0$/m,
    /^added keyslot 1; keyslots: 0 \(pbkdf2\), 1 \(pbkdf2\)$/m,
    /^reopened with keyslot 1: data read back$/m,
  ],
  nbd: [
    /^serving nbd\+unix:\/\/\/disk\?socket=\/.+\/nbd\.sock$/m,
    /^client: 16777216 bytes, flush: true, trim: true$/m,
    /^read back over NBD: same; on the served device: same$/m,
  ],
};

/** Run `node FILE` in `cwd`; a deadline, never a hang. */
export function runExample(
  file: string,
  cwd: string,
  env: NodeJS.ProcessEnv = {},
): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((res) => {
    execFile(
      process.execPath,
      [file],
      { cwd, env: { ...process.env, ...env }, timeout: 180_000, encoding: 'utf8' },
      (e, stdout, stderr) => {
        res({
          code: e ? Number((e as { code?: number }).code) || 1 : 0,
          stdout,
          stderr: stderr + (e?.killed ? '\n(killed at the 180 s deadline)' : ''),
        });
      },
    );
  });
}

/** Every example prints what it should and exits 0. */
export async function checkExamples(dir: string, cwd: string, env: NodeJS.ProcessEnv = {}): Promise<void> {
  for (const [name, want] of Object.entries(EXAMPLE_OUTPUT)) {
    const r = await runExample(join(dir, `${name}.mjs`), cwd, env);
    assert.equal(r.code, 0, `examples/${name}.mjs exited ${r.code}:\n${r.stdout}\n${r.stderr}`);
    for (const re of want) assert.match(r.stdout, re, `examples/${name}.mjs:\n${r.stdout}\n${r.stderr}`);
    assert.doesNotMatch(r.stdout, /WRONG|MISMATCH/, `examples/${name}.mjs`);
  }
}
