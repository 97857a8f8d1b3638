/**
 * The backends every engine test runs over. The native addon is part of the build (npm ci runs
 * scripts/build-native.mjs); a missing addon fails the native variants with a message saying how to
 * build it rather than skipping them.
 */
import type { BackendName } from '../../src/engine/index.js';

export const TEST_BACKENDS: readonly BackendName[] = ['js', 'native'];
