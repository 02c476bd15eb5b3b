// The etcd coordinator, for clusters of several machines (the `etcd3` client).
//
// Keys, under /mirrorsan/<clusterId>/:
//   nodes/<id>             JSON NodeRegistration, attached to the node's lease
//   volumes/<name>/spec    JSON VolumeSpec
//   volumes/<name>/record  JSON VolumeRecord
//
// CAS reads the record with its mod revision and commits a transaction guarded by "the record's
// mod revision is still that one, and the spec exists": etcd's own linearizable compare, so no
// two writers can both move the epoch. Leases are etcd leases with our own renewal loop (the
// client's built-in one only reports a loss 2 × TTL after the last contact, too late for I2):
// the session is valid until the send time of the last confirmed renewal + the TTL etcd
// confirmed, on this process's monotonic clock. Watches resume from the last revision they saw
// (we track it ourselves rather than trust the client's reconnect bookkeeping) and re-read the
// state after a compaction.
import { performance } from 'node:perf_hooks';
import { Etcd3, EtcdLeaseInvalidError, GRPCDeadlineExceededError, GRPCUnavailableError } from 'etcd3';
import type { IEvent, IKeyValue, IOptions, Namespace, Watcher } from 'etcd3';
import { MirrorsanError, assert, isMirrorsanError } from '../errors.js';
import { createLogger } from '../util/log.js';
import type { Logger } from '../util/log.js';
import {
  RecordWatchFilter,
  WATCHES_MAX,
  assertCasArguments,
  assertRegistrationInput,
  assertVolumeName,
  assertVolumeSpec,
  copyRecord,
  defaultWaitForPreviousMs,
  isSafeName,
  nodesFingerprint,
  parseNodeRegistration,
  parseVolumeRecord,
  parseVolumeSpec,
  sortNodes,
} from './coordinator.js';
import type {
  CasResult,
  Coordinator,
  NodeRegistration,
  NodeRegistrationInput,
  NodeSession,
  RegisterOptions,
  Unsubscribe,
  VolumeRecord,
  VolumeSpec,
} from './coordinator.js';
import { LeaseKeeper } from './session.js';
import type { RenewResult } from './session.js';

export interface EtcdCoordinatorOptions {
  /** `host:port` of each etcd member. */
  hosts: string[];
  /** Separates clusters sharing one etcd: keys live under /mirrorsan/<clusterId>/. */
  clusterId: string;
  logger?: Logger;
  /** Deadline of each unary call (get, put, txn, grant, revoke). */
  callTimeoutMs?: number;
}

const CALL_TIMEOUT_DEFAULT_MS = 2000;
/** CAS attempts that found the epoch right but lost the revision race (delete/re-create churn). */
const CAS_ATTEMPTS_MAX = 8;
const WATCH_RETRY_MIN_MS = 100;
const WATCH_RETRY_MAX_MS = 2000;
const REGISTER_RETRY_MS = 200;
/** Attempts of a read through member failures and leader changes (one election is ~1 s). */
const READ_ATTEMPTS_MAX = 4;
const READ_RETRY_DELAY_MS = 100;

const monotonicNow = (): number => performance.now();

function nextRevision(revision: string): string {
  return (BigInt(revision) + 1n).toString();
}

function isLeaseInvalid(error: unknown): boolean {
  return error instanceof EtcdLeaseInvalidError || (error instanceof Error && error.message.includes('lease not found'));
}

type FaultHandling = NonNullable<IOptions['faultHandling']>;
type Policy = NonNullable<FaultHandling['global']>;
type WatchBackoff = NonNullable<FaultHandling['watchBackoff']>;
type PolicyFunction<T> = (context: { signal: AbortSignal }) => PromiseLike<T> | T;

/** A member that failed this many calls in a row is skipped for MEMBER_SKIP_MS. */
const MEMBER_FAILURES_MAX = 3;
const MEMBER_SKIP_MS = 500;

class MemberSkippedError extends Error {}

/** Connection-level failures: the member is down or unreachable, not a refusal by etcd. */
function isMemberFailure(error: unknown): boolean {
  return error instanceof GRPCUnavailableError || error instanceof GRPCDeadlineExceededError;
}

/** The request never left this process, so sending it to another member cannot apply it twice. */
function wasNeverSent(error: unknown): boolean {
  return error instanceof MemberSkippedError || (error instanceof GRPCUnavailableError && error.message.includes('No connection established'));
}

