// The destination-side store of one volume that receives entries from several sources
// (docs/replication.md, "Storage on each node"): one image and allocation map, the node's own
// write-ahead log, and one container per remote source. Files in DIR:
//   volume.img                 the image
//   checkpoint.bin             {stamp S, own sequence, per source last sequence <= S} + the
//                              allocation map as of S, in one file written atomically
//   wal/                       the node's own entries (source = this node)
//   containers/<sourceId>/     one WriteAheadLog per remote source; entry sequence = the
//                              source's sequence, so replay's "+1" check holds per source
//
// Apply stamps. Every entry this store applies, local or remote, takes the next value of a
// per-volume stamp at the moment it registers in the range lock (synchronously, in arrival
// order), so the stamp order is the order in which overlapping entries reach the image.
// Replay merges all logs by stamp and so applies overlapping entries in the original order.
// Where the stamp lives: in the entry header, in the 16-bit `flags` (high bits) and the
// 32-bit `sourceId` (low bits): 48 bits, under the header CRC, written with the entry in
// the same writev. In these logs `sourceId` carries no information of its own: a log's
// source is its directory (own WAL or containers/<id>/), and container entries come from
// sources named by string ids the u32 could not hold anyway. The alternatives were worse:
// a new header field changes the entry size every WAL reader and the wire codec depend on
// (ENTRY_HEADER_BYTES is used for windowing, scanning and streaming), and a sidecar index
// doubles the fdatasyncs of every SYNC and brings a second torn-tail problem whose
// consistency with the container would have to be proven. 2^48 stamps last 8.9 years at a
// sustained million applies per second; reaching the limit fails the store loudly
// (STORE_IO) rather than wrapping.
//
// Remote entries: applyRemote() puts the entry in the source's bounded memory partition,
// registers it in the range lock and applies it; the caller acknowledges on receipt, before
// that resolves, so read() waits for every overlapping entry registered before it (the
// range lock's overlapping(): reads never wait for each other). spill() moves a partition
// into its container in one batch (append, then one fdatasync with `sync`); a full
// partition spills by itself without sync.
//
// Decision on "allocating writes wait for their log entry" (the single-node rule, kept for
// this node's own entries in writeLocal): remote entries do NOT wait for their spill.
// The rule protects "the image equals the content" when a crash loses an entry that
// reached the image in blocks the recovered map calls unallocated. For a remote entry
// that loss is repaired by the protocol, not by the log: the source keeps every entry
// above this node's CHECKPOINT_ACK and, after the restart, resends from the durable
// sequence we report, rewriting exactly those ranges (and setting their map bits). Even if
// it never comes back, what clients see stays right: reads and BLOCK_STATUS answer
// unallocated blocks from the map (zeros), and a partial write into an unallocated block
// rewrites the whole block with zero padding, so the stale bytes never become content. The
// only casualty is byte equality of image files inside holes until a resync rewrites them.
// Waiting instead would turn every allocating remote write (all of a fresh volume's first
// pass) into a partition spill, i.e. into the per-entry container I/O the partition exists
// to batch.
//
// Cross-log ordering after a crash (a hazard this store cannot close alone): if a crash
// loses a remote entry U that was still in a partition but keeps a later overlapping entry
// L of another log (the own WAL, or a container that spilled), replay applies L, and the
// source's resend of U then lands after it: this replica ends with U's bytes where the
// others hold L's (I4). Such an L exists only after the grant for the region moved away
// from U's source, which today waits for receipt ACKs only. The fix belongs to the grant
// protocol: a revoked holder sends SYNC and waits for every SYNC_ACK (not ACK) before
// RELEASE, so every overlapping earlier entry is durable in its container before a
// conflicting one can be written anywhere; the cost falls on grant transfers only.
//
// Checkpoint: new applies wait at a gate while in-flight ones drain (so the map snapshot is
// exactly the state after stamp S); every partition is appended to its container and every
// log rotated before the gate opens, so entries above S land in new segments; then the
// image is synced, checkpoint.bin written, and segments wholly at or below S dropped.
// Partitions are spilled (not discarded) at a checkpoint because a log must stay
// consecutive: the next spill continues at the next sequence.
//
// Entry types: WRITE, ZERO, TRIM, and DIRECT_WRITE for large block-aligned writes (at least
// directWriteMinBytes, local or remote): their bytes go to the image only, and the log (own
// WAL or container) gets a payload-less DIRECT_WRITE entry, so a 1 MiB write costs one copy
// into the page cache instead of two, and no log CRC over the data. What keeps that safe:
// - A DIRECT_WRITE entry never reaches a log before its bytes reached the image. An own
//   entry waits for its image write before it is appended (the own WAL stays in sequence
//   order: entries after it wait in `ownQueue`); so a process crash (SIGKILL: the page cache
//   survives) never leaves an entry whose bytes are not in the image. A remote entry is
//   appended to its container only after its image write AND an image fdatasync covering it
//   (spill waits for both): a container entry is what this node reports as durable, and the
//   source never resends what it reports, so the bytes must survive a power loss as well as
//   the entry does. Without this, a crash could leave the entry in the log with stale image
//   bytes, the source would not resend it, and this replica would silently differ (I4).
//   The own WAL does not get the fdatasync before append (it would put an image sync in the
//   latency of every large write): after a power loss an unflushed own direct write may read
//   back as the older bytes, as on the single-node volume. FLUSH/FUA sync the image too.
// - The allocating-write rule: own direct writes do not wait for their entry (it comes
//   after). A crash in between leaves bytes in blocks the map calls unallocated: invisible
//   (reads and partial writes go by the map, see above), as for remote entries.
// - Replay never applies an entry over blocks that a DIRECT_WRITE with a higher stamp owns
//   (the image already holds the newer bytes): every log is scanned first for its
//   DIRECT_WRITE entries, and a SupersedeIndex keyed by stamp answers, per entry, the
//   parts to apply. A DIRECT_WRITE itself replays as "these blocks are allocated".
import * as fs from 'node:fs';
import * as path from 'node:path';
import { MirrorsanError, assert, isMirrorsanError } from '../errors.js';
import { ENTRY_TYPE, type LogEntry } from '../journal/entry.js';
import { WriteAheadLog, type ReplayResult } from '../journal/wal.js';
import { AllocationMap } from '../store/alloc-map.js';
import { fsyncDir, writeFileDurable } from '../store/file-io.js';
import { ImageFile, WRITE_PIECE_BYTES, fileExists, type ImageFaults } from '../store/image.js';
import { RangeLock } from '../store/range-lock.js';
import { SupersedeIndex } from '../store/supersede-index.js';
import { CoalescedRun } from '../util/coalesced-run.js';
import { crc32c } from '../util/crc32c.js';
import type { Logger } from '../util/log.js';
import { VolumeApplier } from './applier.js';
import type { Extent } from './device.js';

/** Extents one block status answer may hold (the client asks again for the rest). */
const BLOCK_STATUS_EXTENTS_MAX = 65_536;

const MiB = 1024 * 1024;
const TWO_POW_32 = 0x1_0000_0000;
/** Stamps live in 16 + 32 header bits (see the header comment). */
export const STAMP_MAX = 2 ** 48 - 1;
const DEFAULT_BLOCK_SIZE_BYTES = 4096;
const DEFAULT_PARTITION_ENTRIES_MAX = 4096;
const DEFAULT_PARTITION_BYTES_MAX = 32 * MiB;
/** Aligned WRITEs at least this large become DIRECT_WRITEs (see the header comment). */
const DEFAULT_DIRECT_WRITE_MIN_BYTES = 64 * 1024;
/** Accounted size of a payload-less entry in a partition (its header and bookkeeping). */
const PARTITION_ENTRY_OVERHEAD_BYTES = 64;
/** Log entries applied concurrently during replay (overlapping ones still in stamp order). */
const REPLAY_CONCURRENCY = 16;
const CHECKPOINT_MAGIC = 0x4b43534d; // "MSCK" as bytes on disk
const CHECKPOINT_FORMAT = 1;
const CHECKPOINT_FIXED_BYTES = 12;
/** Source ids become directory names. */
const SOURCE_ID = /^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$/;

