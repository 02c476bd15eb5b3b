// The configuration manager in the failure simulation (DESIGN.md §3): one volume record
// {epoch, replicas, inSync, arbiter, catchingUp} changed only by compare-and-swap on its epoch,
// and node leases. It is a node of the simulated network ('coord'), so partitions, clogs and
// link failures cut nodes off from it; nodes talk to it by request and reply, and a reply that
// does not come in time leaves the outcome unknown (COORD_UNAVAILABLE in production: the node
// re-reads before deciding anything). It never crashes (etcd is replicated; the embedded
// backend's host failing is the whole cluster failing).
//
// Leases follow src/cluster/session.ts: the coordinator starts a lease's TTL when it *receives*
// a registration or renewal; the node counts from when it *sent* it, minus a safety margin, so
// the node always gives its lease up before the coordinator lets it expire.
//
// What it checks (I2), as the single place where membership changes:
// - every change is a CAS from the current epoch to epoch + 1, and one of the record changes
//   the design knows: a rejoin (same members), the removal of one member, a join into
//   catchingUp, a promotion into inSync, or a member leaving inSync to catch up itself;
// - a member removed by another node has no live lease at that moment (whoever removes a member
//   waits out its lease first: I3);
// - the history of records is kept, so the simulation can check that every record a node
//   adopts is one the coordinator held, and that a frame of epoch e comes from a member of e.
import { assert } from '../errors.js';
import type { VolumeRecord } from '../cluster/coordinator.js';
import type { NodeId } from './network.js';
import type { Scheduler } from './scheduler.js';
import { InvariantViolation } from './trace.js';

/** The coordinator's node id on the simulated network. */
export const COORDINATOR: NodeId = 'coord';

export type CoordinatorRequestBody =
  | { readonly op: 'register'; readonly node: NodeId }
  | { readonly op: 'keepalive'; readonly leaseId: string }
  /** The watches (watchNodes, watchVolumeRecord) as one poll: live nodes and the record. */
  | { readonly op: 'poll' }
  | { readonly op: 'liveNodes' }
  | { readonly op: 'get' }
  | { readonly op: 'cas'; readonly expectedEpoch: number; readonly next: VolumeRecord; readonly requester: NodeId; readonly why: string };

/**
 * `records`: every record after the requester's known epoch, in epoch order, ending with the
 * current one (the watch's "every change at least once, in epoch order"; a node that reads or
 * loses a CAS learns the records in between too).
 */
export type CoordinatorReplyBody =
  | { readonly op: 'register'; readonly leaseId: string | undefined }
  | { readonly op: 'keepalive'; readonly renewed: boolean }
  | { readonly op: 'poll'; readonly liveNodes: readonly NodeId[]; readonly record: VolumeRecord; readonly records: readonly VolumeRecord[] }
  | { readonly op: 'liveNodes'; readonly liveNodes: readonly NodeId[] }
  | { readonly op: 'get'; readonly record: VolumeRecord; readonly records: readonly VolumeRecord[] }
  | { readonly op: 'cas'; readonly ok: boolean; readonly current: VolumeRecord; readonly records: readonly VolumeRecord[] };

export interface CoordinatorRequest {
  readonly type: 'COORD_REQUEST';
  readonly requestId: number;
  /** The newest epoch the requester knows (for `records` in the answer). */
  readonly knownEpoch: number;
  readonly body: CoordinatorRequestBody;
}

export interface CoordinatorReply {
  readonly type: 'COORD_REPLY';
  readonly requestId: number;
  readonly body: CoordinatorReplyBody;
}

interface Lease {
  readonly leaseId: string;
  readonly node: NodeId;
  readonly registeredAtMs: number;
  expiresAtMs: number;
}

/** Deliberate mistakes, for the checkers (tests only). */
export interface SimCoordinatorOptions {
  scheduler: Scheduler;
  replicas: readonly NodeId[];
  leaseTtlMs: number;
  /** Called when a lease runs out at the coordinator (the simulation checks the node gave it up first). */
  onLeaseExpired?: (node: NodeId, leaseId: string) => void;
  /** Called after every successful CAS, with the new record. */
  onChange?: (record: VolumeRecord, requester: NodeId, why: string) => void;
}

export type RecordChangeKind = 'rejoin' | 'remove' | 'join' | 'promote' | 'leave';

