// A simulated ReplicaStore (src/volume/replica-store.ts) for the failure simulation: one node's
// image, its own write-ahead log, one container per remote source and the checkpoint record,
// with the durability of a real disk under a process crash (SIGKILL) or a power loss, and the
// entry codec of src/journal/entry.ts on every log record, so that replay verifies CRCs exactly
// as production does. Synchronous (callbacks, not promises): the failure simulation runs
// hundreds of seeds with runUntilSync.
//
// What it keeps of production's store (the header of replica-store.ts has the reasons):
// - every entry applied here, own or remote, takes the next *apply stamp* when it registers
//   (synchronously, in arrival order); the stamp is carried in the entry header (flags = high
//   16 bits, sourceId = low 32 bits) and replay merges all logs by stamp;
// - reads see an entry as soon as it registered (the range lock): `view` is updated at once;
// - remote entries sit in their source's memory partition until the target spills it into the
//   source's container; own entries go to the own WAL after their image write;
// - a checkpoint syncs the image and records {stamp S, own sequence, per source the last
//   sequence applied}, then drops what the logs hold at or below it; replay starts from it;
// - rebaseSource (catch-up) empties a source's container and records the new start durably;
// - replay cuts a torn tail (an incomplete or bad last entry) and refuses a log with a bad
//   entry followed by valid ones (JOURNAL_CORRUPT: the store does not open, StoreCorruptError).
//
// Three levels of durability per file (like SimDisk): what the process sees (`view` for the
// image; logs are written only by completed I/O), what completed I/O handed the kernel (survives
// a process crash, not a power loss) and the platter (synced). A power loss writes back a random
// prefix of the kernel's unsynced writes, tearing the next one at a sector (image: a whole
// 512-byte block, so blocks stay whole; logs: a byte prefix at a 512-byte file boundary). A
// lying disk (lostWriteProbability) acknowledges a log append, and its sync, but the bytes never
// reach the platter: a power loss shows zeros there. Rot flips one bit of one durable log record.
//
// Simplifications against production (stated in the failure simulation's report too): one
// serial I/O queue per node (production overlaps I/O on libuv's pool), no allocation map (the
// image bytes are the content; no DIRECT_WRITE entries, no TRIM/ZERO), the image itself never
// rots or loses writes (nothing would detect it: the design protects logs with CRCs, not the
// image), and the checkpoint record is written atomically (production: write + rename + fsync).
import { assert } from '../errors.js';
import { ENTRY_HEADER_BYTES, ENTRY_TYPE, decodeLog, encodeHeader } from '../journal/entry.js';
import type { Prng } from './prng.js';
import type { ScheduledEvent, Scheduler } from './scheduler.js';

export type CrashKind = 'process' | 'power';

/** The name of the own write-ahead log among a store's logs. */
export const OWN_LOG = 'wal';

export interface StoreFaults {
  /** Per power loss and file: the kernel wrote back a random prefix of the unsynced writes. */
  readonly writebackProbability: number;
  /** Given writeback, the next unsynced write is torn (a prefix of it reached the platter). */
  readonly tornProbability: number;
  /** Per log append: acknowledged (and "synced") but never stored; a power loss shows it. */
  readonly lostWriteProbability: number;
  /** Per crash: one bit of one durable log record flips (rot, found by the next replay). */
  readonly rotProbability: number;
}

export const HONEST_STORE_FAULTS: StoreFaults = { writebackProbability: 0.6, tornProbability: 0.5, lostWriteProbability: 0, rotProbability: 0 };

/** Replay found a bad entry followed by valid ones: production's JOURNAL_CORRUPT (the store does not open). */
export class StoreCorruptError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'StoreCorruptError';
  }
}

interface LogRecord {
  readonly sequence: number;
  readonly stamp: number;
  /** Header and payload as encoded; after a crash, what the platter holds (torn, zeroed or rotted). */
  bytes: Buffer;
  /** 'kernel': a completed write not yet synced; 'platter': synced (or written back). */
  state: 'kernel' | 'platter';
  /** The disk will never store it (a lying disk): zeros after a power loss. */
  readonly lost: boolean;
}

