/**
 * `cryptmap reencrypt` (cryptsetup 2.6 reencrypt, offline LUKS2 volume-key rotation): a thin verb over
 * src/luks/reencrypt.ts. Without --init-only/--resume-only it initialises and runs in one go, or,
 * when the header is already in reencryption (begun by cryptmap or cryptsetup), resumes.
 * SIGINT stops after the current hotzone; the device stays resumable.
 */
import { initReencrypt, inReencryption, type Luks2Volume, type Resilience, runReencrypt, withDeviceLock } from '../../luks/index.js';
import type { SectorBytes } from '../../engine/types.js';
import type { BlockDevice } from '../../blockdev/types.js';
import { CryptmapError, EXIT_WRONG_PARAMS } from '../../util/errors.js';
import { withDaemon } from '../daemon-client.js';
import type { CliIO, VerbMain } from '../types.js';
import { closeQuietly, getPassphrase, headerPath, intOpt, keyslotOptions, loadLuks, needDevice, openDevice, parseLuksArgs } from './luks-common.js';

function bytesOpt(v: string | undefined, name: string): number | undefined {
  if (v === undefined) return undefined;
  const m = /^([0-9]+)([KMGT]?)(i?B)?$/i.exec(v);
  if (!m) throw new CryptmapError('EARGS', `Invalid ${name} value.`, { exitCode: EXIT_WRONG_PARAMS });
  const mult = { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 }[m[2]!.toUpperCase() as '' | 'K' | 'M' | 'G' | 'T'];
  const n = Number(m[1]) * mult;
  if (!Number.isSafeInteger(n) || n <= 0) throw new CryptmapError('EARGS', `Invalid ${name} value.`, { exitCode: EXIT_WRONG_PARAMS });
  return n;
}

/** True when the cryptmap daemon (if one runs) has a volume with this LUKS UUID open. */
async function activeInDaemon(io: CliIO, uuid: string): Promise<boolean> {
  try {
    return await withDaemon(undefined, io.env, async (c) => (await c.call('volume.list', {})).some((s) => s.active && s.mapping?.uuid === uuid));
  } catch {
    return false; // no daemon: nothing is active
  }
}

const main: VerbMain = async (argv: string[], io: CliIO) => {
  const { values: v, positionals } = parseLuksArgs(argv);
  const device = needDevice(positionals, 'cryptmap reencrypt [OPTION...] <device>');
  if (v['init-only'] && v['resume-only']) throw new CryptmapError('EARGS', 'Options --init-only and --resume-only cannot be combined.', { exitCode: EXIT_WRONG_PARAMS });
  const resilience = (v.resilience ?? 'checksum') as Resilience;
  if (!['checksum', 'journal', 'none'].includes(resilience)) {
    const what = ['datashift'].includes(v.resilience!) ? 'is not supported by cryptmap yet' : 'is invalid';
    throw new CryptmapError('EARGS', `Resilience mode ${v.resilience} ${what}.`, { exitCode: EXIT_WRONG_PARAMS });
  }
  for (const f of ['encrypt', 'decrypt', 'reduce-device-size'] as const) {
    if ((v as Record<string, unknown>)[f] !== undefined) throw new CryptmapError('EARGS', `--${f} is not supported by cryptmap yet.`, { exitCode: EXIT_WRONG_PARAMS });
  }
  const hotzoneBytes = bytesOpt(v['hotzone-size'], '--hotzone-size');
  const keyBits = intOpt(v['key-size'], '--key-size', 8, 4096);
  if (keyBits !== undefined && keyBits % 8 !== 0) throw new CryptmapError('EARGS', 'Key size must be a multiple of 8 bits', { exitCode: EXIT_WRONG_PARAMS });
  const sector = intOpt(v['sector-size'], '--sector-size', 512, 4096);
  if (sector !== undefined && ![512, 1024, 2048, 4096].includes(sector)) throw new CryptmapError('EARGS', 'Unsupported encryption sector size.', { exitCode: EXIT_WRONG_PARAMS });
  const hdr = headerPath(v, device);
  const dev = await openDevice(hdr, true);
  let dataDev: BlockDevice | undefined;
  const ac = new AbortController();
  const onInt = () => ac.abort();
  try {
    if (v.header) dataDev = await openDevice(device, true);
    return await withDeviceLock(hdr, async () => {
      const vol = await loadLuks(dev, hdr);
      if (vol.type !== 'luks2') throw new CryptmapError('EARGS', 'LUKS1 reencryption is not supported by cryptmap yet (convert it to LUKS2, or use cryptsetup).', { exitCode: EXIT_WRONG_PARAMS });
      const l2 = vol as Luks2Volume;
      // Online reencryption (through the daemon's mapping) is not there yet: never rewrite data under a live mapping.
      if (await activeInDaemon(io, l2.uuid)) throw new CryptmapError('EBUSY', `Device ${device} is active in the cryptmap daemon; online reencryption is not supported yet. Close it first.`, { exitCode: 5 });
      const running = inReencryption(l2.jsonSnapshot());
      if (v['resume-only'] && !running) throw new CryptmapError('EINVAL', `Device ${device} is not in reencryption.`, { exitCode: 1 });
      if (v['init-only'] && running) throw new CryptmapError('EBUSY', 'LUKS2 reencryption already initialized. Aborting operation.', { exitCode: 1 });
      const pass = await getPassphrase(io, `Enter passphrase for ${device}: `, {
        keyFile: v['key-file'],
        keyfileOffset: intOpt(v['keyfile-offset'], '--keyfile-offset'),
        keyfileSize: intOpt(v['keyfile-size'], '--keyfile-size'),
      });
      try {
        if (!running) {
          const ko = keyslotOptions(v, 'luks2');
          const oldKeySlot = ko.keySlot;
          delete ko.keySlot;
          await initReencrypt(l2, pass, {
            ...ko,
            ...(oldKeySlot !== undefined ? { oldKeySlot } : {}),
            resilience,
            ...(v['resilience-hash'] ? { resilienceHash: v['resilience-hash'] } : {}),
            ...(v.cipher ? { cipher: v.cipher } : {}),
            ...(keyBits !== undefined ? { keyBytes: keyBits / 8 } : {}),
            ...(sector !== undefined ? { sectorBytes: sector as SectorBytes } : {}),
          });
          if (v['init-only']) return 0;
        }
        process.on('SIGINT', onInt);
        const done = await runReencrypt(l2, pass, { ...(dataDev ? { dataDev } : {}), ...(hotzoneBytes !== undefined ? { hotzoneBytes } : {}), signal: ac.signal });
        if (!done) io.stderr.write('Reencryption interrupted; run cryptmap reencrypt --resume-only (or cryptsetup) to continue.\n');
        return 0;
      } finally {
        pass.fill(0);
      }
    });
  } finally {
    process.off('SIGINT', onInt);
    await closeQuietly(dataDev);
    await closeQuietly(dev);
  }
};

export default main;
