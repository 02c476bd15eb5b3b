// The durable single-node volume: a sparse image file, its allocation map and a write-ahead
// log, composed as one BlockDevice. Files in DIR:
//   volume.img       the image: its bytes always equal the volume's content
//   alloc.map        the allocation map as of the last checkpoint (with its sequence)
//   checkpoint.json  {seq: S, ...}: the image is durable up to log sequence S
//   wal/             log segments; entries above S are replayed at open
//
// Write path: range lock (overlapping requests keep their arrival order), next sequence,
// log append and image pwrite in parallel, then the acknowledgement; FUA adds a group-
// committed fdatasync of the log, FLUSH is one for everything appended so far. Writes are
// acknowledged only once they are in the image, so every connection sees every acknowledged
// write and multi-conn is safe.
//
// One ordering exception, for crash safety: a write that allocates blocks waits for its log
// entry to be in the log file before it touches the image. Otherwise a crash (even a plain
// SIGKILL) could leave data of an unlogged write in blocks that the recovered map calls
// unallocated, breaking "the image equals the content" and leaking stale bytes into a later
// partial write of that block. Overwrites of allocated blocks, zeroing and trimming need no
// such wait: whatever of them survives in the image is consistent with the recovered map.
// For the same reason a partial write into an unallocated block writes the whole block,
// padding with zeros, so that block never depends on what the file held before.
//
// Large block-aligned writes (>= directWriteMinBytes) go to the image only, and the log gets
// a DIRECT_WRITE entry without payload: copying 1 MiB writes twice would halve throughput.
// Their durability comes from syncing the image (FLUSH and FUA sync the image as well as the
// log when such writes happened), and replay never applies an older entry over blocks that a
// newer DIRECT_WRITE owns (SupersedeIndex), because the image already holds the newer bytes.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { MirrorsanError, assert, isMirrorsanError } from '../errors.js';
import { ENTRY_TYPE, type EntryType, type LogEntry } from '../journal/entry.js';
import { WriteAheadLog } from '../journal/wal.js';
import { AllocationMap } from '../store/alloc-map.js';
import { writeFileDurable } from '../store/file-io.js';
import { ImageFile, fileExists, type ImageFaults } from '../store/image.js';
import { RangeLock } from '../store/range-lock.js';
import { SupersedeIndex } from '../store/supersede-index.js';
import { VolumeApplier, planZero } from './applier.js';
import { CoalescedRun } from '../util/coalesced-run.js';
import type { Logger } from '../util/log.js';
import type { BlockDevice, DeviceGeometry, Extent, ReadPiece, WriteOptions, ZeroOptions } from './device.js';

const MiB = 1024 * 1024;
export const PAYLOAD_MAX_BYTES = 32 * MiB;
/** FAST_ZERO requests fail (NBD_ENOTSUP) when they would write more zeros than this. */
export const FAST_ZERO_MAX_WRITE_BYTES = 1 * MiB;
const DEFAULT_CHECKPOINT_LOG_BYTES = 256 * MiB;
const DEFAULT_CHECKPOINT_INTERVAL_MS = 30_000;
const DEFAULT_BLOCK_SIZE_BYTES = 4096;
/** Aligned writes at least this large bypass the log's payload (see the header comment). */
const DEFAULT_DIRECT_WRITE_MIN_BYTES = 64 * 1024;
/** Checkpoint after this many bytes of direct writes, so replay's look-ahead stays small. */
const DEFAULT_CHECKPOINT_DIRECT_BYTES = 4 * 1024 * MiB;
/** Log entries applied concurrently during replay (overlapping ones still in order). */
const REPLAY_CONCURRENCY = 16;
/** A read touching more allocated runs than this reads its span in one pread. */
const READ_RUNS_PER_PREAD_MAX = 8;
/** At most this many extents per BLOCK_STATUS answer (it may cover less than asked). */
const BLOCK_STATUS_EXTENTS_MAX = 65_536;
const CHECKPOINT_FORMAT = 1;
const EMPTY = Buffer.alloc(0);

