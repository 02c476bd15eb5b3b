// The mirror engine's destination side for one (volume, source) stream (docs/replication.md,
// "Write path" and "Ordering and replay"). A pure state machine: inputs are the source's
// frames, link news and the shell's I/O completions; outputs are effects the shell performs
// in order (apply before a later checkpoint, appends before a later sync).
//
// Rules it enforces:
// - Order: a WRITE is accepted only with sequence == expected. Below: a duplicate (a resend
//   after reconnect), re-ACKed and never applied again. Above: a gap, refused with
//   `resyncNeeded` so the shell closes the link; the source resends after the next linkUp.
// - Ack on receipt (§1 B4): an accepted entry goes into the source's memory partition and is
//   applied to the image and ACKed at once.
// - The partition is bounded: it spills to the source's container when full, on SYNC, and
//   SYNC_ACK(s) leaves only once the shell reported the container durable through s. FUA
//   travels as WRITE + SYNC (the WRITE frame has no FUA flag).
// - CHECKPOINT(s): the shell makes the image durable through s, records the checkpoint and
//   drops the container through s; CHECKPOINT_ACK(s) leaves after that completes, and the
//   partition's entries through s are dropped unspilled (the durable image holds them).
// - I2: frames of an older epoch are refused, never applied, and the link is reset.
// - On every linkUp the target ACKs expected - 1: that is how a source learns where to
//   resume after a reconnect or after this node restarted from its durable state.
import { assert, type ErrorCode } from '../../errors.js';
import { ENTRY_TYPE } from '../../journal/entry.js';
import type { SequenceMessage, WireEntryType, WriteMessage } from '../codec.js';
import { PayloadCopier } from '../../util/payload-copy.js';

export interface TargetLimits {
  /** Entries held in the source's memory partition before it spills. */
  readonly partitionEntriesMax: number;
  readonly partitionBytesMax: number;
  /** SYNC requests waiting for durability; more means the source ignores its own flow control. */
  readonly pendingSyncsMax: number;
}

export const DEFAULT_TARGET_LIMITS: Readonly<TargetLimits> = Object.freeze({
  partitionEntriesMax: 4096,
  partitionBytesMax: 32 * 1024 * 1024,
  pendingSyncsMax: 4096,
});

export interface TargetConfig {
  readonly volume: string;
  /** This node's id. */
  readonly self: string;
  /** The source whose stream this target receives. */
  readonly source: string;
  readonly epoch: number;
  readonly limits?: Partial<TargetLimits>;
}

/** What this node holds of the stream durably, from replay at start. */
export interface TargetRecovered {
  /** The last sequence of the source's stream in the container (or checkpoint), consecutive from 1. */
  readonly durableSequence: number;
  /** The last checkpoint recorded for this source. */
  readonly checkpointSequence: number;
}

export interface TargetEntry {
  readonly source: string;
  readonly sequence: number;
  readonly entryType: WireEntryType;
  readonly offset: number;
  readonly lengthBytes: number;
  readonly payload: Buffer;
}

export type TargetInboundMessage = WriteMessage | SequenceMessage<'SYNC'> | SequenceMessage<'CHECKPOINT'>;
export type TargetMessage = SequenceMessage<'ACK'> | SequenceMessage<'SYNC_ACK'> | SequenceMessage<'CHECKPOINT_ACK'>;

