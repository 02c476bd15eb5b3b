// The mirrorsan library: `import { NbdClient, NbdServer, LocalVolume } from 'mirrorsan'`.
export * from './nbd/index.js';
export { LocalVolume } from './volume/local-volume.js';
export type { BlockDevice, DeviceGeometry, Extent, ExportRegistry, ReadPiece, WriteOptions, ZeroOptions } from './volume/device.js';
export { MirrorsanError, isMirrorsanError, ERROR_CODES } from './errors.js';
export type { ErrorCode } from './errors.js';
export { MirrorsanNode } from './node/node.js';
export { parseNodeConfig } from './node/config.js';
export type { NodeConfig } from './node/config.js';
export { createLogger } from './util/log.js';
export type { Logger } from './util/log.js';
export { parseSize, formatSize } from './util/size.js';
export { createCoordinator, parseCoordinatorUrl, EmbeddedCoordinator } from './cluster/index.js';
export type { Coordinator, NodeSession, VolumeRecord, VolumeSpec, NodeRegistration } from './cluster/index.js';
export * as replication from './replication/index.js';
