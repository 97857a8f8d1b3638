/**
 * `--metrics` (issue 18 item 2): `cryptmap daemon`, `keyd` and `agent` as processes, scraped over
 * HTTP with fetch (undici) and parsed by the Prometheus project's own Python client parser
 * (python3-prometheus-client, the Debian python), which checks the text format; then names, types,
 * labels, and that counters move with I/O done by real NBD clients (qemu-io) and with refused key
 * requests. The trust rules: a non-loopback address without a token is refused; with
 * --metrics-token-file a scrape without the bearer token gets 401.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { createConnection } from 'node:net';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { makeTempDir } from '../helpers/tmp.js';
import { renderMetrics } from '../../src/util/metrics.js';
import { cryptmap, exec } from '../cli/harness.js';
import { dbOnlyManifest } from '../reconciler/manifests.js';

const ENTRY = new URL('../../src/cli/entry.js', import.meta.url).pathname;
const { dir, cleanup } = makeTempDir('cryptmap-metrics-');
const children: ChildProcess[] = [];
after(() => {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  cleanup();
});

/** Python's prometheus_client parser: families as JSON, or an error exit on anything malformed. */
const PARSER = `
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for f in text_string_to_metric_families(sys.stdin.read()):
    out.append({'name': f.name, 'type': f.type, 'samples': [[s.name, s.labels, s.value] for s in f.samples]})
print(json.dumps(out))
`;

interface Family {
  name: string;
  type: string;
  samples: [string, Record<string, string>, number][];
}

async function parse(text: string): Promise<Map<string, Family>> {
  const r = await new Promise<{ code: number; out: string; err: string }>((res) => {
    const c = execFile('/usr/bin/python3', ['-c', PARSER], { timeout: 60_000, maxBuffer: 16 << 20 }, (e, out, err) =>
      res({ code: e ? Number((e as { code?: number }).code ?? 1) : 0, out, err }),
    );
    c.stdin!.end(text);
  });
  assert.equal(
    r.code,
    0,
    `the Prometheus parser refused the exposition (python3-prometheus-client installed? scripts/install-deps.sh):\n${r.err}\n${text.slice(0, 2000)}`,
  );
  // The Python client names counter families without _total; key by the names we expose.
  return new Map((JSON.parse(r.out) as Family[]).map((f) => [f.type === 'counter' ? `${f.name}_total` : f.name, f]));
}

function value(
  fams: Map<string, Family>,
  family: string,
  sample: string,
  labels: Record<string, string> = {},
): number | undefined {
  const f = fams.get(family);
  assert.ok(f, `no family ${family} (have: ${[...fams.keys()].join(', ')})`);
  const s = f.samples.find(([n, l]) => n === sample && Object.entries(labels).every(([k, v]) => l[k] === v));
  return s?.[2];
}

async function scrape(url: string, headers: Record<string, string> = {}): Promise<Map<string, Family>> {
  const r = await fetch(url, { headers, signal: AbortSignal.timeout(30_000) });
  const text = await r.text();
  assert.equal(r.status, 200, text);
  assert.match(r.headers.get('content-type') ?? '', /^text\/plain; version=0\.0\.4/);
  return parse(text);
}

/** Start a cryptmap process; resolves with the metrics URL it logs, fails when it exits first or after 60 s. */
function startWithMetrics(args: string[]): Promise<{ child: ChildProcess; url: string; log: () => string }> {
  const child = spawn(process.execPath, [ENTRY, ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, CRYPTMAP_LOG: 'info' },
  });
  children.push(child);
  let log = '';
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`no metrics URL in 60 s:\n${log}`)), 60_000);
    const seen = (d: Buffer) => {
      log += d.toString();
      const m = /metrics served url=(http:\/\/\S+)/.exec(log);
      // The agent is usable once it says it serves; the others once the URL is logged.
      if (m && (args[0] !== 'agent' || log.includes('Press Ctrl-C to stop.'))) {
        clearTimeout(t);
        resolve({ child, url: m[1]!, log: () => log });
      }
    };
    child.stdout!.on('data', seen);
    child.stderr!.on('data', seen);
    child.once('exit', (code) => {
      clearTimeout(t);
      reject(new Error(`cryptmap ${args[0]} exited (${code}) before serving metrics:\n${log}`));
    });
  });
}

