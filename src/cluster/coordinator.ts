// The configuration manager's contract (DESIGN.md §3): node registrations that live by leases,
// volume specs, and per volume one record {epoch, replicas, inSync} that changes only by
// compare-and-swap on its epoch. Two backends implement it (etcd.ts for several machines,
// embedded.ts for the nodes of one host) and one conformance suite (conformance.ts) proves both.
//
// This file also holds the pure parts both backends share: validation of everything that is
// stored (a corrupt entry is refused, never half-used) and the filter that turns a backend's
// raw observations into the watch guarantee (epoch order, no regressions, deletes announced).
import { MirrorsanError, assert } from '../errors.js';
import type { Endpoint } from '../node/config.js';

export type { Endpoint };

/** What a node tells the cluster about itself; the coordinator adds the lease and the time. */
export interface NodeRegistrationInput {
  id: string;
  nbd: Endpoint;
  /** Node-to-node traffic (replication, policing); may sit on a dedicated interface. */
  peer: Endpoint;
  admin: Endpoint;
}

export interface NodeRegistration extends NodeRegistrationInput {
  /** The lease this registration lives by; a restarted node gets a new one (a new incarnation). */
  leaseId: string;
  registeredAtMs: number;
}

export type ReplicationMode = 'sync' | 'async';

export interface VolumeSpec {
  name: string;
  sizeBytes: number;
  /** How many nodes hold a replica. */
  replicas: number;
  mode: ReplicationMode;
  /** Refuse writes while a replica is missing instead of running degraded. */
  strict: boolean;
  /** Granularity of write-access priority and of dirty-region bitmaps. */
  regionSizeBytes: number;
}

/** Per volume: who holds replicas, who is in sync, as of which epoch. Changed only by CAS. */
export interface VolumeRecord {
  epoch: number;
  /** Node ids holding (or catching up to) a replica. */
  replicas: string[];
  /** The members every acknowledged write has reached (I1); a subset of replicas, never empty. */
  inSync: string[];
  /** The node that arbitrates write-access priority for this epoch (DESIGN.md §5b). */
  arbiter?: string;
  /**
   * Replicas copying what they missed (catch-up, docs/replication.md): every writer already
   * mirrors to them and waits for them, but they do not count for I1 and serve no reads until a
   * CAS moves them into inSync. Disjoint from inSync. Absent: none.
   */
  catchingUp?: string[];
  updatedAtMs: number;
}

export type CasResult = { ok: true } | { ok: false; current: VolumeRecord | undefined };

export type Unsubscribe = () => void;

/**
 * Why a session ended. `expired`: no renewal was confirmed within the TTL (the coordinator is
 * unreachable or this process stalled); `rejected`: the coordinator refused the renewal (the
 * lease ran out there, or another incarnation took the node id over); `revoked`: revoke() was
 * called; `closed`: the coordinator client was closed.
 */
export type LeaseLostReason = 'expired' | 'rejected' | 'revoked' | 'closed';

/**
 * A node's lease. While isValid() the registration is visible to every other node, so nobody
 * can have waited it out (I3); once it is false (and onLost has fired) the node must stop
 * acknowledging writes and serving local reads (I2, I3). A lost session never comes back:
 * the node registers again and gets a new lease.
 */
export interface NodeSession {
  readonly nodeId: string;
  readonly leaseId: string;
  /** The TTL the coordinator granted (etcd rounds up to whole seconds and a minimum). */
  readonly ttlMs: number;
  /** Checked against the clock at each call, so a late timer cannot extend it. */
  isValid(): boolean;
  /** How long the lease is certainly still held, in ms; 0 once lost. */
  remainingMs(): number;
  /** Fires once, asynchronously, when the session is lost (at once if it already is). */
  onLost(callback: (reason: LeaseLostReason) => void): Unsubscribe;
  /** Ends the lease now: the registration disappears for everyone. */
  revoke(): Promise<void>;
}

export interface RegisterOptions {
  leaseTtlMs: number;
  /**
   * A previous incarnation of this node id may still hold a live lease (a restart after SIGKILL):
   * wait this long for it to run out, then fail with COORD_NODE_ID_TAKEN. Default 2 × TTL + 1 s.
   */
  waitForPreviousMs?: number;
}

/**
 * Every method may fail with COORD_UNAVAILABLE (backend unreachable or too slow) or
 * COORD_CLOSED; invalid arguments are CONFIG_INVALID (names, specs) or assertion failures
 * (record transitions: a bug in the caller).
 */