export type TargetEffect =
  /** Apply the entry to the image, in effect order (overlapping entries keep it). */
  | { readonly kind: 'apply'; readonly entry: TargetEntry }
  /**
   * Append `entries` (consecutive, possibly none) to the source's container; with `sync`, then
   * make the container durable through `throughSequence` and call containerSynced(throughSequence).
   */
  | { readonly kind: 'appendToContainer'; readonly source: string; readonly entries: readonly TargetEntry[]; readonly sync: boolean; readonly throughSequence: number }
  /**
   * After every earlier apply: make the image durable, record checkpoint `sequence` for the
   * source, drop the container through it, then call checkpointDone(sequence).
   */
  | { readonly kind: 'checkpoint'; readonly source: string; readonly sequence: number }
  | { readonly kind: 'send'; readonly message: TargetMessage }
  /** The stream has a gap: close the link (the source resends from our ACK after linkUp). */
  | { readonly kind: 'resyncNeeded'; readonly reason: string }
  /**
   * Catch-up: the source's stream resumes after `throughSequence` (the frame says so), past a gap
   * this replica's catch-up covers. Drop the source's partition and container, record the
   * stream as starting there (durably), then call rebased(throughSequence) and hand this
   * target the frame again. Nothing of the frame was taken.
   */
  | { readonly kind: 'rebase'; readonly throughSequence: number }
  /** A frame was refused and ignored (stale epoch, wrong stream): for the log. */
  | { readonly kind: 'refused'; readonly code: ErrorCode; readonly reason: string };

function entryBytes(entry: TargetEntry): number {
  return entry.entryType === ENTRY_TYPE.WRITE ? entry.payload.length : 64;
}

export function resolveTargetLimits(partial: Partial<TargetLimits> = {}): Readonly<TargetLimits> {
  const limits = { ...DEFAULT_TARGET_LIMITS, ...partial };
  for (const [key, value] of Object.entries(limits)) assert(Number.isSafeInteger(value) && value >= 1, `target limit ${key} must be a positive integer, got ${value}`);
  return Object.freeze(limits);
}

export class ReplicationTarget {
  readonly volume: string;
  readonly self: string;
  readonly source: string;
  readonly limits: Readonly<TargetLimits>;
  private epochValue: number;
  private expected: number;
  private partition: TargetEntry[] = [];
  private partitionBytes = 0;
  /** Handed to the shell for the container (or covered by a checkpoint). */
  private spilledSeq: number;
  /** The container (or the checkpointed image) is durable through this. */
  private durableSeq: number;
  private checkpointSeq: number;
  private checkpointRequestedSeq: number;
  /** SYNC sequences waiting for durability, ascending. */
  private pendingSyncs: number[] = [];
  /** Owned copies of payloads that arrived as views of socket chunks (dropped at spill, in order). */
  private readonly payloads = new PayloadCopier();

  constructor(config: TargetConfig, recovered: TargetRecovered) {
    assert(config.source !== config.self, 'a node is not the destination of its own stream');
    assert(Number.isSafeInteger(recovered.durableSequence) && recovered.durableSequence >= recovered.checkpointSequence && recovered.checkpointSequence >= 0, 'recovered sequences are inconsistent');
    this.volume = config.volume;
    this.self = config.self;
    this.source = config.source;
    this.limits = resolveTargetLimits(config.limits);
    this.epochValue = config.epoch;
    this.expected = recovered.durableSequence + 1;
    this.spilledSeq = recovered.durableSequence;
    this.durableSeq = recovered.durableSequence;
    this.checkpointSeq = recovered.checkpointSequence;
    this.checkpointRequestedSeq = recovered.checkpointSequence;
  }

  // ---- inputs ---------------------------------------------------------------------------

  /**
   * This node learned a newer configuration from the coordinator. Answers it sent at the old
   * epoch are refused by a source that moved first, so it re-announces its position, durable
   * point and checkpoint at the new one (all cumulative: repeating them is harmless).
   */
  setEpoch(epoch: number): TargetEffect[] {
    assert(epoch >= this.epochValue, `epoch ${epoch} goes back from ${this.epochValue}`);
    if (epoch === this.epochValue) return [];
    this.epochValue = epoch;
    return [this.ack('ACK', this.expected - 1), this.ack('SYNC_ACK', this.durableSeq), this.ack('CHECKPOINT_ACK', this.checkpointSeq)];
  }