export interface LocalVolumeOptions {
  dir: string;
  name: string;
  sizeBytes: number;
  description?: string;
  /** Refuse client writes (recovery still replays the log into the image). */
  readOnly?: boolean;
  logger: Logger;
  /** Checkpoint once the log holds this many bytes. Default 256 MiB. */
  checkpointLogBytes?: number;
  /** Checkpoint this often while there are new entries. Default 30 s; 0 disables the timer. */
  checkpointIntervalMs?: number;
  /** Allocation granularity. Default 4096; a volume keeps the one it was created with. */
  blockSizeBytes?: number;
  /** Aligned writes of at least this many bytes go to the image only. Default 64 KiB; 0 never. */
  directWriteMinBytes?: number;
  /** Source id stamped on log entries (the node id, for the mirror engine). Default 0. */
  sourceId?: number;
  /** Test-only fault injection in the image layer. */
  faults?: ImageFaults;
}

export interface RecoveryInfo {
  replayedEntries: number;
  replayedBytes: number;
  cutTail: boolean;
  durationMs: number;
  /** The checkpoint replay started from. */
  checkpointSequence: number;
}

export interface LocalVolumeStats {
  lastSequence: number;
  checkpointSequence: number;
  walBytes: number;
  walSegments: number;
  inflightWrites: number;
  allocatedBytes: number;
  /** fdatasync calls on the log (each may serve many FLUSH/FUA requests). */
  syncs: number;
  groupCommitBatches: number;
  /** fdatasync calls on the image (checkpoints, and FLUSH/FUA after direct writes). */
  imageSyncs: number;
  /** Small image I/O done inline on the event loop, and how often slowness sent it back to the pool. */
  inlineIoCalls: number;
  inlineIoFallbacks: number;
  checkpoints: number;
}

interface CheckpointRecord {
  format: number;
  seq: number;
  sizeBytes: number;
  blockSizeBytes: number;
  name: string;
}


export class LocalVolume implements BlockDevice {
  readonly name: string;
  readonly description: string;
  readonly recovery: RecoveryInfo;
  private readonly dir: string;
  private readonly sizeBytes: number;
  private readonly blockSizeBytes: number;
  private readonly readOnly: boolean;
  private readonly sourceId: number;
  private readonly logger: Logger;
  private readonly image: ImageFile;
  private readonly map: AllocationMap;
  private readonly wal: WriteAheadLog;
  private readonly locks = new RangeLock();
  private readonly applier: VolumeApplier;
  private readonly checkpointLogBytes: number;
  private readonly directWriteMinBytes: number;
  private readonly timer: NodeJS.Timeout | undefined;
  /** Group commit of image fdatasyncs for direct writes. */
  private readonly imageSync: CoalescedRun;
  /** Direct writes applied to the image, and how many of them an image sync covers. */
  private directApplied = 0;
  private directSynced = 0;
  private directBytesSinceCheckpoint = 0;

  private sequence: number;
  private checkpointSequence: number;
  private inflight = 0;
  private drainWaiters: (() => void)[] = [];
  /** While set, new requests wait (a checkpoint is snapshotting). */
  private gate: Promise<void> | undefined;
  private checkpointRunning: Promise<void> | undefined;
  private checkpointCount = 0;
  private failure: MirrorsanError | undefined;
  private closed = false;
  private closing: Promise<void> | undefined;

  private constructor(init: {
    options: LocalVolumeOptions;
    blockSizeBytes: number;
    image: ImageFile;
    map: AllocationMap;
    wal: WriteAheadLog;
    checkpointSequence: number;
    lastSequence: number;
    recovery: RecoveryInfo;
  }) {
    const { options } = init;
    this.name = options.name;
    this.description = options.description ?? '';
    this.dir = options.dir;
    this.sizeBytes = options.sizeBytes;
    this.blockSizeBytes = init.blockSizeBytes;
    this.readOnly = options.readOnly ?? false;
    this.sourceId = options.sourceId ?? 0;
    this.logger = options.logger;
    this.image = init.image;
    this.map = init.map;
    this.wal = init.wal;
    this.applier = new VolumeApplier(init.image, init.map, init.blockSizeBytes);
    this.checkpointLogBytes = options.checkpointLogBytes ?? DEFAULT_CHECKPOINT_LOG_BYTES;
    this.directWriteMinBytes = options.directWriteMinBytes ?? DEFAULT_DIRECT_WRITE_MIN_BYTES;
    this.imageSync = new CoalescedRun(async () => {
      const covered = this.directApplied;
      await this.image.datasync();
      this.directSynced = Math.max(this.directSynced, covered);
    });
    this.checkpointSequence = init.checkpointSequence;
    this.sequence = init.lastSequence;
    this.recovery = init.recovery;
    const intervalMs = options.checkpointIntervalMs ?? DEFAULT_CHECKPOINT_INTERVAL_MS;
    if (intervalMs > 0) {
      this.timer = setInterval(() => {
        if (this.sequence > this.checkpointSequence) this.backgroundCheckpoint('interval');
      }, intervalMs);
      this.timer.unref();
    }
  }

