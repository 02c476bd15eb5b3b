// The mirror engine's source side for one volume (docs/replication.md, "Write path"): this node
// orders its clients' writes and streams them to every other member of the in-sync set. A pure
// state machine: inputs are client operations, peer messages, link news, local I/O completions
// and ticks; outputs are effects the I/O shell performs in order. No sockets, files or clocks.
//
// Rules it enforces:
// - I1: a client write completes only once the local apply is done and every in-sync member
//   ACKed it (ACKs are cumulative); FLUSH and FUA complete only once the local log is synced
//   and every in-sync member answered SYNC_ACK at or above the operation's sequence. The wire
//   WRITE has no FUA flag (codec flags are reserved), so a FUA write is a WRITE followed by
//   SYNC(its sequence) on the same link.
// - Resend: entries stay in a bounded window until every in-sync member CHECKPOINT_ACKed them
//   (its image is durable through them). Not SYNC_ACK: a destination's container can rot (I5
//   makes replay cut it), and then the destination restarts below what it once synced; only
//   its checkpoint record is a floor it cannot fall under. After any link news about a peer the
//   source sends nothing more to it until the peer's next ACK tells where its stream stands
//   (the destination sends one on every linkUp), then resends from there. An older ACK still
//   in flight on the other direction of a half-closed connection may position it too low: the
//   destination re-ACKs and drops the duplicates. A destination that restarted reports less
//   than it acknowledged before; pending operations then wait for the resend.
// - Async mode: a write completes after the local apply, FLUSH/FUA after the local sync;
//   destinations still get every WRITE and SYNC, and admission waits while the slowest one
//   trails by asyncLagEntriesMax entries.
// - Epochs (I2): frames carry the epoch of setMembership; answers of an older epoch are
//   refused (the destination re-announces at the new one); SYNC/CHECKPOINT requests still
//   outstanding are sent again at a new epoch. A member leaving the in-sync set stops holding
//   back completions and the window.
// - Limits: client operations waiting for admission (FIFO, refused with VOLUME_BUSY beyond
//   the limit), writes in flight (count and bytes), the resend window (count and bytes), and in
//   async mode the lag of the slowest in-sync member.
// - Consistency points: CHECKPOINT(last sequence) on a timer, when the resend window passes
//   its soft threshold (or blocks admission), and on FLUSH; at most one outstanding at a time.
import { assert, type ErrorCode } from '../../errors.js';
import type { SequenceMessage, WireEntryType, WriteMessage } from '../codec.js';
import { ENTRY_TYPE } from '../../journal/entry.js';

export type ReplicationMode = 'sync' | 'async';

export interface SourceLimits {
  /** Client writes admitted and not yet completed. */
  readonly inFlightWritesMax: number;
  readonly inFlightBytesMax: number;
  /** Client operations (writes and flushes) waiting for admission; one more is refused (VOLUME_BUSY). */
  readonly queuedOperationsMax: number;
  /** Entries kept for resending (above every in-sync member's checkpoint); admission waits at the limit. */
  readonly retainedEntriesMax: number;
  readonly retainedBytesMax: number;
  /** A consistency point is requested once the window holds this many bytes (soft limit). */
  readonly checkpointRetainedBytes: number;
  /** A consistency point is requested at least this often while there are new entries (0: never on time). */
  readonly checkpointIntervalMs: number;
  /** Async mode: entries the slowest in-sync member may trail by before admission waits. */
  readonly asyncLagEntriesMax: number;
}

export const DEFAULT_SOURCE_LIMITS: Readonly<SourceLimits> = Object.freeze({
  inFlightWritesMax: 256,
  inFlightBytesMax: 64 * 1024 * 1024,
  queuedOperationsMax: 4096,
  retainedEntriesMax: 65_536,
  retainedBytesMax: 256 * 1024 * 1024,
  checkpointRetainedBytes: 128 * 1024 * 1024,
  checkpointIntervalMs: 5000,
  asyncLagEntriesMax: 16_384,
});

export interface SourceConfig {
  readonly volume: string;
  /** This node's id: the `source` of every entry this engine orders. */
  readonly self: string;
  readonly mode: ReplicationMode;
  readonly limits?: Partial<SourceLimits>;
  /** The last sequence this source ever assigned (from its local log at start). Default 0. */
  readonly lastSequence?: number;
  /** Deliberate mistakes, for proving that the simulation's checkers see them. Never in production. */
  readonly bug?: SourceBug;
}

