// A discrete-event scheduler with a simulated clock: the one source of time and ordering for a
// simulated cluster. Time is an integer count of milliseconds that moves only when the next
// event is taken; events due at the same millisecond run in the order they were scheduled, so a
// seed reproduces a run exactly.
//
// Promises: the simulated disk resolves promises inside events, and the code awaiting them
// continues in microtasks, which JavaScript runs only once the current task returns. runUntil()
// is therefore async and, after every event, yields to the event loop (setImmediate), which runs
// the whole microtask queue first: every continuation an event triggered runs before the next
// event, at the same simulated time. runUntilSync() is for purely callback-driven simulations.
//
// Bounds: every run has a step limit; a simulation that keeps scheduling events forever fails
// with its seed instead of hanging the test suite.
import { assert } from '../errors.js';
import { SimulationError, Trace } from './trace.js';

/** What production state machines take instead of Date.now(), so the simulator can drive them. */
export interface Clock {
  nowMs(): number;
}

export interface Cancellable {
  cancel(): void;
}

/** A clock with timers: what an I/O shell needs to pace retries, heartbeats and lease expiry. */
export interface Timers extends Clock {
  after(delayMs: number, fn: () => void): Cancellable;
}

/** Production timers: a monotonic clock (never jumps with NTP) and setTimeout. */
export const realTimers: Timers = {
  nowMs: () => Math.floor(performance.now()),
  after(delayMs, fn) {
    const handle = setTimeout(fn, delayMs);
    return { cancel: () => clearTimeout(handle) };
  },
};

export const STEPS_MAX_DEFAULT = 1_000_000;
/** Events waiting at once; more means a simulation is scheduling without bound. */
export const PENDING_EVENTS_MAX_DEFAULT = 1_000_000;

export class ScheduledEvent implements Cancellable {
  readonly timeMs: number;
  /** Insertion order: breaks ties between events due at the same millisecond. */
  readonly order: number;
  readonly label: string;
  private fn: (() => void) | undefined;
  private readonly owner: Scheduler;
  private state: 'pending' | 'cancelled' | 'done' = 'pending';

  constructor(owner: Scheduler, timeMs: number, order: number, fn: () => void, label: string) {
    this.owner = owner;
    this.timeMs = timeMs;
    this.order = order;
    this.fn = fn;
    this.label = label;
  }

  get pending(): boolean {
    return this.state === 'pending';
  }

  /** Idempotent; cancelling an event that already ran does nothing. */
  cancel(): void {
    if (this.state !== 'pending') return;
    this.state = 'cancelled';
    this.fn = undefined;
    this.owner.noteCancelled();
  }

  /** @internal Marks the event taken off the queue; returns its function if it was still due. */
  take(): (() => void) | undefined {
    if (this.state !== 'pending') return undefined;
    this.state = 'done';
    const fn = this.fn;
    this.fn = undefined;
    return fn;
  }
}

export interface RunOptions {
  /** Events this call may run before failing as a runaway. Default STEPS_MAX_DEFAULT. */
  stepsMax?: number;
  /** Predicate runs only: fail if the simulated time would pass this (a liveness failure). */
  deadlineMs?: number;
  /** Predicate runs only: what to do when no event is left and the predicate is false. Default 'throw'. */
  onIdle?: 'throw' | 'return';
}

export interface RunResult {
  /** True when the target time or predicate was reached (false only with onIdle: 'return'). */
  reached: boolean;
  steps: number;
  nowMs: number;
}

type Goal = number | (() => boolean);

export class Scheduler implements Timers {
  readonly seed: number;
  readonly trace: Trace;
  private now = 0;
  private nextOrder = 0;
  private liveEvents = 0;
  private totalSteps = 0;
  /** Binary min-heap on (timeMs, order); cancelled events stay until they reach the top. */
  private readonly heap: ScheduledEvent[] = [];
  private readonly pendingEventsMax: number;

