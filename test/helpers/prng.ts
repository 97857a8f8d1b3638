/**
 * Seeded pseudo-random numbers for test data: reproducible from the seed a test prints, never
 * crypto-grade. One generator family for every suite (the same seed gives the same bytes everywhere).
 */

/** xorshift32 (Marsaglia): the next 32-bit value each call. */
export function xorshift32(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
}

/** `n` bytes: xorshift32's values little-endian, the last one cut to what is left. */
export function seededBytes(n: number, seed: number): Buffer {
  const next = xorshift32(seed);
  const b = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i += 4) {
    const x = next();
    if (i + 4 <= n) b.writeUInt32LE(x, i);
    else for (let j = i; j < n; j++) b[j] = (x >>> ((j - i) * 8)) & 0xff;
  }
  return b;
}

/** A byte source: each call gives `n` bytes, one per xorshift32 value (its low byte). */
export function byteStream(seed: number): (n: number) => Buffer {
  const next = xorshift32(seed);
  return (n) => {
    const b = Buffer.alloc(n);
    for (let i = 0; i < n; i++) b[i] = next() & 0xff;
    return b;
  };
}

/** xorshift64*: integers in [0, n), for choices (sizes, offsets) over a long run. */
export function xorshift64star(seed: bigint): (n: number) => number {
  let s = seed || 1n;
  const M = (1n << 64n) - 1n;
  return (n: number): number => {
    s ^= s >> 12n;
    s ^= (s << 25n) & M;
    s ^= s >> 27n;
    return Number(((s * 0x2545f4914f6cdd1dn) & M) >> 11n) % n;
  };
}
