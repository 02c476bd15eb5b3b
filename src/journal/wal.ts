// The write-ahead log: the I/O shell around the entry and segment codecs. Generic over what
// it logs (the local volume's writes, later the mirror engine's per-source containers):
// entries carry a source id and a sequence number that the caller assigns, consecutive from 1.
//
// Files: DIR/<first sequence, 20 digits>.log, one per segment: a segment header (segment.ts),
// then consecutive entries, then unused space. A new segment starts at rotate() (checkpoints
// rotate, then drop covered segments) and when the active one is full.
//
// Preallocation: a sync is cheap only when it flushes data and nothing else. Appending to a
// file changes its size and allocates blocks, so every fdatasync of a growing log also
// commits the filesystem journal (measured on ext4 here: three device writes per 4k append
// + fdatasync instead of two, p50 ~195 us instead of ~125 us), and each append pays for
// block allocation. An fallocate'd range does not help: its extents are "unwritten", and
// converting them on the first write is a journal commit too (measured: same cost as
// appending). So segments have a fixed capacity, filled with zeros by writing them, synced
// once, off the append path (a background job keeps a spare segment ready), and appends
// only overwrite allocated blocks inside the file size. Segments dropped by a checkpoint are
// renamed into spares and reused, which saves zeroing them again; reused files hold an
// earlier life's bytes after the entries, which is why every life has its own random
// generation in its header and in every entry (entry.ts). With no spare ready (or an entry
// larger than a segment) the log falls back to growing the file, as an unpreallocated log
// does, until a spare is ready. Capacity 0 turns preallocation off.
//
// Group commit: appends queue while a write is in flight and then go out together in one
// positional writev (split at IOV_MAX), header and payload as separate iovecs (never copied);
// one fdatasync serves every sync() waiting when it starts. The queue is bounded in bytes:
// an append past the bound waits its turn (backpressure) instead of growing memory.
//
// Recovery: a segment's entries end at the first entry that is not the next one of its
// generation. In the last segment, a valid entry of the generation further on means
// corruption (JOURNAL_CORRUPT, never applied); otherwise the end is a torn tail (cut: its
// bytes are zeroed, the file keeps its size) or clean (zeros, or an earlier life's bytes),
// and the next append overwrites from there. An older segment must end exactly where the
// next one starts.
//
// Failure: an error writing or syncing the log leaves its tail unknown (and after a failed
// fdatasync the page cache may have dropped the data: "fsyncgate"), so the log fails for
// good: every queued and later call rejects with JOURNAL_IO, and recovery sorts out the tail.
// Failing to prepare a spare is not such an error: the log grows instead, and retries later.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomInt } from 'node:crypto';
import { MirrorsanError, assert } from '../errors.js';
import type { Logger } from '../util/log.js';
import {
  InlineIoPolicy,
  closeFd,
  errorCode,
  fdatasync,
  fsyncDir,
  ftruncate,
  openFd,
  readAll,
  writeAll,
  writevAll,
} from '../store/file-io.js';
import {
  ENTRY_HEADER_BYTES,
  ENTRY_PAYLOAD_MAX_BYTES,
  decodeEntryAt,
  encodeHeader,
  entrySizeBytes,
  findValidHeader,
  isZeroRange,
  judgeLogEnd,
  retagHeader,
  scanStartAfter,
  stepReason,
  type LogEntry,
  type NonEntryStep,
} from './entry.js';
import { SEGMENT_HEADER_BYTES, decodeSegmentHeader, encodeSegmentHeader, type SegmentHeader } from './segment.js';

const MiB = 1024 * 1024;
const SEGMENT_NAME = /^(\d{20})\.log$/;
/** A ready spare: zero-filled, or a recycled segment whose header was zeroed. */
const SPARE_NAME = /^spare-(\d+)\.(zeroed|recycled)$/;
/** A spare being zero-filled; left over only by a crash, and then deleted. */
const SPARE_TEMP_NAME = /^spare-(\d+)\.tmp$/;
const DEFAULT_MAX_QUEUED_BYTES = 64 * MiB;
const DEFAULT_MAX_WAITING_APPENDS = 65_536;
const DEFAULT_SEGMENT_CAPACITY_BYTES = 64 * MiB;
/**
 * Enough reused spares for one checkpoint cycle (256 MiB of log by default, four segments)
 * plus the segments that fill while its image sync runs: measured at ~145 MB/s of 4k log
 * writes, 4 still left gaps where the log grew, 6 none after warm-up.
 */
const DEFAULT_SPARE_SEGMENTS_MAX = 6;
/** Capacities are whole pages, so that zero-filling never leaves a partial page. */
const CAPACITY_ALIGN_BYTES = 4096;
/** Bytes written (zero-filling) or read (warming) per call by the background jobs. */
const FILL_CHUNK_BYTES = MiB;
/** Shared source of zeros; never written to. */
const ZEROS = Buffer.alloc(FILL_CHUNK_BYTES);
/** After a failed spare preparation, wait this long before trying again. */
const PREPARE_RETRY_MS = 1000;
/** Bytes read at a time during replay (an entry larger than this is read whole). */
const REPLAY_WINDOW_BYTES = 8 * MiB;
/** Granularity of the search for the last non-zero byte of a fresh segment's tail. */
const PAGE_BYTES = 4096;

export interface WalOptions {
  dir: string;
  logger: Logger;
  /** Bytes of appended-but-unwritten entries before append() waits. Default 64 MiB. */
  maxQueuedBytes?: number;
  /** Appends allowed to wait for queue space before append() fails with VOLUME_BUSY. */
  maxWaitingAppends?: number;
  /**
   * Size of each segment file, preallocated by writing zeros before the segment is used
   * (see the header comment). A multiple of 4096; 0 turns preallocation off (segments grow
   * with their entries). Default 64 MiB.
   */
  segmentCapacityBytes?: number;
  /**
   * Segments dropped by checkpoints are kept (renamed) as spares for reuse, up to this many,
   * so that a steady load needs no zero-filling. Default 6.
   */
  spareSegmentsMax?: number;
}

export interface ReplayResult {
  /** Entries above fromSequenceExclusive handed to onEntry. */
  replayedEntries: number;
  /** Log bytes (headers and payloads) of those entries. */
  replayedBytes: number;
  /** True when an incomplete or invalid last entry was cut off. */
  cutTail: boolean;
  /** The highest sequence in the log after replay (or fromSequenceExclusive if higher). */
  lastSequence: number;
}

export interface WalStats {
  lastSequence: number;
  writtenSequence: number;
  durableSequence: number;
  segments: number;
  /** Bytes of entries in the log (see `bytes`). */
  bytes: number;
  /** Bytes of all segment and spare files on disk. */
  fileBytes: number;
  queuedBytes: number;
  syncs: number;
  groupCommitBatches: number;
  writevCalls: number;
  /** Segment switches: rotate() calls that started a segment, and full segments. */
  rotations: number;
  /** Batches appended past a segment's capacity because no spare was ready (each may cost a journal commit at sync). */
  growthBatches: number;
  /** Spare segments ready for the next rotation. */
  spareSegments: number;
  /** Spares zero-filled so far, and dropped segments kept as spares. */
  preparedSegments: number;
  recycledSegments: number;
  /** Failed attempts to prepare a spare (the log grew meanwhile). */
  spareFailures: number;
}