  /** Creates the volume in `dir` if it does not exist, else opens it and replays its log. */
  static async open(options: LocalVolumeOptions): Promise<LocalVolume> {
    const startedMs = performance.now();
    const logger = options.logger;
    validateOptions(options);
    await fs.promises.mkdir(options.dir, { recursive: true });
    const files = volumeFiles(options.dir);
    let record: CheckpointRecord;
    let map: AllocationMap;
    let image: ImageFile;
    if (!(await fileExists(files.checkpoint))) {
      record = await createVolumeFiles(options, files);
      map = AllocationMap.forSize(options.sizeBytes, record.blockSizeBytes);
      image = await ImageFile.open({ ...imageOptions(options, files, record.blockSizeBytes), create: false });
      logger.info('volume created', { name: options.name, dir: options.dir, sizeBytes: options.sizeBytes });
    } else {
      record = await readCheckpoint(files.checkpoint);
      if (record.sizeBytes !== options.sizeBytes) {
        throw new MirrorsanError(
          'CONFIG_INVALID',
          `volume ${options.name} in ${options.dir} has ${record.sizeBytes} bytes, not ${options.sizeBytes} (resizing is not supported here)`,
        );
      }
      if (options.blockSizeBytes !== undefined && options.blockSizeBytes !== record.blockSizeBytes) {
        throw new MirrorsanError(
          'CONFIG_INVALID',
          `volume ${options.name} was created with ${record.blockSizeBytes}-byte blocks, not ${options.blockSizeBytes}`,
        );
      }
      const loaded = AllocationMap.deserialize(await fs.promises.readFile(files.allocMap), files.allocMap);
      map = loaded.map;
      if (map.blockSizeBytes !== record.blockSizeBytes || map.blockCount * map.blockSizeBytes !== record.sizeBytes) {
        throw new MirrorsanError('STORE_IO', `${files.allocMap} does not match ${files.checkpoint}`);
      }
      // alloc.map is written before checkpoint.json, so it is never older; newer means a
      // crash between the two renames, and then it is the checkpoint (the image was synced).
      if (loaded.sequence < record.seq) {
        throw new MirrorsanError('STORE_IO', `${files.allocMap} is at sequence ${loaded.sequence}, older than checkpoint ${record.seq}`);
      }
      record = { ...record, seq: loaded.sequence };
      image = await ImageFile.open({ ...imageOptions(options, files, record.blockSizeBytes), create: false });
    }

    const wal = await WriteAheadLog.open({ dir: files.wal, logger: logger.child('wal') });
    const supersede = new SupersedeIndex();
    await wal.scan(record.seq, (entry) => {
      if (entry.type !== ENTRY_TYPE.DIRECT_WRITE) return;
      const bs = record.blockSizeBytes;
      if (entry.offset % bs === 0 && entry.lengthBytes % bs === 0) supersede.add(entry.sequence, entry.offset / bs, entry.lengthBytes / bs);
    });
    const replayer = new Replayer(options.sizeBytes, record.blockSizeBytes, supersede);
    try {
      const applier = new VolumeApplier(image, map, record.blockSizeBytes);
      const result = await wal.replay(record.seq, (entry, payload) => replayer.apply(entry, payload, applier));
      await replayer.finish();
      const recovery: RecoveryInfo = {
        replayedEntries: result.replayedEntries,
        replayedBytes: result.replayedBytes,
        cutTail: result.cutTail,
        durationMs: Math.round(performance.now() - startedMs),
        checkpointSequence: record.seq,
      };
      const volume = new LocalVolume({
        options,
        blockSizeBytes: record.blockSizeBytes,
        image,
        map,
        wal,
        checkpointSequence: record.seq,
        lastSequence: result.lastSequence,
        recovery,
      });
      logger.info('volume opened', { name: options.name, lastSequence: result.lastSequence, ...recovery });
      return volume;
    } catch (error) {
      // Let replayed writes still in flight finish before their file descriptor goes away.
      await replayer.finish().catch(() => undefined);
      await wal.close().catch(() => undefined);
      await image.close().catch(() => undefined);
      throw error;
    }
  }

