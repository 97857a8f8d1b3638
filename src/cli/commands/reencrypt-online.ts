/**
 * `cryptmap reencrypt` of a volume the daemon has open (cryptsetup's online reencryption, encryption
 * and decryption): this process initialises the header (as offline) and unlocks the old and the new
 * volume key with the passphrase (one of them when a side is plaintext); the keys go to the daemon once, as raw bytes over the 0600 control socket
 * (`volume.reencrypt`, wiped here after), and the daemon rewrites the data while its clients keep
 * working (daemon/reencrypt-online.ts). This process shows the daemon's progress until it ends;
 * SIGINT asks the daemon to stop after the current hotzone (resumable, online or offline).
 */
import type { ControlClient } from '../../control/client.js';
import type { VolumeStatus } from '../../control/protocol.js';
import { type Luks2Volume, unlockReencryptKeys } from '../../luks/index.js';
import { CryptmapError } from '../../util/errors.js';
import { connectDaemon } from '../daemon-client.js';
import type { CliIO } from '../types.js';
import { type LuksArgs, progressFromOptions } from './luks-common.js';

const POLL_MS = 200;

/** The active volume `name` in the daemon, if the daemon runs and has it (`reencrypt NAME`). */
export async function activeByName(
  io: CliIO,
  dirFlag: string | undefined,
  name: string,
): Promise<VolumeStatus | undefined> {
  let c: ControlClient;
  try {
    c = await connectDaemon(dirFlag, io.env);
  } catch {
    return undefined;
  }
  try {
    const st = await c.call('volume.status', { name });
    return st.active && st.mapping ? st : undefined;
  } finally {
    c.close();
  }
}

/**
 * Hand the keys of the reencryption `vol` is in (initialised by the caller) to the daemon, which
 * runs it on active volume `name`; show its progress until it ends. Exit 0 when finished or stopped
 * by SIGINT (resumable), an error when it failed.
 */
export async function runOnline(
  io: CliIO,
  v: LuksArgs,
  device: string,
  name: string,
  vol: Luks2Volume,
  pass: Uint8Array,
  hotzoneBytes: number | undefined,
): Promise<number> {
  const keys = await unlockReencryptKeys(vol, pass);
  const c = await connectDaemon(v['runtime-dir'], io.env);
  const ac = new AbortController();
  const onInt = () => ac.abort();
  try {
    try {
      await c.call(
        'volume.reencrypt',
        { name, ...(hotzoneBytes !== undefined ? { hotzoneBytes } : {}) },
        {
          ...(keys.oldKey ? { key: keys.oldKey } : {}),
          ...(keys.newKey ? { newKey: keys.newKey } : {}),
        },
      );
    } finally {
      keys.oldKey?.fill(0);
      keys.newKey?.fill(0);
    }
    const progress = progressFromOptions(io, device, v);
    process.on('SIGINT', onInt);
    let stopAsked = false;
    for (;;) {
      if (ac.signal.aborted && !stopAsked) {
        stopAsked = true;
        // Resolves once stopped; the status below then says so.
        await c.call('volume.reencryptStop', { name });
      }
      const r = (await c.call('volume.status', { name })).reencrypt;
      if (r === undefined)
        throw new CryptmapError('EREENCRYPT', `The daemon lost track of the reencryption of ${name}.`, {
          exitCode: 1,
        });
      progress.update(r.totalBytes, r.doneBytes);
      if (r.state === 'finished') return 0;
      if (r.state === 'stopped') {
        progress.interrupted();
        io.stderr.write(
          '\nReencryption interrupted.\nRun cryptmap reencrypt --resume-only (or cryptsetup) to continue.\n',
        );
        return 0;
      }
      if (r.state === 'failed')
        throw new CryptmapError('EREENCRYPT', `Online reencryption of ${name} failed: ${r.error ?? 'unknown error'}`, {
          exitCode: 1,
        });
      await new Promise((res) => setTimeout(res, POLL_MS));
    }
  } finally {
    process.off('SIGINT', onInt);
    c.close();
  }
}
