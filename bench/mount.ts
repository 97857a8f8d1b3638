/**
 * The mounted path (issue 14, "Performance to reach"): what a service sees in its data directory, an
 * ext4 on the attached volume. In one run, on the same machine, with fio on ext4 (1 MiB sequential
 * write and read, direct, iodepth 8, a 512 MiB file; 4 KiB random reads, iodepth 32), page cache
 * dropped before reads:
 *   (a) kernel loop device over a tmpfs file, no encryption (the ceiling),
 *   (b) `cryptmap attach` of a LUKS1 aes-xts-plain64 volume over a tmpfs file, with each transport
 *       present (fuse: the daemon's FUSE export + loop; nbd: the kernel client; nbdfuse + loop), the
 *       daemon core in a child process,
 *   (c) nbdkit's luks filter through nbdfuse + loop (the peer path).
 * Each row is measured `--repeat` times, interleaved, and the median printed with the server's CPU
 * seconds per GiB moved (cryptmap's child; nbdkit + nbdfuse; `-` for the kernel) and the load average.
 * Ratios: cryptmap / kernel loop (targets 0.4 write and read, 0.3 IOPS), cryptmap / peer (target 2).
 * Not a test: figures depend on the machine and its load. Needs root.
 *
 * Usage: npm run bench:mount [-- --size-mib 512 --repeat 3 --fio-seconds 5 --via fuse,nbdfuse]
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { DaemonCore } from '../src/daemon/core.js';
import type { Via } from '../src/control/protocol.js';
import { bestVia, fuseUnavailable } from '../src/daemon/fuse-export.js';
import { CRYPTSETUP_FAST_LUKS1_FORMAT, cpuSeconds, loadavg, median, openLuksVolume, run } from './common.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
/** CPU seconds of all of `pids` (NaN if one is gone). */
const cpuOf = (pids: number[]): number => pids.reduce((s, p) => s + cpuSeconds(p), 0);

// ---------------------------------------------------------------- child: the cryptmap daemon core

async function child(dir: string, img: string, keyFile: string, via: Via): Promise<void> {
  const core = new DaemonCore({ nbdSocketPath: join(dir, `nbd-${via}.sock`), attachDir: join(dir, `attach-${via}`) });
  await openLuksVolume(core, 'vol', img, keyFile);
  await core.listen();
  const info = await core.attach('vol', { via });
  const stop = () => {
    void core.shutdown().then(() => process.exit(0));
  };
  process.on('SIGTERM', stop);
  process.stdout.write(`device ${info.devicePath}\n`);
}

// ---------------------------------------------------------------- parent

interface Row {
  name: string;
  device: string;
  pids: number[];
  teardown: () => Promise<void>;
}

async function waitLine(c: ChildProcess, re: RegExp, what: string): Promise<RegExpExecArray> {
  let out = '';
  return new Promise((resolve, reject) => {
    c.stdout?.on('data', (d: Buffer) => {
      out += d.toString();
      const m = re.exec(out);
      if (m) resolve(m);
    });
    c.once('exit', (code) => reject(new Error(`${what} exited ${code}: ${out}`)));
  });
}

