/**
 * `cryptmap attach NAME` prints the kernel block device the mapping now is (nbd-client when the
 * nbd module exists, else nbdfuse + loop); `cryptmap detach NAME` undoes it.
 */
import { parseArgs } from 'node:util';
import type { AttachInfo } from '../../nbd/attach.js';
import { CryptmapError } from '../../util/errors.js';
import { withDaemon } from '../daemon-client.js';
import type { VerbMain } from '../types.js';

const attach: VerbMain = async (argv, io) => {
  const verb = argv[0];
  const { values, positionals } = parseArgs({
    args: argv.slice(1),
    options: { 'runtime-dir': { type: 'string' }, readonly: { type: 'boolean', short: 'r' } },
    allowPositionals: true,
  });
  if (positionals.length !== 1) throw new CryptmapError('EARGS', `usage: cryptmap ${verb} NAME`);
  const name = positionals[0]!;
  if (verb === 'detach') {
    await withDaemon(values['runtime-dir'], io.env, (c) => c.call('detach', { name }));
    return 0;
  }
  const info = await withDaemon(values['runtime-dir'], io.env, (c) => c.call<AttachInfo>('attach', { name, readOnly: values.readonly === true }));
  io.stdout.write(`${info.devicePath}\n`);
  return 0;
};
export default attach;
