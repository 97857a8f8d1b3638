/**
 * The key service a manifest names, as a KeyPort for the apply loop: `embedded` starts one in this
 * process with its root secret under AGENT_STATE_DIR/keyd (created on first start, kept across
 * restarts, so persistent volumes reopen); `unix:` and `https:` addresses connect to a `cryptmap keyd`.
 * Relative TLS and token file paths are resolved against the manifest's directory.
 */
import { isAbsolute, join, resolve } from 'node:path';
import { connectKeyService, type KeyClient } from '../keyservice/client.js';
import { startEmbeddedKeyService } from '../keyservice/embedded.js';
import type { KeyServiceRef } from './manifest.js';

export interface ManifestKeyService {
  keys: KeyClient;
  /** For the agent's log: `embedded (root secret at ...)` or the address. */
  describe: string;
  close(): Promise<void>;
}

export const EMBEDDED_KEYD_DIR = 'keyd';

export async function keyServiceForManifest(ref: KeyServiceRef, agentStateDir: string, manifestDir: string = process.cwd()): Promise<ManifestKeyService> {
  if (ref.address === 'embedded') {
    const e = await startEmbeddedKeyService(join(agentStateDir, EMBEDDED_KEYD_DIR));
    return { keys: e.client, describe: `embedded (root secret ${e.created ? 'created' : 'loaded'} at ${e.rootPath})`, close: () => e.close() };
  }
  const abs = (p: string | undefined) => (p === undefined ? undefined : isAbsolute(p) ? p : resolve(manifestDir, p));
  const keys = connectKeyService(ref.address, {
    tokenFile: abs(ref.tokenFile),
    tlsCert: abs(ref.tls?.cert),
    tlsKey: abs(ref.tls?.key),
    tlsCa: abs(ref.tls?.ca),
  });
  return { keys, describe: ref.address, close: () => keys.close() };
}