/**
 * Per etcd member. The client's default breaker refuses a member for 5 s after three failures:
 * longer than a short lease, so one blip of a single-member etcd would cost every node its
 * lease. This one skips a failing member for MEMBER_SKIP_MS only (its members are tried in
 * turn within one call, so a live member is always reached).
 */
function memberPolicy(): Policy {
  let failures = 0;
  let skipUntilMs = 0;
  const policy = {
    async execute<T>(fn: PolicyFunction<T>): Promise<T> {
      if (failures >= MEMBER_FAILURES_MAX && Date.now() < skipUntilMs) throw new MemberSkippedError('etcd member skipped after recent failures');
      try {
        const result = await fn({ signal: new AbortController().signal });
        failures = 0;
        return result;
      } catch (error) {
        if (isMemberFailure(error)) {
          failures += 1;
          if (failures >= MEMBER_FAILURES_MAX) skipUntilMs = Date.now() + MEMBER_SKIP_MS;
        }
        throw error;
      }
    },
  };
  return policy as unknown as Policy;
}

/**
 * Across members: the client's default retries timeouts too, which can apply a transaction
 * twice (a CAS that succeeded would then report a conflict with its own write). Another member
 * is tried only when the request certainly never left; any other failure goes to the caller
 * as COORD_UNAVAILABLE, meaning "outcome unknown".
 */
function failoverPolicy(memberCount: number): Policy {
  const policy = {
    async execute<T>(fn: PolicyFunction<T>): Promise<T> {
      for (let attempt = 1; ; attempt++) {
        try {
          return await fn({ signal: new AbortController().signal });
        } catch (error) {
          if (attempt >= memberCount + 1 || !wasNeverSent(error)) throw error;
        }
      }
    },
  };
  return policy as unknown as Policy;
}

function constantBackoff(durationMs: number): WatchBackoff {
  const backoff = { duration: durationMs, next: () => backoff };
  return backoff;
}

export class EtcdCoordinator implements Coordinator {
  private readonly client: Etcd3;
  private readonly ns: Namespace;
  private readonly logger: Logger;
  private readonly callTimeoutMs: number;
  private readonly sessions = new Set<LeaseKeeper>();
  private readonly follows = new Set<Follow>();
  private closed = false;

  constructor(options: EtcdCoordinatorOptions) {
    assert(options.hosts.length > 0, 'at least one etcd host');
    assert(isSafeName(options.clusterId), `cluster id ${JSON.stringify(options.clusterId)} is a safe name`);
    this.logger = options.logger ?? createLogger({ component: 'coordinator' });
    this.callTimeoutMs = options.callTimeoutMs ?? CALL_TIMEOUT_DEFAULT_MS;
    const callTimeoutMs = this.callTimeoutMs;
    this.client = new Etcd3({
      hosts: options.hosts,
      dialTimeout: callTimeoutMs,
      // Streams (watch, keepalive) live long: only unary calls get the default deadline.
      defaultCallOptions: (context) => (context.isStream ? {} : { deadline: Date.now() + callTimeoutMs }),
      faultHandling: {
        host: () => memberPolicy(),
        global: failoverPolicy(options.hosts.length),
        watchBackoff: constantBackoff(WATCH_RETRY_MIN_MS),
      },
      grpcOptions: {
        // gRPC's reconnect backoff grows to 2 minutes by default: after a long etcd outage the
        // client would stay away that long. Keep trying every second at most.
        'grpc.initial_reconnect_backoff_ms': 100,
        'grpc.max_reconnect_backoff_ms': 1000,
        // Notice a silently dead connection (a watch would otherwise wait forever). etcd refuses
        // pings more often than every 5 s (--grpc-keepalive-min-time).
        'grpc.keepalive_time_ms': 10_000,
        'grpc.keepalive_timeout_ms': 5_000,
      },
    });
    this.ns = this.client.namespace(`/mirrorsan/${options.clusterId}/`);
  }

  // ------------------------------------------------------------------------------------------
  // Nodes and leases

