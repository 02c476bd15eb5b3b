// A replicated volume on one node (docs/replication.md, issue 3): the BlockDevice that the NBD
// server sees, over a ReplicaStore (one image, this node's WAL, one container per remote
// source), a ReplicationSource for this node's client writes, one ReplicationTarget per other
// replica, and the grant protocol over regions of `regionSizeBytes` (issue 4: writers on
// different nodes proceed in parallel on different regions; one region covering the whole
// volume is single-writer mode). This file is the I/O shell of those pure state machines: it
// performs their effects in order and feeds them link news and time. Sockets are not here: a
// ReplicaTransport (the node's peer links, or an in-memory loop in tests) carries the frames.
//
// Which connection carries what (docs/replication.md, "one TCP connection per ordered pair,
// dialled by the source side"): everything this node *sends on its own initiative* (its stream
// as a source, its policing messages as holder or arbiter) goes on the link it dialled to the
// peer; the answers of this node's target for a source's stream (ACK, SYNC_ACK,
// CHECKPOINT_ACK) go back on the connection that source dialled to us. So an ACK always
// follows, on the same TCP connection, the handshake that made the source forget the peer's
// position: the source is repositioned by exactly the ACK that answers its link-up.
//
// Life of a client write: split at WRITE_REGIONS_MAX regions -> holder.acquire(its regions) -> 'admit' -> source.write -> 'appendLocal'
// (store.writeLocal, called synchronously in effect order so the store's own sequence equals
// the source's) and 'send' WRITE to every in-sync member -> 'complete' once applied locally
// and ACKed by all -> the client is answered and holder.writeAcknowledged releases its hold.
// FLUSH and FUA: SYNC on every member plus the local WAL sync (the source's rules, I1).
//
// Grant transfer waits for durability, not just receipt (the crash-ordering fix of
// docs/replication.md): a RELEASE goes to the arbiter only after a SYNC that covers the
// released writes completed on every member. Otherwise a member that crashes may lose this
// node's unspilled entry U (acknowledged on receipt) while keeping the next holder's later
// overlapping entry L in its container; U, resent after the restart, would land after L
// there and before L everywhere else (I4). Policing messages queued behind such a RELEASE
// wait with it, so the arbiter sees them in the order the holder produced them.
//
// Epoch changes (changeMembership, issue 5): the source drops members that left (their ACKs
// no longer hold writes back), targets re-announce their positions at the new epoch, the
// holder drains and drops every grant, and the new epoch's arbiter (which may be another
// node) grants nothing until every member said DRAINED (the epoch fence).
//
// Reads come from the local store, which waits for every overlapping entry registered before
// the read (an entry acknowledged on receipt may already be acknowledged to a client). That
// is correct only while this node is in the in-sync set and every member is reachable: reads
// on a node that fell behind (issue 5: leases, in-sync state, I3) are not fenced yet.
import { MirrorsanError, assert, isMirrorsanError } from '../errors.js';
import { ENTRY_TYPE } from '../journal/entry.js';
import { Arbiter, type ArbiterEffect } from '../policing/arbiter.js';
import { Holder, type HolderEffect } from '../policing/holder.js';
import { fromWireGrantMessage, policingRecipient, toWireGrantMessage, type PolicingMessage } from '../policing/messages.js';
import { regionCount, regionsOf, validateRegionSize } from '../policing/regions.js';
import { WRITE_PAYLOAD_MAX_BYTES, type GrantMessage, type RegionRequestMessage, type WireEntryType } from '../replication/codec.js';
import { ReplicationSource, type OperationResult, type ReplicationMode, type SourceEffect, type SourceLimits } from '../replication/engine/source.js';
import { ReplicationTarget, type TargetEffect } from '../replication/engine/target.js';
import type { PeerMessage } from '../replication/peer-link.js';
import type { ImageFaults } from '../store/image.js';
import type { Logger } from '../util/log.js';
import type { BlockDevice, DeviceGeometry, Extent, ReadPiece, WriteOptions, ZeroOptions } from './device.js';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { writeFileDurable } from '../store/file-io.js';
import { CoalescedRun } from '../util/coalesced-run.js';
import { CATCH_UP_CHUNK_BYTES_MAX, CatchUpDriver, digestChunks, type CatchUpPeerAccess, type CatchUpPlanResult } from './catch-up.js';
import { DirtyRegionTracker, decodeDirtyAnswer, dirtyChunkBytes, encodeDirtyAnswer, type DirtyAnswer } from './dirty-regions.js';
import { ReplicaStore } from './replica-store.js';

/** Largest READ/WRITE payload: what one WRITE frame carries. */
export const REPLICATED_PAYLOAD_MAX_BYTES = WRITE_PAYLOAD_MAX_BYTES;
/** Client writes waiting for the grant; one more is refused (VOLUME_BUSY). */
const WAITING_WRITES_MAX = 4096;
/** A revoked grant still held after this is reported (the membership layer will act on it). */
const GRANT_HOLD_MAX_MS = 5000;
/** Unanswered grant requests are sent again this often (besides after every reconnect). */
const GRANT_RESEND_INTERVAL_MS = 500;
/** The local store checkpoints at least this often while it has new entries. */
const DEFAULT_CHECKPOINT_INTERVAL_MS = 30_000;
/** Attempts to get a store checkpoint that covers a requested sequence (one may be under way). */
const CHECKPOINT_COVER_ATTEMPTS_MAX = 4;
/**
 * Regions one admitted write may span: longer client requests (large zeroes and trims, or
 * 32 MiB writes over small regions) are split at region boundaries into pieces of at most this
 * many regions, each acquired and mirrored on its own. Bounds the arbiter round trips a single
 * piece waits for (regions are taken one after another, in ascending order).
 */
export const WRITE_REGIONS_MAX = 256;
/** Region size when none is given: the whole volume is one region (single-writer mode). */
const SINGLE_REGION = 0;
/**
 * A member whose link is up but whose positioning ACK has not come for this long gets its link
 * redialled (the ACK is sent on every link-up): a safety net for an answer lost in a race
 * between epoch changes and reconnects, which would otherwise hold writes back for ever.
 */
const STREAM_UNPOSITIONED_MAX_MS = 3000;
/** A catch-up request a peer leaves unanswered this long fails (the batch is retried). */
const REGION_REQUEST_TIMEOUT_MS = 5000;
/** Catch-up requests in flight at once (the driver has one batch out at a time). */
const REGION_REQUESTS_MAX = 64;
/** A chunk digest on the wire: catchUpDigest's 32 hex digits as 16 bytes. */
const DIGEST_WIRE_BYTES = 16;
/** Frames a volume whose disk failed no longer takes: peers' streams and the grant protocol. */
const DISKLESS_DROPPED_FRAMES: ReadonlySet<PeerMessage['type']> = new Set(['WRITE', 'SYNC', 'CHECKPOINT', 'GRANT_REQUEST', 'GRANT', 'REVOKE', 'RELEASE']);
/** The dirty-region tracker's file in the volume's directory (src/volume/dirty-regions.ts). */
const DIRTY_REGIONS_FILE = 'dirty-regions.bin';
/** A leave to catch up that could not be made (coordinator unreachable, say) is tried again this often. */
const MUST_LEAVE_RETRY_MS = 1000;
/** Policing messages of a newer epoch kept until this node adopts it (the oldest go first beyond: their senders resend). */
const FUTURE_POLICING_MAX = 1024;
/** A dirty-region question from an epoch this node has not reached yet waits this long for it. */
const DIRTY_ANSWER_EPOCH_WAIT_MS = 2000;
/** A catch-up's plan (what is left to compare) is saved at most this often while it runs. */
const PLAN_SAVE_INTERVAL_MS = 1000;

/** Write-priority granularity: the spec's region size, or one power-of-two region over the whole volume. */
function effectiveRegionSize(regionSizeBytes: number | undefined, sizeBytes: number): number {
  const regionSize = regionSizeBytes ?? SINGLE_REGION;
  if (regionSize !== SINGLE_REGION) validateRegionSize(regionSize);
  return regionSize === SINGLE_REGION || regionSize >= sizeBytes ? 2 ** Math.ceil(Math.log2(Math.max(4096, sizeBytes))) : regionSize;
}

/**
 * The volume's dirty-region tracker as persisted, or a fresh one: for a new store (nothing to
 * know), or, when the file is missing or unreadable, one that knows it lost its history
 * (said in the log: a catch-up of this replica, or of a replica that left meanwhile, then
 * compares the whole volume).
 */
async function loadDirtyTracker(options: ReplicatedVolumeOptions, chunkBytes: number): Promise<DirtyRegionTracker> {
  const file = path.join(options.dir, DIRTY_REGIONS_FILE);
  const newStore = !(await ReplicaStore.exists(options.dir));
  const fresh = (): DirtyRegionTracker => DirtyRegionTracker.fresh({ self: options.self, sizeBytes: options.sizeBytes, chunkBytes, newStore });
  if (newStore) return fresh();
  let data: Buffer;
  try {
    data = await fs.promises.readFile(file);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'ENOENT') throw error;
    options.logger.warn('no dirty-region record for this volume: catch-ups that need it will compare the whole volume', { file });
    return fresh();
  }
  try {
    return DirtyRegionTracker.decode(data, { self: options.self, sizeBytes: options.sizeBytes, chunkBytes });
  } catch (error) {
    options.logger.error('dirty-region record unreadable: catch-ups that need it will compare the whole volume', { file, error: error instanceof Error ? error.message : String(error) });
    return fresh();
  }
}

/** Padding entries a re-attach may write: at most what was in flight or queued at the failure. */
const OWN_LOG_PAD_MAX = 65_536;

/**
 * Re-attach after a disk failure (ReplicatedVolumeOptions.ownSequenceFloor): pads the own log
 * to `floor` with entries that change nothing (each rewrites the first block with what it
 * holds, or trims it if it is unallocated). The peers may hold the failed replica's entries up
 * to `floor` that never reached this log; were their numbers reused, a peer would take the new
 * entries for ones it has and drop them. What those lost entries wrote, the catch-up copies.
 */
async function padOwnLog(store: ReplicaStore, floor: number, logger: Logger): Promise<void> {
  const from = store.stats().ownSequence;
  if (floor <= from) return;
  if (floor - from > OWN_LOG_PAD_MAX) {
    throw new MirrorsanError('STORE_IO', `own log ends at ${from} but the failed replica reached ${floor}: more than ${OWN_LOG_PAD_MAX} entries to pad`);
  }
  const block = 4096;
  const allocated = store.blockStatus(0, block).some((extent) => !extent.hole);
  const bytes = allocated ? await store.read(0, block) : undefined;
  for (let sequence = from + 1; sequence <= floor; sequence++) {
    const logged = bytes ? await store.writeLocal(ENTRY_TYPE.WRITE, 0, block, bytes) : await store.writeLocal(ENTRY_TYPE.TRIM, 0, block);
    assert(logged === sequence, `padding entry logged as ${logged}, not ${sequence}`);
  }
  await store.flushLocal(floor);
  logger.warn('own log padded to the last sequence the failed replica sent: its peers may hold entries this log never got', { from, to: floor });
}

/** The coordinator's record for the volume, as this node opened it. */
export interface ReplicaMembership {
  epoch: number;
  replicas: readonly string[];
  inSync: readonly string[];
  /** The node arbitrating write priority (default: the first in-sync member). */
  arbiter?: string;
  /** Replicas catching up: mirrored to and waited for, not in sync (VolumeRecord.catchingUp). */
  catchingUp?: readonly string[];
}