async function stop(c: ChildProcess): Promise<number | null> {
  if (c.exitCode !== null || c.signalCode !== null) return c.exitCode;
  const exited = new Promise<number | null>((res) => c.once('exit', (code) => res(code)));
  c.kill('SIGTERM');
  const t = setTimeout(() => c.kill('SIGKILL'), 60_000);
  const code = await exited;
  clearTimeout(t);
  return code;
}

test('the text format: escaping and cumulative histogram buckets, as the Prometheus parser reads them', async () => {
  const text = renderMetrics([
    {
      name: 'x_total',
      help: 'a \\ help\nline',
      type: 'counter',
      samples: [{ labels: { device: 'we"ird\\name\n' }, value: 3 }],
    },
    {
      name: 'h_seconds',
      help: 'h',
      type: 'histogram',
      samples: [{ labels: { op: 'read' }, value: { bounds: [0.1, 1], counts: [1, 2, 3], sum: 9.5, count: 6 } }],
    },
  ]);
  const f = await parse(text);
  assert.deepEqual(f.get('x_total')!.samples, [['x_total', { device: 'we"ird\\name\n' }, 3]]);
  const h = f.get('h_seconds')!;
  assert.equal(h.type, 'histogram');
  assert.deepEqual(
    h.samples.map(([n, l, v]) => [n, l.le ?? null, v]),
    [
      ['h_seconds_bucket', '0.1', 1],
      ['h_seconds_bucket', '1', 3],
      ['h_seconds_bucket', '+Inf', 6],
      ['h_seconds_sum', null, 9.5],
      ['h_seconds_count', null, 6],
    ],
  );
});