  async registerNode(input: NodeRegistrationInput, options: RegisterOptions): Promise<NodeSession> {
    assertRegistrationInput(input, options);
    const deadlineMs = monotonicNow() + (options.waitForPreviousMs ?? defaultWaitForPreviousMs(options.leaseTtlMs));
    const key = `nodes/${input.id}`;
    const sentAtMs = monotonicNow();
    const grant = await this.call('grant a lease', () =>
      this.ns.leaseClient.leaseGrant({ TTL: Math.max(1, Math.ceil(options.leaseTtlMs / 1000)) }),
    );
    const ttlMs = Number(grant.TTL) * 1000; // etcd may raise it to its minimum
    assert(ttlMs > 0, 'etcd granted a positive TTL');
    const leaseId = grant.ID;
    const registration: NodeRegistration = {
      id: input.id,
      nbd: { ...input.nbd },
      peer: { ...input.peer },
      admin: { ...input.admin },
      leaseId,
      registeredAtMs: Date.now(),
    };
    const session = this.startSession(registration, ttlMs, sentAtMs + ttlMs);
    try {
      for (;;) {
        const result = await this.call('register node', () =>
          this.ns
            .if(key, 'Create', '==', 0)
            .then(this.ns.put(key).value(JSON.stringify(registration)).lease(leaseId))
            .else(this.ns.get(key))
            .commit(),
        );
        if (result.succeeded) break;
        if (!session.isValid()) throw new MirrorsanError('COORD_UNAVAILABLE', `lease ${leaseId} was lost while registering ${input.id}`);
        if (monotonicNow() >= deadlineMs) {
          const holder = result.responses[0]?.response_range.kvs[0]?.value.toString();
          throw new MirrorsanError('COORD_NODE_ID_TAKEN', `node id ${input.id} is held by a live registration: ${holder}`);
        }
        await new Promise((resolve) => setTimeout(resolve, REGISTER_RETRY_MS));
        this.checkOpen();
      }
    } catch (error) {
      await session.revoke().catch(() => {});
      throw error;
    }
    this.logger.info('node registered', { node: input.id, lease: leaseId, ttlMs });
    return session;
  }

  private startSession(registration: NodeRegistration, ttlMs: number, validUntilMs: number): LeaseKeeper {
    const session: LeaseKeeper = new LeaseKeeper({
      nodeId: registration.id,
      leaseId: registration.leaseId,
      ttlMs,
      validUntilMs,
      now: monotonicNow,
      logger: this.logger,
      renew: () => this.keepAlive(registration.leaseId, ttlMs),
      revokeRemote: () => this.revokeLease(registration.leaseId),
      onEnded: () => {
        this.sessions.delete(session);
        // A lease this node gave up on is revoked at once (if etcd answers), so the others need
        // not wait out its TTL. `closed` stands for a crash: the lease runs out on its own.
        const reason = session.lost;
        if (reason === 'expired' || reason === 'rejected') this.revokeLease(registration.leaseId).catch(() => {});
      },
    });
    this.sessions.add(session);
    return session;
  }

  /** One keepalive round trip; etcd answers TTL 0 for a lease it no longer has. */
  private async keepAlive(leaseId: string, ttlMs: number): Promise<RenewResult> {
    if (this.closed) return { kind: 'failed', error: new Error('closed') };
    const sentAtMs = monotonicNow();
    let stream: Awaited<ReturnType<Namespace['leaseClient']['leaseKeepAlive']>>;
    try {
      stream = await this.ns.leaseClient.leaseKeepAlive({ deadline: Date.now() + Math.min(this.callTimeoutMs, ttlMs) });
    } catch (error) {
      return isLeaseInvalid(error) ? { kind: 'rejected', detail: String(error) } : { kind: 'failed', error };
    }
    return new Promise<RenewResult>((resolve) => {
      let done = false;
      const finish = (result: RenewResult): void => {
        if (done) return;
        done = true;
        resolve(result);
        stream.end();
      };
      stream.on('data', (response) => {
        const grantedSeconds = Number(response.TTL);
        if (!(grantedSeconds > 0)) finish({ kind: 'rejected', detail: `etcd no longer has lease ${leaseId}` });
        else finish({ kind: 'renewed', validUntilMs: sentAtMs + grantedSeconds * 1000 });
      });
      stream.on('error', (error) => {
        finish(isLeaseInvalid(error) ? { kind: 'rejected', detail: error.message } : { kind: 'failed', error });
      });
      stream.on('end', () => finish({ kind: 'failed', error: new Error('keepalive stream ended without an answer') }));
      stream.write({ ID: leaseId });
    });
  }

  private async revokeLease(leaseId: string): Promise<void> {
    if (this.closed) return;
    try {
      await this.ns.leaseClient.leaseRevoke({ ID: leaseId });
    } catch (error) {
      if (isLeaseInvalid(error)) return; // already gone
      this.logger.warn('could not revoke a lease; it runs out on its own', { lease: leaseId, error: String(error) });
    }
  }

