// Progress output as cryptsetup 2.6 prints it (issue 16 item 4): the line formats with a fake clock,
// and --progress-json from a real `cryptmap reencrypt` (one object a line, ending at device_size).
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { test } from 'node:test';
import { testTempDir } from '../helpers/tmp.js';
import { main } from '../../src/cli/main.js';
import { humanTime, Progress } from '../../src/cli/progress.js';
import { Sink } from '../luks/helpers.js';
import { FAST_PBKDF } from '../helpers/luks.js';

test('progress lines: in place on a terminal, one a line with --progress-frequency, the final line, batch mode silent', () => {
  let t = 0;
  let out = '';
  const p = new Progress({ device: 'd', write: (s) => (out += s), nowUs: () => t });
  p.update(100 << 20, 0);
  t = 250_000;
  p.update(100 << 20, 10 << 20); // under 0.5 s: nothing
  assert.equal(out, '');
  t = 1_000_000;
  p.update(100 << 20, 25 << 20);
  assert.equal(out, '\x1b[2K\rProgress:  25.0%, ETA 00m03s,   25 MiB written, speed  25.0 MiB/s');
  out = '';
  t = 4_000_000;
  p.update(100 << 20, 100 << 20);
  assert.equal(out, '\x1b[2K\rFinished, time 00m04s,  100 MiB written, speed  25.0 MiB/s\n');

  out = '';
  t = 0;
  const f = new Progress({ device: 'd', frequency: 2, write: (s) => (out += s), nowUs: () => t });
  f.update(8 * 2 ** 30, 0);
  t = 2_000_000;
  f.update(8 * 2 ** 30, 2 ** 30);
  assert.equal(out, 'Progress:  12.5%, ETA 00m14s, 1024 MiB written, speed 512.0 MiB/s\n');

  out = '';
  const q = new Progress({ device: 'd', batch: true, write: (s) => (out += s), nowUs: () => t });
  q.update(10, 0);
  t += 1e6;
  q.update(10, 10);
  assert.equal(out, '');
  assert.equal(humanTime(5_400_000_000), '01h30m00s');
  assert.equal(humanTime(200_000_000_000), '02 days');
});

test('cryptmap reencrypt --progress-json prints cryptsetup JSON lines ending at the device size', async (t) => {
  const dir = testTempDir(t, 'cm-prog-');
  const img = join(dir, 'a.img');
  const key = join(dir, 'k');
  writeFileSync(key, 'pass', { mode: 0o600 });
  writeFileSync(img, Buffer.alloc(6 << 20));
  const io = () => ({
    stdin: Readable.from([]) as unknown as NodeJS.ReadableStream,
    stdout: new Sink(),
    stderr: new Sink(),
    env: { ...process.env, CRYPTMAP_LOCK_DIR: join(dir, 'locks') },
  });
  const a = io();
  const hdr = join(dir, 'a.hdr');
  assert.equal(
    await main(
      [
        'reencrypt',
        '--encrypt',
        '-q',
        '--header',
        hdr,
        '--luks2-keyslots-size',
        '1M',
        ...FAST_PBKDF,
        '--key-file',
        key,
        '--hotzone-size',
        '1M',
        '--progress-json',
        img,
      ],
      a,
    ),
    0,
    a.stderr.data,
  );
  const lines = a.stdout.data
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l) as Record<string, string>);
  assert.ok(lines.length >= 1, a.stdout.data);
  const last = lines.at(-1)!;
  assert.deepEqual(Object.keys(last), ['device', 'device_bytes', 'device_size', 'speed', 'eta_ms', 'time_ms']);
  assert.equal(last.device, img);
  assert.equal(last.device_bytes, String(6 << 20));
  assert.equal(last.device_size, String(6 << 20));
  assert.equal(last.eta_ms, '0');
});