export type StoreEntryType = typeof ENTRY_TYPE.WRITE | typeof ENTRY_TYPE.ZERO | typeof ENTRY_TYPE.TRIM;

export interface ReplicaStoreOptions {
  dir: string;
  sizeBytes: number;
  logger: Logger;
  /** Allocation granularity. Default 4096; a store keeps the one it was created with. */
  blockSizeBytes?: number;
  /** Entries a source's partition holds before it spills by itself. Default 4096. */
  partitionEntriesMax?: number;
  /** Payload bytes a source's partition holds before it spills by itself. Default 32 MiB. */
  partitionBytesMax?: number;
  /** Segment capacity of the own WAL and of every container (WalOptions). Default: the WAL's. */
  segmentCapacityBytes?: number;
  /**
   * Block-aligned WRITEs of at least this many bytes go to the image only, logged as
   * payload-less DIRECT_WRITE entries. Default 64 KiB; 0 turns it off.
   */
  directWriteMinBytes?: number;
  /** Test-only fault injection on the image; never set by production configuration. */
  faults?: ImageFaults;
  /**
   * Every entry replayed at open (`own`: from this node's WAL): what a crash may have lost
   * from memory is re-derived from it (the dirty-region tracker, src/volume/dirty-regions.ts).
   */
  onReplayedEntry?: (own: boolean, offset: number, lengthBytes: number, sequence: number) => void;
  /**
   * Runs at every checkpoint after the checkpoint record is durable and before log segments are
   * dropped: state derived from the entries about to go must be persisted by then.
   */
  beforeLogTruncation?: () => Promise<void>;
}

/** One entry of a source's stream, as the mirror engine's target hands it over. */
export interface RemoteEntry {
  sequence: number;
  type: StoreEntryType;
  offset: number;
  lengthBytes: number;
}

/** What this node holds of a source's stream: ReplicationTarget's constructor input. */
export interface SourceRecovered {
  /** The last sequence in the container (or the checkpoint), consecutive from 1. */
  durableSequence: number;
  /** The last sequence of the source covered by the checkpoint. */
  checkpointSequence: number;
}

export interface ReplicaRecovery {
  checkpointStamp: number;
  /** The highest stamp found (the next entry takes the one after). */
  lastStamp: number;
  replayedEntries: number;
  /** Logs whose torn tail was cut: 'wal' or a source id. */
  cutTails: string[];
  /**
   * The store was closed cleanly last time (or is new). False after a crash: entries this node
   * acknowledged on receipt (in memory) may be gone until their sources resend them.
   */
  cleanShutdown: boolean;
  ownSequence: number;
  sources: ReadonlyMap<string, SourceRecovered>;
  durationMs: number;
}

export interface CheckpointResult {
  stamp: number;
  ownSequence: number;
  /** Per source: the last sequence at or below the stamp. */
  sources: ReadonlyMap<string, number>;
}

export interface ReplicaStoreStats {
  stamp: number;
  checkpointStamp: number;
  ownSequence: number;
  inflightApplies: number;
  allocatedBytes: number;
  checkpoints: number;
  /** Entries applied as DIRECT_WRITE (own and remote), and fdatasyncs of the image. */
  directWrites: number;
  imageSyncs: number;
  /** Bytes of entries in the own WAL. */
  ownLogBytes: number;
  sources: Record<string, { received: number; spilled: number; durable: number; checkpoint: number; partitionEntries: number; partitionBytes: number; containerBytes: number }>;
}

// ---- the stamp in the entry header ---------------------------------------------------

/** The header fields that carry `stamp`: flags = high 16 bits, sourceId = low 32 bits. */
export function stampFields(stamp: number): { flags: number; sourceId: number } {
  // The message is built only on failure: this runs for every entry.
  if (!(Number.isSafeInteger(stamp) && stamp >= 1 && stamp <= STAMP_MAX)) assert(false, `stamp ${stamp} out of range`);
  return { flags: Math.floor(stamp / TWO_POW_32), sourceId: stamp % TWO_POW_32 };
}

export function stampOf(entry: LogEntry): number {
  return entry.flags * TWO_POW_32 + entry.sourceId;
}

// ---- checkpoint.bin ------------------------------------------------------------------

export interface CheckpointRecord {
  format: number;
  stamp: number;
  ownSequence: number;
  sources: Record<string, number>;
  sizeBytes: number;
  blockSizeBytes: number;
}

/**
 * Layout: u32 magic "MSCK", u32 JSON length, u32 CRC32C of the JSON, the JSON record, then
 * the serialized allocation map (which carries its own CRC and the stamp as its sequence).
 * One file, renamed into place: the record and the map can never disagree.
 */
export function encodeCheckpoint(record: CheckpointRecord, map: AllocationMap): Buffer {
  const json = Buffer.from(JSON.stringify(record));
  const head = Buffer.alloc(CHECKPOINT_FIXED_BYTES);
  head.writeUInt32LE(CHECKPOINT_MAGIC, 0);
  head.writeUInt32LE(json.length, 4);
  head.writeUInt32LE(crc32c(json), 8);
  return Buffer.concat([head, json, map.serialize(record.stamp)]);
}

export function decodeCheckpoint(data: Buffer, what: string): { record: CheckpointRecord; map: AllocationMap } {
  const fail = (reason: string): never => {
    throw new MirrorsanError('STORE_IO', `${what} is damaged: ${reason}`);
  };
  if (data.length < CHECKPOINT_FIXED_BYTES || data.readUInt32LE(0) !== CHECKPOINT_MAGIC) fail('bad magic');
  const jsonLength = data.readUInt32LE(4);
  if (CHECKPOINT_FIXED_BYTES + jsonLength > data.length) fail('record longer than the file');
  const json = data.subarray(CHECKPOINT_FIXED_BYTES, CHECKPOINT_FIXED_BYTES + jsonLength);
  if (crc32c(json) !== data.readUInt32LE(8)) fail('record crc mismatch');
  const record = JSON.parse(json.toString('utf8')) as CheckpointRecord;
  if (
    record.format !== CHECKPOINT_FORMAT ||
    !Number.isSafeInteger(record.stamp) ||
    !Number.isSafeInteger(record.ownSequence) ||
    typeof record.sources !== 'object' ||
    record.sources === null ||
    Object.values(record.sources).some((sequence) => !Number.isSafeInteger(sequence) || sequence < 0)
  ) {
    fail(`not a checkpoint record of format ${CHECKPOINT_FORMAT}`);
  }
  const { map, sequence } = AllocationMap.deserialize(data.subarray(CHECKPOINT_FIXED_BYTES + jsonLength), what);
  if (sequence !== record.stamp) fail(`map of stamp ${sequence} with a record of stamp ${record.stamp}`);
  if (map.blockSizeBytes !== record.blockSizeBytes || map.blockCount * map.blockSizeBytes !== record.sizeBytes) fail('map does not fit the record');
  return { record, map };
}

// ---- the store -----------------------------------------------------------------------

interface PartitionEntry {
  entry: LogEntry;
  payload: Buffer | undefined;
  /** DIRECT_WRITE: settles once its bytes are in the image (it is appended only after that). */
  applied: Promise<void> | undefined;
}

/** An own entry waiting for its turn in the own WAL (see `ownQueue`). */
interface OwnAppend {
  entry: LogEntry;
  payload: Buffer | undefined;
  /** False for a DIRECT_WRITE until its bytes are in the image. */
  ready: boolean;
  resolve: () => void;
  reject: (error: unknown) => void;
}