export type SourceBug =
  | 'none'
  /** Completes a write once applied locally, without waiting for the ACKs (breaks I1). */
  | 'completeBeforeAcks'
  /** Completes FLUSH/FUA once synced locally, without waiting for SYNC_ACKs (breaks I1 across crashes). */
  | 'flushBeforeSyncAcks'
  /**
   * When this node starts catching up, lets the join floor complete the writes and flushes still
   * pending, as if every member had them: the behaviour before the fix (breaks I1).
   */
  | 'completePendingOnJoin'
  /** A catching-up source leaves a peer below its resend window stranded for ever (the behaviour before the fix: liveness). */
  | 'strandPeersWhileCatchingUp';

export interface ClientWrite {
  readonly operationId: number;
  readonly entryType: WireEntryType;
  readonly offset: number;
  /** WRITE: payload length; ZERO/TRIM: range length. At least 1. */
  readonly lengthBytes: number;
  /** The data for WRITE; empty for ZERO/TRIM. Kept (not copied) until the window drops it. */
  readonly payload: Buffer;
  /** Force unit access: durable on every in-sync member before completion. */
  readonly fua: boolean;
}

export interface SourceEntry {
  readonly sequence: number;
  readonly entryType: WireEntryType;
  readonly offset: number;
  readonly lengthBytes: number;
  readonly payload: Buffer;
  readonly fua: boolean;
}

export type OperationResult = { readonly ok: true } | { readonly ok: false; readonly code: ErrorCode; readonly message: string };

export type SourceMessage = WriteMessage | SequenceMessage<'SYNC'> | SequenceMessage<'CHECKPOINT'>;
export type SourceInboundMessage = SequenceMessage<'ACK'> | SequenceMessage<'SYNC_ACK'> | SequenceMessage<'CHECKPOINT_ACK'>;

export type SourceEffect =
  /** Append the entry to the local log and apply it to the image (in sequence order), then call localApplied(sequence). */
  | { readonly kind: 'appendLocal'; readonly entry: SourceEntry }
  /** Make the local log durable through `throughSequence` (after its appends), then call localSynced(throughSequence). */
  | { readonly kind: 'syncLocal'; readonly throughSequence: number }
  | { readonly kind: 'send'; readonly peer: string; readonly message: SourceMessage }
  /** The client operation is done; `sequence`: the write's entry, or the last entry a flush covers (none if refused). */
  | { readonly kind: 'complete'; readonly operationId: number; readonly sequence?: number; readonly result: OperationResult }
  /**
   * `peer` stands below the resend window (it lost more than it had made durable, or it
   * is new): live resending cannot bring it back; it needs the catch-up path (a later issue).
   */
  | { readonly kind: 'peerNeedsCatchUp'; readonly peer: string; readonly peerSequence: number; readonly retainedFromSequence: number }
  /**
   * `peer`'s first ACK since link news places this source's stream at `peerSequence`, beyond
   * `lastSequence`: entries this node sent were lost from its log (a crash). The shell must
   * void those numbers (skipTo) and reconcile what the entries wrote (a catch-up).
   */
  | { readonly kind: 'peerAhead'; readonly peer: string; readonly peerSequence: number; readonly lastSequence: number }
  /** A message was refused (stale epoch, or a sequence this source never sent): for the log. */
  | { readonly kind: 'refused'; readonly peer: string; readonly code: ErrorCode; readonly reason: string };

interface PeerState {
  /** The link this node -> peer is up, so sends can reach it. */
  linkUp: boolean;
  /** An ACK arrived since the last link news: nextToSend is where the peer's stream stands. */
  positioned: boolean;
  nextToSend: number;
  ackedSeq: number;
  syncAckedSeq: number;
  checkpointAckedSeq: number;
  /** Highest SYNC / CHECKPOINT sent since the peer was last positioned. */
  syncSentSeq: number;
  checkpointSentSeq: number;
  /** peerNeedsCatchUp was emitted for this position; nothing is sent until it is repositioned. */
  stranded: boolean;
  /**
   * A catching-up member: the last sequence before it joined. Below it, its stream position
   * is moved up to here (its catch-up copies what came before; its target rebases its stream).
   */
  joinFloor: number | undefined;
  /** The next WRITE is the first after a jump to the floor: it carries restartsStream. */
  restartPending: boolean;
}

interface PendingWrite {
  readonly operationId: number;
  readonly sequence: number;
  readonly fua: boolean;
  readonly bytes: number;
  localDone: boolean;
  /** Set when it can no longer succeed (see failUnreplicated): it completes with this once applied locally. */
  failure: OperationResult | undefined;
}

type QueuedOperation = { readonly kind: 'write'; readonly write: ClientWrite } | { readonly kind: 'flush'; readonly operationId: number };

function entryBytes(entry: { entryType: WireEntryType; payload: Buffer }): number {
  // ZERO/TRIM carry no payload but still cost a frame: count a nominal 64 bytes each.
  return entry.entryType === ENTRY_TYPE.WRITE ? entry.payload.length : 64;
}

