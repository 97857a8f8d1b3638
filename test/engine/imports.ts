/** One import point for the engine tests. */
export { createSectorCipher, defaultBackend, parseCipherSpec, setCryptThreads } from '../../src/engine/index.js';
export { isCryptmapError } from '../../src/util/errors.js';
