/**
 * Owned secret bytes: key material that is wiped on dispose and never printed.
 * `toString`, `toJSON` and `util.inspect` all give a redacted form, so a secret that slips into a
 * log line or an error message shows as `[secret N bytes]`.
 */
import { inspect } from 'node:util';

/**
 * A zeroed Buffer for key bytes whose memory never moves: its own ArrayBuffer, whose backing store
 * lives outside the V8 heap. `Buffer.alloc(n)` for n <= 64 (a 512-bit key) may place the bytes in
 * the V8 heap, where a garbage collection copies them and leaves the old copy behind unwiped.
 */
export function allocSecretBuffer(n: number): Buffer {
  return Buffer.from(new ArrayBuffer(n));
}

/** Key bytes owned by one holder: `expose()` to use them, `dispose()` wipes them; printed redacted. */
export class Secret {
  #bytes: Buffer | null;

  /** Takes ownership of `bytes` (it is wiped on dispose). */
  constructor(bytes: Uint8Array) {
    this.#bytes = Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }

  static copyOf(bytes: Uint8Array): Secret {
    return new Secret(Buffer.from(bytes));
  }

  get length(): number {
    return this.#bytes?.length ?? 0;
  }

  get disposed(): boolean {
    return this.#bytes === null;
  }

  /** The bytes themselves; callers must not keep or log them. */
  expose(): Buffer {
    if (this.#bytes === null) throw new Error('secret used after dispose');
    return this.#bytes;
  }

  /** Wipe the bytes; later `expose()` throws. Idempotent. */
  dispose(): void {
    this.#bytes?.fill(0);
    this.#bytes = null;
  }

  /** `using` support: dispose. */
  [Symbol.dispose](): void {
    this.dispose();
  }

  /** Redacted: `[secret N bytes]`. */
  toString(): string {
    return `[secret ${this.length} bytes]`;
  }

  /** Redacted: `[secret N bytes]`. */
  toJSON(): string {
    return this.toString();
  }

  /** Redacted in util.inspect and console.log. */
  [inspect.custom](): string {
    return this.toString();
  }
}