/** Which of the design's record changes `next` is, or why it is none of them. */
export function classifyRecordChange(current: VolumeRecord, next: VolumeRecord): { kind: RecordChangeKind; member?: NodeId } | { kind: 'illegal'; reason: string } {
  const sameSet = (a: readonly string[], b: readonly string[]): boolean => a.length === b.length && a.every((node) => b.includes(node));
  const plus = (a: readonly string[], b: readonly string[]): string[] => b.filter((node) => !a.includes(node));
  if (!sameSet(current.replicas, next.replicas)) return { kind: 'illegal', reason: 'replicas changed' };
  if (next.inSync.length === 0 || !next.inSync.every((node) => next.replicas.includes(node))) return { kind: 'illegal', reason: 'inSync is not a non-empty subset of replicas' };
  const catching = current.catchingUp ?? [];
  const nextCatching = next.catchingUp ?? [];
  if (nextCatching.some((node) => next.inSync.includes(node) || !next.replicas.includes(node))) return { kind: 'illegal', reason: 'catchingUp overlaps inSync or holds a non-replica' };
  const inSyncGone = plus(next.inSync, current.inSync);
  const inSyncNew = plus(current.inSync, next.inSync);
  const catchingGone = plus(nextCatching, catching);
  const catchingNew = plus(catching, nextCatching);
  const changes = inSyncGone.length + inSyncNew.length + catchingGone.length + catchingNew.length;
  if (changes === 0) return { kind: 'rejoin' };
  if (inSyncGone.length === 1 && changes === 1) return { kind: 'remove', member: inSyncGone[0]! };
  if (catchingGone.length === 1 && changes === 1) return { kind: 'remove', member: catchingGone[0]! };
  if (catchingNew.length === 1 && changes === 1) return { kind: 'join', member: catchingNew[0]! };
  if (catchingGone.length === 1 && inSyncNew.length === 1 && catchingGone[0] === inSyncNew[0] && changes === 2) return { kind: 'promote', member: inSyncNew[0]! };
  if (inSyncGone.length === 1 && catchingNew.length === 1 && inSyncGone[0] === catchingNew[0] && changes === 2) return { kind: 'leave', member: inSyncGone[0]! };
  return { kind: 'illegal', reason: `inSync -${inSyncGone.join(',')} +${inSyncNew.join(',')}, catchingUp -${catchingGone.join(',')} +${catchingNew.join(',')}` };
}

function nowMsOf(scheduler: Scheduler): number {
  return scheduler.nowMs();
}

export class SimCoordinator {
  private readonly options: SimCoordinatorOptions;
  private readonly scheduler: Scheduler;
  private recordValue: VolumeRecord;
  /** When the current record was written (coordinator time). */
  private recordWrittenAtMs = 0;
  /** Every record by epoch (the first is the volume's creation). */
  private readonly history = new Map<number, VolumeRecord>();
  private readonly leases = new Map<NodeId, Lease>();
  private nextLease = 1;
  readonly stats = { registrations: 0, refusedRegistrations: 0, renewals: 0, rejectedRenewals: 0, expiries: 0, casOk: 0, casLost: 0, removals: 0, joins: 0, promotions: 0, leaves: 0, rejoins: 0 };

  constructor(options: SimCoordinatorOptions) {
    this.options = options;
    this.scheduler = options.scheduler;
    this.recordValue = { epoch: 1, replicas: [...options.replicas], inSync: [...options.replicas], arbiter: options.replicas[0]!, updatedAtMs: 0 };
    this.history.set(1, this.recordValue);
  }

  get record(): VolumeRecord {
    return this.recordValue;
  }

  /** The record the coordinator held at `epoch` (undefined: never). */
  recordAt(epoch: number): VolumeRecord | undefined {
    return this.history.get(epoch);
  }

  /** Whether `node` holds a live lease now (any lease: there is at most one per node). */
  hasLiveLease(node: NodeId): boolean {
    const lease = this.leases.get(node);
    return lease !== undefined && this.scheduler.nowMs() < lease.expiresAtMs;
  }

  liveNodes(): NodeId[] {
    return [...this.leases.values()].filter((lease) => this.scheduler.nowMs() < lease.expiresAtMs).map((lease) => lease.node).sort();
  }

  /** The records after `knownEpoch`, in epoch order (the current one last). */
  recordsAfter(knownEpoch: number): VolumeRecord[] {
    const records: VolumeRecord[] = [];
    for (let epoch = Math.max(1, knownEpoch + 1); epoch <= this.recordValue.epoch; epoch++) {
      const record = this.history.get(epoch);
      if (record !== undefined) records.push(record);
    }
    return records;
  }

