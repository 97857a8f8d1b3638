/**
 * Public API of the NBD layer: the server, its options and export types, URI helpers and the
 * attach helpers (kernel block device through nbd-client or nbdfuse + loop).
 */
export { type AttachInfo, type AttachOptions, attachExport, detachExport } from './attach.js';
export { NbdServer } from './server.js';
export type { NbdExport, NbdServerOptions, NbdTlsCredentials, NbdTlsMode } from './types.js';
export { nbdTcpUri, nbdUnixUri } from '../nbd-wire/uri.js';
