// The public face of mirrorsan's NBD front end: the server, the client, the wire constants
// and the codec (for tools that speak NBD themselves).
export { NbdServer, NBD_SERVER_LIMITS_DEFAULT, resolveLimits } from './server.js';
export type { NbdServerLimits, NbdServerOptions, NbdServerStats, NbdServerTlsOptions, NbdListenAddress, NbdListenTarget } from './server.js';
export type { ConnectionStats as NbdConnectionStats, ConnectionPhase as NbdConnectionPhase } from './connection.js';
export { NbdClient, NbdClientError } from './client.js';
export type { NbdClientOptions, NbdClientTlsOptions, NbdTarget, BlockSizes, BlockStatusExtent, RawRequest, RawReply } from './client.js';
export { StaticExportRegistry } from './registry.js';
export * from './protocol.js';
export * as nbdCodec from './codec.js';
export { MemoryDevice, MEMORY_BLOCK_BYTES } from '../volume/memory-device.js';
export type { MemoryDeviceOptions, MemoryDeviceCounters } from '../volume/memory-device.js';
