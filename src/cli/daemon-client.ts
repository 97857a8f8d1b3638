/**
 * CLI side of the daemon: find the runtime dir and talk to the daemon over its control socket. Every
 * verb that uses a running daemon goes through here (the verbs that start one use control/ directly).
 */
import { ControlClient } from '../control/client.js';
import { runtimeDir } from '../control/runtime-dir.js';

/** Connect to the daemon: `--runtime-dir` wins over CRYPTMAP_RUNTIME_DIR over /run/cryptmap. The caller closes. */
export function connectDaemon(dirFlag: string | undefined, env: NodeJS.ProcessEnv): Promise<ControlClient> {
  return ControlClient.connect(runtimeDir(dirFlag, env));
}

/**
 * The way a verb reaches the daemon: connect, run `fn` (typed calls, control/protocol.ts), close.
 *
 * @example
 *   const st = await withDaemon(values['runtime-dir'], io.env, (c) => c.call('volume.status', { name }));
 */
export async function withDaemon<T>(dirFlag: string | undefined, env: NodeJS.ProcessEnv, fn: (c: ControlClient) => Promise<T>): Promise<T> {
  const c = await connectDaemon(dirFlag, env);
  try {
    return await fn(c);
  } finally {
    c.close();
  }
}