test('cryptmap daemon --metrics: per device requests, bytes, latency, errors by code, NBD connections, crypt pool', async () => {
  const run = join(dir, 'run');
  const d = await startWithMetrics(['daemon', '--runtime-dir', run, '--metrics', '127.0.0.1:0']);
  try {
    const file = join(dir, 'disk.img');
    writeFileSync(file, Buffer.alloc(1 << 20));
    // 1 MiB of linear storage, then 1 MiB of the error target.
    const c = await cryptmap([
      'dm',
      'create',
      'vol',
      '--runtime-dir',
      run,
      '--table',
      `0 2048 linear ${file} 0\n2048 2048 error`,
    ]);
    assert.equal(c.code, 0, c.stderr);
    const before = await scrape(d.url);
    for (const [name, type] of [
      ['cryptmap_device_requests_total', 'counter'],
      ['cryptmap_device_bytes_total', 'counter'],
      ['cryptmap_device_request_errors_total', 'counter'],
      ['cryptmap_device_errors_total', 'counter'],
      ['cryptmap_device_request_duration_seconds', 'histogram'],
      ['cryptmap_device_inflight_requests', 'gauge'],
      ['cryptmap_nbd_export_connections', 'gauge'],
      ['cryptmap_crypt_pool_threads', 'gauge'],
      ['cryptmap_crypt_pool_busy_threads', 'gauge'],
      ['cryptmap_crypt_pool_queue_depth', 'gauge'],
      ['cryptmap_build_info', 'gauge'],
      ['process_cpu_seconds_total', 'counter'],
    ] as const) {
      assert.equal(before.get(name)?.type, type, `${name} is a ${type}`);
    }
    assert.equal(value(before, 'cryptmap_device_size_bytes', 'cryptmap_device_size_bytes', { device: 'vol' }), 2 << 20);
    const readsBefore =
      value(before, 'cryptmap_device_requests_total', 'cryptmap_device_requests_total', {
        device: 'vol',
        op: 'read',
      }) ?? 0;
    const uri = `nbd+unix:///vol?socket=${run}/nbd.sock`;
    const io = await exec('qemu-io', [
      '--image-opts',
      `driver=nbd,path=${run}/nbd.sock,export=vol`,
      '-c',
      'write -P 7 0 64k',
      '-c',
      'read -P 7 0 64k',
      '-c',
      'read 1M 4k',
    ]);
    assert.match(io.stdout + io.stderr, /wrote 65536\/65536 bytes/, `${uri}: ${io.stderr}`);
    assert.match(io.stdout + io.stderr, /read failed/, 'the read in the error target fails');
    const afterIo = await scrape(d.url);
    const v = (s: string, l: Record<string, string>, fam = s) => value(afterIo, fam, s, l) ?? 0;
    assert.ok(v('cryptmap_device_requests_total', { device: 'vol', op: 'read' }) >= readsBefore + 2, 'reads counted');
    assert.ok(v('cryptmap_device_bytes_total', { device: 'vol', op: 'write' }) >= 65536, 'written bytes counted');
    assert.ok(v('cryptmap_device_bytes_total', { device: 'vol', op: 'read' }) >= 65536, 'read bytes counted');
    assert.ok(v('cryptmap_device_request_errors_total', { device: 'vol', op: 'read' }) >= 1, 'the failed read counted');
    const byCode = afterIo.get('cryptmap_device_errors_total')!.samples.filter(([, l]) => l.device === 'vol');
    assert.ok(
      byCode.length >= 1 && byCode.every(([, l]) => /^E[A-Z_]+$/.test(l.code ?? '')),
      `errors by code: ${JSON.stringify(byCode)}`,
    );
    assert.ok(
      v(
        'cryptmap_device_request_duration_seconds_count',
        { device: 'vol', op: 'write' },
        'cryptmap_device_request_duration_seconds',
      ) >= 1,
      'the write is in the latency histogram',
    );
    assert.equal(v('cryptmap_device_inflight_requests', { device: 'vol' }), 0);
    assert.equal(v('cryptmap_nbd_export_connections', { export: 'vol' }), 0, 'qemu-io is gone');
    const rm = await cryptmap(['dm', 'remove', 'vol', '--runtime-dir', run]);
    assert.equal(rm.code, 0, rm.stderr);
  } finally {
    assert.equal(await stop(d.child), 0, d.log());
  }
});

test('--metrics off loopback needs a token; with --metrics-token-file a scrape without it gets 401', async () => {
  const refused = await cryptmap(['daemon', '--runtime-dir', join(dir, 'run-refused'), '--metrics', '0.0.0.0:0']);
  assert.notEqual(refused.code, 0);
  assert.match(refused.stderr, /--metrics-token-file/);
  const tokenFile = join(dir, 'metrics.token');
  writeFileSync(tokenFile, 'a-long-enough-metrics-token\n', { mode: 0o600 });
  const d = await startWithMetrics([
    'daemon',
    '--runtime-dir',
    join(dir, 'run-token'),
    '--metrics',
    '127.0.0.1:0',
    '--metrics-token-file',
    tokenFile,
  ]);
  try {
    const r = await fetch(d.url, { signal: AbortSignal.timeout(30_000) });
    assert.equal(r.status, 401);
    assert.equal(
      (
        await fetch(d.url, {
          headers: { authorization: 'Bearer wrong-token-of-some-length' },
          signal: AbortSignal.timeout(30_000),
        })
      ).status,
      401,
    );
    const ok = await scrape(d.url, { authorization: 'Bearer a-long-enough-metrics-token' });
    assert.ok(ok.has('cryptmap_build_info'));
    const notFound = await fetch(d.url.replace('/metrics', '/'), { signal: AbortSignal.timeout(30_000) });
    assert.equal(notFound.status, 404);
  } finally {
    assert.equal(await stop(d.child), 0, d.log());
  }
});