interface ImageWrite {
  readonly offset: number;
  readonly data: Buffer;
}

interface CheckpointRecord {
  readonly stamp: number;
  readonly ownSequence: number;
  readonly sources: ReadonlyMap<string, number>;
}

interface PartitionEntry {
  readonly sequence: number;
  readonly stamp: number;
  readonly offset: number;
  readonly payload: Buffer;
}

interface SourceState {
  /** Last sequence handed to applyRemote (or the recovered durable one). */
  received: number;
  /** Last sequence in the container or covered by the checkpoint. */
  durable: number;
  partition: PartitionEntry[];
}

export interface SourceRecovery {
  readonly durableSequence: number;
  readonly checkpointSequence: number;
}

export interface StoreRecovery {
  readonly ownSequence: number;
  readonly sources: ReadonlyMap<string, SourceRecovery>;
  readonly lastStamp: number;
  /** Logs whose tail was cut (torn, or a bad last entry), for the trace. */
  readonly cutLogs: readonly string[];
}

/** One entry replay applied, for the simulation's I5 check. */
export interface ReplayedEntry {
  readonly log: string;
  readonly stamp: number;
  readonly sequence: number;
  readonly offset: number;
  readonly payload: Buffer;
}

/** What replaying the disk would give now: the image and where each log ends. */
interface ReplayResult {
  readonly image: Buffer;
  readonly recovery: StoreRecovery;
  readonly entries: readonly ReplayedEntry[];
  /** Per log: the records that replay keeps (a valid, consecutive prefix). */
  readonly kept: ReadonlyMap<string, LogRecord[]>;
  /** A log refused (bad entry followed by valid ones), if any. */
  readonly corrupt: string | undefined;
}

export interface SimStoreOptions {
  node: string;
  scheduler: Scheduler;
  /** The node's stream for disk faults and I/O delays (a fork of the run's root). */
  prng: Prng;
  imageBytes: number;
  /** The other replicas: one container each. */
  sources: readonly string[];
  faults: StoreFaults;
  /** One local I/O takes 0..this many ms; I/O runs one at a time, in order. */
  ioDelayMsMax: number;
  /** Local I/O tasks queued at once; more is a runaway (every engine is bounded). */
  ioQueueMax: number;
  /**
   * Bug switch for the checkers: replay applies the bytes of the entry it would cut (a torn or
   * rotted one) instead of cutting it, without looking at its CRCs (breaks I5).
   */
  applyCorruptEntries?: boolean;
}

const SECTOR_BYTES = 512;
/** The image tears at block boundaries: the simulation's checkers read 512-byte blocks. */
const IMAGE_SECTOR_BYTES = 512;
const TWO_POW_32 = 0x1_0000_0000;

function stampFields(stamp: number): { flags: number; sourceId: number } {
  return { flags: Math.floor(stamp / TWO_POW_32) & 0xffff, sourceId: stamp % TWO_POW_32 };
}

function stampOf(entry: { flags: number; sourceId: number }): number {
  return entry.flags * TWO_POW_32 + entry.sourceId;
}

export class SimStore {
  readonly node: string;
  /** Counts of what crashes and replays did, for reports. */
  readonly stats = { crashes: 0, powerLosses: 0, tornWrites: 0, lostWrites: 0, rots: 0, cuts: 0, refusedCorrupt: 0, wipes: 0, replayedEntries: 0, checkpoints: 0 };
  /**
   * Checker-only ledger (replay never reads it): per stamp, what was written under it, so the
   * simulation can tell an entry replayed intact from one that is not (I5).
   */
  readonly ledger = new Map<number, { readonly offset: number; readonly payload: Buffer }>();
  private readonly options: SimStoreOptions;
  private readonly scheduler: Scheduler;
  private readonly prng: Prng;
  private readonly imageBytes: number;
  // ---- the disk (survives crashes) ----
  private platter: Buffer;
  private kernelImageWrites: ImageWrite[] = [];
  private readonly logs = new Map<string, LogRecord[]>();
  private checkpointRecord: CheckpointRecord;
  // ---- the process (lost at a crash) ----
  private isOpen = false;
  private view: Buffer;
  private stamp = 0;
  private ownSequence = 0;
  private readonly sourceStates = new Map<string, SourceState>();
  private readonly queue: Array<() => void> = [];
  private pending: ScheduledEvent | undefined;