/** Every node the writers mirror to: the in-sync set and the replicas catching up. */
function streamMembers(membership: ReplicaMembership): string[] {
  return [...membership.inSync, ...(membership.catchingUp ?? [])];
}

/** The arbiter of an epoch: the record's, else the first in-sync member (docs/replication.md). */
export function arbiterOf(membership: ReplicaMembership): string {
  return membership.arbiter ?? membership.inSync[0]!;
}

/** How frames leave this node (see the header for which connection carries what). */
export interface ReplicaTransport {
  /** On the link this node dialled to `peer`. False: not queued (link down or queue full). */
  sendToPeer(peer: string, message: PeerMessage): boolean;
  /** On the connection `source` dialled to this node (our target's answers to its stream). */
  answerSource(source: string, message: PeerMessage): boolean;
  /** Closes the connection `source` dialled to us: its stream has a gap; it redials and repositions. */
  resetInbound(source: string, reason: string): void;
  /** Drops and redials the link to `peer`: its answers (the ACK that positions our stream) went missing. */
  resetOutbound?(peer: string, reason: string): void;
}

export interface ReplicatedVolumeOptions {
  name: string;
  description?: string;
  sizeBytes: number;
  /** The store's directory (DATA/volumes/NAME). */
  dir: string;
  /** This node's id. */
  self: string;
  membership: ReplicaMembership;
  /**
   * Write-priority granularity (a power of two of at least 4096). Omitted or at least the volume
   * size: one region (single-writer mode).
   */
  regionSizeBytes?: number;
  transport: ReplicaTransport;
  logger: Logger;
  /**
   * `sync` (default): a write completes once every in-sync member has it. `async`: once it is
   * in the local log; members trail within the source's lag bound (FLUSH: local durability).
   * Grants move only after every member has the holder's writes, in either mode.
   */
  mode?: ReplicationMode;
  sourceLimits?: Partial<SourceLimits>;
  /** Local store checkpoint period; 0 disables the timer (close still checkpoints). */
  checkpointIntervalMs?: number;
  /**
   * What this replica does once its catch-up copied everything (a CAS into the in-sync set),
   * and the copy rate limit (bytes/s, 0 or absent: unlimited). Without it a replica outside the
   * in-sync set stays fenced. Peers are asked over the replication links (REGION_REQUEST).
   */
  catchUp?: {
    caughtUp(epoch: number): Promise<void>;
    /** Move this replica from the in-sync set to catching up (a CAS); false: not possible now. */
    leave?(reason: string): Promise<boolean>;
    rateBytesPerSec?: number;
    peerAccess?: CatchUpPeerAccess;
  };
  /** VolumeSpec.strict: refuse writes while fewer replicas than the record's are in sync. */
  strict?: boolean;
  /**
   * Checked on every client request: a reason to refuse it (the node's lease just ran out), or
   * undefined. Synchronous, so no request slips in between a lease's expiry and setFence.
   */
  servingCheck?: () => string | undefined;
  /** Test-only injected store faults (src/node/faults.ts); never set by production configuration. */
  faults?: ImageFaults;
  /**
   * Disk failure handling (diskless mode, src/volume/diskless-volume.ts), called once when the
   * store fails. Without it a store failure fails every request with NBD_EIO. With it the volume
   * detaches its disk instead: pending and later requests are refused with VOLUME_DISKLESS (none
   * of them was acknowledged; the caller retries them through an in-sync peer), peers' stream and
   * grant frames are no longer taken, and syncOwnStreamOnPeers() makes the writes this node
   * acknowledged durable on its peers before the caller moves it out of the in-sync set.
   */
  onDiskFailure?: (failure: MirrorsanError) => void;
  /**
   * Re-attach after a disk failure: the last own sequence the failed replica assigned (its
   * `lastOwnSequence`). Its frames left before its local writes, so peers may hold own entries
   * up to there that this log never got; the log is padded to it (see padOwnLog) so that the
   * source never gives those sequence numbers to other entries.
   */
  ownSequenceFloor?: number;
}

interface PendingOperation {
  /** `sequence`: the write's entry, or the last entry a flush covers. */
  resolve: (sequence: number | undefined) => void;
  reject: (error: Error) => void;
  /** Writes hold the grant until acknowledged; flushes do not take it. */
  holdsGrant: boolean;
  /** The holder admitted the write (it must be told when the write is done). */
  admitted: boolean;
  /** Set once the holder admitted the write and it went to the source. */
  write?: { entryType: WireEntryType; offset: number; lengthBytes: number; payload: Buffer; fua: boolean };
  /** A catch-up copy: once admitted (its grant held), fetch the peer's bytes, then write them. */
  copy?: { offset: number; lengthBytes: number; fetch: () => Promise<Buffer>; force: boolean; outcome?: 'same' | 'copied' };
  /** A client write: the servingTerm it was submitted in (admitted only in the same one). */
  servingTerm?: number;
}

/** A policing message produced while a RELEASE ahead of it waits for its durability sync. */
interface HeldPolicingMessage {
  target: string;
  message: PolicingMessage;
  recipientRole: 'holder' | 'arbiter';
  /** A RELEASE: may go once a sync started after it completed. */
  isRelease: boolean;
}

export class ReplicatedVolume implements BlockDevice {
  readonly name: string;
  readonly description: string;
  readonly self: string;
  private readonly sizeBytes: number;
  private membership: ReplicaMembership;
  private arbiterNode: string;
  /** Write-priority granularity; equal to the volume size (rounded up) in single-writer mode. */
  private readonly regionSizeBytes: number;
  private readonly regionCount: number;
  private readonly peers: readonly string[];
  private readonly store: ReplicaStore;
  private readonly source: ReplicationSource;
  private readonly targets = new Map<string, ReplicationTarget>();
  private readonly holder: Holder;
  private arbiter: Arbiter | undefined;
  private readonly transport: ReplicaTransport;
  private readonly logger: Logger;
  private readonly pending = new Map<number, PendingOperation>();
  private readonly checkpointIntervalMs: number;
  private nextOperationId = 1;
  private lastCheckpointMs = 0;
  private checkpointedStamp = 0;
  private failure: MirrorsanError | undefined;
  /** The store error that detached the disk (diskless mode: options.onDiskFailure). */
  private diskFailure: MirrorsanError | undefined;
  private readonly onDiskFailure: ((failure: MirrorsanError) => void) | undefined;
  private readonly catchUpAccess: ReplicatedVolumeOptions['catchUp'];
  /** What each replica out of the stream may lack, and this node's own unacknowledged writes. */
  private readonly dirty: DirtyRegionTracker;
  private readonly dirtyFile: string;
  private readonly dirtySave: CoalescedRun;
  private lastPlanSaveMs = 0;
  /** Some own write was acknowledged since open: a stranded peer is then not our restart's doing. */
  private ownWriteCompletedSinceOpen = false;
  private leavingToCatchUp = false;
  private catchUpDriver: CatchUpDriver | undefined;
  /** Frames of a source held back while its stream is rebased (catch-up), in arrival order. */
  private readonly pausedInbound = new Map<string, PeerMessage[]>();
  /** This replica's unanswered REGION_REQUESTs (catch-up), by request id. */
  private readonly regionRequests = new Map<number, { peer: string; resolve: (data: Buffer) => void; reject: (error: Error) => void; timer: NodeJS.Timeout }>();
  private nextRegionRequestId = 1;
  /** runSource is performing a batch; source effects produced meanwhile wait here, in order. */
  private performingSourceEffects = false;
  /** Per source member: since when (tick time) its link is up but its stream unpositioned. */
  private readonly unpositionedSinceMs = new Map<string, number>();
  private readonly nestedSourceEffects: (readonly SourceEffect[])[] = [];
  /** Set while this node may not serve I/O (out of the in-sync set, or its lease is lost). */
  private fence: string | undefined;
  /** The node's fence (lease lost, no majority: setFence), kept across epoch changes. */
  private nodeFence: string | undefined;
  /**
   * Bumped whenever this node stops serving the volume (fenced, out of the in-sync set, leaving
   * to catch up). A client write still waiting for its grant when the term moved on is refused
   * at admission, never executed: while this node did not serve, the others may have removed it
   * and moved on, and a client (mirrorsan attach) may have replayed the write on another node
   * and written newer data over it there (docs/replication.md, "Client failover and fencing").
   */
  private servingTerm = 0;
  private readonly strict: boolean;
  private readonly servingCheck: (() => string | undefined) | undefined;
  private closed = false;
  /** Policing messages waiting behind a RELEASE for its durability sync (see the header). */
  private readonly heldPolicing: HeldPolicingMessage[] = [];
  /** Policing messages of an epoch newer than this node's, until it adopts that epoch. */
  private futurePolicing: { peer: string; message: PolicingMessage }[] = [];
  /** The highest own sequence a peer reported beyond this node's log (see skipLostSequences). */
  private lostSequencesTo = 0;
  /** Set after an unclean restart in the in-sync set: why this node must leave to catch up before serving. */
  private mustLeaveReason: string | undefined;
  private mustLeaveTriedMs = 0;
  private skippingLostSequences = false;
  /** Settles once the log is padded and the source skipped (a catch-up plans only after: its copies take new numbers). */
  private lostSequencesSkipped: Promise<void> = Promise.resolve();
  /** RELEASEs in heldPolicing[0..releaseSyncCovers) go once the running sync completes. */
  private releaseSyncCovers = 0;
  private releaseSyncRunning = false;
  /**
   * Work that waits until every in-sync member acknowledged (ackedSeq) or made durable
   * (syncAckedSeq) this source's entries through `sequence`: a write's hold on its regions, a
   * held RELEASE. In sync mode completion already implies it; in async mode it comes later.
   * Ascending by sequence per field (completions come nearly in order: inserts are cheap).
   */
  private readonly replicationWaiters: Record<'ackedSeq' | 'syncAckedSeq', { sequence: number; run: () => void }[]> = { ackedSeq: [], syncAckedSeq: [] };
  private readonly mode: ReplicationMode;
  private counters = { writes: 0, flushes: 0, reads: 0, grantsReceived: 0, remoteEntriesApplied: 0, releaseSyncs: 0, epochChanges: 0, repairedChunks: 0 };