  geometry(): DeviceGeometry {
    return {
      sizeBytes: this.sizeBytes,
      blockSizeMin: 512,
      blockSizePreferred: this.blockSizeBytes,
      payloadMaxBytes: PAYLOAD_MAX_BYTES,
      readOnly: this.readOnly,
      multiConn: true,
    };
  }

  async read(offset: number, length: number): Promise<ReadPiece[]> {
    this.checkOpen();
    this.checkRange(offset, length);
    if (length === 0) return [];
    const bs = this.blockSizeBytes;
    const end = offset + length;
    const firstBlock = Math.floor(offset / bs);
    const runs = this.map.runs(firstBlock, Math.ceil(end / bs) - firstBlock);
    const pieces: ReadPiece[] = [];
    const dataRuns: { start: number; end: number; index: number }[] = [];
    for (const run of runs) {
      const start = Math.max(offset, run.firstBlock * bs);
      const stop = Math.min(end, (run.firstBlock + run.blockCount) * bs);
      if (run.allocated) {
        dataRuns.push({ start, end: stop, index: pieces.length });
        pieces.push({ offset: start, kind: 'data', data: EMPTY }); // filled in below
      } else {
        pieces.push({ offset: start, kind: 'zero', length: stop - start });
      }
    }
    if (dataRuns.length === 0) return pieces;
    const spanStart = dataRuns[0]!.start;
    const spanEnd = dataRuns[dataRuns.length - 1]!.end;
    if (dataRuns.length > READ_RUNS_PER_PREAD_MAX) {
      // Fragmented: one pread of the whole span (the image holds zeros in the gaps anyway)
      // is cheaper than many; the gaps are still reported as zero pieces.
      const span = Buffer.allocUnsafe(spanEnd - spanStart);
      await this.image.read(spanStart, span);
      for (const run of dataRuns) {
        pieces[run.index] = { offset: run.start, kind: 'data', data: span.subarray(run.start - spanStart, run.end - spanStart) };
      }
      return pieces;
    }
    let total = 0;
    for (const run of dataRuns) total += run.end - run.start;
    const buffer = Buffer.allocUnsafe(total);
    const reads: Promise<void>[] = [];
    let at = 0;
    for (const run of dataRuns) {
      const data = buffer.subarray(at, at + run.end - run.start);
      at += data.length;
      pieces[run.index] = { offset: run.start, kind: 'data', data };
      reads.push(this.image.read(run.start, data));
    }
    await Promise.all(reads);
    return pieces;
  }

  write(offset: number, data: Buffer, options: WriteOptions): Promise<void> {
    const bs = this.blockSizeBytes;
    const direct =
      this.directWriteMinBytes > 0 && data.length >= this.directWriteMinBytes && offset % bs === 0 && data.length % bs === 0;
    if (direct) {
      return this.submit(ENTRY_TYPE.DIRECT_WRITE, offset, data.length, undefined, options.fua, async (applier, logged) => {
        await applier.applyWrite(offset, data, logged);
        this.directApplied++;
        this.directBytesSinceCheckpoint += data.length;
      });
    }
    return this.submit(ENTRY_TYPE.WRITE, offset, data.length, data, options.fua, (applier, logged) =>
      applier.applyWrite(offset, data, logged),
    );
  }

  writeZeroes(offset: number, length: number, options: ZeroOptions): Promise<void> {
    return this.zeroRequest(offset, length, options.mayTrim, options.fua, options.fastZero);
  }

  trim(offset: number, length: number, options: WriteOptions): Promise<void> {
    return this.zeroRequest(offset, length, true, options.fua, false);
  }

  async flush(): Promise<void> {
    this.checkOpen();
    await Promise.all([this.wal.sync(), this.syncDirectWrites()]);
  }

