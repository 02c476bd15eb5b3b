// The membership rules of a replicated volume (DESIGN.md §3 I2/I3, §5; docs/replication.md,
// "Failure detection and membership"), as pure functions of what one node observes: the
// coordinator record, the volume spec, the nodes holding a live lease, and when each peer was
// last heard on the peer links. The I/O shell (src/node/membership.ts) feeds them and performs
// what they return: a compare-and-swap of the record, or a fence on the local volume.
//
// Why both conditions for a removal: a silent link alone may be a partition between two live
// nodes (the member may still serve its clients and acknowledge writes it thinks are
// mirrored); a lost lease alone may be a coordinator blip while the data path is fine. Only a
// member that is silent on the data path AND has lost its lease (it fenced itself before the
// lease ran out: src/cluster/session.ts) can be dropped without a split brain (I2) or a stale
// read (I3).
import { assert } from '../errors.js';
import type { VolumeRecord, VolumeSpec } from './coordinator.js';

export interface MembershipObservation {
  /** The node deciding. */
  self: string;
  /** The newest record this node has read. */
  record: VolumeRecord;
  spec: Pick<VolumeSpec, 'strict'>;
  /** Node ids whose coordinator lease is alive (coordinator.liveNodes()). */
  liveNodes: ReadonlySet<string>;
  /**
   * Per peer: the last time (monotonic ms) a link to it was up. A peer missing here was never
   * heard; the shell starts every peer at the time it began watching, so a peer gets
   * failureTimeoutMs of grace after a node starts.
   */
  lastHeardMs: ReadonlyMap<string, number>;
  nowMs: number;
  failureTimeoutMs: number;
}

export type RemovalDecision =
  | { kind: 'remove'; member: string; next: Omit<VolumeRecord, 'updatedAtMs'>; reason: string }
  | { kind: 'none'; reason: string };

/** Whether `peer` was silent on every link for at least failureTimeoutMs. */
export function isSilent(observation: Pick<MembershipObservation, 'lastHeardMs' | 'nowMs' | 'failureTimeoutMs'>, peer: string): boolean {
  const heardMs = observation.lastHeardMs.get(peer);
  return heardMs === undefined || observation.nowMs - heardMs >= observation.failureTimeoutMs;
}

/**
 * The decision rule: if `self` reaches a majority of the replicas (itself included; a peer
 * counts while it is not silent), the first in-sync member (in record order), other than
 * `self`, that is silent for failureTimeoutMs and missing from the live nodes is removed by the record
 * `{epoch + 1, replicas, inSync minus it, arbiter: unchanged if still in sync, else the first
 * remaining in-sync member}`. Never the last in-sync member. One member per change: the CAS
 * decides between nodes racing, and the next decision starts from the record that won.
 */
export function decideRemoval(observation: MembershipObservation): RemovalDecision {
  const { record, self } = observation;
  assert(observation.failureTimeoutMs > 0, 'failureTimeoutMs is positive');
  assert(record.inSync.length > 0 && record.inSync.every((member) => record.replicas.includes(member)), 'inSync is a non-empty subset of replicas');
  const catchingUp = record.catchingUp ?? [];
  if (record.inSync.length === 1 && catchingUp.length === 0) return { kind: 'none', reason: `only ${record.inSync[0]} is in sync` };
  // A node on the minority side of a partition changes nothing: otherwise the last node left
  // running while a cluster is stopped one node at a time would drop every other member.
  // (The caller decides only while it holds a lease: the coordinator's vote is counted.)
  const noQuorum = quorumProblem(observation, true);
  if (noQuorum) return { kind: 'none', reason: noQuorum };
  const waiting: string[] = [];
  // Catching-up members hold writes back too (every writer mirrors to them): the same rule.
  for (const member of [...record.inSync, ...catchingUp]) {
    if (member === self) continue;
    const isInSync = record.inSync.includes(member);
    if (isInSync && record.inSync.length === 1) continue; // never the last in-sync member
    const silent = isSilent(observation, member);
    const leaseLive = observation.liveNodes.has(member);
    if (!silent) {
      if (!leaseLive) waiting.push(`${member} has no lease but its link is up`);
      continue;
    }
    if (leaseLive) {
      waiting.push(`${member} silent, waiting for its lease to run out`);
      continue;
    }
    const inSync = record.inSync.filter((node) => node !== member);
    const arbiter = record.arbiter !== undefined && inSync.includes(record.arbiter) ? record.arbiter : inSync[0]!;
    const heardMs = observation.lastHeardMs.get(member);
    const silentFor = heardMs === undefined ? 'never heard' : `silent for ${Math.round(observation.nowMs - heardMs)} ms`;
    const next: Omit<VolumeRecord, 'updatedAtMs'> = { epoch: record.epoch + 1, replicas: [...record.replicas], inSync, arbiter };
    const restCatchingUp = catchingUp.filter((node) => node !== member);
    if (restCatchingUp.length > 0) next.catchingUp = restCatchingUp;
    return {
      kind: 'remove',
      member,
      next,
      reason: `${isInSync ? '' : 'catching-up '}${member} ${silentFor} (failure timeout ${observation.failureTimeoutMs} ms) and its lease is gone`,
    };
  }
  return { kind: 'none', reason: waiting.length > 0 ? waiting.join('; ') : 'every in-sync member is reachable' };
}