  private constructor(options: ReplicatedVolumeOptions, store: ReplicaStore, targets: Map<string, ReplicationTarget>, dirty: DirtyRegionTracker) {
    const { membership } = options;
    this.name = options.name;
    this.description = options.description ?? `mirrorsan replicated volume ${options.name}`;
    this.self = options.self;
    this.sizeBytes = options.sizeBytes;
    this.membership = { ...membership, replicas: [...membership.replicas], inSync: [...membership.inSync] };
    this.arbiterNode = arbiterOf(membership);
    // Single-writer mode: one region as large as the volume, rounded up to a power of two.
    this.regionSizeBytes = effectiveRegionSize(options.regionSizeBytes, options.sizeBytes);
    this.dirty = dirty;
    this.dirtyFile = path.join(options.dir, DIRTY_REGIONS_FILE);
    this.dirtySave = new CoalescedRun(() => this.saveDirty());
    this.regionCount = regionCount(options.sizeBytes, this.regionSizeBytes);
    this.peers = membership.replicas.filter((node) => node !== options.self);
    this.store = store;
    this.targets = targets;
    this.transport = options.transport;
    this.logger = options.logger;
    this.checkpointIntervalMs = options.checkpointIntervalMs ?? DEFAULT_CHECKPOINT_INTERVAL_MS;
    this.mode = options.mode ?? 'sync';
    this.strict = options.strict === true;
    this.catchUpAccess = options.catchUp;
    this.servingCheck = options.servingCheck;
    this.onDiskFailure = options.onDiskFailure;
    this.checkpointedStamp = store.recovery.lastStamp;
    this.source = new ReplicationSource({
      volume: options.name,
      self: options.self,
      mode: options.mode ?? 'sync',
      // The log's last own entry (after a re-attach's padding: see padOwnLog).
      lastSequence: store.stats().ownSequence,
      ...(options.sourceLimits ? { limits: options.sourceLimits } : {}),
    });
    this.holder = new Holder({
      volume: options.name,
      epoch: membership.epoch,
      self: options.self,
      arbiter: this.arbiterNode,
      regionCount: this.regionCount,
      waitingWritesMax: WAITING_WRITES_MAX,
      grantHoldMaxMs: GRANT_HOLD_MAX_MS,
      resendIntervalMs: GRANT_RESEND_INTERVAL_MS,
    });
    // The epoch fence (members given): the arbiter grants nothing until every in-sync member
    // said DRAINED for this epoch, so a holder that still caches a grant from before this
    // node's restart cannot overlap a new grant (every holder announces DRAINED at its start
    // and after each epoch change).
    this.arbiter = this.arbiterNode === options.self ? this.newArbiter(membership) : undefined;
    if (!membership.inSync.includes(options.self)) this.fence = `${options.self} is not in the in-sync set of epoch ${membership.epoch}`;
    this.dirty.adopt(membership.epoch, membership.inSync, membership.catchingUp ?? [], membership.replicas, [], this.source.lastSequence);
    this.runSource(this.source.setMembership(membership.epoch, membership.inSync, membership.catchingUp ?? []));
    this.persistDirtySoon();
    if (!store.recovery.cleanShutdown && membership.inSync.includes(options.self) && membership.inSync.length >= 2 && options.catchUp?.leave) {
      // After a crash, entries this node acknowledged on receipt (in memory) may be gone until
      // their sources resend them: it serves nothing until it has left the in-sync set and
      // caught up (the catch-up's barrier waits for every older write to reach it), unless it
      // is the last in-sync member (found by the failure simulation, restartRejoinsInSync).
      this.mustLeaveReason = 'it restarted after a crash: entries it had acknowledged on receipt may be missing until it catches up';
    }
    this.adoptCatchUpState(undefined);
  }

  private newArbiter(membership: ReplicaMembership): Arbiter {
    return new Arbiter({
      volume: this.name,
      epoch: membership.epoch,
      regionCount: this.regionCount,
      waitersPerRegionMax: Math.max(1, membership.replicas.length),
      grantHoldMaxMs: GRANT_HOLD_MAX_MS,
      members: streamMembers(membership),
    });
  }

  /** Opens (creating if new) the store in `dir` and replays it; the volume then takes frames and writes. */
  static async open(options: ReplicatedVolumeOptions): Promise<ReplicatedVolume> {
    const { membership } = options;
    assert(Number.isSafeInteger(membership.epoch) && membership.epoch >= 1, `volume ${options.name}: epoch must be >= 1`);
    assert(membership.replicas.includes(options.self), `volume ${options.name}: ${options.self} is not one of its replicas`);
    assert(membership.inSync.length > 0 && membership.inSync.every((node) => membership.replicas.includes(node)), `volume ${options.name}: inSync must be a non-empty subset of replicas`);
    assert(options.sizeBytes % 4096 === 0, `volume ${options.name}: size must be a multiple of 4096`);
    const compareChunkBytes = Math.min(effectiveRegionSize(options.regionSizeBytes, options.sizeBytes), CATCH_UP_CHUNK_BYTES_MAX);
    await fs.promises.mkdir(options.dir, { recursive: true });
    const dirty = await loadDirtyTracker(options, dirtyChunkBytes(options.sizeBytes, compareChunkBytes));
    // Bound once the volume exists: a checkpoint persists the tracker before its logs go.
    let beforeLogTruncation = (): Promise<void> => Promise.resolve();
    const store = await ReplicaStore.open({
      dir: options.dir,
      sizeBytes: options.sizeBytes,
      logger: options.logger.child('store'),
      onReplayedEntry: (own, offset, lengthBytes, sequence) => dirty.noteReplayed(offset, lengthBytes, own, sequence),
      beforeLogTruncation: () => beforeLogTruncation(),
      ...(options.faults ? { faults: options.faults } : {}),
    });
    try {
      if (options.ownSequenceFloor !== undefined) {
        await padOwnLog(store, options.ownSequenceFloor, options.logger);
        // Entries the failed disk never got may have reached the peers, and its image may hold
        // torn writes: what it lacks is not in anyone's marks.
        dirty.forgetSelf();
      }
      const targets = new Map<string, ReplicationTarget>();
      for (const peer of membership.replicas) {
        if (peer === options.self) continue;
        const recovered = await store.addSource(peer);
        targets.set(peer, new ReplicationTarget({ volume: options.name, self: options.self, source: peer, epoch: membership.epoch }, recovered));
      }
      const volume = new ReplicatedVolume(options, store, targets, dirty);
      beforeLogTruncation = () => volume.dirtySave.run();
      return volume;
    } catch (error) {
      await store.close({ checkpoint: false }).catch(() => undefined);
      throw error;
    }
  }

  get epoch(): number {
    return this.membership.epoch;
  }

  /** The record this volume runs under (the newest it adopted). */
  get currentMembership(): ReplicaMembership {
    return { ...this.membership, replicas: [...this.membership.replicas], inSync: [...this.membership.inSync] };
  }

  /**
   * Adopts a newer record from the coordinator (an epoch change; older or equal epochs are
   * ignored). Members that left stop holding writes back; members that stay re-announce their
   * positions; every grant is dropped once this node's admitted writes are acknowledged, and
   * the new arbiter starts fenced. Replicas may not change here (adding a replica opens its
   * source container: not supported on a running volume yet).
   */
  changeMembership(next: ReplicaMembership): void {
    if (this.closed || next.epoch <= this.membership.epoch) return;
    assert(next.inSync.length > 0 && next.inSync.every((node) => next.replicas.includes(node)), `volume ${this.name}: inSync must be a non-empty subset of replicas`);
    const sameReplicas = next.replicas.length === this.membership.replicas.length && next.replicas.every((node) => this.membership.replicas.includes(node));
    if (!sameReplicas) {
      this.logger.error('replica set changed on a running volume; restart the node to adopt it', { epoch: next.epoch, replicas: next.replicas.join(',') });
    }
    const previous = this.membership;
    this.membership = { ...next, replicas: [...previous.replicas], inSync: next.inSync.filter((node) => previous.replicas.includes(node)) };
    this.arbiterNode = arbiterOf(this.membership);
    this.counters.epochChanges++;
    this.logger.info('epoch changed', { epoch: next.epoch, inSync: this.membership.inSync.join(','), arbiter: this.arbiterNode, previousEpoch: previous.epoch });
    this.fence = this.membership.inSync.includes(this.self) ? this.nodeFence : `${this.self} is not in the in-sync set of epoch ${next.epoch}`;
    if (this.fence !== undefined) this.servingTerm++;
    // Before the source drops members that left: its resend window is what they may lack of ours.
    this.dirty.adopt(next.epoch, this.membership.inSync, this.membership.catchingUp ?? [], this.membership.replicas, this.source.retainedExtents(), this.source.lastSequence);
    this.persistDirtySoon();
    this.runSource(this.source.setMembership(next.epoch, this.membership.inSync, this.membership.catchingUp ?? []));
    if (!this.membership.inSync.includes(this.self)) {
      this.leavingToCatchUp = false; // out: the in-sync fence holds
      this.mustLeaveReason = undefined;
    }
    this.adoptCatchUpState(previous);
    this.runReplicationWaiters();
    // A target may be past this epoch already: a peer that heard of a newer one first sent it
    // a frame of that epoch, which it adopted (found by the whole-path simulation, seed 19).
    for (const [peer, target] of this.targets) if (target.epoch < next.epoch) this.runTarget(peer, target.setEpoch(next.epoch));
    // Messages held behind a RELEASE belong to the old epoch: the new arbiter starts afresh.
    this.heldPolicing.length = 0;
    this.releaseSyncCovers = 0;
    // Members that left the stream may have left writes on some members and not others.
    const departed = streamMembers(previous).filter((node) => node !== this.self && !streamMembers(this.membership).includes(node));
    let suspect: number[] | 'all' | undefined;
    if (this.arbiterNode === this.self) {
      if (departed.length > 0) suspect = this.arbiter ? [...new Set(departed.flatMap((node) => this.arbiter!.holdingsOf(node)))].sort((a, b) => a - b) : 'all';
      if (this.arbiter) this.arbiter.reset(next.epoch, streamMembers(this.membership));
      else this.arbiter = this.newArbiter(this.membership);
    } else {
      this.arbiter = undefined;
    }
    this.runHolder(this.holder.changeEpoch(next.epoch, this.arbiterNode));
    if (suspect !== undefined && (suspect === 'all' || suspect.length > 0) && this.membership.inSync.includes(this.self)) {
      void this.repairAfterLoss(departed, suspect, next.epoch);
    }
    const arrived = this.futurePolicing.filter((held) => held.message.epoch <= next.epoch);
    this.futurePolicing = this.futurePolicing.filter((held) => held.message.epoch > next.epoch);
    for (const held of arrived) this.receivePolicing(held.peer, held.message);
  }

  /**
   * Stops (reason given) or resumes (undefined) serving I/O here: a node whose lease is lost or
   * that cannot reach its peers may hold stale data (I2, I3). Operations already pending go on.
   */
  setFence(reason: string | undefined): void {
    if (reason === this.nodeFence) return;
    this.nodeFence = reason;
    // Out of the in-sync set the volume stays fenced whatever the node says (catch-up first).
    const next = this.membership.inSync.includes(this.self) ? reason : this.fence;
    if (next === this.fence) return;
    this.fence = next;
    if (next) this.servingTerm++;
    if (next) this.logger.warn('volume fenced: refusing I/O on this node', { reason: next });
    else this.logger.info('volume unfenced: serving I/O again');
  }

  /** Why this node refuses I/O on the volume now (undefined: it serves). */
  get fenceReason(): string | undefined {
    return this.fence;
  }

  /** Whether `peer` is one of this volume's other replicas (frames from others are dropped). */
  hasPeer(peer: string): boolean {
    return this.peers.includes(peer);
  }

  // ---- BlockDevice ------------------------------------------------------------------------

  geometry(): DeviceGeometry {
    return {
      sizeBytes: this.sizeBytes,
      blockSizeMin: 512,
      blockSizePreferred: 4096,
      payloadMaxBytes: REPLICATED_PAYLOAD_MAX_BYTES,
      readOnly: false,
      // A FLUSH completes only once every in-sync member made everything before it durable,
      // and every acknowledged write is registered for reads on every member before its ACK.
      multiConn: true,
    };
  }

  async read(offset: number, length: number): Promise<ReadPiece[]> {
    this.checkUsable();
    this.counters.reads++;
    try {
      return [{ offset, kind: 'data', data: await this.store.read(offset, length) }];
    } catch (error) {
      // A read error is a disk failure too: in diskless mode the read goes to a peer instead.
      if (this.onDiskFailure && !this.closed) {
        this.fail(error, `read at ${offset}`);
        throw this.failure ?? this.asIoError(error);
      }
      throw this.asIoError(error);
    }
  }

