/**
 * Public API of the NBD layer: the server, its options and export types, URI helpers and the
 * attach helpers (kernel block device through nbd-client or nbdfuse + loop).
 *
 * @module cryptmap/nbd
 */
export { type AttachInfo, type AttachMethod, type AttachOptions, attachExport, detachExport } from './attach.js';
export { NbdServer } from './server.js';
export type { NbdExport, NbdListenOptions, NbdServerOptions, NbdTlsCredentials, NbdTlsMode } from './types.js';
export { nbdTcpUri, nbdUnixUri } from '../nbd-wire/uri.js';
