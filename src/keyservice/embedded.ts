/**
 * A key service inside the calling process (the agent's `keyService: {address: embedded}`, and
 * `npm start`): the same root secret file, policy and audit log as `cryptmap keyd`, reached through
 * an in-process client instead of a socket. Its state directory can later be served by a real keyd.
 */
import { join } from 'node:path';
import type { Secret } from '../util/secret.js';
import { type AuditSink, openAuditFile } from './audit.js';
import { inprocKeyClient, type KeyClient } from './client.js';
import { DEFAULT_POLICY, type Policy } from './policy.js';
import { loadOrCreateRootSecret } from './root-secret.js';
import { KeyService } from './service.js';

export interface EmbeddedKeyService {
  client: KeyClient;
  service: KeyService;
  /** Where the root secret lives, and whether this start created it. */
  rootPath: string;
  created: boolean;
  close(): Promise<void>;
}

export interface EmbeddedOptions {
  passphrase?: Secret;
  policy?: Policy;
  /** Default: STATE_DIR/audit.log */
  auditPath?: string;
}

/** Load (or create) the root secret in `stateDir` and serve keys in-process as identity `local`. */
export async function startEmbeddedKeyService(stateDir: string, opts: EmbeddedOptions = {}): Promise<EmbeddedKeyService> {
  const root = await loadOrCreateRootSecret(stateDir, opts.passphrase ? { passphrase: opts.passphrase } : {});
  let audit: AuditSink;
  try {
    audit = await openAuditFile(opts.auditPath ?? join(stateDir, 'audit.log'));
  } catch (e) {
    root.secret.dispose();
    throw e;
  }
  const service = new KeyService({ root: root.secret, policy: opts.policy ?? DEFAULT_POLICY, audit });
  return {
    client: inprocKeyClient(service),
    service,
    rootPath: root.path,
    created: root.created,
    async close() {
      await audit.close();
      root.secret.dispose();
    },
  };
}