export function resolveSourceLimits(partial: Partial<SourceLimits> = {}): Readonly<SourceLimits> {
  const limits = { ...DEFAULT_SOURCE_LIMITS, ...partial };
  for (const [key, value] of Object.entries(limits)) {
    const zeroAllowed = key === 'checkpointIntervalMs';
    assert(Number.isSafeInteger(value) && value >= (zeroAllowed ? 0 : 1), `source limit ${key} must be a ${zeroAllowed ? 'non-negative' : 'positive'} integer, got ${value}`);
  }
  assert(limits.checkpointRetainedBytes <= limits.retainedBytesMax, 'checkpointRetainedBytes must not exceed retainedBytesMax');
  return Object.freeze(limits);
}

export class ReplicationSource {
  readonly volume: string;
  readonly self: string;
  readonly mode: ReplicationMode;
  readonly limits: Readonly<SourceLimits>;
  private readonly bug: SourceBug;
  private epochValue = 0;
  private readonly peers = new Map<string, PeerState>();
  /** Which peers' links (this node -> peer) are up, members or not. */
  private readonly linksUp = new Set<string>();
  private lastSeq: number;
  /** Resend window: retained[retainedHead + i] holds sequence retainedFromSequence + i; slots before the head are cleared. */
  private retained: (SourceEntry | undefined)[] = [];
  private retainedHead = 0;
  private retainedBytes = 0;
  private readonly pendingWrites = new Map<number, PendingWrite>();
  private inFlightBytes = 0;
  private readonly pendingFlushes: Array<{ operationId: number; sequence: number }> = [];
  private readonly queue: QueuedOperation[] = [];
  private localSyncedSeq: number;
  private localSyncRequestedSeq: number;
  private syncRequestedSeq = 0;
  private checkpointRequestedSeq = 0;
  private nowMs = 0;
  private lastCheckpointRequestMs = 0;
  /** This node is in its own record's catchingUp set (as of the last setMembership). */
  private selfCatchingUp = false;
  /** The other replicas catching up (as of the last setMembership). */
  private catchingUpPeers = new Set<string>();

  constructor(config: SourceConfig) {
    assert(config.volume.length > 0 && config.self.length > 0, 'a source needs a volume and a node id');
    this.volume = config.volume;
    this.self = config.self;
    this.mode = config.mode;
    this.limits = resolveSourceLimits(config.limits);
    this.bug = config.bug ?? 'none';
    this.lastSeq = config.lastSequence ?? 0;
    assert(Number.isSafeInteger(this.lastSeq) && this.lastSeq >= 0, 'lastSequence must be a non-negative integer');
    // Everything the local log held at start is durable there (recovered from disk).
    this.localSyncedSeq = this.lastSeq;
    this.localSyncRequestedSeq = this.lastSeq;
    this.checkpointRequestedSeq = this.lastSeq;
  }

  // ---- inputs ---------------------------------------------------------------------------

