/**
 * Core dumps off for a process that holds keys (issue 11 item 8): prctl(PR_SET_DUMPABLE, 0) through
 * the native addon (native/dumpable.c). The kernel then writes no core file of the process (its
 * keyring, cipher schedules and passphrases), and other processes of the same uid that are not root
 * can no longer read /proc/PID/mem or ptrace it. Called at start by the daemon, the agent and keyd.
 */
import { logger } from './log.js';
import { loadNative } from './native.js';

/**
 * Turn core dumps off; true when PR_GET_DUMPABLE reads 0 afterwards. Without the addon nothing can
 * be done from Node: a warning names the fix (LimitCORE=0 / ulimit -c 0).
 * @example disableCoreDumps('daemon');
 */
export function disableCoreDumps(component: string): boolean {
  const log = logger(component);
  const addon = loadNative();
  try {
    if (addon && typeof addon.dumpable === 'function' && addon.dumpable(false) === false) {
      log.debug('core dumps off (PR_SET_DUMPABLE 0)');
      return true;
    }
  } catch (e) {
    log.warn('cannot turn core dumps off', { error: (e as Error).message });
    return false;
  }
  log.warn(
    'cannot turn core dumps off without the native addon (node scripts/build-native.mjs): run with LimitCORE=0 or ulimit -c 0',
  );
  return false;
}