test('cryptmap keyd --metrics: requests by result and refusals by reason move', async () => {
  const state = join(dir, 'keyd');
  const k = await startWithMetrics(['keyd', '--state-dir', state, '--metrics', '0']);
  try {
    const before = await scrape(k.url);
    assert.equal(
      value(before, 'cryptmap_keyd_refusals_total', 'cryptmap_keyd_refusals_total', { reason: 'unknown_token' }),
      0,
    );
    // One granted request and one with a token nobody issued, on the Unix socket.
    const ask = (line: string) =>
      new Promise<string>((res, rej) => {
        const s = createConnection(join(state, 'keyd.sock'));
        let got = '';
        const t = setTimeout(() => {
          s.destroy();
          rej(new Error('keyd did not answer in 30 s'));
        }, 30_000);
        s.on('data', (d) => {
          got += d.toString();
          if (got.includes('\n')) {
            clearTimeout(t);
            s.destroy();
            res(got);
          }
        });
        s.on('error', rej);
        s.write(`${line}\n`);
      });
    assert.match(
      await ask(
        JSON.stringify({ id: 1, op: 'derive', purpose: 'scratch', service: 'web', volume: 'cache', length: 32 }),
      ),
      /"ok":true/,
    );
    assert.match(
      await ask(
        JSON.stringify({
          id: 2,
          op: 'derive',
          token: 'not-a-token',
          purpose: 'scratch',
          service: 'web',
          volume: 'cache',
        }),
      ),
      /"ok":false/,
    );
    const afterReq = await scrape(k.url);
    assert.equal(
      value(afterReq, 'cryptmap_keyd_requests_total', 'cryptmap_keyd_requests_total', {
        transport: 'unix',
        op: 'derive',
        result: 'granted',
      }),
      1,
    );
    assert.equal(
      value(afterReq, 'cryptmap_keyd_refusals_total', 'cryptmap_keyd_refusals_total', { reason: 'unknown_token' }),
      1,
    );
  } finally {
    assert.equal(await stop(k.child), 0, k.log());
  }
});

test('cryptmap agent --metrics: volumes by phase, the last reconcile, and its mapped devices', async () => {
  const manifest = join(dir, 'manifest.yaml');
  writeFileSync(manifest, dbOnlyManifest('8M'));
  const a = await startWithMetrics([
    'agent',
    '--manifest',
    manifest,
    '--state-dir',
    join(dir, 'agent'),
    '--nbd-only',
    '--boot-id',
    'b1',
    '--metrics',
    '127.0.0.1:0',
  ]);
  try {
    const f = await scrape(a.url);
    assert.equal(value(f, 'cryptmap_agent_volumes', 'cryptmap_agent_volumes', { phase: 'ready' }), 1);
    assert.equal(value(f, 'cryptmap_agent_last_reconcile_success', 'cryptmap_agent_last_reconcile_success'), 1);
    assert.equal(
      value(f, 'cryptmap_agent_reconciles_total', 'cryptmap_agent_reconciles_total', { result: 'converged' }),
      1,
    );
    assert.equal(f.get('cryptmap_agent_reconcile_duration_seconds')?.type, 'histogram');
    assert.ok(
      (value(f, 'cryptmap_agent_last_reconcile_duration_seconds', 'cryptmap_agent_last_reconcile_duration_seconds') ??
        0) > 0,
    );
    assert.ok(f.get('cryptmap_device_requests_total')!.samples.length > 0, 'the agent exposes its mapped devices too');
    // Progress lines of the slow steps (not a terminal: one line at the start and one at the end).
    assert.match(
      a.log(),
      /scratch\/db\/data: formatting LUKS2\.\.\.\n[\s\S]*scratch\/db\/data: formatting LUKS2 done \(\d+\.\d s\)\n/,
    );
  } finally {
    assert.equal(await stop(a.child), 0, a.log());
  }
});
