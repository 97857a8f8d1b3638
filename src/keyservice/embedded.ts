/**
 * A key service inside the calling process (the agent's `keyService: {address: embedded}`, and
 * `npm start`): the same root secret file, policy and audit log as `cryptmap keyd`, reached through
 * an in-process client instead of a socket. Its state directory can later be served by a real keyd.
 *
 * Three ways to keep the root secret (threat model in docs/keyservice.md):
 *   - raw in STATE/root.key (the default, `npm start`): beside the encrypted volumes, so a copy of the
 *     agent's state dir (a backup, a stolen disk) decrypts every persistent volume. `rawBesideData`
 *     is true and the agent warns at every start and in `agent status`.
 *   - wrapped (`passphrase`): STATE/root.key.wrapped, useless without the passphrase file, which
 *     should live elsewhere (another medium, systemd credentials).
 *   - elsewhere (`rootFile`): an existing file on another path or medium, raw or wrapped.
 */
import { join } from 'node:path';
import { Secret } from '../util/secret.js';
import { type AuditSink, openAuditFile, rateLimitedAudit } from './audit.js';
import { inprocKeyClient, type KeyClient } from './client.js';
import { DEFAULT_POLICY, type Policy } from './policy.js';
import { ensurePrivateDir, loadOrCreateRootSecret, loadRootGenerations } from './root-secret.js';
import { KeyService } from './service.js';

export interface EmbeddedKeyService {
  client: KeyClient;
  service: KeyService;
  /** Where the root secret lives, and whether this start created it. */
  rootPath: string;
  created: boolean;
  wrapped: boolean;
  /** The raw root secret sits in the state directory (the default): say so loudly. */
  rawBesideData: boolean;
  /** Read the root secret files again (a root rotation begun or committed since the start). */
  reloadRoots(passphrase?: Secret): Promise<void>;
  close(): Promise<void>;
}

export interface EmbeddedOptions {
  passphrase?: Secret;
  /** An existing root secret file elsewhere (raw, or wrapped when `passphrase` is given). */
  rootFile?: string;
  policy?: Policy;
  /** Default: STATE_DIR/audit.log */
  auditPath?: string;
}

/** Load (or create) the root secret in `stateDir` and serve keys in-process as identity `local`. */
export async function startEmbeddedKeyService(
  stateDir: string,
  opts: EmbeddedOptions = {},
): Promise<EmbeddedKeyService> {
  // The state dir holds the audit log in every mode; checked (trusted path, 0700) before anything else.
  await ensurePrivateDir(stateDir);
  const root = await loadOrCreateRootSecret(stateDir, {
    ...(opts.passphrase ? { passphrase: opts.passphrase } : {}),
    ...(opts.rootFile ? { rootFile: opts.rootFile } : {}),
  });
  let audit: AuditSink;
  try {
    audit = rateLimitedAudit(await openAuditFile(opts.auditPath ?? join(stateDir, 'audit.log')));
  } catch (e) {
    root.secret.dispose();
    throw e;
  }
  let gens: Awaited<ReturnType<typeof loadRootGenerations>>;
  try {
    gens = await loadRootGenerations(root, opts.passphrase);
  } catch (e) {
    root.secret.dispose();
    await audit.close();
    throw e;
  }
  const service = new KeyService({ root: root.secret, roots: gens, policy: opts.policy ?? DEFAULT_POLICY, audit });
  return {
    client: inprocKeyClient(service),
    service,
    rootPath: root.path,
    created: root.created,
    wrapped: root.wrapped,
    rawBesideData: !root.wrapped && opts.rootFile === undefined,
    async reloadRoots(passphrase?: Secret) {
      const cur = await loadOrCreateRootSecret(stateDir, {
        ...(passphrase ? { passphrase } : {}),
        ...(opts.rootFile ? { rootFile: opts.rootFile } : {}),
      });
      let g: Awaited<ReturnType<typeof loadRootGenerations>>;
      try {
        g = await loadRootGenerations(cur, passphrase);
      } catch (e) {
        cur.secret.dispose();
        throw e;
      }
      service.setRoots(cur.secret, g);
    },
    async close() {
      await audit.close();
      service.setRoots(Secret.copyOf(Buffer.alloc(32)));
    },
  };
}