  /**
   * The coordinator's record for this volume: `inSync` may include this node (ignored).
   * `catchingUp`: replicas copying what they missed; they get (and acknowledge) every entry
   * from now on like members, and entries before their joining are never resent to them.
   */
  setMembership(epoch: number, inSync: readonly string[], catchingUp: readonly string[] = []): SourceEffect[] {
    assert(Number.isSafeInteger(epoch) && epoch >= this.epochValue, `epoch ${epoch} goes back from ${this.epochValue}`);
    if (epoch !== this.epochValue) {
      // Outstanding SYNC/CHECKPOINT requests went out at the old epoch and may be refused:
      // ask again at the new one.
      for (const state of this.peers.values()) {
        state.syncSentSeq = 0;
        state.checkpointSentSeq = 0;
      }
    }
    this.epochValue = epoch;
    const joining = new Set(catchingUp.filter((node) => node !== this.self));
    // This node itself catching up: what it wrote before (never acknowledged to a client in
    // sync mode, and overwritten by its catch-up) is not owed to anyone: every peer's stream
    // of ours starts at our floor too.
    const selfJoining = catchingUp.includes(this.self);
    const members = new Set([...inSync.filter((node) => node !== this.self), ...joining]);
    for (const peer of [...this.peers.keys()]) if (!members.has(peer)) this.peers.delete(peer);
    // This node starts catching up now. What it still waits for was not shown to reach every
    // member (else it would have completed), and its catch-up overwrites it: it fails, instead
    // of completing once the floor below covers it. And the floor moves up for every member,
    // also one that joined earlier at a lower floor: an entry from before this node left, resent
    // now, could land on that member after a newer epoch's write to the same blocks (I4). Both
    // found by src/testing/failure-simulation.ts.
    const selfJoinsNow = selfJoining && !this.selfCatchingUp && this.bug !== 'completePendingOnJoin';
    const effects: SourceEffect[] = selfJoinsNow ? this.failUnreplicated() : [];
    this.selfCatchingUp = selfJoining;
    for (const [peer, state] of this.peers) {
      // A member that moves from the in-sync set to catching up (it left to catch up after a
      // restart) starts at a floor like a new one: its target may report a position from before
      // its restart, below what this source still holds, and its catch-up copies what it lacks.
      const entersCatchUp = joining.has(peer) && !this.catchingUpPeers.has(peer);
      if (!selfJoinsNow && !entersCatchUp && !(selfJoining && state.joinFloor === undefined)) continue;
      state.joinFloor = this.lastSeq;
      state.ackedSeq = Math.max(state.ackedSeq, this.lastSeq);
      state.syncAckedSeq = Math.max(state.syncAckedSeq, this.lastSeq);
      state.checkpointAckedSeq = Math.max(state.checkpointAckedSeq, this.lastSeq);
      // Its next ACK (peers re-announce at every epoch change and link-up) positions it at the floor.
      this.unposition(state);
    }
    for (const peer of members) {
      if (this.peers.has(peer)) continue;
      // A new member's position is unknown until it ACKs (it does on every linkUp). A joining
      // one owes nothing up to its floor: writes in flight now do not wait for it.
      const floored = joining.has(peer) || selfJoining;
      const owed = floored ? this.lastSeq : 0;
      this.peers.set(peer, {
        linkUp: this.linksUp.has(peer),
        positioned: false,
        nextToSend: this.lastSeq + 1,
        ackedSeq: owed,
        syncAckedSeq: owed,
        checkpointAckedSeq: owed,
        syncSentSeq: 0,
        checkpointSentSeq: 0,
        stranded: false,
        joinFloor: floored ? this.lastSeq : undefined,
        restartPending: false,
      });
    }
    this.catchingUpPeers = joining;
    // A member that left no longer holds back completions or the window.
    effects.push(...this.progress());
    return effects;
  }

  /**
   * Marks every pending write that some member has not acknowledged (or, FUA, not synced) as
   * failed, and fails at once the flushes not yet synced by every member and every operation
   * still queued: admitted under the grants of an epoch this node has left, it would be sent
   * after its floor as a new entry and land after newer writes (found by the simulation).
   */
  private failUnreplicated(): SourceEffect[] {
    const acked = this.minPeer('ackedSeq');
    const syncAcked = this.minPeer('syncAckedSeq');
    const failure: OperationResult = { ok: false, code: 'NBD_EIO', message: `volume ${this.volume}: ${this.self} left the in-sync set before every member had this; its catch-up overwrites it` };
    for (const pending of this.pendingWrites.values()) {
      if (pending.sequence > acked || (pending.fua && pending.sequence > syncAcked)) pending.failure = failure;
    }
    const effects: SourceEffect[] = [];
    // Flushes are in sequence order: the unsynced ones are a tail.
    let kept = this.pendingFlushes.length;
    while (kept > 0 && this.pendingFlushes[kept - 1]!.sequence > syncAcked) kept--;
    for (const flush of this.pendingFlushes.splice(kept)) effects.push({ kind: 'complete', operationId: flush.operationId, result: failure });
    for (const queued of this.queue.splice(0)) effects.push({ kind: 'complete', operationId: queued.kind === 'write' ? queued.write.operationId : queued.operationId, result: failure });
    return effects;
  }

  /**
   * Voids the sequences up to `sequence` (peerAhead): the local log has been padded to it and
   * synced. Every pending operation fails (none was acknowledged, and members may hold other
   * entries under their numbers), the resend window empties, and every member's stream
   * restarts at this floor (a member below it rebases on the next WRITE).
   */
  skipTo(sequence: number): SourceEffect[] {
    assert(Number.isSafeInteger(sequence) && sequence > this.lastSeq, `skipTo(${sequence}) is not beyond the last sequence ${this.lastSeq}`);
    const failure: OperationResult = { ok: false, code: 'NBD_EIO', message: `volume ${this.volume}: ${this.self} lost entries its peers hold (a crash); its writes since are void and it catches up` };
    for (const pending of this.pendingWrites.values()) pending.failure = failure;
    const effects: SourceEffect[] = this.pendingFlushes.splice(0).map((flush) => ({ kind: 'complete', operationId: flush.operationId, result: failure }) as const);
    this.lastSeq = sequence;
    this.retained = [];
    this.retainedHead = 0;
    this.retainedBytes = 0;
    this.localSyncedSeq = Math.max(this.localSyncedSeq, sequence);
    this.localSyncRequestedSeq = Math.max(this.localSyncRequestedSeq, sequence);
    for (const state of this.peers.values()) {
      state.joinFloor = sequence;
      state.ackedSeq = sequence;
      state.syncAckedSeq = sequence;
      state.checkpointAckedSeq = sequence;
      this.unposition(state);
    }
    effects.push(...this.progress());
    return effects;
  }

