// fio with crc32c verify over an NBD export while something else happens to the volume (online
// reencryption tests): random 16 KiB reads and writes, every block verified, until stop().
import { type ChildProcess, spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { requireTool } from './tools.js';

export interface FioRun {
  /** SIGINT fio (SIGKILL after 60 s), then its operations and errors (a JSON parse failure is an error). */
  stop(): Promise<{ ops: number; errors: number; out: string }>;
}

/**
 * fio over the first `sizeMiB` MiB of `target`: an NBD URI (ioengine=nbd) or a file (a block device or
 * a file in a mounted file system: libaio with O_DIRECT, so that the I/O reaches the device); its job
 * file and output go to `dir`.
 */
export function startFio(target: string, name: string, dir: string, sizeMiB: number): FioRun {
  requireTool('fio');
  const file = join(dir, `${name}.fio`);
  const engine = /^nbds?(\+unix)?:\/\//.test(target)
    ? ['ioengine=nbd', `uri=${target}`]
    : ['ioengine=libaio', 'direct=1', `filename=${target}`];
  writeFileSync(
    file,
    [
      '[global]',
      ...engine,
      'rw=randrw',
      'rwmixread=50',
      'verify=crc32c',
      'verify_fatal=1',
      'verify_backlog=64',
      'verify_state_save=0',
      'serialize_overlap=1',
      'time_based=1',
      'runtime=900',
      'randseed=99',
      `[${name}]`,
      'bs=16k',
      'iodepth=8',
      `size=${sizeMiB}m`,
      '',
    ].join('\n'),
  );
  const p: ChildProcess = spawn('fio', ['--output-format=json', file], { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  p.stdout!.on('data', (d) => (out += d));
  p.stderr!.on('data', (d) => (err += d));
  const closed = new Promise<void>((r) => p.on('close', () => r()));
  return {
    async stop() {
      p.kill('SIGINT');
      const t = setTimeout(() => p.kill('SIGKILL'), 60_000);
      await closed;
      clearTimeout(t);
      let ops = 0;
      let errors = 0;
      try {
        const js = JSON.parse(out.slice(out.indexOf('{'))) as {
          jobs: { error: number; read: { total_ios: number }; write: { total_ios: number } }[];
        };
        for (const j of js.jobs) {
          ops += j.read.total_ios + j.write.total_ios;
          if (j.error !== 0) errors++;
        }
      } catch {
        errors++;
      }
      errors += (err.match(/verify:|bad magic|crc32c: verify failed|error=/g) ?? []).length;
      return { ops, errors, out: `${err}\n${out.slice(0, 3000)}` };
    },
  };
}
