// Failure and recovery in the seeded simulator (issue 5, DESIGN.md §3 and §5): the whole
// replicated write path of cluster-simulation.ts, plus a coordinator with leases and CAS, node
// crashes (SIGKILL and power loss) and restarts over simulated disks, partitions that cut nodes
// off from each other and from the coordinator, torn, lost and rotted log writes, lease expiry
// paced by the simulated clock, failure detection and removal, self-fencing, and catch-up. Every
// node runs the real, unmodified Holder, Arbiter, ReplicationSource and ReplicationTargets, the
// real pure membership rules (decideRemoval, fenceReason, quorumProblem) and the real record
// changes (joinCatchUp, promoteCaughtUp, leaveToCatchUp), composed by shells that follow
// production line by line:
//   VolumeShell     src/volume/replicated-volume.ts (write path, release sync, epochs, fences,
//                   catch-up copies under grants, REGION_REQUEST answers, the restart rule)
//   CatchUpRun      src/volume/catch-up.ts (digest walk, copy of differing chunks, flush, promote)
//   Membership      src/node/membership.ts (MembershipMonitor: fence, rejoin, removal, join,
//                   promote, leave by CAS, with re-reads after unknown outcomes)
//   NodeIncarnation src/node/node.ts + src/node/replication.ts + src/cluster/session.ts (open
//                   the store and replay, register and renew a lease, poll the watches, tick)
// over SimStore (sim-store.ts: image, own WAL, containers, checkpoint; the real entry codec and
// CRCs; process crash or power loss with torn and lost writes and rot) and SimCoordinator
// (sim-coordinator.ts: CAS, leases, a node of the network). The shells mirror production as of
// commit 891c899 (catch-up by a digest walk of the whole volume), plus the peerAhead/skipTo path
// of commit 7fbf5d4 (a writer whose log lost entries its peers hold voids their numbers). Later
// production work (dirty-region plans, diskless mode, servingTerm) is not mirrored.
//
// Corrections. Where the simulation found production wrong, the shell behaves as the fix
// would, and `asBuilt` replays production as it was (see FailureFlaw, and the test file's
// regression seed for each).
//
// Checkers (a breach throws an InvariantViolation with the seed and the trace tail):
// - I1 at acknowledgement: every member of the coordinator's in-sync set that has not crashed
//   since the write began has applied it. FLUSH and FUA: a power loss of any such member at
//   that moment would replay every write they cover (or something newer in its blocks).
// - I1 at quiescence: every block holds a value at least as new (in the block's agreed order)
//   as every acknowledged write to it, except writes whose every in-sync copy was lost: after
//   each crash and each record change, a plain write that no running, trusted in-sync member
//   holds any more is excused (it lived in the memory of members that crashed or left, like a
//   disk's write cache); a FLUSHed or FUA write is never excused unless a disk lied (lost
//   writes, rot, a replaced disk).
// - I2: the coordinator checks every CAS (sim-coordinator.ts: one epoch at a time, a record
//   change the design knows, no removal of a member whose serving lease lives); every record a
//   node adopts is the coordinator's record of that epoch; a WRITE frame applied at a target
//   comes from a stream member of the frame's epoch; a read is served only by a member of the
//   coordinator's current in-sync set holding a live lease; a write is acknowledged by a node
//   outside the in-sync set only while its lease lives; when the coordinator lets a lease
//   expire, its node has given it up already.
// - I3: every read (and every block an in-sync replica hands a catching-up one, and every copy
//   applied on an in-sync replica) is at least as new as every write acknowledged before it
//   (excused writes aside), never a torn block and never a value written after it.
// - I4: per block, every trusted in-sync replica incarnation applies writes in one agreed order
//   (a catch-up copy or repair rewrite may move a replica back over unacknowledged writes;
//   a catching-up replica's order is judged at quiescence); at quiescence all replicas are
//   byte-identical.
// - I5: every entry replay applies is the entry written under its stamp, byte for byte (torn,
//   lost and rotted records are cut or refused, never applied); every entry applied live is a
//   client's write or a copy of well-formed blocks.
// - liveness: once faults stop and every node is back, the cluster settles (every replica in
//   sync, every operation answered) before a deadline.
import { assert } from '../errors.js';
import { joinCatchUp, leaveToCatchUp, promoteCaughtUp } from '../cluster/catch-up-record.js';
import type { VolumeRecord } from '../cluster/coordinator.js';
import { decideRemoval, fenceReason, type RemovalDecision } from '../cluster/membership.js';
import { renewIntervalMs, safetyMarginMs } from '../cluster/session.js';
import { ENTRY_TYPE } from '../journal/entry.js';
import { Arbiter, type ArbiterEffect } from '../policing/arbiter.js';
import { Holder, type HolderEffect } from '../policing/holder.js';
import { fromWireGrantMessage, policingRecipient, toWireGrantMessage, type PolicingMessage } from '../policing/messages.js';
import { regionsOf } from '../policing/regions.js';
import type { GrantMessage, RegionReplyMessage, RegionRequestMessage } from '../replication/codec.js';
import { ReplicationSource, type OperationResult, type SourceEffect, type SourceInboundMessage, type SourceLimits } from '../replication/engine/source.js';
import { ReplicationTarget, type TargetEffect, type TargetInboundMessage, type TargetLimits } from '../replication/engine/target.js';
import { digestChunks } from '../volume/catch-up.js';
import { describeClusterMessage, randomPayload, type ClusterMessage } from './cluster-simulation.js';
import { SimNetwork, randomNetworkProfile, type Link, type NetworkHandler, type NodeId } from './network.js';
import { Prng } from './prng.js';
import { Scheduler } from './scheduler.js';
import type { SeedRun } from './seeds.js';
import { COORDINATOR, SimCoordinator, type CoordinatorReply, type CoordinatorReplyBody, type CoordinatorRequest, type CoordinatorRequestBody } from './sim-coordinator.js';
import { SimStore, StoreCorruptError, type CrashKind, type ReplayedEntry, type StoreFaults, type StoreRecovery } from './sim-store.js';
import { InvariantViolation } from './trace.js';

export type FailureMessage = ClusterMessage | RegionRequestMessage | RegionReplyMessage | CoordinatorRequest | CoordinatorReply;

/** Deliberate mistakes, each of which one checker must catch within a few seeds (tests only). */
export type FailureBug =
  | 'none'
  /** Removal does not wait for the member's lease: decideRemoval sees no live node at all (I2, I3). */
  | 'removeBeforeLeaseExpiry'
  /** A node keeps serving after its lease ran out: no deadline, no lease fence (I2, I3). */
  | 'serveAfterLeaseLoss'
  /** Catch-up promotes without copying anything (I1, I3, I4). */
  | 'skipCatchUpCopy'
  /** Replay applies the bytes of a torn or rotted log entry instead of cutting it (I5). */
  | 'applyCorruptEntries';

/**
 * Flaws of production that the simulation found. The shell behaves as the fix would unless the
 * flaw is listed in `asBuilt`; then it behaves as production does, and a checker catches it
 * (the test file keeps a regression seed for each).
 * - 'completePendingOnJoin' (src/replication/engine/source.ts, fixed there): a write still
 *   pending when its node starts catching up completed successfully once the join floor
 *   covered it, though no in-sync member had it and the catch-up then overwrote it (I1).
 *   Replayed through the source's bug switch of the same name.
 * - 'admitWhileOutOfSync' (ReplicatedVolume.admitted; fixed in production meanwhile by the
 *   servingTerm of commit af40e13): a client write that waited for its grant while its node left
 *   the in-sync set is admitted later, next to a catch-up copy under the same grant; the copy,
 *   read from a peer before the write reached it, overwrites it (I1, I3, I4). Fix: a client write
 *   admitted while this node is outside the in-sync set fails (EIO).
 * - 'restartRejoinsInSync' (MembershipMonitor.rejoin): a node restarted after a crash rejoins
 *   the in-sync set with whatever its disk replayed and serves reads at once, though it lost the
 *   entries it had acknowledged on receipt and not yet written (memory), until their sources
 *   resend them; a node on a replaced disk serves zeros (I1, I3). Issue 5 item 6 asks for
 *   replay, rejoin, catch-up, then reads. Fix: after an unclean restart a member that is not the
 *   last in-sync one leaves to catching up (leaveToCatchUp) instead of rejoining, and until it
 *   has it decides no removals (else it may remove the silent member that holds what it lost and
 *   stay as the last in-sync member).
 * - 'sequenceFromLog' (fixed in production meanwhile, commit 7fbf5d4, whose peerAhead/skipTo
 *   path the shell now follows): after a power loss a node's own sequence restarts from its
 *   replayed WAL, below what its peers received of its stream: its source refused their ACKs
 *   ("beyond the last sequence") and never sent again (liveness), and its next entries would
 *   reuse sequences its peers drop as duplicates.
 * - 'catchUpWithoutBarrier' (CatchUpDriver.run): the digest walk may compare a chunk before a
 *   write admitted before the join (so below the new member's floor: never streamed to it)
 *   reached the in-sync peer; both lack it, the chunk is skipped, and the member is promoted
 *   without it (I1, I4). Fix: take a grant before the walk (the join epoch's fence lifts only
 *   once every older-epoch write is acknowledged by its members).
 * - 'noRepairAfterLoss' (production as of 891c899; commit 7fbf5d4 later made a catch-up compare
 *   against every in-sync peer, which heals the survivors once the lost node comes back): a
 *   node that dies or is removed with writes in flight leaves them on some members and not
 *   others; never acknowledged, but the in-sync replicas no longer converge (I4), and a
 *   catching-up walk that compared the chunk earlier misses it too. Fix: when a node leaves the
 *   in-sync set or the stream, the epoch's truth (its arbiter if in sync) compares its chunks
 *   with every other in-sync member's and rewrites the differing ones from its own bytes under
 *   their grants (see CatchUpRun); a catch-up walk under way starts again (also after a rejoin:
 *   its truth may have restarted), and a walk older than the last such change never promotes.
 * - 'acknowledgeAfterLeaseLoss' (ReplicatedVolume.finish; docs/replication.md allows it): a
 *   write pending when its node lost its lease completes, and is acknowledged to the client,
 *   once its members ACK it, though the node may have been removed by then (its members
 *   re-announce their positions at every epoch). The data is on every member, but DESIGN.md I2
 *   says such a node stops acknowledging writes. Fix: a write completing while its node holds
 *   no valid lease fails (EIO: it may or may not have taken effect, as NBD allows).
 * - 'catchingUpKeepsGrants' (MembershipMonitor.rejoin): only an in-sync member moves the record
 *   to a new epoch after a new lease. A catching-up member that restarts keeps the epoch, so the
 *   arbiter still counts the grants its previous incarnation held; the new holder ignores their
 *   REVOKEs and every writer waiting for those regions waits for ever; and writers keep its old
 *   join floor, below their resend windows if its store lost entries (liveness). Fix: a
 *   catching-up member that restarted leaves the catching-up set and joins it again.
 * - 'strandPeersWhileCatchingUp' (src/replication/engine/source.ts, fixed there): when the last
 *   in-sync member comes back on a replaced disk (its log rotted), a catching-up writer's stream
 *   to it stands below the writer's resend window, stranded for ever; the writer's catch-up
 *   copies never complete (liveness). Replayed through the source's bug switch.
 * - 'appliesFramesOfUnknownEpochs' (ReplicatedVolume.receive; docs/replication.md lists it as an
 *   open point): a member that has not yet learned epoch e applies a stream frame of epoch e from
 *   a node that epoch e removed (it checks the sender against its own older record, and the
 *   target adopts e from the frame) (I2). Fix: a stream frame of an epoch newer than the
 *   volume's record is dropped and the link reset; the source resends once the epoch is known.
 * - 'drainedWithoutSync' (ReplicatedVolume.sendPolicing): within an epoch a grant moves only after
 *   a durability sync of the holder's writes (the release sync), but an epoch change hands every
 *   region over with DRAINED, sent once the old epoch's writes are merely acknowledged. A member
 *   that acknowledged one (in memory) and then lost power comes back without it; if it is the
 *   last in-sync member it stays in sync, takes the new epoch's grants, writes, and then receives
 *   the old entry's resend on top (I3, I4; the restart rule covers the other members). Fix:
 *   DRAINED waits for a sync started after it, like RELEASE.
 * - 'sequencesDuringSkip' (ReplicatedVolume.skipLostSequences, commit 7fbf5d4): it assumes the
 *   node refuses I/O while it pads its log and the source skips ("leaving or out"), but the last
 *   in-sync member cannot leave and goes on serving: a client write admitted between the padding
 *   and skipTo takes a number the padding used (production's "store sequence differs from the
 *   source's" assertion). Fix: refuse client I/O while lost numbers are voided.
 */
export type FailureFlaw =
  | 'completePendingOnJoin'
  | 'admitWhileOutOfSync'
  | 'restartRejoinsInSync'
  | 'sequenceFromLog'
  | 'catchUpWithoutBarrier'
  | 'noRepairAfterLoss'
  | 'acknowledgeAfterLeaseLoss'
  | 'catchingUpKeepsGrants'
  | 'strandPeersWhileCatchingUp'
  | 'appliesFramesOfUnknownEpochs'
  | 'drainedWithoutSync'
  | 'sequencesDuringSkip';

export interface FailureScenarioOptions {
  bug?: FailureBug;
  asBuilt?: readonly FailureFlaw[];
  /** Simulated time of the workload under faults. Default 1000 ms. */
  workloadMs?: number;
  /** Replicas of the volume (2 or 3). Default: the seed's choice (3 in three seeds of four). */
  replicas?: 2 | 3;
  /** Clients per node. Default 2. */
  clientsPerNode?: number;
  /** Disk faults beyond honest crashes (lost writes, rot). Default: the seed's choice. */
  lyingDisks?: boolean;
}

export interface FailureScenarioReport {
  seed: number;
  replicas: number;
  networkProfile: string;
  writesAcknowledged: number;
  writesFailed: number;
  readsServed: number;
  readsRefused: number;
  flushesCompleted: number;
  crashes: number;
  powerLosses: number;
  restarts: number;
  partitions: number;
  removals: number;
  rejoins: number;
  joins: number;
  promotions: number;
  leaves: number;
  leaseExpiries: number;
  catchUpsCompleted: number;
  /** Own logs padded past sequences a crash lost (production's peerAhead path). */
  lostSequenceSkips: number;
  repairsCompleted: number;
  chunksCopied: number;
  chunksRewritten: number;
  replayedEntries: number;
  replayCuts: number;
  tornWrites: number;
  lostWrites: number;
  rots: number;
  refusedCorrupt: number;
  excusedWrites: number;
  staleFramesRefused: number;
  fencedRefusals: number;
  steps: number;
  endMs: number;
}

// ---- geometry and pacing (production's times compressed about tenfold, like all sim time) ----
const VOLUME = 'vol';
const REGION_SIZE_BYTES = 4096;
const BLOCK_BYTES = 512;
const BLOCKS_PER_REGION = REGION_SIZE_BYTES / BLOCK_BYTES;
const REGION_COUNT = 6;
const BLOCK_COUNT = REGION_COUNT * BLOCKS_PER_REGION;
const IMAGE_BYTES = BLOCK_COUNT * BLOCK_BYTES;
const READ_BLOCKS_MAX = 8;
/** NodeReplication's tick (volumes and the membership monitor). */
const TICK_MS = 10;
/** The embedded backend's watch poll (production 100 ms). */
const POLL_MS = 20;
/** failureTimeoutMs (production default 1000). */
const FAILURE_TIMEOUT_MS = 100;
/** leaseTtlMs (production default 5000). */
const LEASE_TTL_MS = 200;
/** A coordinator request unanswered this long has an unknown outcome (COORD_UNAVAILABLE). */
const RPC_TIMEOUT_MS = 150;
/** Requests to the coordinator in flight per node; more is a runaway. */
const RPCS_MAX = 256;
/** A refused registration (the previous incarnation's lease still lives) is retried after this. */
const REGISTER_RETRY_MS = 20;
/** MembershipMonitor's REJOIN_ATTEMPTS_MAX. */
const CAS_ATTEMPTS_MAX = 5;
const RESEND_INTERVAL_MS = 50;
const GRANT_HOLD_MAX_MS = 200;
const WAITING_WRITES_MAX = 64;
/** ReplicatedVolume's STREAM_UNPOSITIONED_MAX_MS (production 3000). */
const STREAM_UNPOSITIONED_MAX_MS = 300;
/** ReplicatedVolume's REGION_REQUEST_TIMEOUT_MS (production 5000). */
const REGION_REQUEST_TIMEOUT_MS = 100;
const REGION_REQUESTS_MAX = 64;
/** CatchUpDriver's RETRY_DELAY_MS (production 500). */
const CATCH_UP_RETRY_MS = 50;
const CHUNKS_PER_BATCH = 16;
/** The volume's periodic store checkpoint (production 30 s). */
const CHECKPOINT_INTERVAL_MS = 400;
const CHECKPOINT_COVER_ATTEMPTS_MAX = 4;
const IO_DELAY_MS_MAX = 2;
const IO_QUEUE_MAX = 20_000;
/** Liveness: once faults stop and every node runs, the cluster settles within this. */
const SETTLE_DEADLINE_MS = 30_000;
const STEPS_MAX = 2_000_000;