  /** Makes every direct write applied so far durable in the image (shared fdatasync). */
  private async syncDirectWrites(): Promise<void> {
    if (this.directSynced >= this.directApplied) return;
    try {
      await this.imageSync.run();
    } catch (error) {
      throw this.noteFailure(
        isMirrorsanError(error) ? error : new MirrorsanError('STORE_IO', `image sync of ${this.name} failed: ${String(error)}`, { cause: error }),
      );
    }
  }

  async cache(offset: number, length: number): Promise<void> {
    this.checkRange(offset, length);
  }

  blockStatus(offset: number, length: number): Extent[] {
    this.checkOpen();
    this.checkRange(offset, length);
    const bs = this.blockSizeBytes;
    const end = offset + length;
    const firstBlock = Math.floor(offset / bs);
    const runs = this.map.runs(firstBlock, Math.ceil(end / bs) - firstBlock, BLOCK_STATUS_EXTENTS_MAX);
    return runs.map((run) => {
      const start = Math.max(offset, run.firstBlock * bs);
      const stop = Math.min(end, (run.firstBlock + run.blockCount) * bs);
      return { offset: start, length: stop - start, hole: !run.allocated, zero: !run.allocated };
    });
  }

  /**
   * Makes the image durable up to the current sequence, records the checkpoint and drops
   * the log segments it covers. Concurrent calls share one run.
   */
  checkpoint(): Promise<void> {
    this.checkpointRunning ??= this.runCheckpoint().finally(() => {
      this.checkpointRunning = undefined;
      // Writes that arrived during a checkpoint may already have filled the log again.
      if (this.wal.bytes >= this.checkpointLogBytes) this.backgroundCheckpoint('log size');
    });
    return this.checkpointRunning;
  }

  stats(): LocalVolumeStats {
    const wal = this.wal.stats();
    const image = this.image.stats();
    return {
      lastSequence: this.sequence,
      checkpointSequence: this.checkpointSequence,
      walBytes: wal.bytes,
      walSegments: wal.segments,
      inflightWrites: this.inflight,
      allocatedBytes: this.map.allocatedBlocks * this.blockSizeBytes,
      syncs: wal.syncs,
      groupCommitBatches: wal.groupCommitBatches,
      imageSyncs: image.datasyncs,
      inlineIoCalls: image.inlineCalls,
      inlineIoFallbacks: image.inlineFallbacks,
      checkpoints: this.checkpointCount,
    };
  }

  /** Checkpoints (unless the volume failed) and closes its files. Idempotent. */
  close(): Promise<void> {
    this.closing ??= this.closeOnce();
    return this.closing;
  }

  private async closeOnce(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    if (!this.failure) {
      try {
        await this.checkpoint();
      } catch (error) {
        this.logger.error('volume: checkpoint at close failed; the log will be replayed at next open', {
          name: this.name,
          error: String(error),
        });
      }
    }
    this.closed = true;
    await this.drained();
    await this.checkpointRunning?.catch(() => undefined);
    await this.wal.close();
    await this.image.close();
  }

  // ---- requests ----------------------------------------------------------------------

  private async zeroRequest(offset: number, length: number, mayTrim: boolean, fua: boolean, fastZero: boolean): Promise<void> {
    if (fastZero) {
      this.checkWritable(offset, length);
      // Judged on the map as it is now: a hint, decided before anything is logged.
      const slowBytes = planZero(this.map, offset, length, mayTrim).reduce(
        (sum, action) => sum + (action.kind === 'zero' || !this.image.wouldPunch(action.offset, action.length) ? action.length : 0),
        0,
      );
      if (slowBytes > FAST_ZERO_MAX_WRITE_BYTES) {
        throw new MirrorsanError('NBD_ENOTSUP', `fast zero of ${length} bytes would write ${slowBytes} bytes of zeros`);
      }
    }
    const type = mayTrim ? ENTRY_TYPE.TRIM : ENTRY_TYPE.ZERO;
    return this.submit(type, offset, length, undefined, fua, (applier) => applier.applyZero(offset, length, mayTrim));
  }