interface SourceState {
  readonly id: string;
  /** Replaced only by rebaseSource (catch-up). */
  wal: WriteAheadLog;
  /** Last sequence handed to applyRemote. */
  received: number;
  /** Last sequence appended to the container. */
  spilled: number;
  /** Last sequence durable in the container or the checkpointed image. */
  durable: number;
  checkpoint: number;
  partition: PartitionEntry[];
  partitionBytes: number;
  /**
   * Container work in order: spilled batches (a batch with DIRECT_WRITEs first waits for
   * their image writes and an image sync) and checkpoint rotations. Settles when the last
   * queued piece is done; `chainedWork` counts pieces not done yet.
   */
  appendChain: Promise<void>;
  chainedWork: number;
}

function isStoreEntryType(type: number): type is StoreEntryType {
  return type === ENTRY_TYPE.WRITE || type === ENTRY_TYPE.ZERO || type === ENTRY_TYPE.TRIM;
}

/** What the logs may hold: the store's entry types plus DIRECT_WRITE. */
function isLoggedEntryType(type: number): boolean {
  return isStoreEntryType(type) || type === ENTRY_TYPE.DIRECT_WRITE;
}

function newSourceState(id: string, wal: WriteAheadLog, last: number, checkpoint: number): SourceState {
  return { id, wal, received: last, spilled: last, durable: last, checkpoint, partition: [], partitionBytes: 0, appendChain: Promise.resolve(), chainedWork: 0 };
}

export class ReplicaStore {
  readonly recovery: ReplicaRecovery;
  private readonly dir: string;
  private readonly sizeBytes: number;
  private readonly blockSizeBytes: number;
  private readonly logger: Logger;
  private readonly image: ImageFile;
  private readonly map: AllocationMap;
  private readonly applier: Applier;
  private readonly ownWal: WriteAheadLog;
  private readonly sources = new Map<string, SourceState>();
  private readonly locks = new RangeLock();
  private readonly partitionEntriesMax: number;
  private readonly partitionBytesMax: number;
  private readonly segmentCapacityBytes: number | undefined;
  private readonly directWriteMinBytes: number;
  private stamp: number;
  private checkpointStamp: number;
  private ownSequence: number;
  /**
   * Own entries not yet handed to the own WAL, in sequence order: an entry waits here while
   * it, or one before it, is a DIRECT_WRITE whose bytes are not in the image yet. Empty
   * almost always (nothing waits unless a direct write is in flight).
   */
  private readonly ownQueue: OwnAppend[] = [];
  /** The last own sequence handed to the own WAL. */
  private ownAppendedSequence: number;
  private ownAppendWaiters: { sequence: number; resolve: () => void; reject: (error: unknown) => void }[] = [];
  /** DIRECT_WRITEs whose bytes reached the image, and how many of them an image sync covers. */
  private directApplied = 0;
  private directSynced = 0;
  private imageSyncCount = 0;
  private readonly imageSync: CoalescedRun;
  private readonly inflight = new Set<Promise<void>>();
  /** While set, applies registered from now on wait (a checkpoint is snapshotting). */
  private gate: Promise<void> | undefined;
  private checkpointRunning: Promise<CheckpointResult> | undefined;
  private checkpointCount = 0;
  private failure: MirrorsanError | undefined;
  private closed = false;
  private readonly beforeLogTruncation: (() => Promise<void>) | undefined;

  private constructor(init: {
    options: ReplicaStoreOptions;
    blockSizeBytes: number;
    image: ImageFile;
    map: AllocationMap;
    ownWal: WriteAheadLog;
    sources: SourceState[];
    stamp: number;
    checkpointStamp: number;
    ownSequence: number;
    recovery: ReplicaRecovery;
  }) {
    const { options } = init;
    this.dir = options.dir;
    this.sizeBytes = options.sizeBytes;
    this.blockSizeBytes = init.blockSizeBytes;
    this.logger = options.logger;
    this.image = init.image;
    this.map = init.map;
    this.applier = new Applier(init.image, init.map, init.blockSizeBytes);
    this.ownWal = init.ownWal;
    for (const source of init.sources) this.sources.set(source.id, source);
    this.partitionEntriesMax = options.partitionEntriesMax ?? DEFAULT_PARTITION_ENTRIES_MAX;
    this.partitionBytesMax = options.partitionBytesMax ?? DEFAULT_PARTITION_BYTES_MAX;
    this.segmentCapacityBytes = options.segmentCapacityBytes;
    this.directWriteMinBytes = options.directWriteMinBytes ?? DEFAULT_DIRECT_WRITE_MIN_BYTES;
    this.stamp = init.stamp;
    this.checkpointStamp = init.checkpointStamp;
    this.ownSequence = init.ownSequence;
    this.ownAppendedSequence = init.ownSequence;
    this.recovery = init.recovery;
    this.beforeLogTruncation = options.beforeLogTruncation;
    this.imageSync = new CoalescedRun(async () => {
      const covered = this.directApplied;
      await this.image.datasync();
      this.imageSyncCount++;
      this.directSynced = Math.max(this.directSynced, covered);
    });
  }

  /** Whether `dir` holds a store (its checkpoint record, written last at creation). */
  static exists(dir: string): Promise<boolean> {
    return fileExists(storeFiles(dir).checkpoint);
  }

  /** Creates the store in `dir` if it does not exist, else opens it and replays every log. */
  static async open(options: ReplicaStoreOptions): Promise<ReplicaStore> {
    const startedMs = performance.now();
    validateOptions(options);
    await fs.promises.mkdir(options.dir, { recursive: true });
    const files = storeFiles(options.dir);
    const walOptions = (dir: string, name: string) => ({
      dir,
      logger: options.logger.child(name),
      ...(options.segmentCapacityBytes !== undefined ? { segmentCapacityBytes: options.segmentCapacityBytes } : {}),
    });
    let record: CheckpointRecord;
    let map: AllocationMap;
    // The marker close() leaves goes at once: a crash from now on is an unclean shutdown.
    let cleanShutdown = true;
    if (!(await fileExists(files.checkpoint))) {
      ({ record, map } = await createStoreFiles(options, files));
    } else {
      cleanShutdown = await fileExists(files.cleanShutdown);
      if (cleanShutdown) {
        await fs.promises.unlink(files.cleanShutdown);
        await fsyncDir(options.dir);
      }
      ({ record, map } = decodeCheckpoint(await fs.promises.readFile(files.checkpoint), files.checkpoint));
      if (record.sizeBytes !== options.sizeBytes) {
        throw new MirrorsanError('CONFIG_INVALID', `store in ${options.dir} has ${record.sizeBytes} bytes, not ${options.sizeBytes}`);
      }
      if (options.blockSizeBytes !== undefined && options.blockSizeBytes !== record.blockSizeBytes) {
        throw new MirrorsanError('CONFIG_INVALID', `store in ${options.dir} was created with ${record.blockSizeBytes}-byte blocks`);
      }
    }
    const image = await ImageFile.open({
      path: files.image,
      sizeBytes: options.sizeBytes,
      blockSizeBytes: record.blockSizeBytes,
      logger: options.logger.child('image'),
      create: false,
      // Large (direct) writes in pieces: every replica of a volume takes the small random
      // writes that follow a sequential fill (see WRITE_PIECE_BYTES).
      writePieceBytes: WRITE_PIECE_BYTES,
      ...(options.faults ? { faults: options.faults } : {}),
    });
    const logs: { name: string; wal: WriteAheadLog; fromSequence: number }[] = [];
    try {
      logs.push({ name: 'wal', wal: await WriteAheadLog.open(walOptions(files.wal, 'wal')), fromSequence: record.ownSequence });
      const ids = new Set(Object.keys(record.sources));
      for (const name of await fs.promises.readdir(files.containers)) ids.add(name);
      for (const id of [...ids].sort()) {
        if (!SOURCE_ID.test(id)) throw new MirrorsanError('STORE_IO', `${files.containers} holds ${id}, which is not a source id`);
        const wal = await WriteAheadLog.open(walOptions(path.join(files.containers, id), `container/${id}`));
        logs.push({ name: id, wal, fromSequence: record.sources[id] ?? 0 });
      }
      const applier = new Applier(image, map, record.blockSizeBytes);
      const merged = await mergeReplay(logs, record.stamp, options.sizeBytes, record.blockSizeBytes, applier, options.onReplayedEntry);
      const sources: SourceState[] = [];
      const recovered = new Map<string, SourceRecovered>();
      for (let index = 1; index < logs.length; index++) {
        const log = logs[index]!;
        const last = merged.results[index]!.lastSequence;
        sources.push(newSourceState(log.name, log.wal, last, log.fromSequence));
        recovered.set(log.name, { durableSequence: last, checkpointSequence: log.fromSequence });
      }
      const ownSequence = merged.results[0]!.lastSequence;
      const recovery: ReplicaRecovery = {
        checkpointStamp: record.stamp,
        lastStamp: merged.lastStamp,
        replayedEntries: merged.replayedEntries,
        cutTails: logs.filter((_, index) => merged.results[index]!.cutTail).map((log) => log.name),
        cleanShutdown,
        ownSequence,
        sources: recovered,
        durationMs: Math.round(performance.now() - startedMs),
      };
      options.logger.info('replica store opened', {
        dir: options.dir,
        checkpointStamp: record.stamp,
        lastStamp: merged.lastStamp,
        replayedEntries: merged.replayedEntries,
        cutTails: recovery.cutTails.join(','),
        durationMs: recovery.durationMs,
      });
      return new ReplicaStore({
        options,
        blockSizeBytes: record.blockSizeBytes,
        image,
        map,
        ownWal: logs[0]!.wal,
        sources,
        stamp: merged.lastStamp,
        checkpointStamp: record.stamp,
        ownSequence,
        recovery,
      });
    } catch (error) {
      for (const log of logs) await log.wal.close().catch(() => undefined);
      await image.close().catch(() => undefined);
      throw error;
    }
  }

