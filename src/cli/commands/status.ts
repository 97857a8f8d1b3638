/**
 * `cryptmap status NAME` (cryptsetup status): cryptsetup's fields, plus where the mapping is
 * served (NBD URI) and attached. Exit 0 when active, 4 when inactive (as cryptsetup).
 */
import { statusFlagsLine } from '../../activate/flags.js';
import { keyLocation } from '../../activate/mapping.js';
import { loopBackingFile } from '../../blockdev/loop.js';
import type { VolumeStatus } from '../../control/protocol.js';
import { CryptmapError, EXIT_WRONG_DEVICE } from '../../util/errors.js';
import { withDaemon } from '../daemon-client.js';
import type { VerbMain } from '../types.js';
import { parseCommandLine } from '../options.js';
import { headerMissing } from './active-luks.js';

/**
 * cryptsetup's `loop:` line: the backing file of a loop device the mapping sits on. cryptmap maps a
 * regular file itself (no loop device between), so a file-backed mapping shows the file as its
 * `device:` and has no `loop:` line; one made on /dev/loopN names that device's file, as cryptsetup.
 */
function loopLine(device: string): string {
  const backing = device.startsWith('/dev/') ? loopBackingFile(device) : undefined;
  return backing !== undefined ? `  loop:    ${backing}\n` : '';
}

/** A crypt table line's words, at least the eight before the optional parameters. */
type CryptTableWords = [string, string, string, string, string, string, string, string, ...string[]];

/**
 * The fields cryptsetup prints for a dm-crypt device it did not make (`type: n/a`), read from the
 * live table line `<start> <len> crypt <cipher> <key> <iv_offset> <dev> <offset> [<#opts> <opts>...]`
 * (keys are never shown: a hex key is zeros here, a keyring reference names its size). Empty when the
 * table is not one crypt target.
 */
export function rawCryptFields(tableLine: string, readOnly: boolean): string {
  const w = tableLine.trim().split(/\s+/);
  if (w.length < 8 || w[2] !== 'crypt') return '';
  const [, len, , cipher, key, ivOffset, dev, offset, , ...opts] = w as CryptTableWords;
  const keyBits = key === '-' ? 0 : key.startsWith(':') ? Number(key.split(':')[1]) * 8 : key.length * 4;
  const sector = opts.find((o) => o.startsWith('sector_size:'))?.slice('sector_size:'.length) ?? '512';
  let out = '  type:    n/a\n';
  out += `  cipher:  ${cipher}\n`;
  out += `  keysize: ${keyBits} bits\n`;
  out += `  key location: ${key.startsWith(':') ? 'keyring' : 'dm-crypt'}\n`;
  out += `  device:  ${dev}\n`;
  out += loopLine(dev);
  out += `  sector size:  ${sector}\n`;
  out += `  offset:  ${offset} sectors\n`;
  out += `  size:    ${len} sectors\n`;
  if (ivOffset !== '0') out += `  skipped: ${ivOffset} sectors\n`;
  out += `  mode:    ${readOnly ? 'readonly' : 'read/write'}\n`;
  const flags = statusFlagsLine((f) => opts.includes(f.dm));
  if (flags !== '') out += `  flags:   ${flags}\n`;
  return out;
}

/**
 * `status` as cryptsetup prints it, plus cryptmap's `header:` (where the daemon found the LUKS header
 * at open) and where the volume is served. `headerMissing`: the volume has a detached header the
 * command line did not name (active-luks.ts headerMissing): cryptsetup cannot know its type, `n/a`.
 */
export function formatStatus(s: VolumeStatus, raw = '', headerMissing = false): string {
  // cryptsetup names the device as given when that is a path, else /dev/mapper/NAME.
  const shown = s.name.includes('/') ? s.name : `/dev/mapper/${s.name}`;
  if (!s.active) return `${shown} is inactive.\n`;
  let out = `${shown} is active${s.openCount > 1 ? ' and is in use' : ''}.\n`;
  const m = s.mapping;
  if (m) {
    out += `  type:    ${headerMissing ? 'n/a' : m.type}\n`;
    // cryptsetup 2.6 action_status: a LUKS2 header in reencryption (clean or crashed) says so right
    // after the type; the daemon knows it from the reencryption it opened or runs (not yet finished).
    if (!headerMissing && s.reencrypt && s.reencrypt.state !== 'finished') out += '  reencryption:  in-progress\n';
    out += `  cipher:  ${m.cipher}\n`;
    out += `  keysize: ${m.keyBytes * 8} bits\n`;
    out += `  key location: ${keyLocation(m)}\n`;
    out += `  device:  ${m.device}\n`;
    out += loopLine(m.device);
    if (m.header) out += `  header:  ${m.header}\n`;
    out += `  sector size:  ${m.sectorBytes}\n`;
    out += `  offset:  ${m.offsetSectors} sectors\n`;
    out += `  size:    ${m.sizeSectors} sectors\n`;
    if (m.ivOffsetSectors !== '0') out += `  skipped: ${m.ivOffsetSectors} sectors\n`;
    // cryptsetup 2.6 action_status: a suspended device says so on its mode line.
    out += `  mode:    ${m.readOnly ? 'readonly' : 'read/write'}${s.suspended ? ' (suspended)' : ''}\n`;
    // cryptsetup 2.6 action_status: the activation flags, each followed by a space but the last.
    const flags = statusFlagsLine((f) => m[f.field] === true);
    if (flags !== '') out += `  flags:   ${flags}\n`;
  } else {
    out += raw;
    if (s.suspended) out += `  (suspended)\n`;
  }
  out += `  nbd:     ${s.nbdUri}\n`;
  if (s.remote)
    out += `  remote:  ${s.remote.state}${s.remote.state !== 'ready' && s.remote.lastError ? ` (${s.remote.lastError})` : ''}\n`;
  const r = s.reencrypt;
  if (r) {
    const pct = r.totalBytes > 0 ? ((r.doneBytes / r.totalBytes) * 100).toFixed(1) : '0.0';
    out += `  reencryption: ${r.state} ${pct}% (${r.doneBytes} of ${r.totalBytes} bytes)${r.error ? `: ${r.error}` : ''}\n`;
  }
  if (s.attachedDevice) out += `  attached: ${s.attachedDevice}${s.attachedVia ? ` (via ${s.attachedVia})` : ''}\n`;
  return out;
}

const status: VerbMain = async (argv, io) => {
  const { values, positionals } = parseCommandLine(argv);
  if (positionals.length !== 1) throw new CryptmapError('EARGS', 'Command requires device name as argument.');
  const name = positionals[0]!;
  const { s, raw } = await withDaemon(values['runtime-dir'], io.env, async (c) => {
    const st = await c.call('volume.status', { name });
    // A device made with `cryptmap dm` rather than `open`: the fields come from its crypt table.
    if (!st.active || st.mapping || values.json) return { s: st, raw: '' };
    const lines = (await c.call('dm.table', { name }))[0]?.lines ?? [];
    const info = (await c.call('dm.info', { name }))[0];
    return { s: st, raw: lines.length === 1 ? rawCryptFields(lines[0]!, info?.readOnly ?? false) : '' };
  });
  io.stdout.write(
    values.json ? JSON.stringify(s, null, 2) + '\n' : formatStatus(s, raw, headerMissing(s.mapping, values.header)),
  );
  return s.active ? 0 : EXIT_WRONG_DEVICE;
};
export default status;