type Completion = (error: { code: string; message: string } | undefined, sequence?: number) => void;

/** Every node the writers mirror to: the in-sync set and the replicas catching up. */
function streamMembers(membership: VolumeRecord): string[] {
  return [...membership.inSync, ...(membership.catchingUp ?? [])];
}

function arbiterOf(membership: VolumeRecord): string {
  return membership.arbiter ?? membership.inSync[0]!;
}

function describeMessage(message: FailureMessage): string {
  switch (message.type) {
    case 'COORD_REQUEST':
      return `COORD_REQUEST#${message.requestId} ${message.body.op}`;
    case 'COORD_REPLY':
      return `COORD_REPLY#${message.requestId} ${message.body.op}`;
    case 'REGION_REQUEST':
      return `REGION_REQUEST#${message.requestId} ${message.kind} ${message.offset}+${message.lengthBytes}@${message.epoch}`;
    case 'REGION_REPLY':
      return `REGION_REPLY#${message.requestId} ${message.ok ? 'ok' : 'error'}@${message.epoch}`;
    default:
      return describeClusterMessage(message);
  }
}

/** A write's payload: every block starts with the write's tag and the block's index, then random bytes. */
function taggedPayload(tag: number, firstBlock: number, blocks: number, seed: number): Buffer {
  const payload = randomPayload(seed, blocks * BLOCK_BYTES);
  for (let index = 0; index < blocks; index++) {
    payload.writeUInt32BE(tag, index * BLOCK_BYTES);
    payload.writeUInt32BE(firstBlock + index, index * BLOCK_BYTES + 4);
  }
  return payload;
}

// =============================================================================================
// The truth and the checkers
// =============================================================================================

interface WriteInfo {
  readonly tag: number;
  readonly node: NodeId;
  readonly firstBlock: number;
  readonly blocks: number;
  readonly payload: Buffer;
  readonly fua: boolean;
  readonly invokeMs: number;
  /** Crash counts of every node when the write began (a member that crashed since is excused). */
  readonly crashesAtInvoke: ReadonlyMap<NodeId, number>;
  ackMs: number | undefined;
  /** The node incarnation that acknowledged it, and the sequence its source gave it there. */
  acknowledgedBy: NodeIncarnation | undefined;
  sequence: number;
  failed: boolean;
  /** A FLUSH or FUA made it durable on every in-sync member: it must survive crashes. */
  durable: boolean;
  /** Blocks whose every in-sync copy was lost in crashes while it lived in memory only. */
  readonly excusedBlocks: Set<number>;
}

/** Per block: the writes in the order replicas applied them (fixed by the first to apply each). */
interface AgreedOrder {
  readonly tags: number[];
  readonly index: Map<number, number>;
}

class Checkers {
  readonly writes = new Map<number, WriteInfo>();
  readonly blockWrites: WriteInfo[][] = Array.from({ length: BLOCK_COUNT }, () => []);
  readonly agreed: AgreedOrder[] = Array.from({ length: BLOCK_COUNT }, () => ({ tags: [], index: new Map() }));
  /** Some disk lied (lost write, rot, replacement): FLUSHed writes may then be lost too. */
  disksLied = false;
  private readonly world: World;

  constructor(world: World) {
    this.world = world;
  }

  violation(invariant: string, message: string): never {
    return this.world.violation(invariant, message);
  }

  /** The register value of `block` in a whole image: 0 (never written), a write's tag, or what is wrong. */
  blockValue(image: Buffer, block: number): number | string {
    return this.blockValueAt(image, block * BLOCK_BYTES, block);
  }

  /** The register value of the 512 bytes at `at` in `bytes`, read as block `block`. */
  blockValueAt(buffer: Buffer, at: number, block: number): number | string {
    const tag = buffer.readUInt32BE(at);
    const bytes = buffer.subarray(at, at + BLOCK_BYTES);
    if (tag === 0) return bytes.every((byte) => byte === 0) ? 0 : `a torn block ${block} (zero tag, non-zero bytes)`;
    const write = this.writes.get(tag);
    if (write === undefined || block < write.firstBlock || block >= write.firstBlock + write.blocks) return `block ${block} holds tag ${tag}, which no write of that block has`;
    const index = block - write.firstBlock;
    return bytes.equals(write.payload.subarray(index * BLOCK_BYTES, (index + 1) * BLOCK_BYTES)) ? tag : `block ${block} mixes write ${tag} with other bytes (torn)`;
  }

  /**
   * What each entry is, a client's write or a copy (catch-up copy, repair rewrite: a chunk of some
   * replica's blocks, which may equal a client's write byte for byte): by source stream and
   * sequence (never reused: a writer that lost numbers voids them, see 'sequenceFromLog'), and by
   * node and apply stamp.
   */
  private readonly streamKinds = new Map<string, 'write' | 'copy'>();
  private readonly stampKinds = new Map<string, 'write' | 'copy'>();

  noteEntry(source: NodeId, sequence: number, kind: 'write' | 'copy'): void {
    this.streamKinds.set(`${source}#${sequence}`, kind);
  }

  entryKind(source: NodeId, sequence: number): 'write' | 'copy' {
    const kind = this.streamKinds.get(`${source}#${sequence}`);
    assert(kind !== undefined, `entry ${sequence} of ${source} was never appended there`);
    return kind;
  }

  noteStamp(node: NodeId, stamp: number, kind: 'write' | 'copy'): void {
    this.stampKinds.set(`${node}@${stamp}`, kind);
  }

  stampKind(node: NodeId, stamp: number): 'write' | 'copy' {
    const kind = this.stampKinds.get(`${node}@${stamp}`);
    assert(kind !== undefined, `stamp ${stamp} of ${node} was never applied there`);
    return kind;
  }

  /** Where `value` stands in the block's agreed order: -1 for the initial zeros, undefined if never applied. */
  indexOf(block: number, value: number): number | undefined {
    return value === 0 ? -1 : this.agreed[block]!.index.get(value);
  }

  /**
   * I4 and I5 for one entry a replica incarnation applies (live or replayed). `how`: a client
   * write's entry, or a catch-up or repair copy (by the copying replica itself, or received).
   * A copy may move a replica back in the agreed order (over unacknowledged writes it has and
   * its truth has not); on an in-sync replica it must not go below an acknowledged write (I1).
   */
  recordApply(node: NodeIncarnation, offset: number, payload: Buffer, how: 'write' | 'copy-own' | 'copy-remote' | 'replay', inSyncReplica: boolean): void {
    assert(offset % BLOCK_BYTES === 0 && payload.length % BLOCK_BYTES === 0, 'entries are whole blocks');
    const firstBlock = offset / BLOCK_BYTES;
    const blocks = payload.length / BLOCK_BYTES;
    // I5: every block of an entry is a well-formed block of a write (or zeros, in a copy).
    const values: number[] = [];
    for (let index = 0; index < blocks; index++) {
      const value = this.blockValueAt(payload, index * BLOCK_BYTES, firstBlock + index);
      if (typeof value === 'string') this.violation('I5', `${node.id} applies (${how}) an entry at block ${firstBlock} whose block ${firstBlock + index} is not what any write wrote: ${value}`);
      values.push(value);
    }
    if (this.world.scheduler.trace.enabled && how !== 'write') this.world.scheduler.log(`${node.id} applies (${how}) blocks ${firstBlock}..${firstBlock + blocks - 1}: ${values.join(',')}`);
    if (how === 'write' || how === 'replay') {
      const tag = values[0]!;
      const write = this.writes.get(tag);
      if (write === undefined || write.firstBlock !== firstBlock || write.blocks !== blocks) this.violation('I5', `${node.id} applies (${how}) an entry at block ${firstBlock} (${blocks} blocks) that no client wrote`);
    }
    for (let index = 0; index < blocks; index++) {
      const block = firstBlock + index;
      const value = values[index]!;
      const order = this.agreed[block]!;
      if ((how === 'copy-own' || how === 'copy-remote') && inSyncReplica) this.checkFresh(node.id, block, value, this.world.scheduler.nowMs(), 'a copy applied on an in-sync replica');
      let position = this.indexOf(block, value);
      if (position === undefined) {
        assert(how !== 'copy-own' && how !== 'copy-remote', 'a copy carries values applied somewhere before');
        position = order.tags.length;
        order.tags.push(value);
        order.index.set(value, position);
      }
      const previous = node.appliedIndex[block]!;
      // Order is checked on in-sync replicas (and in replay): a catching-up one may receive a
      // crashed member's resends out of order; its walk overwrites that, and quiescence judges it.
      if ((how === 'write' ? inSyncReplica : how === 'replay') && position < previous) {
        this.violation('I4', `${node.id} applies write ${value} to block ${block} after write ${order.tags[previous]} which the agreed order puts after it: conflicting writes in different orders`);
      }
      node.appliedIndex[block] = position;
      if (value !== 0) node.appliedTags.add(value);
    }
  }

  /** I5 for replay: every entry replay applies is what was written under its stamp. */
  checkReplayed(node: NodeIncarnation, entry: ReplayedEntry): void {
    const written = node.store.ledger.get(entry.stamp);
    if (written === undefined || written.offset !== entry.offset || !written.payload.equals(entry.payload)) {
      this.violation('I5', `${node.id} replays ${entry.log} entry ${entry.sequence} (stamp ${entry.stamp}) whose bytes differ from what was written under that stamp: a corrupt entry applied`);
    }
  }

  /** I1 when a write is acknowledged at `node`, and I2 for who acknowledges. */
  writeAcknowledged(node: NodeIncarnation, write: WriteInfo): void {
    const record = this.world.coordinator.record;
    for (const member of record.inSync) {
      if (this.world.crashCount(member) !== write.crashesAtInvoke.get(member)) continue;
      const incarnation = this.world.incarnation(member);
      if (incarnation === undefined || !incarnation.appliedTags.has(write.tag)) {
        this.violation('I1', `write ${write.tag} acknowledged by ${node.id} at epoch ${record.epoch}, but the in-sync member ${member} never applied it`);
      }
    }
    if (!record.inSync.includes(node.id) && !this.world.coordinator.hasLiveLease(node.id)) {
      this.violation('I2', `${node.id} acknowledges write ${write.tag} while outside the in-sync set of epoch ${record.epoch} and without a live lease`);
    }
  }

  /**
   * I1 for FLUSH and FUA: every write it covers is durable on every in-sync member that has not
   * crashed since it began: a power loss there now would replay it (or something newer in its
   * blocks). By data, not stream positions: a member that joined at a floor past a write got it
   * by its catch-up copies, made durable by the catch-up's own FLUSH.
   */
  flushCompleted(node: NodeIncarnation, covered: readonly WriteInfo[], crashesAtInvoke: ReadonlyMap<NodeId, number>, what: string): void {
    if (covered.length === 0) return;
    for (const member of this.world.coordinator.record.inSync) {
      if (this.world.crashCount(member) !== crashesAtInvoke.get(member)) continue;
      const incarnation = this.world.incarnation(member);
      if (incarnation === undefined || !incarnation.store.open || (incarnation.mustCatchUp && !this.world.asBuilt.has('restartRejoinsInSync'))) continue;
      const image = incarnation.store.durableImage();
      if (image === undefined) continue; // its log would be refused: a lying disk (rot)
      for (const write of covered) {
        for (let block = write.firstBlock; block < write.firstBlock + write.blocks; block++) {
          const value = this.blockValue(image, block);
          const position = typeof value === 'number' ? (this.indexOf(block, value) ?? -2) : -2;
          if (position < this.indexOf(block, write.tag)!) {
            this.violation('I1', `${what} of ${node.id} completed, but a power loss of ${member} now would leave block ${block} as ${String(value)}, older than write ${write.tag} (not durable there)`);
          }
        }
      }
    }
  }

  /** I2 and I3 for a read `node` serves now: from an in-sync member with a live lease, and fresh. */
  readServed(node: NodeIncarnation, firstBlock: number, bytes: Buffer, invokeMs: number): number[] {
    const record = this.world.coordinator.record;
    if (!record.inSync.includes(node.id)) this.violation('I2', `${node.id} serves a read at epoch ${record.epoch} although it is not in the in-sync set (${record.inSync.join(',')})`);
    if (!this.world.coordinator.hasLiveLease(node.id)) this.violation('I2', `${node.id} serves a read although its lease has run out at the coordinator`);
    const values: number[] = [];
    const blocks = bytes.length / BLOCK_BYTES;
    for (let index = 0; index < blocks; index++) {
      const block = firstBlock + index;
      const value = this.blockValueAt(bytes, index * BLOCK_BYTES, block);
      if (typeof value === 'string') this.violation('I3', `read on ${node.id}: ${value}`);
      this.checkFresh(node.id, block, value, invokeMs, 'read');
      values.push(value);
    }
    return values;
  }

  /** I3: `value` read from `block` is not older than a write acknowledged before `invokeMs`. */
  checkFresh(node: NodeId, block: number, value: number, invokeMs: number, what: string): void {
    const read = value === 0 ? undefined : this.writes.get(value)!;
    if (read !== undefined && read.invokeMs > this.world.scheduler.nowMs()) this.violation('I3', `${what} on ${node} returned write ${value} invoked after it`);
    const readAckMs = read === undefined ? -Infinity : (read.ackMs ?? Infinity);
    for (const write of this.blockWrites[block]!) {
      if (write.ackMs === undefined || write.ackMs >= invokeMs || write.invokeMs <= readAckMs) continue;
      if (write.excusedBlocks.has(block) && !(write.durable && !this.disksLied)) continue;
      const returned = read === undefined ? 'the initial zeros' : `write ${value} (invoked at ${read.invokeMs}, acknowledged at ${String(read.ackMs)})`;
      this.violation(
        'I3',
        `${what} of block ${block} on ${node} (began at ${invokeMs}) returned ${returned}, but write ${write.tag} from ${write.node} (invoked at ${write.invokeMs}) ` +
          `was acknowledged at ${write.ackMs}, before the read began: a stale read`,
      );
    }
  }

  /**
   * After a crash, or a record change (a member removed, or gone to catch up): a plain write
   * that no running, trusted in-sync member holds any more (nor anything newer in its block)
   * survives nowhere the volume will keep it: it lived in the memory of members that crashed
   * (like a disk's write cache) or that left the in-sync set. Its loss is excused (I1 protects
   * writes "while at least one member of the in-sync set survives").
   */
  excuseLostWrites(): void {
    const record = this.world.coordinator.record;
    // A restarted member that must still leave to catch up holds nothing the volume will keep.
    const holders = record.inSync
      .map((member) => this.world.incarnation(member))
      .filter((node): node is NodeIncarnation => node !== undefined && node.store.open && !(node.mustCatchUp && !this.world.asBuilt.has('restartRejoinsInSync')));
    for (let block = 0; block < BLOCK_COUNT; block++) {
      let held = -2;
      for (const holder of holders) {
        const value = this.blockValue(holder.store.image, block);
        if (typeof value === 'number') held = Math.max(held, this.indexOf(block, value) ?? -2);
      }
      for (const write of this.blockWrites[block]!) {
        if (write.ackMs === undefined || write.excusedBlocks.has(block)) continue;
        const position = this.indexOf(block, write.tag);
        if (position !== undefined && position > held) {
          write.excusedBlocks.add(block);
          this.world.report.excusedWrites++;
          this.world.scheduler.log(`checker: write ${write.tag} in block ${block} lost with every in-sync copy (${write.durable ? 'durable' : 'memory only'})`);
        }
      }
    }
  }

  /** At quiescence: I4 (identical replicas) and I1 (every protected write, or a newer one, is there). */
  checkQuiescent(nodes: readonly NodeIncarnation[]): void {
    const first = nodes[0]!;
    for (const node of nodes.slice(1)) {
      if (!node.store.image.equals(first.store.image)) {
        let at = 0;
        while (node.store.image[at] === first.store.image[at]) at++;
        const block = Math.floor(at / BLOCK_BYTES);
        this.violation('I4', `replicas differ at quiescence: block ${block} is ${String(this.blockValue(first.store.image, block))} on ${first.id} and ${String(this.blockValue(node.store.image, block))} on ${node.id}`);
      }
    }
    for (let block = 0; block < BLOCK_COUNT; block++) {
      const value = this.blockValue(first.store.image, block);
      if (typeof value === 'string') this.violation('I1', `at quiescence ${value}`);
      const position = this.indexOf(block, value) ?? -2;
      for (const write of this.blockWrites[block]!) {
        if (write.ackMs === undefined) continue;
        const protectedWrite = !write.excusedBlocks.has(block) || (write.durable && !this.disksLied);
        if (!protectedWrite) continue;
        const writePosition = this.indexOf(block, write.tag)!;
        if (position < writePosition) {
          this.violation('I1', `block ${block} holds ${value} at quiescence, but the ${write.durable ? 'durable ' : ''}write ${write.tag} acknowledged by ${write.node} at ${write.ackMs} comes after it: an acknowledged write was lost`);
        }
      }
    }
  }
}

