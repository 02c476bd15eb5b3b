// The mirror engine's pure core for one volume (docs/replication.md): the source side orders
// and streams this node's writes, the target side receives one source's stream. I/O shells
// (LocalVolume, the node's peer links) perform their effects.
export { ReplicationSource, DEFAULT_SOURCE_LIMITS, resolveSourceLimits } from './source.js';
export type {
  ClientWrite,
  OperationResult,
  ReplicationMode,
  SourceBug,
  SourceConfig,
  SourceEffect,
  SourceEntry,
  SourceInboundMessage,
  SourceLimits,
  SourceMessage,
} from './source.js';
export { ReplicationTarget, DEFAULT_TARGET_LIMITS, resolveTargetLimits } from './target.js';
export type {
  TargetConfig,
  TargetEffect,
  TargetEntry,
  TargetInboundMessage,
  TargetLimits,
  TargetMessage,
  TargetRecovered,
} from './target.js';