  receive(message: TargetInboundMessage): TargetEffect[] {
    if (message.volume !== this.volume || message.source !== this.source) {
      return [{ kind: 'refused', code: 'REPL_BAD_FRAME', reason: `${message.type} for ${message.volume}/${message.source} reached the target of ${this.volume}/${this.source}` }];
    }
    if (message.epoch < this.epochValue) {
      // [I2] a source of an older configuration must not change this replica. Its stream on
      // this link now has a hole, so the link is reset: a source that knows the new epoch
      // repositions from our ACK and resends; one that does not keeps being refused.
      return [
        { kind: 'refused', code: 'REPL_EPOCH_STALE', reason: `${message.type}(${message.sequence}) at epoch ${message.epoch} < ${this.epochValue}` },
        { kind: 'resyncNeeded', reason: `${message.type} of the older epoch ${message.epoch} refused` },
      ];
    }
    // A newer epoch: the source saw the coordinator's change first. Adopt it (older frames are
    // refused from now on) and re-announce, as for setEpoch: answers this node sent at the old
    // epoch are refused by the source.
    const effects = message.epoch > this.epochValue ? this.setEpoch(message.epoch) : [];
    switch (message.type) {
      case 'WRITE':
        effects.push(...this.receiveWrite(message));
        break;
      case 'SYNC':
        effects.push(...this.receiveSync(message.sequence));
        break;
      case 'CHECKPOINT':
        effects.push(...this.receiveCheckpoint(message.sequence));
        break;
    }
    return effects;
  }

  /** The shell recorded the rebase (see the effect): the stream now continues after `throughSequence`. */
  rebased(throughSequence: number): TargetEffect[] {
    assert(throughSequence >= this.expected - 1, `rebase to ${throughSequence} goes back from ${this.expected - 1}`);
    this.expected = throughSequence + 1;
    this.partition = [];
    this.partitionBytes = 0;
    this.spilledSeq = throughSequence;
    this.durableSeq = throughSequence;
    this.checkpointSeq = throughSequence;
    this.checkpointRequestedSeq = throughSequence;
    this.pendingSyncs = [];
    return [this.ack('ACK', throughSequence), this.ack('SYNC_ACK', throughSequence), this.ack('CHECKPOINT_ACK', throughSequence)];
  }

  /** Either direction of the link with the source came up: tell it where the stream stands. */
  linkUp(): TargetEffect[] {
    return [this.ack('ACK', this.expected - 1)];
  }

  /** The shell made the container durable through `sequence` (an appendToContainer with sync). */
  containerSynced(sequence: number): TargetEffect[] {
    if (sequence > this.spilledSeq) assert(false, `containerSynced(${sequence}) beyond what was spilled (${this.spilledSeq})`);
    this.durableSeq = Math.max(this.durableSeq, sequence);
    return this.answerSyncs();
  }

  /** The shell finished a checkpoint effect: the image is durable through `sequence`. */
  checkpointDone(sequence: number): TargetEffect[] {
    assert(sequence <= this.checkpointRequestedSeq && sequence < this.expected, `checkpointDone(${sequence}) was not requested`);
    this.checkpointSeq = Math.max(this.checkpointSeq, sequence);
    this.durableSeq = Math.max(this.durableSeq, sequence);
    // The durable image holds these: no need to put them in the container.
    let dropped = 0;
    while (dropped < this.partition.length && this.partition[dropped]!.sequence <= sequence) {
      this.partitionBytes -= entryBytes(this.partition[dropped]!);
      dropped++;
    }
    if (dropped > 0) this.partition = this.partition.slice(dropped);
    this.spilledSeq = Math.max(this.spilledSeq, sequence);
    return [this.ack('CHECKPOINT_ACK', this.checkpointSeq), ...this.answerSyncs()];
  }

  // ---- inspection -----------------------------------------------------------------------

  get epoch(): number {
    return this.epochValue;
  }
  /** The last sequence received (and applied) in order. */
  get receivedSequence(): number {
    return this.expected - 1;
  }
  get durableSequence(): number {
    return this.durableSeq;
  }
  get checkpointSequence(): number {
    return this.checkpointSeq;
  }
  get partitionEntries(): number {
    return this.partition.length;
  }