  constructor(options: SimStoreOptions) {
    assert(options.imageBytes % IMAGE_SECTOR_BYTES === 0, 'the image is whole sectors');
    this.options = options;
    this.node = options.node;
    this.scheduler = options.scheduler;
    this.prng = options.prng;
    this.imageBytes = options.imageBytes;
    this.platter = Buffer.alloc(options.imageBytes);
    this.view = Buffer.alloc(options.imageBytes);
    this.logs.set(OWN_LOG, []);
    for (const source of options.sources) this.logs.set(source, []);
    this.checkpointRecord = { stamp: 0, ownSequence: 0, sources: new Map(options.sources.map((source) => [source, 0])) };
  }

  get open(): boolean {
    return this.isOpen;
  }

  /** Local I/O queued or under way. */
  get busy(): boolean {
    return this.pending !== undefined || this.queue.length > 0;
  }

  get lastStamp(): number {
    return this.stamp;
  }

  get lastOwnSequence(): number {
    return this.ownSequence;
  }

  // ---- lifecycle ------------------------------------------------------------------------

  /**
   * Replays the disk and opens the store (ReplicaStore.open). Throws StoreCorruptError when a
   * log holds a bad entry followed by valid ones. `onEntry` sees every entry replay applies.
   */
  openStore(onEntry: (entry: ReplayedEntry) => void): StoreRecovery {
    assert(!this.isOpen, `${this.node}: store is open already`);
    const result = this.replay();
    if (result.corrupt !== undefined) {
      this.stats.refusedCorrupt++;
      throw new StoreCorruptError(`${this.node}: ${result.corrupt}`);
    }
    for (const entry of result.entries) {
      onEntry(entry);
      this.stats.replayedEntries++;
    }
    // The cut logs are rewritten as their valid prefix (production zeroes the torn tail).
    for (const [log, records] of result.kept) this.logs.set(log, records);
    this.stats.cuts += result.recovery.cutLogs.length;
    this.view = Buffer.from(result.image);
    // Replay writes the entries to the image file (unsynced): the next checkpoint makes them
    // durable before it drops the logs that hold them.
    this.kernelImageWrites = result.entries.map((entry) => ({ offset: entry.offset, data: entry.payload }));
    this.stamp = result.recovery.lastStamp;
    this.ownSequence = result.recovery.ownSequence;
    this.sourceStates.clear();
    for (const [source, recovered] of result.recovery.sources) this.sourceStates.set(source, { received: recovered.durableSequence, durable: recovered.durableSequence, partition: [] });
    this.isOpen = true;
    return result.recovery;
  }

  /**
   * The image a power loss now would leave after replay if nothing unsynced reached the platter
   * (checkers only: what FLUSH and FUA must have made durable). Undefined if replay would refuse.
   */
  durableImage(): Buffer | undefined {
    const result = this.replay(true);
    return result.corrupt === undefined ? result.image : undefined;
  }