  write(write: ClientWrite): SourceEffect[] {
    assert(Number.isSafeInteger(write.offset) && write.offset >= 0, 'write offset must be a non-negative integer');
    assert(Number.isSafeInteger(write.lengthBytes) && write.lengthBytes >= 1, 'write length must be positive');
    assert(write.entryType === ENTRY_TYPE.WRITE ? write.payload.length === write.lengthBytes : write.payload.length === 0, 'payload does not fit the entry type');
    return this.enqueue({ kind: 'write', write });
  }

  /** FLUSH: completes once everything written before it is durable on every in-sync member. */
  flush(operationId: number): SourceEffect[] {
    return this.enqueue({ kind: 'flush', operationId });
  }

  localApplied(sequence: number): SourceEffect[] {
    const pending = this.pendingWrites.get(sequence);
    if (pending === undefined || pending.localDone) assert(false, `localApplied(${sequence}) for no pending write`);
    pending.localDone = true;
    return this.progress();
  }

  localSynced(throughSequence: number): SourceEffect[] {
    if (throughSequence > this.localSyncRequestedSeq) assert(false, `localSynced(${throughSequence}) beyond what was requested (${this.localSyncRequestedSeq})`);
    this.localSyncedSeq = Math.max(this.localSyncedSeq, throughSequence);
    return this.progress();
  }

  receive(peer: string, message: SourceInboundMessage): SourceEffect[] {
    const state = this.peers.get(peer);
    if (message.volume !== this.volume || message.source !== this.self) {
      return [{ kind: 'refused', peer, code: 'REPL_BAD_FRAME', reason: `${message.type} for ${message.volume}/${message.source} reached the source of ${this.volume}/${this.self}` }];
    }
    if (message.epoch < this.epochValue) {
      // [I2] never counted: an acknowledgement from an older configuration proves nothing now.
      return [{ kind: 'refused', peer, code: 'REPL_EPOCH_STALE', reason: `${message.type}(${message.sequence}) at epoch ${message.epoch} < ${this.epochValue}` }];
    }
    if (state === undefined) return []; // not (or no longer) a member: its word does not count
    if (message.sequence > this.lastSeq) {
      // A peer placing our stream beyond our log holds entries this node sent and then lost
      // (a crash between the send and the local append: both go out in parallel). Those numbers
      // must never be given to other entries: the shell skips past them (skipTo).
      if (message.type === 'ACK' && !state.positioned) return [{ kind: 'peerAhead', peer, peerSequence: message.sequence, lastSequence: this.lastSeq }];
      return [{ kind: 'refused', peer, code: 'REPL_BAD_FRAME', reason: `${message.type}(${message.sequence}) beyond the last sequence ${this.lastSeq}` }];
    }
    const effects: SourceEffect[] = [];
    switch (message.type) {
      case 'ACK':
        if (!state.positioned) this.position(peer, state, message.sequence, effects);
        else state.ackedSeq = Math.max(state.ackedSeq, message.sequence);
        break;
      case 'SYNC_ACK':
        state.syncAckedSeq = Math.max(state.syncAckedSeq, message.sequence);
        state.ackedSeq = Math.max(state.ackedSeq, message.sequence);
        break;
      case 'CHECKPOINT_ACK':
        state.checkpointAckedSeq = Math.max(state.checkpointAckedSeq, message.sequence);
        state.syncAckedSeq = Math.max(state.syncAckedSeq, message.sequence);
        state.ackedSeq = Math.max(state.ackedSeq, message.sequence);
        break;
    }
    effects.push(...this.progress());
    return effects;
  }

  /** The link between this node and `peer` (direction given by `outbound`) is up. */
  linkUp(peer: string, outbound: boolean): SourceEffect[] {
    if (outbound) this.linksUp.add(peer);
    const state = this.peers.get(peer);
    if (state === undefined) return [];
    if (outbound) state.linkUp = true;
    // Whatever came back, wait for the peer's ACK (sent on its linkUp) before sending more.
    this.unposition(state);
    return [];
  }

  linkDown(peer: string, outbound: boolean): SourceEffect[] {
    if (outbound) this.linksUp.delete(peer);
    const state = this.peers.get(peer);
    if (state === undefined) return [];
    if (outbound) state.linkUp = false;
    // Frames in flight either way are lost: the stream position must be learned again.
    this.unposition(state);
    return [];
  }