interface Segment {
  firstSequence: number;
  file: string;
  fileBytes: number;
  /**
   * Where the next entry goes: the end of the entries. Undefined while unknown: before
   * replay reads the segment (and for segments it skips), or when its header never made it.
   */
  endOffset: number | undefined;
  /** File size reserved for the segment; 0 when it grows with its entries. */
  capacityBytes: number;
  /** Generation of this life of the file (from its header); undefined while unknown. */
  generation: number | undefined;
  /** The space after the entries held only zeros when this life began (segment.ts). */
  zeroTail: boolean;
}

interface Spare {
  file: string;
  /** 'zeroed': all zeros; 'recycled': a dropped segment, header zeroed, old entries after it. */
  kind: 'zeroed' | 'recycled';
  fileBytes: number;
  /** Its pages were read into the page cache recently (see warmSpare). */
  warmed: boolean;
}

interface PendingAppend {
  kind: 'entry';
  sequence: number;
  header: Buffer;
  /** The generation `header` is tagged with: the active segment's when it was appended. */
  generation: number;
  payload: Buffer | undefined;
  sizeBytes: number;
  resolve: () => void;
  reject: (error: unknown) => void;
}

interface PendingRotate {
  kind: 'rotate';
  sizeBytes: 0;
  resolve: (lastSequence: number) => void;
  reject: (error: unknown) => void;
}

type QueueItem = PendingAppend | PendingRotate;

/** An older segment whose tail may not be durable yet: its fd stays open for the next sync. */
interface UnsyncedSegment {
  fd: number;
  firstSequence: number;
  lastSequence: number;
}

interface SyncWaiter {
  sequence: number;
  resolve: () => void;
  reject: (error: unknown) => void;
}

/** Thrown inside a background job that stops because the log is closing. */
class JobAborted extends Error {}

export function segmentFileName(firstSequence: number): string {
  return `${String(firstSequence).padStart(20, '0')}.log`;
}

function spareFileName(number: number, kind: Spare['kind'] | 'tmp'): string {
  return `spare-${number}.${kind}`;
}

/** A random generation in [1, 2^32): never 0, the tag of entries outside containers. */
function newGeneration(): number {
  return randomInt(1, 0x1_0000_0000);
}

export class WriteAheadLog {
  readonly dir: string;
  private readonly logger: Logger;
  private readonly maxQueuedBytes: number;
  private readonly maxWaitingAppends: number;
  private readonly capacityBytes: number;
  private readonly spareSegmentsMax: number;
  /**
   * Group-commit batches of up to 256 KiB are appended inline on the event loop while the
   * page cache takes them fast: handing each batch to a pool thread costs wake-ups that, on a
   * small machine, are a large part of a 4k write (see InlineIoPolicy).
   */
  private readonly ioPolicy = new InlineIoPolicy({ inlineMaxBytes: 256 * 1024 });
  /** Oldest first; the last one is the active segment once replay() has run. */
  private segments: Segment[];
  /** Ready spares, next to be used first. */
  private spares: Spare[];
  /** Spare files found at open, left by a crash while being zero-filled. */
  private readonly leftoverTemporaries: string[];
  private nextSpareNumber: number;
  private fd = -1;
  private ready = false;
  private closed = false;
  private failure: MirrorsanError | undefined;

  /** Highest sequence handed to append(). */
  private appendedSequence = 0;
  /** Highest sequence in the file (page cache). */
  private writtenSequence = 0;
  /** Highest sequence made durable by fdatasync. */
  private durableSequence = 0;

  private readonly queue: QueueItem[] = [];
  private queuedBytes = 0;
  private readonly waiting: QueueItem[] = [];
  private writerActive = false;
  private writerScheduled = false;
  private writerIdle: Promise<void> = Promise.resolve();
  private finishWriter: (() => void) | undefined;

  private syncWaiters: SyncWaiter[] = [];
  private syncInFlight: Promise<void> | undefined;
  private rotating = false;
  /** Rotated-out segments not yet made durable (a sync round covers them too). */
  private unsynced: UnsyncedSegment[] = [];
  /** A segment was created or renamed since the last directory fsync. */
  private dirSyncNeeded = false;

  /** The background job preparing or warming a spare, if one runs. */
  private maintenance: Promise<void> | undefined;
  private prepareRetryAtMs = 0;

  private syncCount = 0;
  private batchCount = 0;
  private writevCount = 0;
  private rotationCount = 0;
  private growthBatchCount = 0;
  private preparedCount = 0;
  private recycledCount = 0;
  private spareFailureCount = 0;

  private constructor(
    options: WalOptions,
    found: { segments: Segment[]; spares: Spare[]; temporaries: string[]; nextSpareNumber: number },
  ) {
    this.dir = options.dir;
    this.logger = options.logger;
    this.maxQueuedBytes = options.maxQueuedBytes ?? DEFAULT_MAX_QUEUED_BYTES;
    this.maxWaitingAppends = options.maxWaitingAppends ?? DEFAULT_MAX_WAITING_APPENDS;
    this.capacityBytes = options.segmentCapacityBytes ?? DEFAULT_SEGMENT_CAPACITY_BYTES;
    this.spareSegmentsMax = options.spareSegmentsMax ?? DEFAULT_SPARE_SEGMENTS_MAX;
    assert(this.maxQueuedBytes >= entrySizeBytes(0), 'maxQueuedBytes too small');
    this.segments = found.segments;
    this.spares = found.spares;
    this.leftoverTemporaries = found.temporaries;
    this.nextSpareNumber = found.nextSpareNumber;
  }