  async liveNodes(): Promise<NodeRegistration[]> {
    const response = await this.read('list nodes', () => this.ns.getAll().prefix('nodes/').exec());
    return sortNodes(response.kvs.map((kv) => parseNodeRegistration(parseJson(kv, kv.key.toString()), kv.key.toString())));
  }

  // ------------------------------------------------------------------------------------------
  // Volume specs

  async putVolumeSpec(spec: VolumeSpec, options: { createOnly: boolean }): Promise<boolean> {
    assertVolumeSpec(spec);
    const key = `volumes/${spec.name}/spec`;
    const value = JSON.stringify(parseVolumeSpec(spec, 'volume spec'));
    if (!options.createOnly) {
      await this.call(`put volume ${spec.name}`, () => this.ns.put(key).value(value).exec());
      return true;
    }
    const result = await this.call(`create volume ${spec.name}`, () =>
      this.ns.if(key, 'Create', '==', 0).then(this.ns.put(key).value(value)).commit(),
    );
    if (result.succeeded) this.logger.info('volume created', { volume: spec.name });
    return result.succeeded;
  }

  async getVolumeSpec(name: string): Promise<VolumeSpec | undefined> {
    assertVolumeName(name);
    const key = `volumes/${name}/spec`;
    const response = await this.read(`get volume ${name}`, () => this.ns.get(key).exec());
    const kv = response.kvs[0];
    return kv ? parseVolumeSpec(parseJson(kv, key), key) : undefined;
  }

  async listVolumeSpecs(): Promise<VolumeSpec[]> {
    const response = await this.read('list volumes', () => this.ns.getAll().prefix('volumes/').exec());
    return response.kvs
      .filter((kv) => kv.key.toString().endsWith('/spec'))
      .map((kv) => parseVolumeSpec(parseJson(kv, kv.key.toString()), kv.key.toString()))
      .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  }

  async deleteVolume(name: string): Promise<boolean> {
    assertVolumeName(name);
    // The trailing slash keeps "a" from matching "ab"; one DeleteRange removes spec and record.
    const response = await this.call(`delete volume ${name}`, () => this.ns.delete().prefix(`volumes/${name}/`).exec());
    const existed = Number(response.deleted) > 0;
    if (existed) this.logger.info('volume deleted', { volume: name });
    return existed;
  }

  // ------------------------------------------------------------------------------------------
  // Volume records

  async getVolumeRecord(name: string): Promise<VolumeRecord | undefined> {
    assertVolumeName(name);
    const key = `volumes/${name}/record`;
    const response = await this.read(`get record of ${name}`, () => this.ns.get(key).exec());
    const kv = response.kvs[0];
    return kv ? parseVolumeRecord(parseJson(kv, key), key) : undefined;
  }

  async casVolumeRecord(name: string, expectedEpoch: number | null, next: VolumeRecord): Promise<CasResult> {
    assertCasArguments(name, expectedEpoch, next);
    const specKey = `volumes/${name}/spec`;
    const recordKey = `volumes/${name}/record`;
    const value = JSON.stringify(copyRecord(next));
    for (let attempt = 0; attempt < CAS_ATTEMPTS_MAX; attempt++) {
      // Spec and record in one read, at one revision.
      const response = await this.read(`read volume ${name}`, () => this.ns.getAll().prefix(`volumes/${name}/`).exec());
      const specKv = response.kvs.find((kv) => kv.key.toString() === specKey);
      const recordKv = response.kvs.find((kv) => kv.key.toString() === recordKey);
      if (!specKv) throw new MirrorsanError('VOLUME_NOT_FOUND', `volume ${name} does not exist`);
      const current = recordKv ? parseVolumeRecord(parseJson(recordKv, recordKey), recordKey) : undefined;
      const matches = expectedEpoch === null ? current === undefined : current?.epoch === expectedEpoch;
      if (!matches) return { ok: false, current };
      // A missing key compares as mod revision 0, which covers create.
      const result = await this.call(`CAS record of ${name}`, () =>
        this.ns
          .if(recordKey, 'Mod', '==', recordKv ? recordKv.mod_revision : 0)
          .and(specKey, 'Create', '==', specKv.create_revision)
          .then(this.ns.put(recordKey).value(value))
          .commit(),
      );
      if (result.succeeded) return { ok: true };
      // Somebody changed the record or the volume since the read: decide again on fresh data.
    }
    throw new MirrorsanError('COORD_UNAVAILABLE', `volume ${name} changes too fast to CAS its record`);
  }

