// The membership shell of a node (issue 5): per open replicated volume it watches the peers
// (link up/down, turned into last-heard times) and the coordinator (live leases, the record),
// asks the pure rules of src/cluster/membership.ts what to do, and does it:
// - removes a failed in-sync member by compare-and-swap (any node may try; the CAS decides; a
//   failed CAS re-reads the record and decides again at the next tick);
// - fences the local volume while this node has no valid lease, has not yet rejoined since it
//   (re)gained one, or cannot reach a majority of the replicas (I2, I3);
// - rejoins after every new lease: moves the record to a new epoch with the same members, so
//   that every member drops the grants of the old epoch before this node serves again.
// Epoch changes reach the volumes through NodeReplication's record watch; a successful CAS
// here is also applied at once (the watch would deliver it one poll later).
import type { Coordinator, NodeSession, VolumeRecord, VolumeSpec } from '../cluster/index.js';
import { joinCatchUp, leaveDiskless, leaveToCatchUp, promoteCaughtUp } from '../cluster/catch-up-record.js';
import { decideRemoval, fenceReason, type RemovalDecision } from '../cluster/membership.js';
import { assert, isMirrorsanError } from '../errors.js';
import type { Logger } from '../util/log.js';
import type { ReplicaMembership, ReplicatedVolume } from '../volume/replicated-volume.js';

/** A rejoin CAS retried this often before the next tick tries again (a CAS race, an unreachable coordinator). */
const REJOIN_ATTEMPTS_MAX = 5;
/** Volumes one monitor follows (one per open replicated volume). */
const VOLUMES_MAX = 4096;

export interface MembershipMonitorOptions {
  self: string;
  coordinator: Coordinator;
  /** A peer silent this long (no link up either way) counts as failed; see NodeConfig. */
  failureTimeoutMs: number;
  logger: Logger;
  /** Whether some link with `peer` is up now (ours dialled to it, or its to us). */
  isPeerUp: (peer: string) => boolean;
  /** Monotonic milliseconds. */
  now?: () => number;
}

interface VolumeState {
  name: string;
  spec: VolumeSpec;
  volume: ReplicatedVolume;
  record: VolumeRecord;
  /** The lease this node rejoined the volume under (undefined: not yet since opening). */
  rejoinedLease: string | undefined;
  rejoin: Promise<void> | undefined;
  removal: Promise<void> | undefined;
  /** A catch-up record change (join or promote) under way. */
  catchUpChange: Promise<void> | undefined;
  /** Last decision logged, so that a waiting state is logged once, not every tick. */
  lastReason: string | undefined;
  /** Removals this node made for the volume. */
  removals: number;
  /** Its disk failed (diskless mode): it never rejoins or joins a catch-up; the volume is about to close. */
  diskless: boolean;
}

export class MembershipMonitor {
  private readonly options: MembershipMonitorOptions;
  private readonly coordinator: Coordinator;
  private readonly logger: Logger;
  private readonly now: () => number;
  private readonly volumes = new Map<string, VolumeState>();
  private readonly lastHeardMs = new Map<string, number>();
  /** Ids with a live lease as last watched; undefined until the first watch delivery. */
  private liveNodes: Set<string> | undefined;
  private session: NodeSession | undefined;
  /** Whether this node ever held a lease (a missing one is then lost, not pending). */
  private hadSession = false;
  private closed = false;

  constructor(options: MembershipMonitorOptions) {
    assert(Number.isSafeInteger(options.failureTimeoutMs) && options.failureTimeoutMs > 0, 'failureTimeoutMs is a positive integer');
    this.options = options;
    this.coordinator = options.coordinator;
    this.logger = options.logger;
    this.now = options.now ?? (() => performance.now());
  }

  get failureTimeoutMs(): number {
    return this.options.failureTimeoutMs;
  }

  /** The live registrations, as watched (watchNodes). */
  setLiveNodes(ids: Iterable<string>): void {
    this.liveNodes = new Set(ids);
  }

  /**
   * This node's lease: a new session (registered, or registered again) makes every volume
   * rejoin before it serves; undefined (lost) fences every volume at once.
   */
  setSession(session: NodeSession | undefined): Promise<void> {
    this.session = session;
    if (session) this.hadSession = true;
    this.tick();
    return this.rejoinAll();
  }