  // ---- internals ------------------------------------------------------------------------

  private ack(type: TargetMessage['type'], sequence: number): TargetEffect {
    return { kind: 'send', message: { type, volume: this.volume, epoch: this.epochValue, source: this.source, sequence } };
  }

  private receiveWrite(message: WriteMessage): TargetEffect[] {
    if (message.sequence < this.expected) return [this.ack('ACK', this.expected - 1)];
    if (message.sequence > this.expected) {
      // Only where the source says it restarted the stream past entries a catch-up covers (this
      // replica's, which copied everything before it joined, or the source's own, which had
      // never been acknowledged and which its catch-up overwrote): any other gap is a lost frame.
      if (message.restartsStream === true) return [{ kind: 'rebase', throughSequence: message.sequence - 1 }];
      return [{ kind: 'resyncNeeded', reason: `WRITE ${message.sequence} from ${this.source} where ${this.expected} was expected` }];
    }
    const entry: TargetEntry = {
      source: this.source,
      sequence: message.sequence,
      entryType: message.entryType,
      offset: message.offset,
      lengthBytes: message.lengthBytes,
      // The codec's payload may be a view of a socket chunk, which the partition must not pin:
      // then it keeps its own copy. A payload the codec assembled across chunks is kept as is.
      payload: this.payloads.owned(message.payload),
    };
    this.expected++;
    this.partition.push(entry);
    this.partitionBytes += entryBytes(entry);
    const effects: TargetEffect[] = [{ kind: 'apply', entry }, this.ack('ACK', entry.sequence)];
    if (this.partition.length >= this.limits.partitionEntriesMax || this.partitionBytes >= this.limits.partitionBytesMax) effects.push(this.spill(false));
    return effects;
  }

  private receiveSync(requested: number): TargetEffect[] {
    // A SYNC never runs ahead of the WRITEs it covers on a FIFO link; clamp for safety anyway:
    // the answer then claims only what is really here.
    const sequence = Math.min(requested, this.expected - 1);
    if (sequence <= this.durableSeq) return [this.ack('SYNC_ACK', sequence)];
    if (this.pendingSyncs.length >= this.limits.pendingSyncsMax) assert(false, `more than ${this.limits.pendingSyncsMax} SYNCs pending from ${this.source}`);
    if (this.pendingSyncs.length === 0 || this.pendingSyncs[this.pendingSyncs.length - 1]! < sequence) this.pendingSyncs.push(sequence);
    return [this.spill(true)];
  }

  private receiveCheckpoint(requested: number): TargetEffect[] {
    const sequence = Math.min(requested, this.expected - 1);
    if (sequence <= this.checkpointSeq) return [this.ack('CHECKPOINT_ACK', this.checkpointSeq)];
    if (sequence <= this.checkpointRequestedSeq) return []; // already under way: its ack will answer
    this.checkpointRequestedSeq = sequence;
    return [{ kind: 'checkpoint', source: this.source, sequence }];
  }

  /** Moves the whole partition into the container (with a sync when asked). */
  private spill(sync: boolean): TargetEffect {
    const entries = this.partition;
    this.partition = [];
    this.partitionBytes = 0;
    if (entries.length > 0) {
      if (entries[0]!.sequence !== this.spilledSeq + 1) assert(false, `spill starts at ${entries[0]!.sequence} after ${this.spilledSeq}`);
      this.spilledSeq = entries[entries.length - 1]!.sequence;
    }
    return { kind: 'appendToContainer', source: this.source, entries, sync, throughSequence: this.spilledSeq };
  }

  private answerSyncs(): TargetEffect[] {
    let answered: number | undefined;
    while (this.pendingSyncs.length > 0 && this.pendingSyncs[0]! <= this.durableSeq) answered = this.pendingSyncs.shift();
    return answered === undefined ? [] : [this.ack('SYNC_ACK', answered)];
  }
}
