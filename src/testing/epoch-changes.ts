// The simulated coordinator's epoch changes, shared by the simulations that run the grant
// protocol (src/policing/simulation.ts, src/testing/cluster-simulation.ts): with the seed's
// probability, one or two changes at random times of the workload, each to a new epoch with a
// randomly chosen arbiter (the same in-sync set), and each heard by every node after its own
// delay (so nodes disagree for a while, and one may hear of a later epoch first).
import type { Prng } from './prng.js';
import type { Scheduler } from './scheduler.js';

export interface EpochChangesOptions {
  scheduler: Scheduler;
  /** The seed's stream for epoch changes (a fork of the run's root). */
  prng: Prng;
  /** Chance that this run has any epoch change at all. */
  probability: number;
  /** Changes happen within [50, workloadMs - 50] ms. */
  workloadMs: number;
  /** The nodes, in order: each may become the arbiter, each hears of every change. */
  nodes: readonly string[];
  firstEpoch: number;
  firstArbiter: string;
  /** Called when the coordinator changed the record (for reports). */
  onChange?: (epoch: number, arbiter: string) => void;
  /** Called when `node` hears of the change, after its own delay (0..60 ms). */
  deliver: (node: string, epoch: number, arbiter: string) => void;
}

/** The coordinator's current record, as the simulation's checkers see it at the end. */
export interface SimulatedRecord {
  readonly epoch: number;
  readonly arbiter: string;
}

/** Schedules the run's epoch changes; the returned record follows them. */
export function scheduleEpochChanges(options: EpochChangesOptions): SimulatedRecord {
  const { scheduler, prng } = options;
  const record = { epoch: options.firstEpoch, arbiter: options.firstArbiter };
  if (!prng.chance(options.probability)) return record;
  const changes = prng.int(1, 2);
  for (let change = 0; change < changes; change++) {
    scheduler.after(prng.int(50, options.workloadMs - 50), () => {
      record.epoch++;
      record.arbiter = prng.pick(options.nodes);
      options.onChange?.(record.epoch, record.arbiter);
      scheduler.log(`coordinator: epoch ${record.epoch} arbiter ${record.arbiter}`);
      const [epoch, arbiter] = [record.epoch, record.arbiter];
      for (const node of options.nodes) scheduler.after(prng.int(0, 60), () => options.deliver(node, epoch, arbiter), `epoch ${epoch} -> ${node}`);
    }, 'coordinator');
  }
  return record;
}