  constructor(options: { seed: number; trace?: Trace; startMs?: number; pendingEventsMax?: number }) {
    this.seed = options.seed;
    this.trace = options.trace ?? new Trace();
    this.pendingEventsMax = options.pendingEventsMax ?? PENDING_EVENTS_MAX_DEFAULT;
    this.now = options.startMs ?? 0;
    assert(Number.isSafeInteger(this.now) && this.now >= 0, 'scheduler start time must be a non-negative integer');
  }

  nowMs(): number {
    return this.now;
  }

  /** Events run over the scheduler's life. */
  get steps(): number {
    return this.totalSteps;
  }

  /** Events scheduled and neither run nor cancelled. */
  get pendingEvents(): number {
    return this.liveEvents;
  }

  at(timeMs: number, fn: () => void, label = ''): ScheduledEvent {
    assert(Number.isSafeInteger(timeMs), `event time must be an integer number of ms, got ${timeMs}`);
    assert(timeMs >= this.now, `event at ${timeMs} ms is in the past (now ${this.now} ms)`);
    if (this.liveEvents >= this.pendingEventsMax) {
      throw this.failure(`runaway simulation: ${this.liveEvents} events pending (seed=${this.seed}, now ${this.now} ms)`);
    }
    // Cancelled events stay in the heap until they surface; compact when they dominate it.
    if (this.heap.length > 2 * this.liveEvents + 1024) this.compact();
    const event = new ScheduledEvent(this, timeMs, this.nextOrder++, fn, label);
    this.push(event);
    this.liveEvents++;
    return event;
  }

  after(delayMs: number, fn: () => void, label = ''): ScheduledEvent {
    assert(Number.isSafeInteger(delayMs) && delayMs >= 0, `delay must be a non-negative integer, got ${delayMs}`);
    return this.at(this.now + delayMs, fn, label);
  }

  cancel(event: ScheduledEvent): void {
    event.cancel();
  }

  /** @internal Called by ScheduledEvent.cancel(). */
  noteCancelled(): void {
    this.liveEvents--;
  }

  /** Appends a line, stamped with the simulated time, to the trace. */
  log(line: string): void {
    if (this.trace.enabled) this.trace.add(`${this.now}ms ${line}`);
  }

  /** Runs the next due event, advancing the clock to it. False when no event is left. */
  step(): boolean {
    const event = this.popLive();
    if (event === undefined) return false;
    this.runEvent(event);
    return true;
  }