  tick(nowMs: number): SourceEffect[] {
    assert(Number.isFinite(nowMs) && nowMs >= this.nowMs, 'time goes forward');
    this.nowMs = nowMs;
    const interval = this.limits.checkpointIntervalMs;
    const effects: SourceEffect[] = [];
    if (interval > 0 && nowMs - this.lastCheckpointRequestMs >= interval && this.lastSeq > this.checkpointRequestedSeq) {
      this.requestCheckpoint();
    }
    effects.push(...this.progress());
    return effects;
  }

  // ---- inspection -----------------------------------------------------------------------

  get epoch(): number {
    return this.epochValue;
  }
  get lastSequence(): number {
    return this.lastSeq;
  }
  get retainedFromSequence(): number {
    return this.lastSeq - this.retainedCount + 1;
  }
  get retainedCount(): number {
    return this.retained.length - this.retainedHead;
  }
  get pendingOperations(): number {
    return this.pendingWrites.size + this.pendingFlushes.length + this.queue.length;
  }
  get members(): string[] {
    return [...this.peers.keys()];
  }
  /** Where the entries of the resend window wrote: what a member may still lack of this source. */
  *retainedExtents(): IterableIterator<{ offset: number; lengthBytes: number }> {
    for (let index = this.retainedHead; index < this.retained.length; index++) {
      const entry = this.retained[index];
      if (entry !== undefined) yield { offset: entry.offset, lengthBytes: entry.lengthBytes };
    }
  }
  /** What this source knows of `peer` (tests, metrics). */
  peer(peer: string): Readonly<{ positioned: boolean; linkUp: boolean; ackedSeq: number; syncAckedSeq: number; checkpointAckedSeq: number; nextToSend: number }> | undefined {
    const state = this.peers.get(peer);
    return state === undefined ? undefined : { ...state };
  }

  // ---- internals ------------------------------------------------------------------------

  private enqueue(operation: QueuedOperation): SourceEffect[] {
    const operationId = operation.kind === 'write' ? operation.write.operationId : operation.operationId;
    if (this.queue.length >= this.limits.queuedOperationsMax) {
      return [{ kind: 'complete', operationId, result: { ok: false, code: 'VOLUME_BUSY', message: `${this.queue.length} operations already wait on volume ${this.volume}` } }];
    }
    this.queue.push(operation);
    return this.progress();
  }

  private unposition(state: PeerState): void {
    state.positioned = false;
    state.stranded = false;
    state.syncSentSeq = 0;
    state.checkpointSentSeq = 0;
  }

  /** The peer's first ACK since the last link news: its stream stands at `sequence`. */
  private position(peer: string, state: PeerState, reported: number, effects: SourceEffect[]): void {
    state.positioned = true;
    // A joining member starts at its floor: what came before is its catch-up's to copy.
    const sequence = state.joinFloor !== undefined && reported < state.joinFloor ? state.joinFloor : reported;
    state.restartPending = sequence !== reported;
    // It may have restarted below what it acknowledged before (memory lost): those
    // acknowledgements no longer hold, pending operations wait for the resend.
    state.ackedSeq = sequence;
    if (sequence !== reported) {
      // Nothing up to the floor is the joining member's to acknowledge, sync or checkpoint.
      state.syncAckedSeq = sequence;
      state.checkpointAckedSeq = sequence;
    } else {
      state.syncAckedSeq = Math.min(state.syncAckedSeq, sequence);
      // Below its own checkpoint: its checkpoint record is gone too (a replaced disk, say).
      state.checkpointAckedSeq = Math.min(state.checkpointAckedSeq, sequence);
    }
    state.nextToSend = sequence + 1;
    const from = this.retainedFromSequence;
    if (state.nextToSend < from && this.selfCatchingUp && this.bug !== 'strandPeersWhileCatchingUp') {
      // The peer lost entries it had checkpointed (a replaced disk). This node is catching up:
      // its stream since it joined holds only its catch-up copies, which no peer needs (an
      // in-sync peer is the truth they came from; a catching-up one copies from the truth), so
      // the peer's stream moves to this source's last sequence instead of staying stranded for
      // ever; what the peer had not acknowledged fails (found by the failure simulation).
      state.joinFloor = this.lastSeq;
      state.ackedSeq = this.lastSeq;
      state.syncAckedSeq = this.lastSeq;
      state.checkpointAckedSeq = this.lastSeq;
      state.nextToSend = this.lastSeq + 1;
      state.restartPending = true;
      const failure: OperationResult = { ok: false, code: 'NBD_EIO', message: `volume ${this.volume}: ${peer} lost this catching-up node's entries after ${sequence}` };
      for (const pending of this.pendingWrites.values()) if (pending.sequence > sequence) pending.failure = failure;
      let kept = this.pendingFlushes.length;
      while (kept > 0 && this.pendingFlushes[kept - 1]!.sequence > sequence) kept--;
      for (const flush of this.pendingFlushes.splice(kept)) effects.push({ kind: 'complete', operationId: flush.operationId, result: failure });
      return;
    }
    if (state.nextToSend < from) {
      state.stranded = true;
      effects.push({ kind: 'peerNeedsCatchUp', peer, peerSequence: sequence, retainedFromSequence: from });
    }
  }

