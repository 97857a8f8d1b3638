/**
 * The key service a manifest names, as a KeyPort for the apply loop: `embedded` starts one in this
 * process with its root secret under AGENT_STATE_DIR/keyd (created on first start, kept across
 * restarts, so persistent volumes reopen); `unix:` and `https:` addresses connect to a `cryptmap keyd`.
 * Relative TLS and token file paths are resolved against the manifest's directory.
 */
import { isAbsolute, join, resolve } from 'node:path';
import { connectKeyService, type KeyClient } from '../keyservice/client.js';
import { startEmbeddedKeyService } from '../keyservice/embedded.js';
import { readPassphraseFile, ROOT_FILE } from '../keyservice/root-secret.js';
import type { KeyServiceRef } from './manifest.js';

export interface ManifestKeyService {
  keys: KeyClient;
  /** For the agent's log: `embedded (root secret at ...)` or the address. */
  describe: string;
  /** A warning to repeat at every start (the embedded default keeps the raw root secret beside the data). */
  warning?: string;
  /** The embedded service reads its root secret files again (a root rotation begun or committed); a keyd is asked by its own SIGHUP. */
  reloadRoots?(): Promise<void>;
  close(): Promise<void>;
}

export const EMBEDDED_KEYD_DIR = 'keyd';

/** The embedded default's warning: the raw root secret beside the ciphertext (docs/keyservice.md). */
export function rawRootWarning(rootPath: string, agentStateDir: string): string {
  return (
    `WARNING: the embedded key service keeps the raw root secret in ${rootPath}, inside the agent's state dir ${agentStateDir} next to the encrypted volumes: ` +
    'anyone who copies that directory (a backup, a stolen disk) can decrypt every persistent volume. ' +
    'Set keyService.passphraseFile (wrap it), keyService.rootSecretFile (keep it on another medium) or run cryptmap keyd (docs/keyservice.md).'
  );
}

/** The raw root secret file of the embedded default in an agent state dir, if there is one. */
export function embeddedRawRootPath(agentStateDir: string): string {
  return join(agentStateDir, EMBEDDED_KEYD_DIR, ROOT_FILE);
}

export async function keyServiceForManifest(
  ref: KeyServiceRef,
  agentStateDir: string,
  manifestDir: string = process.cwd(),
): Promise<ManifestKeyService> {
  const abs = (p: string | undefined) => (p === undefined ? undefined : isAbsolute(p) ? p : resolve(manifestDir, p));
  if (ref.address === 'embedded') {
    const passphraseFile = abs(ref.passphraseFile);
    const rootFile = abs(ref.rootSecretFile);
    const passphrase = passphraseFile === undefined ? undefined : readPassphraseFile(passphraseFile);
    let e: Awaited<ReturnType<typeof startEmbeddedKeyService>>;
    try {
      e = await startEmbeddedKeyService(join(agentStateDir, EMBEDDED_KEYD_DIR), {
        ...(passphrase ? { passphrase } : {}),
        ...(rootFile ? { rootFile } : {}),
      });
    } finally {
      passphrase?.dispose();
    }
    const how = e.wrapped ? 'wrapped' : 'raw';
    const out: ManifestKeyService = {
      keys: e.client,
      describe: `embedded (${how} root secret ${e.created ? 'created' : 'loaded'} at ${e.rootPath})`,
      close: () => e.close(),
      async reloadRoots() {
        const p = passphraseFile === undefined ? undefined : readPassphraseFile(passphraseFile);
        try {
          await e.reloadRoots(p);
        } finally {
          p?.dispose();
        }
      },
    };
    if (e.rawBesideData) out.warning = rawRootWarning(e.rootPath, agentStateDir);
    return out;
  }
  const keys = connectKeyService(ref.address, {
    tokenFile: abs(ref.tokenFile),
    tlsCert: abs(ref.tls?.cert),
    tlsKey: abs(ref.tls?.key),
    tlsCa: abs(ref.tls?.ca),
  });
  return { keys, describe: ref.address, close: () => keys.close() };
}