  /** Opens (creating if needed) the log directory. Call replay() before appending. */
  static async open(options: WalOptions): Promise<WriteAheadLog> {
    const capacity = options.segmentCapacityBytes ?? DEFAULT_SEGMENT_CAPACITY_BYTES;
    if (!Number.isSafeInteger(capacity) || capacity < 0 || capacity % CAPACITY_ALIGN_BYTES !== 0) {
      throw new MirrorsanError('CONFIG_INVALID', `wal segmentCapacityBytes ${capacity} must be 0 or a positive multiple of ${CAPACITY_ALIGN_BYTES}`);
    }
    const sparesMax = options.spareSegmentsMax ?? DEFAULT_SPARE_SEGMENTS_MAX;
    if (!Number.isSafeInteger(sparesMax) || sparesMax < 0) {
      throw new MirrorsanError('CONFIG_INVALID', `wal spareSegmentsMax ${sparesMax} must be a non-negative integer`);
    }
    await fs.promises.mkdir(options.dir, { recursive: true });
    const segments: Segment[] = [];
    const spares: Spare[] = [];
    const temporaries: string[] = [];
    let nextSpareNumber = 1;
    for (const name of await fs.promises.readdir(options.dir)) {
      const file = path.join(options.dir, name);
      const segment = SEGMENT_NAME.exec(name);
      if (segment) {
        const firstSequence = Number(segment[1]);
        assert(Number.isSafeInteger(firstSequence), `segment name ${name}`);
        segments.push({
          firstSequence,
          file,
          fileBytes: (await fs.promises.stat(file)).size,
          endOffset: undefined,
          capacityBytes: 0,
          generation: undefined,
          zeroTail: false,
        });
        continue;
      }
      const spare = SPARE_NAME.exec(name) ?? SPARE_TEMP_NAME.exec(name);
      if (!spare) continue;
      nextSpareNumber = Math.max(nextSpareNumber, Number(spare[1]) + 1);
      if (spare[2] === 'zeroed' || spare[2] === 'recycled') {
        spares.push({ file, kind: spare[2], fileBytes: (await fs.promises.stat(file)).size, warmed: false });
      } else {
        temporaries.push(file);
      }
    }
    segments.sort((a, b) => a.firstSequence - b.firstSequence);
    return new WriteAheadLog(options, { segments, spares, temporaries, nextSpareNumber });
  }

  get lastSequence(): number {
    return this.appendedSequence;
  }

  get syncedSequence(): number {
    return this.durableSequence;
  }

  /**
   * Bytes of entries in the log, queued ones included: what a checkpoint would free. A
   * segment that replay skipped unread (wholly below the checkpoint) counts as full.
   */
  get bytes(): number {
    let total = 0;
    for (const segment of this.segments) {
      total += segment.endOffset !== undefined ? segment.endOffset - SEGMENT_HEADER_BYTES : Math.max(0, segment.fileBytes - SEGMENT_HEADER_BYTES);
    }
    return total + this.queuedBytes;
  }

  stats(): WalStats {
    let fileBytes = 0;
    for (const segment of this.segments) fileBytes += segment.fileBytes;
    for (const spare of this.spares) fileBytes += spare.fileBytes;
    return {
      lastSequence: this.appendedSequence,
      writtenSequence: this.writtenSequence,
      durableSequence: this.durableSequence,
      segments: this.segments.length,
      bytes: this.bytes,
      fileBytes,
      queuedBytes: this.queuedBytes,
      syncs: this.syncCount,
      groupCommitBatches: this.batchCount,
      writevCalls: this.writevCount,
      rotations: this.rotationCount,
      growthBatches: this.growthBatchCount,
      spareSegments: this.spares.length,
      preparedSegments: this.preparedCount,
      recycledSegments: this.recycledCount,
      spareFailures: this.spareFailureCount,
    };
  }

  /**
   * Queues `entry` (whose sequence must be lastSequence + 1) and resolves once it is in the
   * segment file (page cache). The payload is referenced, not copied: keep it unchanged
   * until the promise settles. Throws synchronously (JOURNAL_IO, JOURNAL_CLOSED,
   * VOLUME_BUSY) when the log cannot take the entry; its sequence is then not consumed.
   */
  append(entry: LogEntry, payload?: Buffer): Promise<void> {
    assert(this.ready, 'wal: replay() must run before append()');
    // The message is built only on failure: this runs for every entry.
    if (entry.sequence !== this.appendedSequence + 1) assert(false, `wal: append of sequence ${entry.sequence} after ${this.appendedSequence}`);
    if (this.failure) throw this.failure;
    if (this.closed) throw new MirrorsanError('JOURNAL_CLOSED', `wal ${this.dir} is closed`);
    if (this.waiting.length >= this.maxWaitingAppends) {
      throw new MirrorsanError('VOLUME_BUSY', `wal ${this.dir}: ${this.waiting.length} appends already wait for queue space`);
    }
    // Tagged for the active segment; the writer re-tags it if it lands in a later one.
    const generation = this.segments[this.segments.length - 1]?.generation ?? 0;
    const header = encodeHeader(entry, payload, generation);
    this.appendedSequence = entry.sequence;
    return new Promise<void>((resolve, reject) => {
      const item: PendingAppend = {
        kind: 'entry',
        sequence: entry.sequence,
        header,
        generation,
        payload: payload !== undefined && payload.length > 0 ? payload : undefined,
        sizeBytes: entrySizeBytes(payload?.length ?? 0),
        resolve,
        reject,
      };
      this.enqueue(item);
    });
  }

  /**
   * Resolves once every entry up to `sequence` (default: the highest appended now) is
   * durable. Concurrent calls share fdatasyncs.
   */
  sync(sequence?: number): Promise<void> {
    const target = sequence ?? this.appendedSequence;
    if (target > this.appendedSequence) assert(false, `wal: sync of sequence ${target} beyond ${this.appendedSequence}`);
    if (target <= this.durableSequence) return Promise.resolve();
    if (this.failure) return Promise.reject(this.failure);
    return new Promise<void>((resolve, reject) => {
      this.syncWaiters.push({ sequence: target, resolve, reject });
      this.maybeStartSync();
    });
  }

  /**
   * Ends the active segment after every entry appended so far and starts a new one;
   * resolves with the last sequence of the old segments. A no-op when the active segment is
   * empty. The old segment is not synced here: the next sync() covers it.
   */
  rotate(): Promise<number> {
    assert(this.ready, 'wal: replay() must run before rotate()');
    if (this.failure) return Promise.reject(this.failure);
    if (this.closed) return Promise.reject(new MirrorsanError('JOURNAL_CLOSED', `wal ${this.dir} is closed`));
    return new Promise<number>((resolve, reject) => this.enqueue({ kind: 'rotate', sizeBytes: 0, resolve, reject }));
  }

  /**
   * Drops the segments whose entries all have sequences <= `sequence` (the caller made
   * them durable elsewhere: a checkpoint); returns how many. Up to spareSegmentsMax of them
   * become spares (renamed, header zeroed), the others are deleted. Neither needs a
   * directory fsync: a segment that reappears after a crash lies below the checkpoint and
   * replay skips it unread.
   */
  async dropSegmentsUpTo(sequence: number): Promise<number> {
    const victims: Segment[] = [];
    // The active segment is never dropped: it receives the next entries.
    while (this.segments.length > 1 && this.segments[1]!.firstSequence - 1 <= sequence) {
      victims.push(this.segments.shift()!);
    }
    if (victims.length === 0) return 0;
    // Out of the next sync rounds now; closed once a round that may use them has ended.
    const firstKept = this.segments[0]!.firstSequence;
    const dropped = this.unsynced.filter((old) => old.firstSequence < firstKept);
    this.unsynced = this.unsynced.filter((old) => old.firstSequence >= firstKept);
    await this.syncInFlight;
    for (const old of dropped) await closeFd(old.fd);
    for (const segment of victims) {
      if (await this.recycle(segment)) continue;
      await fs.promises.rm(segment.file, { force: true });
    }
    this.maybePrepare();
    return victims.length;
  }

