/**
 * CLI side of the daemon: find the runtime dir and talk to the daemon over its control socket. Every
 * verb that uses a running daemon goes through here (the verbs that start one use control/ directly).
 */
import { ControlClient, type ControlClientOptions } from '../control/client.js';
import type { VolumeStatus } from '../control/protocol.js';
import { runtimeDir } from '../control/runtime-dir.js';
import { CryptmapError, isCryptmapError } from '../util/errors.js';

/** Connect to the daemon: `--runtime-dir` wins over CRYPTMAP_RUNTIME_DIR over /run/cryptmap. The caller closes. */
export function connectDaemon(
  dirFlag: string | undefined,
  env: NodeJS.ProcessEnv,
  opts: ControlClientOptions = {},
): Promise<ControlClient> {
  return ControlClient.connect(runtimeDir(dirFlag, env), opts);
}

/**
 * The way a verb reaches the daemon: connect, run `fn` (typed calls, control/protocol.ts), close.
 *
 * @example
 *   const st = await withDaemon(values['runtime-dir'], io.env, (c) => c.call('volume.status', { name }));
 */
export async function withDaemon<T>(
  dirFlag: string | undefined,
  env: NodeJS.ProcessEnv,
  fn: (c: ControlClient) => Promise<T>,
  opts: ControlClientOptions = {},
): Promise<T> {
  const c = await connectDaemon(dirFlag, env, opts);
  try {
    return await fn(c);
  } finally {
    c.close();
  }
}

/** How long openInDaemon waits for the daemon's volume list (it answers at once when it is well). */
export const OPEN_CHECK_TIMEOUT_MS = 15_000;

/**
 * Whether the daemon (found through CRYPTMAP_RUNTIME_DIR, else /run/cryptmap) has a volume with LUKS
 * UUID `uuid` open. No daemon running means nothing is open (false). Any other failure (permission,
 * an untrusted runtime dir or socket, a broken connection, no answer within `timeoutMs`) leaves the
 * answer unknown, so it is an error naming `action` ("reencrypt", "convert") rather than a guess
 * that the volume is closed.
 */
export async function openInDaemon(
  env: NodeJS.ProcessEnv,
  uuid: string,
  action: string,
  timeoutMs = OPEN_CHECK_TIMEOUT_MS,
): Promise<boolean> {
  return (await activeInDaemon(undefined, env, uuid, action, timeoutMs)) !== undefined;
}

/** `openInDaemon` with `--runtime-dir`, giving the daemon's status of that volume (its name, mapping). */
export async function activeInDaemon(
  dirFlag: string | undefined,
  env: NodeJS.ProcessEnv,
  uuid: string,
  action: string,
  timeoutMs = OPEN_CHECK_TIMEOUT_MS,
): Promise<VolumeStatus | undefined> {
  try {
    return await withDaemon(
      dirFlag,
      env,
      async (c) => (await c.call('volume.list', {})).find((s) => s.active && s.mapping?.uuid === uuid),
      { requestTimeoutMs: timeoutMs },
    );
  } catch (e) {
    if (isCryptmapError(e, 'EDAEMON_DOWN')) return undefined;
    const why = e instanceof Error ? e.message : String(e);
    throw new CryptmapError(
      'EDAEMON_CHECK',
      `Cannot ${action}: cannot tell whether the cryptmap daemon has the device open (${why}).`,
      {
        exitCode: isCryptmapError(e) ? e.exitCode : 1,
        cause: e,
      },
    );
  }
}
