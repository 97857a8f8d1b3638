/**
 * Test helper: a BlockDevice wrapper that "crashes" after N writes. Writes, write-zeroes and discards
 * count; once the budget is spent every further mutating call throws (as if the process had died),
 * and nothing more reaches the inner device. Reused by the reliability tests.
 */
import type { BlockDevice, Extent, WriteFlags, WriteZeroesFlags } from '../../src/blockdev/types.js';

export class CrashError extends Error {
  constructor() {
    super('simulated crash');
  }
}

export class FaultDevice implements BlockDevice {
  readonly inner: BlockDevice;
  /** Writes still allowed; Infinity = no fault. */
  budget: number;
  /** Mutating calls seen so far (including the refused one). */
  writes = 0;

  constructor(inner: BlockDevice, budget = Number.POSITIVE_INFINITY) {
    this.inner = inner;
    this.budget = budget;
  }
  get sizeBytes() {
    return this.inner.sizeBytes;
  }
  get capabilities() {
    return this.inner.capabilities;
  }
  get limits() {
    return this.inner.limits;
  }
  #spend(): void {
    this.writes++;
    if (this.writes > this.budget) throw new CrashError();
  }
  read(offsetBytes: number, buf: Uint8Array): Promise<void> {
    return this.inner.read(offsetBytes, buf);
  }
  async write(offsetBytes: number, data: Uint8Array, flags?: WriteFlags): Promise<void> {
    this.#spend();
    await this.inner.write(offsetBytes, data, flags);
  }
  flush(): Promise<void> {
    return this.inner.flush();
  }
  async discard(offsetBytes: number, lengthBytes: number): Promise<void> {
    this.#spend();
    await this.inner.discard(offsetBytes, lengthBytes);
  }
  async writeZeroes(offsetBytes: number, lengthBytes: number, flags?: WriteZeroesFlags): Promise<void> {
    this.#spend();
    await this.inner.writeZeroes(offsetBytes, lengthBytes, flags);
  }
  blockStatus(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    return this.inner.blockStatus?.(offsetBytes, lengthBytes) ?? Promise.resolve([{ lengthBytes, hole: false, zero: false }]);
  }
  close(): Promise<void> {
    return Promise.resolve();
  }
}

/** A deep copy of a memory device's content into a new one (snapshot before an operation). */
export async function cloneDevice(src: BlockDevice, make: (size: number) => BlockDevice, bytes: number): Promise<BlockDevice> {
  const d = make(src.sizeBytes);
  const buf = Buffer.alloc(bytes);
  await src.read(0, buf);
  await d.write(0, buf);
  return d;
}
