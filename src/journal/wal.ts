// The write-ahead log: the I/O shell around the entry codec. Generic over what it logs (the
// local volume's writes, later the mirror engine's per-source containers): entries carry a
// source id and a sequence number that the caller assigns, consecutive from 1.
//
// Files: DIR/<first sequence, 20 digits>.log, one per segment; a segment holds consecutive
// entries and a new one starts at rotate() (checkpoints rotate, then drop covered segments).
//
// Group commit: appends queue while a write is in flight and then go out together in one
// positional writev (split at IOV_MAX), header and payload as separate iovecs (never copied);
// one fdatasync serves every sync() waiting when it starts. The queue is bounded in bytes:
// an append past the bound waits its turn (backpressure) instead of growing memory.
//
// Failure: an error writing or syncing the log leaves its tail unknown (and after a failed
// fdatasync the page cache may have dropped the data: "fsyncgate"), so the log fails for
// good: every queued and later call rejects with JOURNAL_IO, and recovery sorts out the tail.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { MirrorsanError, assert } from '../errors.js';
import type { Logger } from '../util/log.js';
import { InlineIoPolicy, closeFd, errorCode, fdatasync, fsyncDir, openFd, writevAll } from '../store/file-io.js';
import {
  ENTRY_HEADER_BYTES,
  ENTRY_PAYLOAD_MAX_BYTES,
  decodeEntryAt,
  encodeHeader,
  entrySizeBytes,
  findValidHeader,
  type LogEntry,
} from './entry.js';

const SEGMENT_NAME = /^(\d{20})\.log$/;
const DEFAULT_MAX_QUEUED_BYTES = 64 * 1024 * 1024;
const DEFAULT_MAX_WAITING_APPENDS = 65_536;
/** Bytes read at a time during replay (an entry larger than this is read whole). */
const REPLAY_WINDOW_BYTES = 8 * 1024 * 1024;

export interface WalOptions {
  dir: string;
  logger: Logger;
  /** Bytes of appended-but-unwritten entries before append() waits. Default 64 MiB. */
  maxQueuedBytes?: number;
  /** Appends allowed to wait for queue space before append() fails with VOLUME_BUSY. */
  maxWaitingAppends?: number;
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
  bytes: number;
  queuedBytes: number;
  syncs: number;
  groupCommitBatches: number;
  writevCalls: number;
}

interface Segment {
  firstSequence: number;
  file: string;
  sizeBytes: number;
}

interface PendingAppend {
  kind: 'entry';
  sequence: number;
  header: Buffer;
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

export function segmentFileName(firstSequence: number): string {
  return `${String(firstSequence).padStart(20, '0')}.log`;
}

export class WriteAheadLog {
  readonly dir: string;
  private readonly logger: Logger;
  private readonly maxQueuedBytes: number;
  private readonly maxWaitingAppends: number;
  /**
   * Group-commit batches of up to 256 KiB are appended inline on the event loop while the
   * page cache takes them fast: handing each batch to a pool thread costs wake-ups that, on a
   * small machine, are a large part of a 4k write (see InlineIoPolicy).
   */
  private readonly ioPolicy = new InlineIoPolicy({ inlineMaxBytes: 256 * 1024 });
  /** Oldest first; the last one is the active segment once replay() has run. */
  private segments: Segment[];
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
  /** A segment was created since the last directory fsync. */
  private dirSyncNeeded = false;

  private syncCount = 0;
  private batchCount = 0;
  private writevCount = 0;

  private constructor(options: WalOptions, segments: Segment[]) {
    this.dir = options.dir;
    this.logger = options.logger;
    this.maxQueuedBytes = options.maxQueuedBytes ?? DEFAULT_MAX_QUEUED_BYTES;
    this.maxWaitingAppends = options.maxWaitingAppends ?? DEFAULT_MAX_WAITING_APPENDS;
    assert(this.maxQueuedBytes >= entrySizeBytes(0), 'maxQueuedBytes too small');
    this.segments = segments;
  }

  /** Opens (creating if needed) the log directory. Call replay() before appending. */
  static async open(options: WalOptions): Promise<WriteAheadLog> {
    await fs.promises.mkdir(options.dir, { recursive: true });
    const segments: Segment[] = [];
    for (const name of await fs.promises.readdir(options.dir)) {
      const match = SEGMENT_NAME.exec(name);
      if (!match) continue;
      const firstSequence = Number(match[1]);
      assert(Number.isSafeInteger(firstSequence), `segment name ${name}`);
      const file = path.join(options.dir, name);
      segments.push({ firstSequence, file, sizeBytes: (await fs.promises.stat(file)).size });
    }
    segments.sort((a, b) => a.firstSequence - b.firstSequence);
    return new WriteAheadLog(options, segments);
  }

  get lastSequence(): number {
    return this.appendedSequence;
  }

  get syncedSequence(): number {
    return this.durableSequence;
  }

  /** Total bytes of all segment files. */
  get bytes(): number {
    let total = 0;
    for (const segment of this.segments) total += segment.sizeBytes;
    return total + this.queuedBytes;
  }