  /**
   * Resolves once a spare segment is ready, preparing one now if none is (JOURNAL_IO if
   * that fails). With preallocation off it resolves at once.
   */
  async ensureSpare(): Promise<void> {
    assert(this.ready, 'wal: replay() must run before ensureSpare()');
    if (this.capacityBytes === 0) return;
    while (this.spares.length === 0) {
      if (this.failure) throw this.failure;
      if (this.closed) throw new MirrorsanError('JOURNAL_CLOSED', `wal ${this.dir} is closed`);
      if (!this.maintenance) {
        const failures = this.spareFailureCount;
        this.maybePrepare(true);
        assert(this.maintenance !== undefined, 'wal: no spare and no preparation started');
        await this.maintenance;
        if (this.spareFailureCount > failures && this.spares.length === 0) {
          throw new MirrorsanError('JOURNAL_IO', `wal ${this.dir}: could not prepare a spare segment (see the log)`);
        }
      } else {
        await this.maintenance;
      }
    }
  }

  /**
   * Reads the log in order, verifying every entry, and hands each entry above
   * `fromSequenceExclusive` to `onEntry` (awaited; the payload view stays valid after it
   * returns). A torn tail of the last segment is cut; anything else that is invalid is a
   * JOURNAL_CORRUPT error naming the file and offset. Afterwards the log accepts appends,
   * continuing after max(lastSequence, fromSequenceExclusive).
   */
  async replay(
    fromSequenceExclusive: number,
    onEntry: (entry: LogEntry, payload: Buffer) => void | Promise<void>,
  ): Promise<ReplayResult> {
    assert(!this.ready, 'wal: replay() runs once, before appends');
    const result: ReplayResult = { replayedEntries: 0, replayedBytes: 0, cutTail: false, lastSequence: fromSequenceExclusive };
    let expected: number | undefined;
    for (let index = this.firstSegmentAbove(fromSequenceExclusive); index < this.segments.length; index++) {
      const segment = this.segments[index]!;
      if (expected === undefined) {
        if (segment.firstSequence > fromSequenceExclusive + 1) {
          throw this.corrupt(segment, 0, `log starts at sequence ${segment.firstSequence} but the checkpoint is at ${fromSequenceExclusive}`);
        }
        expected = segment.firstSequence;
      }
      // The previous segment's replay checked that it ends where this one starts.
      assert(segment.firstSequence === expected, `wal: segment ${segment.file} does not continue the log at ${expected}`);
      const next = this.segments[index + 1];
      expected = await this.replaySegment(segment, next?.firstSequence, expected, fromSequenceExclusive, onEntry, result, 'replay');
    }
    const lastInLog = expected === undefined ? 0 : expected - 1;
    result.lastSequence = Math.max(lastInLog, fromSequenceExclusive);
    await this.adoptSpares();
    await this.openActiveSegment(expected, result.lastSequence);
    this.appendedSequence = this.writtenSequence = this.durableSequence = result.lastSequence;
    this.ready = true;
    this.maybePrepare();
    return result;
  }

  /**
   * Reads the entries above `fromSequenceExclusive` without applying or repairing anything,
   * and stops quietly where replay() would cut a tail or report corruption. Replay uses it
   * to look ahead (which ranges a later DIRECT_WRITE owns). Runs before replay().
   */
  async scan(fromSequenceExclusive: number, onEntry: (entry: LogEntry) => void): Promise<void> {
    assert(!this.ready, 'wal: scan() runs before replay()');
    const ignored: ReplayResult = { replayedEntries: 0, replayedBytes: 0, cutTail: false, lastSequence: 0 };
    let expected: number | undefined;
    for (let index = this.firstSegmentAbove(fromSequenceExclusive); index < this.segments.length; index++) {
      const segment = this.segments[index]!;
      expected ??= segment.firstSequence;
      if (segment.firstSequence !== expected) return;
      const next = this.segments[index + 1];
      const after = await this.replaySegment(segment, next?.firstSequence, expected, fromSequenceExclusive, (entry) => onEntry(entry), ignored, 'scan');
      if (after < 0) return;
      expected = after;
    }
  }

  /** Writes and syncs everything queued, then closes the active segment. */
  async close(): Promise<void> {
    if (this.closed) return;
    if (this.ready && !this.failure) await this.sync().catch(() => undefined);
    this.closed = true;
    await this.writerIdle;
    await this.syncInFlight;
    // A running job stops at its next chunk (see JobAborted).
    await this.maintenance;
    for (const old of this.unsynced.splice(0)) await closeFd(old.fd);
    if (this.fd >= 0) {
      const fd = this.fd;
      this.fd = -1;
      await closeFd(fd);
    }
  }

  // ---- appending -------------------------------------------------------------------

  private enqueue(item: QueueItem): void {
    // Order is fixed at call time: nothing overtakes an item already waiting for space.
    if (this.waiting.length === 0 && (this.queuedBytes + item.sizeBytes <= this.maxQueuedBytes || this.queue.length === 0)) {
      this.queue.push(item);
      this.queuedBytes += item.sizeBytes;
      this.scheduleWriter();
    } else {
      this.waiting.push(item);
    }
  }

  private admitWaiting(): void {
    while (this.waiting.length > 0) {
      const item = this.waiting[0]!;
      if (this.queuedBytes + item.sizeBytes > this.maxQueuedBytes && this.queue.length > 0) break;
      this.waiting.shift();
      this.queue.push(item);
      this.queuedBytes += item.sizeBytes;
    }
  }

  private scheduleWriter(): void {
    if (this.writerActive || this.writerScheduled) return;
    this.writerScheduled = true;
    // A microtask later, so that every append of the current synchronous run (all the
    // requests parsed from one socket read, say) joins the first batch.
    queueMicrotask(() => {
      this.writerScheduled = false;
      void this.runWriter();
    });
  }

  private async runWriter(): Promise<void> {
    if (this.writerActive) return;
    this.writerActive = true;
    this.writerIdle = new Promise((resolve) => (this.finishWriter = resolve));
    try {
      while (this.queue.length > 0 && !this.failure) {
        const head = this.queue[0]!;
        if (head.kind === 'rotate') {
          this.queue.shift();
          await this.performRotation(head);
          this.admitWaiting();
          continue;
        }
        await this.writeBatch();
        this.admitWaiting();
      }
    } catch (error) {
      this.fail(error, 'write');
    } finally {
      this.writerActive = false;
      this.finishWriter?.();
      // A failure may have left items behind; fail() rejected them. Otherwise the queue is
      // empty or refilled by admitWaiting in the meantime.
      if (this.queue.length > 0 && !this.failure) this.scheduleWriter();
    }
  }