  /**
   * Runs events until `goal`: a time (run everything due up to it, then set the clock to it) or
   * a predicate (checked before each event and after its microtasks). Fails loudly with the seed
   * on a runaway (stepsMax), a passed deadline, or (predicate, onIdle 'throw') an empty queue.
   */
  async runUntil(goal: Goal, options: RunOptions = {}): Promise<RunResult> {
    const limits = this.startRun(goal, options);
    let steps = 0;
    for (;;) {
      const next = this.nextEventFor(goal, options, steps, limits);
      if (next === 'reached') return { reached: true, steps, nowMs: this.now };
      if (next === 'idle') return { reached: false, steps, nowMs: this.now };
      this.runEvent(next);
      steps++;
      // Let every continuation of promises this event settled run before the next event.
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
  }

  /** runUntil() without yielding: for simulations driven purely by callbacks. */
  runUntilSync(goal: Goal, options: RunOptions = {}): RunResult {
    const limits = this.startRun(goal, options);
    let steps = 0;
    for (;;) {
      const next = this.nextEventFor(goal, options, steps, limits);
      if (next === 'reached') return { reached: true, steps, nowMs: this.now };
      if (next === 'idle') return { reached: false, steps, nowMs: this.now };
      this.runEvent(next);
      steps++;
    }
  }

  /** Builds a SimulationError carrying this run's seed, time and trace tail. */
  failure(message: string, cause?: unknown): SimulationError {
    return new SimulationError(message, { seed: this.seed, nowMs: this.now, traceTail: this.trace.tail(), cause });
  }

  private startRun(goal: Goal, options: RunOptions): { stepsMax: number } {
    const stepsMax = options.stepsMax ?? STEPS_MAX_DEFAULT;
    assert(Number.isSafeInteger(stepsMax) && stepsMax > 0, 'stepsMax must be a positive integer');
    if (typeof goal === 'number') {
      assert(Number.isSafeInteger(goal) && goal >= this.now, `cannot run until ${goal} ms: now is ${this.now} ms`);
      assert(options.deadlineMs === undefined && options.onIdle === undefined, 'deadlineMs and onIdle apply to predicate runs');
    }
    return { stepsMax };
  }

  private nextEventFor(goal: Goal, options: RunOptions, steps: number, limits: { stepsMax: number }): ScheduledEvent | 'reached' | 'idle' {
    if (typeof goal === 'function' && goal()) return 'reached';
    const next = this.peekLive();
    if (typeof goal === 'number') {
      if (next === undefined || next.timeMs > goal) {
        this.now = goal;
        return 'reached';
      }
    } else {
      if (next === undefined) {
        if (options.onIdle === 'return') return 'idle';
        throw this.failure(`simulation stalled: no event left and the run's condition is false (seed=${this.seed})`);
      }
      if (options.deadlineMs !== undefined && next.timeMs > options.deadlineMs) {
        throw this.failure(
          `simulation missed its deadline: condition still false at ${options.deadlineMs} ms, next event at ${next.timeMs} ms (seed=${this.seed})`,
        );
      }
    }
    if (steps >= limits.stepsMax) {
      throw this.failure(`runaway simulation: ${limits.stepsMax} steps without reaching the goal (seed=${this.seed}, now ${this.now} ms)`);
    }
    this.popLive();
    return next;
  }

  private runEvent(event: ScheduledEvent): void {
    const fn = event.take();
    assert(fn !== undefined, 'a live event has a function');
    this.liveEvents--;
    this.now = event.timeMs;
    this.totalSteps++;
    try {
      fn();
    } catch (error) {
      if (error instanceof SimulationError) throw error;
      const label = event.label === '' ? 'an event' : `event "${event.label}"`;
      throw this.failure(`${label} threw at ${this.now} ms (seed=${this.seed}): ${error instanceof Error ? error.message : String(error)}`, error);
    }
  }

  private peekLive(): ScheduledEvent | undefined {
    for (;;) {
      const top = this.heap[0];
      if (top === undefined || top.pending) return top;
      this.popTop();
    }
  }

  private popLive(): ScheduledEvent | undefined {
    const top = this.peekLive();
    if (top !== undefined) this.popTop();
    return top;
  }

  private compact(): void {
    const live = this.heap.filter((event) => event.pending);
    this.heap.length = 0;
    for (const event of live) this.push(event);
  }

  private static before(a: ScheduledEvent, b: ScheduledEvent): boolean {
    return a.timeMs < b.timeMs || (a.timeMs === b.timeMs && a.order < b.order);
  }

  private push(event: ScheduledEvent): void {
    const heap = this.heap;
    heap.push(event);
    let index = heap.length - 1;
    while (index > 0) {
      const parent = (index - 1) >> 1;
      if (!Scheduler.before(event, heap[parent]!)) break;
      heap[index] = heap[parent]!;
      index = parent;
    }
    heap[index] = event;
  }

  private popTop(): void {
    const heap = this.heap;
    const last = heap.pop();
    if (last === undefined || heap.length === 0) return;
    let index = 0;
    for (;;) {
      const left = 2 * index + 1;
      if (left >= heap.length) break;
      const right = left + 1;
      const child = right < heap.length && Scheduler.before(heap[right]!, heap[left]!) ? right : left;
      if (!Scheduler.before(heap[child]!, last)) break;
      heap[index] = heap[child]!;
      index = child;
    }
    heap[index] = last;
  }
}
