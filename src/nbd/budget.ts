/**
 * Server-wide budget for READ/WRITE payload bytes in flight. The per-connection limit
 * (maxInflightBytes) bounds one client; this bounds all of them together, so many connections that
 * each start a large WRITE cannot make the server hold (connections x payload) bytes. A request
 * waits for budget before its payload is read from the socket; while it waits, the connection's
 * receive queue pauses at its high-water mark (recv.ts), so a waiting client costs at most that.
 * One request is always let through when nothing is in flight (whatever its size), and waiters are
 * served in arrival order.
 */
export class PayloadBudget {
  readonly maxBytes: number;
  #used = 0;
  readonly #waiters: { cost: number; resolve: () => void }[] = [];

  constructor(maxBytes: number) {
    this.maxBytes = maxBytes;
  }

  /** Bytes granted and not yet released. */
  get usedBytes(): number {
    return this.#used;
  }

  /** Null when granted at once; otherwise a promise that resolves once granted. */
  acquire(cost: number): Promise<void> | null {
    if (cost === 0) return null;
    if (this.#waiters.length === 0 && this.#fits(cost)) {
      this.#used += cost;
      return null;
    }
    return new Promise<void>((resolve) => this.#waiters.push({ cost, resolve }));
  }

  release(cost: number): void {
    if (cost === 0) return;
    this.#used -= cost;
    for (let w = this.#waiters[0]; w !== undefined && this.#fits(w.cost); w = this.#waiters[0]) {
      this.#waiters.shift();
      this.#used += w.cost;
      w.resolve();
    }
  }

  #fits(cost: number): boolean {
    return this.#used === 0 || this.#used + cost <= this.maxBytes;
  }
}