  // ------------------------------------------------------------------------------------------
  // Watches

  watchVolumeRecord(name: string, onChange: (record: VolumeRecord | undefined) => void): Unsubscribe {
    assertVolumeName(name);
    const key = `volumes/${name}/record`;
    const filter = new RecordWatchFilter();
    const offer = (kv: IKeyValue | undefined): void => {
      const record = kv ? parseVolumeRecord(parseJson(kv, key), key) : undefined;
      for (const value of filter.offer(kv?.create_revision, record)) onChange(value);
    };
    return this.follow(
      { key },
      (kvs) => offer(kvs[0]),
      (events) => {
        for (const event of events) offer(event.type === 'Put' ? event.kv : undefined);
      },
    );
  }

  watchNodes(onChange: (nodes: NodeRegistration[]) => void): Unsubscribe {
    const nodes = new Map<string, NodeRegistration>();
    let fingerprint: string | undefined;
    const apply = (kv: IKeyValue, present: boolean): void => {
      const key = kv.key.toString();
      if (present) nodes.set(key, parseNodeRegistration(parseJson(kv, key), key));
      else nodes.delete(key);
    };
    const publish = (): void => {
      const list = sortNodes([...nodes.values()].map((node) => ({ ...node })));
      const next = nodesFingerprint(list);
      if (next === fingerprint) return;
      fingerprint = next;
      onChange(list);
    };
    return this.follow(
      { prefix: 'nodes/' },
      (kvs) => {
        nodes.clear();
        for (const kv of kvs) apply(kv, true);
        publish();
      },
      (events) => {
        for (const event of events) apply(event.kv, event.type === 'Put');
        publish();
      },
    );
  }

  private follow(target: FollowTarget, onSnapshot: (kvs: IKeyValue[]) => void, onEvents: (events: IEvent[]) => void): Unsubscribe {
    this.checkOpen();
    assert(this.follows.size < WATCHES_MAX, `at most ${WATCHES_MAX} watches per coordinator client`);
    const follow = new Follow(this.ns, target, onSnapshot, onEvents, this.logger, () => this.follows.delete(follow));
    this.follows.add(follow);
    follow.start();
    return () => follow.stop();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const sessions = [...this.sessions];
    for (const session of sessions) session.close();
    this.sessions.clear();
    for (const follow of [...this.follows]) follow.stop();
    this.follows.clear();
    // In-flight keepalives end by their deadline; then the channels go.
    await Promise.all(sessions.map((session) => session.drained()));
    this.client.close();
  }

  private checkOpen(): void {
    if (this.closed) throw new MirrorsanError('COORD_CLOSED', 'etcd coordinator is closed');
  }

  /**
   * A read may be sent again when a member fails or the leader changes (it changes nothing);
   * a write may not (it may have been applied), so writes use call() and report "unknown".
   */
  private async read<T>(what: string, body: () => Promise<T>): Promise<T> {
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.call(what, body);
      } catch (error) {
        const cause = error instanceof MirrorsanError ? error.cause : undefined;
        const retriable = isMemberFailure(cause) || (cause instanceof Error && cause.message.includes('leader changed'));
        if (!isMirrorsanError(error, 'COORD_UNAVAILABLE') || !retriable || attempt >= READ_ATTEMPTS_MAX) throw error;
        await new Promise((resolve) => setTimeout(resolve, READ_RETRY_DELAY_MS * attempt));
      }
    }
  }

  /** Runs one etcd call: the client's errors become COORD_UNAVAILABLE (or COORD_CLOSED). */
  private async call<T>(what: string, body: () => Promise<T>): Promise<T> {
    this.checkOpen();
    try {
      return await body();
    } catch (error) {
      if (isMirrorsanError(error)) throw error;
      if (this.closed) throw new MirrorsanError('COORD_CLOSED', `etcd coordinator closed during: ${what}`, { cause: error });
      const detail = error instanceof Error ? error.message : String(error);
      throw new MirrorsanError('COORD_UNAVAILABLE', `etcd: ${what}: ${detail}`, { cause: error });
    }
  }
}

function parseJson(kv: IKeyValue, what: string): unknown {
  try {
    return JSON.parse(kv.value.toString());
  } catch (error) {
    throw new MirrorsanError('COORD_CORRUPT', `${what}: not JSON`, { cause: error });
  }
}

