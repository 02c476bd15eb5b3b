// Runs a simulation scenario over many seeds and turns the first failure into an error that says
// how to reproduce it. Environment:
//   MIRRORSAN_SEED=n        run only seed n (replay a failure), for every runSeeds() call
//   MIRRORSAN_SEEDS=count   how many seeds a count-based run explores (overrides the code's count)
//   MIRRORSAN_SEED_BASE=n   the first seed of count-based runs (explore fresh seeds; default 1)
//   MIRRORSAN_TRACE=1       echo every trace line to stderr (see trace.ts)
// A seed that once failed goes into the scenario's regression list (an explicit seed array).
import { assert } from '../errors.js';
import { SimulationError, Trace } from './trace.js';

export interface SeedRun {
  readonly seed: number;
  /** The trace this seed's scheduler should write to: its tail is reported on failure. */
  readonly trace: Trace;
}

export interface RunSeedsOptions {
  /** A count (seeds seedBase .. seedBase+count-1) or an explicit list (a regression list). */
  seeds: number | readonly number[];
  scenario: (seed: number, run: SeedRun) => void | Promise<void>;
  /** First seed of a count-based run. Default MIRRORSAN_SEED_BASE or 1. */
  seedBase?: number;
  /** Trace lines included in a failure message. Default 60. */
  traceTailLines?: number;
  /** Environment to read (tests pass their own). Default process.env. */
  env?: Readonly<Record<string, string | undefined>>;
}

export interface RunSeedsResult {
  seedsRun: number;
  firstSeed: number | undefined;
  lastSeed: number | undefined;
}

/** Thrown by runSeeds: the message begins `SIMULATION FAILED seed=<n>`. */
export class SimulationFailure extends Error {
  readonly seed: number;
  readonly traceTail: readonly string[];
  constructor(seed: number, message: string, traceTail: readonly string[], cause: unknown) {
    super(message, { cause });
    this.name = 'SimulationFailure';
    this.seed = seed;
    this.traceTail = traceTail;
  }
}

function parseSeed(name: string, text: string): number {
  assert(/^\d+$/.test(text.trim()), `${name} must be a non-negative integer, got "${text}"`);
  const value = Number(text.trim());
  assert(Number.isSafeInteger(value), `${name} is too large: ${text}`);
  return value;
}

/** The seeds a run will use, after the environment's overrides. */
export function resolveSeeds(options: Pick<RunSeedsOptions, 'seeds' | 'seedBase' | 'env'>): number[] {
  const env = options.env ?? process.env;
  const single = env.MIRRORSAN_SEED;
  if (single !== undefined && single !== '') return [parseSeed('MIRRORSAN_SEED', single)];
  if (typeof options.seeds !== 'number') return [...options.seeds];
  const countText = env.MIRRORSAN_SEEDS;
  const count = countText !== undefined && countText !== '' ? parseSeed('MIRRORSAN_SEEDS', countText) : options.seeds;
  const baseText = env.MIRRORSAN_SEED_BASE;
  const base = options.seedBase ?? (baseText !== undefined && baseText !== '' ? parseSeed('MIRRORSAN_SEED_BASE', baseText) : 1);
  assert(Number.isSafeInteger(count) && count >= 0, `seed count must be a non-negative integer, got ${count}`);
  return Array.from({ length: count }, (_, index) => base + index);
}

export async function runSeeds(options: RunSeedsOptions): Promise<RunSeedsResult> {
  const seeds = resolveSeeds(options);
  const tailLines = options.traceTailLines ?? 60;
  for (const seed of seeds) {
    const trace = new Trace();
    try {
      await options.scenario(seed, { seed, trace });
    } catch (error) {
      // Prefer the tail captured where the failure was raised (a scheduler's own trace).
      const captured = error instanceof SimulationError && error.traceTail.length > 0 ? error.traceTail : trace.tail();
      const tail = captured.slice(Math.max(0, captured.length - tailLines));
      const reason = error instanceof Error ? (error.stack ?? error.message) : String(error);
      const message =
        `SIMULATION FAILED seed=${seed} (replay: MIRRORSAN_SEED=${seed}; add MIRRORSAN_TRACE=1 for the full trace)\n` +
        `${reason}\n--- last ${tail.length} of ${trace.totalLines} trace lines ---\n${tail.join('\n')}`;
      throw new SimulationFailure(seed, message, tail, error);
    }
  }
  return { seedsRun: seeds.length, firstSeed: seeds[0], lastSeed: seeds[seeds.length - 1] };
}