  /** Bytes the active segment can still take without growing its file (Infinity without preallocation). */
  private roomBytes(segment: Segment): number {
    if (this.capacityBytes === 0) return Infinity;
    return segment.capacityBytes - this.endOf(segment);
  }

  private endOf(segment: Segment): number {
    if (segment.endOffset === undefined) assert(false, `wal: end of ${segment.file} unknown`);
    return segment.endOffset;
  }

  private async writeBatch(): Promise<void> {
    const first = this.queue[0];
    assert(first?.kind === 'entry', 'wal: writeBatch without an entry at the head');
    let segment = this.activeSegment();
    if (first.sizeBytes > this.roomBytes(segment) && this.spares.length > 0 && this.endOf(segment) > SEGMENT_HEADER_BYTES) {
      // Full: continue in a spare.
      if (!(await this.switchSegment())) return;
      segment = this.activeSegment();
    }
    const room = this.roomBytes(segment);
    // No room and no spare (or an entry larger than a whole segment): append past the
    // capacity, as an unpreallocated log does, until a spare is ready.
    const grow = first.sizeBytes > room;
    const generation = segment.generation;
    assert(generation !== undefined, 'wal: active segment without a generation');
    let count = 0;
    let bytes = 0;
    const iovecs: Buffer[] = [];
    while (count < this.queue.length) {
      const item = this.queue[count]!;
      if (item.kind !== 'entry') break;
      if (!grow && bytes + item.sizeBytes > room) break;
      if (item.generation !== generation) {
        retagHeader(item.header, generation);
        item.generation = generation;
      }
      iovecs.push(item.header);
      if (item.payload) iovecs.push(item.payload);
      bytes += item.sizeBytes;
      count++;
    }
    const batch = this.queue.splice(0, count) as PendingAppend[];
    const at = this.endOf(segment);
    try {
      this.writevCount += await writevAll(this.fd, iovecs, at, this.ioPolicy);
    } catch (error) {
      this.fail(error, 'write');
      for (const item of batch) item.reject(this.failure);
      return;
    }
    segment.endOffset = at + bytes;
    segment.fileBytes = Math.max(segment.fileBytes, segment.endOffset);
    this.queuedBytes -= bytes;
    this.writtenSequence = batch[batch.length - 1]!.sequence;
    this.batchCount++;
    if (grow) this.growthBatchCount++;
    for (const item of batch) item.resolve();
    this.maybePrepare();
    this.maybeStartSync();
  }

  private activeSegment(): Segment {
    const segment = this.segments[this.segments.length - 1];
    assert(segment !== undefined && this.fd >= 0, 'wal: no active segment');
    return segment;
  }

  private async performRotation(request: PendingRotate): Promise<void> {
    if (!(await this.switchSegment())) {
      request.reject(this.failure);
      return;
    }
    request.resolve(this.writtenSequence);
  }

  /** Rotates, failing the log on error; false when it failed. */
  private async switchSegment(): Promise<boolean> {
    this.rotating = true;
    try {
      await this.rotateActiveSegment();
    } catch (error) {
      this.fail(error, 'rotate');
      return false;
    } finally {
      this.rotating = false;
    }
    this.maybeStartSync();
    return true;
  }

  private async rotateActiveSegment(): Promise<void> {
    const segment = this.activeSegment();
    if (this.endOf(segment) === SEGMENT_HEADER_BYTES) return;
    // No fdatasync here: a checkpoint rotates and then drops the old segment once the image
    // is durable, and forcing the log to disk first would double the disk writes of every
    // checkpoint for nothing. The old segment joins the next sync round instead (before any
    // entry after it is acknowledged durable), so "acknowledged durable" still implies
    // "every earlier segment complete on disk".
    const old: UnsyncedSegment = { fd: this.fd, firstSequence: segment.firstSequence, lastSequence: this.writtenSequence };
    this.fd = -1;
    // Nothing newer than durableSequence in it means no sync round is using it either.
    if (old.lastSequence > this.durableSequence) this.unsynced.push(old);
    else await closeFd(old.fd);
    await this.startSegment(this.writtenSequence + 1, false);
    this.rotationCount++;
  }

  /**
   * Makes a new active segment starting at `firstSequence`: a spare when one is ready (at
   * open, one is prepared now if needed), else a growing file.
   */
  private async startSegment(firstSequence: number, atOpen: boolean): Promise<void> {
    const file = path.join(this.dir, segmentFileName(firstSequence));
    assert(
      this.segments.every((segment) => segment.firstSequence < firstSequence),
      `wal: new segment ${firstSequence} does not follow the existing ones`,
    );
    if (this.capacityBytes > 0 && this.spares.length === 0 && atOpen) {
      try {
        await this.prepareZeroedSpare();
      } catch (error) {
        this.spareFailureCount++;
        this.logger.warn('wal: preparing a spare segment failed; the log grows instead', { dir: this.dir, error: String(error) });
      }
    }
    const spare = this.capacityBytes > 0 ? this.spares.shift() : undefined;
    let header: SegmentHeader;
    if (spare) {
      // The spare is complete and durable (zero-filled and synced, or recycled with its
      // header zeroed and synced); the rename and the header become durable with the next
      // sync round, before any entry in the segment is acknowledged durable.
      await fs.promises.rename(spare.file, file);
      this.fd = await openFd(file, 'r+');
      header = { firstSequence, capacityBytes: spare.fileBytes, generation: newGeneration(), zeroTail: spare.kind === 'zeroed' };
    } else {
      this.fd = await openFd(file, 'wx');
      header = { firstSequence, capacityBytes: 0, generation: newGeneration(), zeroTail: true };
    }
    await writeAll(this.fd, encodeSegmentHeader(header), 0, this.ioPolicy);
    this.segments.push({
      firstSequence,
      file,
      fileBytes: Math.max(spare?.fileBytes ?? 0, SEGMENT_HEADER_BYTES),
      endOffset: SEGMENT_HEADER_BYTES,
      capacityBytes: header.capacityBytes,
      generation: header.generation,
      zeroTail: header.zeroTail,
    });
    this.dirSyncNeeded = true;
    this.maybePrepare();
  }

  // ---- spares ----------------------------------------------------------------------

  /**
   * Starts the next background job if one is due: zero-fill a spare when none is ready and
   * the log is in use (its active segment holds entries: a volume that is only opened costs
   * no second segment), or warm the next spare once the active segment is half full.
   * `force` skips the in-use and retry conditions.
   */
  private maybePrepare(force = false): void {
    if (this.capacityBytes === 0 || !this.ready || this.closed || this.failure || this.maintenance) return;
    const active = this.segments[this.segments.length - 1];
    let job: (() => Promise<void>) | undefined;
    if (this.spares.length === 0) {
      const inUse = active?.endOffset !== undefined && active.endOffset > SEGMENT_HEADER_BYTES;
      if (!force && (!inUse || performance.now() < this.prepareRetryAtMs)) return;
      job = () => this.prepareZeroedSpare();
    } else {
      const next = this.spares[0]!;
      if (!next.warmed && active?.endOffset !== undefined && active.endOffset * 2 >= active.capacityBytes) {
        job = () => this.warmSpare(next);
      }
    }
    if (!job) return;
    this.maintenance = job()
      .catch((error: unknown) => {
        if (error instanceof JobAborted) return;
        this.spareFailureCount++;
        this.prepareRetryAtMs = performance.now() + PREPARE_RETRY_MS;
        this.logger.warn('wal: preparing a spare segment failed; the log grows until one is ready', {
          dir: this.dir,
          error: String(error),
        });
      })
      .finally(() => {
        this.maintenance = undefined;
        this.maybePrepare();
      });
  }

