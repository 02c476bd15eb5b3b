// The whole replicated write/read path in the seeded simulator (issue 4, item 6): three nodes,
// each running the real, unmodified Holder, Arbiter (on the epoch's arbiter node),
// ReplicationSource (sync mode) and one ReplicationTarget per peer, composed the way
// src/volume/replicated-volume.ts composes them (with two corrections, see AsBuiltFlaw), over an
// in-memory image per node. Clients on
// every node issue overlapping block writes (one to three regions, random data) and reads, while
// the network delays, reorders across links, clogs, partitions and fails links (the seed's
// profile); in about half the seeds the coordinator moves the volume to a new epoch (same
// in-sync set, a randomly chosen arbiter), which each node hears after its own delay.
//
// What the shell (SimVolumeNode) does, and where it follows ReplicatedVolume:
// - write: holder.acquire(regionsOf) -> 'admit' -> source.write -> 'appendLocal' applies the
//   entry to the local image at once, in effect order (the store registers it in its range lock
//   synchronously: a read started later sees it); the I/O queue then reports localApplied ->
//   'complete' once applied locally and ACKed by every in-sync member -> the client is answered,
//   then holder.writeAcknowledged (ReplicatedVolume's whenReplicated runs it at once in sync
//   mode). Writes span at most three regions, so WRITE_REGIONS_MAX splitting never applies.
// - RELEASE waits for a FLUSH started after it (source.flush: SYNC on every member), and every
//   policing message produced after it queues behind it: sendPolicing/startReleaseSync are
//   ReplicatedVolume's, line for line (an epoch change empties the queue).
// - destinations apply a remote entry to their image when its 'apply' effect comes (arrival
//   order) and ACK on receipt; spills, container syncs, checkpoints and local syncs go through
//   one serial I/O queue per node with small random delays (memory-only: nothing crashes here).
// - reads come from the local image.
// - policing messages travel in their wire form (toWireGrantMessage / fromWireGrantMessage), on
//   the same links as the streams; messages between a node's own holder and arbiter are a later
//   event (ReplicatedVolume uses a microtask), and so is a release sync's completion (a promise
//   continuation there).
// - changeMembership: source.setMembership, target.setEpoch, the held policing queue emptied,
//   arbiter.reset(epoch, members) or a new Arbiter or none, holder.changeEpoch; as in
//   ReplicatedVolume.
// One deliberate difference: SimNetwork has one FIFO link per ordered pair, where production has
// two TCP connections per pair (one dialled by each side; a target's answers ride back on the
// connection its source dialled). Here link a->b carries everything a sends to b, so a node
// tells all its machines about every link event of a peer (both directions), as the engine
// simulation does: source.linkUp/linkDown(peer, outbound), target.linkUp, holder and arbiter
// linkUp. (In production one reset takes down both directions of a connection at once.)
//
// Checkers (a breach throws an InvariantViolation wrapped with the seed and the trace tail):
// - I4 same order, online: every replica applies the writes touching a block in one order (the
//   first replica to apply the k-th write of a block fixes it); a write is applied once per
//   replica, and an applied entry is the client's write byte for byte.
// - I1 at completion: a completed write was received by every in-sync member (target's
//   receivedSequence); a completed FLUSH or FUA write is durable on every member.
// - reads, online: each block a read returns is intact (no mix of two writes), is the value of a
//   write invoked before the read returned, and is not older than any write to the block
//   acknowledged before the read started ("never stale"); at the end, each node's reads with
//   all writes are linearizable (checkBlockLinearizable). All nodes' reads together need not
//   be: a node serves a write as soon as it has it, so a later read on a node it has not reached
//   yet may return the value it replaces (reported as crossNodeReadAnomaly, see
//   docs/replication.md).
// - at quiescence (clients stopped, faults stopped, everything delivered): every write was
//   applied on every replica (I1); each block's agreed order respects real time (a write
//   acknowledged before another began comes first); every replica's block holds the last write
//   of that order (an acknowledged write is there unless a later conflicting write replaced it);
//   the replicas are byte-identical (I4); every grant a holder keeps is the arbiter's too.
// - liveness: once faults and new operations stop, everything completes before a deadline.
// Nodes never crash here: crash ordering (why RELEASE waits for a sync) belongs to the store's
// crash tests and a later simulation with disks.
import { assert } from '../errors.js';
import { ENTRY_TYPE } from '../journal/entry.js';
import { Arbiter, type ArbiterBug, type ArbiterEffect } from '../policing/arbiter.js';
import { Holder, type HolderBug, type HolderEffect } from '../policing/holder.js';
import { describePolicingMessage, fromWireGrantMessage, policingRecipient, toWireGrantMessage, type NodeId, type PolicingMessage } from '../policing/messages.js';
import { regionsOf } from '../policing/regions.js';
import type { GrantMessage } from '../replication/codec.js';
import { ReplicationSource, type OperationResult, type SourceBug, type SourceEffect, type SourceInboundMessage, type SourceLimits, type SourceMessage } from '../replication/engine/source.js';
import { ReplicationTarget, type TargetEffect, type TargetInboundMessage, type TargetLimits, type TargetMessage } from '../replication/engine/target.js';
import { checkBlockLinearizable, checkReplicasConverged, type ReadRecord, type WriteRecord as RegisterWrite } from './checker.js';
import { scheduleEpochChanges } from './epoch-changes.js';
import { SimNetwork, randomNetworkProfile, type Link, type NetworkHandler } from './network.js';
import { Prng } from './prng.js';
import { Scheduler } from './scheduler.js';
import type { SeedRun } from './seeds.js';
import { InvariantViolation } from './trace.js';

/** Everything that crosses a link: a source's stream, a target's answers, grant frames. */
export type ClusterMessage = SourceMessage | TargetMessage | GrantMessage;

