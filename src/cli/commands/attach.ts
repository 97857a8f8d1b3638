/**
 * `cryptmap attach [--via fuse|nbd|nbdfuse] NAME` prints the kernel block device the mapping now is:
 * nbd-client when the nbd module exists, else the daemon's own FUSE export + loop (root), else nbdfuse
 * + loop; `--via` forces one. `cryptmap detach NAME` undoes it.
 */
import { VIAS, type Via } from '../../control/protocol.js';
import { CryptmapError } from '../../util/errors.js';
import { withDaemon } from '../daemon-client.js';
import type { VerbMain } from '../types.js';
import { parseCommandLine } from '../options.js';

const attach: VerbMain = async (argv, io) => {
  const verb = argv[0];
  const { values, positionals } = parseCommandLine(argv);
  if (positionals.length !== 1) throw new CryptmapError('EARGS', `usage: cryptmap ${verb} NAME`);
  const name = positionals[0]!;
  if (verb === 'detach') {
    await withDaemon(values['runtime-dir'], io.env, (c) => c.call('detach', { name }));
    return 0;
  }
  const via = values.via ?? 'auto';
  if (via !== 'auto' && !VIAS.includes(via as Via))
    throw new CryptmapError('EARGS', `--via must be fuse, nbd or nbdfuse, not '${via}'`);
  const info = await withDaemon(values['runtime-dir'], io.env, (c) =>
    c.call('attach', { name, readOnly: values.readonly === true, via: via as Via | 'auto' }),
  );
  io.stdout.write(`${info.devicePath}\n`);
  return 0;
};
export default attach;