  /** Follows a volume opened by NodeReplication; resolves once it rejoined (when it can now). */
  add(spec: VolumeSpec, record: VolumeRecord, volume: ReplicatedVolume): Promise<void> {
    assert(!this.volumes.has(spec.name), `volume ${spec.name} is monitored already`);
    assert(this.volumes.size < VOLUMES_MAX, 'too many monitored volumes');
    const state: VolumeState = { name: spec.name, spec, volume, record, rejoinedLease: undefined, rejoin: undefined, removal: undefined, catchUpChange: undefined, lastReason: undefined, removals: 0, diskless: false };
    this.volumes.set(spec.name, state);
    // A peer not watched before gets failureTimeoutMs of grace from now (its links may still be coming up).
    const nowMs = this.now();
    for (const peer of record.replicas) if (peer !== this.options.self && !this.lastHeardMs.has(peer)) this.lastHeardMs.set(peer, nowMs);
    this.evaluate(state, nowMs);
    return this.startRejoin(state) ?? Promise.resolve();
  }

  remove(name: string): void {
    this.volumes.delete(name);
  }

  /** A newer record from the watch (NodeReplication hands it to the volume too). */
  recordChanged(name: string, record: VolumeRecord): void {
    const state = this.volumes.get(name);
    if (state && record.epoch > state.record.epoch) state.record = record;
  }

  /** Time passes: refresh last-heard times, then fence, rejoin or remove where the rules say so. */
  tick(): void {
    if (this.closed) return;
    const nowMs = this.now();
    for (const peer of this.lastHeardMs.keys()) if (this.options.isPeerUp(peer)) this.lastHeardMs.set(peer, nowMs);
    for (const state of this.volumes.values()) {
      this.evaluate(state, nowMs);
      this.startRejoin(state);
      this.maybeRemove(state, nowMs);
      this.maybeJoinCatchUp(state, nowMs);
    }
  }

  /** The volume must catch up although it is in sync (see ReplicatedVolume): true once the record says so. */
  async leaveToCatchUp(name: string): Promise<boolean> {
    const state = this.volumes.get(name);
    if (!state) return false;
    await state.catchUpChange;
    const change = this.changeRecord(state, 'leave', (record) => leaveToCatchUp(record, this.options.self, Date.now()));
    state.catchUpChange = change;
    await change.finally(() => {
      if (state.catchUpChange === change) state.catchUpChange = undefined;
    });
    return (state.record.catchingUp ?? []).includes(this.options.self);
  }

  /**
   * The volume's disk failed (diskless mode, src/volume/diskless-volume.ts): from now on it never
   * rejoins or asks to catch up (its store is gone), and it leaves the in-sync or catching-up set
   * by CAS (`leaveDiskless`: never as the last in-sync member). Says where that left it: out of
   * both sets, still the last in-sync member, or failed (the CAS attempts ran out: try again).
   */
  async leaveDiskless(name: string): Promise<{ outcome: 'out' | 'last-in-sync' | 'failed'; record: VolumeRecord | undefined }> {
    const state = this.volumes.get(name);
    if (!state) return { outcome: 'failed', record: undefined };
    const { self } = this.options;
    state.diskless = true;
    await state.catchUpChange;
    const change = this.changeRecord(state, 'leave-diskless', (record) => leaveDiskless(record, self, Date.now()));
    state.catchUpChange = change;
    await change.finally(() => {
      if (state.catchUpChange === change) state.catchUpChange = undefined;
    });
    const { record } = state;
    if (!record.inSync.includes(self) && !(record.catchingUp ?? []).includes(self)) return { outcome: 'out', record };
    if (record.inSync.length === 1 && record.inSync[0] === self) return { outcome: 'last-in-sync', record };
    return { outcome: 'failed', record };
  }

  /**
   * The volume's catch-up copied everything: move this replica from catchingUp into inSync (a
   * CAS; retried while it is still catching up, e.g. after losing a race to another change).
   */
  async caughtUp(name: string): Promise<void> {
    const state = this.volumes.get(name);
    if (!state) return;
    await state.catchUpChange;
    const change = this.changeRecord(state, 'promote', (record) => promoteCaughtUp(record, this.options.self, Date.now()));
    state.catchUpChange = change;
    await change.finally(() => {
      if (state.catchUpChange === change) state.catchUpChange = undefined;
    });
  }

  status(name: string): object | undefined {
    const state = this.volumes.get(name);
    if (!state) return undefined;
    const nowMs = this.now();
    const silentForMs: Record<string, number> = {};
    for (const peer of state.record.replicas) {
      const heard = this.lastHeardMs.get(peer);
      if (peer !== this.options.self && heard !== undefined) silentForMs[peer] = Math.max(0, Math.round(nowMs - heard));
    }
    return {
      failureTimeoutMs: this.options.failureTimeoutMs,
      leaseValid: this.session?.isValid() ?? false,
      rejoined: state.rejoinedLease !== undefined && state.rejoinedLease === this.session?.leaseId,
      silentForMs,
      lastDecision: state.lastReason ?? null,
      removalsByThisNode: state.removals,
    };
  }