  /**
   * Writes a new spare full of zeros and syncs it (data and allocation), so that appends
   * into it later only overwrite. Runs through the thread pool, never inline: it is
   * background work.
   */
  private async prepareZeroedSpare(): Promise<void> {
    const number = this.nextSpareNumber++;
    const temporary = path.join(this.dir, spareFileName(number, 'tmp'));
    const capacity = this.capacityBytes;
    const fd = await openFd(temporary, 'wx');
    let complete = false;
    try {
      for (let at = 0; at < capacity; at += FILL_CHUNK_BYTES) {
        if (this.closed) throw new JobAborted('wal closing');
        await writeAll(fd, ZEROS.subarray(0, Math.min(FILL_CHUNK_BYTES, capacity - at)), at);
      }
      await fdatasync(fd);
      complete = true;
    } finally {
      await closeFd(fd);
      if (!complete) await fs.promises.rm(temporary, { force: true });
    }
    const file = path.join(this.dir, spareFileName(number, 'zeroed'));
    await fs.promises.rename(temporary, file);
    // Just written: its pages are in the page cache.
    this.spares.push({ file, kind: 'zeroed', fileBytes: capacity, warmed: true });
    this.preparedCount++;
  }

  /**
   * Reads a recycled spare once, so its pages are in the page cache when it becomes the
   * active segment: an append that covers part of a page not in the cache makes the kernel
   * read that page first, on the append path (measured: ~60 us per 4k append instead of
   * ~1.5 us). Zero-filled spares need none: they were just written. Best effort.
   */
  private async warmSpare(spare: Spare): Promise<void> {
    spare.warmed = true;
    try {
      const fd = await openFd(spare.file, 'r');
      try {
        const scratch = Buffer.allocUnsafe(FILL_CHUNK_BYTES);
        for (let at = 0; at < spare.fileBytes && !this.closed && this.spares.includes(spare); at += FILL_CHUNK_BYTES) {
          await readAll(fd, scratch.subarray(0, Math.min(FILL_CHUNK_BYTES, spare.fileBytes - at)), at);
        }
      } finally {
        await closeFd(fd);
      }
    } catch (error) {
      // Renamed into a segment meanwhile, say: it only stays cold.
      this.logger.debug('wal: warming a spare segment failed', { file: spare.file, error: String(error) });
    }
  }

  /**
   * Keeps a dropped segment as a spare (renamed, its header zeroed and synced, cut back to
   * the capacity if it grew) when there is room for one; false when it should be deleted.
   */
  private async recycle(segment: Segment): Promise<boolean> {
    if (this.capacityBytes === 0 || this.closed || this.spares.length >= this.spareSegmentsMax) return false;
    if (segment.fileBytes < this.capacityBytes) return false;
    const file = path.join(this.dir, spareFileName(this.nextSpareNumber++, 'recycled'));
    try {
      await fs.promises.rename(segment.file, file);
    } catch (error) {
      this.logger.warn('wal: recycling a segment failed; deleting it', { segment: segment.file, error: String(error) });
      return false;
    }
    try {
      const fd = await openFd(file, 'r+');
      try {
        if (segment.fileBytes > this.capacityBytes) await ftruncate(fd, this.capacityBytes);
        // A spare never holds a valid segment header on disk. Otherwise a crash after a
        // later rotation renamed it, but before that rotation's header reached the disk,
        // would show this old header under the new name, and it would vouch for old entries.
        await writeAll(fd, ZEROS.subarray(0, SEGMENT_HEADER_BYTES), 0);
        await fdatasync(fd);
      } finally {
        await closeFd(fd);
      }
    } catch (error) {
      this.logger.warn('wal: recycling a segment failed; deleting it', { segment: segment.file, error: String(error) });
      await fs.promises.rm(file, { force: true });
      return true;
    }
    this.spares.push({ file, kind: 'recycled', fileBytes: this.capacityBytes, warmed: false });
    this.recycledCount++;
    return true;
  }

  /**
   * Spare files found at open: deletes half-prepared ones and those that do not fit the
   * configuration, and makes sure the others hold no segment header on disk (a crash in
   * the middle of recycling can leave one).
   */
  private async adoptSpares(): Promise<void> {
    for (const file of this.leftoverTemporaries.splice(0)) await fs.promises.rm(file, { force: true });
    const found = this.spares;
    this.spares = [];
    for (const spare of found) {
      if (this.capacityBytes === 0 || spare.fileBytes < this.capacityBytes || this.spares.length >= Math.max(1, this.spareSegmentsMax)) {
        await fs.promises.rm(spare.file, { force: true });
        continue;
      }
      const fd = await openFd(spare.file, 'r+');
      try {
        const head = Buffer.alloc(SEGMENT_HEADER_BYTES);
        await readAll(fd, head, 0);
        if (!isZeroRange(head, 0, head.length)) {
          await writeAll(fd, ZEROS.subarray(0, SEGMENT_HEADER_BYTES), 0);
          await fdatasync(fd);
        }
      } finally {
        await closeFd(fd);
      }
      this.spares.push(spare);
    }
  }

  // ---- syncing ---------------------------------------------------------------------

  private maybeStartSync(): void {
    if (this.syncInFlight || this.rotating || this.failure || this.syncWaiters.length === 0) return;
    let satisfiable = false;
    for (const waiter of this.syncWaiters) {
      if (waiter.sequence <= this.writtenSequence) {
        satisfiable = true;
        break;
      }
    }
    // Waiters whose entries are still being written wait for that batch: an fdatasync now
    // would not cover them.
    if (!satisfiable) return;
    const covered = this.writtenSequence;
    const work: Promise<void>[] = [fdatasync(this.fd)];
    for (const old of this.unsynced) work.push(fdatasync(old.fd));
    if (this.dirSyncNeeded) {
      this.dirSyncNeeded = false;
      work.push(fsyncDir(this.dir));
    }
    this.syncInFlight = Promise.all(work).then(
      () => {
        this.syncCount++;
        this.syncInFlight = undefined;
        this.markDurable(covered);
        this.maybeStartSync();
      },
      (error: unknown) => {
        this.syncInFlight = undefined;
        this.fail(error, 'fdatasync');
      },
    );
  }

