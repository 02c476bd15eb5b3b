// Policing: the grant protocol that gives one node at a time write priority over each region
// of a volume (DESIGN.md §5b, docs/replication.md "Grant protocol"). Pure state machines; the
// node's shell carries their messages over peer links and feeds them time.
export { Arbiter } from './arbiter.js';
export type { ArbiterBug, ArbiterConfig, ArbiterEffect, ArbiterIgnoredReason } from './arbiter.js';
export { Holder } from './holder.js';
export type { HolderBug, HolderConfig, HolderEffect, HolderIgnoredReason } from './holder.js';
export { describePolicingMessage, fromWireGrantMessage, policingRecipient, toWireGrantMessage } from './messages.js';
export type { DrainedMessage, GrantRefusedMessage, NodeId, PolicingMessage } from './messages.js';
export { REGION_SIZE_MIN_BYTES, isAscendingRegions, regionCount, regionsOf, validateRegionSize } from './regions.js';