  /**
   * Opens (creating) the container of a source not seen before; call before its first
   * applyRemote. Returns what ReplicationTarget's constructor takes.
   */
  async addSource(sourceId: string): Promise<SourceRecovered> {
    this.checkOpen();
    const known = this.sources.get(sourceId);
    if (known) return { durableSequence: known.durable, checkpointSequence: known.checkpoint };
    if (!SOURCE_ID.test(sourceId)) throw new MirrorsanError('CONFIG_INVALID', `source id ${JSON.stringify(sourceId)} cannot name a container`);
    const wal = await WriteAheadLog.open({
      dir: path.join(storeFiles(this.dir).containers, sourceId),
      logger: this.logger.child(`container/${sourceId}`),
      ...(this.segmentCapacityBytes !== undefined ? { segmentCapacityBytes: this.segmentCapacityBytes } : {}),
    });
    const result = await wal.replay(0, () => {
      throw new MirrorsanError('STORE_IO', `container of new source ${sourceId} already holds entries`);
    });
    const raced = this.sources.get(sourceId);
    if (raced) {
      await wal.close();
      return { durableSequence: raced.durable, checkpointSequence: raced.checkpoint };
    }
    assert(result.lastSequence === 0, 'new container not empty');
    this.sources.set(sourceId, newSourceState(sourceId, wal, 0, 0));
    return { durableSequence: 0, checkpointSequence: 0 };
  }

  /**
   * Takes the next entry of `sourceId`'s stream (sequence = last received + 1): it joins the
   * source's partition and the range lock now, in arrival order, and the promise resolves
   * once it is in the image. The payload is referenced until the entry is spilled: keep it
   * unchanged. A full partition spills by itself (without sync).
   */
  applyRemote(sourceId: string, entry: RemoteEntry, payload?: Buffer): Promise<void> {
    this.checkWritable(entry.offset, entry.lengthBytes);
    const source = this.sources.get(sourceId);
    // Messages are built only on failure: this runs for every received entry.
    if (source === undefined) assert(false, `replica store: applyRemote for unknown source ${sourceId} (call addSource first)`);
    if (entry.sequence !== source.received + 1) assert(false, `replica store: ${sourceId} entry ${entry.sequence} after ${source.received}`);
    if (!isStoreEntryType(entry.type)) assert(false, `replica store: entry type ${entry.type} is not supported`);
    const data = entry.type === ENTRY_TYPE.WRITE ? payload : undefined;
    if (entry.type === ENTRY_TYPE.WRITE && data?.length !== entry.lengthBytes) assert(false, 'replica store: WRITE payload length differs from lengthBytes');
    const direct = data !== undefined && this.isDirect(entry.offset, data.length);
    const stamp = this.nextStamp();
    const logEntry: LogEntry = { type: direct ? ENTRY_TYPE.DIRECT_WRITE : entry.type, ...stampFields(stamp), sequence: entry.sequence, offset: entry.offset, lengthBytes: entry.lengthBytes };
    source.received = entry.sequence;
    const applied = this.register(logEntry, data, undefined);
    // A DIRECT_WRITE keeps no payload here: its bytes are in the image (or on their way).
    source.partition.push({ entry: logEntry, payload: direct ? undefined : data, applied: direct ? applied : undefined });
    source.partitionBytes += data?.length ?? PARTITION_ENTRY_OVERHEAD_BYTES;
    if (source.partition.length >= this.partitionEntriesMax || source.partitionBytes >= this.partitionBytesMax) {
      this.spill(sourceId, { sync: false }).catch(() => undefined); // noted as the store's failure
    }
    return applied;
  }

  /**
   * This node's own write: logged in the own WAL and applied (the single-node rule holds:
   * an allocating write waits for its entry to be in the log file; a DIRECT_WRITE is
   * appended only after its bytes are in the image). Resolves with its sequence once both
   * are done; durability is flushLocal()'s.
   */
  async writeLocal(type: StoreEntryType, offset: number, lengthBytes: number, payload?: Buffer): Promise<number> {
    this.checkWritable(offset, lengthBytes);
    if (!isStoreEntryType(type)) assert(false, `replica store: entry type ${type} is not supported`);
    const data = type === ENTRY_TYPE.WRITE ? payload : undefined;
    if (type === ENTRY_TYPE.WRITE && data?.length !== lengthBytes) assert(false, 'replica store: WRITE payload length differs from lengthBytes');
    const direct = data !== undefined && this.isDirect(offset, data.length);
    const stamp = this.nextStamp();
    const sequence = this.ownSequence + 1;
    const entry: LogEntry = { type: direct ? ENTRY_TYPE.DIRECT_WRITE : type, ...stampFields(stamp), sequence, offset, lengthBytes };
    let logged: Promise<void>;
    let waiting: OwnAppend | undefined;
    if (!direct && this.ownQueue.length === 0) {
      // The common case: nothing ahead of it waits, so it goes to the log now.
      try {
        logged = this.ownWal.append(entry, data);
      } catch (error) {
        throw this.noteFailure(error);
      }
      this.ownAppendedSequence = sequence;
    } else {
      waiting = { entry, payload: direct ? undefined : data, ready: !direct, resolve: () => undefined, reject: () => undefined };
      const item = waiting;
      logged = new Promise<void>((resolve, reject) => {
        item.resolve = resolve;
        item.reject = reject;
      });
      this.ownQueue.push(item);
    }
    this.ownSequence = sequence;
    // A direct write does not wait for its entry (it comes after its bytes).
    const applied = this.register(entry, data, direct ? undefined : logged);
    if (direct) {
      const item = waiting!;
      applied.then(
        () => {
          item.ready = true;
          this.releaseOwnAppends();
        },
        (error: unknown) => this.failOwnQueue(error),
      );
    }
    const [logResult, applyResult] = await Promise.allSettled([logged, applied]);
    if (logResult.status === 'rejected') throw this.noteFailure(logResult.reason);
    if (applyResult.status === 'rejected') throw applyResult.reason;
    return sequence;
  }