  private markDurable(sequence: number): void {
    if (sequence > this.durableSequence) this.durableSequence = sequence;
    // Old segments now wholly durable need their fds no more (no round is running).
    const stillUnsynced: UnsyncedSegment[] = [];
    for (const old of this.unsynced) {
      if (old.lastSequence <= this.durableSequence) {
        closeFd(old.fd).catch((error: unknown) => this.logger.warn('wal: closing a segment failed', { error: String(error) }));
      } else {
        stillUnsynced.push(old);
      }
    }
    this.unsynced = stillUnsynced;
    const still: SyncWaiter[] = [];
    for (const waiter of this.syncWaiters) {
      if (waiter.sequence <= this.durableSequence) waiter.resolve();
      else still.push(waiter);
    }
    this.syncWaiters = still;
  }

  private fail(error: unknown, operation: string): void {
    if (!this.failure) {
      this.failure = new MirrorsanError(
        'JOURNAL_IO',
        `wal ${operation} failed in ${this.dir} (${errorCode(error) ?? String(error)}); the log accepts no more entries`,
        { cause: error },
      );
      this.logger.error('wal: failed, refusing further appends', { dir: this.dir, operation, error: String(error) });
    }
    const failure = this.failure;
    for (const item of this.queue.splice(0)) item.reject(failure);
    for (const item of this.waiting.splice(0)) item.reject(failure);
    for (const waiter of this.syncWaiters.splice(0)) waiter.reject(failure);
    this.queuedBytes = 0;
  }

  // ---- replay ----------------------------------------------------------------------

  /** Index of the first segment that may hold entries above `sequence`: older ones are skipped unread. */
  private firstSegmentAbove(sequence: number): number {
    let start = 0;
    while (start + 1 < this.segments.length && this.segments[start + 1]!.firstSequence - 1 <= sequence) start++;
    return start;
  }

  /**
   * Replays one segment; returns the sequence expected next (scan: -1 where replay would
   * refuse or repair). `nextFirstSequence` is where the following segment starts, undefined
   * for the last one.
   */
  private async replaySegment(
    segment: Segment,
    nextFirstSequence: number | undefined,
    firstExpected: number,
    fromSequenceExclusive: number,
    onEntry: (entry: LogEntry, payload: Buffer) => void | Promise<void>,
    result: ReplayResult,
    mode: 'replay' | 'scan',
  ): Promise<number> {
    const isLast = nextFirstSequence === undefined;
    const handle = await fs.promises.open(segment.file, isLast && mode === 'replay' ? 'r+' : 'r');
    try {
      const size = (await handle.stat()).size;
      const reader = new WindowReader(handle, size);
      const headerView = await reader.view(0, SEGMENT_HEADER_BYTES);
      const check = decodeSegmentHeader(headerView.buf, headerView.index);
      if (!check.ok || check.header.firstSequence !== segment.firstSequence) {
        const reason = check.ok ? `its header is that of the segment starting at ${check.header.firstSequence}` : check.reason;
        if (mode === 'scan') return isLast ? firstExpected : -1;
        // A rotation renamed a spare (or created the file) and the crash came before its
        // header reached the disk: the segment holds no entries. Only the last one can be
        // like that: a later segment exists only after entries went into this one.
        if (!isLast) throw this.corrupt(segment, 0, `${reason}, in a segment that is not the last`);
        this.logger.warn('wal: the last segment was never started; it is started again', { segment: segment.file, reason });
        segment.fileBytes = size;
        return firstExpected;
      }
      const header = check.header;
      let expected = firstExpected;
      let at = SEGMENT_HEADER_BYTES;
      let stop: NonEntryStep | undefined;
      while (at < size) {
        let view = await reader.view(at, ENTRY_HEADER_BYTES);
        let step = decodeEntryAt(view.buf, view.index, header.generation);
        if (step.status === 'incomplete' && at + step.neededBytes <= size) {
          view = await reader.view(at, step.neededBytes);
          step = decodeEntryAt(view.buf, view.index, header.generation);
        }
        if (step.status !== 'entry') {
          stop = step;
          break;
        }
        if (step.entry.sequence !== expected) {
          if (mode === 'scan') return -1;
          throw this.corrupt(segment, at, `sequence ${step.entry.sequence} where ${expected} was expected (gap or duplicate)`);
        }
        if (step.entry.sequence > fromSequenceExclusive) {
          await onEntry(step.entry, step.payload);
          result.replayedEntries++;
          result.replayedBytes += step.sizeBytes;
        }
        expected++;
        at += step.sizeBytes;
      }
      if (mode === 'scan') return isLast || expected === nextFirstSequence ? expected : -1;
      Object.assign(segment, {
        fileBytes: size,
        endOffset: at,
        capacityBytes: header.capacityBytes,
        generation: header.generation,
        zeroTail: header.zeroTail,
      } satisfies Partial<Segment>);
      if (!isLast) {
        // Every sync round covers the older segments too, so no entry of a later segment
        // was acknowledged durable before an older one was complete on disk: an older
        // segment that ends early is treated as corruption, like an invalid entry followed
        // by valid data (I5).
        if (expected !== nextFirstSequence) {
          const why = stop ? stepReason(stop) : 'end of file';
          throw this.corrupt(segment, at, `${why} after sequence ${expected - 1}, but the next segment starts at sequence ${nextFirstSequence}`);
        }
        return expected;
      }
      if (stop) await this.endLastSegment(segment, handle, reader, at, stop, expected, result);
      return expected;
    } finally {
      await handle.close();
    }
  }

  /**
   * Decides what ends the last segment at `at` (see judgeLogEnd) and cuts a torn tail: its
   * bytes are zeroed, so no later torn append can combine with them into something valid,
   * and the file keeps its size (a growing segment is truncated instead, as it holds only
   * whole entries). The next append overwrites from `at`.
   */
  private async endLastSegment(
    segment: Segment,
    handle: fs.promises.FileHandle,
    reader: WindowReader,
    at: number,
    stop: NonEntryStep,
    expected: number,
    result: ReplayResult,
  ): Promise<void> {
    const generation = segment.generation!;
    // An incomplete entry runs to the end of the file: nothing complete can follow it.
    if (stop.status !== 'incomplete') {
      const validAt = await reader.findValidHeader(scanStartAfter(stop, at), expected - 1, generation);
      if (validAt >= 0) throw this.corrupt(segment, at, `${stepReason(stop)}; a valid entry follows at offset ${validAt}`);
    }
    const size = reader.size;
    // A fresh segment: everything this life left past `at`. A reused one: only the bytes
    // where the next header would be matter (for the verdict's words).
    const dirtyEnd = segment.zeroTail
      ? await reader.nonZeroEnd(at)
      : (await reader.isZero(at, Math.min(size, at + ENTRY_HEADER_BYTES)))
        ? at
        : Math.min(size, at + ENTRY_HEADER_BYTES);
    const verdict = judgeLogEnd(stop, { staleTail: !segment.zeroTail, nonZeroAfter: dirtyEnd > at });
    if (verdict.kind === 'clean') {
      this.logger.debug('wal: log ends', { segment: segment.file, offsetBytes: at, reason: verdict.reason });
      return;
    }
    let cutBytes: number;
    if (segment.capacityBytes === 0) {
      cutBytes = size - at;
      await handle.truncate(at);
      segment.fileBytes = at;
    } else {
      const trustedBytes = stop.status === 'invalid' ? stop.sizeBytes : stop.status === 'incomplete' ? stop.neededBytes : 0;
      const end = segment.zeroTail ? dirtyEnd : Math.min(size, at + Math.max(ENTRY_HEADER_BYTES, trustedBytes));
      cutBytes = end - at;
      for (let from = at; from < end; from += FILL_CHUNK_BYTES) {
        await writeAll(handle.fd, ZEROS.subarray(0, Math.min(FILL_CHUNK_BYTES, end - from)), from);
      }
    }
    await handle.datasync();
    result.cutTail = true;
    this.logger.warn('wal: cut torn tail', { segment: segment.file, offsetBytes: at, cutBytes, reason: verdict.reason });
  }

