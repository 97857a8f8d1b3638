/**
 * Manifest texts (docs/manifest.md, version 1) shared by the agent tests in test/reconciler and the
 * daemon's volume-port tests in test/daemon: service `web` with an ephemeral `cache`, service `db`
 * with a persistent `data` volume, and swap `swap0`. Built from the same pieces so that the tests
 * differ only where they mean to (sizes, mounts, swap, key service).
 */

/** Service `web`: ephemeral volume `cache` mounted at /srv/web/cache. */
export function webCacheService(size = '16M'): string {
  return `  - name: web\n    volumes:\n      - name: cache\n        size: ${size}\n        mountpoint: /srv/web/cache\n`;
}

/** Service `db`: persistent volume `data`, mounted at `mountpoint`, or with no file system when there is none. */
export function dbDataService(size = '8M', mountpoint?: string): string {
  const last = mountpoint === undefined ? '        filesystem: none\n' : `        mountpoint: ${mountpoint}\n`;
  return `  - name: db\n    volumes:\n      - name: data\n        size: ${size}\n        class: persistent\n${last}`;
}

/** Swap entry `swap0`. */
export function swap0(size = '4M'): string {
  return `  - name: swap0\n    size: ${size}\n`;
}

/** A version 1 manifest: `head` holds top-level lines before `services` (e.g. a keyService block). */
export function manifestText(services: string[], opts: { swap?: string[]; head?: string } = {}): string {
  const swap = opts.swap !== undefined && opts.swap.length > 0 ? `swap:\n${opts.swap.join('')}` : '';
  return `version: 1\n${opts.head ?? ''}services:\n${services.join('')}${swap}`;
}

/** web/cache (16M, mounted), db/data (16M, persistent, mounted at /srv/db), and swap0 (4M) unless `swap` is false. */
export function mountedManifest(opts: { swap?: boolean } = {}): string {
  return manifestText([webCacheService(), dbDataService('16M', '/srv/db')], {
    swap: opts.swap === false ? [] : [swap0()],
  });
}

/** web/cache (16M, mounted), db/data (8M, persistent, no file system), swap0 (4M): what the agent serves over NBD. */
export const NBD_MANIFEST = manifestText([webCacheService(), dbDataService()], { swap: [swap0()] });

/** db/data alone (persistent, no file system). */
export function dbOnlyManifest(size = '8M', head?: string): string {
  return manifestText([dbDataService(size)], head === undefined ? {} : { head });
}