// =============================================================================================
// The world every shell sees
// =============================================================================================

interface World {
  readonly scheduler: Scheduler;
  readonly network: SimNetwork<FailureMessage>;
  readonly coordinator: SimCoordinator;
  readonly checkers: Checkers;
  readonly report: FailureScenarioReport;
  readonly bug: FailureBug;
  readonly asBuilt: ReadonlySet<FailureFlaw>;
  readonly sourceLimits: Partial<SourceLimits>;
  readonly targetLimits: Partial<TargetLimits>;
  readonly replicas: readonly NodeId[];
  violation(invariant: string, message: string): never;
  /** The running incarnation of `node`, if it runs. */
  incarnation(node: NodeId): NodeIncarnation | undefined;
  crashCount(node: NodeId): number;
}

// =============================================================================================
// VolumeShell: ReplicatedVolume (src/volume/replicated-volume.ts) over SimStore
// =============================================================================================

interface PendingOperation {
  readonly done: Completion;
  readonly holdsGrant: boolean;
  admitted: boolean;
  write?: { readonly offset: number; readonly payload: Buffer; readonly fua: boolean };
  copy?: {
    readonly offset: number;
    readonly lengthBytes: number;
    readonly fetch: (done: (error: string | undefined, data?: Buffer) => void) => void;
    outcome?: 'same' | 'copied';
    /** A walk's barrier: valid only if admitted at this epoch or later. */
    barrierEpoch?: number;
  };
  /** A repair rewrite (the 'noRepairAfterLoss' correction): this node's own bytes, written again. */
  rewrite?: { readonly offset: number; readonly lengthBytes: number };
}

interface HeldPolicingMessage {
  readonly target: NodeId;
  readonly message: PolicingMessage;
  readonly recipientRole: 'holder' | 'arbiter';
  readonly isRelease: boolean;
}

type RegionAnswer = (error: string | undefined, data?: Buffer) => void;

class VolumeShell {
  readonly self: NodeId;
  private readonly world: World;
  private readonly node: NodeIncarnation;
  private membership: VolumeRecord;
  private arbiterNode: NodeId;
  private readonly peers: readonly NodeId[];
  readonly store: SimStore;
  readonly source: ReplicationSource;
  private readonly targets = new Map<NodeId, ReplicationTarget>();
  readonly holder: Holder;
  arbiter: Arbiter | undefined;
  private readonly pending = new Map<number, PendingOperation>();
  private nextOperationId = 1;
  private lastCheckpointMs = 0;
  private checkpointedStamp: number;
  private ownWriteCompletedSinceOpen = false;
  private leavingToCatchUp = false;
  catchUp: CatchUpRun | undefined;
  repair: CatchUpRun | undefined;
  private readonly pausedInbound = new Map<NodeId, FailureMessage[]>();
  private readonly regionRequests = new Map<number, { peer: NodeId; answer: RegionAnswer; timer: { cancel(): void } }>();
  private nextRegionRequestId = 1;
  private performingSourceEffects = false;
  private readonly nestedSourceEffects: (readonly SourceEffect[])[] = [];
  private readonly unpositionedSinceMs = new Map<NodeId, number>();
  private fence: string | undefined;
  private nodeFence: string | undefined;
  private closed = false;
  private readonly heldPolicing: HeldPolicingMessage[] = [];
  private releaseSyncCovers = 0;
  private releaseSyncRunning = false;
  private readonly replicationWaiters: Record<'ackedSeq' | 'syncAckedSeq', { sequence: number; run: () => void }[]> = { ackedSeq: [], syncAckedSeq: [] };
  /** Set while a WRITE frame is handed to a target: the epoch it carries (for the I2 frame check). */
  private frameEpoch = 0;
  /** What each source.write call was, in call order: the source admits writes in that order. */
  private readonly sourceWriteKinds: { readonly operationId: number; readonly kind: 'write' | 'copy' }[] = [];
  /** Repair rewrites admitted and waiting for every write already handed to the source to be applied here. */
  private readonly deferredRewrites: number[] = [];

  /**
   * A rewrite reads its bytes and hands them to the source in one step, once no write handed to
   * the source earlier is still unapplied here (the source may queue writes): every write before
   * it in this node's stream is then in the bytes, every write after it follows it everywhere.
   */
  private runRewrites(): void {
    while (this.deferredRewrites.length > 0 && this.sourceWriteKinds.length === 0 && !this.closed) {
      const operationId = this.deferredRewrites.shift()!;
      const rewrite = this.pending.get(operationId)?.rewrite;
      if (rewrite === undefined) continue;
      // Only a serving in-sync member's bytes are the truth (it may have left meanwhile).
      const refusal = this.membership.inSync.includes(this.self) ? this.usableProblem() : `${this.self} left the in-sync set`;
      if (refusal !== undefined || this.repair === undefined || this.repair.stopped) {
        this.finish(operationId, { ok: false, code: 'NBD_EIO', message: `repair rewrite abandoned: ${refusal ?? 'the repair ended'}` });
        continue;
      }
      const { offset, lengthBytes } = rewrite;
      this.sourceWriteKinds.push({ operationId, kind: 'copy' });
      this.runSource(this.source.write({ operationId, entryType: ENTRY_TYPE.WRITE, offset, lengthBytes, payload: this.store.read(offset, lengthBytes), fua: false }));
    }
  }

  constructor(world: World, node: NodeIncarnation, membership: VolumeRecord, recovery: StoreRecovery) {
    this.world = world;
    this.node = node;
    this.self = node.id;
    this.store = node.store;
    this.membership = membership;
    this.arbiterNode = arbiterOf(membership);
    this.peers = membership.replicas.filter((peer) => peer !== this.self);
    this.checkpointedStamp = recovery.lastStamp;
    this.source = new ReplicationSource({
      volume: VOLUME,
      self: this.self,
      mode: 'sync',
      lastSequence: recovery.ownSequence,
      limits: world.sourceLimits,
      bug: world.asBuilt.has('completePendingOnJoin') ? 'completePendingOnJoin' : world.asBuilt.has('strandPeersWhileCatchingUp') ? 'strandPeersWhileCatchingUp' : 'none',
    });
    for (const peer of this.peers) {
      const recovered = recovery.sources.get(peer)!;
      this.targets.set(peer, new ReplicationTarget({ volume: VOLUME, self: this.self, source: peer, epoch: membership.epoch, limits: world.targetLimits }, recovered));
    }
    this.holder = new Holder({
      volume: VOLUME,
      epoch: membership.epoch,
      self: this.self,
      arbiter: this.arbiterNode,
      regionCount: REGION_COUNT,
      waitingWritesMax: WAITING_WRITES_MAX,
      grantHoldMaxMs: GRANT_HOLD_MAX_MS,
      resendIntervalMs: RESEND_INTERVAL_MS,
    });
    this.arbiter = this.arbiterNode === this.self ? this.newArbiter(membership) : undefined;
    if (!membership.inSync.includes(this.self)) this.fence = `${this.self} is not in the in-sync set of epoch ${membership.epoch}`;
    this.runSource(this.source.setMembership(membership.epoch, membership.inSync, membership.catchingUp ?? []));
    this.adoptCatchUpState(undefined);
  }

  private get scheduler(): Scheduler {
    return this.world.scheduler;
  }

  private log(line: string): void {
    this.scheduler.log(`${this.self} ${line}`);
  }

  private newArbiter(membership: VolumeRecord): Arbiter {
    return new Arbiter({ volume: VOLUME, epoch: membership.epoch, regionCount: REGION_COUNT, waitersPerRegionMax: Math.max(1, membership.replicas.length), grantHoldMaxMs: GRANT_HOLD_MAX_MS, members: streamMembers(membership) });
  }

  get epoch(): number {
    return this.membership.epoch;
  }

  get currentMembership(): VolumeRecord {
    return this.membership;
  }

  get fenceReason(): string | undefined {
    return this.fence;
  }

  targetFor(peer: NodeId): ReplicationTarget | undefined {
    return this.targets.get(peer);
  }

  describe(): string {
    const peers = this.source.members.map((member) => {
      const state = this.source.peer(member)!;
      return `${member}:acked ${state.ackedSeq} ${state.positioned ? 'positioned' : 'unpositioned'}${state.linkUp ? '' : ' link down'}`;
    });
    const targets = [...this.targets].map(([peer, target]) => `${peer}@${target.epoch} received ${target.receivedSequence}`);
    return (
      `epoch ${this.membership.epoch} fence ${this.fence ?? '-'} leaving ${this.leavingToCatchUp} pending ${this.pending.size} held ${this.heldPolicing.length} releaseSync ${this.releaseSyncRunning} ` +
      `source@${this.source.epoch} last ${this.source.lastSequence} pendingOps ${this.source.pendingOperations} [${peers.join(' ')}] targets [${targets.join(' ')}] ` +
      `holder@${this.holder.epoch} waiting ${this.holder.writesWaiting} admitted ${this.holder.writesAdmitted} changing ${this.holder.changingEpoch} ` +
      `grants [${Array.from({ length: REGION_COUNT }, (_, region) => { const grant = this.holder.grantOf(region); return grant.held ? `${region}:g${grant.generation}${grant.revoking ? 'R' : ''}` : ''; }).filter((text) => text !== '').join(' ')}] ` +
      `arbiter ${this.arbiter ? `${JSON.stringify(this.arbiter.summary())} ${Array.from({ length: REGION_COUNT }, (_, region) => { const view = this.arbiter!.region(region); return `${region}:${view.holder ?? '-'}/g${view.generation}/w${view.waiters.join('')}`; }).join(' ')}` : '-'} catch-up ${this.catchUp === undefined ? '-' : this.catchUp.stopped ? 'stopped' : 'running'} repair ${this.repair === undefined ? '-' : this.repair.stopped ? 'stopped' : 'running'} store ${this.store.busy ? 'busy' : 'idle'} paused ${this.pausedInbound.size} regionRequests ${this.regionRequests.size}`
    );
  }

  /** Nothing pending here and every machine at `epoch` with every stream caught up (quiescence). */
  idle(epoch: number): boolean {
    if (this.pending.size > 0 || this.heldPolicing.length > 0 || this.releaseSyncRunning || this.store.busy || this.pausedInbound.size > 0 || this.regionRequests.size > 0) return false;
    if ((this.catchUp !== undefined && !this.catchUp.stopped) || (this.repair !== undefined && !this.repair.stopped)) return false;
    if (this.holder.writesWaiting > 0 || this.holder.writesAdmitted > 0 || this.holder.changingEpoch || this.holder.epoch !== epoch) return false;
    if (this.source.pendingOperations > 0 || this.source.epoch !== epoch || this.membership.epoch !== epoch || this.fence !== undefined) return false;
    // A member that joined at a floor stays below this source's last sequence until the next
    // WRITE (a stream restart) moves it: the source's view is the one that counts.
    for (const [peer, target] of this.targets) {
      if (target.epoch !== epoch || this.source.peer(peer)?.ackedSeq !== this.source.lastSequence) return false;
    }
    return true;
  }

  // ---- client operations ----------------------------------------------------------------

  /** ReplicatedVolume.write: a refusal (fenced) comes back at once, like the thrown error. */
  write(offset: number, payload: Buffer, fua: boolean, done: Completion): string | undefined {
    const refusal = this.usableProblem();
    if (refusal !== undefined) return refusal;
    const operationId = this.nextOperationId++;
    this.pending.set(operationId, { done, holdsGrant: true, admitted: false, write: { offset, payload, fua } });
    this.runHolder(this.holder.acquire(operationId, regionsOf(offset, payload.length, REGION_SIZE_BYTES)));
    return undefined;
  }

  flush(done: Completion): string | undefined {
    const refusal = this.usableProblem();
    if (refusal !== undefined) return refusal;
    const operationId = this.nextOperationId++;
    this.pending.set(operationId, { done, holdsGrant: false, admitted: false });
    this.runSource(this.source.flush(operationId));
    return undefined;
  }

  /** ReplicatedVolume.read: checked, then what the store holds now (its read waits for registered entries). */
  read(offset: number, lengthBytes: number): Buffer | string {
    const refusal = this.usableProblem();
    if (refusal !== undefined) return refusal;
    return this.store.read(offset, lengthBytes);
  }

  // ---- the coordinator's news -----------------------------------------------------------

  changeMembership(next: VolumeRecord): void {
    if (this.closed || next.epoch <= this.membership.epoch) return;
    const previous = this.membership;
    // Before anything completes under the new record: a walk older than this cannot promote.
    if (this.invalidatesWalks(previous, next)) this.walksInvalidAtEpoch = next.epoch;
    this.membership = next;
    this.arbiterNode = arbiterOf(next);
    this.log(`epoch ${next.epoch}: inSync ${next.inSync.join(',')} catchingUp ${(next.catchingUp ?? []).join(',') || '-'} arbiter ${this.arbiterNode}`);
    this.fence = next.inSync.includes(this.self) ? this.nodeFence : `${this.self} is not in the in-sync set of epoch ${next.epoch}`;
    this.runSource(this.source.setMembership(next.epoch, next.inSync, next.catchingUp ?? []));
    if (!next.inSync.includes(this.self)) this.leavingToCatchUp = false;
    this.adoptCatchUpState(previous);
    this.repairAfterLoss(previous);
    // A completed walk still current asks again on the record adopted now (see caughtUp).
    if ((next.catchingUp ?? []).includes(this.self) && this.catchUp?.completed === true && !this.world.asBuilt.has('noRepairAfterLoss')) this.caughtUp(this.catchUp.walk);
    this.runReplicationWaiters();
    for (const [peer, target] of this.targets) if (target.epoch < next.epoch) this.runTarget(peer, target.setEpoch(next.epoch));
    this.heldPolicing.length = 0;
    this.releaseSyncCovers = 0;
    if (this.arbiterNode === this.self) {
      if (this.arbiter) this.arbiter.reset(next.epoch, streamMembers(next));
      else this.arbiter = this.newArbiter(next);
    } else {
      this.arbiter = undefined;
    }
    this.runHolder(this.holder.changeEpoch(next.epoch, this.arbiterNode));
  }

  setFence(reason: string | undefined): void {
    if (reason === this.nodeFence) return;
    this.nodeFence = reason;
    const next = this.membership.inSync.includes(this.self) ? reason : this.fence;
    if (next === this.fence) return;
    this.fence = next;
    this.log(next ? `fenced: ${next}` : 'unfenced');
  }

  close(): void {
    this.closed = true;
    this.catchUp?.stop();
    this.repair?.stop();
  }

  // ---- peer inputs ----------------------------------------------------------------------

  receive(peer: NodeId, message: FailureMessage): void {
    if (this.closed || !this.peers.includes(peer)) return;
    switch (message.type) {
      case 'WRITE':
      case 'SYNC':
      case 'CHECKPOINT': {
        const target = this.targets.get(peer)!;
        if (!streamMembers(this.membership).includes(peer)) {
          this.log(`drops ${describeMessage(message)} from ${peer}: not a stream member at epoch ${this.membership.epoch}`);
          return;
        }
        if (message.epoch > this.membership.epoch && !this.world.asBuilt.has('appliesFramesOfUnknownEpochs')) {
          // Who streams at that epoch is unknown here yet: the source may have been removed by
          // it. Dropped; the link is reset so that the source repositions and resends once this
          // node has learned the epoch (the 'appliesFramesOfUnknownEpochs' correction).
          this.log(`drops ${describeMessage(message)} from ${peer}: epoch ${message.epoch} is not known here yet (${this.membership.epoch})`);
          this.world.network.failLink(peer, this.self, { bothDirections: true });
          return;
        }
        const paused = this.pausedInbound.get(peer);
        if (paused) {
          paused.push(message);
          return;
        }
        this.frameEpoch = message.epoch;
        const effects = target.receive(message as TargetInboundMessage);
        if (effects.some((effect) => effect.kind === 'rebase')) this.pausedInbound.set(peer, [message]);
        this.runTarget(peer, effects);
        return;
      }
      case 'ACK':
      case 'SYNC_ACK':
      case 'CHECKPOINT_ACK':
        this.runSource(this.source.receive(peer, message as SourceInboundMessage));
        this.runReplicationWaiters();
        return;
      case 'GRANT_REQUEST':
      case 'GRANT':
      case 'REVOKE':
      case 'RELEASE':
        this.receivePolicing(peer, fromWireGrantMessage(message as GrantMessage));
        return;
      case 'REGION_REQUEST':
        this.answerRegionRequest(peer, message);
        return;
      case 'REGION_REPLY': {
        const request = this.regionRequests.get(message.requestId);
        if (!request || request.peer !== peer) return;
        this.regionRequests.delete(message.requestId);
        request.timer.cancel();
        if (message.ok) request.answer(undefined, message.data);
        else request.answer(`${peer}: ${message.data.toString('utf8')}`);
        return;
      }
      default:
        return;
    }
  }

