/**
 * NBD server throughput: nbdcopy sequential write (tmpfs file -> export) and read (export -> null:)
 * of a 1 GiB MemoryDevice export served by cryptmap's NbdServer, against `nbdkit memory 1G` with
 * the same client, same data, same run, alternating. Prints MB/s per round, the best of each and
 * the ratio cryptmap / nbdkit. Not a test: numbers depend on the machine.
 *
 * Usage: npm run bench:nbd [-- --size-mib 1024 --rounds 3]
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { MemoryDevice } from '../src/blockdev/memory.js';
import { NbdServer } from '../src/nbd/server.js';
import { nbdUnixUri } from '../src/nbd/uri.js';

const { values } = parseArgs({
  options: { 'size-mib': { type: 'string', default: '1024' }, rounds: { type: 'string', default: '3' } },
});
const sizeBytes = Number(values['size-mib']) * 1024 * 1024;
const rounds = Number(values.rounds);

function run(cmd: string, args: string[]): Promise<void> {
  return new Promise((resolve, reject) => {
    const c = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    c.stderr.on('data', (d: Buffer) => {
      err += d.toString();
    });
    c.on('error', (e) => reject(new Error(`${cmd}: ${e.message} (install libnbd-bin and nbdkit)`)));
    c.on('close', (code) => (code === 0 ? resolve() : reject(new Error(`${cmd} ${args.join(' ')} exited ${code}: ${err}`))));
  });
}

async function timed(cmd: string, args: string[]): Promise<number> {
  const t0 = process.hrtime.bigint();
  await run(cmd, args);
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  return sizeBytes / 1e6 / s;
}

async function waitFor(path: string): Promise<void> {
  for (let i = 0; i < 200 && !existsSync(path); i++) await new Promise((r) => setTimeout(r, 25));
  if (!existsSync(path)) throw new Error(`${path} did not appear`);
}

async function main(): Promise<void> {
  const shm = existsSync('/dev/shm') ? '/dev/shm' : tmpdir();
  const dir = mkdtempSync(join(shm, 'cryptmap-bench-nbd-'));
  const src = join(dir, 'src.img');
  const buf = Buffer.allocUnsafe(sizeBytes);
  randomFillSync(buf);
  writeFileSync(src, buf);

  const server = new NbdServer();
  server.addExport('mem', { device: new MemoryDevice({ sizeBytes }) });
  const ourSock = join(dir, 'cryptmap.sock');
  await server.listenUnix(ourSock);
  const kitSock = join(dir, 'nbdkit.sock');
  const kit: ChildProcess = spawn('nbdkit', ['-f', '--exit-with-parent', '-U', kitSock, 'memory', String(sizeBytes)], { stdio: 'ignore' });
  kit.on('error', (e) => {
    console.error(`nbdkit: ${e.message} (install the Debian package nbdkit)`);
    process.exit(1);
  });
  try {
    await waitFor(kitSock);
    const ours = nbdUnixUri('mem', ourSock);
    const theirs = `nbd+unix:///?socket=${kitSock}`;
    const best = { ourW: 0, kitW: 0, ourR: 0, kitR: 0 };
    console.log(`nbdcopy, ${sizeBytes / 1048576} MiB, source file in ${shm}; MB/s (1 MB = 10^6 bytes)`);
    for (let r = 1; r <= rounds; r++) {
      const ourW = await timed('nbdcopy', [src, ours]);
      const kitW = await timed('nbdcopy', [src, theirs]);
      const ourR = await timed('nbdcopy', [ours, 'null:']);
      const kitR = await timed('nbdcopy', [theirs, 'null:']);
      best.ourW = Math.max(best.ourW, ourW);
      best.kitW = Math.max(best.kitW, kitW);
      best.ourR = Math.max(best.ourR, ourR);
      best.kitR = Math.max(best.kitR, kitR);
      console.log(
        `round ${r}: write cryptmap ${ourW.toFixed(0)} nbdkit ${kitW.toFixed(0)} | read cryptmap ${ourR.toFixed(0)} nbdkit ${kitR.toFixed(0)}`,
      );
    }
    console.log(`best write: cryptmap ${best.ourW.toFixed(0)} MB/s, nbdkit memory ${best.kitW.toFixed(0)} MB/s, ratio ${(best.ourW / best.kitW).toFixed(2)}`);
    console.log(`best read:  cryptmap ${best.ourR.toFixed(0)} MB/s, nbdkit memory ${best.kitR.toFixed(0)} MB/s, ratio ${(best.ourR / best.kitR).toFixed(2)}`);
  } finally {
    kit.kill('SIGTERM');
    await server.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
