/**
 * Volumes on remote storage (issue 15, "Performance to reach"): an `nbdkit memory` export filled with
 * random bytes, read and written sequentially, in one run:
 *   (peer)   nbdcopy straight to and from the export (4 connections, 64 requests of 256 KiB each),
 *   (client) cryptmap's NBD client (blockdev/nbd-client) in this process, 256 KiB requests, 64 in
 *            flight over its connections: the client alone,
 *   (crypt)  a LUKS2 aes-xts-plain64 volume whose ciphertext is on the export, served by the cryptmap
 *            daemon core (a child process) through its NBD client; nbdcopy against cryptmap's export.
 * Prints MB/s (median of --repeat runs) and the ratios to the peer; the target is crypt >= 0.8 x
 * nbdcopy in both directions. Not a test: numbers depend on the machine and its load (shown).
 *
 * (b) the same against Ceph RBD (scripts/ceph-mini.sh, an image exported by qemu-nbd), nbdcopy straight
 * to an RBD image against cryptmap's LUKS2 volume on another image (`--no-ceph` leaves it out).
 *
 * Usage: npm run bench:remote [-- --size-mib 512 --repeat 3 --connections 4 --ceph-size-mib 256 --no-ceph]
 * Also prints each process's CPU seconds per GiB moved (nbdcopy, the storage server, the cryptmap
 * child). BENCH_CHILD_NODE_FLAGS='--cpu-prof --cpu-prof-dir=DIR' profiles the cryptmap child.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { availableParallelism, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { NbdDevice } from '../src/blockdev/nbd-client/device.js';
import { DaemonCore } from '../src/daemon/core.js';
import { nbdUnixUri } from '../src/nbd-wire/uri.js';
import { cpuSeconds, loadavg, median, openLuksVolume, run, waitFor } from './common.js';

const CEPH_MINI = fileURLToPath(new URL('../../scripts/ceph-mini.sh', import.meta.url));
/** CPU seconds of this process's children that were waited for (nbdcopy runs, once they exited): cutime + cstime. */
const reapedCpu = () => {
  const f = readFileSync('/proc/self/stat', 'utf8');
  const t = f.slice(f.lastIndexOf(')') + 2).split(' ');
  return (Number(t[13]) + Number(t[14])) / 100;
};

// ---------------------------------------------------------------- child: the cryptmap daemon core

async function child(sock: string, remote: string, keyFile: string, attachDir: string): Promise<void> {
  const core = new DaemonCore({ nbdSocketPath: sock, attachDir });
  await openLuksVolume(core, 'crypt', remote, keyFile);
  await core.listen();
  const stop = () =>
    void core
      .shutdown()
      .catch(() => undefined)
      .finally(() => process.exit(0));
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  process.stdout.write('ready\n');
}

// ---------------------------------------------------------------- parent