  /**
   * A link with `peer` came up (`outbound`: the one this node sends on). One simulated link per
   * ordered pair carries everything one way, where production has a TCP connection per pair and
   * direction carrying both ways: as in cluster-simulation.ts, every machine hears of every link
   * event of a peer (production's outboundUp and inboundUp together).
   */
  linkUp(peer: NodeId, outbound: boolean): void {
    if (this.closed) return;
    this.runSource(this.source.linkUp(peer, outbound));
    this.runTarget(peer, this.targets.get(peer)!.linkUp());
    this.runHolder(this.holder.linkUp(peer));
    if (this.arbiter) this.runArbiter(this.arbiter.linkUp(peer));
  }

  linkDown(peer: NodeId, outbound: boolean): void {
    if (this.closed) return;
    this.runSource(this.source.linkDown(peer, outbound));
  }

  tick(nowMs: number): void {
    if (this.closed) return;
    this.runSource(this.source.tick(nowMs));
    this.checkStreamPositions(nowMs);
    this.runHolder(this.holder.tick(nowMs));
    if (this.arbiter) this.runArbiter(this.arbiter.tick(nowMs));
    if (nowMs - this.lastCheckpointMs >= CHECKPOINT_INTERVAL_MS) {
      this.lastCheckpointMs = nowMs;
      const stamp = this.store.lastStamp;
      if (stamp > this.checkpointedStamp) this.store.checkpoint(() => (this.checkpointedStamp = Math.max(this.checkpointedStamp, stamp)));
    }
  }

  // ---- internals: client operations -------------------------------------------------------

  /**
   * For the checkers: in the coordinator's in-sync set and not a restarted node that still has
   * to leave it to catch up (its data is not the volume's until then; it serves nothing).
   */
  private trustedInSync(): boolean {
    return this.world.coordinator.record.inSync.includes(this.self) && !(this.node.mustCatchUp && !this.world.asBuilt.has('restartRejoinsInSync'));
  }

  /** Why this replica may not serve I/O now (undefined: it serves). */
  servingProblem(): string | undefined {
    return this.usableProblem();
  }

  private usableProblem(): string | undefined {
    if (this.closed) return 'closed';
    if (this.fence) return `not serving on this node: ${this.fence}`;
    // The 'sequencesDuringSkip' correction: nothing may take a sequence number while lost ones are voided.
    if (this.skippingLostSequences && !this.world.asBuilt.has('sequencesDuringSkip')) return 'not serving on this node: voiding own sequence numbers its log lost';
    if (this.leavingToCatchUp) return 'not serving on this node: leaving the in-sync set to catch up';
    const refusal = this.node.membership.leaseProblem();
    if (refusal) return `not serving on this node: ${refusal}`;
    return undefined;
  }

  private admitted(operationId: number, epoch: number): void {
    const operation = this.pending.get(operationId);
    if (operation?.copy?.barrierEpoch !== undefined && epoch < operation.copy.barrierEpoch) {
      // A grant cached from before the walk's epoch proves nothing about that epoch's fence.
      operation.admitted = true;
      this.finish(operationId, { ok: false, code: 'NBD_EIO', message: `barrier admitted at epoch ${epoch}, before the walk's ${operation.copy.barrierEpoch}` });
      return;
    }
    if (operation?.rewrite) {
      operation.admitted = true;
      this.deferredRewrites.push(operationId);
      this.runRewrites();
      return;
    }
    if (operation?.copy) {
      operation.admitted = true;
      this.copyAdmitted(operationId, operation.copy);
      return;
    }
    assert(operation?.write !== undefined, `admitted write ${operationId} is not pending`);
    operation.admitted = true;
    if (this.skippingLostSequences && !this.world.asBuilt.has('sequencesDuringSkip')) {
      this.finish(operationId, { ok: false, code: 'NBD_EIO', message: `${this.self} is voiding own sequence numbers its log lost: write not executed` });
      return;
    }
    if (!this.membership.inSync.includes(this.self) && !this.world.asBuilt.has('admitWhileOutOfSync')) {
      // It waited for its grant while this node left the in-sync set: a replica out of sync
      // serves no client I/O, and its catch-up copies may be under way in this very region.
      this.finish(operationId, { ok: false, code: 'NBD_EIO', message: `${this.self} is not in the in-sync set of epoch ${this.membership.epoch}: write not executed` });
      return;
    }
    const { offset, payload, fua } = operation.write;
    if (this.scheduler.trace.enabled) this.log(`admits write ${payload.readUInt32BE(0)} (operation ${operationId}) at epoch ${this.membership.epoch}`);
    this.sourceWriteKinds.push({ operationId, kind: 'write' });
    this.runSource(this.source.write({ operationId, entryType: ENTRY_TYPE.WRITE, offset, lengthBytes: payload.length, payload, fua }));
  }

  private finish(operationId: number, outcome: OperationResult, sequence?: number): void {
    // A write the source failed while still queued was never appended: no entry follows for it.
    if (!outcome.ok) {
      const queued = this.sourceWriteKinds.findIndex((item) => item.operationId === operationId);
      if (queued >= 0) this.sourceWriteKinds.splice(queued, 1);
    }
    const operation = this.pending.get(operationId);
    if (!operation) return;
    this.pending.delete(operationId);
    let result = outcome;
    if (result.ok && operation.write !== undefined && !this.node.membership.leaseValid() && !this.world.asBuilt.has('acknowledgeAfterLeaseLoss')) {
      // [I2] no acknowledgement without a lease; the write may still have taken effect (EIO allows that).
      result = { ok: false, code: 'NBD_EIO', message: `${this.self} holds no valid lease: write not acknowledged` };
    }
    if (result.ok && operation.holdsGrant) this.ownWriteCompletedSinceOpen = true;
    operation.done(result.ok ? undefined : { code: result.code, message: result.message }, sequence);
    if (!operation.holdsGrant || !operation.admitted || this.closed) return;
    const release = (): void => {
      if (!this.closed) this.runHolder(this.holder.writeAcknowledged(operationId));
    };
    if (result.ok && sequence !== undefined) this.whenReplicated('ackedSeq', sequence, release);
    else release();
  }

  private whenReplicated(field: 'ackedSeq' | 'syncAckedSeq', sequence: number, run: () => void): void {
    if (this.source.memberWatermark(field) >= sequence) {
      run();
      return;
    }
    const waiters = this.replicationWaiters[field];
    let index = waiters.length;
    while (index > 0 && waiters[index - 1]!.sequence > sequence) index--;
    waiters.splice(index, 0, { sequence, run });
  }

  private runReplicationWaiters(): void {
    for (const field of ['ackedSeq', 'syncAckedSeq'] as const) {
      const waiters = this.replicationWaiters[field];
      if (waiters.length === 0) continue;
      const watermark = this.source.memberWatermark(field);
      let count = 0;
      while (count < waiters.length && waiters[count]!.sequence <= watermark) count++;
      for (const waiter of waiters.splice(0, count)) waiter.run();
    }
  }

  // ---- internals: effects -----------------------------------------------------------------

  private runSource(effects: readonly SourceEffect[]): void {
    if (this.performingSourceEffects) {
      if (effects.length > 0) this.nestedSourceEffects.push(effects);
      return;
    }
    this.performingSourceEffects = true;
    try {
      this.performSourceEffects(effects);
      for (let batch = this.nestedSourceEffects.shift(); batch !== undefined; batch = this.nestedSourceEffects.shift()) this.performSourceEffects(batch);
    } finally {
      this.performingSourceEffects = false;
    }
  }

  private performSourceEffects(effects: readonly SourceEffect[]): void {
    for (const sendsFirst of [true, false]) {
      for (const effect of effects) {
        if ((effect.kind === 'send') !== sendsFirst) continue;
        switch (effect.kind) {
          case 'appendLocal': {
            const { entry } = effect;
            const kind = this.sourceWriteKinds.shift()?.kind;
            assert(kind !== undefined, `${this.self}: entry ${entry.sequence} appended for no source.write`);
            this.world.checkers.recordApply(this.node, entry.offset, entry.payload, kind === 'write' ? 'write' : 'copy-own', this.trustedInSync());
            const sequence = this.store.writeLocal(entry.offset, entry.payload, (applied) => {
              if (!this.closed) this.runSource(this.source.localApplied(applied));
            });
            assert(sequence === entry.sequence, `store sequence ${sequence} differs from the source's ${entry.sequence}`);
            this.world.checkers.noteEntry(this.self, entry.sequence, kind);
            this.world.checkers.noteStamp(this.self, this.store.lastStamp, kind);
            if (this.deferredRewrites.length > 0) this.scheduler.after(0, () => this.runRewrites(), `rewrites ${this.self}`);
            break;
          }
          case 'syncLocal':
            this.store.flushLocal(() => {
              if (!this.closed) this.runSource(this.source.localSynced(effect.throughSequence));
            });
            break;
          case 'send':
            this.sendToPeer(effect.peer, effect.message);
            break;
          case 'complete':
            this.finish(effect.operationId, effect.result, effect.sequence);
            break;
          case 'peerNeedsCatchUp':
            if (!this.ownWriteCompletedSinceOpen && this.membership.inSync.includes(this.self)) {
              this.leaveToCatchUp(`${effect.peer} never received this node's entries ${effect.peerSequence + 1}.. from before its restart`);
            } else {
              this.log(`peer ${effect.peer} stands below the resend window (${effect.peerSequence} < ${effect.retainedFromSequence}): needs a resync (not built)`);
            }
            break;
          case 'peerAhead':
            // Before commit 7fbf5d4 the source refused such an ACK ('sequenceFromLog' replays that).
            if (!this.world.asBuilt.has('sequenceFromLog')) this.skipLostSequences(effect.peer, effect.peerSequence, effect.lastSequence);
            else this.log(`source refused ${effect.peer}: ACK(${effect.peerSequence}) beyond the last sequence ${effect.lastSequence}`);
            break;
          case 'refused':
            if (effect.code === 'REPL_EPOCH_STALE') this.world.report.staleFramesRefused++;
            this.log(`source refused ${effect.peer}: ${effect.reason}`);
            break;
        }
      }
    }
  }

  /** Set while the own log is padded past lost sequences (ReplicatedVolume.skipLostSequences). */
  skippingLostSequences = false;
  private lostSequencesTo = 0;

  /**
   * ReplicatedVolume.skipLostSequences (commit 7fbf5d4): a peer holds own entries this node's log
   * lost in a crash. The log is padded to the highest such report with entries that change
   * nothing (block 0's own bytes again, padOwnLog), synced, and the source skips there; this node
   * leaves the in-sync set and catches up (its catch-up waits for the skip).
   */
  private skipLostSequences(peer: NodeId, peerSequence: number, lastSequence: number): void {
    this.lostSequencesTo = Math.max(this.lostSequencesTo, peerSequence);
    if (this.skippingLostSequences || this.closed) return;
    this.skippingLostSequences = true;
    this.world.report.lostSequenceSkips++;
    this.log(`${peer} holds own entries ${lastSequence + 1}..${peerSequence} the log lost: voiding their numbers and catching up`);
    if (this.membership.inSync.includes(this.self)) this.leaveToCatchUp(`${peer} holds this node's entries ${lastSequence + 1}..${peerSequence}, which its log lost in a crash`);
    const step = (): void => {
      if (this.closed) return;
      if (this.lostSequencesTo <= this.source.lastSequence) {
        this.skippingLostSequences = false;
        return;
      }
      const to = this.lostSequencesTo;
      const bytes = this.store.read(0, REGION_SIZE_BYTES);
      for (let sequence = this.store.lastOwnSequence + 1; sequence <= to; sequence++) {
        const logged = this.store.writeLocal(0, bytes, () => undefined);
        assert(logged === sequence, `padding entry logged as ${logged}, not ${sequence}`);
        this.world.checkers.noteStamp(this.self, this.store.lastStamp, 'copy');
      }
      this.store.flushLocal(() => {
        if (this.closed) return;
        this.runSource(this.source.skipTo(to));
        for (const member of this.source.members) this.world.network.failLink(this.self, member, { bothDirections: true });
        step();
      });
    };
    step();
  }


  private runTarget(peer: NodeId, effects: readonly TargetEffect[]): void {
    const target = this.targets.get(peer)!;
    for (const effect of effects) {
      switch (effect.kind) {
        case 'apply': {
          const { entry } = effect;
          // [I2] a frame of epoch e comes from a member of e's stream.
          const record = this.world.coordinator.recordAt(this.frameEpoch);
          if (record === undefined || !streamMembers(record).includes(peer)) {
            this.world.violation('I2', `${this.self} applies ${peer}'s entry ${entry.sequence} from a frame of epoch ${this.frameEpoch}, at which ${peer} is no stream member`);
          }
          const kind = this.world.checkers.entryKind(peer, entry.sequence);
          this.world.checkers.recordApply(this.node, entry.offset, entry.payload, kind === 'copy' ? 'copy-remote' : 'write', this.trustedInSync());
          this.store.applyRemote(peer, entry.sequence, entry.offset, entry.payload);
          this.world.checkers.noteStamp(this.self, this.store.lastStamp, kind);
          break;
        }
        case 'appendToContainer':
          this.store.spill(peer, effect.sync, (durable) => {
            if (!effect.sync || this.closed) return;
            assert(durable >= effect.throughSequence, `container of ${peer} durable through ${durable}, not ${effect.throughSequence}`);
            this.runTarget(peer, target.containerSynced(effect.throughSequence));
          });
          break;
        case 'checkpoint':
          this.checkpointCovering(peer, effect.sequence, 1);
          break;
        case 'send':
          this.answerSource(peer, effect.message);
          break;
        case 'resyncNeeded':
          this.log(`stream gap from ${peer}: ${effect.reason}`);
          this.world.network.failLink(peer, this.self, { bothDirections: true });
          break;
        case 'rebase':
          this.rebaseStream(peer, effect.throughSequence);
          break;
        case 'refused':
          if (effect.code === 'REPL_EPOCH_STALE') this.world.report.staleFramesRefused++;
          this.log(`target for ${peer} refused: ${effect.reason}`);
          break;
      }
    }
  }

  private checkpointCovering(peer: NodeId, sequence: number, attempt: number): void {
    this.store.checkpoint((covered) => {
      if (this.closed) return;
      if ((covered.get(peer) ?? 0) >= sequence) {
        this.runTarget(peer, this.targets.get(peer)!.checkpointDone(sequence));
        return;
      }
      assert(attempt < CHECKPOINT_COVER_ATTEMPTS_MAX, `checkpoint does not cover ${peer}'s sequence ${sequence}`);
      this.checkpointCovering(peer, sequence, attempt + 1);
    });
  }

  private rebaseStream(peer: NodeId, throughSequence: number): void {
    if (!this.pausedInbound.has(peer)) this.pausedInbound.set(peer, []);
    this.log(`catch-up: ${peer}'s stream rebased past ${throughSequence}`);
    this.store.rebaseSource(peer, throughSequence, () => {
      if (this.closed) return;
      this.runTarget(peer, this.targets.get(peer)!.rebased(throughSequence));
      const held = this.pausedInbound.get(peer) ?? [];
      this.pausedInbound.delete(peer);
      for (const message of held) this.receive(peer, message);
    });
  }

  private receivePolicing(peer: NodeId, message: PolicingMessage): void {
    if (policingRecipient(message, (epoch) => this.arbiter !== undefined && this.arbiter.epoch === epoch) === 'arbiter') {
      if (this.arbiter) this.runArbiter(this.arbiter.receive(peer, message));
      return;
    }
    this.runHolder(this.holder.receive(peer, message));
  }

  private sendPolicing(target: NodeId, message: PolicingMessage, recipientRole: 'holder' | 'arbiter'): void {
    // DRAINED hands every region of the old epoch over at once: like a RELEASE, it waits for a
    // sync (the 'drainedWithoutSync' correction; the arbiter's echo is no handover).
    const isDrained = message.type === 'DRAINED' && recipientRole === 'arbiter' && !this.world.asBuilt.has('drainedWithoutSync');
    const isRelease = message.type === 'RELEASE' || isDrained;
    if (!isRelease && this.heldPolicing.length === 0) {
      this.deliverPolicing(target, message, recipientRole);
      return;
    }
    this.heldPolicing.push({ target, message, recipientRole, isRelease });
    this.startReleaseSync();
  }