  /**
   * Makes every own entry up to `throughSequence` (default: every one registered so far)
   * durable: the own WAL, and the image when DIRECT_WRITEs reached it since its last sync.
   */
  async flushLocal(throughSequence?: number): Promise<void> {
    this.checkOpen();
    const through = throughSequence === undefined ? this.ownSequence : Math.min(throughSequence, this.ownSequence);
    try {
      // Entries up to `through` are in the log (a direct one only once its bytes are in the image).
      await this.ownAppended(through);
      await Promise.all([this.ownWal.sync(through), this.syncDirectWrites()]);
    } catch (error) {
      throw this.noteFailure(error);
    }
  }

  /**
   * Allocation of [offset, offset+length) for NBD block status: holes read as zeros. While an
   * overlapping entry is still on its way to the image (it may be acknowledged already) the
   * whole range is reported as data: never wrong, only less sparse. At most
   * BLOCK_STATUS_EXTENTS_MAX extents; the rest is left for the client to ask again.
   */
  blockStatus(offset: number, length: number): Extent[] {
    this.checkOpen();
    this.checkRange(offset, length);
    const bs = this.blockSizeBytes;
    const end = offset + length;
    if (this.locks.overlapping(Math.floor(offset / bs) * bs, Math.ceil(end / bs) * bs) !== undefined) {
      return [{ offset, length, hole: false, zero: false }];
    }
    const firstBlock = Math.floor(offset / bs);
    return this.map.runs(firstBlock, Math.ceil(end / bs) - firstBlock, BLOCK_STATUS_EXTENTS_MAX).map((run) => {
      const start = Math.max(offset, run.firstBlock * bs);
      const stop = Math.min(end, (run.firstBlock + run.blockCount) * bs);
      return { offset: start, length: stop - start, hole: !run.allocated, zero: !run.allocated };
    });
  }

  /**
   * The volume's bytes in [offset, offset+length), after every overlapping entry registered
   * before this call is applied (an entry acknowledged on receipt must be visible).
   */
  async read(offset: number, length: number): Promise<Buffer> {
    this.checkOpen();
    this.checkRange(offset, length);
    if (length === 0) return Buffer.alloc(0);
    // Not zero-filled up front: every byte is either read from the image or zeroed below (a
    // 1 MiB read would otherwise clear a megabyte only to overwrite it).
    const out = Buffer.allocUnsafe(length);
    const bs = this.blockSizeBytes;
    const wait = this.locks.overlapping(Math.floor(offset / bs) * bs, Math.ceil((offset + length) / bs) * bs);
    if (wait) await wait;
    const end = offset + length;
    const firstBlock = Math.floor(offset / bs);
    const reads: Promise<void>[] = [];
    for (const run of this.map.runs(firstBlock, Math.ceil(end / bs) - firstBlock)) {
      const start = Math.max(offset, run.firstBlock * bs);
      const stop = Math.min(end, (run.firstBlock + run.blockCount) * bs);
      // Unallocated: zeros, whatever the image holds there (see the header).
      if (!run.allocated) out.fill(0, start - offset, stop - offset);
      else reads.push(this.image.read(start, out.subarray(start - offset, stop - offset)));
    }
    await Promise.all(reads);
    return out;
  }

  /**
   * Appends `sourceId`'s partition to its container in one batch (and with `sync` makes the
   * container durable through it); resolves with the source's durable sequence.
   */
  async spill(sourceId: string, options: { sync: boolean }): Promise<number> {
    this.checkOpen();
    const source = this.sources.get(sourceId);
    assert(source !== undefined, `replica store: spill for unknown source ${sourceId}`);
    if (this.failure) throw this.failure;
    const appended = this.spillNow(source);
    const through = source.spilled;
    try {
      await appended;
      if (options.sync && through > source.durable) {
        await source.wal.sync(through);
        source.durable = Math.max(source.durable, through);
      }
    } catch (error) {
      throw this.noteFailure(error);
    }
    return source.durable;
  }

  /**
   * Makes the image durable up to the current stamp, records the checkpoint and drops the
   * log segments it covers. Concurrent calls share one run.
   */
  checkpoint(): Promise<CheckpointResult> {
    this.checkOpen();
    this.checkpointRunning ??= this.runCheckpoint().finally(() => {
      this.checkpointRunning = undefined;
    });
    return this.checkpointRunning;
  }

  /**
   * Catch-up (ReplicationTarget's 'rebase'): `sourceId`'s stream resumes after
   * `throughSequence`, past entries this replica never received (its catch-up copies what they
   * wrote). The partition and the container are dropped (what they hold is in the image
   * already, and older than the copies), and a checkpoint records the new start, so that a
   * crash after this replays the container from there. No applyRemote for the source may run
   * until this resolves (the caller holds its frames back).
   */
  async rebaseSource(sourceId: string, throughSequence: number): Promise<void> {
    this.checkOpen();
    const source = this.sources.get(sourceId);
    assert(source !== undefined, `replica store: rebase of unknown source ${sourceId}`);
    assert(Number.isSafeInteger(throughSequence) && throughSequence >= source.received, `replica store: rebase of ${sourceId} to ${throughSequence} goes back from ${source.received}`);
    source.partition = [];
    source.partitionBytes = 0;
    // After every spill and rotation already queued on the old container.
    await this.chain(source, async () => {
      const dir = path.join(storeFiles(this.dir).containers, sourceId);
      await source.wal.close();
      await fs.promises.rm(dir, { recursive: true, force: true });
      const wal = await WriteAheadLog.open({
        dir,
        logger: this.logger.child(`container/${sourceId}`),
        ...(this.segmentCapacityBytes !== undefined ? { segmentCapacityBytes: this.segmentCapacityBytes } : {}),
      });
      await wal.replay(throughSequence, () => {
        throw new MirrorsanError('STORE_IO', `container of ${sourceId} not empty after it was removed`);
      });
      source.wal = wal;
    });
    source.received = throughSequence;
    source.spilled = throughSequence;
    source.durable = throughSequence;
    source.checkpoint = throughSequence;
    // Twice: a run already under way may have captured the old start.
    await this.checkpoint();
    await this.checkpoint();
    this.logger.info('replica store: source stream rebased (catch-up)', { source: sourceId, throughSequence });
  }

  /** What the source's target was last told, for ReplicationTarget after checkpoints. */
  sourceState(sourceId: string): SourceRecovered | undefined {
    const source = this.sources.get(sourceId);
    return source ? { durableSequence: source.durable, checkpointSequence: source.checkpoint } : undefined;
  }

  stats(): ReplicaStoreStats {
    const sources: ReplicaStoreStats['sources'] = {};
    for (const source of this.sources.values()) {
      sources[source.id] = {
        received: source.received,
        spilled: source.spilled,
        durable: source.durable,
        checkpoint: source.checkpoint,
        partitionEntries: source.partition.length,
        partitionBytes: source.partitionBytes,
        containerBytes: source.wal.bytes,
      };
    }
    return {
      stamp: this.stamp,
      checkpointStamp: this.checkpointStamp,
      ownSequence: this.ownSequence,
      inflightApplies: this.inflight.size,
      allocatedBytes: this.map.allocatedBlocks * this.blockSizeBytes,
      checkpoints: this.checkpointCount,
      directWrites: this.directApplied,
      imageSyncs: this.imageSyncCount,
      ownLogBytes: this.ownWal.bytes,
      sources,
    };
  }

