import type { VerbMain } from '../types.js';

// Placeholder until the sector engine lands (issue 2).
const benchmark: VerbMain = async (_argv, io) => {
  io.stdout.write('cryptmap benchmark: the sector engine is not built yet.\n');
  return 0;
};
export default benchmark;
