/**
 * `cryptmap status NAME` (cryptsetup status): cryptsetup's fields, plus where the mapping is
 * served (NBD URI) and attached. Exit 0 when active, 4 when inactive (as cryptsetup).
 */
import { parseArgs } from 'node:util';
import type { VolumeStatus } from '../../daemon/core.js';
import { CryptmapError, EXIT_WRONG_DEVICE } from '../../util/errors.js';
import { withDaemon } from '../daemon-client.js';
import type { VerbMain } from '../types.js';

export function formatStatus(s: VolumeStatus): string {
  if (!s.active) return `/dev/mapper/${s.name} is inactive.\n`;
  let out = `/dev/mapper/${s.name} is active${s.openCount > 1 ? ' and is in use' : ''}.\n`;
  const m = s.mapping;
  if (m) {
    out += `  type:    ${m.type}\n`;
    out += `  cipher:  ${m.cipher}\n`;
    out += `  keysize: ${m.keyBytes * 8} bits\n`;
    out += `  key location: keyring\n`;
    out += `  device:  ${m.device}\n`;
    if (m.header) out += `  header:  ${m.header}\n`;
    out += `  sector size:  ${m.sectorBytes}\n`;
    out += `  offset:  ${m.offsetSectors} sectors\n`;
    if (m.ivOffsetSectors !== '0') out += `  skipped: ${m.ivOffsetSectors} sectors\n`;
    out += `  size:    ${m.sizeSectors} sectors\n`;
    // cryptsetup 2.6 action_status: a suspended device says so on its mode line.
    out += `  mode:    ${m.readOnly ? 'readonly' : 'read/write'}${s.suspended ? ' (suspended)' : ''}\n`;
    // cryptsetup 2.6 action_status: the activation flags, each followed by a space but the last.
    const flags = `${m.allowDiscards ? 'discards ' : ''}${m.sameCpuCrypt ? 'same_cpu_crypt ' : ''}${m.submitFromCryptCpus ? 'submit_from_crypt_cpus ' : ''}${m.noReadWorkqueue ? 'no_read_workqueue ' : ''}${m.noWriteWorkqueue ? 'no_write_workqueue' : ''}`;
    if (flags !== '') out += `  flags:   ${flags}\n`;
  } else if (s.suspended) out += `  (suspended)\n`;
  out += `  nbd:     ${s.nbdUri}\n`;
  if (s.attachedDevice) out += `  attached: ${s.attachedDevice}\n`;
  return out;
}

const status: VerbMain = async (argv, io) => {
  const { values, positionals } = parseArgs({
    args: argv.slice(1),
    options: { 'runtime-dir': { type: 'string' }, json: { type: 'boolean' } },
    allowPositionals: true,
  });
  if (positionals.length !== 1) throw new CryptmapError('EARGS', 'Command requires device name as argument.');
  const s = await withDaemon(values['runtime-dir'], io.env, (c) => c.call<VolumeStatus>('volume.status', { name: positionals[0] }));
  io.stdout.write(values.json ? JSON.stringify(s, null, 2) + '\n' : formatStatus(s));
  return s.active ? 0 : EXIT_WRONG_DEVICE;
};
export default status;