  /**
   * Checkpoints (unless the store failed, or `checkpoint` is false) and closes the files.
   * Without a checkpoint, entries still in partitions are lost as in a crash (the sources
   * resend them) and the logs are replayed at the next open.
   */
  async close(options: { checkpoint?: boolean } = {}): Promise<void> {
    if (this.closed) return;
    let checkpointed = false;
    if ((options.checkpoint ?? true) && !this.failure) {
      try {
        await this.checkpoint();
        checkpointed = true;
      } catch (error) {
        this.logger.error('replica store: checkpoint at close failed; the logs will be replayed at next open', { dir: this.dir, error: String(error) });
      }
    }
    this.closed = true;
    await Promise.allSettled([...this.inflight]);
    await this.checkpointRunning?.catch(() => undefined);
    // Spills still waiting for their direct writes' image sync finish before the logs close.
    for (const source of this.sources.values()) await source.appendChain.catch(() => undefined);
    await this.ownWal.close();
    for (const source of this.sources.values()) await source.wal.close();
    await this.image.close();
    // Everything this store acknowledged is in the checkpoint: the next open need not doubt it.
    if (checkpointed && !this.failure) await writeFileDurable(storeFiles(this.dir).cleanShutdown, new Uint8Array(0)).catch(() => undefined);
  }

  // ---- internals ------------------------------------------------------------------------

  private nextStamp(): number {
    if (this.stamp >= STAMP_MAX) {
      throw this.noteFailure(new MirrorsanError('STORE_IO', `replica store ${this.dir}: apply stamps exhausted (2^48)`));
    }
    return ++this.stamp;
  }

  /** Registers `entry` in the range lock now and applies it when its turn comes. */
  private register(entry: LogEntry, payload: Buffer | undefined, logged: Promise<void> | undefined): Promise<void> {
    const bs = this.blockSizeBytes;
    const lease = this.locks.acquire(Math.floor(entry.offset / bs) * bs, Math.ceil((entry.offset + entry.lengthBytes) / bs) * bs);
    // Captured now: only entries registered after a checkpoint took its stamp wait for it.
    const gate = this.gate;
    const run = async (): Promise<void> => {
      try {
        if (gate) await gate;
        if (lease.ready) await lease.ready;
        await this.applier.apply(entry, payload, logged);
        if (entry.type === ENTRY_TYPE.DIRECT_WRITE) this.directApplied++;
      } catch (error) {
        throw this.noteFailure(error);
      } finally {
        lease.release();
      }
    };
    const applied = run();
    this.inflight.add(applied);
    const forget = (): void => void this.inflight.delete(applied);
    applied.then(forget, forget);
    return applied;
  }

  /**
   * Takes the whole partition now and queues it for the container behind the source's
   * earlier container work; resolves once it (and everything queued before it) is written.
   * Without DIRECT_WRITEs and with nothing ahead, the entries are appended synchronously.
   * With DIRECT_WRITEs, the batch first waits for their image writes and an image sync
   * covering them (see the header comment).
   */
  private spillNow(source: SourceState): Promise<void> {
    const batch = source.partition;
    if (batch.length === 0) return source.appendChain;
    source.partition = [];
    source.partitionBytes = 0;
    if (batch[0]!.entry.sequence !== source.spilled + 1) assert(false, `replica store: spill of ${source.id} starts at ${batch[0]!.entry.sequence} after ${source.spilled}`);
    source.spilled = batch[batch.length - 1]!.entry.sequence;
    const directApplies: Promise<void>[] = [];
    for (const item of batch) if (item.applied) directApplies.push(item.applied);
    const appendAll = (): Promise<unknown> => {
      const appends: Promise<void>[] = [];
      for (const item of batch) appends.push(source.wal.append(item.entry, item.payload));
      return Promise.all(appends);
    };
    if (directApplies.length === 0 && source.chainedWork === 0) {
      let appended: Promise<unknown>;
      try {
        appended = appendAll();
      } catch (error) {
        return Promise.reject(this.noteFailure(error));
      }
      // Surfaced through the chain; never an unhandled rejection (a failed chain skips it).
      appended.catch(() => undefined);
      return this.chain(source, () => appended);
    }
    return this.chain(source, async () => {
      await Promise.all(directApplies);
      await this.syncDirectWrites();
      await appendAll();
    });
  }

  /** Queues `work` after the source's earlier container work (skipped if that failed). */
  private chain(source: SourceState, work: () => Promise<unknown>): Promise<void> {
    source.chainedWork++;
    const done = source.appendChain
      .then(work)
      .then(
        () => {
          source.chainedWork--;
        },
        (error: unknown) => {
          source.chainedWork--;
          throw this.noteFailure(error);
        },
      );
    source.appendChain = done;
    done.catch(() => undefined); // surfaced to whoever awaits it; noted as the store's failure
    return done;
  }

  /** Makes every DIRECT_WRITE applied so far durable in the image (shared fdatasync). */
  private async syncDirectWrites(): Promise<void> {
    if (this.directSynced >= this.directApplied) return;
    await this.imageSync.run();
  }

  private isDirect(offset: number, lengthBytes: number): boolean {
    const bs = this.blockSizeBytes;
    return this.directWriteMinBytes > 0 && lengthBytes >= this.directWriteMinBytes && offset % bs === 0 && lengthBytes % bs === 0;
  }

  /** Hands the own entries at the head of ownQueue that are ready to the own WAL, in order. */
  private releaseOwnAppends(): void {
    while (this.ownQueue.length > 0 && this.ownQueue[0]!.ready) {
      const item = this.ownQueue.shift()!;
      let appended: Promise<void>;
      try {
        appended = this.ownWal.append(item.entry, item.payload);
      } catch (error) {
        // Its sequence is taken already (the source sent it): the own log would have a hole.
        const failure = isMirrorsanError(error, 'JOURNAL_IO') || isMirrorsanError(error, 'STORE_IO') ? error : new MirrorsanError('STORE_IO', `replica store ${this.dir}: own log append of ${item.entry.sequence} failed: ${String(error)}`, { cause: error });
        item.reject(this.noteFailure(failure));
        this.failOwnQueue(failure);
        return;
      }
      this.ownAppendedSequence = item.entry.sequence;
      appended.then(item.resolve, item.reject);
    }
    if (this.ownAppendWaiters.length > 0) {
      const still: typeof this.ownAppendWaiters = [];
      for (const waiter of this.ownAppendWaiters) {
        if (waiter.sequence <= this.ownAppendedSequence) waiter.resolve();
        else still.push(waiter);
      }
      this.ownAppendWaiters = still;
    }
  }

  /** A direct write failed: nothing after it can be logged in order, so the store takes no more. */
  private failOwnQueue(error: unknown): void {
    const failure = this.noteFailure(
      isMirrorsanError(error, 'STORE_IO') || isMirrorsanError(error, 'JOURNAL_IO') ? error : new MirrorsanError('STORE_IO', `replica store ${this.dir}: an own direct write failed: ${String(error)}`, { cause: error }),
    );
    for (const item of this.ownQueue.splice(0)) item.reject(failure);
    for (const waiter of this.ownAppendWaiters.splice(0)) waiter.reject(failure);
  }

