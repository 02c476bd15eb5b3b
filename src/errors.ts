// One error base for the whole project, with stable codes that logs, the admin API and
// tests match on. Codes are documented in docs/errors.md; never reuse or rename one.

export const ERROR_CODES = {
  // Configuration and CLI
  CONFIG_INVALID: 'a configuration value or command-line argument is invalid',
  SIZE_INVALID: 'a size string could not be parsed (use bytes, KiB, MiB, GiB, TiB)',
  // NBD protocol
  NBD_BAD_MAGIC: 'a peer sent a frame whose magic number is wrong',
  NBD_BAD_FLAGS: 'a client sent handshake flags this server does not know',
  NBD_OPTION_TOO_LARGE: 'an option payload is larger than the server accepts',
  NBD_PROTOCOL: 'a peer broke the NBD protocol; the connection is closed',
  NBD_EINVAL: 'an NBD request is invalid (range, alignment, flags, command)',
  NBD_EPERM: 'an NBD write to a read-only export',
  NBD_ENOSPC: 'an NBD write past the end of the export',
  NBD_EOVERFLOW: 'an NBD request is longer than the advertised maximum',
  NBD_ENOTSUP: 'an NBD request asked for something this export cannot do fast',
  NBD_EIO: 'an I/O error on the volume',
  NBD_SHUTDOWN: 'the server is shutting down',
  NBD_CLIENT: 'the NBD client got an error reply or a broken connection',
  NBD_TLS: 'TLS negotiation failed or was required',
  // Journal and store
  JOURNAL_CORRUPT: 'the write-ahead log has a corrupt entry before its tail',
  JOURNAL_CLOSED: 'the write-ahead log is closed',
  JOURNAL_IO: 'the write-ahead log could not be written or synced; it accepts no more entries',
  STORE_IO: 'the image file or its metadata could not be read or written',
  STORE_RANGE: 'a store request falls outside the volume',
  VOLUME_NOT_FOUND: 'no volume by that name',
  VOLUME_BUSY: 'the volume has too many requests in flight',
  // Cluster coordinator (src/cluster/)
  COORD_UNAVAILABLE: 'the coordinator (etcd, or the embedded directory) did not answer in time or failed',
  COORD_CORRUPT: 'a coordinator entry could not be parsed or breaks its invariants',
  COORD_CLOSED: 'the coordinator client is closed',
  COORD_NODE_ID_TAKEN: 'another live registration holds this node id and its lease did not expire in time',
  // Replication (src/replication/)
  REPL_BAD_FRAME: 'a peer sent a malformed replication frame (magic, type, flags or a field); the connection is closed',
  REPL_CRC_MISMATCH: 'a replication frame failed its CRC32C check (corrupted in transit); the connection is closed',
  REPL_VERSION_MISMATCH: 'a peer speaks another replication protocol version; the connection is closed',
  REPL_FRAME_TOO_LARGE: 'a peer announced a frame body over the limit; refused before any of it was buffered',
  REPL_AUTH: 'a peer failed authentication (wrong HMAC, unknown or unexpected node id, frame out of order)',
  REPL_CLUSTER_MISMATCH: 'a peer belongs to another cluster (its cluster id differs from ours)',
  REPL_HANDSHAKE_TIMEOUT: 'a peer did not finish the authentication handshake in time',
  REPL_BUSY: 'the peer port refused a connection: too many unauthenticated connections at once',
  REPL_EPOCH_STALE: 'a frame carries an epoch older than the receiver\'s for its volume; refused, never applied',
  REPL_PEER_CLOSED: 'a peer link closed or was declared dead (no frame received within the dead-after time)',
  // Disk failure: diskless mode (src/volume/diskless*.ts)
  VOLUME_DISKLESS: "this node's disk for the volume failed (EIO, ENOSPC); its requests are forwarded to an in-sync peer",
  FAULT_INJECTION_DISABLED: 'fault injection was asked for on a node that does not enable it (MIRRORSAN_FAULT_INJECTION=1 or faultInjection: true)',
} as const;

export type ErrorCode = keyof typeof ERROR_CODES;

export class MirrorsanError extends Error {
  readonly code: ErrorCode;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'MirrorsanError';
    this.code = code;
  }
}

export function isMirrorsanError(error: unknown, code?: ErrorCode): error is MirrorsanError {
  return error instanceof MirrorsanError && (code === undefined || error.code === code);
}

/** Programmer errors crash loudly: an invariant that does not hold is a bug, not input. */
export function assert(condition: unknown, message: string): asserts condition {
  if (!condition) throw new Error(`assertion failed: ${message}`);
}