  /**
   * Why no client request may be served now because of the lease (checked on every request):
   * between the lease's deadline and the fence that onLost sets, a request must not slip in.
   */
  leaseProblem(): string | undefined {
    if (this.session === undefined || this.session.isValid()) return undefined;
    return `lease lost: the coordinator lease ${this.session.leaseId} of ${this.options.self} ran out`;
  }

  close(): void {
    this.closed = true;
    this.volumes.clear();
  }

  // ---- internals ------------------------------------------------------------------------------

  private leaseValid(): boolean {
    return this.session?.isValid() === true;
  }

  /** Applies the fence the rules give for this node now. */
  private evaluate(state: VolumeState, nowMs: number): void {
    const { self } = this.options;
    let reason = fenceReason({ self, record: state.record, leaseValid: this.leaseValid(), lastHeardMs: this.lastHeardMs, nowMs, failureTimeoutMs: this.options.failureTimeoutMs });
    if (reason === undefined && state.record.inSync.includes(self) && state.rejoinedLease !== this.session?.leaseId) {
      reason = 'rejoining: moving the volume to a new epoch under the new lease';
    }
    if (this.session === undefined) {
      reason = this.hadSession
        ? `lease lost: ${self} lost its coordinator lease and is registering again`
        : `no lease: ${self} is not registered at the coordinator yet`;
    }
    state.volume.setFence(reason);
  }

  private rejoinAll(): Promise<void> {
    return Promise.all([...this.volumes.values()].map((state) => this.startRejoin(state) ?? state.rejoin)).then(() => undefined);
  }

  private startRejoin(state: VolumeState): Promise<void> | undefined {
    const session = this.session;
    if (this.closed || !session || !session.isValid() || state.rejoin || state.diskless || state.rejoinedLease === session.leaseId) return undefined;
    state.rejoin = this.rejoin(state, session).finally(() => {
      state.rejoin = undefined;
      if (this.volumes.get(state.name) === state) this.evaluate(state, this.now());
    });
    return state.rejoin;
  }

  /**
   * The epoch bump of a (re)gained lease: {epoch + 1, same members}, if this node is still in
   * sync. A node out of the in-sync set has nothing to rejoin (it needs catch-up, part 2).
   */
  private async rejoin(state: VolumeState, session: NodeSession): Promise<void> {
    const { self } = this.options;
    for (let attempt = 1; attempt <= REJOIN_ATTEMPTS_MAX && !this.closed && this.session === session; attempt++) {
      const record = state.record;
      if (!record.inSync.includes(self)) {
        state.rejoinedLease = session.leaseId;
        this.logger.warn('not in the in-sync set: this replica stays fenced until it catches up', { volume: state.name, epoch: record.epoch, inSync: record.inSync.join(',') });
        return;
      }
      const next: VolumeRecord = { ...record, epoch: record.epoch + 1, updatedAtMs: Date.now() };
      try {
        const result = await this.coordinator.casVolumeRecord(state.name, record.epoch, next);
        if (result.ok) {
          this.adopt(state, next);
          state.rejoinedLease = session.leaseId;
          this.logger.info('rejoined the volume at a new epoch', { volume: state.name, epoch: next.epoch, lease: session.leaseId });
          return;
        }
        // Someone moved first: decide again from what is there now.
        if (result.current) this.adopt(state, result.current);
      } catch (error) {
        // Unknown outcome: read back what happened before deciding anything (coordinator contract).
        this.logger.warn('rejoin CAS failed; re-reading the record', { volume: state.name, error: String(error) });
        await this.reread(state);
      }
    }
  }

  /**
   * A replica out of the in-sync set (restarted after it was removed, or back from a partition)
   * asks to catch up, once it holds a lease, rejoined under it, and reaches a majority: the
   * record lists it in catchingUp and its volume starts copying (ReplicatedVolume).
   */
  private maybeJoinCatchUp(state: VolumeState, nowMs: number): void {
    const { self } = this.options;
    const { record } = state;
    if (state.diskless || state.catchUpChange || state.rejoin || !this.leaseValid() || state.rejoinedLease !== this.session?.leaseId) return;
    if (!record.replicas.includes(self) || record.inSync.includes(self) || (record.catchingUp ?? []).includes(self)) return;
    if (fenceReason({ self, record, leaseValid: true, lastHeardMs: this.lastHeardMs, nowMs, failureTimeoutMs: this.options.failureTimeoutMs }) !== undefined) return;
    const change = this.changeRecord(state, 'join', (current) => joinCatchUp(current, self, Date.now()));
    state.catchUpChange = change;
    void change.finally(() => {
      if (state.catchUpChange === change) state.catchUpChange = undefined;
    });
  }