/** Deliberate mistakes of the shell, for proving the checkers see them (tests only). */
export type ClusterShellBug =
  | 'none'
  /**
   * A destination ACKs on receipt but applies each remote entry after its own random delay
   * (a store without the range lock's arrival order): breaks I4 and fresh reads.
   */
  | 'applyRemoteOutOfOrder'
  /**
   * RELEASE goes out at once, without the sync (issue 3's shell). Harmless without crashes on
   * its own; with the holder's 'releaseBeforeAcknowledged' it lets the next holder's writes
   * overtake this one's (the sync otherwise covers that holder bug too).
   */
  | 'releaseWithoutSync';

export interface ClusterScenarioOptions {
  holderBug?: HolderBug;
  arbiterBug?: ArbiterBug;
  sourceBug?: SourceBug;
  shellBug?: ClusterShellBug;
  /** Simulated time during which clients issue operations and faults happen. Default 300 ms. */
  workloadMs?: number;
  /** Clients per node, each with one operation outstanding at a time. Default 3. */
  clientsPerNode?: number;
  /** Regions of 4 KiB (8 blocks of 512 bytes each). Default 6. */
  regionCount?: number;
  /** Random link failures, partitions and clogs from the seed's profile. Default true. */
  faults?: boolean;
  /** Probability that a run has epoch changes (one or two). Default 0.5. */
  epochChangeProbability?: number;
  /**
   * Flaws of ReplicatedVolume as built that this shell corrects by default (the simulation found
   * them; see the test file's skipped regression seeds); list one to run the shell as built.
   */
  asBuilt?: readonly AsBuiltFlaw[];
}

/**
 * - 'unguardedTargetEpoch': changeMembership calls target.setEpoch even when the target already
 *   adopted a newer epoch from a peer's frame, which trips setEpoch's assertion (seed 19).
 * - 'reentrantSourceEffects': runSource performs the effects of a nested source call (the
 *   release sync's source.flush, started from a 'complete' effect through the holder's RELEASE)
 *   before the rest of the batch being performed, so a SYNC overtakes the WRITEs it covers
 *   (and syncLocal the appendLocal): the targets clamp it, the source never resends it, the
 *   sync never completes and the RELEASE waits for ever (seed 30).
 */
export type AsBuiltFlaw = 'unguardedTargetEpoch' | 'reentrantSourceEffects';

export interface ClusterScenarioReport {
  seed: number;
  networkProfile: string;
  writesCompleted: number;
  readsCompleted: number;
  /** Client FLUSHes (the release syncs are counted apart). */
  flushesCompleted: number;
  /** Blocks checked by reads. */
  blocksRead: number;
  /** Admissions on a region whose previous admission was another node's: real contention. */
  handovers: number;
  /** FLUSHes a RELEASE waited for. */
  releaseSyncs: number;
  remoteApplies: number;
  epochChanges: number;
  /** Frames of an older epoch refused by a target or a source (I2 at work). */
  staleRefused: number;
  linkFailures: number;
  steps: number;
  /** Simulated time at quiescence. */
  endMs: number;
  /**
   * Why the reads of all nodes together are not linearizable (Gibbons & Korach), if they are
   * not: allowed (rare), because a node serves a write as soon as it arrived there, so a read
   * elsewhere that starts later can still return the value it replaces.
   */
  crossNodeReadAnomaly: string | undefined;
}

const NODES: readonly NodeId[] = ['n1', 'n2', 'n3'];
const FIRST_ARBITER: NodeId = 'n1';
const VOLUME = 'vol';
const FIRST_EPOCH = 1;
const REGION_SIZE_BYTES = 4096;
/** The checkers' register: one 512-byte block (the NBD minimum block size). */
const BLOCK_BYTES = 512;
const BLOCKS_PER_REGION = REGION_SIZE_BYTES / BLOCK_BYTES;
/** Blocks one read covers at most. */
const READ_BLOCKS_MAX = 8;
const TICK_INTERVAL_MS = 10;
/** The policing simulation's pacing (production's 500 ms / 5 s, compressed like all sim time). */
const RESEND_INTERVAL_MS = 50;
const GRANT_HOLD_MAX_MS = 200;
/** Writes waiting for grants per node: more than the clients, so nothing is refused. */
const WAITING_WRITES_MAX = 64;
/** One local I/O (apply report, sync, spill, checkpoint) takes 0..this many ms, one at a time. */
const IO_DELAY_MS_MAX = 2;
/** Local I/O tasks queued on one node; more is a runaway (every source and target is bounded). */
const IO_QUEUE_MAX = 10_000;
/** The 'applyRemoteOutOfOrder' bug's delay per remote apply. */
const BUG_APPLY_DELAY_MS_MAX = 30;
/** Liveness: once faults and new operations stop, everything must complete within this. */
const SETTLE_DEADLINE_MS = 10_000;
const STEPS_MAX = 600_000;

/**
 * `lengthBytes` (a multiple of 4) of xorshift32 output from `seed` (never 0): random data at a
 * fraction of Prng.fill's cost, which dominated the run time.
 */
export function randomPayload(seed: number, lengthBytes: number): Buffer {
  const payload = Buffer.alloc(lengthBytes);
  const words = new Uint32Array(payload.buffer, payload.byteOffset, lengthBytes / 4);
  let state = seed >>> 0 || 0x9e3779b9;
  for (let index = 0; index < words.length; index++) {
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    words[index] = state >>> 0;
  }
  return payload;
}

export function describeClusterMessage(message: ClusterMessage): string {
  if ('region' in message) return describePolicingMessage(fromWireGrantMessage(message));
  return `${message.type}(${message.sequence}) ${message.source}@${message.epoch}`;
}

/** One write the clients issued: the truth replicas and reads are checked against. */
interface WriteRecord {
  readonly tag: number;
  readonly node: NodeId;
  readonly firstBlock: number;
  readonly blocks: number;
  readonly payload: Buffer;
  readonly fua: boolean;
  readonly invokeMs: number;
  /** When the client was answered; undefined until then. */
  ackMs: number | undefined;
}

/** Per block, the writes applied there in the order replicas agree on (and who applied each first). */
interface AgreedOrder {
  readonly tags: number[];
  readonly firstBy: NodeId[];
}

type Completion = (result: OperationResult, sequence: number | undefined) => void;

