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
