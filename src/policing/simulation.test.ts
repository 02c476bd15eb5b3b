// Proves the grant protocol in the seeded simulator: hundreds of seeds of three writers (one also the arbiter) under delays, cross-link reordering, link failures, partitions, clogs and epoch changes keep mutual exclusion, grant-generation order and arbiter FIFO, and complete every write once faults stop; a seed replays exactly; and each deliberate bug is caught within a few seeds.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SimulationFailure, runSeeds } from '../testing/seeds.js';
import { Trace } from '../testing/trace.js';
import { runPolicingScenario, type PolicingScenarioOptions, type PolicingScenarioReport } from './simulation.js';

test('500 seeds: safety, FIFO and liveness hold under network faults', async () => {
  const totals = { runs: 0, writesCompleted: 0, handovers: 0, grants: 0, revokes: 0, linkFailures: 0, epochChanges: 0, profiles: new Set<string>() };
  const add = (report: PolicingScenarioReport): void => {
    totals.runs++;
    totals.writesCompleted += report.writesCompleted;
    totals.handovers += report.handovers;
    totals.grants += report.grants;
    totals.revokes += report.revokes;
    totals.linkFailures += report.linkFailures;
    totals.epochChanges += report.epochChanges;
    totals.profiles.add(report.networkProfile);
  };
  const result = await runSeeds({ seeds: 500, scenario: (seed, run) => add(runPolicingScenario(seed, run)) });
  if (result.seedsRun < 500) return; // a replay (MIRRORSAN_SEED) or a shorter exploration: no quotas
  // Not vacuous: real contention (regions changing hands), and real link failures to recover from.
  const summary = JSON.stringify({ ...totals, profiles: [...totals.profiles] });
  assert.ok(totals.writesCompleted > 10_000 && totals.handovers > 10_000 && totals.revokes > 10_000, summary);
  assert.ok(totals.linkFailures > 500 && totals.epochChanges > 200, summary);
  assert.equal(totals.profiles.size, 5, summary);
});

test('single-writer mode (one region) and a wide volume (16 regions, more clients) stay safe and live', async () => {
  await runSeeds({ seeds: 100, scenario: (seed, run) => void runPolicingScenario(seed, run, { regionCount: 1, clientsPerNode: 3 }) });
  await runSeeds({ seeds: 100, seedBase: 1000, scenario: (seed, run) => void runPolicingScenario(seed, run, { regionCount: 16, clientsPerNode: 4 }) });
});

test('a bounded arbiter queue (one waiter per region) refuses writes cleanly and stays safe and live', async () => {
  let refused = 0;
  let completed = 0;
  await runSeeds({
    seeds: 100,
    seedBase: 2000,
    scenario: (seed, run) => {
      const report = runPolicingScenario(seed, run, { waitersPerRegionMax: 1 });
      refused += report.writesRefused;
      completed += report.writesCompleted;
    },
  });
  assert.ok(refused > 50 && completed > 1000, `refused ${refused}, completed ${completed}`);
});

test('a seed replays exactly: same report, same trace', () => {
  const replay = (seed: number) => {
    const trace = new Trace({ capacityLines: 2000, echo: false });
    const report = runPolicingScenario(seed, { seed, trace });
    return { report, trace: trace.tail(), lines: trace.totalLines };
  };
  const first = replay(7);
  assert.deepEqual(replay(7), first);
  assert.notDeepEqual(replay(8).trace, first.trace);
});

async function firstFailure(options: PolicingScenarioOptions, seeds: number): Promise<SimulationFailure> {
  try {
    await runSeeds({ seeds, env: {}, scenario: (seed, run) => void runPolicingScenario(seed, run, options) });
  } catch (error) {
    assert.ok(error instanceof SimulationFailure, String(error));
    assert.match(error.message, /^SIMULATION FAILED seed=\d+ /);
    return error;
  }
  assert.fail(`${JSON.stringify(options)} survived ${seeds} seeds: the checkers cannot see it`);
}

test('a holder that releases before its writes are acknowledged is caught (mutual exclusion) within 20 seeds', async () => {
  const failure = await firstFailure({ holderBug: 'releaseBeforeAcknowledged' }, 20);
  assert.match(failure.message, /mutual exclusion violated/);
  // The failing seed replays, and is green without the bug.
  assert.throws(() => runPolicingScenario(failure.seed, { seed: failure.seed, trace: new Trace() }, { holderBug: 'releaseBeforeAcknowledged' }), /mutual exclusion violated/);
  runPolicingScenario(failure.seed, { seed: failure.seed, trace: new Trace() });
});

test('an arbiter that grants LIFO instead of FIFO is caught within 20 seeds', async () => {
  const failure = await firstFailure({ arbiterBug: 'grantLifo' }, 20);
  assert.match(failure.message, /FIFO violated/);
});

test('a holder that never resends its requests is caught (liveness deadline) within 20 seeds', async () => {
  const failure = await firstFailure({ holderBug: 'noResend' }, 20);
  assert.match(failure.message, /missed its deadline/);
});

test('a new epoch\'s arbiter that grants before every member drained is caught (mutual exclusion across epochs) within 50 seeds', async () => {
  const failure = await firstFailure({ arbiterBug: 'noEpochFence' }, 50);
  assert.match(failure.message, /mutual exclusion violated/);
});