  /**
   * The process dies (`process`: completed writes are in the kernel and survive) or the power
   * goes (`power`: only the platter survives, plus what the kernel wrote back). Either way I/O
   * not yet completed never happens. Rot may flip a bit of a durable log record.
   */
  crash(kind: CrashKind): void {
    this.stats.crashes++;
    if (kind === 'power') this.stats.powerLosses++;
    this.isOpen = false;
    this.queue.length = 0;
    this.pending?.cancel();
    this.pending = undefined;
    this.sourceStates.clear();
    // The image: the kernel's writes reach the platter (all of them, or a prefix, maybe torn).
    const writes = this.kernelImageWrites;
    this.kernelImageWrites = [];
    let survivors = writes.length;
    let tornImage: ImageWrite | undefined;
    if (kind === 'power') {
      survivors = this.prng.chance(this.options.faults.writebackProbability) ? this.prng.int(0, writes.length) : 0;
      if (survivors > 0 && survivors < writes.length && this.prng.chance(this.options.faults.tornProbability)) tornImage = writes[survivors];
    }
    for (const write of writes.slice(0, survivors)) write.data.copy(this.platter, write.offset);
    if (tornImage !== undefined && tornImage.data.length > IMAGE_SECTOR_BYTES) {
      const sectors = this.prng.int(1, tornImage.data.length / IMAGE_SECTOR_BYTES - 1);
      tornImage.data.copy(this.platter, tornImage.offset, 0, sectors * IMAGE_SECTOR_BYTES);
      this.stats.tornWrites++;
      this.scheduler.log(`store ${this.node}: image write at ${tornImage.offset} torn after ${sectors} blocks`);
    }
    // The logs.
    for (const [log, records] of this.logs) this.crashLog(log, records, kind);
    if (this.prng.chance(this.options.faults.rotProbability)) this.rot();
    this.view = Buffer.from(this.platter);
    this.scheduler.log(
      `store ${this.node}: ${kind === 'power' ? 'power loss' : 'process crash'}; checkpoint stamp ${this.checkpointRecord.stamp} own ${this.checkpointRecord.ownSequence} ` +
        `${[...this.checkpointRecord.sources].map(([source, sequence]) => `${source} ${sequence}`).join(' ')}; logs ${[...this.logs].map(([log, records]) => `${log} ${records.length === 0 ? '-' : `${records[0]!.sequence}..${records[records.length - 1]!.sequence}`}`).join(' ')}`,
    );
  }

  /** The disk is replaced by an empty one (after a refused corrupt log): everything is gone. */
  wipe(): void {
    assert(!this.isOpen, 'wipe a closed store');
    this.stats.wipes++;
    this.platter = Buffer.alloc(this.imageBytes);
    this.kernelImageWrites = [];
    for (const log of this.logs.keys()) this.logs.set(log, []);
    this.checkpointRecord = { stamp: 0, ownSequence: 0, sources: new Map([...this.checkpointRecord.sources.keys()].map((source) => [source, 0])) };
    this.view = Buffer.alloc(this.imageBytes);
    this.scheduler.log(`store ${this.node}: disk replaced (empty)`);
  }

  // ---- the data path (ReplicaStore's calls, with callbacks for its promises) ----------------

  /** A client write of this node: registered now (reads see it), image and WAL after the I/O delay. */
  writeLocal(offset: number, payload: Buffer, done: (sequence: number) => void): number {
    this.checkOpen();
    const sequence = ++this.ownSequence;
    const stamp = this.register(offset, payload);
    const bytes = this.encode(sequence, stamp, offset, payload);
    this.enqueue(() => {
      this.kernelImageWrites.push({ offset, data: payload });
      this.appendRecord(OWN_LOG, sequence, stamp, bytes);
      done(sequence);
    });
    return sequence;
  }

  /** Makes the own WAL durable through `throughSequence` (store.flushLocal). */
  flushLocal(done: () => void): void {
    this.checkOpen();
    this.enqueue(() => {
      this.syncLog(OWN_LOG);
      done();
    });
  }