export interface FenceObservation {
  self: string;
  record: VolumeRecord;
  /** Whether this node holds a valid coordinator lease now (NodeSession.isValid()). */
  leaseValid: boolean;
  lastHeardMs: ReadonlyMap<string, number>;
  nowMs: number;
  failureTimeoutMs: number;
}

/** Votes needed for a majority of `voters`: ⌊n/2⌋ + 1. */
export function majorityOf(voters: number): number {
  return Math.floor(voters / 2) + 1;
}

/**
 * Why this node does not have a quorum now, or undefined. The voters are the replicas and the
 * coordinator as a witness: this node itself, every peer heard within the failure timeout, and
 * the coordinator while this node holds a valid lease; a majority of (replicas + 1) is needed.
 * With 3 or 5 replicas that is exactly "a majority of the replicas, and the coordinator"; with
 * 2 it lets the survivor of a dead peer go on (with a lease), which "a majority of 2 replicas"
 * never would. Split brain is prevented by the lease and the CAS, not by this count: a node
 * is removed only once its lease ran out, and then it has fenced itself.
 */
export function quorumProblem(observation: Pick<MembershipObservation, 'self' | 'record' | 'lastHeardMs' | 'nowMs' | 'failureTimeoutMs'>, leaseValid: boolean): string | undefined {
  const { record, self } = observation;
  const peersHeard = record.replicas.filter((node) => node !== self && !isSilent(observation, node)).length;
  const votes = 1 + peersHeard + (leaseValid ? 1 : 0);
  const needed = majorityOf(record.replicas.length + 1);
  if (votes >= needed) return undefined;
  return `no quorum: ${self} reaches ${1 + peersHeard} of ${record.replicas.length} replicas${leaseValid ? ' and the coordinator' : ''} (${votes} of ${record.replicas.length + 1} votes, ${needed} needed) for ${observation.failureTimeoutMs} ms`;
}

/**
 * Why this node must not serve the volume now, or undefined. Not being in the in-sync set is
 * the volume's own fence (ReplicatedVolume); this adds the lease (I2, I3: the lease is what
 * the others wait out before removing us) and reachability: a node that cannot reach a
 * majority of the replicas (itself included) for failureTimeoutMs is probably on the wrong
 * side of a partition and about to be removed.
 */
export function fenceReason(observation: FenceObservation): string | undefined {
  const { record, self } = observation;
  if (!observation.leaseValid) return `lease lost: ${self} holds no valid coordinator lease`;
  return quorumProblem({ self, record, lastHeardMs: observation.lastHeardMs, nowMs: observation.nowMs, failureTimeoutMs: observation.failureTimeoutMs }, true);
}

/** Whether the volume takes writes: always unless strict, then only with every replica in sync. */
export function writesAllowed(record: { readonly replicas: readonly string[]; readonly inSync: readonly string[] }, spec: Pick<VolumeSpec, 'strict'>): boolean {
  return !spec.strict || record.inSync.length >= record.replicas.length;
}

export type ReplicaState = 'in-sync' | 'catching-up' | 'out-of-sync' | 'fenced';

/**
 * Each replica's state as this node sees it: in the record's catchingUp set is catching-up, out of
 * the in-sync set otherwise is out-of-sync;
 * this node while fenced (lease, majority) is fenced; the rest is in-sync.
 */
export function replicaStates(record: { readonly replicas: readonly string[]; readonly inSync: readonly string[]; readonly catchingUp?: readonly string[] }, self: string, selfFenced: boolean): { node: string; state: ReplicaState }[] {
  return record.replicas.map((node) => {
    if ((record.catchingUp ?? []).includes(node)) return { node, state: 'catching-up' as const };
    if (!record.inSync.includes(node)) return { node, state: 'out-of-sync' as const };
    if (node === self && selfFenced) return { node, state: 'fenced' as const };
    return { node, state: 'in-sync' as const };
  });
}