async function main(): Promise<void> {
  if (process.getuid?.() !== 0) throw new Error('bench:mount needs root (losetup, mount)');
  const { values } = parseArgs({
    options: {
      'size-mib': { type: 'string', default: '512' },
      repeat: { type: 'string', default: '3' },
      'fio-seconds': { type: 'string', default: '5' },
      via: { type: 'string' },
    },
  });
  const fileMiB = Number(values['size-mib']);
  const repeat = Number(values.repeat);
  const fioSeconds = Number(values['fio-seconds']);
  const imgBytes = (fileMiB + 256) * 1048576; // room for ext4's metadata and journal
  const dir = mkdtempSync('/dev/shm/cryptmap-bench-mount-');
  const procs: ChildProcess[] = [];
  const rows: Row[] = [];
  const vias: Via[] = values.via
    ? (values.via.split(',') as Via[])
    : ([
        ...(existsSync('/sys/module/nbd') ? ['nbd'] : []),
        ...(fuseUnavailable() === undefined ? ['fuse'] : []),
        'nbdfuse',
      ] as Via[]);
  try {
    const keyFile = join(dir, 'key');
    const pass = Buffer.allocUnsafe(32);
    randomFillSync(pass);
    writeFileSync(keyFile, pass.toString('hex'), { mode: 0o600 });
    const plainImg = join(dir, 'plain.img');
    const cryptImg = join(dir, 'luks1.img');
    for (const f of [plainImg, cryptImg]) await run('truncate', ['-s', String(imgBytes), f]);
    await run('cryptsetup', [...CRYPTSETUP_FAST_LUKS1_FORMAT, '--key-file', keyFile, cryptImg]);

    // (a) kernel loop, no encryption.
    const loop = (await run('losetup', ['-f', '--show', plainImg])).trim();
    rows.push({
      name: 'kernel loop (tmpfs file, no encryption)',
      device: loop,
      pids: [],
      teardown: () => run('losetup', ['-d', loop]).then(() => undefined),
    });
    // (b) cryptmap attach, each transport: its own daemon core child over its own copy of the image
    // (the volumes are formatted alike; one copy each so no two mappings share a file).
    const self = fileURLToPath(import.meta.url);
    for (const via of vias) {
      const img = join(dir, `luks1-${via}.img`);
      await run('cp', ['--sparse=always', cryptImg, img]);
      const c = spawn(process.execPath, [...process.execArgv, self, '--child', dir, img, keyFile, via], {
        stdio: ['ignore', 'pipe', 'inherit'],
      });
      procs.push(c);
      const m = await waitLine(c, /device (\S+)\n/, `cryptmap (${via})`);
      rows.push({
        name: `cryptmap attach --via ${via}${via === bestVia() ? ' (default)' : ''}`,
        device: m[1]!,
        pids: [c.pid!],
        teardown: async () => {
          c.kill('SIGTERM');
          await new Promise((r) => c.once('exit', r));
        },
      });
    }
    // (c) nbdkit luks + nbdfuse + loop.
    const kitSock = join(dir, 'nbdkit.sock');
    const kit = spawn(
      'nbdkit',
      ['-f', '--exit-with-parent', '-U', kitSock, '--filter=luks', 'file', cryptImg, `passphrase=+${keyFile}`],
      { stdio: 'ignore' },
    );
    procs.push(kit);
    for (let i = 0; i < 400 && !existsSync(kitSock); i++) await sleep(25);
    const fmnt = join(dir, 'nbdfuse');
    mkdirSync(fmnt);
    const nf = spawn('nbdfuse', [join(fmnt, 'disk'), `nbd+unix:///?socket=${kitSock}`], { stdio: 'ignore' });
    procs.push(nf);
    for (let i = 0; i < 400 && !existsSync(join(fmnt, 'disk')); i++) await sleep(25);
    const peerLoop = (await run('losetup', ['-f', '--show', join(fmnt, 'disk')])).trim();
    rows.push({
      name: 'nbdkit luks + nbdfuse + loop (peer)',
      device: peerLoop,
      pids: [kit.pid!, nf.pid!],
      teardown: async () => {
        await run('losetup', ['-d', peerLoop]);
        await run('umount', [fmnt]).catch(() => undefined);
      },
    });

    const mnts = new Map<Row, string>();
    for (const [i, r] of rows.entries()) {
      await run('mkfs.ext4', ['-q', '-F', '-E', 'nodiscard', r.device]);
      const m = join(dir, `mnt${i}`);
      mkdirSync(m);
      await run('mount', [r.device, m]);
      mnts.set(r, m);
    }

    const GiB = 1073741824;
    const fio = async (args: string[]) => {
      const out = await run('fio', [...args, '--output-format=json']);
      return JSON.parse(out.slice(out.indexOf('{'))) as {
        jobs: { read: { bw_bytes: number; iops: number }; write: { bw_bytes: number } }[];
      };
    };
    const drop = () => run('sh', ['-c', 'sync; echo 3 > /proc/sys/vm/drop_caches']);
    const res = new Map<Row, { w: number[]; r: number[]; iops: number[]; wCpu: number[]; rCpu: number[] }>();
    for (const r of rows) res.set(r, { w: [], r: [], iops: [], wCpu: [], rCpu: [] });
    console.log(
      `cryptmap bench:mount: ext4 on each device, fio ${fileMiB} MiB file, 1 MiB sequential (direct, qd8), 4 KiB random read (qd32, ${fioSeconds} s); 1 MB = 10^6 bytes`,
    );
    console.log(
      `LUKS1 aes-xts-plain64 (512-bit key) images in /dev/shm; load average before: ${loadavg()} (cores: ${availableParallelism()})`,
    );
    for (let round = 1; round <= repeat; round++) {
      const line: string[] = [];
      for (const r of rows) {
        const x = res.get(r)!;
        const file = join(mnts.get(r)!, 'fio.dat');
        const base = [`--filename=${file}`, `--size=${fileMiB}M`, '--direct=1', '--ioengine=libaio'];
        const c0 = cpuOf(r.pids);
        const w = await fio(['--name=w', ...base, '--bs=1M', '--rw=write', '--iodepth=8', '--end_fsync=1']);
        const c1 = cpuOf(r.pids);
        await drop();
        const c2 = cpuOf(r.pids);
        const rd = await fio(['--name=r', ...base, '--bs=1M', '--rw=read', '--iodepth=8']);
        const c3 = cpuOf(r.pids);
        await drop();
        const rr = await fio([
          '--name=rr',
          ...base,
          '--bs=4k',
          '--rw=randread',
          '--iodepth=32',
          '--time_based',
          `--runtime=${fioSeconds}`,
          '--randseed=42',
        ]);
        const bytes = fileMiB * 1048576;
        x.w.push(w.jobs[0]!.write.bw_bytes / 1e6);
        x.r.push(rd.jobs[0]!.read.bw_bytes / 1e6);
        x.iops.push(rr.jobs[0]!.read.iops);
        x.wCpu.push(((c1 - c0) * GiB) / bytes);
        x.rCpu.push(((c3 - c2) * GiB) / bytes);
        line.push(`W ${x.w.at(-1)!.toFixed(0)} R ${x.r.at(-1)!.toFixed(0)} IOPS ${x.iops.at(-1)!.toFixed(0)}`);
      }
      console.log(`round ${round} (load ${loadavg()}): ${line.join(' | ')}`);
    }

    console.log(`\nmedian of ${repeat} runs:`);
    console.log(`${'path'.padEnd(44)} write MB/s  read MB/s  4k IOPS   server CPU-s/GiB (w, r)`);
    const med = new Map<Row, { w: number; r: number; iops: number }>();
    for (const r of rows) {
      const x = res.get(r)!;
      const m = { w: median(x.w), r: median(x.r), iops: median(x.iops) };
      med.set(r, m);
      const cpu = r.pids.length ? `${median(x.wCpu).toFixed(2)}, ${median(x.rCpu).toFixed(2)}` : '-';
      console.log(
        `${r.name.padEnd(44)} ${m.w.toFixed(0).padStart(10)} ${m.r.toFixed(0).padStart(10)} ${m.iops.toFixed(0).padStart(8)}   ${cpu}`,
      );
    }
    const verdict = (x: number, want: number) =>
      `${x.toFixed(2)} (target >= ${want}: ${x >= want ? 'met' : 'NOT met'})`;
    const ceil = med.get(rows[0]!)!;
    const peer = med.get(rows.at(-1)!)!;
    for (const r of rows.slice(1, -1)) {
      const m = med.get(r)!;
      console.log(`\n${r.name}:`);
      console.log(
        `  / kernel loop: write ${verdict(m.w / ceil.w, 0.4)}, read ${verdict(m.r / ceil.r, 0.4)}, 4k IOPS ${verdict(m.iops / ceil.iops, 0.3)}`,
      );
      console.log(
        `  / peer:        write ${verdict(m.w / peer.w, 2)}, read ${verdict(m.r / peer.r, 2)}, 4k IOPS ${verdict(m.iops / peer.iops, 2)}`,
      );
    }
    console.log(`load average after: ${loadavg()}`);
    for (const m of mnts.values()) await run('umount', [m]);
  } finally {
    for (const m of [...Array(rows.length).keys()].map((i) => join(dir, `mnt${i}`)))
      await run('umount', [m]).catch(() => undefined);
    for (const r of rows)
      await r.teardown().catch((e: unknown) => console.error(`teardown ${r.name}: ${(e as Error).message}`));
    for (const p of procs) if (p.exitCode === null) p.kill('SIGTERM');
    await sleep(300);
    rmSync(dir, { recursive: true, force: true });
  }
}

if (process.argv[2] === '--child') {
  const [, , , dir, img, keyFile, via] = process.argv;
  await child(dir!, img!, keyFile!, via as Via);
} else {
  await main();
}