type FollowTarget = { key: string } | { prefix: string };

/**
 * Reads a key or prefix, then watches it from the next revision; after a disconnect it
 * resumes from the last revision it saw, after a cancellation (compaction) it reads again.
 * Delivery happens only from etcd's responses, so it is always asynchronous.
 */
class Follow {
  private watcher: Watcher | undefined;
  private lastRevision = '0';
  private retryTimer: NodeJS.Timeout | undefined;
  private retryDelayMs = WATCH_RETRY_MIN_MS;
  private stopped = false;
  private readonly ns: Namespace;
  private readonly target: FollowTarget;
  private readonly onSnapshot: (kvs: IKeyValue[]) => void;
  private readonly onEvents: (events: IEvent[]) => void;
  private readonly logger: Logger;
  private readonly onStopped: () => void;

  constructor(
    ns: Namespace,
    target: FollowTarget,
    onSnapshot: (kvs: IKeyValue[]) => void,
    onEvents: (events: IEvent[]) => void,
    logger: Logger,
    onStopped: () => void,
  ) {
    this.ns = ns;
    this.target = target;
    this.onSnapshot = onSnapshot;
    this.onEvents = onEvents;
    this.logger = logger;
    this.onStopped = onStopped;
  }

  start(): void {
    void this.resync();
  }

  stop(): void {
    if (this.stopped) return;
    this.stopped = true;
    clearTimeout(this.retryTimer);
    this.dropWatcher();
    this.onStopped();
  }

  private async resync(): Promise<void> {
    if (this.stopped) return;
    try {
      const response =
        'key' in this.target
          ? await this.ns.get(this.target.key).exec()
          : await this.ns.getAll().prefix(this.target.prefix).exec();
      if (this.stopped) return;
      this.lastRevision = response.header.revision;
      this.deliver(() => this.onSnapshot(response.kvs));
      this.watchFrom(nextRevision(this.lastRevision));
    } catch (error) {
      this.retry('read', error, () => void this.resync());
    }
  }

  private watchFrom(revision: string): void {
    if (this.stopped) return;
    const builder = this.ns.watch();
    if ('key' in this.target) builder.key(this.target.key);
    else builder.prefix(this.target.prefix);
    const watcher = builder.startRevision(revision).watcher();
    this.watcher = watcher;
    watcher.on('connected', () => {
      this.retryDelayMs = WATCH_RETRY_MIN_MS;
    });
    watcher.on('data', (response) => {
      if (this.stopped || this.watcher !== watcher) return;
      if (response.events.length > 0) this.deliver(() => this.onEvents(response.events));
      // Every event of this response is delivered: resume after it.
      if (BigInt(response.header.revision) > BigInt(this.lastRevision)) this.lastRevision = response.header.revision;
    });
    watcher.on('disconnected', (error) => {
      if (this.watcher !== watcher) return;
      this.retry('watch', error, () => this.watchFrom(nextRevision(this.lastRevision)));
    });
    watcher.on('error', (error) => {
      if (this.watcher !== watcher) return;
      // Cancelled by etcd (e.g. the revision was compacted): start over from a fresh read.
      this.retry('watch cancelled', error, () => void this.resync());
    });
  }

  private retry(what: string, error: unknown, again: () => void): void {
    this.dropWatcher();
    if (this.stopped) return;
    this.logger.debug(`etcd ${what} failed; retrying`, { error: error instanceof Error ? error.message : String(error), delayMs: this.retryDelayMs });
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(again, this.retryDelayMs);
    this.retryDelayMs = Math.min(WATCH_RETRY_MAX_MS, this.retryDelayMs * 2);
  }

  private dropWatcher(): void {
    const watcher = this.watcher;
    this.watcher = undefined;
    if (watcher) {
      // Keep an error listener: a late error on a dropped watcher must not crash the process.
      watcher.on('error', () => {});
      watcher.cancel().catch(() => {});
    }
  }

  /** A callback that throws is a bug in the caller: crash loudly, outside etcd's stream handling. */
  private deliver(call: () => void): void {
    try {
      call();
    } catch (error) {
      if (isMirrorsanError(error, 'COORD_CORRUPT')) {
        this.logger.error('corrupt entry in etcd; skipped', { error: error.message });
        return;
      }
      setImmediate(() => {
        throw error;
      });
    }
  }
}
