/**
 * A view of a BlockDevice (types.ts contract): every call goes straight to the device except
 * close(), which is the caller's. Used for handles that must not close what they borrow (a share of
 * a device someone else owns) or that count opens (dm mapped-device handles).
 */
import type { BlockDevice } from './types.js';

/**
 * `dev` seen through a handle whose close() runs `close` instead of closing `dev`.
 * @example const share = deviceView(file, async () => {}); // the caller keeps ownership of `file`
 */
export function deviceView(dev: BlockDevice, close: () => Promise<void>): BlockDevice {
  return {
    get sizeBytes() {
      return dev.sizeBytes;
    },
    get capabilities() {
      return dev.capabilities;
    },
    get limits() {
      return dev.limits;
    },
    get directIo() {
      return dev.directIo;
    },
    read: (o, b) => dev.read(o, b),
    write: (o, d, f) => dev.write(o, d, f),
    flush: () => dev.flush(),
    discard: (o, n) => dev.discard(o, n),
    writeZeroes: (o, n, f) => dev.writeZeroes(o, n, f),
    blockStatus: dev.blockStatus ? (o, n) => dev.blockStatus!(o, n) : undefined,
    close,
  };
}
