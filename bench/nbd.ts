/**
 * NBD server throughput: nbdcopy sequential write (tmpfs file -> export) and read (export -> null:)
 * of a 1 GiB MemoryDevice export served by cryptmap's NbdServer, against `nbdkit memory 1G` with
 * the same client, same data, same run, alternating. Prints MB/s per round, the best of each and
 * the ratio cryptmap / nbdkit. Also each server's CPU seconds per GiB (user + system, from /proc),
 * which is steadier than wall time on a loaded machine. cryptmap's server runs in a child process
 * like nbdkit: a process holding a 1 GiB device that spawns clients pays copy-on-write faults on
 * every page after each fork, which would be charged to the server. Not a test: numbers depend on the machine.
 *
 * Then fio random 4 KiB reads at queue depth 32 (nbd engine) against both, IOPS.
 *
 * Usage: npm run bench:nbd [-- --size-mib 1024 --rounds 3]
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { closeSync, existsSync, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { MemoryDevice } from '../src/blockdev/memory.js';
import { NbdServer } from '../src/nbd/server.js';
import { nbdUnixUri } from '../src/nbd-wire/uri.js';
import { cpuSeconds, fioRandRead, run, waitFor } from './common.js';

const { values } = parseArgs({
  options: {
    'size-mib': { type: 'string', default: '1024' },
    rounds: { type: 'string', default: '3' },
    /** Internal: run only the server on this socket (the bench starts itself in this mode). */
    serve: { type: 'string' },
  },
});
const sizeBytes = Number(values['size-mib']) * 1024 * 1024;
const rounds = Number(values.rounds);

interface Sample {
  mbps: number;
  cpuPerGiB: number;
}

async function timed(cmd: string, args: string[], serverPid: number): Promise<Sample> {
  const c0 = cpuSeconds(serverPid);
  const t0 = process.hrtime.bigint();
  await run(cmd, args, 'libnbd-bin');
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  return { mbps: sizeBytes / 1e6 / s, cpuPerGiB: ((cpuSeconds(serverPid) - c0) * 1073741824) / sizeBytes };
}

async function main(): Promise<void> {
  const shm = existsSync('/dev/shm') ? '/dev/shm' : tmpdir();
  const dir = mkdtempSync(join(shm, 'cryptmap-bench-nbd-'));
  const src = join(dir, 'src.img');
  // Written in pieces: a 1 GiB buffer kept alive in this process would make every GC slower.
  const piece = Buffer.allocUnsafe(64 << 20);
  const fd = openSync(src, 'w');
  for (let done = 0; done < sizeBytes; done += piece.length) {
    randomFillSync(piece);
    writeSync(fd, piece, 0, Math.min(piece.length, sizeBytes - done));
  }
  closeSync(fd);

  const ourSock = join(dir, 'cryptmap.sock');
  const ourServer: ChildProcess = spawn(
    process.execPath,
    [fileURLToPath(import.meta.url), '--serve', ourSock, '--size-mib', String(values['size-mib'])],
    {
      stdio: 'inherit',
    },
  );
  const ourPid = ourServer.pid!;
  const kitSock = join(dir, 'nbdkit.sock');
  const kit: ChildProcess = spawn('nbdkit', ['-f', '--exit-with-parent', '-U', kitSock, 'memory', String(sizeBytes)], {
    stdio: 'ignore',
  });
  kit.on('error', (e) => {
    console.error(`nbdkit: ${e.message} (install the Debian package nbdkit)`);
    process.exit(1);
  });
  try {
    await waitFor(kitSock);
    await waitFor(ourSock);
    const ours = nbdUnixUri('mem', ourSock);
    const theirs = `nbd+unix:///?socket=${kitSock}`;
    const best = { ourW: 0, kitW: 0, ourR: 0, kitR: 0 };
    const cpu = { ourW: Infinity, kitW: Infinity, ourR: Infinity, kitR: Infinity };
    const fmt = (x: Sample) => `${x.mbps.toFixed(0)} MB/s (${x.cpuPerGiB.toFixed(2)} CPU-s/GiB)`;
    console.log(
      `nbdcopy, ${sizeBytes / 1048576} MiB, source file in ${shm}; 1 MB = 10^6 bytes; server CPU seconds per GiB in ()`,
    );
    for (let r = 1; r <= rounds; r++) {
      const s = {
        ourW: await timed('nbdcopy', [src, ours], ourPid),
        kitW: await timed('nbdcopy', [src, theirs], kit.pid!),
        ourR: await timed('nbdcopy', [ours, 'null:'], ourPid),
        kitR: await timed('nbdcopy', [theirs, 'null:'], kit.pid!),
      };
      for (const k of ['ourW', 'kitW', 'ourR', 'kitR'] as const) {
        best[k] = Math.max(best[k], s[k].mbps);
        cpu[k] = Math.min(cpu[k], s[k].cpuPerGiB);
      }
      console.log(
        `round ${r}: write cryptmap ${fmt(s.ourW)}, nbdkit ${fmt(s.kitW)} | read cryptmap ${fmt(s.ourR)}, nbdkit ${fmt(s.kitR)}`,
      );
    }
    const line = (what: string, o: 'ourW' | 'ourR', k: 'kitW' | 'kitR') =>
      `best ${what}: cryptmap ${best[o].toFixed(0)} MB/s, nbdkit memory ${best[k].toFixed(0)} MB/s, ratio ${(best[o] / best[k]).toFixed(2)}; ` +
      `CPU-s/GiB cryptmap ${cpu[o].toFixed(2)}, nbdkit ${cpu[k].toFixed(2)}`;
    console.log(line('write', 'ourW', 'kitW'));
    console.log(line('read ', 'ourR', 'kitR'));
    let ourIops = 0;
    let kitIops = 0;
    for (let r = 1; r <= 2; r++) {
      ourIops = Math.max(ourIops, await fioRandRead(ours, sizeBytes, 5));
      kitIops = Math.max(kitIops, await fioRandRead(theirs, sizeBytes, 5));
    }
    console.log(
      `fio randread 4k QD32: cryptmap ${ourIops.toFixed(0)} IOPS, nbdkit memory ${kitIops.toFixed(0)} IOPS, ratio ${(ourIops / kitIops).toFixed(2)}`,
    );
  } finally {
    kit.kill('SIGTERM');
    ourServer.kill('SIGTERM');
    await new Promise((r) => ourServer.once('exit', r));
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Server mode: serve a MemoryDevice until SIGTERM, then shut down cleanly. */
async function serve(sock: string): Promise<void> {
  const server = new NbdServer();
  server.addExport('mem', { device: new MemoryDevice({ sizeBytes }) });
  await server.listenUnix(sock);
  process.once('SIGTERM', () => {
    void server.close().then(() => process.exit(0));
  });
}

if (values.serve) await serve(values.serve);
else await main();