  /** The common path of every modifying request. */
  private async submit(
    type: EntryType,
    offset: number,
    length: number,
    payload: Buffer | undefined,
    fua: boolean,
    apply: (applier: VolumeApplier, logged: Promise<void>) => Promise<void>,
  ): Promise<void> {
    this.checkWritable(offset, length);
    if (length === 0) return;
    while (this.gate) await this.gate;
    this.checkWritable(offset, length);
    // From here to wal.append nothing awaits: lock order, sequence order and log order agree.
    const bs = this.blockSizeBytes;
    const lease = this.locks.acquire(Math.floor(offset / bs) * bs, Math.ceil((offset + length) / bs) * bs);
    const sequence = this.sequence + 1;
    const entry: LogEntry = { type, flags: 0, sourceId: this.sourceId, sequence, offset, lengthBytes: length };
    let logged: Promise<void>;
    try {
      logged = this.wal.append(entry, payload);
    } catch (error) {
      lease.release();
      throw this.noteFailure(error);
    }
    this.sequence = sequence;
    this.inflight++;
    const applier = this.applier;
    const applied = lease.ready ? lease.ready.then(() => apply(applier, logged)) : apply(applier, logged);
    const [logResult, applyResult] = await Promise.allSettled([logged, applied]);
    lease.release();
    this.endRequest();
    if (applyResult.status === 'rejected') throw this.noteFailure(applyResult.reason);
    if (logResult.status === 'rejected') throw this.noteFailure(logResult.reason);
    if (fua) {
      if (type === ENTRY_TYPE.DIRECT_WRITE) await Promise.all([this.wal.sync(sequence), this.syncDirectWrites()]);
      else await this.wal.sync(sequence);
    }
    if (this.checkpointRunning) return;
    if (this.wal.bytes >= this.checkpointLogBytes) this.backgroundCheckpoint('log size');
    else if (this.directBytesSinceCheckpoint >= DEFAULT_CHECKPOINT_DIRECT_BYTES) this.backgroundCheckpoint('direct writes');
  }

  private endRequest(): void {
    this.inflight--;
    assert(this.inflight >= 0, 'volume: negative in-flight count');
    if (this.inflight === 0 && this.drainWaiters.length > 0) {
      for (const resolve of this.drainWaiters.splice(0)) resolve();
    }
  }

  private drained(): Promise<void> {
    if (this.inflight === 0) return Promise.resolve();
    return new Promise((resolve) => this.drainWaiters.push(resolve));
  }

  /**
   * An I/O error on the image or the log leaves them out of step with what was
   * acknowledged, so the volume stops taking writes (the node then detaches the disk and
   * serves from peers, DESIGN §5); the log is kept for replay at the next open.
   */
  private noteFailure(error: unknown): unknown {
    if (!this.failure && (isMirrorsanError(error, 'STORE_IO') || isMirrorsanError(error, 'JOURNAL_IO'))) {
      this.failure = error;
      this.logger.error('volume: I/O failure, refusing further writes', { name: this.name, error: error.message });
    }
    return error;
  }

  private backgroundCheckpoint(reason: string): void {
    if (this.closed || this.failure) return;
    this.checkpoint().catch((error: unknown) => {
      this.logger.error('volume: checkpoint failed', { name: this.name, reason, error: String(error) });
    });
  }

  private async runCheckpoint(): Promise<void> {
    if (this.failure) throw this.failure;
    const started = performance.now();
    if (this.sequence === this.checkpointSequence && this.wal.stats().segments <= 1) return;
    // Gate new requests and let in-flight ones finish, so the map snapshot is exactly the
    // state after sequence S. The rotation is queued in the log before the gate opens, so
    // entries after S land in the new segment even while the old one is being synced.
    let openGate!: () => void;
    this.gate = new Promise((resolve) => (openGate = resolve));
    let snapshot: Buffer;
    let sequence: number;
    let rotated: Promise<number>;
    try {
      await this.drained();
      sequence = this.sequence;
      snapshot = this.map.serialize(sequence);
      this.directBytesSinceCheckpoint = 0;
      rotated = this.wal.rotate();
    } finally {
      this.gate = undefined;
      openGate();
    }
    const lastOfOld = await rotated;
    assert(lastOfOld === sequence, `volume: rotation ended the log at ${lastOfOld}, the checkpoint is at ${sequence}`);
    try {
      const directCovered = this.directApplied;
      await this.image.datasync();
      this.directSynced = Math.max(this.directSynced, directCovered);
      const files = volumeFiles(this.dir);
      await writeFileDurable(files.allocMap, snapshot);
      const record: CheckpointRecord = {
        format: CHECKPOINT_FORMAT,
        seq: sequence,
        sizeBytes: this.sizeBytes,
        blockSizeBytes: this.blockSizeBytes,
        name: this.name,
      };
      await writeFileDurable(files.checkpoint, Buffer.from(JSON.stringify(record) + '\n'));
    } catch (error) {
      throw this.noteFailure(
        isMirrorsanError(error) ? error : new MirrorsanError('STORE_IO', `checkpoint of ${this.name} failed: ${String(error)}`, { cause: error }),
      );
    }
    this.checkpointSequence = sequence;
    this.checkpointCount++;
    const dropped = await this.wal.dropSegmentsUpTo(sequence);
    this.logger.debug('volume: checkpoint', {
      name: this.name,
      sequence,
      droppedSegments: dropped,
      durationMs: Math.round(performance.now() - started),
    });
  }