  write(offset: number, data: Buffer, options: WriteOptions): Promise<void> {
    // The source keeps the payload for resending after the client is answered. The NBD
    // server's buffer is never reused, but it may be a view of a socket chunk, which it would
    // pin (64 KiB for a 4 KiB write): copy only then. A payload assembled across chunks owns
    // its memory exactly, and copying 1 MiB costs more than everything else the source does.
    const owned = data.byteOffset === 0 && data.byteLength === data.buffer.byteLength ? data : Buffer.from(data);
    return this.submitWrite(ENTRY_TYPE.WRITE, offset, data.length, owned, options.fua);
  }

  writeZeroes(offset: number, length: number, options: ZeroOptions): Promise<void> {
    // Whether zeroing is cheap depends on every replica's allocation; do not promise it.
    if (options.fastZero) return Promise.reject(new MirrorsanError('NBD_ENOTSUP', 'fast zero is not offered on a replicated volume'));
    return this.submitWrite(options.mayTrim ? ENTRY_TYPE.TRIM : ENTRY_TYPE.ZERO, offset, length, Buffer.alloc(0), options.fua);
  }

  trim(offset: number, length: number, options: WriteOptions): Promise<void> {
    return this.submitWrite(ENTRY_TYPE.TRIM, offset, length, Buffer.alloc(0), options.fua);
  }

  flush(): Promise<void> {
    this.checkUsable();
    this.counters.flushes++;
    const operationId = this.nextOperationId++;
    const done = this.track(operationId, false);
    this.runSource(this.source.flush(operationId));
    return done;
  }

  async cache(): Promise<void> {
    // A hint: nothing to prefetch ahead of the page cache.
  }

  blockStatus(offset: number, length: number): Extent[] {
    // Like a read: only an in-sync, unfenced replica answers (its map may be stale otherwise).
    // Every replica applies the same entries in the same order, so its map is the volume's.
    this.checkUsable();
    return this.store.blockStatus(offset, Math.min(length, this.sizeBytes - offset));
  }

  // ---- peer inputs (from the node's shell) -------------------------------------------------

  /** A frame from `peer` for this volume (any connection; routed by type). */
  receive(peer: string, message: PeerMessage): void {
    if (this.closed || !this.hasPeer(peer)) return;
    if (this.diskFailure && DISKLESS_DROPPED_FRAMES.has(message.type)) {
      // Diskless: nothing is stored here any more, so nothing is acknowledged (a writer waits
      // for this node until the record no longer lists it), and no grant is taken or given. The
      // answers to this node's own stream still count: syncOwnStreamOnPeers waits for them.
      return;
    }
    switch (message.type) {
      case 'WRITE':
      case 'SYNC':
      case 'CHECKPOINT': {
        const target = this.targets.get(peer);
        if (!target) return;
        // A source removed from the in-sync set (issue 5) may resume after a pause and resend
        // writes admitted under an older epoch's grants; applied now they could land after the
        // new epoch's writes to the same region on one member and before them on another (I4).
        // (A replica catching up writes its copies through its own stream: it counts too.)
        if (!streamMembers(this.membership).includes(peer)) {
          this.logger.debug('stream frame from a source outside the in-sync set dropped', { peer, type: message.type, epoch: this.membership.epoch });
          return;
        }
        const paused = this.pausedInbound.get(peer);
        if (paused) {
          paused.push(message);
          return;
        }
        const effects = target.receive(message);
        // A rebase takes nothing of the frame: it is handed to the target again afterwards.
        if (effects.some((effect) => effect.kind === 'rebase')) this.pausedInbound.set(peer, [message]);
        this.runTarget(peer, effects);
        return;
      }
      case 'ACK':
      case 'SYNC_ACK':
      case 'CHECKPOINT_ACK':
        this.runSource(this.source.receive(peer, message));
        this.runReplicationWaiters();
        return;
      case 'GRANT_REQUEST':
      case 'GRANT':
      case 'REVOKE':
      case 'RELEASE':
        this.receivePolicing(peer, fromWireGrantMessage(message));
        return;
      case 'REGION_REQUEST':
        void this.answerRegionRequest(peer, message);
        return;
      case 'REGION_REPLY': {
        const request = this.regionRequests.get(message.requestId);
        if (!request || request.peer !== peer) return; // timed out, or not ours
        this.regionRequests.delete(message.requestId);
        clearTimeout(request.timer);
        if (message.ok) request.resolve(message.data);
        else request.reject(new MirrorsanError('NBD_EIO', `${peer}: ${message.data.toString('utf8')}`));
        return;
      }
      case 'ERROR':
        this.logger.warn('peer reported an error', { peer, code: message.code, message: message.message });
        return;
    }
  }

  /** The link this node dialled to `peer` is up: our stream and our policing messages can go. */
  outboundUp(peer: string): void {
    if (this.closed || !this.hasPeer(peer)) return;
    this.runSource(this.source.linkUp(peer, true));
    this.runHolder(this.holder.linkUp(peer));
    if (this.arbiter) this.runArbiter(this.arbiter.linkUp(peer));
  }

  outboundDown(peer: string): void {
    if (this.closed || !this.hasPeer(peer)) return;
    this.runSource(this.source.linkDown(peer, true));
  }

  /** `peer` dialled us: tell its stream where it stands here (the ACK goes back on that connection). */
  inboundUp(peer: string): void {
    if (this.closed || !this.hasPeer(peer)) return;
    const target = this.targets.get(peer);
    if (target) this.runTarget(peer, target.linkUp());
    this.runHolder(this.holder.linkUp(peer));
    if (this.arbiter) this.runArbiter(this.arbiter.linkUp(peer));
  }

  /** Time passes (monotonic, integer milliseconds). */
  tick(nowMs: number): void {
    if (this.closed) return;
    const now = Math.floor(nowMs);
    this.runSource(this.source.tick(now));
    this.checkStreamPositions(now);
    if (this.mustLeaveReason && !this.leavingToCatchUp && now - this.mustLeaveTriedMs >= MUST_LEAVE_RETRY_MS) {
      if (!this.membership.inSync.includes(this.self) || this.membership.inSync.length < 2) {
        this.mustLeaveReason = undefined; // left already, or the last in-sync member: it is the truth
      } else {
        this.mustLeaveTriedMs = now;
        this.leaveToCatchUp(this.mustLeaveReason);
      }
    }
    // Diskless: only this node's stream still matters (its SYNC on the peers); grants and
    // checkpoints need the disk.
    if (this.diskFailure) return;
    this.runHolder(this.holder.tick(now));
    if (this.arbiter) this.runArbiter(this.arbiter.tick(now));
    if (this.checkpointIntervalMs > 0 && now - this.lastCheckpointMs >= this.checkpointIntervalMs) {
      this.lastCheckpointMs = now;
      const stamp = this.store.stats().stamp;
      if (stamp > this.checkpointedStamp && !this.failure) {
        this.store.checkpoint().then(
          (result) => (this.checkpointedStamp = Math.max(this.checkpointedStamp, result.stamp)),
          (error: unknown) => this.fail(error, 'periodic checkpoint'),
        );
      }
    }
  }

  // ---- inspection --------------------------------------------------------------------------

  status(): object {
    const store = this.store.stats();
    const peers: Record<string, object | undefined> = {};
    for (const peer of this.peers) peers[peer] = this.source.peer(peer);
    const sources: Record<string, object> = {};
    for (const [peer, target] of this.targets) {
      const stored = store.sources[peer];
      sources[peer] = {
        lastAppliedSequence: target.receivedSequence,
        durableSequence: target.durableSequence,
        checkpointSequence: target.checkpointSequence,
        partitionEntries: stored?.partitionEntries ?? target.partitionEntries,
        partitionBytes: stored?.partitionBytes ?? 0,
        containerBytes: stored?.containerBytes ?? 0,
      };
    }
    return {
      name: this.name,
      sizeBytes: this.sizeBytes,
      epoch: this.membership.epoch,
      mode: this.mode,
      replicas: [...this.membership.replicas],
      inSync: [...this.membership.inSync],
      arbiter: this.arbiterNode,
      fence: this.fence ?? null,
      strict: this.strict,
      policing: {
        mode: this.regionCount === 1 ? 'single-writer' : 'regions',
        regionSizeBytes: this.regionSizeBytes,
        regionCount: this.regionCount,
        // This node as a holder: grants cached here and the writes queued for grants.
        regionsHeldHere: this.holder.regionsHeld,
        waitingWrites: this.holder.writesWaiting,
        admittedWrites: this.holder.writesAdmitted,
        changingEpoch: this.holder.changingEpoch,
        policingMessagesHeldForSync: this.heldPolicing.length,
        // Only the arbiter knows every holder and queue.
        arbiter: this.arbiter ? this.arbiter.summary() : null,
      },
      source: {
        lastSequence: this.source.lastSequence,
        retainedEntries: this.source.retainedCount,
        pendingOperations: this.source.pendingOperations,
        peers,
      },
      sources,
      store: { stamp: store.stamp, checkpointStamp: store.checkpointStamp, ownSequence: store.ownSequence, allocatedBytes: store.allocatedBytes, checkpoints: store.checkpoints },
      counters: { ...this.counters },
      replicaState: this.replicaState,
      catchingUp: [...(this.membership.catchingUp ?? [])],
      catchUp: this.catchUpDriver ? { ...this.catchUpDriver.progressValue } : null,
      dirtyRegions: {
        chunkBytes: this.dirty.chunkBytes,
        memberSinceEpoch: this.dirty.memberSince ?? null,
        // Per replica out of the stream (or catching up): chunks it may lack, by this node's marks.
        tracked: Object.fromEntries(this.dirty.trackedReplicas.map((replica) => [replica, this.dirty.markedChunks(replica)])),
        ownUnacknowledgedChunks: this.dirty.selfMarkedChunks,
        planRemainingChunks: this.dirty.plan?.remaining.size ?? null,
      },
      failure: this.failure ? { code: this.failure.code, message: this.failure.message } : null,
    };
  }

  /** Numbers for /metrics (one gauge each, labelled with the volume). */
  stats(): Record<string, number> {
    const store = this.store.stats();
    const progress = this.catchUpDriver?.progressValue;
    let slowestAckLag = 0;
    for (const member of this.source.members) slowestAckLag = Math.max(slowestAckLag, this.source.lastSequence - (this.source.peer(member)?.ackedSeq ?? 0));
    return {
      ...this.counters,
      epoch: this.membership.epoch,
      inSyncMembers: this.membership.inSync.length,
      replicas: this.membership.replicas.length,
      catchingUpMembers: (this.membership.catchingUp ?? []).length,
      inSyncHere: this.replicaState === 'in-sync' ? 1 : 0,
      fenced: this.fence !== undefined || this.failure !== undefined ? 1 : 0,
      regionsHeldHere: this.holder.regionsHeld,
      writesWaitingForGrants: this.holder.writesWaiting,
      lastSequence: this.source.lastSequence,
      retainedEntries: this.source.retainedCount,
      slowestMemberAckLagEntries: slowestAckLag,
      pendingOperations: this.pending.size,
      allocatedBytes: store.allocatedBytes,
      catchUpPercent: progress?.percent ?? (this.replicaState === 'in-sync' ? 100 : 0),
      catchUpBytesCopied: progress?.bytesCopied ?? 0,
      catchUpBytesCompared: progress?.bytesCompared ?? 0,
    };
  }

