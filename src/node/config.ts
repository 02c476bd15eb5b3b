// A node's configuration: validated once, limits derived, then frozen (fastify's habit). The
// file is what `mirrorsan up` writes and `mirrorsan node --config FILE` reads back, so a node
// killed with SIGKILL restarts from exactly what it ran with.
import { MirrorsanError } from '../errors.js';
import { parseCoordinatorUrl } from '../cluster/index.js';
import { parseSize } from '../util/size.js';

export interface Endpoint {
  host: string;
  port: number;
}

export interface VolumeConfig {
  name: string;
  sizeBytes: number;
  description: string;
  readOnly: boolean;
}

export interface TlsConfig {
  certFile: string;
  keyFile: string;
  /** Refuse every export until the client has done STARTTLS. */
  required: boolean;
}

export interface NodeConfig {
  id: string;
  /** Where this node keeps its volumes: DATA_DIR/volumes/NAME/. */
  dataDir: string;
  nbd: Endpoint;
  /** Node-to-node traffic; may sit on a dedicated interface (DESIGN.md §1 A3). */
  peer: Endpoint;
  admin: Endpoint;
  /** Volumes listed here are served as they are; with a coordinator, its volume specs are served too. */
  volumes: VolumeConfig[];
  /** `embedded:///dir` or `etcd://host:port[/cluster]`; null: no coordinator (static volumes only). */
  coordinator: string | null;
  /** The node's registration lease at the coordinator. */
  leaseTtlMs: number;
  tls: TlsConfig | null;
  checkpointLogBytes: number;
  checkpointIntervalMs: number;
  /** Aligned writes at least this large skip the log's payload and go to the image only. */
  directWriteMinBytes: number;
  /** libuv thread pool size: file I/O parallelism. */
  threadPoolSize: number;
  /** The shared secret peers authenticate with (replicated volumes need it); null: no replication. */
  clusterSecretFile?: string | null;
  /**
   * A peer with no link up for this long counts as failed: once its lease is gone too it is
   * removed from the in-sync set, and a node that cannot reach a majority of a volume's
   * replicas for this long fences the volume (docs/replication.md, issue 5).
   */
  failureTimeoutMs: number;
  /**
   * A returning replica copies what it missed at most this fast (bytes per second; 0:
   * unlimited), so that its catch-up leaves room for the clients' I/O.
   */
  catchUpRateBytesPerSec: number;
  /**
   * Test configuration only: enables the admin API's fault injection (`POST /v1/faults`: make a
   * volume's image writes fail with EIO or ENOSPC). Default false; MIRRORSAN_FAULT_INJECTION=1
   * in the node's environment enables it too (src/node/faults.ts).
   */
  faultInjection: boolean;
}

/** Default catch-up copy rate: well under a disk's, over what a 2-way write path takes here. */
export const DEFAULT_CATCH_UP_RATE_BYTES_PER_SEC = 256 * 1024 * 1024;

/** Default failure timeout: a few missed heartbeats (PeerTimings.heartbeatIntervalMs is 200 ms). */
export const DEFAULT_FAILURE_TIMEOUT_MS = 1000;

const VOLUME_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
const NODE_ID = /^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$/;

function fail(message: string): never {
  throw new MirrorsanError('CONFIG_INVALID', message);
}

function asObject(value: unknown, what: string): Record<string, unknown> {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) fail(`${what} must be an object`);
  return value as Record<string, unknown>;
}

function asString(value: unknown, what: string): string {
  if (typeof value !== 'string' || value.length === 0) fail(`${what} must be a non-empty string`);
  return value;
}

function asPort(value: unknown, what: string): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 0 || value > 65535) {
    fail(`${what} must be a port number 0..65535, got ${JSON.stringify(value)}`);
  }
  return value;
}

function asBoolean(value: unknown, what: string): boolean {
  if (typeof value !== 'boolean') fail(`${what} must be true or false, got ${JSON.stringify(value)}`);
  return value;
}

/** Accepts a number of bytes or a size string ("1GiB"). */
function asSize(value: unknown, what: string): number {
  if (typeof value === 'number' && Number.isSafeInteger(value) && value >= 0) return value;
  if (typeof value === 'string') return parseSize(value);
  fail(`${what} must be a size (bytes or a string like "1GiB"), got ${JSON.stringify(value)}`);
}

function asEndpoint(value: unknown, what: string): Endpoint {
  const object = asObject(value, what);
  return Object.freeze({ host: asString(object.host ?? '127.0.0.1', `${what}.host`), port: asPort(object.port, `${what}.port`) });
}

export function validateVolumeName(name: string): string {
  if (!VOLUME_NAME.test(name)) {
    fail(`volume name "${name}" must be 1-64 characters of letters, digits, '.', '_' or '-', starting with a letter or digit`);
  }
  return name;
}

export const VOLUME_SIZE_MIN_BYTES = 1024 * 1024;
export const VOLUME_SIZE_MAX_BYTES = 2 ** 50; // 1 PiB: offsets stay exact JavaScript numbers