  private entryAt(sequence: number): SourceEntry {
    const entry = this.retained[this.retainedHead + sequence - this.retainedFromSequence];
    // The message is built only on failure: this runs for every frame sent.
    if (entry === undefined || entry.sequence !== sequence) assert(false, `entry ${sequence} is not in the resend window`);
    return entry;
  }

  /**
   * The lowest `field` over the members (the last sequence when there is none): what every
   * member has acknowledged, synced or checkpointed. O(members), no copies (a per-write path).
   */
  memberWatermark(field: 'ackedSeq' | 'syncAckedSeq' | 'checkpointAckedSeq'): number {
    return this.minPeer(field);
  }

  private minPeer(field: 'ackedSeq' | 'syncAckedSeq' | 'checkpointAckedSeq'): number {
    let min = this.lastSeq;
    for (const state of this.peers.values()) min = Math.min(min, state[field]);
    return min;
  }

  private requestCheckpoint(): void {
    this.checkpointRequestedSeq = this.lastSeq;
    this.lastCheckpointRequestMs = this.nowMs;
  }

  private checkpointOutstanding(): boolean {
    return this.checkpointRequestedSeq > this.minPeer('checkpointAckedSeq');
  }

  private requestSync(sequence: number, effects: SourceEffect[]): void {
    if (sequence > this.localSyncRequestedSeq) {
      this.localSyncRequestedSeq = sequence;
      effects.push({ kind: 'syncLocal', throughSequence: sequence });
    }
    this.syncRequestedSeq = Math.max(this.syncRequestedSeq, sequence);
  }

  private canAdmit(write: ClientWrite): boolean {
    const bytes = entryBytes(write);
    const limits = this.limits;
    if (this.pendingWrites.size >= limits.inFlightWritesMax) return false;
    if (this.pendingWrites.size > 0 && this.inFlightBytes + bytes > limits.inFlightBytesMax) return false;
    if (!this.windowHasRoom(bytes)) return false;
    if (this.mode === 'async' && this.lastSeq - this.minPeer('ackedSeq') >= limits.asyncLagEntriesMax) return false;
    return true;
  }

  private windowHasRoom(bytes: number): boolean {
    if (this.retainedCount >= this.limits.retainedEntriesMax) return false;
    return this.retainedCount === 0 || this.retainedBytes + bytes <= this.limits.retainedBytesMax;
  }

  /** Admits queued operations, sends, completes and trims as far as the state allows. */
  private progress(): SourceEffect[] {
    const effects: SourceEffect[] = [];
    this.trimWindow();
    this.admit(effects);
    // The window blocks admission or passed its soft limits: a consistency point frees it.
    const head = this.queue[0];
    const windowBlocks = head !== undefined && head.kind === 'write' && !this.windowHasRoom(entryBytes(head.write));
    const windowPressed = this.retainedBytes >= this.limits.checkpointRetainedBytes || this.retainedCount * 2 >= this.limits.retainedEntriesMax;
    if ((windowBlocks || windowPressed) && !this.checkpointOutstanding() && this.lastSeq > this.checkpointRequestedSeq) {
      this.requestCheckpoint();
    }
    for (const [peer, state] of this.peers) this.pump(peer, state, effects);
    this.complete(effects);
    // Completions may free room for more: admit again (bounded: each pass admits or stops).
    if (this.queue.length > 0 && effects.some((effect) => effect.kind === 'complete')) {
      const before = this.queue.length;
      this.admit(effects);
      if (this.queue.length !== before) {
        for (const [peer, state] of this.peers) this.pump(peer, state, effects);
        this.complete(effects);
      }
    }
    return effects;
  }

  private admit(effects: SourceEffect[]): void {
    while (this.queue.length > 0) {
      const head = this.queue[0]!;
      if (head.kind === 'flush') {
        this.queue.shift();
        // Covers every write admitted before it (FIFO admission keeps "before" exact).
        const sequence = this.lastSeq;
        this.pendingFlushes.push({ operationId: head.operationId, sequence });
        this.requestSync(sequence, effects);
        if (!this.checkpointOutstanding() && this.lastSeq > this.checkpointRequestedSeq) this.requestCheckpoint();
        continue;
      }
      if (!this.canAdmit(head.write)) return;
      this.queue.shift();
      const write = head.write;
      const entry: SourceEntry = {
        sequence: ++this.lastSeq,
        entryType: write.entryType,
        offset: write.offset,
        lengthBytes: write.lengthBytes,
        payload: write.payload,
        fua: write.fua,
      };
      const bytes = entryBytes(entry);
      this.retained.push(entry);
      this.retainedBytes += bytes;
      this.pendingWrites.set(entry.sequence, { operationId: write.operationId, sequence: entry.sequence, fua: entry.fua, bytes, localDone: false, failure: undefined });
      this.inFlightBytes += bytes;
      effects.push({ kind: 'appendLocal', entry });
      if (entry.fua) this.requestSync(entry.sequence, effects);
    }
  }