  /**
   * Fails what is still pending (its peers may never answer now), checkpoints and closes the
   * store. Call after the NBD server stopped taking requests.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.catchUpDriver?.stop();
    this.pausedInbound.clear();
    for (const request of this.regionRequests.values()) {
      clearTimeout(request.timer);
      request.reject(new MirrorsanError('NBD_SHUTDOWN', `volume ${this.name} is closing`));
    }
    this.regionRequests.clear();
    const closing = new MirrorsanError('NBD_SHUTDOWN', `volume ${this.name} is closing`);
    for (const operation of this.pending.values()) operation.reject(closing);
    this.pending.clear();
    this.replicationWaiters.ackedSeq.length = 0;
    this.replicationWaiters.syncAckedSeq.length = 0;
    await this.store.close({ checkpoint: !this.failure });
  }

  // ---- internals: client operations --------------------------------------------------------

  private submitWrite(entryType: WireEntryType, offset: number, lengthBytes: number, payload: Buffer, fua: boolean): Promise<void> {
    this.checkUsable();
    if (this.strict && this.membership.inSync.length < this.membership.replicas.length) {
      // [DESIGN §4] strict mode: no write while a replica is missing, rather than run degraded.
      throw new MirrorsanError('NBD_EPERM', `volume ${this.name} is strict and only ${this.membership.inSync.length} of ${this.membership.replicas.length} replicas are in sync (${this.membership.inSync.join(',')}): writes are refused until every replica is back`);
    }
    this.counters.writes++;
    const pieceBytesMax = WRITE_REGIONS_MAX * this.regionSizeBytes;
    const firstPieceEnd = Math.min(offset + lengthBytes, (Math.floor(offset / pieceBytesMax) + 1) * pieceBytesMax);
    if (firstPieceEnd === offset + lengthBytes) return this.submitPiece(entryType, offset, lengthBytes, payload, fua);
    // Longer than WRITE_REGIONS_MAX regions: pieces cut at multiples of pieceBytesMax.
    const pieces: Promise<void>[] = [];
    for (let start = offset, end = firstPieceEnd; start < offset + lengthBytes; start = end, end = Math.min(offset + lengthBytes, end + pieceBytesMax)) {
      const piecePayload = entryType === ENTRY_TYPE.WRITE ? payload.subarray(start - offset, end - offset) : payload;
      pieces.push(this.submitPiece(entryType, start, end - start, piecePayload, fua));
    }
    return Promise.all(pieces).then(() => undefined);
  }

  private submitPiece(entryType: WireEntryType, offset: number, lengthBytes: number, payload: Buffer, fua: boolean): Promise<void> {
    const operationId = this.nextOperationId++;
    const done = this.track(operationId, true);
    this.pending.get(operationId)!.write = { entryType, offset, lengthBytes, payload, fua };
    this.pending.get(operationId)!.servingTerm = this.servingTerm;
    this.runHolder(this.holder.acquire(operationId, regionsOf(offset, lengthBytes, this.regionSizeBytes, WRITE_REGIONS_MAX)));
    return done;
  }

  private track(operationId: number, holdsGrant: boolean): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      this.pending.set(operationId, { resolve: () => resolve(), reject, holdsGrant, admitted: false });
    });
  }

  /** A pending operation whose promise yields the sequence it completed at (internal flushes). */
  private trackSequence(operationId: number): Promise<number | undefined> {
    return new Promise<number | undefined>((resolve, reject) => {
      this.pending.set(operationId, { resolve, reject, holdsGrant: false, admitted: false });
    });
  }

  private admitted(operationId: number): void {
    const operation = this.pending.get(operationId);
    if (operation?.copy) {
      operation.admitted = true;
      if (this.skippingLostSequences) {
        this.finish(operationId, { ok: false, code: 'NBD_EIO', message: `catch-up copy at ${operation.copy.offset}: sequence numbers are being voided` });
        return;
      }
      void this.copyAdmitted(operationId, operation.copy);
      return;
    }
    // Diskless: a grant in flight (from this node's own arbiter) may admit a write refused when the disk failed.
    if (operation === undefined && this.diskFailure) return;
    assert(operation?.write !== undefined, `admitted write ${operationId} is not pending`);
    operation.admitted = true;
    const stale = this.staleAdmission(operation.servingTerm);
    if (stale !== undefined) {
      // Never executed: finish() hands its regions back to the holder.
      this.finish(operationId, { ok: false, code: 'NBD_EIO', message: stale });
      return;
    }
    const { entryType, offset, lengthBytes, payload, fua } = operation.write;
    this.runSource(this.source.write({ operationId, entryType, offset, lengthBytes, payload, fua }));
  }

  private finish(operationId: number, result: OperationResult, sequence?: number): void {
    const operation = this.pending.get(operationId);
    if (!operation) return; // failed already (store failure or close)
    this.pending.delete(operationId);
    if (result.ok && operation.holdsGrant) this.ownWriteCompletedSinceOpen = true;
    // I2: a node whose lease ran out (it may have been removed meanwhile) acknowledges no
    // write: the client hears EIO (outcome unknown; the data is on every member all the same).
    const refusal = result.ok && operation.servingTerm !== undefined ? this.servingCheck?.() : undefined;
    if (refusal) operation.reject(new MirrorsanError('NBD_EIO', `volume ${this.name}: not serving on this node: ${refusal} (the write reached every member, but this node may no longer acknowledge it)`));
    else if (result.ok) operation.resolve(sequence);
    else operation.reject(new MirrorsanError(result.code, result.message));
    if (!operation.holdsGrant || !operation.admitted || this.closed) return;
    // The region's hold ends once every member has the write (async: maybe after the client's answer).
    const release = (): void => {
      if (!this.closed) this.runHolder(this.holder.writeAcknowledged(operationId));
    };
    if (result.ok && sequence !== undefined) this.whenReplicated('ackedSeq', sequence, release);
    else release();
  }

  /** Runs `run` once every in-sync member's `field` reaches `sequence` (at once if it has). */
  private whenReplicated(field: 'ackedSeq' | 'syncAckedSeq', sequence: number, run: () => void): void {
    if (this.replicationWatermark(field) >= sequence) {
      run();
      return;
    }
    const waiters = this.replicationWaiters[field];
    let index = waiters.length;
    while (index > 0 && waiters[index - 1]!.sequence > sequence) index--;
    waiters.splice(index, 0, { sequence, run });
  }

  private replicationWatermark(field: 'ackedSeq' | 'syncAckedSeq'): number {
    return this.source.memberWatermark(field);
  }

  private runReplicationWaiters(): void {
    for (const field of ['ackedSeq', 'syncAckedSeq'] as const) {
      const waiters = this.replicationWaiters[field];
      if (waiters.length === 0) continue;
      const watermark = this.replicationWatermark(field);
      let count = 0;
      while (count < waiters.length && waiters[count]!.sequence <= watermark) count++;
      for (const waiter of waiters.splice(0, count)) waiter.run();
    }
  }

  // ---- internals: effects -------------------------------------------------------------------