  private checkOpen(): void {
    if (this.closed) throw new MirrorsanError('NBD_SHUTDOWN', `volume ${this.name} is closed`);
  }

  private checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.sizeBytes) {
      throw new MirrorsanError('STORE_RANGE', `range [${offset}, ${offset + length}) is outside volume ${this.name} of ${this.sizeBytes} bytes`);
    }
  }

  private checkWritable(offset: number, length: number): void {
    this.checkOpen();
    if (this.readOnly) throw new MirrorsanError('NBD_EPERM', `volume ${this.name} is read-only`);
    if (this.failure) throw this.failure;
    this.checkRange(offset, length);
  }
}

/** Applies replayed entries with bounded concurrency, overlapping ones in log order. */
class Replayer {
  private readonly sizeBytes: number;
  private readonly bs: number;
  private readonly supersede: SupersedeIndex;
  private readonly locks = new RangeLock();
  private readonly pending: Promise<void>[] = [];
  private failure: unknown;

  constructor(sizeBytes: number, blockSizeBytes: number, supersede: SupersedeIndex) {
    this.sizeBytes = sizeBytes;
    this.bs = blockSizeBytes;
    this.supersede = supersede;
  }

  /**
   * Applies the parts of `entry` that no newer DIRECT_WRITE owns. Skipping a part skips its
   * map effect too: the newer direct write sets those blocks allocated in its turn, and
   * every entry between the two is skipped there as well, so the final state is the same.
   */
  private async applyLive(entry: LogEntry, payload: Buffer, applier: VolumeApplier): Promise<void> {
    const bs = this.bs;
    const end = entry.offset + entry.lengthBytes;
    const firstBlock = Math.floor(entry.offset / bs);
    for (const run of this.supersede.liveRuns(entry.sequence, firstBlock, Math.ceil(end / bs))) {
      const start = Math.max(entry.offset, run.firstBlock * bs);
      const stop = Math.min(end, (run.firstBlock + run.blockCount) * bs);
      if (entry.type === ENTRY_TYPE.DIRECT_WRITE) applier.markWritten(start, stop - start);
      else if (entry.type === ENTRY_TYPE.WRITE) await applier.applyWrite(start, payload.subarray(start - entry.offset, stop - entry.offset), undefined);
      else await applier.applyZero(start, stop - start, entry.type === ENTRY_TYPE.TRIM);
    }
  }

  async apply(entry: LogEntry, payload: Buffer, applier: VolumeApplier): Promise<void> {
    if (this.failure !== undefined) throw this.failure;
    if (entry.offset + entry.lengthBytes > this.sizeBytes) {
      throw new MirrorsanError(
        'JOURNAL_CORRUPT',
        `log entry ${entry.sequence} covers [${entry.offset}, ${entry.offset + entry.lengthBytes}) beyond the volume's ${this.sizeBytes} bytes`,
      );
    }
    const lease = this.locks.acquire(
      Math.floor(entry.offset / this.bs) * this.bs,
      Math.ceil((entry.offset + entry.lengthBytes) / this.bs) * this.bs,
    );
    const run = async (): Promise<void> => {
      if (lease.ready) await lease.ready;
      try {
        await this.applyLive(entry, payload, applier);
      } finally {
        lease.release();
      }
    };
    this.pending.push(
      run().catch((error: unknown) => {
        this.failure ??= error;
      }),
    );
    // Bounded: wait for the oldest before taking more (also bounds the replay buffers held).
    if (this.pending.length >= REPLAY_CONCURRENCY) await this.pending.shift();
  }

