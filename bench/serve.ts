/**
 * Serving a LUKS volume over NBD (issue 5, "Performance"): on a 1 GiB LUKS1 aes-xts-plain64 image in
 * tmpfs, sequential write and read with nbdcopy and random 4 KiB reads with fio (ioengine=nbd,
 * iodepth=32) through
 *   (a) cryptmap: the daemon core (src/daemon/core.ts) in a child process serving the volume,
 *   (b) nbdkit file --filter=luks,
 *   (c) qemu-nbd with driver=luks,
 *   (d) cryptmap serving the same bytes without encryption (a linear table over the image),
 *   (e) cryptmap as (a) with the mapped device's I/O accounting on (what `--metrics` turns on),
 * all in one run on the same machine, each measurement repeated and the median used. Prints MB/s,
 * IOPS and the ratios the issue asks for:
 *   cryptmap >= 1.5 x the faster of nbdkit/qemu-nbd (write and read),
 *   cryptmap crypt >= 0.85 x cryptmap plain,
 *   random 4 KiB reads >= the faster peer,
 *   metrics on / off >= 0.98 (write, read, random reads).
 * Not a test: numbers depend on the machine and its load (shown with `uptime`).
 *
 * Usage: npm run bench:serve [-- --size-mib 1024 --repeat 3 --fio-seconds 5]
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { closeSync, existsSync, mkdtempSync, openSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { availableParallelism, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { DaemonCore } from '../src/daemon/core.js';
import { nbdUnixUri } from '../src/nbd-wire/uri.js';
import {
  CRYPTSETUP_FAST_LUKS1_FORMAT,
  cpuSeconds,
  fioRandRead,
  loadavg,
  median,
  openLuksVolume,
  run,
  waitFor,
} from './common.js';

const PASSPHRASE_BYTES = 32;

// ---------------------------------------------------------------- child: the cryptmap daemon core

/** Child mode: serve the LUKS volume as `crypt` and the same bytes unencrypted as `plain`. */
async function child(sock: string, img: string, keyFile: string, attachDir: string): Promise<void> {
  const core = new DaemonCore({ nbdSocketPath: sock, attachDir });
  const mapping = await openLuksVolume(core, 'crypt', img, keyFile);
  // The same volume again with the I/O accounting on (a second mapping of the image: the bench
  // writes the same source through both).
  await openLuksVolume(core, 'crypt-metrics', img, keyFile);
  core.registry.get('crypt-metrics').enableIoStats();
  await core.dm().create('plain', { table: `0 ${mapping.sizeSectors} linear ${img} ${mapping.offsetSectors}` });
  await core.listen();
  const stop = () => {
    void core.shutdown().then(() => process.exit(0));
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  process.stdout.write('ready\n');
}

// ---------------------------------------------------------------- parent

interface Server {
  name: string;
  uri: string;
  proc: ChildProcess;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      'size-mib': { type: 'string', default: '1024' },
      repeat: { type: 'string', default: '3' },
      'fio-seconds': { type: 'string', default: '5' },
      only: { type: 'string' },
    },
  });
  const sizeBytes = Number(values['size-mib']) * 1048576;
  const repeat = Number(values.repeat);
  const fioSeconds = Number(values['fio-seconds']);
  const shm = existsSync('/dev/shm') ? '/dev/shm' : tmpdir();
  const dir = mkdtempSync(join(shm, 'cryptmap-bench-serve-'));
  const procs: ChildProcess[] = [];
  try {
    const img = join(dir, 'luks1.img');
    const keyFile = join(dir, 'key');
    const src = join(dir, 'src.img');
    const pass = Buffer.allocUnsafe(PASSPHRASE_BYTES);
    randomFillSync(pass);
    writeFileSync(keyFile, pass.toString('hex'), { mode: 0o600 });
    pass.fill(0);

    // Image: random bytes everywhere (no holes that one server could answer cheaply), then a LUKS1
    // header with a cheap KDF. The payload is 1 GiB, the header comes on top.
    const headerBytes = 2 << 20;
    const chunk = Buffer.allocUnsafe(16 << 20);
    for (const [path, n] of [
      [img, sizeBytes + headerBytes],
      [src, sizeBytes],
    ] as const) {
      const fd = openSync(path, 'w', 0o600);
      for (let done = 0; done < n; done += chunk.length) {
        randomFillSync(chunk);
        writeSync(fd, chunk, 0, Math.min(chunk.length, n - done));
      }
      closeSync(fd);
    }
    await run('cryptsetup', [...CRYPTSETUP_FAST_LUKS1_FORMAT, '--key-file', keyFile, img], 'cryptsetup-bin');
    const dump = await run('cryptsetup', ['luksDump', img], 'cryptsetup-bin');
    const payloadSectors = Number(/Payload offset:\s*(\d+)/.exec(dump)?.[1]);
    if (!Number.isFinite(payloadSectors)) throw new Error('cannot read the payload offset from luksDump');

    // (a) + (d): the daemon core in a child process.
    const cmSock = join(dir, 'cryptmap.sock');
    const self = fileURLToPath(import.meta.url);
    const cm = spawn(
      process.execPath,
      [...process.execArgv, self, '--child', cmSock, img, keyFile, join(dir, 'attach')],
      {
        stdio: ['ignore', 'pipe', 'inherit'],
      },
    );
    procs.push(cm);
    await waitFor(cmSock, cm, 'cryptmap');
    // (b) nbdkit
    const kitSock = join(dir, 'nbdkit.sock');
    const kit = spawn(
      'nbdkit',
      ['-f', '--exit-with-parent', '-U', kitSock, '--filter=luks', 'file', img, `passphrase=+${keyFile}`],
      { stdio: 'ignore' },
    );
    kit.on('error', (e) => console.error(`nbdkit: ${e.message} (install the Debian package nbdkit)`));
    procs.push(kit);
    await waitFor(kitSock, kit, 'nbdkit');
    // (c) qemu-nbd
    const qSock = join(dir, 'qemu.sock');
    const q = spawn(
      'qemu-nbd',
      [
        '-t',
        '--shared=16',
        '-k',
        qSock,
        '--object',
        `secret,id=s0,file=${keyFile}`,
        '--image-opts',
        `driver=luks,key-secret=s0,file.filename=${img}`,
      ],
      { stdio: 'ignore' },
    );
    q.on('error', (e) => console.error(`qemu-nbd: ${e.message} (install the Debian package qemu-utils)`));
    procs.push(q);
    await waitFor(qSock, q, 'qemu-nbd');

    const servers: Server[] = [
      { name: 'cryptmap', uri: nbdUnixUri('crypt', cmSock), proc: cm },
      { name: 'nbdkit', uri: `nbd+unix:///?socket=${kitSock}`, proc: kit },
      { name: 'qemu-nbd', uri: `nbd+unix:///?socket=${qSock}`, proc: q },
      { name: 'cryptmap-plain', uri: nbdUnixUri('plain', cmSock), proc: cm },
      { name: 'cryptmap-metrics', uri: nbdUnixUri('crypt-metrics', cmSock), proc: cm },
    ].filter((s) => values.only === undefined || values.only.split(',').includes(s.name));

    // Every export must show the same plaintext size.
    for (const s of servers) {
      const n = Number((await run('nbdinfo', ['--size', s.uri], 'libnbd-bin')).trim());
      if (s.name !== 'cryptmap-plain' && n !== sizeBytes)
        throw new Error(`${s.name} serves ${n} bytes, expected ${sizeBytes}`);
    }

    const mbps = (secs: number) => sizeBytes / 1e6 / secs;
    /** MB/s of one nbdcopy and the server's CPU seconds per GiB moved (steadier than MB/s under load). */
    const timed = async (args: string[], pid: number | undefined) => {
      const c0 = cpuSeconds(pid);
      const t0 = process.hrtime.bigint();
      await run('nbdcopy', args, 'libnbd-bin');
      const secs = Number(process.hrtime.bigint() - t0) / 1e9;
      return { mbps: mbps(secs), cpu: ((cpuSeconds(pid) - c0) * 1073741824) / sizeBytes };
    };
    const res = new Map<string, { w: number[]; r: number[]; iops: number[]; wCpu: number[]; rCpu: number[] }>();
    for (const s of servers) res.set(s.name, { w: [], r: [], iops: [], wCpu: [], rCpu: [] });
    console.log(
      `cryptmap bench:serve: ${sizeBytes / 1048576} MiB LUKS1 aes-xts-plain64 (512-bit key) in ${shm}; nbdcopy default settings; 1 MB = 10^6 bytes`,
    );
    console.log(`load average before: ${loadavg()} (cores: ${availableParallelism()})`);
    // One untimed pass per server first: JIT, buffer pools, thread pools and page cache warm up.
    for (const s of servers) {
      await run('nbdcopy', [src, s.uri], 'libnbd-bin');
      await run('nbdcopy', [s.uri, 'null:'], 'libnbd-bin');
    }
    for (let r = 1; r <= repeat; r++) {
      const line: string[] = [];
      // Interleaved so that load changes hit every server alike.
      for (const s of servers) {
        const x = res.get(s.name)!;
        const w = await timed([src, s.uri], s.proc.pid);
        const rd = await timed([s.uri, 'null:'], s.proc.pid);
        x.w.push(w.mbps);
        x.wCpu.push(w.cpu);
        x.r.push(rd.mbps);
        x.rCpu.push(rd.cpu);
        if (s.name !== 'cryptmap-plain') x.iops.push(await fioRandRead(s.uri, sizeBytes, fioSeconds));
        line.push(
          `${s.name} W ${x.w.at(-1)!.toFixed(0)} R ${x.r.at(-1)!.toFixed(0)}${x.iops.length ? ` IOPS ${x.iops.at(-1)!.toFixed(0)}` : ''}`,
        );
      }
      console.log(`round ${r} (load ${loadavg()}): ${line.join(' | ')}`);
    }

    console.log('\nmedian of', repeat, 'runs:');
    console.log('server           write MB/s   read MB/s   4k randread IOPS (qd32)   server CPU-s/GiB write, read');
    const med = new Map<string, { w: number; r: number; iops: number }>();
    for (const s of servers) {
      const x = res.get(s.name)!;
      const m = {
        w: median(x.w),
        r: median(x.r),
        iops: x.iops.length ? median(x.iops) : Number.NaN,
        wCpu: median(x.wCpu),
        rCpu: median(x.rCpu),
      };
      med.set(s.name, m);
      console.log(
        `${s.name.padEnd(16)} ${m.w.toFixed(0).padStart(10)} ${m.r.toFixed(0).padStart(11)} ${Number.isNaN(m.iops) ? '-'.padStart(18) : m.iops.toFixed(0).padStart(18)}   ${m.wCpu.toFixed(2).padStart(10)}, ${m.rCpu.toFixed(2)}`,
      );
    }
    const a = med.get('cryptmap');
    const b = med.get('nbdkit');
    const c = med.get('qemu-nbd');
    const d = med.get('cryptmap-plain');
    const verdict = (x: number, want: number) =>
      `${x.toFixed(2)} (target >= ${want}: ${x >= want ? 'met' : 'NOT met'})`;
    if (a && b && c) {
      console.log(`\ncryptmap / faster peer, write: ${verdict(a.w / Math.max(b.w, c.w), 1.5)}`);
      console.log(`cryptmap / faster peer, read:  ${verdict(a.r / Math.max(b.r, c.r), 1.5)}`);
      console.log(`cryptmap / faster peer, 4k random read IOPS: ${verdict(a.iops / Math.max(b.iops, c.iops), 1)}`);
    }
    if (a && d) {
      console.log(`cryptmap crypt / plain, write: ${verdict(a.w / d.w, 0.85)}`);
      console.log(`cryptmap crypt / plain, read:  ${verdict(a.r / d.r, 0.85)}`);
    }
    const e = med.get('cryptmap-metrics');
    if (a && e) {
      console.log(`cryptmap metrics on / off, write: ${verdict(e.w / a.w, 0.98)}`);
      console.log(`cryptmap metrics on / off, read:  ${verdict(e.r / a.r, 0.98)}`);
      console.log(`cryptmap metrics on / off, 4k random read IOPS: ${verdict(e.iops / a.iops, 0.98)}`);
    }
    console.log(`load average after: ${loadavg()}`);
  } finally {
    for (const p of procs) if (p.exitCode === null) p.kill('SIGTERM');
    await new Promise((r) => setTimeout(r, 300));
    rmSync(dir, { recursive: true, force: true });
  }
}

if (process.argv[2] === '--child') {
  const [, , , sock, img, keyFile, attachDir] = process.argv;
  await child(sock!, img!, keyFile!, attachDir!);
} else {
  await main();
}
