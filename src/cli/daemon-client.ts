/** CLI side of the daemon: find the runtime dir and talk to the daemon over its control socket. */
import { ControlClient } from '../control/client.js';
import { runtimeDir } from '../control/runtime-dir.js';

/** Connect, run `fn`, close. `--runtime-dir` wins over CRYPTMAP_RUNTIME_DIR over /run/cryptmap. */
export async function withDaemon<T>(dirFlag: string | undefined, env: NodeJS.ProcessEnv, fn: (c: ControlClient) => Promise<T>): Promise<T> {
  const c = await ControlClient.connect(runtimeDir(dirFlag, env));
  try {
    return await fn(c);
  } finally {
    c.close();
  }
}