  async finish(): Promise<void> {
    await Promise.all(this.pending.splice(0));
    if (this.failure !== undefined) throw this.failure;
  }
}

function validateOptions(options: LocalVolumeOptions): void {
  const bs = options.blockSizeBytes ?? DEFAULT_BLOCK_SIZE_BYTES;
  const invalid = (message: string): never => {
    throw new MirrorsanError('CONFIG_INVALID', `volume ${options.name}: ${message}`);
  };
  if (!Number.isInteger(bs) || bs < 512 || bs > MiB || (bs & (bs - 1)) !== 0) invalid(`block size ${bs} must be a power of two in [512, 1 MiB]`);
  if (!Number.isSafeInteger(options.sizeBytes) || options.sizeBytes <= 0 || options.sizeBytes % bs !== 0) {
    invalid(`size ${options.sizeBytes} must be a positive multiple of the block size ${bs}`);
  }
  if (options.checkpointLogBytes !== undefined && !(options.checkpointLogBytes > 0)) invalid('checkpointLogBytes must be positive');
  if (options.checkpointIntervalMs !== undefined && !(options.checkpointIntervalMs >= 0)) invalid('checkpointIntervalMs must be >= 0');
}

function volumeFiles(dir: string): { image: string; allocMap: string; checkpoint: string; wal: string } {
  return {
    image: path.join(dir, 'volume.img'),
    allocMap: path.join(dir, 'alloc.map'),
    checkpoint: path.join(dir, 'checkpoint.json'),
    wal: path.join(dir, 'wal'),
  };
}

function imageOptions(options: LocalVolumeOptions, files: { image: string }, blockSizeBytes: number) {
  return {
    path: files.image,
    sizeBytes: options.sizeBytes,
    blockSizeBytes,
    logger: options.logger.child('image'),
    ...(options.faults ? { faults: options.faults } : {}),
  };
}

/**
 * A new volume: image, empty map, then checkpoint.json last, whose existence marks the
 * volume as created (an interrupted creation is simply redone; nothing was acknowledged).
 */
async function createVolumeFiles(
  options: LocalVolumeOptions,
  files: ReturnType<typeof volumeFiles>,
): Promise<CheckpointRecord> {
  const blockSizeBytes = options.blockSizeBytes ?? DEFAULT_BLOCK_SIZE_BYTES;
  const segments = await fs.promises.readdir(files.wal).catch(() => [] as string[]);
  for (const name of segments) {
    const size = (await fs.promises.stat(path.join(files.wal, name))).size;
    if (size > 0) {
      throw new MirrorsanError('STORE_IO', `${options.dir} has log data in ${name} but no checkpoint.json: refusing to recreate the volume`);
    }
  }
  await fs.promises.rm(files.image, { force: true });
  const image = await ImageFile.open({ ...imageOptions(options, files, blockSizeBytes), create: true });
  await image.datasync();
  await image.close();
  await fs.promises.mkdir(files.wal, { recursive: true });
  await writeFileDurable(files.allocMap, AllocationMap.forSize(options.sizeBytes, blockSizeBytes).serialize(0));
  const record: CheckpointRecord = { format: CHECKPOINT_FORMAT, seq: 0, sizeBytes: options.sizeBytes, blockSizeBytes, name: options.name };
  await writeFileDurable(files.checkpoint, Buffer.from(JSON.stringify(record) + '\n'));
  return record;
}

async function readCheckpoint(file: string): Promise<CheckpointRecord> {
  let parsed: unknown;
  try {
    parsed = JSON.parse(await fs.promises.readFile(file, 'utf8'));
  } catch (error) {
    throw new MirrorsanError('STORE_IO', `cannot read ${file}: ${String(error)}`, { cause: error });
  }
  const record = parsed as Partial<CheckpointRecord> | null;
  if (
    record === null ||
    typeof record !== 'object' ||
    record.format !== CHECKPOINT_FORMAT ||
    !Number.isSafeInteger(record.seq) ||
    !Number.isSafeInteger(record.sizeBytes) ||
    !Number.isSafeInteger(record.blockSizeBytes)
  ) {
    throw new MirrorsanError('STORE_IO', `${file} is not a checkpoint record of format ${CHECKPOINT_FORMAT}`);
  }
  return record as CheckpointRecord;
}