interface PendingOperation {
  /** Writes hold their regions' grants until acknowledged; flushes take none. */
  readonly holdsGrant: boolean;
  /** The holder admitted the write (it must be told when the write is done). */
  admitted: boolean;
  readonly write?: { readonly offset: number; readonly payload: Buffer; readonly fua: boolean };
  readonly done: Completion;
}

/** A policing message produced while a RELEASE ahead of it waits for its durability sync. */
interface HeldPolicingMessage {
  readonly target: NodeId;
  readonly message: PolicingMessage;
  readonly recipientRole: 'holder' | 'arbiter';
  readonly isRelease: boolean;
}

export function runClusterScenario(seed: number, run: SeedRun, options: ClusterScenarioOptions = {}): ClusterScenarioReport {
  const workloadMs = options.workloadMs ?? 300;
  const clientsPerNode = options.clientsPerNode ?? 3;
  const regionCount = options.regionCount ?? 6;
  const shellBug = options.shellBug ?? 'none';
  const asBuilt = new Set<AsBuiltFlaw>(options.asBuilt ?? []);
  assert(workloadMs >= 100 && clientsPerNode >= 1 && regionCount >= 3, 'the scenario needs time, clients and room for three-region writes');
  const blockCount = regionCount * BLOCKS_PER_REGION;
  const imageBytes = blockCount * BLOCK_BYTES;

  const root = new Prng(seed);
  const scheduler = new Scheduler({ seed, trace: run.trace });
  const profile = randomNetworkProfile(root.fork('network-profile'));
  const network = new SimNetwork<ClusterMessage>({ scheduler, prng: root.fork('network'), nodes: NODES, profile, describe: describeClusterMessage });
  const setup = root.fork('setup');
  const sourceLimits: Partial<SourceLimits> = {
    inFlightWritesMax: setup.int(2, 32),
    inFlightBytesMax: setup.int(8, 64) * 1024,
    queuedOperationsMax: 1024,
    retainedEntriesMax: setup.int(16, 128),
    retainedBytesMax: 1024 * 1024,
    checkpointRetainedBytes: setup.int(32, 256) * 1024,
    checkpointIntervalMs: setup.int(20, 200),
  };
  const targetLimits: Partial<TargetLimits> = { partitionEntriesMax: setup.int(1, 16), partitionBytesMax: setup.int(4, 64) * 1024 };
  const workload = root.fork('workload');
  const data = root.fork('data');
  const ioPrng = root.fork('io');
  const bugPrng = root.fork('bug');
  scheduler.log(
    `seed ${seed} profile ${profile.name} bugs holder=${options.holderBug ?? 'none'} arbiter=${options.arbiterBug ?? 'none'} ` +
      `source=${options.sourceBug ?? 'none'} shell=${shellBug} limits ${JSON.stringify({ ...sourceLimits, ...targetLimits })}`,
  );
  const report: ClusterScenarioReport = {
    seed,
    networkProfile: profile.name,
    writesCompleted: 0,
    readsCompleted: 0,
    flushesCompleted: 0,
    blocksRead: 0,
    handovers: 0,
    releaseSyncs: 0,
    remoteApplies: 0,
    epochChanges: 0,
    staleRefused: 0,
    linkFailures: 0,
    steps: 0,
    endMs: 0,
    crossNodeReadAnomaly: undefined,
  };

  // A declaration (not an arrow) so that TypeScript narrows after a call: it never returns.
  function violation(invariant: string, message: string): never {
    throw scheduler.failure(`${invariant} violated: ${message}`, new InvariantViolation(invariant, message));
  }

  // ---- the truth: what clients wrote, and the order replicas applied it in ------------------
  const writes = new Map<number, WriteRecord>();
  /** Per block, every write touching it, in invocation order. */
  const blockWrites: WriteRecord[][] = Array.from({ length: blockCount }, () => []);
  const agreed: AgreedOrder[] = Array.from({ length: blockCount }, () => ({ tags: [], firstBy: [] }));
  const appliedCount = new Map<NodeId, Int32Array>(NODES.map((node) => [node, new Int32Array(blockCount)]));
  const appliedTags = new Map<NodeId, Set<number>>(NODES.map((node) => [node, new Set<number>()]));
  const lastAdmission = new Map<number, NodeId>();

  /** I4 (and I5's "what was written is what is applied"): called for every entry a replica applies. */
  const recordApply = (node: NodeId, offset: number, payload: Buffer): void => {
    const tag = payload.length >= 4 ? payload.readUInt32BE(0) : 0;
    const write = writes.get(tag);
    if (write === undefined || write.firstBlock * BLOCK_BYTES !== offset || !write.payload.equals(payload)) {
      violation('I5', `${node} applies an entry at offset ${offset} (${payload.length} bytes) that no client wrote`);
    }
    const tags = appliedTags.get(node)!;
    if (tags.has(tag)) violation('I4', `${node} applies write ${tag} twice`);
    tags.add(tag);
    const counts = appliedCount.get(node)!;
    for (let block = write.firstBlock; block < write.firstBlock + write.blocks; block++) {
      const position = counts[block]!;
      const order = agreed[block]!;
      if (position === order.tags.length) {
        order.tags.push(tag);
        order.firstBy.push(node);
      } else if (order.tags[position] !== tag) {
        violation(
          'I4',
          `${node} applies write ${tag} (from ${write.node}) as write #${position + 1} of block ${block}, where ${order.firstBy[position]} applied write ${order.tags[position]} (from ${writes.get(order.tags[position]!)!.node}): conflicting writes in different orders`,
        );
      }
      counts[block] = position + 1;
    }
  };

  /** The register value of `block`, whose bytes start at `at` in `image`: 0 (never written), a write's tag, or what is wrong. */
  const blockValue = (image: Buffer, at: number, block: number): number | string => {
    const tag = image.readUInt32BE(at);
    const bytes = image.subarray(at, at + BLOCK_BYTES);
    if (tag === 0) return bytes.every((byte) => byte === 0) ? 0 : `a torn block ${block} (zero tag, non-zero bytes)`;
    const write = writes.get(tag);
    if (write === undefined || block < write.firstBlock || block >= write.firstBlock + write.blocks) return `block ${block} holds tag ${tag}, which no write of that block has`;
    const index = block - write.firstBlock;
    return bytes.equals(write.payload.subarray(index * BLOCK_BYTES, (index + 1) * BLOCK_BYTES)) ? tag : `block ${block} mixes write ${tag} with other bytes (torn)`;
  };

  /** Every block every read returned, per node, for the linearizability checks at the end. */
  const readsByNode = new Map<NodeId, ReadRecord[]>(NODES.map((node) => [node, []]));
  /** Reads: intact, not from the future, and not older than a write acknowledged before the read began. */
  const checkRead = (node: NodeId, block: number, value: number | string, invokeMs: number, responseMs: number): void => {
    if (typeof value === 'string') violation('linearizability', `read on ${node} [${invokeMs}, ${responseMs}]: ${value}`);
    readsByNode.get(node)!.push({ block, value, invokeMs, responseMs });
    const read = value === 0 ? undefined : writes.get(value)!;
    if (read !== undefined && read.invokeMs > responseMs) violation('linearizability', `read on ${node} returned write ${value} invoked after the read`);
    const readAckMs = read === undefined ? -Infinity : (read.ackMs ?? Infinity);
    for (const write of blockWrites[block]!) {
      if (write.ackMs !== undefined && write.ackMs < invokeMs && write.invokeMs > readAckMs) {
        const returned = read === undefined ? 'the initial zeros' : `write ${value} (invoked at ${read.invokeMs}, acknowledged at ${readAckMs})`;
        violation(
          'linearizability',
          `read of block ${block} on ${node} [${invokeMs}, ${responseMs}] returned ${returned}, but write ${write.tag} from ${write.node} ` +
            `(invoked at ${write.invokeMs}) was acknowledged at ${write.ackMs}, before the read began: a stale read`,
        );
      }
    }
  };

  // ---- the shell: ReplicatedVolume's composition, over an in-memory image -----------------

  class SimVolumeNode implements NetworkHandler<ClusterMessage> {
    readonly id: NodeId;
    readonly image = Buffer.alloc(imageBytes);
    readonly source: ReplicationSource;
    readonly targets = new Map<NodeId, ReplicationTarget>();
    readonly holder: Holder;
    arbiter: Arbiter | undefined;
    epoch = FIRST_EPOCH;
    arbiterNode = FIRST_ARBITER;
    private readonly peers: readonly NodeId[];
    private readonly pending = new Map<number, PendingOperation>();
    private nextOperationId = 1;
    private readonly heldPolicing: HeldPolicingMessage[] = [];
    private releaseSyncCovers = 0;
    private releaseSyncRunning = false;
    /** The serial local I/O queue (the store's work): each task after a small random delay. */
    private readonly io: Array<() => void> = [];
    private ioBusy = false;
    /** Per source: a stale frame was refused since the last reset, the one reason for a gap. */
    private readonly refusedStale = new Set<NodeId>();
    /** Source effects emitted while earlier ones are still being performed (see runSource). */
    private readonly sourceBacklog: SourceEffect[] = [];
    private performingSource = false;
    /** Remote applies the 'applyRemoteOutOfOrder' bug still holds back. */
    delayedApplies = 0;

    constructor(id: NodeId) {
      this.id = id;
      this.peers = NODES.filter((node) => node !== id);
      this.source = new ReplicationSource({ volume: VOLUME, self: id, mode: 'sync', limits: sourceLimits, bug: options.sourceBug ?? 'none' });
      for (const peer of this.peers) {
        this.targets.set(peer, new ReplicationTarget({ volume: VOLUME, self: id, source: peer, epoch: FIRST_EPOCH, limits: targetLimits }, { durableSequence: 0, checkpointSequence: 0 }));
      }
      this.holder = new Holder({
        volume: VOLUME,
        epoch: FIRST_EPOCH,
        self: id,
        arbiter: FIRST_ARBITER,
        regionCount,
        waitingWritesMax: WAITING_WRITES_MAX,
        grantHoldMaxMs: GRANT_HOLD_MAX_MS,
        resendIntervalMs: RESEND_INTERVAL_MS,
        bug: options.holderBug ?? 'none',
      });
      // Fenced from the start (members given), as ReplicatedVolume's: every holder announces DRAINED.
      this.arbiter = id === FIRST_ARBITER ? this.newArbiter(FIRST_EPOCH) : undefined;
      this.runSource(this.source.setMembership(FIRST_EPOCH, NODES));
    }

    private newArbiter(epoch: number): Arbiter {
      return new Arbiter({ volume: VOLUME, epoch, regionCount, waitersPerRegionMax: Math.max(1, NODES.length), grantHoldMaxMs: GRANT_HOLD_MAX_MS, members: NODES, bug: options.arbiterBug ?? 'none' });
    }

    /** Nothing pending, queued or held here, and every machine runs `epoch`. */
    idle(epoch: number): boolean {
      if (this.pending.size > 0 || this.heldPolicing.length > 0 || this.releaseSyncRunning || this.ioBusy || this.io.length > 0 || this.delayedApplies > 0) return false;
      if (this.holder.writesWaiting > 0 || this.holder.writesAdmitted > 0 || this.holder.changingEpoch || this.holder.epoch !== epoch) return false;
      if (this.source.pendingOperations > 0 || this.source.epoch !== epoch) return false;
      for (const [peer, target] of this.targets) {
        if (target.epoch !== epoch || target.receivedSequence !== nodeOf(peer).source.lastSequence) return false;
        if (this.source.peer(peer)!.ackedSeq !== this.source.lastSequence) return false;
      }
      return true;
    }

    // ---- client operations (ReplicatedVolume.submitPiece, flush, read) ----

    write(offset: number, payload: Buffer, fua: boolean, done: Completion): void {
      const operationId = this.nextOperationId++;
      this.pending.set(operationId, { holdsGrant: true, admitted: false, write: { offset, payload, fua }, done });
      this.runHolder(this.holder.acquire(operationId, regionsOf(offset, payload.length, REGION_SIZE_BYTES)));
    }

    flush(done: Completion): void {
      const operationId = this.nextOperationId++;
      this.pending.set(operationId, { holdsGrant: false, admitted: false, done });
      this.runSource(this.source.flush(operationId));
    }

    read(offset: number, lengthBytes: number): Buffer {
      return Buffer.from(this.image.subarray(offset, offset + lengthBytes));
    }

    private admitted(operationId: number): void {
      const operation = this.pending.get(operationId);
      assert(operation?.write !== undefined, `admitted write ${operationId} is not pending`);
      operation.admitted = true;
      const { offset, payload, fua } = operation.write;
      this.runSource(this.source.write({ operationId, entryType: ENTRY_TYPE.WRITE, offset, lengthBytes: payload.length, payload, fua }));
    }

    private finish(operationId: number, result: OperationResult, sequence: number | undefined): void {
      const operation = this.pending.get(operationId);
      if (operation === undefined) return;
      this.pending.delete(operationId);
      operation.done(result, sequence);
      if (operation.holdsGrant && operation.admitted) this.runHolder(this.holder.writeAcknowledged(operationId));
    }

    // ---- the coordinator's news (ReplicatedVolume.changeMembership) ----

    changeMembership(epoch: number, arbiter: NodeId): void {
      if (epoch <= this.epoch) return; // heard of a newer one first
      scheduler.log(`${this.id} learns epoch ${epoch} arbiter ${arbiter}`);
      this.epoch = epoch;
      this.arbiterNode = arbiter;
      this.runSource(this.source.setMembership(epoch, NODES));
      for (const [peer, target] of this.targets) {
        // A target adopts a newer epoch from a peer's frame (target.receive), so it may already
        // be past the epoch this news brings: setEpoch would assert. ReplicatedVolume calls it
        // unconditionally (seed 19 shows the crash); the guard is the fix this shell assumes.
        if (asBuilt.has('unguardedTargetEpoch') || target.epoch <= epoch) this.runTarget(peer, target.setEpoch(epoch));
      }
      // Messages held behind a RELEASE belong to the old epoch: the new arbiter starts afresh.
      this.heldPolicing.length = 0;
      this.releaseSyncCovers = 0;
      if (arbiter === this.id) {
        if (this.arbiter !== undefined) this.arbiter.reset(epoch, NODES);
        else this.arbiter = this.newArbiter(epoch);
      } else {
        this.arbiter = undefined;
      }
      this.runHolder(this.holder.changeEpoch(epoch, arbiter));
    }

    // ---- the network ----

    receive(peer: NodeId, message: ClusterMessage): void {
      switch (message.type) {
        case 'WRITE':
        case 'SYNC':
        case 'CHECKPOINT':
          this.runTarget(peer, this.targets.get(peer)!.receive(message as TargetInboundMessage));
          return;
        case 'ACK':
        case 'SYNC_ACK':
        case 'CHECKPOINT_ACK':
          this.runSource(this.source.receive(peer, message as SourceInboundMessage));
          return;
        case 'GRANT_REQUEST':
        case 'GRANT':
        case 'REVOKE':
        case 'RELEASE':
          this.receivePolicing(peer, fromWireGrantMessage(message));
          return;
      }
    }

    linkUp(link: Link): void {
      const outbound = link.source === this.id;
      const peer = outbound ? link.target : link.source;
      this.runSource(this.source.linkUp(peer, outbound));
      this.runTarget(peer, this.targets.get(peer)!.linkUp());
      this.runHolder(this.holder.linkUp(peer));
      if (this.arbiter !== undefined) this.runArbiter(this.arbiter.linkUp(peer));
    }

    linkDown(link: Link): void {
      const outbound = link.source === this.id;
      this.runSource(this.source.linkDown(outbound ? link.target : link.source, outbound));
    }

    tick(): void {
      const nowMs = scheduler.nowMs();
      this.runSource(this.source.tick(nowMs));
      this.runHolder(this.holder.tick(nowMs));
      if (this.arbiter !== undefined) this.runArbiter(this.arbiter.tick(nowMs));
      scheduler.after(TICK_INTERVAL_MS, () => this.tick(), `tick ${this.id}`);
    }

    // ---- local I/O ----

    private enqueueIo(task: () => void): void {
      assert(this.io.length < IO_QUEUE_MAX, `${this.id}: ${this.io.length} local I/O tasks queued: a runaway`);
      this.io.push(task);
      this.pumpIo();
    }

    private pumpIo(): void {
      if (this.ioBusy) return;
      const task = this.io.shift();
      if (task === undefined) return;
      this.ioBusy = true;
      scheduler.after(ioPrng.int(0, IO_DELAY_MS_MAX), () => {
        this.ioBusy = false;
        task();
        this.pumpIo();
      }, `io ${this.id}`);
    }

    private applyToImage(offset: number, payload: Buffer): void {
      recordApply(this.id, offset, payload);
      payload.copy(this.image, offset);
    }

    // ---- effects ----

    /**
     * Performs source effects in the order the source emitted them, even when performing one
     * calls the source again (a completion releases a grant, whose sync calls source.flush):
     * the nested call's effects wait behind the rest of the batch. As built, ReplicatedVolume
     * performs them at once ('reentrantSourceEffects').
     */
    private runSource(effects: readonly SourceEffect[]): void {
      if (asBuilt.has('reentrantSourceEffects')) {
        for (const effect of effects) this.performSource(effect);
        return;
      }
      for (const effect of effects) this.sourceBacklog.push(effect);
      if (this.performingSource) return;
      this.performingSource = true;
      try {
        for (let effect = this.sourceBacklog.shift(); effect !== undefined; effect = this.sourceBacklog.shift()) this.performSource(effect);
      } finally {
        this.performingSource = false;
      }
    }

    private performSource(effect: SourceEffect): void {
      switch (effect.kind) {
        case 'appendLocal': {
          const { entry } = effect;
          // Registered now, in effect order (the store's writeLocal is called synchronously).
          this.applyToImage(entry.offset, entry.payload);
          this.enqueueIo(() => this.runSource(this.source.localApplied(entry.sequence)));
          break;
        }
        case 'syncLocal':
          this.enqueueIo(() => this.runSource(this.source.localSynced(effect.throughSequence)));
          break;
        case 'send':
          network.send(this.id, effect.peer, effect.message);
          break;
        case 'complete':
          this.finish(effect.operationId, effect.result, effect.sequence);
          break;
        case 'peerNeedsCatchUp':
          violation('liveness', `${this.id}'s source stranded ${effect.peer} at ${effect.peerSequence} below its window (${effect.retainedFromSequence}); nothing crashes here`);
          break;
        case 'refused':
          // Only answers sent before their sender learned the current epoch.
          if (effect.code !== 'REPL_EPOCH_STALE') violation('protocol', `${this.id}'s source refused a message from ${effect.peer}: ${effect.reason}`);
          report.staleRefused++;
          break;
      }
    }

    private runTarget(peer: NodeId, effects: readonly TargetEffect[]): void {
      const target = this.targets.get(peer)!;
      for (const effect of effects) {
        switch (effect.kind) {
          case 'apply': {
            const { entry } = effect;
            assert(entry.entryType === ENTRY_TYPE.WRITE, 'the workload writes data only');
            report.remoteApplies++;
            if (shellBug === 'applyRemoteOutOfOrder') {
              this.delayedApplies++;
              scheduler.after(bugPrng.int(0, BUG_APPLY_DELAY_MS_MAX), () => {
                this.delayedApplies--;
                this.applyToImage(entry.offset, entry.payload);
              }, `late apply ${this.id}`);
            } else {
              // Arrival order: the store registers the entry in its range lock now; the ACK follows.
              this.applyToImage(entry.offset, entry.payload);
            }
            break;
          }
          case 'appendToContainer':
            this.enqueueIo(() => {
              if (effect.sync) this.runTarget(peer, target.containerSynced(effect.throughSequence));
            });
            break;
          case 'checkpoint':
            this.enqueueIo(() => this.runTarget(peer, target.checkpointDone(effect.sequence)));
            break;
          case 'send':
            network.send(this.id, peer, effect.message);
            break;
          case 'resyncNeeded':
            // The source positions before it sends: a gap can only follow a refused stale frame.
            if (!this.refusedStale.has(peer)) violation('protocol', `${this.id}: resync needed without a stale frame: ${effect.reason}`);
            this.refusedStale.delete(peer);
            network.failLink(peer, this.id, { bothDirections: true });
            break;
          case 'refused':
            if (effect.code !== 'REPL_EPOCH_STALE') violation('protocol', `${this.id}'s target for ${peer} refused: ${effect.reason}`);
            report.staleRefused++;
            this.refusedStale.add(peer);
            break;
        }
      }
    }

    private receivePolicing(peer: NodeId, message: PolicingMessage): void {
      const arbiter = this.arbiter;
      if (policingRecipient(message, (epoch) => arbiter !== undefined && arbiter.epoch === epoch) === 'arbiter') {
        if (arbiter !== undefined) this.runArbiter(arbiter.receive(peer, message));
        else scheduler.log(`${this.id} drops ${describePolicingMessage(message)} from ${peer}: not its arbiter`);
        return;
      }
      this.runHolder(this.holder.receive(peer, message));
    }

    /** ReplicatedVolume.sendPolicing: a RELEASE, and whatever follows it, waits for a sync started after it. */
    private sendPolicing(target: NodeId, message: PolicingMessage, recipientRole: 'holder' | 'arbiter'): void {
      const isRelease = message.type === 'RELEASE' && shellBug !== 'releaseWithoutSync';
      if (!isRelease && this.heldPolicing.length === 0) {
        this.deliverPolicing(target, message, recipientRole);
        return;
      }
      this.heldPolicing.push({ target, message, recipientRole, isRelease });
      this.startReleaseSync();
    }

    private startReleaseSync(): void {
      if (this.releaseSyncRunning || this.heldPolicing.length === 0) return;
      this.releaseSyncRunning = true;
      this.releaseSyncCovers = this.heldPolicing.length;
      report.releaseSyncs++;
      const epoch = this.epoch;
      const finished = (result: OperationResult): void => {
        this.releaseSyncRunning = false;
        if (!result.ok) scheduler.log(`${this.id} sync before a grant release failed (${result.message}); releasing anyway`);
        // An epoch change in between emptied the queue: what is there now is newer.
        const covered = epoch === this.epoch ? this.releaseSyncCovers : 0;
        this.releaseSyncCovers = 0;
        let index = 0;
        while (index < this.heldPolicing.length && (index < covered || !this.heldPolicing[index]!.isRelease)) index++;
        for (const held of this.heldPolicing.splice(0, index)) this.deliverPolicing(held.target, held.message, held.recipientRole);
        this.startReleaseSync();
      };
      this.flush((result, sequence) => {
        if (result.ok) checkFlushDurable(this, sequence!, 'release sync');
        // ReplicatedVolume continues in a promise callback: after the effects now being run.
        scheduler.after(0, () => finished(result), `release sync done ${this.id}`);
      });
    }

    private deliverPolicing(target: NodeId, message: PolicingMessage, recipientRole: 'holder' | 'arbiter'): void {
      if (target === this.id) {
        // Between this node's own holder and arbiter: a later event, in order, never re-entrant.
        scheduler.after(0, () => {
          if (recipientRole === 'arbiter') {
            if (this.arbiter !== undefined) this.runArbiter(this.arbiter.receive(this.id, message));
          } else {
            this.runHolder(this.holder.receive(this.id, message));
          }
        }, `local ${this.id}`);
        return;
      }
      network.send(this.id, target, toWireGrantMessage(message));
    }

    private runHolder(effects: readonly HolderEffect[]): void {
      this.holder.assertInvariants();
      for (const effect of effects) {
        switch (effect.kind) {
          case 'send':
            this.sendPolicing(effect.target, effect.message, 'arbiter');
            break;
          case 'admit':
            for (const region of effect.regions) {
              const last = lastAdmission.get(region);
              if (last !== undefined && last !== this.id) report.handovers++;
              lastAdmission.set(region, this.id);
            }
            if (scheduler.trace.enabled) scheduler.log(`${this.id} admit op ${effect.writeId} epoch ${effect.epoch} regions ${effect.regions.join(',')} gens ${effect.generations.join(',')}`);
            this.admitted(effect.writeId);
            break;
          case 'refuse':
            this.finish(effect.writeId, { ok: false, code: effect.code, message: effect.message }, undefined);
            break;
          case 'ignored':
            if (scheduler.trace.enabled) scheduler.log(`${this.id} holder ignored ${describePolicingMessage(effect.message)} from ${effect.source}: ${effect.reason}`);
            break;
          case 'holdOverdue':
            scheduler.log(`${this.id} holder: region ${effect.region} held ${effect.revokedForMs} ms after its revoke (${effect.writesInFlight} writes in flight)`);
            break;
          case 'epochChanged':
            scheduler.log(`${this.id} holder now in epoch ${effect.epoch}, arbiter ${effect.arbiter}`);
            break;
        }
      }
    }

    private runArbiter(effects: readonly ArbiterEffect[]): void {
      this.arbiter?.assertInvariants();
      for (const effect of effects) {
        switch (effect.kind) {
          case 'send':
            this.sendPolicing(effect.target, effect.message, 'holder');
            break;
          case 'queued':
            break;
          case 'ignored':
            if (scheduler.trace.enabled) scheduler.log(`${this.id} arbiter ignored ${describePolicingMessage(effect.message)} from ${effect.source}: ${effect.reason}`);
            break;
          case 'holdOverdue':
            scheduler.log(`${this.id} arbiter: ${effect.holder} keeps region ${effect.region} ${effect.revokedForMs} ms after its revoke`);
            break;
        }
      }
    }
  }

  const nodes = NODES.map((id) => new SimVolumeNode(id));
  const nodeOf = (id: NodeId): SimVolumeNode => nodes.find((node) => node.id === id)!;

  /** I1 at completion: every in-sync member received the write (sync mode: before the client hears). */
  const checkReceived = (writer: SimVolumeNode, write: WriteRecord, sequence: number): void => {
    for (const node of nodes) {
      if (node === writer) continue;
      const received = node.targets.get(writer.id)!.receivedSequence;
      if (received < sequence) violation('I1', `write ${write.tag} (sequence ${sequence} of ${writer.id}) completed, but ${node.id} has received only ${received}`);
    }
  };
  /** I1 for FLUSH and FUA: everything through `sequence` is durable on every member. */
  const checkFlushDurable = (writer: SimVolumeNode, sequence: number, what: string): void => {
    for (const node of nodes) {
      if (node === writer) continue;
      const durable = node.targets.get(writer.id)!.durableSequence;
      if (durable < sequence) violation('I1', `${what} of ${writer.id} through ${sequence} completed, but ${node.id} made only ${durable} durable`);
    }
  };

  // ---- clients ----------------------------------------------------------------------------
  let clientsActive = true;
  let operationsOutstanding = 0;
  let nextTag = 1;

  const scheduleClient = (node: SimVolumeNode, client: number): void => {
    if (!clientsActive) return;
    scheduler.after(workload.int(0, 10), () => {
      if (clientsActive) clientOperation(node, client);
    }, `client ${node.id}/${client}`);
  };

  const clientOperation = (node: SimVolumeNode, client: number): void => {
    const draw = workload.int(0, 99);
    operationsOutstanding++;
    const invokeMs = scheduler.nowMs();
    if (draw < 30) {
      const firstBlock = workload.int(0, blockCount - 1);
      const blocks = workload.int(1, Math.min(READ_BLOCKS_MAX, blockCount - firstBlock));
      // Served by the local store a moment later (reads wait for entries registered before them).
      scheduler.after(workload.int(0, 2), () => {
        const bytes = node.read(firstBlock * BLOCK_BYTES, blocks * BLOCK_BYTES);
        const responseMs = scheduler.nowMs();
        const values: Array<number | string> = [];
        for (let index = 0; index < blocks; index++) values.push(blockValue(bytes, index * BLOCK_BYTES, firstBlock + index));
        if (scheduler.trace.enabled) scheduler.log(`${node.id} client ${client} read blocks ${firstBlock}..${firstBlock + blocks - 1} (invoked at ${invokeMs}): ${values.join(',')}`);
        values.forEach((value, index) => checkRead(node.id, firstBlock + index, value, invokeMs, responseMs));
        report.readsCompleted++;
        report.blocksRead += blocks;
        operationsOutstanding--;
        scheduleClient(node, client);
      }, `read ${node.id}/${client}`);
      return;
    }
    if (draw < 35) {
      node.flush((result, sequence) => {
        if (!result.ok) violation('protocol', `FLUSH on ${node.id} failed: ${result.code} ${result.message}`);
        checkFlushDurable(node, sequence!, 'client FLUSH');
        report.flushesCompleted++;
        operationsOutstanding--;
        scheduleClient(node, client);
      });
      return;
    }
    // A write of one to three regions: from a random block of its first region to a random
    // block of its last.
    const span = workload.int(1, 3);
    const firstRegion = workload.int(0, regionCount - span);
    const firstBlock = firstRegion * BLOCKS_PER_REGION + workload.int(0, BLOCKS_PER_REGION - 1);
    const lastRegionStart = (firstRegion + span - 1) * BLOCKS_PER_REGION;
    const lastBlock = lastRegionStart + workload.int(span === 1 ? firstBlock - lastRegionStart : 0, BLOCKS_PER_REGION - 1);
    const blocks = lastBlock - firstBlock + 1;
    const tag = nextTag++;
    const payload = randomPayload(data.uint32(), blocks * BLOCK_BYTES);
    // Each block starts with the write's tag and the block's index: a block names its write.
    for (let index = 0; index < blocks; index++) {
      payload.writeUInt32BE(tag, index * BLOCK_BYTES);
      payload.writeUInt32BE(firstBlock + index, index * BLOCK_BYTES + 4);
    }
    const fua = workload.chance(0.1);
    const write: WriteRecord = { tag, node: node.id, firstBlock, blocks, payload, fua, invokeMs, ackMs: undefined };
    writes.set(tag, write);
    for (let block = firstBlock; block <= lastBlock; block++) blockWrites[block]!.push(write);
    if (scheduler.trace.enabled) scheduler.log(`${node.id} client ${client} write ${tag} blocks ${firstBlock}..${lastBlock}${fua ? ' fua' : ''}`);
    node.write(firstBlock * BLOCK_BYTES, payload, fua, (result, sequence) => {
      if (!result.ok) violation('protocol', `write ${tag} on ${node.id} failed: ${result.code} ${result.message}`);
      checkReceived(node, write, sequence!);
      if (fua) checkFlushDurable(node, sequence!, `FUA write ${tag}`);
      write.ackMs = scheduler.nowMs();
      if (scheduler.trace.enabled) scheduler.log(`${node.id} client ${client} write ${tag} acknowledged`);
      report.writesCompleted++;
      operationsOutstanding--;
      scheduleClient(node, client);
    });
  };

  // ---- the coordinator: epoch changes (same in-sync set, a new arbiter), heard late -------
  const coordinator = scheduleEpochChanges({
    scheduler,
    prng: root.fork('epochs'),
    probability: options.epochChangeProbability ?? 0.5,
    workloadMs,
    nodes: NODES,
    firstEpoch: FIRST_EPOCH,
    firstArbiter: FIRST_ARBITER,
    onChange: () => report.epochChanges++,
    deliver: (id, epoch, arbiter) => nodeOf(id).changeMembership(epoch, arbiter),
  });

  // ---- run ----------------------------------------------------------------------------------
  for (const node of nodes) network.start(node.id, node);
  for (const node of nodes) scheduler.after(TICK_INTERVAL_MS, () => node.tick(), `tick ${node.id}`);
  if (options.faults ?? true) network.startFaults();
  for (const node of nodes) for (let client = 0; client < clientsPerNode; client++) scheduleClient(node, client);
  report.steps += scheduler.runUntilSync(workloadMs, { stepsMax: STEPS_MAX }).steps;

  // Faults and new operations stop: everything issued must complete, and the cluster settle.
  clientsActive = false;
  network.stopFaults();
  scheduler.log('workload over: faults stop, clients stop');
  const quiescent = (): boolean => operationsOutstanding === 0 && network.settled && nodes.every((node) => node.idle(coordinator.epoch));
  report.steps += scheduler.runUntilSync(quiescent, { stepsMax: STEPS_MAX, deadlineMs: scheduler.nowMs() + SETTLE_DEADLINE_MS }).steps;
  scheduler.log('quiescent');

  // ---- checks at quiescence ----------------------------------------------------------------
  // I1: every write reached every replica.
  for (const node of nodes) {
    const applied = appliedTags.get(node.id)!;
    if (applied.size !== writes.size) {
      const missing = [...writes.keys()].filter((tag) => !applied.has(tag));
      violation('I1', `${node.id} never applied writes ${missing.slice(0, 10).join(',')} (${missing.length} of ${writes.size})`);
    }
  }
  for (let block = 0; block < blockCount; block++) {
    const order = agreed[block]!.tags;
    // The agreed order respects real time: a write acknowledged before another began is older.
    let latest: WriteRecord | undefined;
    for (const tag of order) {
      const write = writes.get(tag)!;
      assert(write.ackMs !== undefined, `write ${tag} completed`);
      if (latest !== undefined && write.ackMs < latest.invokeMs) {
        violation('I4', `block ${block}: write ${tag} (acknowledged at ${write.ackMs}) is ordered after write ${latest.tag}, which began only at ${latest.invokeMs}`);
      }
      if (latest === undefined || write.invokeMs > latest.invokeMs) latest = write;
    }
    // An acknowledged write's data is in every replica unless a later conflicting write replaced it.
    const last = order.length === 0 ? 0 : order[order.length - 1]!;
    for (const node of nodes) {
      const value = blockValue(node.image, block * BLOCK_BYTES, block);
      if (value !== last) violation('I1', `block ${block} on ${node.id} holds ${String(value)}, but the last write applied there is ${last}`);
    }
  }
  const converged = checkReplicasConverged(nodes.map((node) => ({ name: node.id, bytes: node.image })));
  if (!converged.ok) violation(converged.invariant, converged.message);
  // Whatever a holder believes it holds, the arbiter of the last epoch agrees.
  const arbiter = nodeOf(coordinator.arbiter).arbiter;
  assert(arbiter !== undefined && arbiter.epoch === coordinator.epoch, 'the last epoch\'s arbiter runs');
  for (const node of nodes) {
    for (let region = 0; region < regionCount; region++) {
      const grant = node.holder.grantOf(region);
      if (!grant.held) continue;
      const view = arbiter.region(region);
      if (view.holder !== node.id || view.generation !== grant.generation) {
        violation('grant agreement', `${node.id} holds region ${region} gen ${grant.generation}, the arbiter says ${view.holder ?? 'nobody'} gen ${view.generation}`);
      }
    }
  }
  // Each node's reads, with every write, are linearizable: one order of writes per block,
  // respecting real time, in which every read of that node returns the latest before it.
  const registerWrites: RegisterWrite[] = [];
  for (const write of writes.values()) {
    for (let block = write.firstBlock; block < write.firstBlock + write.blocks; block++) registerWrites.push({ block, value: write.tag, invokeMs: write.invokeMs, ackMs: write.ackMs });
  }
  for (const [node, reads] of readsByNode) {
    const result = checkBlockLinearizable({ writes: registerWrites, reads, initialValue: 0 });
    if (!result.ok) violation(result.invariant, `reads on ${node}: ${result.message}`);
  }
  const together = checkBlockLinearizable({ writes: registerWrites, reads: [...readsByNode.values()].flat(), initialValue: 0 });
  if (!together.ok) {
    report.crossNodeReadAnomaly = together.message;
    scheduler.log(`reads of all nodes together are not linearizable (allowed): ${together.message}`);
  }
  report.linkFailures = network.stats.linkFailures;
  report.endMs = scheduler.nowMs();
  return report;
}