  private startReleaseSync(): void {
    if (this.releaseSyncRunning || this.heldPolicing.length === 0 || this.closed) return;
    this.releaseSyncRunning = true;
    this.releaseSyncCovers = this.heldPolicing.length;
    const epoch = this.membership.epoch;
    const operationId = this.nextOperationId++;
    const finished = (error?: string): void => {
      this.releaseSyncRunning = false;
      if (this.closed) return;
      if (error) this.log(`sync before a grant release failed (${error}); releasing anyway`);
      const covered = epoch === this.membership.epoch ? this.releaseSyncCovers : 0;
      this.releaseSyncCovers = 0;
      let index = 0;
      while (index < this.heldPolicing.length && (index < covered || !this.heldPolicing[index]!.isRelease)) index++;
      for (const held of this.heldPolicing.splice(0, index)) this.deliverPolicing(held.target, held.message, held.recipientRole);
      this.startReleaseSync();
    };
    this.pending.set(operationId, {
      holdsGrant: false,
      admitted: false,
      // ReplicatedVolume continues in a promise callback: after the effects being performed.
      done: (error, sequence) => this.scheduler.after(0, () => (error ? finished(error.message) : this.whenReplicated('syncAckedSeq', sequence ?? 0, () => finished())), `release sync ${this.self}`),
    });
    this.runSource(this.source.flush(operationId));
  }

  private deliverPolicing(target: NodeId, message: PolicingMessage, recipientRole: 'holder' | 'arbiter'): void {
    if (target === this.self) {
      this.scheduler.after(0, () => {
        if (this.closed) return;
        if (recipientRole === 'arbiter') {
          if (this.arbiter) this.runArbiter(this.arbiter.receive(this.self, message));
        } else {
          this.runHolder(this.holder.receive(this.self, message));
        }
      }, `local policing ${this.self}`);
      return;
    }
    this.sendToPeer(target, toWireGrantMessage(message));
  }

  private runHolder(effects: readonly HolderEffect[]): void {
    for (const effect of effects) {
      switch (effect.kind) {
        case 'send':
          this.sendPolicing(effect.target, effect.message, 'arbiter');
          break;
        case 'admit':
          this.admitted(effect.writeId, effect.epoch);
          break;
        case 'refuse':
          this.finish(effect.writeId, { ok: false, code: effect.code, message: effect.message });
          break;
        case 'ignored':
          break;
        case 'holdOverdue':
          this.log(`holder: region ${effect.region} held ${effect.revokedForMs} ms after its revoke`);
          break;
        case 'epochChanged':
          this.log(`holder now in epoch ${effect.epoch}, arbiter ${effect.arbiter}`);
          break;
      }
    }
  }

  private runArbiter(effects: readonly ArbiterEffect[]): void {
    for (const effect of effects) {
      if (effect.kind === 'send') this.sendPolicing(effect.target, effect.message, 'holder');
      else if (effect.kind === 'holdOverdue') this.log(`arbiter: ${effect.holder} keeps region ${effect.region} ${effect.revokedForMs} ms after its revoke`);
    }
  }

  private leaveToCatchUp(reason: string): void {
    if (this.leavingToCatchUp || this.closed) return;
    if (this.membership.inSync.length < 2) {
      this.log(`should catch up but cannot leave the in-sync set: ${reason}`);
      return;
    }
    this.leavingToCatchUp = true;
    this.log(`leaving the in-sync set to catch up: ${reason}`);
    this.node.membership.leaveToCatchUp((left) => {
      if (left || this.closed) return;
      this.leavingToCatchUp = false;
      this.log('could not leave the in-sync set to catch up; trying again on the next stranded stream');
    });
  }

  private checkStreamPositions(nowMs: number): void {
    for (const member of this.source.members) {
      const state = this.source.peer(member);
      if (!state || state.positioned || !state.linkUp) {
        this.unpositionedSinceMs.delete(member);
        continue;
      }
      const since = this.unpositionedSinceMs.get(member);
      if (since === undefined) {
        this.unpositionedSinceMs.set(member, nowMs);
      } else if (nowMs - since >= STREAM_UNPOSITIONED_MAX_MS) {
        this.unpositionedSinceMs.delete(member);
        this.log(`no stream position from ${member} for ${nowMs - since} ms: redialling`);
        this.world.network.failLink(this.self, member, { bothDirections: true });
      }
    }
  }

  // ---- transport (one simulated link per ordered pair) ------------------------------------

  private sendToPeer(peer: NodeId, message: FailureMessage): boolean {
    if (this.world.network.linkStatus(this.self, peer) !== 'up') return false;
    this.world.network.send(this.self, peer, message);
    return true;
  }

  private answerSource(peer: NodeId, message: FailureMessage): void {
    this.sendToPeer(peer, message);
  }

  // ---- internals: catch-up ----------------------------------------------------------------

  private adoptCatchUpState(previous: VolumeRecord | undefined): void {
    const catching = (this.membership.catchingUp ?? []).includes(this.self);
    const wasCatching = previous !== undefined && (previous.catchingUp ?? []).includes(this.self);
    if (!catching) {
      if (this.catchUp && !this.catchUp.stopped) {
        this.catchUp.stop();
        this.log('catch-up ended');
      }
      return;
    }
    if (wasCatching && this.catchUp && !this.catchUp.stopped) return;
    this.catchUp = new CatchUpRun(this.world, this, this.membership.epoch, 'catch-up');
    this.catchUp.start();
  }

  /** The epoch of the last record change after which a catch-up walk must compare again. */
  private walksInvalidAtEpoch = 0;

  /** A member left the in-sync set or the stream, or an in-sync member rejoined (it may have restarted). */
  private invalidatesWalks(previous: VolumeRecord, next: VolumeRecord): boolean {
    const sameSet = (a: readonly string[], b: readonly string[]): boolean => a.length === b.length && a.every((node) => b.includes(node));
    const lost = previous.inSync.some((node) => !next.inSync.includes(node)) || streamMembers(previous).some((node) => !streamMembers(next).includes(node));
    return lost || (sameSet(previous.inSync, next.inSync) && sameSet(previous.catchingUp ?? [], next.catchingUp ?? []));
  }

  /**
   * The 'noRepairAfterLoss' correction. A node that left the in-sync set (removed, or gone to
   * catch up) may have had writes in flight that reached some members and not others: never
   * acknowledged, but the in-sync replicas now differ. Every in-sync member but the epoch's truth
   * reconciles with it; a catch-up walk under way starts again (it may have compared a chunk
   * before such a write landed on its truth).
   */
  private repairAfterLoss(previous: VolumeRecord): void {
    if (this.world.asBuilt.has('noRepairAfterLoss')) return;
    const next = this.membership;
    const lost = previous.inSync.some((node) => !next.inSync.includes(node)) || streamMembers(previous).some((node) => !streamMembers(next).includes(node));
    // A rejoin (same sets, a new epoch) may follow a restart of an in-sync member that holds
    // other data now (the last in-sync member on a replaced disk, say): a walk compares again.
    const sameSet = (a: readonly string[], b: readonly string[]): boolean => a.length === b.length && a.every((node) => b.includes(node));
    const rejoin = sameSet(previous.inSync, next.inSync) && sameSet(previous.catchingUp ?? [], next.catchingUp ?? []);
    if ((next.catchingUp ?? []).includes(this.self)) {
      const wasCatching = (previous.catchingUp ?? []).includes(this.self);
      if (!(lost || rejoin) || !wasCatching || this.catchUp === undefined || this.catchUp.stopped) return;
      this.catchUp.stop();
      this.log(`catch-up starts again: ${lost ? 'a member left' : 'an in-sync member rejoined'} while it walked`);
      this.catchUp = new CatchUpRun(this.world, this, next.epoch, 'catch-up');
      this.catchUp.start();
      return;
    }
    if (!lost) return;
    const truth = next.arbiter !== undefined && next.inSync.includes(next.arbiter) ? next.arbiter : next.inSync[0]!;
    if (truth !== this.self) return;
    this.repair?.stop();
    this.repair = new CatchUpRun(this.world, this, next.epoch, 'repair');
    this.repair.start();
  }

  /**
   * The members a repair walk reconciles: every other in-sync member. It goes on if another
   * node becomes the truth meanwhile: any serving in-sync member holds every acknowledged write,
   * and each rewrite makes every member equal on its chunk, so two walks do not undo each other.
   */
  repairMembers(): NodeId[] {
    return this.membership.inSync.includes(this.self) ? this.membership.inSync.filter((node) => node !== this.self) : [];
  }

  /** The repair's rewrite: holding the chunk's grant, this node writes its own bytes of it again (mirrored). */
  rewriteUnderGrant(offset: number, lengthBytes: number, done: (error: string | undefined) => void): void {
    if (this.closed) {
      done('closed');
      return;
    }
    const operationId = this.nextOperationId++;
    this.pending.set(operationId, { holdsGrant: true, admitted: false, rewrite: { offset, lengthBytes }, done: (error) => done(error?.message) });
    this.runHolder(this.holder.acquire(operationId, regionsOf(offset, lengthBytes, REGION_SIZE_BYTES)));
  }

  /** Takes and releases a grant (region 0) at `epoch` or later, as a pseudo-write: returns once that epoch's fence is behind. */
  barrier(epoch: number, done: (error: string | undefined) => void): void {
    this.copyUnderGrant(0, REGION_SIZE_BYTES, (answer) => answer(undefined, this.store.read(0, REGION_SIZE_BYTES)), (error) => done(error), epoch);
  }

  /** A timer of this node's incarnation (it dies with it). */
  after(delayMs: number, fn: () => void): void {
    this.node.after(delayMs, () => {
      if (!this.closed) fn();
    }, `volume timer ${this.self}`);
  }

  /** CatchUpVolume.sourcesOfTruth. */
  sourcesOfTruth(): NodeId[] {
    return this.membership.inSync.filter((node) => node !== this.self);
  }

  /**
   * The end of a catch-up walk: MembershipMonitor.caughtUp (a CAS into the in-sync set). Part of
   * the 'noRepairAfterLoss' correction: only for the walk under way when the CAS is made (one
   * that a member's leaving made start again must not promote the replica on the old walk).
   */
  caughtUp(walk: number): void {
    // On a record this volume has adopted (else a loss in between may not have restarted the
    // walk yet; adopting it asks again, see changeMembership).
    const current = (record: VolumeRecord): boolean =>
      this.world.asBuilt.has('noRepairAfterLoss') ||
      (record.epoch === this.membership.epoch && this.catchUp !== undefined && this.catchUp.walk === walk && this.catchUp.completed && this.catchUp.startEpoch >= this.walksInvalidAtEpoch);
    this.node.membership.caughtUp(current);
  }

  requestRegion(peer: NodeId, kind: 'digests' | 'read', offset: number, lengthBytes: number, chunkBytes: number, answer: RegionAnswer): void {
    if (this.regionRequests.size >= REGION_REQUESTS_MAX) {
      answer(`${REGION_REQUESTS_MAX} region requests already wait`);
      return;
    }
    const requestId = this.nextRegionRequestId++;
    const timer = this.node.after(REGION_REQUEST_TIMEOUT_MS, () => {
      if (!this.regionRequests.delete(requestId)) return;
      answer(`${peer} did not answer a ${kind} request in ${REGION_REQUEST_TIMEOUT_MS} ms`);
    }, `region request timeout ${this.self}`);
    this.regionRequests.set(requestId, { peer, answer, timer });
    const sent = this.sendToPeer(peer, { type: 'REGION_REQUEST', volume: VOLUME, epoch: this.membership.epoch, requestId, kind, offset, lengthBytes, chunkBytes });
    if (!sent) {
      this.regionRequests.delete(requestId);
      timer.cancel();
      // The caller's await sees the rejection in a later microtask.
      this.scheduler.after(0, () => answer(`no link to ${peer}`), `region request failed ${this.self}`);
    }
  }

  /** An in-sync, unfenced replica answers a catching-up peer (after its local read). */
  private answerRegionRequest(peer: NodeId, request: RegionRequestMessage): void {
    const reply = (ok: boolean, data: Buffer): void => {
      if (this.closed) return;
      this.answerSource(peer, { type: 'REGION_REPLY', volume: VOLUME, epoch: Math.max(request.epoch, this.membership.epoch), requestId: request.requestId, ok, data });
    };
    const refusal = this.usableProblem();
    if (refusal !== undefined) {
      reply(false, Buffer.from(refusal));
      return;
    }
    if (request.kind === 'dirty' || request.offset < 0 || request.lengthBytes < 1 || request.offset + request.lengthBytes > IMAGE_BYTES) {
      reply(false, Buffer.from(`bad ${request.kind} request`));
      return;
    }
    const data = this.store.read(request.offset, request.lengthBytes);
    // [I3] what a replica hands a catching-up peer as the truth is fresh.
    const firstBlock = request.offset / BLOCK_BYTES;
    for (let index = 0; index < request.lengthBytes / BLOCK_BYTES; index++) {
      const value = this.world.checkers.blockValueAt(data, index * BLOCK_BYTES, firstBlock + index);
      if (typeof value === 'string') this.world.violation('I3', `${this.self} answers a catch-up request with ${value}`);
      this.world.checkers.checkFresh(this.self, firstBlock + index, value, this.scheduler.nowMs(), `catch-up ${request.kind} answer`);
    }
    const answer = request.kind === 'read' ? data : Buffer.concat(digestChunks(data, request.chunkBytes).map((digest) => Buffer.from(digest, 'hex')));
    // The store's read completes after its I/O.
    this.node.after(1, () => reply(true, answer), `region answer ${this.self}`);
  }

  /** Holding the chunk's grant: fetch the peer's bytes and write them unless equal (copyUnderGrant). */
  copyUnderGrant(offset: number, lengthBytes: number, fetch: NonNullable<PendingOperation['copy']>['fetch'], done: (error: string | undefined, outcome?: 'same' | 'copied') => void, barrierEpoch?: number): void {
    if (this.closed) {
      done('closed');
      return;
    }
    const operationId = this.nextOperationId++;
    const copy: NonNullable<PendingOperation['copy']> = { offset, lengthBytes, fetch, ...(barrierEpoch !== undefined ? { barrierEpoch } : {}) };
    this.pending.set(operationId, { holdsGrant: true, admitted: false, copy, done: (error) => done(error?.message, copy.outcome ?? 'copied') });
    this.runHolder(this.holder.acquire(operationId, regionsOf(offset, lengthBytes, REGION_SIZE_BYTES)));
  }

  private copyAdmitted(operationId: number, copy: NonNullable<PendingOperation['copy']>): void {
    const local = this.store.read(copy.offset, copy.lengthBytes);
    copy.fetch((error, data) => {
      if (this.closed || !this.pending.has(operationId)) return;
      if (this.skippingLostSequences && !this.world.asBuilt.has('sequencesDuringSkip')) {
        // Nothing takes a sequence number while lost ones are voided: the batch is retried.
        this.finish(operationId, { ok: false, code: 'NBD_EIO', message: `catch-up copy at ${copy.offset}: own sequence numbers are being voided` });
        return;
      }
      if (error !== undefined || data === undefined || data.length !== copy.lengthBytes) {
        this.finish(operationId, { ok: false, code: 'NBD_EIO', message: `catch-up read at ${copy.offset}: ${error ?? 'short read'}` });
        return;
      }
      if (data.equals(local)) {
        copy.outcome = 'same';
        this.finish(operationId, { ok: true });
        return;
      }
      copy.outcome = 'copied';
      if (this.scheduler.trace.enabled) this.log(`copies ${copy.offset}+${copy.lengthBytes} (operation ${operationId}) at epoch ${this.membership.epoch}`);
      this.sourceWriteKinds.push({ operationId, kind: 'copy' });
      this.runSource(this.source.write({ operationId, entryType: ENTRY_TYPE.WRITE, offset: copy.offset, lengthBytes: copy.lengthBytes, payload: data, fua: false }));
    });
  }

  /** A FLUSH a fenced replica runs for itself (catch-up's last step). */
  flushInternal(done: (error: string | undefined) => void): void {
    if (this.closed) {
      done('closed');
      return;
    }
    const operationId = this.nextOperationId++;
    this.pending.set(operationId, { holdsGrant: false, admitted: false, done: (error) => done(error?.message) });
    this.runSource(this.source.flush(operationId));
  }
}

// =============================================================================================
// CatchUpRun: CatchUpDriver (src/volume/catch-up.ts), and the repair walk of the corrections
// =============================================================================================