  /**
   * Opens the last segment for appending when the log ends exactly at `lastSequence` (its
   * next entry is `lastSequence + 1`), else starts a segment there. The latter happens when
   * the whole log lies below the checkpoint; those old segments go at the next
   * dropSegmentsUpTo().
   */
  private async openActiveSegment(logNextSequence: number | undefined, lastSequence: number): Promise<void> {
    const last = this.segments[this.segments.length - 1];
    if (last && logNextSequence === lastSequence + 1) {
      this.fd = await openFd(last.file, 'r+');
      if (last.generation === undefined) await this.restartSegment(last);
      return;
    }
    if (last && (last.generation === undefined || last.endOffset === SEGMENT_HEADER_BYTES)) {
      // An empty segment that does not continue the log carries no entries: remove it so
      // that segment names stay unique and ordered.
      await fs.promises.rm(last.file, { force: true });
      this.segments.pop();
    }
    await this.startSegment(lastSequence + 1, true);
  }

  /** Gives a last segment whose header never made it a header now, with a new generation. */
  private async restartSegment(segment: Segment): Promise<void> {
    // Its content is unknown (a spare of either kind, or a file created for growing).
    const preallocated = segment.fileBytes > SEGMENT_HEADER_BYTES;
    const header: SegmentHeader = {
      firstSequence: segment.firstSequence,
      capacityBytes: preallocated ? segment.fileBytes : 0,
      generation: newGeneration(),
      zeroTail: !preallocated,
    };
    await writeAll(this.fd, encodeSegmentHeader(header), 0);
    if (!preallocated) await ftruncate(this.fd, SEGMENT_HEADER_BYTES);
    Object.assign(segment, {
      fileBytes: Math.max(segment.fileBytes, SEGMENT_HEADER_BYTES),
      endOffset: SEGMENT_HEADER_BYTES,
      capacityBytes: header.capacityBytes,
      generation: header.generation,
      zeroTail: header.zeroTail,
    } satisfies Partial<Segment>);
    this.dirSyncNeeded = true;
  }

  private corrupt(segment: Segment, offsetBytes: number, reason: string): MirrorsanError {
    this.logger.error('wal: corrupt entry', { segment: segment.file, offsetBytes, reason });
    return new MirrorsanError('JOURNAL_CORRUPT', `wal segment ${segment.file} is corrupt at offset ${offsetBytes}: ${reason}`);
  }
}

/** Reads a file through a window; each refill is a new buffer, so earlier views stay valid. */
class WindowReader {
  private readonly handle: fs.promises.FileHandle;
  readonly size: number;
  private buf = Buffer.alloc(0);
  private base = 0;

  constructor(handle: fs.promises.FileHandle, size: number) {
    this.handle = handle;
    this.size = size;
  }

  /** A buffer holding [at, at + min(want, size - at)) at `index` (more may follow). */
  async view(at: number, want: number): Promise<{ buf: Buffer; index: number }> {
    const end = Math.min(this.size, at + want);
    if (at < this.base || end > this.base + this.buf.length) {
      // `want` is at most one entry, which the codec bounds by ENTRY_PAYLOAD_MAX_BYTES.
      assert(want <= Math.max(REPLAY_WINDOW_BYTES, ENTRY_HEADER_BYTES + ENTRY_PAYLOAD_MAX_BYTES), 'wal: oversized read');
      const length = Math.max(0, Math.min(this.size - at, Math.max(want, REPLAY_WINDOW_BYTES)));
      const buf = Buffer.allocUnsafe(length);
      let done = 0;
      while (done < length) {
        const { bytesRead } = await this.handle.read(buf, done, length - done, at + done);
        if (bytesRead === 0) break;
        done += bytesRead;
      }
      this.buf = buf.subarray(0, done);
      this.base = at;
    }
    // Clip the view to the file so decoders see the real end of input.
    return { buf: this.buf.subarray(0, Math.min(this.buf.length, this.size - this.base)), index: at - this.base };
  }

  /**
   * Offset of the first valid header of `generation` at or after `from` with a sequence
   * above `sequenceAbove`, or -1.
   */
  async findValidHeader(from: number, sequenceAbove: number, generation: number): Promise<number> {
    let at = from;
    while (at + ENTRY_HEADER_BYTES <= this.size) {
      const { buf, index } = await this.view(at, REPLAY_WINDOW_BYTES);
      const window = buf.subarray(index);
      const found = findValidHeader(window, 0, sequenceAbove, generation);
      if (found >= 0) return at + found;
      if (at + window.length >= this.size) return -1;
      // Overlap windows so a header straddling the boundary is seen whole in the next one.
      at += Math.max(1, window.length - (ENTRY_HEADER_BYTES - 1));
    }
    return -1;
  }

  async isZero(start: number, end: number): Promise<boolean> {
    if (end <= start) return true;
    const { buf, index } = await this.view(start, end - start);
    return isZeroRange(buf, index, index + (end - start));
  }

  /** Just past the last non-zero byte at or after `from`, rounded up to a page; `from` when there is none. */
  async nonZeroEnd(from: number): Promise<number> {
    let last = from;
    for (let at = from; at < this.size; ) {
      const { buf, index } = await this.view(at, REPLAY_WINDOW_BYTES);
      const window = buf.subarray(index);
      if (window.length === 0) break;
      if (!isZeroRange(window, 0, window.length)) {
        for (let pageEnd = window.length; pageEnd > 0; pageEnd -= PAGE_BYTES) {
          const pageStart = Math.max(0, pageEnd - PAGE_BYTES);
          if (!isZeroRange(window, pageStart, pageEnd)) {
            last = at + pageEnd;
            break;
          }
        }
      }
      at += window.length;
    }
    return last;
  }
}
