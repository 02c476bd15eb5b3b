// Replication: the wire codec, peer authentication and peer links (docs/replication.md).
export * from './codec.js';
export * from './auth.js';
export {
  DEFAULT_PEER_LIMITS,
  DEFAULT_PEER_TIMINGS,
  PeerConnection,
  PeerLink,
  PeerListener,
  resolvePeerLimits,
  resolvePeerTimings,
} from './peer-link.js';
export type {
  PeerConnectionHandlers,
  PeerConnectionStats,
  PeerLimits,
  PeerLinkOptions,
  PeerLinkState,
  PeerListenerOptions,
  PeerMessage,
  PeerTimings,
  StaleEpochCheck,
} from './peer-link.js';