export interface Coordinator {
  registerNode(registration: NodeRegistrationInput, options: RegisterOptions): Promise<NodeSession>;
  /** Registrations whose lease is alive; a node missing here has definitely lost its lease. */
  liveNodes(): Promise<NodeRegistration[]>;
  /** With createOnly, returns false (and changes nothing) if the volume exists. */
  putVolumeSpec(spec: VolumeSpec, options: { createOnly: boolean }): Promise<boolean>;
  getVolumeSpec(name: string): Promise<VolumeSpec | undefined>;
  listVolumeSpecs(): Promise<VolumeSpec[]>;
  /** Deletes the spec and the record; returns whether the volume existed. */
  deleteVolume(name: string): Promise<boolean>;
  getVolumeRecord(name: string): Promise<VolumeRecord | undefined>;
  /**
   * Replaces the record if its epoch is expectedEpoch (null: only if there is no record).
   * next.epoch must be expectedEpoch + 1 (on create: at least 1): epochs only ever grow by one
   * step per change. Fails with VOLUME_NOT_FOUND when the volume has no spec. A rejection
   * with COORD_UNAVAILABLE means the outcome is unknown (the change may have been applied):
   * re-read the record before deciding anything.
   */
  casVolumeRecord(name: string, expectedEpoch: number | null, next: VolumeRecord): Promise<CasResult>;
  /**
   * Delivers the current record (undefined if none) after subscribing, then every change at
   * least once in epoch order; undefined when the volume is deleted. A record is never
   * delivered after a newer epoch of the same volume incarnation.
   */
  watchVolumeRecord(name: string, onChange: (record: VolumeRecord | undefined) => void): Unsubscribe;
  /** Delivers the live nodes after subscribing, then the whole list each time it changes. */
  watchNodes(onChange: (nodes: NodeRegistration[]) => void): Unsubscribe;
  /** Stops every timer, watch and keepalive (sessions end as `closed`, leases run out). */
  close(): Promise<void>;
}

// ---------------------------------------------------------------------------------------------
// Limits shared by both backends.

/** Node ids and volume names become file names and key segments: keep them boring. */
const SAFE_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
export const REPLICAS_MAX = 32;
export const LEASE_TTL_MIN_MS = 500;
export const LEASE_TTL_MAX_MS = 600_000;
/** Subscriptions per coordinator client: a leak shows up as an error, not as a slow poll loop. */
export const WATCHES_MAX = 1024;
/** Callbacks per session (a few consumers, not one per request). */
export const LOST_CALLBACKS_MAX = 64;

export function isSafeName(name: unknown): name is string {
  return typeof name === 'string' && SAFE_NAME.test(name) && name !== '.' && name !== '..';
}

