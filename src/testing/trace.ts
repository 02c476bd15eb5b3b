// What a failing simulation reports: the seed that reproduces it and the last events before it
// failed. The trace is a bounded ring (a long run must not grow memory), written by the
// scheduler, network and disk; MIRRORSAN_TRACE=1 also echoes every line to stderr, which is how
// a replayed seed (MIRRORSAN_SEED=n) is read in full.
import { assert } from '../errors.js';

export const TRACE_LINES_DEFAULT = 400;

export class Trace {
  /** False makes add() a no-op (benchmarks); failures then report no tail. */
  readonly enabled: boolean;
  private readonly capacityLines: number;
  private readonly echo: boolean;
  private readonly lines: string[] = [];
  /** Index in `lines` of the oldest line once the ring is full. */
  private head = 0;
  /** Lines ever added, including those the ring has dropped. */
  private added = 0;

  constructor(options: { capacityLines?: number; echo?: boolean; enabled?: boolean } = {}) {
    this.capacityLines = options.capacityLines ?? TRACE_LINES_DEFAULT;
    assert(Number.isInteger(this.capacityLines) && this.capacityLines > 0, 'trace capacity must be a positive integer');
    this.echo = options.echo ?? process.env.MIRRORSAN_TRACE === '1';
    this.enabled = options.enabled ?? true;
  }

  add(line: string): void {
    if (!this.enabled) return;
    this.added++;
    if (this.echo) process.stderr.write(`trace ${line}\n`);
    if (this.lines.length < this.capacityLines) {
      this.lines.push(line);
      return;
    }
    this.lines[this.head] = line;
    this.head = (this.head + 1) % this.capacityLines;
  }

  /** The last `count` lines, oldest first. */
  tail(count = this.capacityLines): string[] {
    const ordered = [...this.lines.slice(this.head), ...this.lines.slice(0, this.head)];
    return ordered.slice(Math.max(0, ordered.length - count));
  }

  /** Lines added over the trace's life (the ring keeps only the last capacityLines). */
  get totalLines(): number {
    return this.added;
  }
}

/**
 * A simulation that went wrong: a runaway (too many steps), a stall, a deadline passed, an
 * exception inside an event, or an invariant violation. Carries the seed and where it was.
 */
export class SimulationError extends Error {
  readonly seed: number | undefined;
  readonly nowMs: number | undefined;
  readonly traceTail: readonly string[];

  constructor(
    message: string,
    details: { seed?: number; nowMs?: number; traceTail?: readonly string[]; cause?: unknown } = {},
  ) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
    this.name = 'SimulationError';
    this.seed = details.seed;
    this.nowMs = details.nowMs;
    this.traceTail = details.traceTail ?? [];
  }
}

/** A checker found a run that breaks one of DESIGN.md §3's invariants (or a model's rule). */
export class InvariantViolation extends Error {
  readonly invariant: string;
  constructor(invariant: string, message: string) {
    super(`${invariant} violated: ${message}`);
    this.name = 'InvariantViolation';
    this.invariant = invariant;
  }
}
