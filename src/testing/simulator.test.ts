// Proves the simulator end to end: the example replicated register survives hundreds of seeded
// runs of network faults, crashes, torn writes, corruption and disk replacement with every
// checker green (I1, I4, I5, linearizability, liveness), a seed replays exactly, and each
// deliberate bug is caught by some seed, whose failure names it.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { runRegisterScenario, type RegisterBug, type RegisterScenarioReport } from './example-register.js';
import { SimulationFailure, runSeeds } from './seeds.js';
import { Trace } from './trace.js';

/** Seeds that once failed (liveness bugs found while the example was written): they must stay green. */
const REGRESSION_SEEDS = [184, 2688];

test('300 seeds of the correct protocol pass every checker, under real faults', async () => {
  const totals = {
    runs: 0,
    writesAcknowledged: 0,
    readsAnswered: 0,
    crashes: 0,
    wipes: 0,
    recoveryCuts: 0,
    writtenBackAtCrash: 0,
    diskFaults: {} as Record<string, number>,
    linkFailures: 0,
    partitions: 0,
    clogs: 0,
    droppedInFlight: 0,
    profiles: new Set<string>(),
  };
  const add = (report: RegisterScenarioReport): void => {
    totals.runs++;
    totals.writesAcknowledged += report.writesAcknowledged;
    totals.readsAnswered += report.readsAnswered;
    totals.crashes += report.crashes;
    totals.wipes += report.wipes;
    totals.recoveryCuts += report.recoveryCuts;
    totals.writtenBackAtCrash += report.writtenBackAtCrash;
    for (const [kind, count] of Object.entries(report.diskFaults)) totals.diskFaults[kind] = (totals.diskFaults[kind] ?? 0) + count;
    totals.linkFailures += report.network.linkFailures;
    totals.partitions += report.network.partitions;
    totals.clogs += report.network.clogs;
    totals.droppedInFlight += report.network.droppedInFlight;
    totals.profiles.add(report.networkProfile);
  };
  const result = await runSeeds({ seeds: 300, scenario: async (seed, run) => add(await runRegisterScenario(seed, run)) });
  assert.equal(totals.runs, result.seedsRun);
  if (result.seedsRun < 300) return; // a replay (MIRRORSAN_SEED) or a shorter exploration: no fault quotas
  // The run must not pass vacuously: every kind of fault happened, and work got done through them.
  const summary = JSON.stringify({ ...totals, profiles: [...totals.profiles] });
  assert.ok(totals.writesAcknowledged > 3000 && totals.readsAnswered > 3000, summary);
  assert.ok(totals.crashes > 500 && totals.wipes > 50, summary);
  assert.ok((totals.diskFaults['torn-write'] ?? 0) > 5 && (totals.diskFaults['corruption'] ?? 0) > 50 && totals.recoveryCuts > 50, summary);
  assert.ok(totals.writtenBackAtCrash > 10, summary);
  assert.ok(totals.linkFailures > 1000 && totals.partitions > 100 && totals.clogs > 100 && totals.droppedInFlight > 100, summary);
  assert.equal(totals.profiles.size, 5, summary);
});

test('regression seeds stay green', async () => {
  await runSeeds({ seeds: REGRESSION_SEEDS, env: {}, scenario: (seed, run) => runRegisterScenario(seed, run).then(() => undefined) });
});

test('a seed replays exactly: same report, same trace', async () => {
  const run = async (seed: number) => {
    const trace = new Trace({ capacityLines: 2000, echo: false });
    const report = await runRegisterScenario(seed, { seed, trace });
    return { report, trace: trace.tail(), lines: trace.totalLines };
  };
  const first = await run(31);
  assert.deepEqual(await run(31), first);
  assert.notDeepEqual((await run(32)).trace, first.trace);
});

async function firstFailure(bug: RegisterBug, seeds: number): Promise<SimulationFailure> {
  try {
    await runSeeds({ seeds, env: {}, scenario: (seed, run) => runRegisterScenario(seed, run, { bug }).then(() => undefined) });
  } catch (error) {
    assert.ok(error instanceof SimulationFailure, String(error));
    return error;
  }
  assert.fail(`bug ${bug} survived ${seeds} seeds: the checkers cannot see it`);
}

test('acknowledging before replication is caught within 100 seeds, and the failing seed replays', async () => {
  const failure = await firstFailure('ackBeforeReplicated', 100);
  assert.match(failure.message, /^SIMULATION FAILED seed=\d+ /);
  assert.match(failure.message, /I1 violated|linearizability violated/);
  assert.ok(failure.traceTail.length > 0);
  // Replaying the seed fails the same way: a failing seed is a regression test.
  await assert.rejects(runRegisterScenario(failure.seed, { seed: failure.seed, trace: new Trace() }, { bug: 'ackBeforeReplicated' }), (error: unknown) => {
    assert.ok(error instanceof Error);
    assert.equal(error.message.split('\n')[0], (failure.cause as Error).message.split('\n')[0]);
    return true;
  });
  // And the same seed is green once the bug is gone.
  await runRegisterScenario(failure.seed, { seed: failure.seed, trace: new Trace() });
});

test('serving uncommitted reads is caught within 300 seeds', async () => {
  const failure = await firstFailure('readUncommitted', 300);
  assert.match(failure.message, /^SIMULATION FAILED seed=\d+ /);
  assert.match(failure.message, /linearizability violated|I1 violated/);
});