/**
 * A digest walk over the whole volume. `catch-up`: production's driver on a catching-up replica
 * (truths: the in-sync peers in turn; each differing chunk is fetched from the truth and written
 * here under its grant; at the end a FLUSH, then the promotion CAS). `repair` (the
 * 'noRepairAfterLoss' correction): the epoch's truth, after a member left the in-sync set (whose
 * last unacknowledged writes may have reached some members and not others), compares its chunks
 * with every other in-sync member's and rewrites each differing one from its own bytes under the
 * chunk's grant (read at admission and handed to its source at once, so its own client writes
 * under the same grant order after it); no record change. Unless 'catchUpWithoutBarrier' is as
 * built, a walk first takes a grant (any region): the epoch's arbiter grants nothing before every
 * member drained the older epochs' writes, so from then on every write the walk does not see in a
 * digest reaches both sides by their streams.
 */
class CatchUpRun {
  stopped = false;
  /** Walked, copied and flushed everything (a catch-up then asks for its promotion). */
  completed = false;
  private readonly world: World;
  private readonly volume: VolumeShell;
  private readonly epoch: number;
  readonly purpose: 'catch-up' | 'repair';
  /** The epoch the walk started at. */
  get startEpoch(): number {
    return this.epoch;
  }
  private offset = 0;
  private peerIndex = 0;
  private barrierTaken = false;
  private readonly chunkBytes = Math.min(REGION_SIZE_BYTES, 1024 * 1024);
  /** Counts the walks of one volume: a promotion is asked for on behalf of one walk. */
  private static walks = 0;
  readonly walk = ++CatchUpRun.walks;

  constructor(world: World, volume: VolumeShell, epoch: number, purpose: 'catch-up' | 'repair') {
    this.world = world;
    this.volume = volume;
    this.epoch = epoch;
    this.purpose = purpose;
    this.barrierTaken = world.asBuilt.has('catchUpWithoutBarrier');
  }

  start(): void {
    this.world.scheduler.log(`${this.volume.self} ${this.purpose} started at epoch ${this.epoch}`);
    this.next();
  }

  stop(): void {
    this.stopped = true;
  }

  private next(): void {
    if (this.stopped) return;
    if (this.volume.skippingLostSequences) {
      // Production's plan waits for the skip: its copies take new sequence numbers.
      this.volume.after(CATCH_UP_RETRY_MS, () => this.next());
      return;
    }
    if (!this.barrierTaken) {
      this.volume.barrier(this.epoch, (error) => {
        if (this.stopped) return;
        if (error !== undefined) {
          this.world.scheduler.log(`${this.volume.self} ${this.purpose} barrier failed (${error}); retrying`);
          this.volume.after(CATCH_UP_RETRY_MS, () => this.next());
          return;
        }
        this.barrierTaken = true;
        this.next();
      });
      return;
    }
    if (this.world.bug === 'skipCatchUpCopy' && this.purpose === 'catch-up') this.offset = IMAGE_BYTES;
    if (this.offset >= IMAGE_BYTES) {
      this.volume.flushInternal((error) => {
        if (this.stopped) return;
        if (error !== undefined) {
          // Production: run() rejects, the driver is left for dead (logged as 'catch-up failed').
          // A repair whose node left the in-sync set meanwhile is moot: it ends.
          this.world.scheduler.log(`${this.volume.self} ${this.purpose} failed: ${error}`);
          if (this.purpose === 'repair') this.stopped = true;
          return;
        }
        this.stopped = true;
        this.completed = true;
        this.world.scheduler.log(`${this.volume.self} ${this.purpose} copied everything`);
        if (this.purpose === 'catch-up') {
          this.world.report.catchUpsCompleted++;
          this.volume.caughtUp(this.walk);
        } else {
          this.world.report.repairsCompleted++;
        }
      });
      return;
    }
    const length = Math.min(this.chunkBytes * CHUNKS_PER_BATCH, IMAGE_BYTES - this.offset);
    this.batch(this.offset, length, (error) => {
      if (this.stopped) return;
      if (error === undefined) {
        this.offset += length;
        this.next();
        return;
      }
      this.peerIndex++;
      this.world.scheduler.log(`${this.volume.self} ${this.purpose} batch at ${this.offset} failed (${error}); retrying`);
      this.volume.after(CATCH_UP_RETRY_MS, () => this.next());
    });
  }

  private batch(offset: number, length: number, done: (error: string | undefined) => void): void {
    if (this.purpose === 'repair') {
      this.repairBatch(offset, length, this.volume.repairMembers(), done);
      return;
    }
    const peers = this.volume.sourcesOfTruth();
    if (peers.length === 0) {
      this.world.scheduler.after(0, () => done('no in-sync peer to copy from'), 'catch-up no peer');
      return;
    }
    const peer = peers[this.peerIndex % peers.length]!;
    const local = digestChunks(this.volume.store.read(offset, length), this.chunkBytes);
    this.volume.requestRegion(peer, 'digests', offset, length, this.chunkBytes, (error, data) => {
      if (this.stopped) return;
      if (error !== undefined || data === undefined) {
        done(error ?? 'no digests');
        return;
      }
      const remote: string[] = [];
      for (let at = 0; at < data.length; at += 16) remote.push(data.subarray(at, at + 16).toString('hex'));
      if (remote.length !== local.length) {
        done(`peer ${peer} sent ${remote.length} digests for ${local.length} chunks`);
        return;
      }
      const differing = local.map((digest, index) => (digest === remote[index] ? -1 : index)).filter((index) => index >= 0);
      const copyNext = (position: number): void => {
        if (this.stopped) return;
        const index = differing[position];
        if (index === undefined) {
          done(undefined);
          return;
        }
        const start = offset + index * this.chunkBytes;
        const chunkLength = Math.min(this.chunkBytes, offset + length - start);
        this.volume.copyUnderGrant(start, chunkLength, (answer) => this.volume.requestRegion(peer, 'read', start, chunkLength, 0, answer), (copyError, outcome) => {
          if (copyError !== undefined) {
            done(copyError);
            return;
          }
          if (outcome === 'copied') this.world.report.chunksCopied++;
          copyNext(position + 1);
        });
      };
      copyNext(0);
    });
  }

  /** The truth's side: against each member in turn, rewrite the chunks that differ there. */
  private repairBatch(offset: number, length: number, members: readonly NodeId[], done: (error: string | undefined) => void): void {
    // Only a replica that serves is a source of truth (a restarted one is fenced until it left
    // to catch up; production's REGION_REQUEST answers have the same rule).
    const refusal = this.volume.servingProblem();
    if (refusal !== undefined) {
      this.world.scheduler.after(0, () => done(refusal), 'repair fenced');
      return;
    }
    const member = members[0];
    if (member === undefined) {
      this.world.scheduler.after(0, () => done(undefined), 'repair batch done');
      return;
    }
    this.volume.requestRegion(member, 'digests', offset, length, this.chunkBytes, (error, data) => {
      if (this.stopped) return;
      if (error !== undefined || data === undefined) {
        done(error ?? 'no digests');
        return;
      }
      const local = digestChunks(this.volume.store.read(offset, length), this.chunkBytes);
      const differing: number[] = [];
      for (let index = 0; index < local.length; index++) if (data.subarray(index * 16, index * 16 + 16).toString('hex') !== local[index]) differing.push(index);
      const rewriteNext = (position: number): void => {
        if (this.stopped) return;
        const index = differing[position];
        if (index === undefined) {
          this.repairBatch(offset, length, members.slice(1), done);
          return;
        }
        const start = offset + index * this.chunkBytes;
        this.volume.rewriteUnderGrant(start, Math.min(this.chunkBytes, offset + length - start), (rewriteError) => {
          if (rewriteError !== undefined) {
            done(rewriteError);
            return;
          }
          this.world.report.chunksRewritten++;
          rewriteNext(position + 1);
        });
      };
      rewriteNext(0);
    });
  }
}

// =============================================================================================
// Membership: MembershipMonitor (src/node/membership.ts)
// =============================================================================================

class Membership {
  private readonly world: World;
  private readonly node: NodeIncarnation;
  private readonly self: NodeId;
  record: VolumeRecord | undefined;
  private volume: VolumeShell | undefined;
  private readonly lastHeardMs = new Map<NodeId, number>();
  private liveNodes: Set<NodeId> | undefined;
  session: Session | undefined;
  private hadSession = false;
  private rejoinedLease: string | undefined;
  private rejoining = false;
  private removing = false;
  /** Catch-up record changes run one at a time (production awaits the one under way). */
  private changing = false;
  private readonly changeQueue: Array<() => void> = [];
  lastReason: string | undefined;

  constructor(world: World, node: NodeIncarnation) {
    this.world = world;
    this.node = node;
    this.self = node.id;
  }

  private get nowMs(): number {
    return this.world.scheduler.nowMs();
  }

  private log(line: string): void {
    this.world.scheduler.log(`${this.self} membership: ${line}`);
  }

  setLiveNodes(ids: Iterable<NodeId>): void {
    this.liveNodes = new Set(ids);
  }

  setSession(session: Session | undefined): void {
    this.session = session;
    if (session) this.hadSession = true;
    this.tick();
    if (this.volume) this.startRejoin();
  }

  add(record: VolumeRecord, volume: VolumeShell): void {
    this.record = record;
    this.volume = volume;
    for (const peer of record.replicas) if (peer !== this.self && !this.lastHeardMs.has(peer)) this.lastHeardMs.set(peer, this.nowMs);
    this.evaluate();
    this.startRejoin();
  }

  recordChanged(record: VolumeRecord): void {
    if (this.record !== undefined && record.epoch > this.record.epoch) this.record = record;
  }

  tick(): void {
    if (!this.node.alive || this.volume === undefined) return;
    for (const peer of this.lastHeardMs.keys()) if (this.node.isPeerUp(peer)) this.lastHeardMs.set(peer, this.nowMs);
    this.evaluate();
    this.startRejoin();
    this.maybeRemove();
    this.maybeJoinCatchUp();
  }

  leaseValid(): boolean {
    if (this.session === undefined) return false;
    return this.world.bug === 'serveAfterLeaseLoss' ? !this.session.lost : this.session.isValid();
  }

  leaseProblem(): string | undefined {
    if (this.session === undefined || this.leaseValid()) return undefined;
    return `lease lost: the coordinator lease ${this.session.leaseId} of ${this.self} ran out`;
  }

  private evaluate(): void {
    const record = this.record!;
    let reason = fenceReason({ self: this.self, record, leaseValid: this.leaseValid(), lastHeardMs: this.lastHeardMs, nowMs: this.nowMs, failureTimeoutMs: FAILURE_TIMEOUT_MS });
    if (reason === undefined && record.inSync.includes(this.self) && this.rejoinedLease !== this.session?.leaseId) reason = 'rejoining: moving the volume to a new epoch under the new lease';
    if (this.session === undefined) reason = this.hadSession ? `lease lost: ${this.self} lost its lease and is registering again` : `no lease: ${this.self} is not registered yet`;
    this.volume!.setFence(reason);
  }

  private startRejoin(): void {
    const session = this.session;
    if (!session || !this.leaseValid() || this.rejoining || this.rejoinedLease === session.leaseId) return;
    this.rejoining = true;
    const finish = (): void => {
      this.rejoining = false;
      if (this.node.alive) this.evaluate();
    };
    const attempt = (number: number): void => {
      if (!this.node.alive || number > CAS_ATTEMPTS_MAX || this.session !== session) {
        finish();
        return;
      }
      const record = this.record!;
      // The 'catchingUpKeepsGrants' correction: a catching-up member that restarted leaves the
      // catching-up set and joins it again (maybeJoinCatchUp): the arbiter drops the grants its
      // previous incarnation held, and every writer floors its stream anew (its store may have
      // lost what they no longer hold).
      if ((record.catchingUp ?? []).includes(this.self) && this.node.mustCatchUp && !this.world.asBuilt.has('catchingUpKeepsGrants')) {
        const rest = (record.catchingUp ?? []).filter((node) => node !== this.self);
        const leave: VolumeRecord = { ...record, epoch: record.epoch + 1, updatedAtMs: this.nowMs };
        if (rest.length > 0) leave.catchingUp = rest;
        else delete leave.catchingUp;
        this.cas(record.epoch, leave, 'leave the catching-up set after a restart (to join again)', (result) => {
          if (result === 'ok') {
            this.adopt(leave);
            this.node.mustCatchUp = false;
            this.rejoinedLease = session.leaseId;
            this.log(`restarted while catching up: left the catching-up set at epoch ${leave.epoch} to join again`);
            finish();
          } else if (result === 'unknown') {
            this.reread(() => attempt(number + 1));
          } else {
            attempt(number + 1);
          }
        });
        return;
      }
      if (!record.inSync.includes(this.self)) {
        this.rejoinedLease = session.leaseId;
        this.node.mustCatchUp = false;
        this.log(`not in the in-sync set at epoch ${record.epoch}: stays fenced until it catches up`);
        finish();
        return;
      }
      // The restart rule (see 'restartRejoinsInSync'): after an unclean restart this replica
      // lacks what it held in memory only; unless it is the last in-sync member (then it holds the
      // only copy there is), it catches up before it serves.
      const leave = this.node.mustCatchUp && !this.world.asBuilt.has('restartRejoinsInSync') ? leaveToCatchUp(record, this.self, this.nowMs) : undefined;
      if (leave !== undefined) {
        this.cas(record.epoch, leave, 'leave to catch up after a restart', (result) => {
          if (result === 'ok') {
            this.adopt(leave);
            this.node.mustCatchUp = false;
            this.rejoinedLease = session.leaseId;
            this.log(`restarted: left the in-sync set at epoch ${leave.epoch} to catch up`);
            finish();
          } else if (result === 'unknown') {
            this.reread(() => attempt(number + 1));
          } else {
            attempt(number + 1);
          }
        });
        return;
      }
      const next: VolumeRecord = { ...record, epoch: record.epoch + 1, updatedAtMs: this.nowMs };
      this.cas(record.epoch, next, 'rejoin', (result) => {
        if (result === 'ok') {
          this.adopt(next);
          this.rejoinedLease = session.leaseId;
          this.node.mustCatchUp = false;
          this.log(`rejoined at epoch ${next.epoch} under lease ${session.leaseId}`);
          finish();
        } else if (result === 'unknown') {
          this.reread(() => attempt(number + 1));
        } else {
          attempt(number + 1);
        }
      });
    };
    attempt(1);
  }

  private maybeJoinCatchUp(): void {
    const record = this.record!;
    if (this.changing || this.rejoining || !this.leaseValid() || this.rejoinedLease !== this.session?.leaseId) return;
    if (!record.replicas.includes(this.self) || record.inSync.includes(this.self) || (record.catchingUp ?? []).includes(this.self)) return;
    if (fenceReason({ self: this.self, record, leaseValid: true, lastHeardMs: this.lastHeardMs, nowMs: this.nowMs, failureTimeoutMs: FAILURE_TIMEOUT_MS }) !== undefined) return;
    this.changeRecord('join', (current) => joinCatchUp(current, this.self, this.nowMs), () => undefined);
  }

  /** ReplicatedVolume's leave(): true once the record lists this node as catching up. */
  leaveToCatchUp(done: (left: boolean) => void): void {
    // Not followed yet (the volume is still opening): production's monitor answers false.
    if (this.record === undefined) {
      this.world.scheduler.after(0, () => done(false), `leave refused ${this.self}`);
      return;
    }
    this.changeRecord('leave', (record) => leaveToCatchUp(record, this.self, this.nowMs), () => done((this.record!.catchingUp ?? []).includes(this.self)));
  }

  caughtUp(stillValid: (record: VolumeRecord) => boolean): void {
    if (this.record === undefined) return;
    this.changeRecord('promote', (record) => (stillValid(record) ? promoteCaughtUp(record, this.self, this.nowMs) : undefined), () => undefined);
  }

  private changeRecord(what: 'join' | 'promote' | 'leave', next: (record: VolumeRecord) => VolumeRecord | undefined, done: () => void): void {
    if (this.changing) {
      this.changeQueue.push(() => this.changeRecord(what, next, done));
      return;
    }
    this.changing = true;
    const finish = (): void => {
      this.changing = false;
      if (this.node.alive) done();
      const queued = this.changeQueue.shift();
      if (queued && this.node.alive) queued();
    };
    const attempt = (number: number): void => {
      if (!this.node.alive || number > CAS_ATTEMPTS_MAX) {
        finish();
        return;
      }
      const record = this.record!;
      const proposed = next(record);
      if (!proposed) {
        finish();
        return;
      }
      this.cas(record.epoch, proposed, what, (result) => {
        if (result === 'ok') {
          this.log(`${what}: epoch ${proposed.epoch}`);
          this.adopt(proposed);
          finish();
        } else if (result === 'unknown') {
          this.reread(() => attempt(number + 1));
        } else {
          attempt(number + 1);
        }
      });
    };
    attempt(1);
  }

