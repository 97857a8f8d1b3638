/** `cryptmap close NAME` (cryptsetup close): remove the mapping in the daemon (detaching it first). */
import { CryptmapError } from '../../util/errors.js';
import { withDaemon } from '../daemon-client.js';
import type { VerbMain } from '../types.js';
import { parseCommandLine } from '../options.js';

const close: VerbMain = async (argv, io) => {
  const { values, positionals } = parseCommandLine(argv);
  if (positionals.length !== 1) throw new CryptmapError('EARGS', 'Command requires device name as argument.');
  const name = positionals[0]!;
  await withDaemon(values['runtime-dir'], io.env, (c) =>
    c.call('volume.close', { name, force: values.force === true }),
  );
  return 0;
};
export default close;