/** Sequential pass over [0, size) with `depth` requests of `req` bytes in flight. */
async function clientPass(
  dev: NbdDevice,
  op: 'read' | 'write',
  sizeBytes: number,
  req: number,
  depth: number,
): Promise<number> {
  let next = 0;
  const t0 = process.hrtime.bigint();
  const worker = async () => {
    const buf = Buffer.allocUnsafe(req);
    if (op === 'write') randomFillSync(buf);
    for (;;) {
      const at = next;
      if (at >= sizeBytes) return;
      next += req;
      if (op === 'read') await dev.read(at, buf);
      else await dev.write(at, buf);
    }
  };
  await Promise.all(Array.from({ length: depth }, worker));
  if (op === 'write') await dev.flush();
  return sizeBytes / 1e6 / (Number(process.hrtime.bigint() - t0) / 1e9);
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      'size-mib': { type: 'string', default: '512' },
      repeat: { type: 'string', default: '3' },
      connections: { type: 'string', default: '4' },
      'no-ceph': { type: 'boolean', default: false },
      'ceph-size-mib': { type: 'string', default: '256' },
    },
  });
  const sizeBytes = Number(values['size-mib']) * 1048576;
  const repeat = Number(values.repeat);
  const conns = Number(values.connections);
  const shm = existsSync('/dev/shm') ? '/dev/shm' : tmpdir();
  const dir = mkdtempSync(join(shm, 'cryptmap-bench-remote-'));
  const procs: ChildProcess[] = [];
  try {
    const chunk = Buffer.allocUnsafe(16 << 20);
    const keyFile = join(dir, 'key');
    writeFileSync(keyFile, 'bench remote passphrase', { mode: 0o600 });

    /**
     * One nbdcopy pass: MB/s, and CPU seconds per GiB of nbdcopy, of the storage server `storagePid`
     * and of the cryptmap child `cmPid` (when given) during the pass.
     */
    const nbdcopyPass = async (args: string[], bytes: number, storagePid?: number, cmPid?: number) => {
      const c0 = [reapedCpu(), cpuSeconds(storagePid), cpuSeconds(cmPid)];
      const t0 = process.hrtime.bigint();
      await run('nbdcopy', args, 'libnbd-bin');
      const mbps = bytes / 1e6 / (Number(process.hrtime.bigint() - t0) / 1e9);
      const c1 = [reapedCpu(), cpuSeconds(storagePid), cpuSeconds(cmPid)];
      const perGiB = c1.map((c, i) => ((c - c0[i]!) * 1073741824) / bytes);
      return { mbps, copy: perGiB[0]!, storage: perGiB[1]!, cryptmap: perGiB[2]! };
    };
    const randomFile = (path: string, bytes: number) => {
      // Random bytes (holes would let nbdcopy skip work).
      const f = openSync(path, 'w', 0o600);
      for (let done = 0; done < bytes; done += chunk.length) {
        randomFillSync(chunk);
        writeSync(f, chunk, 0, Math.min(chunk.length, bytes - done));
      }
      closeSync(f);
    };
    /**
     * One storage: nbdcopy straight to `peerUri` (an export of exactly `bytes`) against nbdcopy to a
     * LUKS2 volume on `cryptExport` served by a cryptmap daemon core (a child) through its NBD client.
     */
    const storage = async (
      tag: string,
      cryptExport: string,
      peerUri: string,
      bytes: number,
      passes: number,
      pids: { peer?: number; storage?: number },
      extra?: (r: Record<string, number[]>, src: string) => Promise<void>,
    ) => {
      const srcN = join(dir, `${tag}-src.img`);
      randomFile(srcN, bytes);
      await run('nbdcopy', [srcN, cryptExport], 'libnbd-bin'); // no holes anywhere the passes touch
      await run('nbdcopy', [srcN, peerUri], 'libnbd-bin');
      await run(
        process.execPath,
        [
          fileURLToPath(new URL('../src/cli/entry.js', import.meta.url)),
          'luksFormat',
          '-q',
          '--type',
          'luks2',
          '--pbkdf',
          'pbkdf2',
          '--pbkdf-force-iterations',
          '1000',
          '--key-file',
          keyFile,
          cryptExport,
        ],
        'cryptmap',
      );
      const cmSock = join(dir, `${tag}-cryptmap.sock`);
      const cm = spawn(
        process.execPath,
        [
          ...process.execArgv,
          ...(process.env.BENCH_CHILD_NODE_FLAGS?.split(' ').filter((x) => x !== '') ?? []),
          fileURLToPath(import.meta.url),
          '--child',
          cmSock,
          cryptExport,
          keyFile,
          join(dir, `${tag}-attach`),
        ],
        { stdio: ['ignore', 'pipe', 'inherit'] },
      );
      procs.push(cm);
      await waitFor(cmSock, cm, 'cryptmap');
      const cryptUri = nbdUnixUri('crypt', cmSock);
      const cryptSize = Number((await run('nbdinfo', ['--size', cryptUri], 'libnbd-bin')).trim());
      if (cryptSize < bytes) throw new Error(`the volume has ${cryptSize} bytes, fewer than ${bytes}`);
      // nbdcopy moves the whole volume (a little more than `bytes`): MB/s are of its size.
      const cryptSrc = join(dir, `${tag}-crypt-src.img`);
      randomFile(cryptSrc, cryptSize);
      const r: Record<string, number[]> = { peerR: [], peerW: [], clientR: [], clientW: [], cryptR: [], cryptW: [] };
      const pass = async (key: string, args: string[], n: number, storagePid?: number, cmPid?: number) => {
        const p = await nbdcopyPass(args, n, storagePid, cmPid);
        for (const [k, v] of [
          [key, p.mbps],
          [`${key}.copy`, p.copy],
          [`${key}.storage`, p.storage],
          [`${key}.cryptmap`, p.cryptmap],
        ] as const)
          (r[k] ??= []).push(v);
      };
      for (let i = 0; i < passes; i++) {
        await pass('peerW', [srcN, peerUri], bytes, pids.peer);
        await pass('peerR', [peerUri, 'null:'], bytes, pids.peer);
        if (extra) await extra(r, srcN);
        await pass('cryptW', [cryptSrc, cryptUri], cryptSize, pids.storage, cm.pid);
        await pass('cryptR', [cryptUri, 'null:'], cryptSize, pids.storage, cm.pid);
      }
      const gone = new Promise((res) => cm.once('exit', res));
      cm.kill('SIGTERM');
      await Promise.race([gone, new Promise((res) => setTimeout(res, 10_000))]);
      rmSync(srcN, { force: true });
      rmSync(cryptSrc, { force: true });
      return Object.fromEntries(Object.entries(r).map(([k, v]) => [k, v.length ? median(v) : Number.NaN])) as Record<
        string,
        number
      >;
    };
    const f = (x: number) => x.toFixed(0).padStart(6);
    const q = (x: number) => x.toFixed(2);
    /** CPU seconds per GiB of each process in a pass (medians), as `nbdcopy a, storage b, cryptmap c`. */
    const cpuLine = (m: Record<string, number>, key: string) =>
      ['copy', 'storage', 'cryptmap']
        .map((c) => [c === 'copy' ? 'nbdcopy' : c, m[`${key}.${c}`]] as const)
        .filter(([, v]) => v !== undefined && !Number.isNaN(v))
        .map(([c, v]) => `${c} ${v!.toFixed(2)}`)
        .join(', ');
    const cpuTable = (m: Record<string, number>) => {
      console.log('CPU seconds per GiB moved (median), per process:');
      for (const [k, what] of [
        ['peerW', 'peer write'],
        ['peerR', 'peer read'],
        ['cryptW', 'crypt write'],
        ['cryptR', 'crypt read'],
      ] as const)
        console.log(`  ${what.padEnd(12)} ${cpuLine(m, k)}`);
      cpuCeiling(m);
    };
    /**
     * The limit the CPUs set, from the same run's figures. The crypt chain has three processes
     * (nbdcopy, cryptmap, the storage server) where the peer has two; with every CPU busy it moves at
     * most CPUs / (the sum of their CPU seconds per GiB). Printed: crypt's MB/s as a share of that
     * ceiling (how much time the chain loses waiting rather than computing), and the CPU seconds per
     * GiB cryptmap may spend at most for crypt to reach 0.8 x the peer on these CPUs, beside what one
     * socket hop costs the storage server itself (cryptmap makes two hops and runs the cipher).
     */
    const cpuCeiling = (m: Record<string, number>) => {
      const cpus = availableParallelism();
      for (const [k, peer, what] of [
        ['cryptW', 'peerW', 'write'],
        ['cryptR', 'peerR', 'read'],
      ] as const) {
        const copy = m[`${k}.copy`]!;
        const storage = m[`${k}.storage`]!;
        const cm = m[`${k}.cryptmap`]!;
        const sum = copy + storage + cm;
        if (![copy, storage, cm].every(Number.isFinite) || sum <= 0) continue;
        const ceilingMBps = (cpus / sum) * 1073.741824;
        const allowed = (cpus * 1073.741824) / (0.8 * m[peer]!) - copy - storage;
        console.log(
          `  crypt ${what.padEnd(5)} at ${q(m[k]! / ceilingMBps)} of the ${cpus}-CPU ceiling (${f(ceilingMBps).trim()} MB/s); ` +
            `0.8 x peer needs cryptmap <= ${q(allowed)} CPU-s/GiB here (it used ${q(cm)}; one hop costs the storage ${q(storage)})`,
        );
      }
    };

    // (a) nbdkit memory, large enough for the volume plus its LUKS2 header; the peer gets its own
    // export of exactly sizeBytes (nbdcopy copies a whole export).
    const kitSock = join(dir, 'nbdkit.sock');
    const kit = spawn('nbdkit', ['-f', '--exit-with-parent', '-U', kitSock, 'memory', String(sizeBytes + (32 << 20))], {
      stdio: 'ignore',
    });
    kit.on('error', (e) => console.error(`nbdkit: ${e.message} (install the Debian package nbdkit)`));
    procs.push(kit);
    await waitFor(kitSock, kit, 'nbdkit');
    const exportUri = `nbd+unix:///?socket=${kitSock}`;
    const peerSock = join(dir, 'peer.sock');
    const peer = spawn('nbdkit', ['-f', '--exit-with-parent', '-U', peerSock, 'memory', String(sizeBytes)], {
      stdio: 'ignore',
    });
    procs.push(peer);
    await waitFor(peerSock, peer, 'nbdkit');
    const peerUri = `nbd+unix:///?socket=${peerSock}`;
    let dev: NbdDevice | undefined;
    const m = await storage(
      'kit',
      exportUri,
      peerUri,
      sizeBytes,
      repeat,
      { peer: peer.pid, storage: kit.pid },
      async (r) => {
        // The client alone reads the export that holds the crypt volume.
        dev ??= await NbdDevice.open(exportUri, { connections: conns });
        r.clientR!.push(await clientPass(dev, 'read', sizeBytes, 256 << 10, 64));
      },
    );
    await dev?.close();
    // Client writes go to the peer's export (writing the crypt export would destroy the LUKS2 header).
    const wdev = await NbdDevice.open(peerUri, { connections: conns });
    const clientW: number[] = [];
    for (let i = 0; i < repeat; i++) clientW.push(await clientPass(wdev, 'write', sizeBytes, 256 << 10, 64));
    await wdev.close();
    m.clientW = median(clientW);
    console.log(
      `remote storage: nbdkit memory, ${sizeBytes >> 20} MiB, median of ${repeat}; load average ${loadavg()}`,
    );
    console.log('                               write MB/s   read MB/s');
    console.log(`nbdcopy -> export (peer)         ${f(m.peerW!)}      ${f(m.peerR!)}`);
    console.log(`cryptmap NBD client (${conns} conns)   ${f(m.clientW!)}      ${f(m.clientR!)}`);
    console.log(`nbdcopy -> cryptmap LUKS2 -> client ${f(m.cryptW!)}   ${f(m.cryptR!)}`);
    console.log(`ratio client / nbdcopy:  write ${q(m.clientW! / m.peerW!)}  read ${q(m.clientR! / m.peerR!)}`);
    console.log(
      `ratio crypt / nbdcopy:   write ${q(m.cryptW! / m.peerW!)}  read ${q(m.cryptR! / m.peerR!)}  (target 0.8)`,
    );
    cpuTable(m);

    // (b) Ceph RBD (scripts/ceph-mini.sh: one mon, one bluestore OSD on tmpfs, qemu-nbd's rbd driver).
    if (!values['no-ceph']) {
      const cephBytes = Number(values['ceph-size-mib']) * 1048576;
      const cephDir = mkdtempSync(join(shm, 'cm-bceph-'));
      const ceph = (args: string[]) =>
        run('bash', [CEPH_MINI, ...args], 'ceph-mon ceph-osd ceph-common qemu-block-extra');
      try {
        await ceph(['up', cephDir]);
        const cryptRbd = (await ceph(['export', cephDir, 'rbd/crypt', `${(cephBytes >> 20) + 32}M`])).trim();
        const peerRbd = (await ceph(['export', cephDir, 'rbd/peer', `${cephBytes >> 20}M`])).trim();
        const c = await storage('ceph', cryptRbd, peerRbd, cephBytes, repeat, {});
        console.log(
          `\nremote storage: Ceph RBD via qemu-nbd (1 OSD, bluestore on ${shm}), ${cephBytes >> 20} MiB, median of ${repeat}; load average ${loadavg()}`,
        );
        console.log('                               write MB/s   read MB/s');
        console.log(`nbdcopy -> RBD export (peer)     ${f(c.peerW!)}      ${f(c.peerR!)}`);
        console.log(`nbdcopy -> cryptmap LUKS2 -> client ${f(c.cryptW!)}   ${f(c.cryptR!)}`);
        console.log(`ratio crypt / nbdcopy:   write ${q(c.cryptW! / c.peerW!)}  read ${q(c.cryptR! / c.peerR!)}`);
        cpuTable(c);
      } catch (e) {
        console.log(`\nCeph RBD: not measured: ${(e as Error).message}`);
      } finally {
        await ceph(['down', cephDir]).catch(() => undefined);
        rmSync(cephDir, { recursive: true, force: true });
      }
    }
  } finally {
    // cryptmap first (it flushes to the storage), then the storage.
    for (const p of procs.reverse()) {
      if (p.exitCode !== null || p.signalCode !== null) continue;
      const gone = new Promise((r) => p.once('exit', r));
      p.kill('SIGTERM');
      await Promise.race([gone, new Promise((r) => setTimeout(r, 10_000))]);
    }
    rmSync(dir, { recursive: true, force: true });
  }
}

if (process.argv[2] === '--child') {
  await child(process.argv[3]!, process.argv[4]!, process.argv[5]!, process.argv[6]!);
} else {
  await main();
}