  private pump(peer: string, state: PeerState, effects: SourceEffect[]): void {
    if (!state.linkUp || !state.positioned || state.stranded) return;
    if (state.nextToSend < this.retainedFromSequence) {
      // Never expected (the window keeps what every member has not checkpointed), but if it
      // happens the peer needs catch-up, not a frame this source no longer has.
      state.stranded = true;
      effects.push({ kind: 'peerNeedsCatchUp', peer, peerSequence: state.nextToSend - 1, retainedFromSequence: this.retainedFromSequence });
      return;
    }
    const epoch = this.epochValue;
    while (state.nextToSend <= this.lastSeq) {
      const entry = this.entryAt(state.nextToSend);
      const message: WriteMessage = {
        type: 'WRITE',
        volume: this.volume,
        epoch,
        source: this.self,
        sequence: entry.sequence,
        entryType: entry.entryType,
        offset: entry.offset,
        lengthBytes: entry.lengthBytes,
        payload: entry.payload,
      };
      if (state.restartPending) {
        message.restartsStream = true;
        state.restartPending = false;
      }
      effects.push({ kind: 'send', peer, message });
      state.nextToSend++;
    }
    // Control frames go after the writes they cover, on the same FIFO link.
    const sync = Math.min(this.syncRequestedSeq, state.nextToSend - 1);
    if (sync > state.syncAckedSeq && sync > state.syncSentSeq) {
      state.syncSentSeq = sync;
      effects.push({ kind: 'send', peer, message: { type: 'SYNC', volume: this.volume, epoch, source: this.self, sequence: sync } });
    }
    const checkpoint = Math.min(this.checkpointRequestedSeq, state.nextToSend - 1);
    if (checkpoint > state.checkpointAckedSeq && checkpoint > state.checkpointSentSeq) {
      state.checkpointSentSeq = checkpoint;
      effects.push({ kind: 'send', peer, message: { type: 'CHECKPOINT', volume: this.volume, epoch, source: this.self, sequence: checkpoint } });
    }
  }

  private complete(effects: SourceEffect[]): void {
    const sync = this.mode === 'sync';
    const acked = sync && this.bug !== 'completeBeforeAcks' ? this.minPeer('ackedSeq') : this.lastSeq;
    const syncAcked = sync && this.bug !== 'flushBeforeSyncAcks' && this.bug !== 'completeBeforeAcks' ? this.minPeer('syncAckedSeq') : this.lastSeq;
    for (const pending of this.pendingWrites.values()) {
      if (pending.localDone && pending.failure !== undefined) {
        this.pendingWrites.delete(pending.sequence);
        this.inFlightBytes -= pending.bytes;
        effects.push({ kind: 'complete', operationId: pending.operationId, result: pending.failure });
        continue;
      }
      if (!pending.localDone || pending.sequence > acked) continue;
      if (pending.fua && (pending.sequence > this.localSyncedSeq || pending.sequence > syncAcked)) continue;
      this.pendingWrites.delete(pending.sequence);
      this.inFlightBytes -= pending.bytes;
      effects.push({ kind: 'complete', operationId: pending.operationId, sequence: pending.sequence, result: { ok: true } });
    }
    // Flushes complete in order (each covers a prefix of the sequence).
    while (this.pendingFlushes.length > 0) {
      const flush = this.pendingFlushes[0]!;
      if (flush.sequence > this.localSyncedSeq || flush.sequence > syncAcked) break;
      this.pendingFlushes.shift();
      effects.push({ kind: 'complete', operationId: flush.operationId, sequence: flush.sequence, result: { ok: true } });
    }
  }

  /** Drops entries every in-sync member has checkpointed (its image is durable through them). */
  private trimWindow(): void {
    const floor = this.minPeer('checkpointAckedSeq');
    while (this.retainedCount > 0) {
      const oldest = this.retained[this.retainedHead]!;
      if (oldest.sequence > floor) break;
      this.retained[this.retainedHead] = undefined; // let the payload go
      this.retainedHead++;
      this.retainedBytes -= entryBytes(oldest);
    }
    if (this.retainedHead > 1024 && this.retainedHead * 2 > this.retained.length) {
      this.retained = this.retained.slice(this.retainedHead);
      this.retainedHead = 0;
    }
  }
}