  private maybeRemove(): void {
    if (this.removing || this.rejoining || !this.liveNodes || !this.leaseValid()) return;
    // Part of the restart rule: a restarted member that has not left to catch up yet lacks what it
    // held in memory; removing a silent member could leave it the last in-sync one (the only copy).
    if (this.node.mustCatchUp && !this.world.asBuilt.has('restartRejoinsInSync')) return;
    const liveNodes = this.world.bug === 'removeBeforeLeaseExpiry' ? new Set<NodeId>() : this.liveNodes;
    const decision = decideRemoval({ self: this.self, record: this.record!, spec: { strict: false }, liveNodes, lastHeardMs: this.lastHeardMs, nowMs: this.nowMs, failureTimeoutMs: FAILURE_TIMEOUT_MS });
    if (decision.reason !== this.lastReason) {
      this.lastReason = decision.reason;
      if (decision.kind === 'none' && decision.reason !== 'every in-sync member is reachable') this.log(`no change yet: ${decision.reason}`);
    }
    if (decision.kind === 'remove') this.removeMember(decision);
  }

  private removeMember(decision: RemovalDecision & { kind: 'remove' }): void {
    this.removing = true;
    const finish = (): void => {
      this.removing = false;
    };
    const expectedEpoch = decision.next.epoch - 1;
    const casNow = (): void => {
      const next: VolumeRecord = { ...decision.next, updatedAtMs: this.nowMs };
      this.cas(expectedEpoch, next, `remove ${decision.member}: ${decision.reason}`, (result) => {
        if (result === 'ok') {
          this.log(`removed ${decision.member} at epoch ${next.epoch}: ${decision.reason}`);
          this.adopt(next);
          finish();
        } else if (result === 'unknown') {
          this.reread(finish);
        } else {
          finish();
        }
      });
    };
    if (this.world.bug === 'removeBeforeLeaseExpiry') {
      casNow();
      return;
    }
    // The watched list may be a poll old: confirm the lease is gone right before the CAS.
    this.node.rpc({ op: 'liveNodes' }, (reply) => {
      if (reply === undefined) {
        this.reread(finish);
        return;
      }
      assert(reply.op === 'liveNodes', 'a liveNodes answer');
      if (reply.liveNodes.includes(decision.member)) {
        this.setLiveNodes(reply.liveNodes);
        finish();
        return;
      }
      casNow();
    });
  }

  private cas(expectedEpoch: number, next: VolumeRecord, why: string, done: (result: 'ok' | 'lost' | 'unknown') => void): void {
    this.node.rpc({ op: 'cas', expectedEpoch, next, requester: this.self, why }, (reply) => {
      if (reply === undefined) {
        done('unknown');
        return;
      }
      assert(reply.op === 'cas', 'a cas answer');
      if (reply.ok) {
        done('ok');
        return;
      }
      this.adoptAnswer(reply.records);
      done('lost');
    });
  }

  private reread(done: () => void): void {
    this.node.rpc({ op: 'get' }, (reply) => {
      if (reply !== undefined && reply.op === 'get') this.adoptAnswer(reply.records);
      done();
    });
  }

  /**
   * The records a CAS answer or a re-read brings, oldest first: MembershipMonitor adopts the
   * newest (so a volume may skip epochs; the watch's later deliveries of them are ignored).
   */
  adoptAnswer(records: readonly VolumeRecord[]): void {
    const newest = records[records.length - 1];
    if (newest !== undefined) this.adopt(newest);
  }

  /** A newer record: remember it and hand it to the volume. */
  adopt(record: VolumeRecord): void {
    if (this.record === undefined || record.epoch <= this.record.epoch) return;
    this.record = record;
    this.node.adoptRecord(record);
  }
}

// =============================================================================================
// Session: LeaseKeeper (src/cluster/session.ts) for one lease
// =============================================================================================

class Session {
  readonly leaseId: string;
  lost = false;
  private validUntilMs: number;
  private readonly marginMs = safetyMarginMs(LEASE_TTL_MS);
  private readonly node: NodeIncarnation;
  private readonly world: World;
  private renewing = false;
  private deadline: { cancel(): void } | undefined;

  constructor(world: World, node: NodeIncarnation, leaseId: string, sentAtMs: number) {
    this.world = world;
    this.node = node;
    this.leaseId = leaseId;
    this.validUntilMs = sentAtMs + LEASE_TTL_MS;
    this.armDeadline();
    this.scheduleRenew();
  }

  isValid(): boolean {
    if (this.holdsNow()) return true;
    this.lose('expired');
    return false;
  }

  /** isValid() without its side effect (for checkers). */
  holdsNow(): boolean {
    return !this.lost && this.world.scheduler.nowMs() < this.validUntilMs - this.marginMs;
  }

  private armDeadline(): void {
    if (this.world.bug === 'serveAfterLeaseLoss') return;
    this.deadline?.cancel();
    const atMs = Math.max(this.world.scheduler.nowMs(), this.validUntilMs - this.marginMs);
    this.deadline = this.node.after(atMs - this.world.scheduler.nowMs(), () => this.isValid(), `lease deadline ${this.node.id}`);
  }

  private scheduleRenew(): void {
    this.node.after(renewIntervalMs(LEASE_TTL_MS), () => {
      if (this.lost) return;
      this.renew();
      this.scheduleRenew();
    }, `lease renew ${this.node.id}`);
  }

  private renew(): void {
    if (this.renewing) return;
    this.renewing = true;
    const sentAtMs = this.world.scheduler.nowMs();
    this.node.rpc({ op: 'keepalive', leaseId: this.leaseId }, (reply) => {
      this.renewing = false;
      if (this.lost || reply === undefined) return;
      assert(reply.op === 'keepalive', 'a keepalive answer');
      if (!reply.renewed) {
        this.lose('rejected');
        return;
      }
      this.validUntilMs = Math.max(this.validUntilMs, sentAtMs + LEASE_TTL_MS);
      this.armDeadline();
    });
  }

  private lose(reason: string): void {
    if (this.lost) return;
    this.lost = true;
    this.deadline?.cancel();
    this.world.scheduler.log(`${this.node.id} lease ${this.leaseId} lost (${reason})`);
    // onLost fires asynchronously.
    this.node.after(0, () => this.node.leaseLost(this), `lease lost ${this.node.id}`);
  }
}

// =============================================================================================
// NodeIncarnation: one life of a node process (MirrorsanNode + NodeReplication)
// =============================================================================================

class NodeIncarnation implements NetworkHandler<FailureMessage> {
  readonly id: NodeId;
  readonly store: SimStore;
  alive = true;
  volume: VolumeShell | undefined;
  readonly membership: Membership;
  /** I4 checker state of this incarnation: per block the agreed index last applied. */
  readonly appliedIndex = new Int32Array(BLOCK_COUNT).fill(-1);
  readonly appliedTags = new Set<number>();
  /** Booted after a crash and not yet caught up (or rejoined as the last in-sync member). */
  mustCatchUp: boolean;
  /** When this incarnation last joined the catching-up set (for the FLUSH checker). */
  lastCatchUpJoinMs = -1;
  private readonly world: World;
  private readonly links = new Set<string>();
  private readonly rpcs = new Map<number, { done: (reply: CoordinatorReplyBody | undefined) => void; timer: { cancel(): void } }>();
  private nextRpc = 1;
  private readonly earlyAcks = new Map<NodeId, FailureMessage>();

  constructor(world: World, id: NodeId, store: SimStore, restarted: boolean) {
    this.world = world;
    this.id = id;
    this.store = store;
    this.mustCatchUp = restarted;
    this.membership = new Membership(world, this);
  }

  private get scheduler(): Scheduler {
    return this.world.scheduler;
  }

  /** A timer of this incarnation: it dies with it. */
  after(delayMs: number, fn: () => void, label: string): { cancel(): void } {
    return this.scheduler.after(delayMs, () => {
      if (this.alive) fn();
    }, label);
  }

  /** Boot: replay the store (a refused corrupt log: the disk is replaced), join the network, open the volume, register. */
  start(): void {
    let recovery: StoreRecovery;
    try {
      recovery = this.store.openStore((entry) => {
        this.world.checkers.checkReplayed(this, entry);
        this.world.checkers.recordApply(this, entry.offset, entry.payload, this.world.checkers.stampKind(this.id, entry.stamp) === 'write' ? 'replay' : 'copy-own', false);
      });
    } catch (error) {
      if (!(error instanceof StoreCorruptError)) throw error;
      this.scheduler.log(`${this.id} store refuses to open (${error.message}): the disk is replaced`);
      this.world.checkers.disksLied = true;
      this.store.wipe();
      recovery = this.store.openStore(() => assert(false, 'an empty store replays nothing'));
    }
    this.scheduler.log(`${this.id} replayed: own ${recovery.ownSequence}, ${[...recovery.sources].map(([source, state]) => `${source} ${state.durableSequence}/${state.checkpointSequence}`).join(', ')}, cut ${recovery.cutLogs.join(',') || '-'}`);
    this.world.network.start(this.id, this);
    this.openVolume(recovery);
    this.register();
    this.tick();
    this.poll();
  }

  crash(kind: CrashKind): void {
    this.alive = false;
    this.volume?.close();
    for (const rpc of this.rpcs.values()) rpc.timer.cancel();
    this.rpcs.clear();
    this.world.network.crash(this.id);
    this.store.crash(kind);
  }

  /** One line of state for a liveness failure. */
  describe(): string {
    const session = this.membership.session;
    return `${this.id}: lease ${session === undefined ? 'none' : `${session.leaseId}${session.lost ? ' lost' : ''}`}, links ${[...this.links].join(' ')}, ${this.volume?.describe() ?? 'no volume'}, membership ${this.membership.lastReason ?? '-'}`;
  }

  /** Whether some link with `peer` is up (NodeReplication's isPeerUp). */
  isPeerUp(peer: NodeId): boolean {
    return this.links.has(`${this.id}>${peer}`) || this.links.has(`${peer}>${this.id}`);
  }

  private openVolume(recovery: StoreRecovery): void {
    this.rpc({ op: 'get' }, (reply) => {
      if (reply === undefined || reply.op !== 'get') {
        this.after(POLL_MS, () => this.openVolume(recovery), `open retry ${this.id}`);
        return;
      }
      this.checkAdopted(reply.record);
      const volume = new VolumeShell(this.world, this, reply.record, recovery);
      this.volume = volume;
      for (const peer of reply.record.replicas) {
        if (peer === this.id) continue;
        if (this.links.has(`${this.id}>${peer}`)) volume.linkUp(peer, true);
        if (this.links.has(`${peer}>${this.id}`)) volume.linkUp(peer, false);
        const early = this.earlyAcks.get(peer);
        if (early) volume.receive(peer, early);
      }
      this.earlyAcks.clear();
      this.membership.add(reply.record, volume);
    });
  }

  /** A newer record (the watch, or a CAS this node made): the volume changes membership. */
  adoptRecord(record: VolumeRecord): void {
    this.checkAdopted(record);
    const wasCatching = (this.volume?.currentMembership.catchingUp ?? []).includes(this.id);
    this.volume?.changeMembership(record);
    if (!wasCatching && (this.volume?.currentMembership.catchingUp ?? []).includes(this.id)) this.lastCatchUpJoinMs = this.scheduler.nowMs();
  }

  /** [I2] a node only ever adopts a record the coordinator held. */
  private checkAdopted(record: VolumeRecord): void {
    const truth = this.world.coordinator.recordAt(record.epoch);
    if (truth === undefined || JSON.stringify(truth) !== JSON.stringify(record)) this.world.violation('I2', `${this.id} adopts a record of epoch ${record.epoch} the coordinator never held`);
  }

  // ---- lease ----

  private register(): void {
    const sentAtMs = this.scheduler.nowMs();
    this.rpc({ op: 'register', node: this.id }, (reply) => {
      if (reply === undefined || reply.op !== 'register' || reply.leaseId === undefined) {
        this.after(REGISTER_RETRY_MS, () => this.register(), `register retry ${this.id}`);
        return;
      }
      const session = new Session(this.world, this, reply.leaseId, sentAtMs);
      this.scheduler.log(`${this.id} registered lease ${reply.leaseId}`);
      this.membership.setSession(session);
    });
  }

  /** NodeSession.onLost: fence at once, register again. */
  leaseLost(session: Session): void {
    if (this.membership.session !== session) return;
    this.membership.setSession(undefined);
    this.register();
  }

  // ---- timers ----

  private tick(): void {
    this.after(TICK_MS, () => {
      const nowMs = this.scheduler.nowMs();
      this.volume?.tick(nowMs);
      this.membership.tick();
      this.tick();
    }, `tick ${this.id}`);
  }

  private poll(): void {
    this.after(POLL_MS, () => {
      this.rpc({ op: 'poll' }, (reply) => {
        if (reply === undefined || reply.op !== 'poll') return;
        this.membership.setLiveNodes(reply.liveNodes);
        // The record watch: every change, in epoch order (the volume ignores what it has seen).
        for (const record of reply.records) {
          if (this.volume === undefined || record.epoch <= this.volume.epoch) continue;
          this.membership.recordChanged(record);
          this.adoptRecord(record);
        }
      });
      this.poll();
    }, `poll ${this.id}`);
  }

  // ---- the coordinator ----

  /** A request to the coordinator; `done(undefined)` when no answer came in time (unknown outcome). */
  rpc(body: CoordinatorRequestBody, done: (reply: CoordinatorReplyBody | undefined) => void): void {
    assert(this.rpcs.size < RPCS_MAX, `${this.id}: ${this.rpcs.size} coordinator requests in flight`);
    const requestId = this.nextRpc++;
    const timer = this.after(RPC_TIMEOUT_MS, () => {
      if (!this.rpcs.delete(requestId)) return;
      done(undefined);
    }, `rpc timeout ${this.id}`);
    this.rpcs.set(requestId, { done, timer });
    const knownEpoch = Math.max(this.membership.record?.epoch ?? 0, this.volume?.epoch ?? 0);
    this.world.network.send(this.id, COORDINATOR, { type: 'COORD_REQUEST', requestId, knownEpoch, body });
  }

  // ---- NetworkHandler ----

  receive(source: NodeId, message: FailureMessage): void {
    if (!this.alive) return;
    if (message.type === 'COORD_REPLY') {
      const rpc = this.rpcs.get(message.requestId);
      if (rpc === undefined) return;
      this.rpcs.delete(message.requestId);
      rpc.timer.cancel();
      rpc.done(message.body);
      return;
    }
    if (this.volume === undefined) {
      if (message.type === 'ACK') this.earlyAcks.set(source, message);
      return;
    }
    this.volume.receive(source, message);
  }

  linkUp(link: Link): void {
    if (!this.alive) return;
    this.links.add(`${link.source}>${link.target}`);
    const outbound = link.source === this.id;
    const peer = outbound ? link.target : link.source;
    if (peer === COORDINATOR || this.volume === undefined) return;
    this.volume.linkUp(peer, outbound);
  }

  linkDown(link: Link): void {
    if (!this.alive) return;
    this.links.delete(`${link.source}>${link.target}`);
    const outbound = link.source === this.id;
    const peer = outbound ? link.target : link.source;
    if (peer === COORDINATOR || this.volume === undefined) return;
    this.volume.linkDown(peer, outbound);
  }
}

// =============================================================================================
// The scenario
// =============================================================================================