export function validateVolumeSize(sizeBytes: number, name: string): number {
  if (sizeBytes < VOLUME_SIZE_MIN_BYTES || sizeBytes > VOLUME_SIZE_MAX_BYTES) {
    fail(`volume ${name}: size ${sizeBytes} bytes is outside 1MiB..1PiB`);
  }
  if (sizeBytes % 4096 !== 0) fail(`volume ${name}: size ${sizeBytes} must be a multiple of 4096 bytes`);
  return sizeBytes;
}

export function parseNodeConfig(raw: unknown): NodeConfig {
  const object = asObject(raw, 'node config');
  const id = asString(object.id, 'id');
  if (!NODE_ID.test(id)) fail(`node id "${id}" must be 1-32 letters, digits, '_' or '-'`);
  const volumesRaw = object.volumes ?? [];
  if (!Array.isArray(volumesRaw)) fail('volumes must be an array');
  const names = new Set<string>();
  const volumes = volumesRaw.map((entry, index) => {
    const volume = asObject(entry, `volumes[${index}]`);
    const name = validateVolumeName(asString(volume.name, `volumes[${index}].name`));
    if (names.has(name)) fail(`volume ${name} is listed twice`);
    names.add(name);
    return Object.freeze({
      name,
      sizeBytes: validateVolumeSize(asSize(volume.sizeBytes ?? volume.size, `volumes[${index}].sizeBytes`), name),
      description: typeof volume.description === 'string' ? volume.description : `mirrorsan volume ${name}`,
      readOnly: volume.readOnly === true,
    });
  });
  let tls: TlsConfig | null = null;
  if (object.tls !== undefined && object.tls !== null) {
    const tlsObject = asObject(object.tls, 'tls');
    tls = Object.freeze({
      certFile: asString(tlsObject.certFile, 'tls.certFile'),
      keyFile: asString(tlsObject.keyFile, 'tls.keyFile'),
      required: tlsObject.required === true,
    });
  }
  let coordinator: string | null = null;
  if (object.coordinator !== undefined && object.coordinator !== null) {
    coordinator = asString(object.coordinator, 'coordinator');
    parseCoordinatorUrl(coordinator);
  }
  const leaseTtlMs = object.leaseTtlMs ?? 5000;
  if (typeof leaseTtlMs !== 'number' || !Number.isInteger(leaseTtlMs) || leaseTtlMs < 1000 || leaseTtlMs > 600_000) {
    fail('leaseTtlMs must be an integer 1000..600000');
  }
  const threadPoolSize = object.threadPoolSize ?? 16;
  if (typeof threadPoolSize !== 'number' || !Number.isInteger(threadPoolSize) || threadPoolSize < 4 || threadPoolSize > 1024) {
    fail('threadPoolSize must be an integer 4..1024');
  }
  const checkpointIntervalMs = object.checkpointIntervalMs ?? 30_000;
  if (typeof checkpointIntervalMs !== 'number' || !Number.isInteger(checkpointIntervalMs) || checkpointIntervalMs < 100) {
    fail('checkpointIntervalMs must be an integer >= 100');
  }
  const failureTimeoutMs = object.failureTimeoutMs ?? DEFAULT_FAILURE_TIMEOUT_MS;
  if (typeof failureTimeoutMs !== 'number' || !Number.isInteger(failureTimeoutMs) || failureTimeoutMs < 100 || failureTimeoutMs > 600_000) {
    fail('failureTimeoutMs must be an integer 100..600000');
  }
  return Object.freeze({
    id,
    dataDir: asString(object.dataDir, 'dataDir'),
    nbd: asEndpoint(object.nbd, 'nbd'),
    peer: asEndpoint(object.peer, 'peer'),
    admin: asEndpoint(object.admin, 'admin'),
    volumes: Object.freeze(volumes) as VolumeConfig[],
    coordinator,
    leaseTtlMs,
    tls,
    checkpointLogBytes: asSize(object.checkpointLogBytes ?? 256 * 1024 * 1024, 'checkpointLogBytes'),
    checkpointIntervalMs,
    directWriteMinBytes: asSize(object.directWriteMinBytes ?? 64 * 1024, 'directWriteMinBytes'),
    threadPoolSize,
    failureTimeoutMs,
    catchUpRateBytesPerSec: asSize(object.catchUpRateBytesPerSec ?? DEFAULT_CATCH_UP_RATE_BYTES_PER_SEC, 'catchUpRateBytesPerSec'),
    faultInjection: asBoolean(object.faultInjection ?? false, 'faultInjection'),
    clusterSecretFile: object.clusterSecretFile === undefined || object.clusterSecretFile === null ? null : asString(object.clusterSecretFile, 'clusterSecretFile'),
  });
}

/** The ports of node i under `mirrorsan up --base-port P` (documented in the README). */
export function portsForNode(basePort: number, index: number): { nbd: number; peer: number; admin: number } {
  return { nbd: basePort + index, peer: basePort + 100 + index, admin: basePort + 200 + index };
}