  /** A remote entry, applied on receipt: registered now, in the source's partition, its image write queued. */
  applyRemote(source: string, sequence: number, offset: number, payload: Buffer): void {
    this.checkOpen();
    const state = this.sourceState(source);
    assert(sequence === state.received + 1, `${this.node}: ${source}'s entry ${sequence} applied after ${state.received}`);
    state.received = sequence;
    const stamp = this.register(offset, payload);
    state.partition.push({ sequence, stamp, offset, payload });
    this.enqueue(() => this.kernelImageWrites.push({ offset, data: payload }));
  }

  /**
   * The source's partition goes to its container (store.spill); with `sync`, then the container
   * is made durable. `done` gets the sequence durable for the source afterwards.
   */
  spill(source: string, sync: boolean, done: (durableSequence: number) => void): void {
    this.checkOpen();
    const state = this.sourceState(source);
    const entries = state.partition;
    state.partition = [];
    const through = state.received;
    this.enqueue(() => {
      for (const entry of entries) this.appendRecord(source, entry.sequence, entry.stamp, this.encode(entry.sequence, entry.stamp, entry.offset, entry.payload));
      if (sync) {
        this.syncLog(source);
        state.durable = Math.max(state.durable, through);
      }
      done(state.durable);
    });
  }

  /**
   * A consistency point (store.checkpoint): covers everything registered before this call. The
   * image is synced, the record written, the logs forget what it covers. `done` gets per source
   * the last sequence covered.
   */
  checkpoint(done: (covered: ReadonlyMap<string, number>) => void, rebase?: { source: string; throughSequence: number }): void {
    this.checkOpen();
    const stamp = this.stamp;
    const ownSequence = this.ownSequence;
    const sources = new Map<string, number>();
    for (const [source, state] of this.sourceStates) {
      sources.set(source, state.received);
      // The image will hold these: the partition need not go to the container.
      state.partition = [];
    }
    this.enqueue(() => {
      // Image sync: everything completed so far (the queue is serial: every write registered before).
      for (const write of this.kernelImageWrites) write.data.copy(this.platter, write.offset);
      this.kernelImageWrites = [];
      if (rebase !== undefined) this.logs.set(rebase.source, []);
      this.checkpointRecord = { stamp, ownSequence, sources };
      for (const [log, records] of this.logs) {
        const covered = log === OWN_LOG ? ownSequence : (sources.get(log) ?? 0);
        this.logs.set(log, records.filter((record) => record.sequence > covered));
      }
      for (const [source, covered] of sources) {
        const state = this.sourceStates.get(source);
        if (state !== undefined) state.durable = Math.max(state.durable, covered);
      }
      this.stats.checkpoints++;
      done(sources);
    });
  }

  /** Catch-up: `source`'s stream restarts after `throughSequence` (store.rebaseSource). */
  rebaseSource(source: string, throughSequence: number, done: () => void): void {
    this.checkOpen();
    const state = this.sourceState(source);
    assert(throughSequence >= state.received, `${this.node}: rebase of ${source} to ${throughSequence} goes back from ${state.received}`);
    state.partition = [];
    state.received = throughSequence;
    state.durable = throughSequence;
    this.checkpoint(() => done(), { source, throughSequence });
  }

  /** What reads see now (every registered entry). */
  read(offset: number, lengthBytes: number): Buffer {
    this.checkOpen();
    return Buffer.from(this.view.subarray(offset, offset + lengthBytes));
  }

  /** The process view of the whole image (checkers only). */
  get image(): Buffer {
    return this.view;
  }

  // ---- internals --------------------------------------------------------------------------

  private checkOpen(): void {
    assert(this.isOpen, `${this.node}: store is not open`);
  }

  private sourceState(source: string): SourceState {
    const state = this.sourceStates.get(source);
    assert(state !== undefined, `${this.node}: unknown source ${source}`);
    return state;
  }

  private register(offset: number, payload: Buffer): number {
    assert(offset >= 0 && offset + payload.length <= this.imageBytes, `${this.node}: write [${offset}, +${payload.length}) outside the image`);
    const stamp = ++this.stamp;
    payload.copy(this.view, offset);
    this.ledger.set(stamp, { offset, payload });
    return stamp;
  }