  /** A catch-up record change by CAS: up to REJOIN_ATTEMPTS_MAX tries, each from the newest record. */
  private async changeRecord(state: VolumeState, what: 'join' | 'promote' | 'leave' | 'leave-diskless', next: (record: VolumeRecord) => VolumeRecord | undefined): Promise<void> {
    for (let attempt = 1; attempt <= REJOIN_ATTEMPTS_MAX && !this.closed; attempt++) {
      const record = state.record;
      const proposed = next(record);
      if (!proposed) return; // no longer applies (removed meanwhile, or done already)
      try {
        const result = await this.coordinator.casVolumeRecord(state.name, record.epoch, proposed);
        if (result.ok) {
          const message = {
            join: 'catching up: joined the volume\'s catching-up set',
            promote: 'caught up: back in the in-sync set',
            leave: 'left the in-sync set to catch up',
            'leave-diskless': 'disk failed: left the in-sync set (diskless)',
          }[what];
          this.logger.info(message, { volume: state.name, epoch: proposed.epoch });
          this.adopt(state, proposed);
          return;
        }
        if (result.current) this.adopt(state, result.current);
      } catch (error) {
        this.logger.warn(`catch-up ${what} CAS failed; re-reading the record`, { volume: state.name, error: String(error) });
        await this.reread(state);
      }
    }
  }

  private maybeRemove(state: VolumeState, nowMs: number): void {
    const { self } = this.options;
    // Only a node that itself holds a lease and has seen the live nodes decides anything.
    if (state.removal || state.rejoin || !this.liveNodes || !this.leaseValid()) return;
    const decision = decideRemoval({
      self,
      record: state.record,
      spec: state.spec,
      liveNodes: this.liveNodes,
      lastHeardMs: this.lastHeardMs,
      nowMs,
      failureTimeoutMs: this.options.failureTimeoutMs,
    });
    if (decision.reason !== state.lastReason) {
      state.lastReason = decision.reason;
      if (decision.kind === 'none' && decision.reason !== 'every in-sync member is reachable') this.logger.info('membership: no change yet', { volume: state.name, reason: decision.reason });
    }
    if (decision.kind === 'remove') state.removal = this.removeMember(state, decision).finally(() => (state.removal = undefined));
  }

  private async removeMember(state: VolumeState, decision: RemovalDecision & { kind: 'remove' }): Promise<void> {
    const expectedEpoch = decision.next.epoch - 1;
    try {
      // The watched list may be a poll old: confirm the lease is gone right before the CAS.
      const live = await this.coordinator.liveNodes();
      if (live.some((node) => node.id === decision.member)) {
        this.setLiveNodes(live.map((node) => node.id));
        return;
      }
      const next: VolumeRecord = { ...decision.next, updatedAtMs: Date.now() };
      const result = await this.coordinator.casVolumeRecord(state.name, expectedEpoch, next);
      if (result.ok) {
        state.removals++;
        this.logger.warn('removed a member from the in-sync set', {
          volume: state.name,
          member: decision.member,
          epoch: next.epoch,
          inSync: next.inSync.join(','),
          arbiter: next.arbiter,
          reason: decision.reason,
        });
        this.adopt(state, next);
        return;
      }
      this.logger.info('membership CAS lost; deciding again from the current record', { volume: state.name, member: decision.member, expectedEpoch, currentEpoch: result.current?.epoch });
      if (result.current) this.adopt(state, result.current);
    } catch (error) {
      this.logger.warn('membership CAS failed; re-reading the record', { volume: state.name, error: isMirrorsanError(error) ? error.message : String(error) });
      await this.reread(state);
    }
  }

  private async reread(state: VolumeState): Promise<void> {
    try {
      const current = await this.coordinator.getVolumeRecord(state.name);
      if (current) this.adopt(state, current);
    } catch (error) {
      this.logger.debug('could not re-read the record', { volume: state.name, error: String(error) });
    }
  }

  /** A record at least as new as ours: remember it and hand it to the volume (older ones are ignored there). */
  private adopt(state: VolumeState, record: VolumeRecord): void {
    if (record.epoch <= state.record.epoch) return;
    state.record = record;
    if (this.volumes.get(state.name) === state) state.volume.changeMembership(membershipOf(record));
  }
}

/** The volume's view of a coordinator record. */
export function membershipOf(record: VolumeRecord): ReplicaMembership {
  return {
    epoch: record.epoch,
    replicas: record.replicas,
    inSync: record.inSync,
    ...(record.arbiter ? { arbiter: record.arbiter } : {}),
    ...(record.catchingUp ? { catchingUp: record.catchingUp } : {}),
  };
}