  /**
   * Performs the source's effects in order. Not re-entrant: effects of a source call made while
   * a batch is performed (a completion releases a grant, whose release sync calls
   * source.flush) go after the rest of that batch. Performed at once, the nested SYNC(n) would
   * overtake the batch's WRITE(n) on the link, the targets would answer for n - 1 only and the
   * sync would never complete (found by the whole-path simulation, seed 30).
   */
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
    // Frames leave first: a peer starts on a write (and on a FUA's SYNC) while this node does
    // its own local I/O for it. The two are independent (docs/replication.md, write path step
    // 2); sends keep their order among themselves, and so does everything else.
    for (const sendsFirst of [true, false]) for (const effect of effects) {
      if ((effect.kind === 'send') !== sendsFirst) continue;
      switch (effect.kind) {
        case 'appendLocal': {
          const { entry } = effect;
          if (this.diskFailure) {
            // Diskless: the local copy no longer counts (this replica catches up before it serves
            // again). Counted as applied so that the source's in-flight limit and the FIFO
            // behind it drain; the client operation was refused already.
            this.runSource(this.source.localApplied(entry.sequence));
            break;
          }
          // Called synchronously, in effect order: the store's own sequence is the source's.
          const type = entry.entryType;
          this.dirty.noteWrite(entry.offset, entry.lengthBytes, true);
          const applied = this.store.writeLocal(type, entry.offset, entry.lengthBytes, type === ENTRY_TYPE.WRITE ? entry.payload : undefined);
          applied.then(
            (sequence) => {
              assert(sequence === entry.sequence, `store sequence ${sequence} differs from the source's ${entry.sequence}`);
              if (!this.closed) this.runSource(this.source.localApplied(entry.sequence));
            },
            (error: unknown) => {
              this.fail(error, `local apply of entry ${entry.sequence}`);
              if (this.diskFailure && !this.closed) this.runSource(this.source.localApplied(entry.sequence));
            },
          );
          break;
        }
        case 'syncLocal':
          if (this.diskFailure) {
            // Diskless: durability is the peers' (syncOwnStreamOnPeers); the local log is gone.
            this.runSource(this.source.localSynced(effect.throughSequence));
            break;
          }
          // Up to its sequence only: a later direct write still on its way to the image is
          // not waited for.
          this.store.flushLocal(effect.throughSequence).then(
            () => {
              if (!this.closed) this.runSource(this.source.localSynced(effect.throughSequence));
            },
            (error: unknown) => {
              this.fail(error, 'local log sync');
              if (this.diskFailure && !this.closed) this.runSource(this.source.localSynced(effect.throughSequence));
            },
          );
          break;
        case 'send':
          // A frame that cannot be queued is lost like one on a failed link: the peer's next
          // ACK repositions the stream (a gap makes its target reset the connection first).
          if (!this.transport.sendToPeer(effect.peer, effect.message)) {
            this.logger.debug('stream frame not sent', { peer: effect.peer, type: effect.message.type, sequence: effect.message.sequence });
          }
          break;
        case 'complete':
          this.finish(effect.operationId, effect.result, effect.sequence);
          break;
        case 'peerNeedsCatchUp':
          if (!this.ownWriteCompletedSinceOpen && this.membership.inSync.includes(this.self)) {
            // This node restarted with entries of its own that the peer never received (in
            // flight at the crash, never acknowledged to a client): its resend window is gone,
            // and its image holds data the others lack. It leaves the in-sync set to catch up
            // (which overwrites those regions with the in-sync copy) instead of serving them.
            this.leaveToCatchUp(`${effect.peer} never received this node's entries ${effect.peerSequence + 1}.. from before its restart`);
          } else {
            this.logger.error('peer stands below the resend window; it needs a resync (not built yet)', {
              peer: effect.peer,
              peerSequence: effect.peerSequence,
              retainedFromSequence: effect.retainedFromSequence,
            });
          }
          break;
        case 'peerAhead':
          this.skipLostSequences(effect.peer, effect.peerSequence, effect.lastSequence);
          break;
        case 'refused':
          this.logger.warn('source refused a message', { peer: effect.peer, code: effect.code, reason: effect.reason });
          break;
      }
    }
  }

  /**
   * A peer holds own entries up to `peerSequence` that this node's log lost (sent, then a crash
   * before the local append; frames go out in parallel with it). Their numbers are voided
   * (the log padded to the highest such report, then the source skips there), and this node
   * leaves the in-sync set and catches up comparing the whole volume against every in-sync
   * peer: what those entries wrote is in nobody's marks, and they may have reached some peers
   * only (the comparison rewrites chunks the peers disagree on everywhere).
   */
  private skipLostSequences(peer: string, peerSequence: number, lastSequence: number): void {
    this.lostSequencesTo = Math.max(this.lostSequencesTo, peerSequence);
    if (this.skippingLostSequences || this.closed) return;
    this.skippingLostSequences = true;
    this.logger.error('a peer holds entries of this node that its log lost in a crash: voiding their sequence numbers and catching up', { peer, peerSequence, lastSequence });
    this.dirty.forgetSelf();
    if (this.membership.inSync.includes(this.self)) this.leaveToCatchUp(`${peer} holds this node's entries ${lastSequence + 1}..${peerSequence}, which its log lost in a crash`);
    const skip = async (): Promise<void> => {
      while (!this.closed && this.lostSequencesTo > this.source.lastSequence) {
        const to = this.lostSequencesTo;
        // Nothing is sequenced meanwhile: this node refuses I/O from now on (leaving or out).
        await padOwnLog(this.store, to, this.logger);
        if (this.closed) return;
        this.runSource(this.source.skipTo(to));
        // Members re-announce their positions on a new link: the stream restarts at the floor.
        for (const member of this.source.members) this.transport.resetOutbound?.(member, `stream restarts at ${to + 1} after lost entries`);
      }
    };
    this.lostSequencesSkipped = skip().then(
      () => void (this.skippingLostSequences = false),
      (error: unknown) => {
        this.skippingLostSequences = false;
        this.fail(error, 'voiding lost sequence numbers');
      },
    );
  }

  private runTarget(peer: string, effects: readonly TargetEffect[]): void {
    const target = this.targets.get(peer)!;
    for (const effect of effects) {
      switch (effect.kind) {
        case 'apply': {
          const { entry } = effect;
          this.counters.remoteEntriesApplied++;
          this.dirty.noteWrite(entry.offset, entry.lengthBytes, false);
          // Registered in the range lock now (arrival order); the ACK below goes out at once.
          this.store
            .applyRemote(peer, { sequence: entry.sequence, type: entry.entryType, offset: entry.offset, lengthBytes: entry.lengthBytes }, entry.entryType === ENTRY_TYPE.WRITE ? entry.payload : undefined)
            .catch((error: unknown) => this.fail(error, `apply of ${peer}'s entry ${entry.sequence}`));
          break;
        }
        case 'appendToContainer':
          // The store mirrors the target's partition (every apply joined it); it spills the lot.
          this.store.spill(peer, { sync: effect.sync }).then(
            (durable) => {
              if (!effect.sync || this.closed) return;
              assert(durable >= effect.throughSequence, `container of ${peer} durable through ${durable}, not ${effect.throughSequence}`);
              this.runTarget(peer, target.containerSynced(effect.throughSequence));
            },
            (error: unknown) => this.fail(error, `spill of ${peer}'s partition`),
          );
          break;
        case 'checkpoint':
          this.checkpointCovering(peer, effect.sequence).then(
            () => {
              if (!this.closed) this.runTarget(peer, target.checkpointDone(effect.sequence));
            },
            (error: unknown) => this.fail(error, `checkpoint for ${peer}`),
          );
          break;
        case 'send':
          this.transport.answerSource(peer, effect.message);
          break;
        case 'resyncNeeded':
          this.logger.warn('stream gap: resetting the connection', { peer, reason: effect.reason });
          this.transport.resetInbound(peer, effect.reason);
          break;
        case 'rebase':
          this.rebaseStream(peer, effect.throughSequence);
          break;
        case 'refused':
          this.logger.warn('target refused a frame', { peer, code: effect.code, reason: effect.reason });
          break;
      }
    }
  }

  /** A store checkpoint whose record covers `sequence` of `peer` (a run already under way may not). */
  private async checkpointCovering(peer: string, sequence: number): Promise<void> {
    for (let attempt = 1; attempt <= CHECKPOINT_COVER_ATTEMPTS_MAX; attempt++) {
      const result = await this.store.checkpoint();
      this.checkpointedStamp = Math.max(this.checkpointedStamp, result.stamp);
      if ((result.sources.get(peer) ?? 0) >= sequence) return;
    }
    throw new MirrorsanError('STORE_IO', `checkpoint does not cover ${peer}'s sequence ${sequence} after ${CHECKPOINT_COVER_ATTEMPTS_MAX} attempts`);
  }

  private receivePolicing(peer: string, message: PolicingMessage): void {
    // From an epoch this node has not adopted yet (the sender heard of it first, often by its
    // own CAS): kept until the record's watch brings the epoch here, instead of being ignored
    // and resent half a second later.
    if (message.epoch > this.membership.epoch) {
      if (this.futurePolicing.length >= FUTURE_POLICING_MAX) this.futurePolicing.shift();
      this.futurePolicing.push({ peer, message });
      return;
    }
    if (policingRecipient(message, (epoch) => this.arbiter !== undefined && this.arbiter.epoch === epoch) === 'arbiter') {
      if (this.arbiter) this.runArbiter(this.arbiter.receive(peer, message));
      else this.logger.debug('policing message for an arbiter this node is not', { peer, type: message.type });
      return;
    }
    if (message.type === 'GRANT') this.counters.grantsReceived++;
    this.runHolder(this.holder.receive(peer, message));
  }

  /**
   * The holder's and arbiter's messages leave through here. A RELEASE (and whatever follows
   * it) waits for a sync started after it: the released writes must be durable on every
   * member before another node may write over them (see the header).
   */
  private sendPolicing(target: string, message: PolicingMessage, recipientRole: 'holder' | 'arbiter'): void {
    // DRAINED (holder to arbiter) hands every grant of the old epoch over just as a RELEASE
    // does: the same durability sync comes first (found by the failure simulation), unless
    // every member already synced everything this node wrote.
    const drainedUnsynced = message.type === 'DRAINED' && recipientRole === 'arbiter' && this.source.memberWatermark('syncAckedSeq') < this.source.lastSequence;
    const isRelease = message.type === 'RELEASE' || drainedUnsynced;
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
    this.counters.releaseSyncs++;
    const epoch = this.membership.epoch;
    const operationId = this.nextOperationId++;
    const done = this.trackSequence(operationId);
    this.runSource(this.source.flush(operationId));
    const finished = (error?: unknown): void => {
      this.releaseSyncRunning = false;
      if (this.closed) return;
      if (error) this.logger.warn('sync before a grant release failed; releasing anyway', { error: error instanceof Error ? error.message : String(error) });
      // An epoch change in between emptied the queue: what is there now is newer.
      const covered = epoch === this.membership.epoch ? this.releaseSyncCovers : 0;
      this.releaseSyncCovers = 0;
      // Send what the sync covered, and what follows it up to the next uncovered RELEASE.
      let index = 0;
      while (index < this.heldPolicing.length && (index < covered || !this.heldPolicing[index]!.isRelease)) index++;
      for (const held of this.heldPolicing.splice(0, index)) this.deliverPolicing(held.target, held.message, held.recipientRole);
      this.startReleaseSync();
    };
    // Durable on every member: a flush's completion says so in sync mode; in async mode the
    // members' SYNC_ACKs may come later.
    done.then((sequence) => this.whenReplicated('syncAckedSeq', sequence ?? 0, () => finished()), finished);
  }

  private deliverPolicing(target: string, message: PolicingMessage, recipientRole: 'holder' | 'arbiter'): void {
    if (target === this.self) {
      // Between this node's own holder and arbiter: delivered as a later event, in order,
      // never re-entrantly inside the machine that produced it.
      queueMicrotask(() => {
        if (this.closed) return;
        if (recipientRole === 'arbiter') {
          if (this.arbiter) this.runArbiter(this.arbiter.receive(this.self, message));
        } else {
          if (message.type === 'GRANT') this.counters.grantsReceived++;
          this.runHolder(this.holder.receive(this.self, message));
        }
      });
      return;
    }
    const wire: GrantMessage = toWireGrantMessage(message);
    this.transport.sendToPeer(target, wire);
  }

  private runHolder(effects: readonly HolderEffect[]): void {
    for (const effect of effects) {
      switch (effect.kind) {
        case 'send':
          this.sendPolicing(effect.target, effect.message, 'arbiter');
          break;
        case 'admit':
          this.admitted(effect.writeId);
          break;
        case 'refuse':
          this.finish(effect.writeId, { ok: false, code: effect.code, message: effect.message });
          break;
        case 'ignored':
          this.logger.debug('holder ignored a message', { source: effect.source, type: effect.message.type, reason: effect.reason });
          break;
        case 'holdOverdue':
          this.logger.warn('grant revoked but still held: writes lack acknowledgements', { region: effect.region, writesInFlight: effect.writesInFlight, revokedForMs: effect.revokedForMs });
          break;
        case 'epochChanged':
          this.logger.info('grant epoch changed', { epoch: effect.epoch, arbiter: effect.arbiter });
          break;
      }
    }
  }

  private runArbiter(effects: readonly ArbiterEffect[]): void {
    for (const effect of effects) {
      switch (effect.kind) {
        case 'send':
          this.sendPolicing(effect.target, effect.message, 'holder');
          break;
        case 'queued':
          break;
        case 'ignored':
          this.logger.debug('arbiter ignored a message', { source: effect.source, type: effect.message.type, reason: effect.reason });
          break;
        case 'holdOverdue':
          this.logger.warn('a holder keeps a revoked grant', { region: effect.region, holder: effect.holder, revokedForMs: effect.revokedForMs });
          break;
      }
    }
  }

  /** Fences this replica at once and asks the node to move it to the catching-up set. */
  private leaveToCatchUp(reason: string): void {
    if (this.leavingToCatchUp || this.closed) return;
    const leave = this.catchUpAccess?.leave;
    if (!leave || this.membership.inSync.length < 2) {
      this.logger.error('this replica should catch up but cannot leave the in-sync set', { reason, inSync: this.membership.inSync.join(',') });
      return;
    }
    // Refuses I/O from now on (checkUsable); the in-sync fence takes over once the record
    // lists this replica as catching up.
    this.leavingToCatchUp = true;
    this.servingTerm++;
    this.logger.warn('leaving the in-sync set to catch up', { reason });
    // Planned before the CAS (the catch-up may start before leave() returns): only this node's
    // own unacknowledged writes, and what peers mark from now on, need comparing.
    this.dirty.planFromSelf(this.membership.epoch);
    this.persistDirtySoon();
    leave(reason).then(
      (left) => {
        if (left) return;
        this.leavingToCatchUp = false;
        this.dirty.dropPlan();
        this.logger.warn('could not leave the in-sync set to catch up; trying again on the next stranded stream', { reason });
      },
      (error: unknown) => {
        this.leavingToCatchUp = false;
        this.dirty.dropPlan();
        this.logger.error('leaving the in-sync set failed', { error: error instanceof Error ? error.message : String(error) });
      },
    );
  }

  /** See STREAM_UNPOSITIONED_MAX_MS. */
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
      } else if (nowMs - since >= STREAM_UNPOSITIONED_MAX_MS && this.transport.resetOutbound) {
        this.unpositionedSinceMs.delete(member);
        this.logger.warn('no stream position from a member for too long: redialling its link', { peer: member, waitedMs: nowMs - since });
        this.transport.resetOutbound(member, `no ACK positioning the stream for ${nowMs - since} ms`);
      }
    }
  }

  // ---- internals: repair after a writer's loss ------------------------------------------

  /**
   * A writer left the stream (died, removed) while it may have had writes in flight: those
   * may have reached some members and not others, and nothing else would ever reconcile them
   * (I4; the failure simulation's noRepairAfterLoss). The new epoch's arbiter compares the
   * regions that writer held (its grant table says which; every region if this node was not
   * the arbiter before) on every in-sync member and rewrites the chunks they disagree on from
   * its own bytes, under their grants, through the mirrored write path.
   */
  private async repairAfterLoss(departed: string[], suspect: number[] | 'all', epoch: number): Promise<void> {
    const regions = suspect === 'all' ? Array.from({ length: this.regionCount }, (_, region) => region) : suspect;
    this.logger.warn('repairing what departed writers may have left half-written', { departed: departed.join(','), regions: suspect === 'all' ? `all ${this.regionCount}` : regions.length, epoch });
    const chunkBytes = Math.min(this.regionSizeBytes, CATCH_UP_CHUNK_BYTES_MAX);
    // Paced like a catch-up (catchUpRateBytesPerSec): a repair of every region reads the whole
    // volume on every in-sync member, beside the clients' I/O.
    const rateBytesPerSec = this.catchUpAccess?.rateBytesPerSec ?? 0;
    const startedMs = Date.now();
    let comparedBytes = 0;
    let compared = 0;
    let rewritten = 0;
    try {
      // The barrier (see planCatchUp): once a grant of this epoch is held, every member adopted
      // it and refuses the departed writer's frames, so nothing of it lands after the compare.
      const barrierBytes = Math.min(4096, this.sizeBytes);
      await this.copyUnderGrant(0, barrierBytes, () => this.store.read(0, barrierBytes), false);
      const access = this.linkPeerAccess();
      for (const region of regions) {
        const start = region * this.regionSizeBytes;
        const end = Math.min(this.sizeBytes, start + this.regionSizeBytes);
        for (let offset = start; offset < end; offset += chunkBytes * 16) {
          if (this.closed || this.membership.epoch !== epoch || !this.membership.inSync.includes(this.self)) return;
          const length = Math.min(chunkBytes * 16, end - offset);
          comparedBytes += length;
          if (rateBytesPerSec > 0) {
            const aheadMs = (comparedBytes / rateBytesPerSec) * 1000 - (Date.now() - startedMs);
            if (aheadMs > 0) await sleep(aheadMs);
          }
          const peers = this.membership.inSync.filter((node) => node !== this.self);
          const [local, ...remotes] = await Promise.all([
            this.store.read(offset, length).then((data) => digestChunks(data, chunkBytes)),
            ...peers.map((peer) => access.digests(peer, offset, length, chunkBytes)),
          ]);
          for (let index = 0; index < local.length; index++) {
            compared++;
            if (remotes.every((answer) => answer[index] === local[index])) continue;
            const chunkStart = offset + index * chunkBytes;
            const chunkLength = Math.min(chunkBytes, end - chunkStart);
            await this.copyUnderGrant(chunkStart, chunkLength, () => this.store.read(chunkStart, chunkLength), true);
            rewritten++;
          }
        }
      }
      this.counters.repairedChunks += rewritten;
      this.logger.info('repair after a writer\'s loss done', { departed: departed.join(','), chunksCompared: compared, chunksRewritten: rewritten });
    } catch (error) {
      this.logger.error('repair after a writer\'s loss failed; the regions it covers may differ between replicas until rewritten', {
        departed: departed.join(','),
        error: error instanceof Error ? error.message : String(error),
      });
    }
  }

  // ---- internals: dirty regions (src/volume/dirty-regions.ts) ------------------------------

  /**
   * Writes the tracker durably. Before that, the self marks are refreshed from the resend
   * window; they shrink to it only while every member holds durably everything before it.
   */
  private async saveDirty(): Promise<void> {
    const members = streamMembers(this.membership).filter((node) => node !== this.self);
    const peersHaveAll =
      this.membership.inSync.includes(this.self) &&
      !this.leavingToCatchUp &&
      members.every((member) => this.source.peer(member)?.positioned === true) &&
      this.source.memberWatermark('checkpointAckedSeq') >= this.source.retainedFromSequence - 1;
    this.dirty.refreshSelf(this.source.retainedExtents(), peersHaveAll);
    await writeFileDurable(this.dirtyFile, this.dirty.encode());
  }

  /** After a change the tracker must not lose at a crash (a departure seen, a plan made): saved now, in the background. */
  private persistDirtySoon(): void {
    this.dirtySave.run().catch((error: unknown) => this.logger.error('saving the dirty-region record failed', { error: error instanceof Error ? error.message : String(error) }));
  }

  /**
   * What this replica must compare to catch up: asks every in-sync peer what it may lack
   * (since the previous plan's epoch, or since it left), and falls back to the whole volume
   * when they cannot tell (why, in the log). The plan is saved before it is used.
   */
  private async planCatchUp(): Promise<CatchUpPlanResult> {
    await this.lostSequencesSkipped;
    // A barrier: one grant of this epoch. The arbiter grants nothing before every member's
    // DRAINED, which each sends once its older-epoch writes are acknowledged (and durable) on
    // their members: so every write admitted before this replica joined, and so never
    // streamed to it, is on the in-sync peers before any chunk is compared (found by the
    // failure simulation: a chunk compared earlier could miss such a write on both sides).
    const barrierBytes = Math.min(4096, this.sizeBytes);
    await this.copyUnderGrant(0, barrierBytes, () => this.store.read(0, barrierBytes), false);
    const sinceEpoch = this.dirty.plan?.epoch ?? 0;
    const peers = this.membership.inSync.filter((node) => node !== this.self);
    if (peers.length === 0) throw new MirrorsanError('NBD_EIO', 'no in-sync peer to plan the catch-up with');
    const answers = new Map<string, DirtyAnswer>();
    await Promise.all(
      peers.map(async (peer) => {
        const data = await this.requestRegion(peer, 'dirty', sinceEpoch, 0, this.dirty.chunkBytes);
        answers.set(peer, decodeDirtyAnswer(data, this.dirty.chunkCount));
      }),
    );
    const { plan, full, reason } = this.dirty.makePlan(this.membership.epoch, answers);
    await this.dirtySave.run();
    return { chunkBytes: this.dirty.chunkBytes, chunks: [...plan.remaining], full, reason };
  }

  /** A chunk of the plan was compared (and copied if needed): remembered, and saved now and then. */
  private planChunkVerified(chunk: number): void {
    this.dirty.verified(chunk);
    const now = Date.now();
    if (now - this.lastPlanSaveMs < PLAN_SAVE_INTERVAL_MS) return;
    this.lastPlanSaveMs = now;
    this.persistDirtySoon();
  }

  // ---- internals: catch-up (src/volume/catch-up.ts) -------------------------------------

  /**
   * Digests of consecutive `chunkBytes` chunks of [offset, offset+length) as this replica
   * holds them (after every write registered before the call), for a peer that catches up.
   * Only an in-sync replica is a source of truth.
   */
  async digests(offset: number, length: number, chunkBytes: number): Promise<string[]> {
    this.checkUsable();
    // A peer's request (bad input, not a bug here): refused with a clear error.
    if (!Number.isSafeInteger(chunkBytes) || chunkBytes < 4096 || chunkBytes > CATCH_UP_CHUNK_BYTES_MAX) {
      throw new MirrorsanError('NBD_EINVAL', `chunk size ${chunkBytes} out of range (4096..${CATCH_UP_CHUNK_BYTES_MAX})`);
    }
    if (offset < 0 || length < 1 || offset + length > this.sizeBytes || length > 64 * CATCH_UP_CHUNK_BYTES_MAX) {
      throw new MirrorsanError('NBD_EINVAL', `digest range ${offset}+${length} outside the volume or too long`);
    }
    return digestChunks(await this.store.read(offset, length), chunkBytes);
  }

  /** Where this replica stands: in-sync, catching up (copying what it missed), or out of sync. */
  get replicaState(): 'in-sync' | 'catching-up' | 'out-of-sync' {
    if (this.membership.inSync.includes(this.self)) return 'in-sync';
    return (this.membership.catchingUp ?? []).includes(this.self) ? 'catching-up' : 'out-of-sync';
  }

  /** Starts or stops the catch-up driver as this replica enters or leaves the catching-up set. */
  private adoptCatchUpState(previous: ReplicaMembership | undefined): void {
    const catching = (this.membership.catchingUp ?? []).includes(this.self);
    const wasCatching = previous !== undefined && (previous.catchingUp ?? []).includes(this.self);
    if (!catching) {
      if (this.catchUpDriver && !this.catchUpDriver.isStopped) {
        this.catchUpDriver.stop();
        this.logger.info('catch-up ended', { state: this.replicaState, epoch: this.membership.epoch });
      }
      return;
    }
    if (wasCatching && this.catchUpDriver && !this.catchUpDriver.isStopped) return; // still under way
    const options = this.catchUpAccess;
    if (!options) {
      this.logger.warn('catching up, but this volume was opened without catch-up: it stays out of sync');
      return;
    }
    const access = options.peerAccess ?? this.linkPeerAccess();
    const regionChunk = Math.min(this.regionSizeBytes, CATCH_UP_CHUNK_BYTES_MAX);
    const driver = new CatchUpDriver(
      {
        sizeBytes: this.sizeBytes,
        plan: () => this.planCatchUp(),
        verified: (chunk) => this.planChunkVerified(chunk),
        localDigests: async (offset, length, chunkBytes) => digestChunks(await this.store.read(offset, length), chunkBytes),
        copyUnderGrant: (offset, length, fetch, force) => this.copyUnderGrant(offset, length, fetch, force),
        flush: () => this.flushInternal(),
        sourcesOfTruth: () => this.membership.inSync.filter((node) => node !== this.self),
      },
      access,
      { chunkBytes: regionChunk, rateBytesPerSec: options.rateBytesPerSec ?? 0, logger: this.logger.child('catch-up') },
    );
    this.catchUpDriver = driver;
    const epoch = this.membership.epoch;
    driver.run().then(
      async (finished) => {
        if (!finished || this.closed || driver !== this.catchUpDriver) return;
        await options.caughtUp(epoch);
      },
      (error: unknown) => this.logger.error('catch-up failed', { error: error instanceof Error ? error.message : String(error) }),
    );
  }

  /** Digests and reads from in-sync peers over the replication links (REGION_REQUEST / REGION_REPLY). */
  private linkPeerAccess(): CatchUpPeerAccess {
    return {
      digests: async (peer, offset, length, chunkBytes) => {
        const data = await this.requestRegion(peer, 'digests', offset, length, chunkBytes);
        if (data.length % DIGEST_WIRE_BYTES !== 0) throw new MirrorsanError('NBD_EIO', `${peer} sent ${data.length} bytes of digests`);
        const digests: string[] = [];
        for (let at = 0; at < data.length; at += DIGEST_WIRE_BYTES) digests.push(data.subarray(at, at + DIGEST_WIRE_BYTES).toString('hex'));
        return digests;
      },
      read: (peer, offset, length) => this.requestRegion(peer, 'read', offset, length, 0),
    };
  }

  private requestRegion(peer: string, kind: 'digests' | 'read' | 'dirty', offset: number, lengthBytes: number, chunkBytes: number): Promise<Buffer> {
    if (this.regionRequests.size >= REGION_REQUESTS_MAX) return Promise.reject(new MirrorsanError('VOLUME_BUSY', `${REGION_REQUESTS_MAX} region requests already wait`));
    const requestId = this.nextRegionRequestId++;
    return new Promise<Buffer>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.regionRequests.delete(requestId);
        reject(new MirrorsanError('NBD_EIO', `${peer} did not answer a ${kind} request in ${REGION_REQUEST_TIMEOUT_MS} ms`));
      }, REGION_REQUEST_TIMEOUT_MS);
      timer.unref?.();
      this.regionRequests.set(requestId, { peer, resolve, reject, timer });
      const sent = this.transport.sendToPeer(peer, { type: 'REGION_REQUEST', volume: this.name, epoch: this.membership.epoch, requestId, kind, offset, lengthBytes, chunkBytes });
      if (!sent) {
        this.regionRequests.delete(requestId);
        clearTimeout(timer);
        reject(new MirrorsanError('NBD_EIO', `no link to ${peer}`));
      }
    });
  }

  /** A catching-up peer asks for digests or bytes: only an in-sync, unfenced replica answers. */
  private async answerRegionRequest(peer: string, request: RegionRequestMessage): Promise<void> {
    const reply = (ok: boolean, data: Buffer): void => {
      if (this.closed) return;
      // The request's epoch, echoed: the asker may be an epoch ahead of this node, and a reply
      // is matched by its id, not ordered by epoch (a lower one would be refused as stale).
      this.transport.answerSource(peer, { type: 'REGION_REPLY', volume: this.name, epoch: Math.max(request.epoch, this.membership.epoch), requestId: request.requestId, ok, data });
    };
    try {
      if (request.kind === 'read') {
        if (request.lengthBytes < 1 || request.lengthBytes > CATCH_UP_CHUNK_BYTES_MAX || request.offset + request.lengthBytes > this.sizeBytes) {
          throw new MirrorsanError('NBD_EINVAL', `read of ${request.offset}+${request.lengthBytes} is outside the volume or longer than ${CATCH_UP_CHUNK_BYTES_MAX}`);
        }
        this.checkUsable();
        reply(true, await this.store.read(request.offset, request.lengthBytes));
        return;
      }
      if (request.kind === 'dirty') {
        this.checkUsable();
        // The asker's view must not be ahead of ours: departures this node has yet to see
        // would be missing from its answer.
        // (The asker usually made the CAS that took it there: the record's watch brings it here soon.)
        for (let waitedMs = 0; request.epoch > this.membership.epoch && waitedMs < DIRTY_ANSWER_EPOCH_WAIT_MS && !this.closed; waitedMs += 10) await sleep(10);
        if (request.epoch > this.membership.epoch) throw new MirrorsanError('NBD_EIO', `${this.self} is at epoch ${this.membership.epoch}, behind the request's ${request.epoch}`);
        this.checkUsable();
        if (request.chunkBytes !== this.dirty.chunkBytes) throw new MirrorsanError('NBD_EINVAL', `dirty regions tracked in ${this.dirty.chunkBytes}-byte chunks here, not ${request.chunkBytes}`);
        if (!this.peers.includes(peer)) throw new MirrorsanError('NBD_EINVAL', `${peer} is not a replica of ${this.name}`);
        reply(true, encodeDirtyAnswer(this.dirty.answer(peer, request.offset)));
        return;
      }
      const digests = await this.digests(request.offset, request.lengthBytes, request.chunkBytes);
      reply(true, Buffer.concat(digests.map((digest) => Buffer.from(digest, 'hex'))));
    } catch (error) {
      reply(false, Buffer.from(error instanceof Error ? error.message : String(error)));
    }
  }

  /** Holding the chunk's write grant: the peer's bytes are fetched and, unless equal to ours, written (mirrored). */
  private copyUnderGrant(offset: number, lengthBytes: number, fetch: () => Promise<Buffer>, force: boolean): Promise<'same' | 'copied'> {
    if (this.closed) return Promise.reject(new MirrorsanError('NBD_SHUTDOWN', `volume ${this.name} is closed`));
    const operationId = this.nextOperationId++;
    const copy = { offset, lengthBytes, fetch, force } as NonNullable<PendingOperation['copy']>;
    const done = this.track(operationId, true);
    this.pending.get(operationId)!.copy = copy;
    this.runHolder(this.holder.acquire(operationId, regionsOf(offset, lengthBytes, this.regionSizeBytes, WRITE_REGIONS_MAX)));
    return done.then(() => copy.outcome ?? 'copied');
  }

  private async copyAdmitted(operationId: number, copy: NonNullable<PendingOperation['copy']>): Promise<void> {
    let data: Buffer;
    let local: Buffer;
    try {
      [data, local] = await Promise.all([copy.fetch(), this.store.read(copy.offset, copy.lengthBytes)]);
      assert(data.length === copy.lengthBytes, `peer returned ${data.length} bytes for ${copy.lengthBytes}`);
    } catch (error) {
      const message = error instanceof Error ? error.message : String(error);
      this.finish(operationId, { ok: false, code: 'NBD_EIO', message: `catch-up read at ${copy.offset}: ${message}` });
      return;
    }
    if (this.closed || !this.pending.has(operationId)) return;
    if (!copy.force && data.equals(local)) {
      copy.outcome = 'same';
      this.finish(operationId, { ok: true });
      return;
    }
    copy.outcome = 'copied';
    this.runSource(this.source.write({ operationId, entryType: ENTRY_TYPE.WRITE, offset: copy.offset, lengthBytes: copy.lengthBytes, payload: data, fua: false }));
  }

  /** A FLUSH that a fenced replica may run for itself (catch-up's last step). */
  private flushInternal(): Promise<void> {
    if (this.closed) return Promise.reject(new MirrorsanError('NBD_SHUTDOWN', `volume ${this.name} is closed`));
    const operationId = this.nextOperationId++;
    const done = this.track(operationId, false);
    this.runSource(this.source.flush(operationId));
    return done;
  }

  /** The target's 'rebase': the store drops the source's old stream and records the new start; held frames then go on. */
  private rebaseStream(peer: string, throughSequence: number): void {
    if (!this.pausedInbound.has(peer)) this.pausedInbound.set(peer, []);
    this.logger.info('catch-up: stream rebased past what this replica missed', { peer, throughSequence });
    this.store.rebaseSource(peer, throughSequence).then(
      () => {
        if (this.closed) return;
        const target = this.targets.get(peer)!;
        this.runTarget(peer, target.rebased(throughSequence));
        const held = this.pausedInbound.get(peer) ?? [];
        this.pausedInbound.delete(peer);
        for (const message of held) this.receive(peer, message);
      },
      (error: unknown) => this.fail(error, `rebase of ${peer}'s stream`),
    );
  }

  // ---- internals: failure ------------------------------------------------------------------

  /** The store failed: nothing more is accepted, and every pending operation fails (NBD_EIO). */
  private fail(error: unknown, what: string): void {
    if (this.closed) return;
    if (this.onDiskFailure) {
      this.detachDisk(error, what);
      return;
    }
    const failure = this.asIoError(error);
    if (!this.failure) {
      this.failure = failure;
      this.logger.error('replicated volume failed; it accepts no more writes', { what, code: failure.code, error: failure.message });
    }
    for (const operation of this.pending.values()) operation.reject(failure);
    this.pending.clear();
  }

  /**
   * Diskless mode (options.onDiskFailure): the store failed, so this node stops using it. Every
   * pending operation is refused with VOLUME_DISKLESS (none was acknowledged: the caller retries
   * them through an in-sync peer), as is every later one (checkUsable); the caller hears of it
   * once, as a later event (never inside an effect loop). Later store errors add nothing.
   */
  private detachDisk(error: unknown, what: string): void {
    if (this.diskFailure) {
      this.logger.debug('store error after the disk was detached', { what, error: error instanceof Error ? error.message : String(error) });
      return;
    }
    const message = error instanceof Error ? error.message : String(error);
    const cause = isMirrorsanError(error) ? error : new MirrorsanError('STORE_IO', `volume ${this.name}: ${message}`, { cause: error });
    this.diskFailure = cause;
    const failure = new MirrorsanError('VOLUME_DISKLESS', `volume ${this.name}: the disk of ${this.self} failed (${what}: ${cause.message})`, { cause });
    this.failure = failure;
    this.logger.error('disk failed: detaching it (diskless mode)', { what, code: cause.code, error: cause.message });
    this.catchUpDriver?.stop();
    for (const request of this.regionRequests.values()) {
      clearTimeout(request.timer);
      request.reject(failure);
    }
    this.regionRequests.clear();
    // Held behind a RELEASE: the grants they concern die with this node's membership.
    this.heldPolicing.length = 0;
    for (const operation of this.pending.values()) operation.reject(failure);
    this.pending.clear();
    const notify = this.onDiskFailure;
    queueMicrotask(() => notify?.(failure));
  }

  /** The last sequence this node's source assigned (sent to its peers, logged here or not). */
  get lastOwnSequence(): number {
    return this.source.lastSequence;
  }

  /** The store error that detached the disk (diskless mode), or undefined while it works. */
  get diskFailureError(): MirrorsanError | undefined {
    return this.diskFailure;
  }

  /**
   * Diskless mode, after the disk failed: asks every member to make this node's stream durable
   * (SYNC through its last sequence; the local log sync is skipped, the local copy no longer
   * counts), so that writes this node acknowledged while they were only in the members' memory
   * survive there before it leaves the in-sync set: a FLUSH forwarded afterwards covers them.
   * Resolves true once every member answered, false after `timeoutMs` or if the volume closed.
   */
  syncOwnStreamOnPeers(timeoutMs: number): Promise<boolean> {
    assert(this.diskFailure !== undefined, `volume ${this.name}: syncOwnStreamOnPeers is for a detached disk`);
    if (this.closed) return Promise.resolve(false);
    const operationId = this.nextOperationId++;
    const done = this.trackSequence(operationId);
    this.runSource(this.source.flush(operationId));
    return new Promise<boolean>((resolve) => {
      const timer = setTimeout(() => {
        this.pending.delete(operationId);
        resolve(false);
      }, timeoutMs);
      timer.unref?.();
      const finished = (ok: boolean): void => {
        clearTimeout(timer);
        resolve(ok);
      };
      // In async mode a flush completes before the members' SYNC_ACKs: wait for those too.
      done.then((sequence) => this.whenReplicated('syncAckedSeq', sequence ?? 0, () => finished(true)), () => finished(false));
    });
  }

  private asIoError(error: unknown): MirrorsanError {
    if (isMirrorsanError(error) && (error.code.startsWith('NBD_') || error.code === 'VOLUME_BUSY')) return error;
    const message = error instanceof Error ? error.message : String(error);
    return new MirrorsanError('NBD_EIO', `volume ${this.name}: ${message}`, { cause: error });
  }

  /**
   * Why a client write that waited for its grant may not run now that it has it: this node does
   * not serve (the checks of checkUsable, lease included), or stopped serving at some moment
   * since the write was submitted (see servingTerm). Undefined: it may run.
   */
  private staleAdmission(submittedTerm: number | undefined): string | undefined {
    try {
      this.checkUsable();
    } catch (error) {
      return error instanceof Error ? error.message : String(error);
    }
    if (submittedTerm !== this.servingTerm) {
      return `volume ${this.name}: not serving on this node: it stopped serving while this write waited for its grant (it may have been replayed elsewhere since)`;
    }
    return undefined;
  }

  private checkUsable(): void {
    if (this.closed) throw new MirrorsanError('NBD_SHUTDOWN', `volume ${this.name} is closed`);
    if (this.failure) throw this.failure;
    if (this.fence) throw new MirrorsanError('NBD_EIO', `volume ${this.name}: not serving on this node: ${this.fence}`);
    if (this.leavingToCatchUp) throw new MirrorsanError('NBD_EIO', `volume ${this.name}: not serving on this node: it restarted with unacknowledged writes and is leaving the in-sync set to catch up`);
    // Nothing may take a sequence number while the lost ones are voided (the log is being padded).
    if (this.skippingLostSequences) throw new MirrorsanError('NBD_EIO', `volume ${this.name}: not serving on this node: it is voiding sequence numbers its log lost in a crash`);
    if (this.mustLeaveReason) throw new MirrorsanError('NBD_EIO', `volume ${this.name}: not serving on this node: ${this.mustLeaveReason}`);
    const refusal = this.servingCheck?.();
    if (refusal) throw new MirrorsanError('NBD_EIO', `volume ${this.name}: not serving on this node: ${refusal}`);
  }
}