export function runFailureScenario(seed: number, run: SeedRun, options: FailureScenarioOptions = {}): FailureScenarioReport {
  const root = new Prng(seed);
  const setup = root.fork('setup');
  const scheduler = new Scheduler({ seed, trace: run.trace });
  const replicaCount = options.replicas ?? (setup.chance(0.25) ? 2 : 3);
  const replicas: NodeId[] = ['n1', 'n2', 'n3'].slice(0, replicaCount);
  const workloadMs = options.workloadMs ?? 1000;
  const clientsPerNode = options.clientsPerNode ?? 2;
  const lyingDisks = options.lyingDisks ?? setup.chance(0.3);
  const bug = options.bug ?? 'none';
  // Partitions are the nemesis's (with the coordinator); link failures and clogs the profile's.
  const profile = { ...randomNetworkProfile(root.fork('network-profile')), partitionMeanIntervalMs: 0 };
  const network = new SimNetwork<FailureMessage>({ scheduler, prng: root.fork('network'), nodes: [...replicas, COORDINATOR], profile, describe: describeMessage });
  const sourceLimits: Partial<SourceLimits> = {
    inFlightWritesMax: setup.int(2, 32),
    inFlightBytesMax: setup.int(8, 64) * 1024,
    queuedOperationsMax: 1024,
    retainedEntriesMax: setup.int(16, 128),
    retainedBytesMax: 1024 * 1024,
    checkpointRetainedBytes: setup.int(32, 256) * 1024,
    checkpointIntervalMs: setup.int(100, 600),
  };
  const targetLimits: Partial<TargetLimits> = { partitionEntriesMax: setup.int(1, 16), partitionBytesMax: setup.int(4, 64) * 1024 };
  const storeFaults: StoreFaults = {
    writebackProbability: 0.6,
    tornProbability: 0.5,
    lostWriteProbability: lyingDisks ? 0.002 : 0,
    rotProbability: lyingDisks ? 0.2 : 0,
  };
  scheduler.log(`seed ${seed} replicas ${replicas.join(',')} profile ${profile.name} lying disks ${lyingDisks} bug ${bug} asBuilt ${(options.asBuilt ?? []).join(',') || '-'}`);

  const report: FailureScenarioReport = {
    seed, replicas: replicaCount, networkProfile: profile.name, writesAcknowledged: 0, writesFailed: 0, readsServed: 0, readsRefused: 0, flushesCompleted: 0,
    crashes: 0, powerLosses: 0, restarts: 0, partitions: 0, removals: 0, rejoins: 0, joins: 0, promotions: 0, leaves: 0, leaseExpiries: 0,
    catchUpsCompleted: 0, lostSequenceSkips: 0, repairsCompleted: 0, chunksCopied: 0, chunksRewritten: 0, replayedEntries: 0, replayCuts: 0, tornWrites: 0, lostWrites: 0, rots: 0, refusedCorrupt: 0, excusedWrites: 0,
    staleFramesRefused: 0, fencedRefusals: 0, steps: 0, endMs: 0,
  };

  function violation(invariant: string, message: string): never {
    throw scheduler.failure(`${invariant} violated: ${message}`, new InvariantViolation(invariant, message));
  }

  const incarnations = new Map<NodeId, NodeIncarnation | undefined>();
  const crashCounts = new Map<NodeId, number>(replicas.map((node) => [node, 0]));
  const coordinator = new SimCoordinator({
    scheduler,
    replicas,
    leaseTtlMs: LEASE_TTL_MS,
    onChange: () => world.checkers.excuseLostWrites(),
    onLeaseExpired: (node, leaseId) => {
      report.leaseExpiries++;
      // [I2, I3] the node gave its lease up before the coordinator let it expire.
      const session = incarnations.get(node)?.membership.session;
      if (bug !== 'serveAfterLeaseLoss' && session !== undefined && session.leaseId === leaseId && session.holdsNow()) {
        violation('I2', `the coordinator let ${node}'s lease ${leaseId} expire while ${node} still counts it valid`);
      }
    },
  });
  const world: World = {
    scheduler,
    network,
    coordinator,
    checkers: undefined as unknown as Checkers,
    report,
    bug,
    asBuilt: new Set(options.asBuilt ?? []),
    sourceLimits,
    targetLimits,
    replicas,
    violation,
    incarnation: (node) => incarnations.get(node),
    crashCount: (node) => crashCounts.get(node)!,
  };
  const checkers = new Checkers(world);
  (world as { checkers: Checkers }).checkers = checkers;
  const stores = new Map<NodeId, SimStore>(
    replicas.map((node) => [
      node,
      new SimStore({
        node,
        scheduler,
        prng: root.fork(`store-${node}`),
        imageBytes: IMAGE_BYTES,
        sources: replicas.filter((peer) => peer !== node),
        faults: storeFaults,
        ioDelayMsMax: IO_DELAY_MS_MAX,
        ioQueueMax: IO_QUEUE_MAX,
        applyCorruptEntries: bug === 'applyCorruptEntries',
      }),
    ]),
  );

  // ---- the coordinator on the network ----
  network.start(COORDINATOR, {
    receive(source, message) {
      if (message.type !== 'COORD_REQUEST') return;
      const body = coordinator.handle(source, message.body, message.knownEpoch);
      network.send(COORDINATOR, source, { type: 'COORD_REPLY', requestId: message.requestId, body });
    },
    linkUp() {},
    linkDown() {},
  });

  const boot = (node: NodeId): void => {
    const incarnation = new NodeIncarnation(world, node, stores.get(node)!, crashCounts.get(node)! > 0);
    incarnations.set(node, incarnation);
    incarnation.start();
  };

  // ---- clients ---------------------------------------------------------------------------
  const workload = root.fork('workload');
  const data = root.fork('data');
  let clientsActive = true;
  let nextTag = 1;
  /** Operations issued and neither answered nor lost with their node. */
  let outstanding = 0;
  interface ClientOp {
    readonly node: NodeIncarnation;
    readonly client: number;
    settled: boolean;
  }
  const clientOps = new Set<ClientOp>();

  const scheduleClient = (node: NodeId, client: number, delayMs?: number): void => {
    if (!clientsActive) return;
    scheduler.after(delayMs ?? workload.int(0, 10), () => clientOperation(node, client), `client ${node}/${client}`);
  };

  const settle = (op: ClientOp): boolean => {
    if (op.settled) return false;
    op.settled = true;
    clientOps.delete(op);
    outstanding--;
    return true;
  };

  const clientOperation = (nodeId: NodeId, client: number): void => {
    if (!clientsActive) return;
    const node = incarnations.get(nodeId);
    if (node === undefined || node.volume === undefined) {
      scheduleClient(nodeId, client, 20);
      return;
    }
    const volume = node.volume;
    const op: ClientOp = { node, client, settled: false };
    const draw = workload.int(0, 99);
    const invokeMs = scheduler.nowMs();
    const refused = (reason: string): void => {
      report.fencedRefusals++;
      scheduler.log(`${nodeId} client ${client} refused: ${reason}`);
      scheduleClient(nodeId, client, workload.int(5, 30));
    };
    if (draw < 30) {
      const firstBlock = workload.int(0, BLOCK_COUNT - 1);
      const blocks = workload.int(1, Math.min(READ_BLOCKS_MAX, BLOCK_COUNT - firstBlock));
      const bytes = volume.read(firstBlock * BLOCK_BYTES, blocks * BLOCK_BYTES);
      if (typeof bytes === 'string') {
        report.readsRefused++;
        refused(bytes);
        return;
      }
      const values = checkers.readServed(node, firstBlock, bytes, invokeMs);
      if (scheduler.trace.enabled) scheduler.log(`${nodeId} client ${client} read blocks ${firstBlock}..${firstBlock + blocks - 1}: ${values.join(',')}`);
      report.readsServed++;
      scheduleClient(nodeId, client);
      return;
    }
    const crashesAtInvoke = new Map(crashCounts);
    if (draw < 35) {
      outstanding++;
      clientOps.add(op);
      // FLUSH covers what this node's source admitted before it: every write it acknowledged,
      // since it last joined the catching-up set (an open point: the join floor counts the
      // writes it acknowledged before it left as synced by every member; see the report).
      const completedBefore = [...checkers.writes.values()].filter((write) => write.acknowledgedBy === node && !write.durable && write.ackMs! >= node.lastCatchUpJoinMs);
      const refusal = volume.flush((error) => {
        if (!node.alive || !settle(op)) return;
        if (error === undefined) {
          checkers.flushCompleted(node, completedBefore, crashesAtInvoke, 'client FLUSH');
          for (const write of completedBefore) write.durable = true;
          report.flushesCompleted++;
        }
        scheduleClient(nodeId, client);
      });
      if (refusal !== undefined) {
        settle(op);
        refused(refusal);
      }
      return;
    }
    const span = workload.int(1, 2);
    const firstRegion = workload.int(0, REGION_COUNT - span);
    const firstBlock = firstRegion * BLOCKS_PER_REGION + workload.int(0, BLOCKS_PER_REGION - 1);
    const lastRegionStart = (firstRegion + span - 1) * BLOCKS_PER_REGION;
    const lastBlock = lastRegionStart + workload.int(span === 1 ? firstBlock - lastRegionStart : 0, BLOCKS_PER_REGION - 1);
    const blocks = lastBlock - firstBlock + 1;
    const tag = nextTag++;
    const payload = taggedPayload(tag, firstBlock, blocks, data.uint32());
    const fua = workload.chance(0.1);
    const write: WriteInfo = { tag, node: nodeId, firstBlock, blocks, payload, fua, invokeMs, crashesAtInvoke, ackMs: undefined, acknowledgedBy: undefined, sequence: 0, failed: false, durable: false, excusedBlocks: new Set() };
    checkers.writes.set(tag, write);
    for (let block = firstBlock; block <= lastBlock; block++) checkers.blockWrites[block]!.push(write);
    outstanding++;
    clientOps.add(op);
    if (scheduler.trace.enabled) scheduler.log(`${nodeId} client ${client} write ${tag} blocks ${firstBlock}..${lastBlock}${fua ? ' fua' : ''}`);
    const refusal = volume.write(firstBlock * BLOCK_BYTES, payload, fua, (error, sequence) => {
      if (!node.alive || !settle(op)) return;
      if (error !== undefined) {
        write.failed = true;
        report.writesFailed++;
        scheduler.log(`${nodeId} client ${client} write ${tag} failed: ${error.code} ${error.message}`);
        scheduleClient(nodeId, client, workload.int(5, 30));
        return;
      }
      write.ackMs = scheduler.nowMs();
      write.acknowledgedBy = node;
      write.sequence = sequence!;
      checkers.writeAcknowledged(node, write);
      if (fua) {
        checkers.flushCompleted(node, [write], crashesAtInvoke, `FUA write ${tag}`);
        write.durable = true;
      }
      report.writesAcknowledged++;
      if (scheduler.trace.enabled) scheduler.log(`${nodeId} client ${client} write ${tag} acknowledged`);
      scheduleClient(nodeId, client);
    });
    if (refusal !== undefined) {
      settle(op);
      write.failed = true;
      refused(refusal);
    }
  };

  // ---- the nemesis ------------------------------------------------------------------------
  const nemesis = root.fork('nemesis');
  let nemesisActive = true;
  const restarts = new Map<NodeId, { cancel(): void }>();
  let partitionHeal: { cancel(): void } | undefined;

  const crashNode = (node: NodeId, kind: CrashKind, restartAfterMs: number | undefined): void => {
    const incarnation = incarnations.get(node);
    if (incarnation === undefined) return;
    incarnations.set(node, undefined);
    crashCounts.set(node, crashCounts.get(node)! + 1);
    report.crashes++;
    if (kind === 'power') report.powerLosses++;
    scheduler.log(`nemesis: ${kind === 'power' ? 'power loss' : 'SIGKILL'} of ${node}`);
    incarnation.crash(kind);
    // A lying disk shows itself at a crash: rot, or (power loss) writes it never stored.
    const disk = stores.get(node)!.stats;
    if (disk.rots > 0 || (disk.lostWrites > 0 && disk.powerLosses > 0)) checkers.disksLied = true;
    // Its clients' operations are lost with it (never answered: indeterminate).
    for (const op of [...clientOps]) {
      if (op.node !== incarnation) continue;
      settle(op);
      scheduleClient(node, op.client, 20);
    }
    checkers.excuseLostWrites();
    if (restartAfterMs === undefined) return;
    restarts.set(node, scheduler.after(restartAfterMs, () => {
      restarts.delete(node);
      report.restarts++;
      scheduler.log(`nemesis: restart ${node}`);
      boot(node);
    }, `restart ${node}`));
  };

  const nemesisStep = (): void => {
    scheduler.after(nemesis.int(40, 200), () => {
      if (!nemesisActive) return;
      const draw = nemesis.int(0, 99);
      const up = replicas.filter((node) => incarnations.get(node) !== undefined);
      const down = replicas.length - up.length;
      if (draw < 35) {
        // A crash: at most one node down at a time, now and then two.
        if (up.length > 0 && (down === 0 || (down === 1 && replicas.length === 3 && nemesis.chance(0.2)))) {
          crashNode(nemesis.pick(up), nemesis.chance(0.6) ? 'power' : 'process', nemesis.int(20, 500));
        }
      } else if (draw < 65) {
        if (partitionHeal === undefined) {
          const all = [...replicas, COORDINATOR];
          const shape = nemesis.int(0, 3);
          let groups: NodeId[][];
          if (shape === 0) {
            // One node alone (cut from its peers and the coordinator).
            const node = nemesis.pick(replicas);
            groups = [[node], all.filter((other) => other !== node)];
          } else if (shape === 1) {
            // The coordinator alone: nobody renews, every lease runs out.
            groups = [[COORDINATOR], [...replicas]];
          } else if (shape === 2) {
            // One node cut from its peers but not from the coordinator.
            const node = nemesis.pick(replicas);
            groups = [[node, COORDINATOR], replicas.filter((other) => other !== node)];
          } else {
            // A random split. (A node cut from the coordinator alone, its peer links intact, is no
            // partition of groups: failed and clogged coordinator links give that one.)
            const shuffled = nemesis.shuffle([...all]);
            const cut = nemesis.int(1, shuffled.length - 1);
            groups = [shuffled.slice(0, cut), shuffled.slice(cut)];
          }
          network.partition(groups, { detectMsMin: 10, detectMsMax: 60 });
          report.partitions++;
          partitionHeal = scheduler.after(nemesis.int(50, 500), () => {
            partitionHeal = undefined;
            network.heal();
          }, 'nemesis heal');
        }
      } else if (draw < 80) {
        const [a, b] = nemesis.shuffle([...replicas, COORDINATOR]);
        network.failLink(a!, b!, { bothDirections: true });
      } else {
        network.clogNode(nemesis.pick([...replicas, COORDINATOR]), nemesis.int(10, 150));
      }
      nemesisStep();
    }, 'nemesis');
  };

  // ---- run ----------------------------------------------------------------------------------
  for (const node of replicas) boot(node);
  // Every node registered and rejoined before the clients start (mirrorsan node's ready line).
  const ready = (): boolean => replicas.every((node) => incarnations.get(node)?.volume?.fenceReason === undefined && incarnations.get(node)?.volume?.epoch === coordinator.record.epoch);
  report.steps += scheduler.runUntilSync(ready, { stepsMax: STEPS_MAX, deadlineMs: scheduler.nowMs() + 5000 }).steps;
  scheduler.log('cluster ready: clients and faults start');
  network.startFaults();
  nemesisStep();
  for (const node of replicas) for (let client = 0; client < clientsPerNode; client++) scheduleClient(node, client);
  report.steps += scheduler.runUntilSync(scheduler.nowMs() + workloadMs, { stepsMax: STEPS_MAX }).steps;

  // Faults and new operations stop; crashed nodes come back; everything must settle.
  clientsActive = false;
  nemesisActive = false;
  network.stopFaults();
  partitionHeal?.cancel();
  partitionHeal = undefined;
  network.heal();
  for (const [node, restart] of restarts) {
    restart.cancel();
    restarts.delete(node);
    report.restarts++;
    boot(node);
  }
  scheduler.log('workload over: faults stop, clients stop, every node runs');
  const quiescent = (): boolean => {
    const record = coordinator.record;
    if (outstanding > 0 || record.inSync.length !== replicas.length || (record.catchingUp ?? []).length > 0) return false;
    // Polls and lease renewals keep the coordinator's links busy: only the replicas' links must be up.
    for (const source of replicas) for (const target of replicas) if (source !== target && network.linkStatus(source, target) !== 'up') return false;
    return replicas.every((node) => incarnations.get(node)?.volume?.idle(record.epoch) === true);
  };
  try {
    report.steps += scheduler.runUntilSync(quiescent, { stepsMax: STEPS_MAX, deadlineMs: scheduler.nowMs() + SETTLE_DEADLINE_MS }).steps;
  } catch (error) {
    // Say what is stuck: the record, and each node's fence, epochs and pending work.
    const record = coordinator.record;
    const lines = [`record epoch ${record.epoch} inSync ${record.inSync.join(',')} catchingUp ${(record.catchingUp ?? []).join(',') || '-'} arbiter ${record.arbiter ?? '-'}; ${outstanding} client operations outstanding`];
    for (const node of replicas) lines.push(incarnations.get(node)?.describe() ?? `${node} down`);
    throw scheduler.failure(`${error instanceof Error ? error.message : String(error)}\n${lines.join('\n')}`, error);
  }
  scheduler.log('quiescent');
  checkers.checkQuiescent(replicas.map((node) => incarnations.get(node)!));

  const coordinatorStats = coordinator.stats;
  report.removals = coordinatorStats.removals;
  report.rejoins = coordinatorStats.rejoins;
  report.joins = coordinatorStats.joins;
  report.promotions = coordinatorStats.promotions;
  report.leaves = coordinatorStats.leaves;
  for (const store of stores.values()) {
    report.replayedEntries += store.stats.replayedEntries;
    report.replayCuts += store.stats.cuts;
    report.tornWrites += store.stats.tornWrites;
    report.lostWrites += store.stats.lostWrites;
    report.rots += store.stats.rots;
    report.refusedCorrupt += store.stats.refusedCorrupt;
    if (store.stats.lostWrites > 0 || store.stats.rots > 0) checkers.disksLied = true;
  }
  report.endMs = scheduler.nowMs();
  return report;
}