function corrupt(what: string, detail: string): never {
  throw new MirrorsanError('COORD_CORRUPT', `${what}: ${detail}`);
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function isEndpoint(value: unknown): value is Endpoint {
  return (
    isObject(value) &&
    typeof value.host === 'string' &&
    value.host.length > 0 &&
    Number.isInteger(value.port) &&
    (value.port as number) >= 0 &&
    (value.port as number) <= 65535
  );
}

function isNonNegativeInteger(value: unknown): value is number {
  return Number.isSafeInteger(value) && (value as number) >= 0;
}

function isIdList(value: unknown): value is string[] {
  return Array.isArray(value) && value.every(isSafeName) && new Set(value).size === value.length;
}

// ---------------------------------------------------------------------------------------------
// Validation: the same checks guard what a caller stores (a wrong value is a programmer error
// or bad config) and what a backend reads back (a wrong value is corruption).

/** Why `value` is not a valid node registration input, or undefined if it is. */
export function registrationInputProblem(value: unknown): string | undefined {
  if (!isObject(value)) return 'not an object';
  if (!isSafeName(value.id)) return `node id ${JSON.stringify(value.id)} is not 1-64 letters, digits, '.', '_', '-'`;
  for (const field of ['nbd', 'peer', 'admin'] as const) {
    if (!isEndpoint(value[field])) return `${field} is not a {host, port} endpoint`;
  }
  return undefined;
}

export function parseNodeRegistration(value: unknown, what: string): NodeRegistration {
  const problem = registrationInputProblem(value);
  if (problem) corrupt(what, problem);
  const object = value as Record<string, unknown>;
  if (typeof object.leaseId !== 'string' || object.leaseId.length === 0) corrupt(what, 'leaseId missing');
  if (!isNonNegativeInteger(object.registeredAtMs)) corrupt(what, 'registeredAtMs missing');
  const endpoint = (e: Endpoint): Endpoint => ({ host: e.host, port: e.port });
  return {
    id: object.id as string,
    nbd: endpoint(object.nbd as Endpoint),
    peer: endpoint(object.peer as Endpoint),
    admin: endpoint(object.admin as Endpoint),
    leaseId: object.leaseId,
    registeredAtMs: object.registeredAtMs,
  };
}

export function volumeSpecProblem(value: unknown): string | undefined {
  if (!isObject(value)) return 'not an object';
  if (!isSafeName(value.name)) return `volume name ${JSON.stringify(value.name)} is not 1-64 letters, digits, '.', '_', '-'`;
  if (!Number.isSafeInteger(value.sizeBytes) || (value.sizeBytes as number) <= 0) return 'sizeBytes must be a positive integer';
  if (!Number.isInteger(value.replicas) || (value.replicas as number) < 1 || (value.replicas as number) > REPLICAS_MAX) {
    return `replicas must be an integer 1..${REPLICAS_MAX}`;
  }
  if (value.mode !== 'sync' && value.mode !== 'async') return "mode must be 'sync' or 'async'";
  if (typeof value.strict !== 'boolean') return 'strict must be a boolean';
  const region = value.regionSizeBytes;
  if (!Number.isSafeInteger(region) || (region as number) < 512 || ((region as number) & ((region as number) - 1)) !== 0) {
    return 'regionSizeBytes must be a power of two of at least 512';
  }
  return undefined;
}

export function parseVolumeSpec(value: unknown, what: string): VolumeSpec {
  const problem = volumeSpecProblem(value);
  if (problem) corrupt(what, problem);
  const object = value as Record<string, unknown> & VolumeSpec;
  return {
    name: object.name,
    sizeBytes: object.sizeBytes,
    replicas: object.replicas,
    mode: object.mode,
    strict: object.strict,
    regionSizeBytes: object.regionSizeBytes,
  };
}

/** The record invariants: epoch ≥ 1, inSync a non-empty subset of replicas, arbiter a replica. */
export function volumeRecordProblem(value: unknown): string | undefined {
  if (!isObject(value)) return 'not an object';
  if (!Number.isSafeInteger(value.epoch) || (value.epoch as number) < 1) return 'epoch must be an integer >= 1';
  if (!isIdList(value.replicas) || value.replicas.length === 0 || value.replicas.length > REPLICAS_MAX) {
    return `replicas must be 1..${REPLICAS_MAX} distinct node ids`;
  }
  if (!isIdList(value.inSync) || value.inSync.length === 0) return 'inSync must be a non-empty list of distinct node ids';
  const replicas = new Set(value.replicas);
  const stray = value.inSync.find((id) => !replicas.has(id));
  if (stray !== undefined) return `inSync member ${stray} is not a replica`;
  if (value.arbiter !== undefined && !(typeof value.arbiter === 'string' && replicas.has(value.arbiter))) {
    return 'arbiter must be one of the replicas';
  }
  if (value.catchingUp !== undefined) {
    if (!isIdList(value.catchingUp)) return 'catchingUp must be a list of distinct node ids';
    const inSync = new Set(value.inSync);
    const wrong = value.catchingUp.find((id) => !replicas.has(id) || inSync.has(id));
    if (wrong !== undefined) return `catchingUp member ${wrong} must be a replica outside inSync`;
  }
  if (!isNonNegativeInteger(value.updatedAtMs)) return 'updatedAtMs must be a non-negative integer';
  return undefined;
}

export function parseVolumeRecord(value: unknown, what: string): VolumeRecord {
  const problem = volumeRecordProblem(value);
  if (problem) corrupt(what, problem);
  return copyRecord(value as VolumeRecord);
}

/** A plain copy with a fixed key order: what gets stored, so equal records are equal bytes. */
export function copyRecord(record: VolumeRecord): VolumeRecord {
  const copy: VolumeRecord = {
    epoch: record.epoch,
    replicas: [...record.replicas],
    inSync: [...record.inSync],
    updatedAtMs: record.updatedAtMs,
  };
  if (record.arbiter !== undefined) copy.arbiter = record.arbiter;
  if (record.catchingUp !== undefined && record.catchingUp.length > 0) copy.catchingUp = [...record.catchingUp];
  return copy;
}

/** Caller-side checks of a CAS: a bad transition is a bug in the caller, so it throws. */
export function assertCasArguments(name: string, expectedEpoch: number | null, next: VolumeRecord): void {
  assert(isSafeName(name), `volume name ${JSON.stringify(name)} is not a safe name`);
  const problem = volumeRecordProblem(next);
  assert(problem === undefined, `CAS of ${name}: next record is invalid: ${problem}`);
  if (expectedEpoch === null) {
    assert(next.epoch >= 1, `CAS create of ${name}: epoch must be >= 1`);
  } else {
    assert(Number.isSafeInteger(expectedEpoch) && expectedEpoch >= 1, `CAS of ${name}: expected epoch ${expectedEpoch} is invalid`);
    assert(next.epoch === expectedEpoch + 1, `CAS of ${name}: next epoch ${next.epoch} must be expected epoch ${expectedEpoch} + 1`);
  }
}

export function assertRegistrationInput(registration: NodeRegistrationInput, options: RegisterOptions): void {
  const problem = registrationInputProblem(registration);
  if (problem) throw new MirrorsanError('CONFIG_INVALID', `node registration: ${problem}`);
  const ttl = options.leaseTtlMs;
  if (!Number.isInteger(ttl) || ttl < LEASE_TTL_MIN_MS || ttl > LEASE_TTL_MAX_MS) {
    throw new MirrorsanError('CONFIG_INVALID', `leaseTtlMs must be an integer ${LEASE_TTL_MIN_MS}..${LEASE_TTL_MAX_MS}, got ${ttl}`);
  }
  const wait = options.waitForPreviousMs;
  if (wait !== undefined && (!Number.isInteger(wait) || wait < 0)) {
    throw new MirrorsanError('CONFIG_INVALID', `waitForPreviousMs must be a non-negative integer, got ${wait}`);
  }
}

export function assertVolumeSpec(spec: VolumeSpec): void {
  const problem = volumeSpecProblem(spec);
  if (problem) throw new MirrorsanError('CONFIG_INVALID', `volume spec: ${problem}`);
}

export function assertVolumeName(name: string): void {
  if (!isSafeName(name)) throw new MirrorsanError('CONFIG_INVALID', `volume name ${JSON.stringify(name)} is not a safe name`);
}

export function defaultWaitForPreviousMs(leaseTtlMs: number): number {
  return 2 * leaseTtlMs + 1000;
}

// ---------------------------------------------------------------------------------------------
// The watch guarantee, as a pure filter over what a backend observes.

/**
 * Backends observe `(incarnation, record)` pairs: the incarnation names one life of the volume
 * (etcd: the key's create revision; embedded: the volume directory's id), so a delete and
 * re-create is seen even when the delete itself was missed. offer() returns what to deliver:
 * nothing for a duplicate or older epoch, `undefined` first when the previous life ended.
 */
export class RecordWatchFilter {
  private delivered = false;
  private incarnation: string | undefined;
  private epoch = 0;

  offer(incarnation: string | undefined, record: VolumeRecord | undefined): Array<VolumeRecord | undefined> {
    const out: Array<VolumeRecord | undefined> = [];
    if (record === undefined) {
      if (!this.delivered || this.incarnation !== undefined) out.push(undefined);
      this.incarnation = undefined;
      this.epoch = 0;
      this.delivered = true;
      return out;
    }
    assert(incarnation !== undefined, 'a record is always observed with its incarnation');
    if (this.incarnation !== incarnation) {
      // A new life of the volume: announce the end of the previous one, if any was delivered.
      if (this.incarnation !== undefined) out.push(undefined);
      this.incarnation = incarnation;
      this.epoch = 0;
    }
    if (record.epoch > this.epoch) {
      out.push(record);
      this.epoch = record.epoch;
    }
    this.delivered = true;
    return out;
  }
}

/** A stable comparison key for a node list (watchNodes delivers only real changes). */
export function nodesFingerprint(nodes: readonly NodeRegistration[]): string {
  return JSON.stringify([...nodes].sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0)));
}

export function sortNodes(nodes: NodeRegistration[]): NodeRegistration[] {
  return nodes.sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
}
