/**
 * JSON Schema (draft 2020-12 subset, validated by ajv) of the cryptmap manifest, version 1.
 * Documented in docs/manifest.md. `x-message` is our annotation: the message shown when the
 * property fails (ajv's own wording otherwise). Semantic rules that a schema cannot say well
 * (unique names, mountpoint vs filesystem, size multiple of the sector size) live in manifest.ts.
 */
export const NAME_PATTERN = '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$';
export const SIZE_PATTERN = '^[1-9][0-9]{0,15}(K|M|G|T|KiB|MiB|GiB|TiB)$';

const name = {
  type: 'string',
  pattern: NAME_PATTERN,
  'x-message': 'must be 1-64 letters, digits, . _ - starting with a letter or digit',
};
const size = { type: 'string', pattern: SIZE_PATTERN, 'x-message': 'must be a size like 512M or 2G' };
const cipher = {
  type: 'string',
  pattern: '^[a-z0-9]+(-[a-z0-9]+)+(:[a-z0-9]+)?$',
  'x-message': 'must be a cipher specification like aes-xts-plain64',
};
const keySize = {
  type: 'integer',
  enum: [128, 256, 512],
  'x-message': 'must be the key size in bits: 128, 256 or 512',
};
const sectorSize = { type: 'integer', enum: [512, 1024, 2048, 4096], 'x-message': 'must be 512, 1024, 2048 or 4096' };
const absolutePath = { type: 'string', pattern: '^/', 'x-message': 'must be an absolute path' } as const;
const nonEmpty = { type: 'string', minLength: 1 } as const;

/** An object with exactly `properties` (no others), of which `required` must be present. */
function closedObject<const R extends readonly string[], const P extends object>(required: R, properties: P) {
  return { type: 'object', additionalProperties: false, required, properties } as const;
}

/** A list of closed objects (services, volumes, pools, swap). */
function listOf<const R extends readonly string[], const P extends object>(required: R, properties: P) {
  return { type: 'array', items: closedObject(required, properties) } as const;
}

export const MANIFEST_SCHEMA = {
  $id: 'https://cryptmap.invalid/manifest-v1.json',
  type: 'object',
  additionalProperties: false,
  required: ['version'],
  properties: {
    version: { const: 1, 'x-message': 'must be 1' },
    keyService: {
      type: 'object',
      additionalProperties: false,
      required: ['address'],
      properties: {
        address: {
          type: 'string',
          pattern: '^(embedded|unix:/.+|/.+|https://[^/\\s]+)$',
          'x-message': 'must be embedded, unix:/path/to/keyd.sock or https://host:port',
        },
        tokenFile: absolutePath,
        passphraseFile: { type: 'string', minLength: 1, 'x-message': 'must be a file path (relative to the manifest)' },
        rootSecretFile: { type: 'string', minLength: 1, 'x-message': 'must be a file path (relative to the manifest)' },
        tls: closedObject(['cert', 'key', 'ca'], { cert: nonEmpty, key: nonEmpty, ca: nonEmpty }),
      },
    },
    coordination: {
      type: 'object',
      additionalProperties: false,
      required: ['etcd'],
      properties: {
        etcd: {
          type: 'array',
          minItems: 1,
          items: {
            type: 'string',
            pattern: '^https?://[^/\\s]+/?$',
            'x-message': 'must be an etcd client URL like http://10.0.0.5:2379',
          },
        },
        ttl: { type: 'integer', minimum: 2, maximum: 300, 'x-message': 'must be the lease TTL in seconds, 2-300' },
        prefix: { type: 'string', pattern: '^/', 'x-message': 'must be an etcd key prefix starting with /' },
        tls: closedObject(['ca'], { ca: nonEmpty, cert: nonEmpty, key: nonEmpty }),
        user: nonEmpty,
        passwordFile: nonEmpty,
      },
    },
    services: listOf(['name', 'volumes'], {
      name,
      volumes: listOf(['name'], {
        name,
        size,
        device: {
          type: 'string',
          pattern: '^nbds?(\\+unix)?://',
          'x-message': 'must be an NBD URI: nbd://host[:port]/export, nbds://..., nbd+unix:///export?socket=PATH',
        },
        class: {
          type: 'string',
          enum: ['ephemeral', 'persistent'],
          'x-message': 'must be ephemeral or persistent',
        },
        filesystem: {
          type: 'string',
          enum: ['ext4', 'ext3', 'ext2', 'none'],
          'x-message': 'must be ext4, ext3, ext2 or none',
        },
        mountpoint: absolutePath,
        pool: { ...name, 'x-message': 'must name a pool of the pools section' },
        cipher,
        keySize,
        sectorSize,
      }),
    }),
    pools: listOf(['name'], {
      name,
      size,
      metadataSize: size,
      blockSize: {
        type: 'string',
        pattern: '^[1-9][0-9]{0,15}(K|M|G|KiB|MiB|GiB)$',
        'x-message': 'must be a size like 64K or 1M (64K to 1G, a multiple of 64K)',
      },
      dataDevice: absolutePath,
      metadataDevice: absolutePath,
    }),
    swap: listOf(['name', 'size'], { name, size, cipher, keySize, sectorSize }),
  },
} as const;
