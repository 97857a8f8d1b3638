// Long fuzz runs: every target (or the named ones) for a time budget with a random seed.
//   node scripts/fuzz.mjs [--budget SECONDS] [--seed N] [--list] [target...]
//   npm run fuzz -- --budget 600 nbd luks2
// Each target runs as its own `node --test` process over <dist>/test/fuzz/*.test.js with
// CRYPTMAP_FUZZ_MS (budget), CRYPTMAP_FUZZ_SEED (random unless --seed) and CRYPTMAP_FUZZ_SAVE=1:
// a failing input is written to test/fuzz/corpus/<target>/ and replayed by every later `npm test`.
// A watchdog kills a target that overruns its budget by 60 s (a synchronous hang) and saves the
// input it was running. Exit status: 0 when every target held, 1 otherwise.
import { spawn } from 'node:child_process';
import { createHash, randomInt } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';

const root = resolve(new URL('..', import.meta.url).pathname);
const dist = resolve(root, process.env.CRYPTMAP_DIST ?? 'dist');

/** Target name -> compiled test file and the test name that runs it. */
export const TARGETS = {
  'cipher-spec': ['parsers', 'cipher spec parser'],
  'dm-table': ['parsers', 'dm table parser'],
  manifest: ['parsers', 'manifest parser'],
  crypttab: ['parsers', 'crypttab parser'],
  'control-line': ['parsers', 'control request line parser'],
  luks2: ['luks', 'LUKS2 loader'],
  luks1: ['luks', 'LUKS1 loader'],
  nbd: ['sockets', 'NBD handshake'],
  control: ['sockets', 'control socket protocol'],
};

/** Run one target; resolves { target, ok, seed, ms, output }. */
export function runTarget(target, { budgetSec, seed, env = {} }) {
  const [file, pattern] = TARGETS[target];
  const work = mkdtempSync(join(tmpdir(), 'cryptmap-fuzz-'));
  const inflight = join(work, 'inflight');
  const started = Date.now();
  return new Promise((done) => {
    const child = spawn(
      process.execPath,
      [
        '--test',
        '--test-reporter=dot',
        `--test-name-pattern=${pattern}`,
        join(dist, 'test', 'fuzz', `${file}.test.js`),
      ],
      {
        cwd: root,
        env: {
          ...process.env,
          ...env,
          CRYPTMAP_FUZZ_MS: String(budgetSec * 1000),
          CRYPTMAP_FUZZ_SEED: String(seed),
          CRYPTMAP_FUZZ_SAVE: '1',
          CRYPTMAP_FUZZ_INFLIGHT: inflight,
        },
        stdio: ['ignore', 'pipe', 'pipe'],
      },
    );
    let output = '';
    child.stdout.on('data', (d) => (output += d));
    child.stderr.on('data', (d) => (output += d));
    let hung = false;
    const watchdog = setTimeout(
      () => {
        hung = true;
        child.kill('SIGKILL');
      },
      (budgetSec + 60) * 1000,
    );
    child.on('close', (code) => {
      clearTimeout(watchdog);
      if (hung && existsSync(inflight)) {
        const input = readFileSync(inflight);
        const dir = join(root, 'test', 'fuzz', 'corpus', target);
        mkdirSync(dir, { recursive: true });
        const f = join(dir, `hang-${createHash('sha256').update(input).digest('hex').slice(0, 16)}.bin`);
        writeFileSync(f, input);
        output += `\nwatchdog: ${target} hung; input saved to ${f}\n`;
      }
      rmSync(work, { recursive: true, force: true });
      done({ target, ok: code === 0 && !hung, seed, ms: Date.now() - started, output });
    });
  });
}

async function main() {
  const { values, positionals } = parseArgs({
    options: { budget: { type: 'string', default: '60' }, seed: { type: 'string' }, list: { type: 'boolean' } },
    allowPositionals: true,
  });
  if (values.list) {
    console.log(Object.keys(TARGETS).join('\n'));
    return 0;
  }
  const names = positionals.length ? positionals : Object.keys(TARGETS);
  for (const n of names)
    if (!TARGETS[n]) throw new Error(`unknown fuzz target '${n}' (known: ${Object.keys(TARGETS).join(', ')})`);
  if (!existsSync(join(dist, 'test', 'fuzz')))
    throw new Error(`no compiled fuzz targets in ${dist} (run npm run build first)`);
  const budgetSec = Number(values.budget);
  let failed = 0;
  for (const n of names) {
    const seed = values.seed !== undefined ? Number(values.seed) : randomInt(2 ** 31);
    process.stdout.write(`fuzz ${n}: ${budgetSec} s, seed ${seed} ... `);
    const r = await runTarget(n, { budgetSec, seed });
    console.log(r.ok ? `ok (${(r.ms / 1000).toFixed(1)} s)` : 'FAILED');
    if (!r.ok) {
      failed++;
      console.log(r.output.split('\n').slice(-60).join('\n'));
    }
  }
  return failed ? 1 : 0;
}

if (import.meta.url === `file://${process.argv[1]}`) {
  main().then(
    (c) => process.exit(c),
    (e) => {
      console.error(`fuzz: ${e.message}`);
      process.exit(1);
    },
  );
}
