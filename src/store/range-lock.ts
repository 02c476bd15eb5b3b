// Orders overlapping requests: a request waits for every earlier in-flight request whose range
// overlaps its own, and for nothing else. Requests register synchronously in arrival order,
// so the order in which overlapping requests reach the image is their order in the log
// (invariant I4 on one node). Cost per acquire: O(requests in flight), small constants.

export interface RangeLease {
  /** Undefined when nothing overlapping is in flight (the common case: no extra await). */
  readonly ready: Promise<void> | undefined;
  release(): void;
}

interface Holder {
  start: number;
  end: number;
  done: Promise<void>;
}

export class RangeLock {
  private readonly holders = new Set<Holder>();

  get size(): number {
    return this.holders.size;
  }

  /**
   * Settles once every holder registered now whose range overlaps [start, end) has released;
   * registers nothing, so concurrent waiters (reads) never wait for each other. Undefined
   * when nothing overlapping is in flight.
   */
  overlapping(start: number, end: number): Promise<void> | undefined {
    const waits: Promise<void>[] = [];
    for (const holder of this.holders) {
      if (holder.start < end && start < holder.end) waits.push(holder.done);
    }
    if (waits.length === 0) return undefined;
    return waits.length === 1 ? waits[0] : Promise.all(waits).then(() => undefined);
  }

  /** Registers [start, end) now; `ready` settles when earlier overlapping holders released. */
  acquire(start: number, end: number): RangeLease {
    let first: Promise<void> | undefined;
    let more: Promise<void>[] | undefined;
    for (const holder of this.holders) {
      if (holder.start < end && start < holder.end) {
        if (first === undefined) first = holder.done;
        else (more ??= [first]).push(holder.done);
      }
    }
    let resolveDone!: () => void;
    const holder: Holder = { start, end, done: new Promise<void>((resolve) => (resolveDone = resolve)) };
    this.holders.add(holder);
    let released = false;
    return {
      ready: more ? Promise.all(more).then(() => undefined) : first,
      release: () => {
        if (released) return;
        released = true;
        this.holders.delete(holder);
        resolveDone();
      },
    };
  }
}