  /** Resolves once every own entry up to `sequence` was handed to the own WAL. */
  private ownAppended(sequence: number): Promise<void> {
    if (sequence <= this.ownAppendedSequence) return Promise.resolve();
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => this.ownAppendWaiters.push({ sequence, resolve, reject }));
  }

  private async runCheckpoint(): Promise<CheckpointResult> {
    if (this.failure) throw this.failure;
    const started = performance.now();
    let openGate!: () => void;
    this.gate = new Promise((resolve) => (openGate = resolve));
    let snapshot: AllocationMap;
    const stamp = this.stamp;
    const ownSequence = this.ownSequence;
    const perSource = new Map<string, number>();
    const logWork: Promise<unknown>[] = [];
    try {
      // Synchronously, before any entry above the stamp can be appended: partitions are
      // queued for their containers and every log's rotation behind them, so what follows
      // goes to new segments. (Own entries at or below the stamp that still wait for a
      // direct write's image bytes land after the rotation: harmless, replay skips them.)
      for (const source of this.sources.values()) {
        perSource.set(source.id, source.received);
        logWork.push(this.spillNow(source), this.chain(source, () => source.wal.rotate()));
      }
      logWork.push(this.ownWal.rotate());
      // Awaited below; until then a failure must not surface as an unhandled rejection.
      for (const work of logWork) work.catch(() => undefined);
      await Promise.allSettled([...this.inflight]);
      if (this.failure) throw this.failure;
      snapshot = this.map.clone();
    } finally {
      this.gate = undefined;
      openGate();
    }
    try {
      await Promise.all(logWork);
      await this.imageSync.run();
      const record: CheckpointRecord = {
        format: CHECKPOINT_FORMAT,
        stamp,
        ownSequence,
        sources: Object.fromEntries(perSource),
        sizeBytes: this.sizeBytes,
        blockSizeBytes: this.blockSizeBytes,
      };
      await writeFileDurable(storeFiles(this.dir).checkpoint, encodeCheckpoint(record, snapshot));
    } catch (error) {
      throw this.noteFailure(error);
    }
    this.checkpointStamp = stamp;
    this.checkpointCount++;
    if (this.beforeLogTruncation) {
      try {
        await this.beforeLogTruncation();
      } catch (error) {
        throw this.noteFailure(error);
      }
    }
    let dropped = await this.ownWal.dropSegmentsUpTo(ownSequence);
    for (const [id, sequence] of perSource) {
      const source = this.sources.get(id)!;
      source.checkpoint = Math.max(source.checkpoint, sequence);
      source.durable = Math.max(source.durable, sequence);
      dropped += await source.wal.dropSegmentsUpTo(sequence);
    }
    this.logger.debug('replica store: checkpoint', { dir: this.dir, stamp, droppedSegments: dropped, durationMs: Math.round(performance.now() - started) });
    return { stamp, ownSequence, sources: perSource };
  }

  /**
   * An I/O error leaves the image and the logs out of step with what was acknowledged: the
   * store takes no more entries; the logs are replayed at the next open.
   */
  private noteFailure(error: unknown): MirrorsanError {
    const failure = isMirrorsanError(error) ? error : new MirrorsanError('STORE_IO', `replica store ${this.dir}: ${String(error)}`, { cause: error });
    if (!this.failure && (isMirrorsanError(failure, 'STORE_IO') || isMirrorsanError(failure, 'JOURNAL_IO'))) {
      this.failure = failure;
      this.logger.error('replica store: I/O failure, refusing further entries', { dir: this.dir, error: failure.message });
    }
    return failure;
  }

  private checkOpen(): void {
    if (this.closed) throw new MirrorsanError('NBD_SHUTDOWN', `replica store ${this.dir} is closed`);
  }

  private checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.sizeBytes) {
      throw new MirrorsanError('STORE_RANGE', `range [${offset}, ${offset + length}) is outside the ${this.sizeBytes}-byte volume`);
    }
  }

  private checkWritable(offset: number, length: number): void {
    this.checkOpen();
    if (this.failure) throw this.failure;
    this.checkRange(offset, length);
    if (length === 0) throw new MirrorsanError('STORE_RANGE', 'an entry covers at least one byte');
  }
}

/**
 * Applies entries to the image and the map with the single-node volume's rules
 * (VolumeApplier), for live entries and replay alike.
 */
class Applier {
  private readonly applier: VolumeApplier;
  private readonly bs: number;

  constructor(image: ImageFile, map: AllocationMap, blockSizeBytes: number) {
    this.applier = new VolumeApplier(image, map, blockSizeBytes);
    this.bs = blockSizeBytes;
  }

  /**
   * A live entry. `logged`: settles when the entry is in its log file; an allocating write
   * waits for it. A DIRECT_WRITE carries its payload here (it goes to the image only).
   */
  async apply(entry: LogEntry, payload: Buffer | undefined, logged: Promise<void> | undefined): Promise<void> {
    if (entry.type === ENTRY_TYPE.WRITE || entry.type === ENTRY_TYPE.DIRECT_WRITE) {
      if (payload === undefined) assert(false, 'replica store: WRITE without payload');
      await this.applier.applyWrite(entry.offset, payload, logged);
    } else {
      if (entry.type !== ENTRY_TYPE.ZERO && entry.type !== ENTRY_TYPE.TRIM) assert(false, `replica store: cannot apply entry type ${entry.type}`);
      await this.applier.applyZero(entry.offset, entry.lengthBytes, entry.type === ENTRY_TYPE.TRIM);
    }
  }

  /**
   * A replayed entry: only the parts that no DIRECT_WRITE with a higher stamp owns (the
   * image holds that one's newer bytes). Skipping a part skips its map effect too: the newer
   * direct write sets those blocks allocated in its turn, and every entry between the two
   * is skipped there as well, so the final state is the same. A DIRECT_WRITE's bytes are in
   * the image already: it only marks its blocks allocated.
   */
  async replay(entry: LogEntry, payload: Buffer, stamp: number, supersede: SupersedeIndex): Promise<void> {
    const bs = this.bs;
    const end = entry.offset + entry.lengthBytes;
    for (const run of supersede.liveRuns(stamp, Math.floor(entry.offset / bs), Math.ceil(end / bs))) {
      const start = Math.max(entry.offset, run.firstBlock * bs);
      const stop = Math.min(end, (run.firstBlock + run.blockCount) * bs);
      if (entry.type === ENTRY_TYPE.DIRECT_WRITE) this.applier.markWritten(start, stop - start);
      else if (entry.type === ENTRY_TYPE.WRITE) await this.applier.applyWrite(start, payload.subarray(start - entry.offset, stop - entry.offset), undefined);
      else await this.applier.applyZero(start, stop - start, entry.type === ENTRY_TYPE.TRIM);
    }
  }
}

// ---- replay: a k-way merge of every log by stamp ---------------------------------------

interface MergeHead {
  entry: LogEntry;
  payload: Buffer;
  stamp: number;
  consumed: () => void;
  refused: (error: unknown) => void;
}

interface MergeCursor {
  name: string;
  head: MergeHead | undefined;
  done: boolean;
  lastStamp: number;
  result: ReplayResult | undefined;
}

/**
 * Replays every log at once, each through its own WriteAheadLog.replay (which verifies CRCs,
 * cuts a torn tail and refuses mid-log corruption), holding at most one entry per log: a
 * log's onEntry waits until the merge consumed its entry, and the merge takes the smallest
 * stamp once every unfinished log offers one. Overlapping entries are applied in stamp
 * order through a range lock, the others concurrently (bounded).
 */
