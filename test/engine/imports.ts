/** One import point for the engine tests. */
export {
  createSectorCipher,
  cryptPoolStats,
  defaultBackend,
  parseCipherSpec,
  setCryptThreads,
} from '../../src/engine/index.js';
export { isCryptmapError } from '../../src/util/errors.js';
