/**
 * The manifest `npm start` (the agent without --manifest) runs: the same text as
 * examples/manifest.yaml (a test keeps them equal). One ephemeral and one persistent volume, one swap.
 */
export const DEFAULT_MANIFEST_FILE = '(built-in examples/manifest.yaml)';

export const DEFAULT_MANIFEST_YAML = `# cryptmap manifest: what \`npm start\` runs (embedded in src/reconciler/default-manifest.ts; keep them equal).
# Reference: docs/manifest.md. Sizes use binary units (K, M, G, T = 1024^n; 64M = 64 MiB).
version: 1

# Where volume keys come from. \`embedded\` runs a key service inside the agent, with its root
# secret in the agent's state directory. Others: unix:/run/cryptmap/keyd.sock (\`cryptmap keyd\`),
# or https://keys.example:7443 with a client certificate (tls: {cert, key, ca}).
keyService:
  address: embedded

services:
  # A cache that may vanish: a fresh volume with a random key at every boot.
  - name: web
    volumes:
      - name: cache
        size: 64M
        class: ephemeral          # the default
        filesystem: ext4          # the default; \`none\` gives a raw block device
        mountpoint: /srv/web/cache

  # Data that must survive restarts and reboots: LUKS2, keyed by the key service (HKDF of the
  # root secret for scratch/db/data), reopened on every start, never reformatted automatically.
  - name: db
    volumes:
      - name: data
        size: 64M
        class: persistent
        filesystem: ext4
        mountpoint: /srv/db
        cipher: aes-xts-plain64   # the default
        keySize: 512              # bits; the default (AES-256 in XTS mode)
        sectorSize: 4096          # the default

# Encrypted swap: plain dm-crypt with a random key made at every boot and never written anywhere.
swap:
  - name: swap0
    size: 64M
`;