async function mergeReplay(
  logs: readonly { name: string; wal: WriteAheadLog; fromSequence: number }[],
  checkpointStamp: number,
  sizeBytes: number,
  blockSizeBytes: number,
  applier: Applier,
  onReplayedEntry?: (own: boolean, offset: number, lengthBytes: number, sequence: number) => void,
): Promise<{ results: ReplayResult[]; lastStamp: number; replayedEntries: number }> {
  const cursors: MergeCursor[] = logs.map((log) => ({ name: log.name, head: undefined, done: false, lastStamp: checkpointStamp, result: undefined }));
  let failure: unknown;
  let wake: (() => void) | undefined;
  const poke = (): void => {
    const resume = wake;
    wake = undefined;
    resume?.();
  };
  const fail = (error: unknown): void => {
    failure ??= error;
    poke();
  };
  const corrupt = (log: string, reason: string): MirrorsanError =>
    new MirrorsanError('JOURNAL_CORRUPT', `replica store: log ${log}: ${reason}`);
  const isAligned = (entry: LogEntry): boolean => entry.offset % blockSizeBytes === 0 && entry.lengthBytes % blockSizeBytes === 0;

  // Look-ahead: which blocks each DIRECT_WRITE owns, by stamp, across every log. A scan stops
  // quietly where replay would cut a tail or refuse the log, so it never sees more than replay.
  const supersede = new SupersedeIndex();
  for (const log of logs) {
    await log.wal.scan(log.fromSequence, (entry) => {
      if (entry.type === ENTRY_TYPE.DIRECT_WRITE && isAligned(entry)) supersede.add(stampOf(entry), entry.offset / blockSizeBytes, entry.lengthBytes / blockSizeBytes);
    });
  }

  const replays = logs.map((log, index) => {
    const cursor = cursors[index]!;
    return log.wal
      .replay(log.fromSequence, (entry, payload) => {
        if (failure !== undefined) throw failure;
        const stamp = stampOf(entry);
        if (stamp <= cursor.lastStamp) {
          throw corrupt(log.name, `entry ${entry.sequence} has stamp ${stamp}, not above ${cursor.lastStamp} (the checkpoint's or the previous entry's)`);
        }
        if (!isLoggedEntryType(entry.type) || entry.offset + entry.lengthBytes > sizeBytes || (entry.type === ENTRY_TYPE.DIRECT_WRITE && !isAligned(entry))) {
          throw corrupt(log.name, `entry ${entry.sequence} (type ${entry.type}, [${entry.offset}, +${entry.lengthBytes})) cannot be applied to this volume`);
        }
        cursor.lastStamp = stamp;
        return new Promise<void>((consumed, refused) => {
          cursor.head = { entry, payload, stamp, consumed, refused };
          poke();
        });
      })
      .then(
        (result) => {
          cursor.done = true;
          cursor.result = result;
          poke();
        },
        (error: unknown) => {
          cursor.done = true;
          fail(error);
        },
      );
  });

  const locks = new RangeLock();
  const pending: Promise<void>[] = [];
  let applyFailure: unknown;
  let lastStamp = checkpointStamp;
  let replayedEntries = 0;
  for (;;) {
    if (failure !== undefined || applyFailure !== undefined) break;
    if (cursors.some((cursor) => !cursor.done && cursor.head === undefined)) {
      await new Promise<void>((resolve) => (wake = resolve));
      continue;
    }
    let next: MergeCursor | undefined;
    for (const cursor of cursors) {
      if (cursor.head && (next === undefined || cursor.head.stamp < next.head!.stamp)) next = cursor;
    }
    if (next === undefined) break; // every log is done
    const head = next.head!;
    next.head = undefined;
    if (head.stamp <= lastStamp) {
      fail(corrupt(next.name, `stamp ${head.stamp} of entry ${head.entry.sequence} is not above ${lastStamp}, already replayed from another log`));
      head.refused(failure);
      break;
    }
    lastStamp = head.stamp;
    replayedEntries++;
    const { entry, payload, stamp } = head;
    onReplayedEntry?.(next === cursors[0], entry.offset, entry.lengthBytes, entry.sequence);
    const bs = blockSizeBytes;
    const lease = locks.acquire(Math.floor(entry.offset / bs) * bs, Math.ceil((entry.offset + entry.lengthBytes) / bs) * bs);
    const run = async (): Promise<void> => {
      try {
        if (lease.ready) await lease.ready;
        await applier.replay(entry, payload, stamp, supersede);
      } finally {
        lease.release();
      }
    };
    pending.push(
      run().catch((error: unknown) => {
        applyFailure ??= error;
      }),
    );
    head.consumed();
    if (pending.length >= REPLAY_CONCURRENCY) await pending.shift();
  }
  await Promise.all(pending);
  failure ??= applyFailure;
  if (failure !== undefined) {
    for (const cursor of cursors) cursor.head?.refused(failure);
    // Logs still reading refuse their next entry (onEntry checks `failure`).
    await Promise.all(replays);
    throw failure;
  }
  await Promise.all(replays);
  return { results: cursors.map((cursor) => cursor.result!), lastStamp, replayedEntries };
}

function validateOptions(options: ReplicaStoreOptions): void {
  const bs = options.blockSizeBytes ?? DEFAULT_BLOCK_SIZE_BYTES;
  const invalid = (message: string): never => {
    throw new MirrorsanError('CONFIG_INVALID', `replica store ${options.dir}: ${message}`);
  };
  if (!Number.isInteger(bs) || bs < 512 || bs > MiB || (bs & (bs - 1)) !== 0) invalid(`block size ${bs} must be a power of two in [512, 1 MiB]`);
  if (!Number.isSafeInteger(options.sizeBytes) || options.sizeBytes <= 0 || options.sizeBytes % bs !== 0) {
    invalid(`size ${options.sizeBytes} must be a positive multiple of the block size ${bs}`);
  }
  for (const [key, value] of [
    ['partitionEntriesMax', options.partitionEntriesMax],
    ['partitionBytesMax', options.partitionBytesMax],
  ] as const) {
    if (value !== undefined && !(Number.isSafeInteger(value) && value >= 1)) invalid(`${key} must be a positive integer`);
  }
  const direct = options.directWriteMinBytes;
  if (direct !== undefined && !(Number.isSafeInteger(direct) && direct >= 0)) invalid('directWriteMinBytes must be a non-negative integer');
}

function storeFiles(dir: string): { image: string; checkpoint: string; cleanShutdown: string; wal: string; containers: string } {
  return {
    image: path.join(dir, 'volume.img'),
    checkpoint: path.join(dir, 'checkpoint.bin'),
    cleanShutdown: path.join(dir, 'clean-shutdown'),
    wal: path.join(dir, 'wal'),
    containers: path.join(dir, 'containers'),
  };
}

/**
 * A new store: image, log directories, then checkpoint.bin last, whose existence marks the
 * store as created. Refuses a directory that holds log data without a checkpoint.
 */
async function createStoreFiles(
  options: ReplicaStoreOptions,
  files: ReturnType<typeof storeFiles>,
): Promise<{ record: CheckpointRecord; map: AllocationMap }> {
  const blockSizeBytes = options.blockSizeBytes ?? DEFAULT_BLOCK_SIZE_BYTES;
  const leftovers = [
    ...(await fs.promises.readdir(files.wal).catch(() => [] as string[])),
    ...(await fs.promises.readdir(files.containers).catch(() => [] as string[])),
  ];
  if (leftovers.length > 0) {
    throw new MirrorsanError('STORE_IO', `${options.dir} has logs (${leftovers.join(', ')}) but no checkpoint.bin: refusing to recreate the store`);
  }
  await fs.promises.rm(files.image, { force: true });
  const image = await ImageFile.open({ path: files.image, sizeBytes: options.sizeBytes, blockSizeBytes, logger: options.logger.child('image'), create: true });
  await image.datasync();
  await image.close();
  await fs.promises.mkdir(files.wal, { recursive: true });
  await fs.promises.mkdir(files.containers, { recursive: true });
  const map = AllocationMap.forSize(options.sizeBytes, blockSizeBytes);
  const record: CheckpointRecord = { format: CHECKPOINT_FORMAT, stamp: 0, ownSequence: 0, sources: {}, sizeBytes: options.sizeBytes, blockSizeBytes };
  await writeFileDurable(files.checkpoint, encodeCheckpoint(record, map));
  return { record, map };
}

