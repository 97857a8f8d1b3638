/**
 * Per-service key derivation: HKDF-SHA256 (RFC 5869) from the key service's root secret.
 *
 *   key = HKDF-SHA256(IKM = root secret (32 bytes), salt = "" (empty, so RFC 5869 §2.2 uses
 *         32 zero bytes), info = "cryptmap/v1/<purpose>/<service>/<volume>", L = 32 or 64)
 *
 * The info string is the versioned context: `v1` changes only if this construction changes, and then
 * both versions are served side by side. Purposes: `scratch` (a service's volume key, the LUKS2
 * keyslot passphrase of a persistent volume) and `swap` (reserved for swap areas that must survive
 * a restart of the agent; per-boot swap keys are random and never derived). Names are restricted to
 * `[A-Za-z0-9][A-Za-z0-9._-]{0,63}` so that no two (service, volume) pairs give the same info string.
 * Test vectors: docs/keyservice.md (and test/keyservice/derive.test.ts).
 */
import { hkdfSync } from 'node:crypto';
import { CryptmapError } from '../util/errors.js';
import { Secret } from '../util/secret.js';

export const KEY_PURPOSES = ['scratch', 'swap'] as const;
export type KeyPurpose = (typeof KEY_PURPOSES)[number];
export const KEY_LENGTHS = [32, 64] as const;
export const ROOT_SECRET_BYTES = 32;
/** The HKDF salt: empty (documented; the root secret is already uniformly random). */
export const HKDF_SALT = Buffer.alloc(0);
export const CONTEXT_VERSION = 'v1';

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

/** True when `s` is a valid service or volume name (also used by the manifest and policy). */
export function isValidName(s: string): boolean {
  return NAME_RE.test(s);
}

/**
 * Which root secret to derive from: `current`, or during a root rotation (docs/keyservice.md) `next`
 * (begun, not committed yet) and, after the commit, `previous` (the one it replaced).
 */
export const ROOT_GENERATIONS = ['current', 'next', 'previous'] as const;
export type RootGeneration = (typeof ROOT_GENERATIONS)[number];

export interface DeriveRequest {
  /** Default `current`. */
  generation?: RootGeneration;
  purpose: KeyPurpose;
  service: string;
  volume: string;
  /** Output length in bytes: 32 (default) or 64. */
  length?: number;
}

/** Check a request's fields strictly; throws EKEYREQ with the offending field. */
export function validateDeriveRequest(
  req: DeriveRequest,
): Required<Omit<DeriveRequest, 'generation'>> & Pick<DeriveRequest, 'generation'> {
  if (req.generation !== undefined && !(ROOT_GENERATIONS as readonly string[]).includes(req.generation)) {
    throw new CryptmapError('EKEYREQ', `generation must be one of ${ROOT_GENERATIONS.join(', ')}`, {
      context: { field: 'generation' },
    });
  }
  if (!(KEY_PURPOSES as readonly string[]).includes(req.purpose)) {
    throw new CryptmapError('EKEYREQ', `purpose must be one of ${KEY_PURPOSES.join(', ')}`, {
      context: { field: 'purpose' },
    });
  }
  for (const f of ['service', 'volume'] as const) {
    const v = req[f];
    if (typeof v !== 'string' || !isValidName(v)) {
      throw new CryptmapError(
        'EKEYREQ',
        `${f} must be 1-64 characters of A-Z a-z 0-9 . _ - starting with a letter or digit`,
        {
          context: { field: f },
        },
      );
    }
  }
  const length = req.length ?? 32;
  if (!(KEY_LENGTHS as readonly number[]).includes(length)) {
    throw new CryptmapError('EKEYREQ', 'length must be 32 or 64 bytes', { context: { field: 'length' } });
  }
  return {
    purpose: req.purpose,
    service: req.service,
    volume: req.volume,
    length,
    ...(req.generation !== undefined && req.generation !== 'current' ? { generation: req.generation } : {}),
  };
}

/** The HKDF info string for a request, e.g. `cryptmap/v1/scratch/web/data`. */
export function contextInfo(purpose: KeyPurpose, service: string, volume: string): string {
  return `cryptmap/${CONTEXT_VERSION}/${purpose}/${service}/${volume}`;
}

/**
 * Derive a key. The caller owns (and must dispose) the returned Secret.
 * @example
 *   const k = deriveKey(root, { purpose: 'scratch', service: 'web', volume: 'data' }); // 32 bytes
 */
export function deriveKey(root: Secret, req: DeriveRequest): Secret {
  const r = validateDeriveRequest(req);
  const ikm = root.expose();
  if (ikm.length !== ROOT_SECRET_BYTES)
    throw new CryptmapError('EROOTSECRET', `root secret must be ${ROOT_SECRET_BYTES} bytes`);
  const out = hkdfSync(
    'sha256',
    ikm,
    HKDF_SALT,
    Buffer.from(contextInfo(r.purpose, r.service, r.volume), 'utf8'),
    r.length,
  );
  return new Secret(Buffer.from(out));
}