  private encode(sequence: number, stamp: number, offset: number, payload: Buffer): Buffer {
    const header = encodeHeader({ type: ENTRY_TYPE.WRITE, ...stampFields(stamp), sequence, offset, lengthBytes: payload.length }, payload);
    return Buffer.concat([header, payload]);
  }

  private appendRecord(log: string, sequence: number, stamp: number, bytes: Buffer): void {
    const lost = this.prng.chance(this.options.faults.lostWriteProbability);
    if (lost) this.stats.lostWrites++;
    this.logs.get(log)!.push({ sequence, stamp, bytes, state: 'kernel', lost });
  }

  private syncLog(log: string): void {
    for (const record of this.logs.get(log)!) record.state = 'platter';
  }

  private enqueue(task: () => void): void {
    assert(this.queue.length < this.options.ioQueueMax, `${this.node}: ${this.queue.length} local I/O tasks queued: a runaway`);
    this.queue.push(task);
    this.pump();
  }

  private pump(): void {
    if (this.pending !== undefined) return;
    const task = this.queue.shift();
    if (task === undefined) return;
    this.pending = this.scheduler.after(this.prng.int(0, this.options.ioDelayMsMax), () => {
      this.pending = undefined;
      task();
      this.pump();
    }, `io ${this.node}`);
  }

  private crashLog(log: string, records: LogRecord[], kind: CrashKind): void {
    const firstUnsynced = records.findIndex((record) => record.state === 'kernel');
    let kept = records.length;
    if (kind === 'power' && firstUnsynced >= 0) {
      const unsynced = records.length - firstUnsynced;
      const writtenBack = this.prng.chance(this.options.faults.writebackProbability) ? this.prng.int(0, unsynced) : 0;
      kept = firstUnsynced + writtenBack;
      const torn = records[kept];
      if (torn !== undefined && this.prng.chance(this.options.faults.tornProbability)) {
        // A prefix up to a sector boundary of the file reached the platter.
        let fileOffset = 0;
        for (const record of records.slice(0, kept)) fileOffset += record.bytes.length;
        const boundaries: number[] = [];
        for (let cut = SECTOR_BYTES - (fileOffset % SECTOR_BYTES); cut < torn.bytes.length; cut += SECTOR_BYTES) boundaries.push(cut);
        if (boundaries.length > 0) {
          const cut = this.prng.pick(boundaries);
          records[kept] = { ...torn, bytes: Buffer.from(torn.bytes.subarray(0, cut)), state: 'platter' };
          this.stats.tornWrites++;
          this.scheduler.log(`store ${this.node}: ${log} record ${torn.sequence} torn at ${cut} of ${torn.bytes.length} bytes`);
          kept++;
        }
      }
    }
    const survivors = records.slice(0, kept);
    for (const [index, record] of survivors.entries()) {
      // A lying disk never stored it: a power loss shows what was there before (zeros).
      const bytes = kind === 'power' && record.lost ? Buffer.alloc(record.bytes.length) : record.bytes;
      survivors[index] = { ...record, bytes, state: 'platter' };
    }
    this.logs.set(log, survivors);
  }

  private rot(): void {
    const candidates: Array<{ log: string; index: number }> = [];
    for (const [log, records] of this.logs) records.forEach((record, index) => record.bytes.length > 0 && candidates.push({ log, index }));
    if (candidates.length === 0) return;
    const { log, index } = this.prng.pick(candidates);
    const record = this.logs.get(log)![index]!;
    const bytes = Buffer.from(record.bytes);
    const at = this.prng.int(0, bytes.length - 1);
    bytes[at] = bytes[at]! ^ (1 << this.prng.int(0, 7));
    this.logs.get(log)![index] = { ...record, bytes };
    this.stats.rots++;
    this.scheduler.log(`store ${this.node}: rot in ${log} record ${record.sequence} at byte ${at}`);
  }

