// The reliability report (issue 7): runs every fuzz target for a budget (random seeds, failing
// inputs saved to test/fuzz/corpus/), the fault-injection suites, the load suite and the secret
// hygiene suite and the local attacker suite (every test/security/local-attacker*.test.js: each attack
// attempt with its outcome, recorded by test/security/attack.ts), then prints a table and writes it
// to docs/reliability.md.
//   node scripts/reliability.mjs [--budget SECONDS-PER-FUZZ-TARGET] [--no-write]
//   npm run reliability                 (builds first; 20 s per fuzz target)
//   node scripts/reliability.mjs --only-local-attacker   (runs that suite alone and rewrites only
//                                       its section of docs/reliability.md)
// Figures come from the suites themselves (CRYPTMAP_RELIABILITY_OUT, one JSON line per figure).
// Exit status 0 only when every part held and no secret leaked.
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { availableParallelism, cpus, tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { runTarget, TARGETS } from './fuzz.mjs';

const root = resolve(new URL('..', import.meta.url).pathname);
const dist = resolve(root, process.env.CRYPTMAP_DIST ?? 'dist');

const SUITES = {
  fault: [
    'test/blockdev/fault.test.js',
    'test/dm/fault-nbd.test.js',
    'test/dm/fault-daemon.test.js',
    'test/luks/fault.test.js',
  ],
  load: ['test/load/nbd-load.slow.test.js'],
  secrets: ['test/security/secrets.test.js'],
};

/** Every local attacker test file (test/security/local-attacker*.test.js), found in the build. */
function attackerFiles() {
  const dir = join(dist, 'test', 'security');
  if (!existsSync(dir)) return [];
  return readdirSync(dir)
    .filter((f) => f.startsWith('local-attacker') && f.endsWith('.test.js'))
    .sort()
    .map((f) => `test/security/${f}`);
}

function runTests(files, env) {
  const started = Date.now();
  return new Promise((done) => {
    const child = spawn(
      process.execPath,
      ['--test', '--test-reporter=dot', '--test-concurrency=1', ...files.map((f) => join(dist, f))],
      {
        cwd: root,
        env: { ...process.env, ...env },
        stdio: ['ignore', 'pipe', 'pipe'],
      },
    );
    let output = '';
    child.stdout.on('data', (d) => (output += d));
    child.stderr.on('data', (d) => (output += d));
    child.on('close', (code) => done({ ok: code === 0, ms: Date.now() - started, output }));
  });
}

const fmtBytes = (n) => (n >= 1 << 30 ? `${(n / 2 ** 30).toFixed(2)} GiB` : `${(n / 2 ** 20).toFixed(1)} MiB`);
const fmtInt = (n) => n.toLocaleString('en-US');

/** test/fuzz/corpus/<target>/<file> as a markdown list. */
function corpusList() {
  const dir = join(root, 'test', 'fuzz', 'corpus');
  if (!existsSync(dir)) return ['- (none)'];
  const out = [];
  for (const t of readdirSync(dir).sort())
    for (const f of readdirSync(join(dir, t)).sort()) out.push(`- \`${t}/${f}\``);
  return out.length ? out : ['- (none)'];
}

function table(head, rows) {
  return [
    `| ${head.join(' | ')} |`,
    `|${head.map(() => '---').join('|')}|`,
    ...rows.map((r) => `| ${r.join(' | ')} |`),
  ].join('\n');
}

async function main() {
  const { values } = parseArgs({
    options: {
      budget: { type: 'string', default: '20' },
      'no-write': { type: 'boolean' },
      'only-local-attacker': { type: 'boolean' },
    },
  });
  const only = values['only-local-attacker'] === true;
  const budgetSec = Number(values.budget);
  if (!existsSync(join(dist, 'test', 'fuzz')))
    throw new Error(`no compiled tests in ${dist} (run npm run build first)`);
  const work = mkdtempSync(join(tmpdir(), 'cryptmap-reliability-'));
  const out = join(work, 'figures.jsonl');
  writeFileSync(out, '');
  const env = { CRYPTMAP_RELIABILITY_OUT: out };
  const status = {};
  const started = new Date();

  for (const t of only ? [] : Object.keys(TARGETS)) {
    process.stdout.write(`fuzz ${t} (${budgetSec} s) ... `);
    const r = await runTarget(t, { budgetSec, seed: Math.floor(Math.random() * 2 ** 31), env });
    status[`fuzz:${t}`] = r;
    console.log(r.ok ? 'ok' : 'FAILED');
    if (!r.ok) console.log(r.output.split('\n').slice(-40).join('\n'));
  }
  const attackFiles = attackerFiles();
  for (const [name, files] of [...(only ? [] : Object.entries(SUITES)), ['local attacker', attackFiles]]) {
    if (files.length === 0) {
      status[name] = { ok: true, ms: 0, output: '' };
      continue;
    }
    process.stdout.write(`${name} suite ... `);
    const r = await runTests(files, env);
    status[name] = r;
    console.log(r.ok ? `ok (${(r.ms / 1000).toFixed(1)} s)` : 'FAILED');
    if (!r.ok) console.log(r.output.split('\n').slice(-60).join('\n'));
  }

  const recs = readFileSync(out, 'utf8')
    .split('\n')
    .filter(Boolean)
    .map((l) => JSON.parse(l));
  rmSync(work, { recursive: true, force: true });

  const fuzzRows = Object.keys(TARGETS).map((t) => {
    const r = recs.filter((x) => x.kind === 'fuzz' && x.target === t);
    const inputs = r.reduce((a, x) => a + x.inputs, 0);
    const corpus = r.reduce((a, x) => a + x.corpus, 0);
    const secs = r.reduce((a, x) => a + x.ms, 0) / 1000;
    const outcomes = {};
    for (const x of r) for (const [k, v] of Object.entries(x.outcomes ?? {})) outcomes[k] = (outcomes[k] ?? 0) + v;
    const accepted = outcomes.ok ?? 0;
    const rejects = Object.entries(outcomes)
      .filter(([k]) => k !== 'ok')
      .sort((a, b) => b[1] - a[1])
      .slice(0, 4)
      .map(([k, v]) => `${k} ${fmtInt(v)}`)
      .join(', ');
    return [
      t,
      fmtInt(inputs),
      fmtInt(accepted),
      rejects || '-',
      String(corpus),
      `${secs.toFixed(1)} s`,
      status[`fuzz:${t}`]?.ok ? 'held' : '**FAILED**',
    ];
  });
  const faults = new Map();
  for (const x of recs.filter((r) => r.kind === 'fault')) {
    const f = faults.get(x.suite) ?? { injected: 0, survived: 0 };
    f.injected += x.injected;
    f.survived += x.survived;
    faults.set(x.suite, f);
  }
  const faultNames = {
    'luks-header': 'LUKS1/LUKS2 header updates, torn or short write at every write',
    'nbd-eio': 'NBD: EIO on one request, connection and other exports keep serving',
    'nbd-flush': 'NBD: failed FLUSH / FUA reported to the client',
    'nbd-enospc': 'NBD: full device answers ENOSPC, acknowledged data intact',
    'nbd-rate': 'NBD: seeded write-fault rate under pipelined load',
    'daemon-eio': 'daemon: EIO on a broken device, the LUKS volume next to it keeps serving',
  };
  const faultRows = [...faults].map(([k, v]) => [faultNames[k] ?? k, fmtInt(v.injected), fmtInt(v.survived)]);
  const load = recs.filter((r) => r.kind === 'load');
  const crash = recs.filter((r) => r.kind === 'crash');
  const secrets = recs.filter((r) => r.kind === 'secrets');
  const leaked = secrets.reduce((a, x) => a + x.leaked, 0);
  const loadRows = load.map((l) => [
    String(l.clients),
    fmtInt(l.ops),
    fmtBytes(l.bytes),
    `${l.seconds.toFixed(1)} s`,
    String(l.verifyErrors),
    fmtBytes(l.peakRssBytes),
  ]);
  const crashRows = crash.map((c) => [String(c.killed), String(c.durableWrites), String(c.lost)]);
  const attacks = recs.filter((r) => r.kind === 'attack');
  const attackRows = attacks.map((a) => [
    a.file.replace(/^local-attacker-?/, '').replace(/\.test\.ts$/, '') || '-',
    a.attempt.replace(/\|/g, '/'),
    a.outcome.replace(/\|/g, '/'),
    a.held ? 'held' : '**NOT HELD**',
  ]);
  const allOk =
    Object.values(status).every((s) => s.ok) &&
    leaked === 0 &&
    secrets.length > 0 &&
    attacks.length > 0 &&
    attacks.every((a) => a.held);

  const md = [
    '# Reliability report',
    '',
    `Generated by \`npm run reliability\` (scripts/reliability.mjs) on ${started.toISOString().replace(/\.\d+Z$/, 'Z')}: Node ${process.version}, ${availableParallelism()} CPUs (${cpus()[0]?.model ?? 'unknown'}), ${budgetSec} s per fuzz target. Secret handling: [docs/secrets.md](secrets.md); long fuzz runs: \`npm run fuzz -- --budget SECONDS [target...]\`.`,
    '',
    `Overall: **${allOk ? 'all held' : 'FAILURES (see below)'}**`,
    '',
    '## Fuzzing',
    '',
    'Oracle: each input returns or fails with a CryptmapError, settles within 5 s, and keeps memory within 512 MiB of the start. Socket targets also require that the server hangs up or answers, cleans up the connection and keeps serving ("accepted" there means the session ended cleanly; protocol errors are answered to the client). "Accepted" inputs were valid enough to load; the rejected ones show which check caught them. "Corpus" counts the regression inputs replayed first (test/fuzz/corpus/).',
    '',
    table(['target', 'inputs', 'accepted', 'rejected (top codes)', 'corpus', 'time', 'result'], fuzzRows),
    '',
    'Regression inputs (each one a bug the fuzzers found, fixed, and replayed by every `npm test`):',
    '',
    ...corpusList(),
    '',
    '## Fault injection',
    '',
    table(['scenario', 'faults injected', 'survived'], faultRows.length ? faultRows : [['(no figures)', '0', '0']]),
    '',
    `Suites: ${status.fault?.ok ? 'passed' : '**FAILED**'} (test/blockdev/fault.test.ts, test/dm/fault-nbd.test.ts, test/dm/fault-daemon.test.ts, test/luks/fault.test.ts: clean crash after every write).`,
    '',
    '## Load',
    '',
    'fio (ioengine=nbd, randrw with 40% reads, verify=crc32c, QD 1/8/32/16, one multi-conn job) against a `cryptmap daemon` serving a LUKS2 volume.',
    '',
    table(
      ['clients', 'ops', 'bytes', 'time', 'verify errors', 'daemon peak RSS'],
      loadRows.length ? loadRows : [['-', '-', '-', '-', '-', '-']],
    ),
    '',
    'SIGKILL of the daemon mid-load, restart, reopen:',
    '',
    table(['kills', 'FLUSH/FUA-acknowledged writes checked', 'lost'], crashRows.length ? crashRows : [['-', '-', '-']]),
    '',
    '## Secrets',
    '',
    table(
      ['flows', 'texts searched (logs, output, argv)', 'processes spawned', 'secrets leaked'],
      secrets.map((s) => [String(s.flows), String(s.haystacks), String(s.spawned), String(s.leaked)]),
    ),
    '',
    '## Local attacker',
    '',
    'A second local user (or a crafted input) tries to read, write, starve or learn what is not theirs (issue 11). Each row is one attempt made by the test files named, and what the system did.',
    '',
    table(
      ['file (test/security/local-attacker-*)', 'attempt', 'outcome', 'result'],
      attackRows.length ? attackRows : [['-', '(no attack tests)', '-', '-']],
    ),
    '',
    `Suites: ${status['local attacker']?.ok ? 'passed' : '**FAILED**'} (${attackFiles.length ? attackFiles.map((f) => f.replace(/\.js$/, '.ts')).join(', ') : 'none'}).`,
    '',
  ].join('\n');
  if (only) {
    const at = md.indexOf('## Local attacker');
    const section = `${md.slice(at).trimEnd()}\n\n(This section: \`--only-local-attacker\` on ${started.toISOString().replace(/\.\d+Z$/, 'Z')}.)\n`;
    console.log(`\n${section}`);
    const doc = join(root, 'docs', 'reliability.md');
    if (!values['no-write']) {
      const old = existsSync(doc) ? readFileSync(doc, 'utf8') : '# Reliability report\n';
      const cut = old.indexOf('## Local attacker');
      writeFileSync(doc, `${cut >= 0 ? old.slice(0, cut) : `${old.trimEnd()}\n\n`}${section}`);
      console.log('written to docs/reliability.md (local attacker section)');
    }
    return status['local attacker'].ok && attacks.length > 0 && attacks.every((a) => a.held) ? 0 : 1;
  }
  console.log(`\n${md}`);
  if (!values['no-write']) {
    writeFileSync(join(root, 'docs', 'reliability.md'), md);
    console.log('written to docs/reliability.md');
  }
  return allOk ? 0 : 1;
}

main().then(
  (c) => process.exit(c),
  (e) => {
    console.error(`reliability: ${e.message}`);
    process.exit(1);
  },
);