  stats(): WalStats {
    return {
      lastSequence: this.appendedSequence,
      writtenSequence: this.writtenSequence,
      durableSequence: this.durableSequence,
      segments: this.segments.length,
      bytes: this.bytes,
      queuedBytes: this.queuedBytes,
      syncs: this.syncCount,
      groupCommitBatches: this.batchCount,
      writevCalls: this.writevCount,
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
    assert(entry.sequence === this.appendedSequence + 1, `wal: append of sequence ${entry.sequence} after ${this.appendedSequence}`);
    if (this.failure) throw this.failure;
    if (this.closed) throw new MirrorsanError('JOURNAL_CLOSED', `wal ${this.dir} is closed`);
    if (this.waiting.length >= this.maxWaitingAppends) {
      throw new MirrorsanError('VOLUME_BUSY', `wal ${this.dir}: ${this.waiting.length} appends already wait for queue space`);
    }
    const header = encodeHeader(entry, payload);
    this.appendedSequence = entry.sequence;
    return new Promise<void>((resolve, reject) => {
      const item: PendingAppend = {
        kind: 'entry',
        sequence: entry.sequence,
        header,
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
    assert(target <= this.appendedSequence, `wal: sync of sequence ${target} beyond ${this.appendedSequence}`);
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
   * Deletes the segments whose entries all have sequences <= `sequence` (the caller made
   * them durable elsewhere: a checkpoint); returns how many. The deletions need no
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
    for (const segment of victims) await fs.promises.rm(segment.file, { force: true });
    return victims.length;
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
    // Skip segments wholly at or below the checkpoint without reading them.
    let start = 0;
    while (start + 1 < this.segments.length && this.segments[start + 1]!.firstSequence - 1 <= fromSequenceExclusive) start++;
    let expected: number | undefined;
    for (let index = start; index < this.segments.length; index++) {
      const segment = this.segments[index]!;
      const isLast = index === this.segments.length - 1;
      if (expected === undefined) {
        if (segment.firstSequence > fromSequenceExclusive + 1) {
          throw this.corrupt(segment, 0, `log starts at sequence ${segment.firstSequence} but the checkpoint is at ${fromSequenceExclusive}`);
        }
        expected = segment.firstSequence;
      } else if (segment.firstSequence !== expected) {
        throw this.corrupt(segment, 0, `segment starts at sequence ${segment.firstSequence}, ${expected} was expected`);
      }
      expected = await this.replaySegment(segment, isLast, expected, fromSequenceExclusive, onEntry, result);
    }
    const lastInLog = expected === undefined ? 0 : expected - 1;
    result.lastSequence = Math.max(lastInLog, fromSequenceExclusive);
    await this.openActiveSegment(expected, result.lastSequence);
    this.appendedSequence = this.writtenSequence = this.durableSequence = result.lastSequence;
    this.ready = true;
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
    for (const [index, segment] of this.segments.entries()) {
      if (expected !== undefined && segment.firstSequence !== expected) return;
      expected ??= segment.firstSequence;
      const next = await this.replaySegment(
        segment,
        index === this.segments.length - 1,
        expected,
        fromSequenceExclusive,
        (entry) => onEntry(entry),
        ignored,
        'scan',
      );
      if (next < 0) return;
      expected = next;
    }
  }

  /** Writes and syncs everything queued, then closes the active segment. */
  async close(): Promise<void> {
    if (this.closed) return;
    if (this.ready && !this.failure) await this.sync().catch(() => undefined);
    this.closed = true;
    await this.writerIdle;
    await this.syncInFlight;
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

  private async writeBatch(): Promise<void> {
    let count = 0;
    let bytes = 0;
    const iovecs: Buffer[] = [];
    while (count < this.queue.length) {
      const item = this.queue[count]!;
      if (item.kind !== 'entry') break;
      iovecs.push(item.header);
      if (item.payload) iovecs.push(item.payload);
      bytes += item.sizeBytes;
      count++;
    }
    const batch = this.queue.splice(0, count) as PendingAppend[];
    const segment = this.activeSegment();
    try {
      this.writevCount += await writevAll(this.fd, iovecs, segment.sizeBytes, this.ioPolicy);
    } catch (error) {
      this.fail(error, 'write');
      for (const item of batch) item.reject(this.failure);
      return;
    }
    segment.sizeBytes += bytes;
    this.queuedBytes -= bytes;
    this.writtenSequence = batch[batch.length - 1]!.sequence;
    this.batchCount++;
    for (const item of batch) item.resolve();
    this.maybeStartSync();
  }

  private activeSegment(): Segment {
    const segment = this.segments[this.segments.length - 1];
    assert(segment !== undefined && this.fd >= 0, 'wal: no active segment');
    return segment;
  }

  private async performRotation(request: PendingRotate): Promise<void> {
    this.rotating = true;
    try {
      await this.rotateActiveSegment();
    } catch (error) {
      this.fail(error, 'rotate');
      request.reject(this.failure);
      return;
    } finally {
      this.rotating = false;
    }
    request.resolve(this.writtenSequence);
    this.maybeStartSync();
  }

  private async rotateActiveSegment(): Promise<void> {
    const segment = this.activeSegment();
    if (segment.sizeBytes === 0) return;
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
    await this.createSegment(this.writtenSequence + 1);
  }

  private async createSegment(firstSequence: number): Promise<void> {
    const file = path.join(this.dir, segmentFileName(firstSequence));
    this.fd = await openFd(file, 'wx');
    this.segments.push({ firstSequence, file, sizeBytes: 0 });
    // Its directory entry must be durable before its data is called durable: the next
    // sync round fsyncs the directory too.
    this.dirSyncNeeded = true;
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

  /** Replays one segment; returns the sequence expected next. */
  private async replaySegment(
    segment: Segment,
    isLast: boolean,
    firstExpected: number,
    fromSequenceExclusive: number,
    onEntry: (entry: LogEntry, payload: Buffer) => void | Promise<void>,
    result: ReplayResult,
    mode: 'replay' | 'scan' = 'replay',
  ): Promise<number> {
    let expected = firstExpected;
    const handle = await fs.promises.open(segment.file, isLast && mode === 'replay' ? 'r+' : 'r');
    try {
      const size = (await handle.stat()).size;
      segment.sizeBytes = size;
      const reader = new WindowReader(handle, size);
      let at = 0;
      while (at < size) {
        let view = await reader.view(at, ENTRY_HEADER_BYTES);
        let step = decodeEntryAt(view.buf, view.index);
        if (step.status === 'incomplete' && at + step.neededBytes <= size) {
          view = await reader.view(at, step.neededBytes);
          step = decodeEntryAt(view.buf, view.index);
        }
        if (step.status === 'entry') {
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
          continue;
        }
        // A bad or incomplete entry: a torn tail if nothing valid follows it, and only in
        // the last segment. Every sync round covers the older segments too, so no entry of a
        // later segment was acknowledged durable before an older one was complete on disk;
        // a bad older segment next to newer data is therefore treated as corruption, the
        // rule for "an invalid entry followed by valid data" (I5).
        // A scan only looks ahead; replay decides (and says) what a bad entry means.
        if (mode === 'scan') return -1;
        const reason = step.status === 'incomplete' ? 'incomplete entry' : step.reason;
        const scanFrom = step.headerTrusted && step.status === 'invalid' ? at + step.sizeBytes : at + 1;
        const validAt = step.status === 'incomplete' ? -1 : await reader.findValidHeader(scanFrom, expected - 1);
        if (validAt >= 0) throw this.corrupt(segment, at, `${reason}; a valid entry follows at offset ${validAt}`);
        if (!isLast) throw this.corrupt(segment, at, `${reason} in a segment that is not the last`);
        await handle.truncate(at);
        await handle.datasync();
        segment.sizeBytes = at;
        result.cutTail = true;
        this.logger.warn('wal: cut torn tail', { segment: segment.file, offsetBytes: at, cutBytes: size - at, reason });
        break;
      }
    } finally {
      await handle.close();
    }
    return expected;
  }

  /**
   * Opens the last segment for appending when the log ends exactly at `lastSequence` (its
   * next entry is `lastSequence + 1`), else creates a segment starting there. The latter
   * happens when the whole log lies below the checkpoint; those old segments go at the
   * next dropSegmentsUpTo().
   */
  private async openActiveSegment(logNextSequence: number | undefined, lastSequence: number): Promise<void> {
    const last = this.segments[this.segments.length - 1];
    if (last && logNextSequence === lastSequence + 1) {
      this.fd = await openFd(last.file, 'r+');
      return;
    }
    if (last && last.sizeBytes === 0) {
      // An empty segment that does not continue the log carries no entries: remove it so
      // that segment names stay unique and ordered.
      await fs.promises.rm(last.file, { force: true });
      this.segments.pop();
    }
    await this.createSegment(lastSequence + 1);
  }

  private corrupt(segment: Segment, offsetBytes: number, reason: string): MirrorsanError {
    this.logger.error('wal: corrupt entry', { segment: segment.file, offsetBytes, reason });
    return new MirrorsanError('JOURNAL_CORRUPT', `wal segment ${segment.file} is corrupt at offset ${offsetBytes}: ${reason}`);
  }
}

/** Reads a file through a window; each refill is a new buffer, so earlier views stay valid. */
class WindowReader {
  private readonly handle: fs.promises.FileHandle;
  private readonly size: number;
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
      const length = Math.min(this.size - at, Math.max(want, REPLAY_WINDOW_BYTES));
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

  /** Offset of the first valid header at or after `from` with a sequence above `sequenceAbove`, or -1. */
  async findValidHeader(from: number, sequenceAbove: number): Promise<number> {
    let at = from;
    while (at + ENTRY_HEADER_BYTES <= this.size) {
      const { buf, index } = await this.view(at, REPLAY_WINDOW_BYTES);
      const window = buf.subarray(index);
      const found = findValidHeader(window, 0, sequenceAbove);
      if (found >= 0) return at + found;
      if (at + window.length >= this.size) return -1;
      // Overlap windows so a header straddling the boundary is seen whole in the next one.
      at += Math.max(1, window.length - (ENTRY_HEADER_BYTES - 1));
    }
    return -1;
  }
}