  /** A request arrived (at the coordinator's time): the answer, sent back by the caller. */
  handle(from: NodeId, body: CoordinatorRequestBody, knownEpoch = 0): CoordinatorReplyBody {
    const nowMs = this.scheduler.nowMs();
    switch (body.op) {
      case 'register': {
        assert(body.node === from, `${from} registers as ${body.node}`);
        // A previous incarnation's lease must run out first (production waits for it, then retries).
        if (this.hasLiveLease(from)) {
          this.stats.refusedRegistrations++;
          return { op: 'register', leaseId: undefined };
        }
        const leaseId = `${from}#${this.nextLease++}`;
        const lease: Lease = { leaseId, node: from, registeredAtMs: nowMs, expiresAtMs: nowMs + this.options.leaseTtlMs };
        this.leases.set(from, lease);
        this.armExpiry(lease);
        this.stats.registrations++;
        this.scheduler.log(`coord: ${from} registered lease ${leaseId} until ${lease.expiresAtMs}`);
        return { op: 'register', leaseId };
      }
      case 'keepalive': {
        const lease = this.leases.get(from);
        if (lease === undefined || lease.leaseId !== body.leaseId || nowMs >= lease.expiresAtMs) {
          this.stats.rejectedRenewals++;
          return { op: 'keepalive', renewed: false };
        }
        lease.expiresAtMs = nowMs + this.options.leaseTtlMs;
        this.armExpiry(lease);
        this.stats.renewals++;
        return { op: 'keepalive', renewed: true };
      }
      case 'poll':
        return { op: 'poll', liveNodes: this.liveNodes(), record: this.recordValue, records: this.recordsAfter(knownEpoch) };
      case 'liveNodes':
        return { op: 'liveNodes', liveNodes: this.liveNodes() };
      case 'get':
        return { op: 'get', record: this.recordValue, records: this.recordsAfter(knownEpoch) };
      case 'cas':
        return this.cas(from, body.expectedEpoch, body.next, body.why, knownEpoch);
    }
  }

  private cas(requester: NodeId, expectedEpoch: number, next: VolumeRecord, why: string, knownEpoch: number): CoordinatorReplyBody {
    const current = this.recordValue;
    if (current.epoch !== expectedEpoch) {
      this.stats.casLost++;
      return { op: 'cas', ok: false, current, records: this.recordsAfter(knownEpoch) };
    }
    // [I2] epochs grow by exactly one per change, and a change is one the design knows.
    if (next.epoch !== expectedEpoch + 1) this.violation('I2', `${requester} CAS from epoch ${expectedEpoch} to ${next.epoch} (${why})`);
    const change = classifyRecordChange(current, next);
    if (change.kind === 'illegal') this.violation('I2', `${requester} CAS to epoch ${next.epoch} is no record change of the design: ${change.reason} (${why})`);
    // [I2, I3] whoever removes another member has waited out the lease it served under. A
    // lease registered since the current record was written does not count: the member cannot
    // serve under it before its rejoin CAS, which this CAS orders (it re-registered between the
    // remover's last look at the live nodes and this CAS).
    const memberLease = change.kind === 'remove' ? this.leases.get(change.member!) : undefined;
    if (change.member !== requester && memberLease !== undefined && nowMsOf(this.scheduler) < memberLease.expiresAtMs && memberLease.registeredAtMs <= this.recordWrittenAtMs) {
      this.violation('I2', `${requester} removed ${change.member} at epoch ${next.epoch} while ${change.member} still holds the live lease ${memberLease.leaseId} (${why})`);
    }
    if (change.kind === 'leave' && change.member !== requester) this.violation('I2', `${requester} moved ${change.member} out of the in-sync set to catch up (${why})`);
    this.stats.casOk++;
    const counter = { rejoin: 'rejoins', remove: 'removals', join: 'joins', promote: 'promotions', leave: 'leaves' } as const;
    this.stats[counter[change.kind]]++;
    const stored: VolumeRecord = { ...next, replicas: [...next.replicas], inSync: [...next.inSync], ...(next.catchingUp ? { catchingUp: [...next.catchingUp] } : {}) };
    this.recordValue = stored;
    this.recordWrittenAtMs = this.scheduler.nowMs();
    this.history.set(stored.epoch, stored);
    this.scheduler.log(`coord: epoch ${stored.epoch} by ${requester} (${change.kind}${change.member ? ` ${change.member}` : ''}): inSync ${stored.inSync.join(',')} catchingUp ${(stored.catchingUp ?? []).join(',') || '-'} arbiter ${stored.arbiter ?? '-'} (${why})`);
    this.options.onChange?.(stored, requester, why);
    return { op: 'cas', ok: true, current: stored, records: [stored] };
  }

  private armExpiry(lease: Lease): void {
    const expiresAtMs = lease.expiresAtMs;
    this.scheduler.at(expiresAtMs, () => {
      if (this.leases.get(lease.node) !== lease || lease.expiresAtMs !== expiresAtMs) return; // renewed or replaced
      this.stats.expiries++;
      this.scheduler.log(`coord: lease ${lease.leaseId} of ${lease.node} expired`);
      this.options.onLeaseExpired?.(lease.node, lease.leaseId);
    }, 'coord lease expiry');
  }

  private violation(invariant: string, message: string): never {
    throw this.scheduler.failure(`${invariant} violated: ${message}`, new InvariantViolation(invariant, message));
  }
}