  /** Replay as ReplicaStore.open does it, over the platter (`syncedOnly`: ignoring unsynced log records); changes nothing. */
  private replay(syncedOnly = false): ReplayResult {
    const record = this.checkpointRecord;
    const image = Buffer.from(this.platter);
    const kept = new Map<string, LogRecord[]>();
    const entries: ReplayedEntry[] = [];
    const cutLogs: string[] = [];
    const sources = new Map<string, SourceRecovery>();
    let ownSequence = record.ownSequence;
    let lastStamp = record.stamp;
    let corrupt: string | undefined;
    for (const [log, records] of this.logs) {
      const from = log === OWN_LOG ? record.ownSequence : (record.sources.get(log) ?? 0);
      // Checkpoints drop what they cover; anything left at or below it is skipped by replay.
      const candidates = records.filter((entry) => entry.sequence > from && (!syncedOnly || entry.state === 'platter'));
      const bytes = Buffer.concat(candidates.map((entry) => entry.bytes));
      const decoded = decodeLog(bytes, { firstSequence: from + 1 });
      const valid: LogRecord[] = [];
      let at = 0;
      // Entries decode in order from the start: the i-th decoded entry is the i-th record.
      for (const [index, { entry, payload }] of decoded.entries.entries()) {
        const candidate = candidates[index]!;
        assert(candidate.sequence === entry.sequence, `${this.node}: ${log} record ${index} decodes as ${entry.sequence}, not ${candidate.sequence}`);
        valid.push({ ...candidate, state: 'platter' });
        entries.push({ log, stamp: stampOf(entry), sequence: entry.sequence, offset: entry.offset, payload: Buffer.from(payload) });
        at += ENTRY_HEADER_BYTES + payload.length;
      }
      if (decoded.end.kind === 'corrupt') corrupt ??= `${log}: ${decoded.end.reason} at byte ${decoded.end.at}`;
      if (decoded.end.kind !== 'clean' || at < bytes.length) {
        cutLogs.push(log);
        if (this.options.applyCorruptEntries === true) {
          const bad = this.lenientEntryAt(bytes, at);
          if (bad !== undefined) entries.push({ log, ...bad });
        }
      }
      kept.set(log, valid);
      const last = valid.length > 0 ? valid[valid.length - 1]!.sequence : from;
      if (log === OWN_LOG) ownSequence = last;
      else sources.set(log, { durableSequence: last, checkpointSequence: from });
    }
    if (this.options.applyCorruptEntries === true) corrupt = undefined;
    entries.sort((a, b) => a.stamp - b.stamp);
    for (const entry of entries) {
      if (entry.offset + entry.payload.length > image.length) continue;
      entry.payload.copy(image, entry.offset);
      lastStamp = Math.max(lastStamp, entry.stamp);
    }
    return { image, recovery: { ownSequence, sources, lastStamp, cutLogs }, entries, kept, corrupt };
  }

  /** The 'applyCorruptEntries' bug: reads the entry at `at` without checking anything. */
  private lenientEntryAt(bytes: Buffer, at: number): { stamp: number; sequence: number; offset: number; payload: Buffer } | undefined {
    if (bytes.length - at < ENTRY_HEADER_BYTES) return undefined;
    const flags = bytes.readUInt16LE(at + 6);
    const sourceId = bytes.readUInt32LE(at + 8);
    const payloadLength = bytes.readUInt32LE(at + 12);
    const sequence = Number(bytes.readBigUInt64LE(at + 16));
    const offset = Number(bytes.readBigUInt64LE(at + 24));
    const payload = Buffer.from(bytes.subarray(at + ENTRY_HEADER_BYTES, Math.min(bytes.length, at + ENTRY_HEADER_BYTES + payloadLength)));
    if (payload.length === 0 || !Number.isSafeInteger(offset) || offset < 0 || offset + payload.length > this.imageBytes) return undefined;
    return { stamp: stampOf({ flags, sourceId }), sequence, offset, payload };
  }
}
