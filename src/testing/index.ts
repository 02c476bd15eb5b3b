// Deterministic simulation for mirrorsan's protocols: one seeded PRNG, one scheduler (the only
// clock), a simulated network and disks, reusable checkers and a seed runner. See
// docs/replication.md ("Simulator") and example-register.ts for a protocol run end to end.
export { Prng } from './prng.js';
export { Scheduler, ScheduledEvent, STEPS_MAX_DEFAULT, PENDING_EVENTS_MAX_DEFAULT, realTimers } from './scheduler.js';
export type { Cancellable, Clock, RunOptions, RunResult, Timers } from './scheduler.js';
export { Trace, SimulationError, InvariantViolation, TRACE_LINES_DEFAULT } from './trace.js';
export { SimNetwork, NETWORK_PROFILES, randomNetworkProfile } from './network.js';
export type { Link, LinkStatus, NetworkHandler, NetworkProfile, NetworkStats, NodeId } from './network.js';
export {
  SimDisk,
  SimFile,
  DISK_PROFILES,
  HONEST_DISK_PROFILES,
  SECTOR_BYTES_DEFAULT,
  DIRTY_OPERATIONS_MAX_DEFAULT,
  FAULT_RECORDS_MAX,
  randomDiskProfile,
} from './disk.js';
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
export { SimStore, StoreCorruptError, HONEST_STORE_FAULTS, OWN_LOG } from './sim-store.js';
export type { CrashKind, ReplayedEntry, SimStoreOptions, SourceRecovery, StoreFaults, StoreRecovery } from './sim-store.js';
export { SimCoordinator, COORDINATOR, classifyRecordChange } from './sim-coordinator.js';
export type { CoordinatorReply, CoordinatorReplyBody, CoordinatorRequest, CoordinatorRequestBody, RecordChangeKind, SimCoordinatorOptions } from './sim-coordinator.js';
export { runSeeds, resolveSeeds, SimulationFailure } from './seeds.js';
export type { RunSeedsOptions, RunSeedsResult, SeedRun } from './seeds.js';
// The worked example: a replicated register run through all of the above (see its header).
export { RegisterReplica, RegisterNode, runRegisterScenario, decodeRegisterLog, encodeRegisterRecord, REGISTER_RECORD_BYTES } from './example-register.js';
export type { RegisterBug, RegisterConfig, RegisterEffect, RegisterEntry, RegisterMessage, RegisterReply, RegisterScenarioOptions, RegisterScenarioReport } from './example-register.js';
