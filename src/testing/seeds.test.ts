// Proves the seed runner: which seeds run (count, list, environment overrides), that it stops
// at the first failure, and that the failure names the seed and carries the trace tail.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Scheduler } from './scheduler.js';
import { SimulationFailure, resolveSeeds, runSeeds } from './seeds.js';

test('a count runs consecutive seeds from the base; a list runs as given', async () => {
  const seen: number[] = [];
  const result = await runSeeds({ seeds: 4, env: {}, scenario: (seed) => void seen.push(seed) });
  assert.deepEqual(seen, [1, 2, 3, 4]);
  assert.deepEqual(result, { seedsRun: 4, firstSeed: 1, lastSeed: 4 });
  assert.deepEqual(resolveSeeds({ seeds: 3, seedBase: 100, env: {} }), [100, 101, 102]);
  assert.deepEqual(resolveSeeds({ seeds: [184, 2688], env: {} }), [184, 2688]);
  assert.deepEqual(resolveSeeds({ seeds: 0, env: {} }), []);
});

test('MIRRORSAN_SEED replays one seed; MIRRORSAN_SEEDS and MIRRORSAN_SEED_BASE steer counted runs', () => {
  assert.deepEqual(resolveSeeds({ seeds: 300, env: { MIRRORSAN_SEED: '77' } }), [77]);
  assert.deepEqual(resolveSeeds({ seeds: [1, 2], env: { MIRRORSAN_SEED: '77' } }), [77]);
  assert.deepEqual(resolveSeeds({ seeds: 300, env: { MIRRORSAN_SEEDS: '2' } }), [1, 2]);
  assert.deepEqual(resolveSeeds({ seeds: [5], env: { MIRRORSAN_SEEDS: '2' } }), [5], 'a regression list is not a count');
  assert.deepEqual(resolveSeeds({ seeds: 2, env: { MIRRORSAN_SEED_BASE: '1000' } }), [1000, 1001]);
  assert.throws(() => resolveSeeds({ seeds: 2, env: { MIRRORSAN_SEED: 'x' } }), /MIRRORSAN_SEED must be/);
  assert.throws(() => resolveSeeds({ seeds: 2, env: { MIRRORSAN_SEEDS: '-1' } }), /MIRRORSAN_SEEDS must be/);
});

test('the first failing seed stops the run with SIMULATION FAILED seed=<n> and the trace tail', async () => {
  const seen: number[] = [];
  await assert.rejects(
    runSeeds({
      seeds: 10,
      env: {},
      traceTailLines: 3,
      scenario: async (seed, run) => {
        seen.push(seed);
        const scheduler = new Scheduler({ seed, trace: run.trace });
        for (let step = 1; step <= 5; step++) scheduler.at(step, () => scheduler.log(`step ${step} of seed ${seed}`));
        await scheduler.runUntil(10);
        if (seed === 3) throw new Error('replicas diverged');
      },
    }),
    (error: unknown) => {
      assert.ok(error instanceof SimulationFailure);
      assert.match(error.message, /^SIMULATION FAILED seed=3 \(replay: MIRRORSAN_SEED=3/);
      assert.match(error.message, /replicas diverged/);
      assert.match(error.message, /last 3 of 5 trace lines ---\n3ms step 3 of seed 3\n4ms step 4 of seed 3\n5ms step 5 of seed 3$/);
      assert.equal(error.seed, 3);
      assert.equal((error.cause as Error).message, 'replicas diverged');
      return true;
    },
  );
  assert.deepEqual(seen, [1, 2, 3]);
});

test('a scheduler failure inside a scenario reports the seed and the scheduler trace', async () => {
  await assert.rejects(
    runSeeds({
      seeds: [42],
      env: {},
      scenario: async (seed, run) => {
        const scheduler = new Scheduler({ seed, trace: run.trace });
        const spin = (): void => {
          scheduler.log('spinning');
          scheduler.after(1, spin);
        };
        scheduler.after(0, spin);
        await scheduler.runUntil(() => false, { stepsMax: 50 });
      },
    }),
    (error: unknown) => {
      assert.ok(error instanceof SimulationFailure);
      assert.match(error.message, /^SIMULATION FAILED seed=42[^]*runaway simulation: 50 steps[^]*49ms spinning$/);
      return true;
    },
  );
});
