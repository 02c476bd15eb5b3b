// Deterministic simulation for mirrorsan's protocols: one seeded PRNG, one scheduler (the only
// clock), a simulated network and disks, reusable checkers and a seed runner. See
// docs/replication.md ("Simulator") and example-register.ts for a protocol run end to end.
export { Prng } from './prng.js';
export { Scheduler, ScheduledEvent, STEPS_MAX_DEFAULT, realTimers } from './scheduler.js';
export type { Cancellable, Clock, RunOptions, RunResult, Timers } from './scheduler.js';
export { Trace, SimulationError, InvariantViolation, TRACE_LINES_DEFAULT } from './trace.js';
export { SimNetwork, NETWORK_PROFILES, randomNetworkProfile } from './network.js';
export type { Link, NetworkHandler, NetworkProfile, NetworkStats, NodeId } from './network.js';
export { SimDisk, SimFile, DISK_PROFILES, HONEST_DISK_PROFILES, SECTOR_BYTES_DEFAULT, randomDiskProfile } from './disk.js';
export type { DiskFaultKind, DiskFaultRecord, DiskProfile, DiskStats, SimIoError } from './disk.js';
export {
  BlockHistory,
  assertCheck,
  checkBlockLinearizable,
  checkDurability,
  checkReplicasConverged,
  firstDifference,
} from './checker.js';
export type { CheckResult, FlushRecord, ReadRecord, RegisterValue, WriteRecord } from './checker.js';
export { runSeeds, resolveSeeds, SimulationFailure } from './seeds.js';
export type { RunSeedsOptions, RunSeedsResult, SeedRun } from './seeds.js';
