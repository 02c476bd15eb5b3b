// Dirty-region tracking (issue 5, "degraded mode" and "catch-up"): which parts of a volume a
// replica that is out of the stream (not in inSync, not catching up) may lack, so that its
// catch-up compares and copies only those instead of the whole volume. One tracker per volume
// per node, persisted in DIR/dirty-regions.bin. Pure state and codec; the volume performs the
// I/O (docs/replication.md, "Dirty regions").
//
// What each node N records, per replica R that is out of N's current view of the stream:
//   - a mark (the epoch N was at) on every chunk N applies a write to, own or remote, while R
//     is out;
//   - at R's departure (N adopts an epoch without R): a mark on every chunk of N's resend
//     window (its own entries not yet durable everywhere, which R may lack) and of N's own
//     "self" marks (below), and the departure's writers: the members of N's previous view,
//     each of whom seeded its own map the same way.
// And for itself, "self" marks: chunks where N's own image may hold writes of its own that its
// peers lack (its resend window, refreshed at every checkpoint; everything replayed from its
// own log at a restart; own writes applied while it is out of the stream).
// N's marks are complete only while N has been a member of the stream without a break
// (`memberSinceEpoch`): that is when N applies every write. An epoch skipped in N's view
// (it adopted a newer record than the next one) counts as a break: N may have missed a
// departure and the marks it needed.
//
// Crash safety: marks are made synchronously when an entry is applied, and the tracker is
// persisted before the store drops log segments at a checkpoint; at the next open every entry
// replayed from the logs (which are exactly the entries after the checkpoint) is marked again,
// on every map and on the self marks. So what a crash loses from memory is re-marked from the
// log; what the log no longer has was persisted. Over-marking costs a comparison, never data.
//
// Catch-up plan (on R): the union of the self marks, the marks of every in-sync peer whose map
// is complete, and what a previous, interrupted catch-up had left (`plan.remaining`); sound
// only if every writer of every departure answered with a complete map. Otherwise the whole
// volume is compared (the log says why). Maps are dropped only when R is back in sync, so an
// interrupted catch-up asks again, for the marks since the epoch of its plan.
import { MirrorsanError, assert } from '../errors.js';
import { crc32c } from '../util/crc32c.js';

/** Most chunks a map tracks: a larger volume tracks in larger chunks (at most 16 MiB per map). */
export const DIRTY_CHUNKS_MAX = 4 * 1024 * 1024;
const FILE_MAGIC = 0x4d534452; // "MSDR"
const FILE_FORMAT = 2;
const NAME_BYTES_MAX = 255;

export interface Extent {
  offset: number;
  lengthBytes: number;
}

/** Tracking granularity: the catch-up compare chunk, doubled until the volume has at most DIRTY_CHUNKS_MAX chunks. */
export function dirtyChunkBytes(sizeBytes: number, compareChunkBytes: number): number {
  assert(compareChunkBytes >= 4096 && (compareChunkBytes & (compareChunkBytes - 1)) === 0, 'compare chunk must be a power of two of at least 4096');
  let chunk = compareChunkBytes;
  while (Math.ceil(sizeBytes / chunk) > DIRTY_CHUNKS_MAX) chunk *= 2;
  return chunk;
}

/** A set of chunks as a bitmap (one bit per chunk). */
export class ChunkSet {
  readonly chunkCount: number;
  readonly bits: Uint8Array;

  constructor(chunkCount: number, bits?: Uint8Array) {
    this.chunkCount = chunkCount;
    this.bits = bits ?? new Uint8Array(Math.ceil(chunkCount / 8));
    assert(this.bits.length === Math.ceil(chunkCount / 8), 'chunk set size mismatch');
  }

  static all(chunkCount: number): ChunkSet {
    const set = new ChunkSet(chunkCount);
    for (let chunk = 0; chunk < chunkCount; chunk++) set.add(chunk);
    return set;
  }

  add(chunk: number): void {
    this.bits[chunk >> 3]! |= 1 << (chunk & 7);
  }
  delete(chunk: number): void {
    this.bits[chunk >> 3]! &= ~(1 << (chunk & 7));
  }
  has(chunk: number): boolean {
    return (this.bits[chunk >> 3]! & (1 << (chunk & 7))) !== 0;
  }
  addAll(other: ChunkSet): void {
    assert(other.chunkCount === this.chunkCount, 'chunk sets of different volumes');
    for (let index = 0; index < this.bits.length; index++) this.bits[index]! |= other.bits[index]!;
  }
  clear(): void {
    this.bits.fill(0);
  }
  get size(): number {
    let count = 0;
    for (const byte of this.bits) for (let bits = byte; bits !== 0; bits &= bits - 1) count++;
    return count;
  }
  *[Symbol.iterator](): IterableIterator<number> {
    for (let index = 0; index < this.bits.length; index++) {
      const byte = this.bits[index]!;
      if (byte === 0) continue;
      for (let bit = 0; bit < 8; bit++) if (byte & (1 << bit)) yield index * 8 + bit;
    }
  }
}

interface TrackedReplica {
  /** The epoch at which this node first saw the replica out (its map's start). */
  createdEpoch: number;
  /** The map started without its departure seed (first open of a store without a tracker, or a corrupt tracker file). */
  seedLost: boolean;
  /** Per chunk: the epoch of its latest mark (0: never marked). */
  marks: Uint32Array;
  /** Each departure this node saw, and who was writing then (each of whom seeded its own map). */
  departures: { epoch: number; writers: string[] }[];
}

/** A node's answer to "what may R lack since epoch X". */
export interface DirtyAnswer {
  complete: boolean;
  /** Why not complete (empty when complete). */
  reason: string;
  /** Writers of the departures counted: their maps must be complete too. */
  writers: string[];
  chunks: ChunkSet;
}

/** What a replica catching up works through: chunks still to compare, from a plan made at `epoch`. */
export interface CatchUpPlan {
  epoch: number;
  remaining: ChunkSet;
}

export class DirtyRegionTracker {
  readonly self: string;
  readonly chunkBytes: number;
  readonly chunkCount: number;
  private epochValue = 0;
  /** The stream members (inSync + catchingUp) of the last adopted record; undefined before the first. */
  private lastMembers: Set<string> | undefined;
  /** First epoch of this node's current unbroken membership of the stream; undefined while out. */
  private memberSinceEpoch: number | undefined;
  private readonly replicas = new Map<string, TrackedReplica>();
  private readonly selfMarks: ChunkSet;
  /** No record of this node's own unacknowledged writes survived (a catch-up must compare everything). */
  private selfUnknown: boolean;
  private planValue: CatchUpPlan | undefined;
  /**
   * This node's last own sequence when it left the in-sync set (undefined while in sync): its
   * own entries after it are catch-up copies (a replica out of sync takes no client writes),
   * which hold its peers' bytes, so they never need comparing again.
   */
  private ownSequenceAtLeave: number | undefined;
  /** The tracker was read from a file (or is for a new store): departures seen before are known. */
  private readonly known: boolean;

  private constructor(options: { self: string; chunkBytes: number; chunkCount: number; known: boolean }) {
    this.self = options.self;
    this.chunkBytes = options.chunkBytes;
    this.chunkCount = options.chunkCount;
    this.selfMarks = new ChunkSet(options.chunkCount);
    this.known = options.known;
    this.selfUnknown = !options.known;
  }

  /**
   * A tracker with no history. `newStore`: the volume's store is new too, so nothing was
   * written before (nothing unknown); else the history was lost, and every map starts
   * without its seed and the self marks are unknown (catch-ups compare everything).
   */
  static fresh(options: { self: string; sizeBytes: number; chunkBytes: number; newStore: boolean }): DirtyRegionTracker {
    return new DirtyRegionTracker({ self: options.self, chunkBytes: options.chunkBytes, chunkCount: Math.ceil(options.sizeBytes / options.chunkBytes), known: options.newStore });
  }

  get epoch(): number {
    return this.epochValue;
  }
  get memberSince(): number | undefined {
    return this.memberSinceEpoch;
  }
  get plan(): CatchUpPlan | undefined {
    return this.planValue;
  }
  /** Replicas this node keeps a map for (out of the stream, or catching up and not yet in sync). */
  get trackedReplicas(): string[] {
    return [...this.replicas.keys()].sort();
  }
  /** Chunks marked for `replica` (0 if untracked). */
  markedChunks(replica: string): number {
    const tracked = this.replicas.get(replica);
    if (!tracked) return 0;
    let count = 0;
    for (const mark of tracked.marks) if (mark !== 0) count++;
    return count;
  }
  get selfMarkedChunks(): number {
    return this.selfMarks.size;
  }

  /**
   * Adopts a record (at open and at every epoch change). `window`: this node's own entries not
   * yet durable on every member (the source's resend window), which a departing replica may lack.
   */
  adopt(epoch: number, inSync: readonly string[], catchingUp: readonly string[], replicas: readonly string[], window: Iterable<Extent>, ownLastSequence: number): void {
    if (epoch < this.epochValue) return;
    if (inSync.includes(this.self)) this.ownSequenceAtLeave = undefined;
    else this.ownSequenceAtLeave ??= ownLastSequence;
    const members = new Set([...inSync, ...catchingUp]);
    const previous = this.lastMembers;
    const skipped = previous !== undefined && epoch > this.epochValue + 1;
    // A new store that is not in sync from its first record is a replaced disk or a new replica
    // of a volume with history: it lacks everything, which no peer's marks can say.
    if (previous === undefined && this.known && !inSync.includes(this.self)) this.selfUnknown = true;
    const windowChunks = new ChunkSet(this.chunkCount);
    for (const extent of window) this.markSet(windowChunks, extent);
    if (!members.has(this.self)) {
      this.memberSinceEpoch = undefined;
      this.selfMarks.addAll(windowChunks);
    } else if (this.memberSinceEpoch === undefined || skipped) {
      // A skipped epoch may hide a departure whose marks this node never made: its unbroken
      // membership (and so the completeness of its maps) starts again here.
      this.memberSinceEpoch = epoch;
    }
    this.epochValue = epoch;
    for (const replica of replicas) {
      if (replica === this.self) continue;
      if (members.has(replica)) {
        if (inSync.includes(replica)) this.replicas.delete(replica);
        continue;
      }
      let tracked = this.replicas.get(replica);
      const departed = previous === undefined || previous.has(replica);
      if (!tracked) {
        tracked = { createdEpoch: epoch, seedLost: previous === undefined && !this.known, marks: new Uint32Array(this.chunkCount), departures: [] };
        this.replicas.set(replica, tracked);
      }
      if (departed && !tracked.seedLost) {
        for (const chunk of windowChunks) tracked.marks[chunk] = epoch;
        for (const chunk of this.selfMarks) tracked.marks[chunk] = epoch;
        const writers = [...(previous ?? members)].filter((node) => node !== replica).sort();
        tracked.departures.push({ epoch, writers });
      }
    }
    this.lastMembers = members;
    if (inSync.includes(this.self) && this.planValue) this.planValue = undefined; // caught up
  }

  /** A write this node applies now (own or remote): marks every map of a replica out of the stream. */
  noteWrite(offset: number, lengthBytes: number, own: boolean): void {
    if (this.replicas.size === 0 && (!own || this.lastMembers?.has(this.self) !== false)) return;
    const first = Math.floor(offset / this.chunkBytes);
    const last = Math.min(this.chunkCount - 1, Math.floor((offset + Math.max(1, lengthBytes) - 1) / this.chunkBytes));
    for (const [replica, tracked] of this.replicas) {
      if (this.lastMembers?.has(replica)) continue; // catching up: it receives the write itself
      for (let chunk = first; chunk <= last; chunk++) tracked.marks[chunk] = this.epochValue;
    }
    if (own && this.lastMembers?.has(this.self) === false) for (let chunk = first; chunk <= last; chunk++) this.selfMarks.add(chunk);
  }

  /**
   * An entry replayed from a log at open (after a crash its marks may be gone): marks every
   * map, and the self marks for an own entry (`sequence`) unless it is a catch-up copy.
   */
  noteReplayed(offset: number, lengthBytes: number, own: boolean, sequence: number): void {
    const first = Math.floor(offset / this.chunkBytes);
    const last = Math.min(this.chunkCount - 1, Math.floor((offset + Math.max(1, lengthBytes) - 1) / this.chunkBytes));
    const selfMark = own && (this.ownSequenceAtLeave === undefined || sequence <= this.ownSequenceAtLeave);
    for (let chunk = first; chunk <= last; chunk++) {
      for (const tracked of this.replicas.values()) tracked.marks[chunk] = Math.max(tracked.marks[chunk]!, this.epochValue, 1);
      if (selfMark) this.selfMarks.add(chunk);
    }
  }

  /**
   * Refreshes the self marks before the tracker is persisted: while this node is in sync with
   * every member positioned (its peers hold everything of its own that left the window), the
   * window is all that peers may lack; otherwise the window is added to what was marked.
   */
  refreshSelf(window: Iterable<Extent>, peersHaveAllBeforeWindow: boolean): void {
    // Out of sync, the window holds catch-up copies only (what it held when this node left
    // was marked then).
    if (this.ownSequenceAtLeave !== undefined) return;
    if (peersHaveAllBeforeWindow) {
      this.selfMarks.clear();
      this.selfUnknown = false;
    }
    for (const extent of window) this.markSet(this.selfMarks, extent);
  }

  /** What `replica` may lack since `sinceEpoch` (0: since it left), as far as this node knows. */
  answer(replica: string, sinceEpoch: number): DirtyAnswer {
    const chunks = new ChunkSet(this.chunkCount);
    const incomplete = (reason: string): DirtyAnswer => ({ complete: false, reason, writers: [], chunks });
    const since = this.memberSinceEpoch;
    if (since === undefined) return incomplete(`${this.self} is not a member of the stream`);
    const tracked = this.replicas.get(replica);
    if (sinceEpoch === 0) {
      if (!tracked) return incomplete(`${this.self} has no record of ${replica} leaving`);
      if (tracked.seedLost) return incomplete(`${this.self} lost its record of what ${replica} lacked when it left`);
      if (tracked.createdEpoch < since) return incomplete(`${this.self} was not a member when ${replica} left (member since epoch ${since}, ${replica} out since ${tracked.createdEpoch})`);
    } else {
      if (since > sinceEpoch) return incomplete(`${this.self} has been a member only since epoch ${since}, after ${sinceEpoch}`);
      if (tracked?.seedLost && tracked.createdEpoch >= sinceEpoch) return incomplete(`${this.self} lost its record of what ${replica} lacked when it left`);
    }
    const writers = new Set<string>();
    if (tracked) {
      const floor = Math.max(1, sinceEpoch);
      tracked.marks.forEach((mark, chunk) => {
        if (mark >= floor) chunks.add(chunk);
      });
      for (const departure of tracked.departures) if (departure.epoch >= sinceEpoch) for (const writer of departure.writers) writers.add(writer);
    }
    return { complete: true, reason: '', writers: [...writers].sort(), chunks };
  }

  /**
   * The plan of a catch-up of this node: `answers` from its in-sync peers (for the marks since
   * the previous plan's epoch, or since it left). Undefined chunks: compare everything (why given).
   */
  makePlan(epoch: number, answers: ReadonlyMap<string, DirtyAnswer>): { plan: CatchUpPlan; full: boolean; reason: string } {
    const full = (reason: string): { plan: CatchUpPlan; full: boolean; reason: string } => {
      this.planValue = { epoch, remaining: ChunkSet.all(this.chunkCount) };
      return { plan: this.planValue, full: true, reason };
    };
    if (this.selfUnknown) return full(`no record of ${this.self}'s own unacknowledged writes survived, or its disk is new or was re-attached after a failure`);
    const complete = [...answers].filter(([, answer]) => answer.complete);
    if (complete.length === 0) {
      const reasons = [...answers.values()].map((answer) => answer.reason).join('; ');
      return full(`no in-sync peer knows what this replica lacks (${reasons || 'no peer answered'})`);
    }
    const vouching = new Set(complete.map(([peer]) => peer));
    vouching.add(this.self);
    const remaining = new ChunkSet(this.chunkCount);
    remaining.addAll(this.selfMarks);
    if (this.planValue) remaining.addAll(this.planValue.remaining);
    for (const [peer, answer] of complete) {
      const missing = answer.writers.filter((writer) => !vouching.has(writer));
      if (missing.length > 0) return full(`${missing.join(',')} wrote while this replica was away and cannot tell what (according to ${peer})`);
      remaining.addAll(answer.chunks);
    }
    this.planValue = { epoch, remaining };
    return { plan: this.planValue, full: false, reason: '' };
  }

  /**
   * This node leaves the in-sync set to catch up while staying in the stream (it restarted with
   * own writes its peers never received): it lacks nothing of theirs (they resend what it
   * missed), and only its self marks may differ. A plan from epoch `epoch` (the last it was
   * in sync at): the peers then only add what they marked since.
   */
  planFromSelf(epoch: number): void {
    const remaining = new ChunkSet(this.chunkCount);
    remaining.addAll(this.selfMarks);
    if (this.planValue) remaining.addAll(this.planValue.remaining);
    this.planValue = { epoch: Math.min(epoch, this.planValue?.epoch ?? epoch), remaining };
  }

  /** This node's image can no longer be trusted where it lacks marks (a re-attached disk): its next catch-up compares everything. */
  forgetSelf(): void {
    this.selfUnknown = true;
  }

  /** The leave that planFromSelf prepared for did not happen. */
  dropPlan(): void {
    this.planValue = undefined;
  }

  /** A chunk of the plan was compared (and copied if it differed). */
  verified(chunk: number): void {
    this.planValue?.remaining.delete(chunk);
  }

  private markSet(set: ChunkSet, extent: Extent): void {
    const first = Math.floor(extent.offset / this.chunkBytes);
    const last = Math.min(this.chunkCount - 1, Math.floor((extent.offset + Math.max(1, extent.lengthBytes) - 1) / this.chunkBytes));
    for (let chunk = first; chunk <= last; chunk++) set.add(chunk);
  }

  // ---- persistence ----------------------------------------------------------------------

  encode(): Buffer {
    const writer = new ByteWriter();
    writer.u32(FILE_MAGIC);
    writer.u8(FILE_FORMAT);
    writer.u32(this.chunkBytes);
    writer.u32(this.chunkCount);
    writer.u64(this.epochValue);
    writer.u64(this.memberSinceEpoch ?? 0);
    writer.u8(this.selfUnknown ? 1 : 0);
    writer.u64(this.ownSequenceAtLeave === undefined ? 0 : this.ownSequenceAtLeave + 1);
    writer.names([...(this.lastMembers ?? [])]);
    writer.bytes(this.selfMarks.bits);
    writer.u32(this.replicas.size);
    for (const [replica, tracked] of this.replicas) {
      writer.name(replica);
      writer.u64(tracked.createdEpoch);
      writer.u8(tracked.seedLost ? 1 : 0);
      writer.u32(tracked.departures.length);
      for (const departure of tracked.departures) {
        writer.u64(departure.epoch);
        writer.names(departure.writers);
      }
      const marked: number[] = [];
      tracked.marks.forEach((mark, chunk) => {
        if (mark !== 0) marked.push(chunk, mark);
      });
      writer.u32(marked.length / 2);
      for (const value of marked) writer.u32(value);
    }
    writer.u8(this.planValue ? 1 : 0);
    if (this.planValue) {
      writer.u64(this.planValue.epoch);
      writer.bytes(this.planValue.remaining.bits);
    }
    const body = writer.finish();
    const crc = Buffer.alloc(4);
    crc.writeUInt32LE(crc32c(body));
    return Buffer.concat([body, crc]);
  }

  /** Reads a persisted tracker; throws STORE_CORRUPT with the reason if it is not one of this volume's. */
  static decode(data: Buffer, options: { self: string; sizeBytes: number; chunkBytes: number }): DirtyRegionTracker {
    const corrupt = (reason: string): MirrorsanError => new MirrorsanError('JOURNAL_CORRUPT', `dirty-region tracker: ${reason}`);
    if (data.length < 8) throw corrupt('file too short');
    const body = data.subarray(0, data.length - 4);
    if (crc32c(body) !== data.readUInt32LE(data.length - 4)) throw corrupt('checksum mismatch');
    const reader = new ByteReader(body, corrupt);
    if (reader.u32() !== FILE_MAGIC) throw corrupt('not a tracker file');
    const format = reader.u8();
    if (format !== FILE_FORMAT) throw corrupt(`format ${format} unknown`);
    const chunkBytes = reader.u32();
    const chunkCount = reader.u32();
    if (chunkBytes !== options.chunkBytes || chunkCount !== Math.ceil(options.sizeBytes / options.chunkBytes)) throw corrupt(`tracks ${chunkCount} chunks of ${chunkBytes} bytes, not this volume's`);
    const tracker = new DirtyRegionTracker({ self: options.self, chunkBytes, chunkCount, known: true });
    tracker.epochValue = reader.u64();
    const since = reader.u64();
    tracker.memberSinceEpoch = since === 0 ? undefined : since;
    tracker.selfUnknown = reader.u8() === 1;
    const atLeave = reader.u64();
    tracker.ownSequenceAtLeave = atLeave === 0 ? undefined : atLeave - 1;
    const members = reader.names();
    tracker.lastMembers = new Set(members);
    tracker.selfMarks.bits.set(reader.bytes(tracker.selfMarks.bits.length));
    const replicaCount = reader.u32();
    for (let index = 0; index < replicaCount; index++) {
      const replica = reader.name();
      const createdEpoch = reader.u64();
      const seedLost = reader.u8() === 1;
      const departures: TrackedReplica['departures'] = [];
      const departureCount = reader.u32();
      for (let at = 0; at < departureCount; at++) departures.push({ epoch: reader.u64(), writers: reader.names() });
      const marks = new Uint32Array(chunkCount);
      const markedCount = reader.u32();
      for (let at = 0; at < markedCount; at++) {
        const chunk = reader.u32();
        const mark = reader.u32();
        if (chunk >= chunkCount) throw corrupt(`mark on chunk ${chunk} of ${chunkCount}`);
        marks[chunk] = mark;
      }
      tracker.replicas.set(replica, { createdEpoch, seedLost, marks, departures });
    }
    if (reader.u8() === 1) {
      const epoch = reader.u64();
      tracker.planValue = { epoch, remaining: new ChunkSet(chunkCount, Uint8Array.from(reader.bytes(Math.ceil(chunkCount / 8)))) };
    }
    if (!reader.done) throw corrupt('trailing bytes');
    return tracker;
  }
}

/** A DirtyAnswer on the wire (REGION_REPLY data of a `dirty` request). */
export function encodeDirtyAnswer(answer: DirtyAnswer): Buffer {
  const writer = new ByteWriter();
  writer.u8(answer.complete ? 1 : 0);
  writer.text(answer.reason);
  writer.names(answer.writers);
  writer.u32(answer.chunks.chunkCount);
  writer.bytes(answer.chunks.bits);
  return writer.finish();
}

/** Reads a peer's DirtyAnswer; throws (NBD_EIO, the peer sent nonsense) unless it is for `chunkCount` chunks. */
export function decodeDirtyAnswer(data: Buffer, chunkCount: number): DirtyAnswer {
  const reader = new ByteReader(data, (reason) => new MirrorsanError('NBD_EIO', `dirty-region answer: ${reason}`));
  const complete = reader.u8() === 1;
  const reason = reader.text();
  const writers = reader.names();
  const count = reader.u32();
  if (count !== chunkCount) throw new MirrorsanError('NBD_EIO', `dirty-region answer covers ${count} chunks, not ${chunkCount}`);
  const chunks = new ChunkSet(chunkCount, Uint8Array.from(reader.bytes(Math.ceil(chunkCount / 8))));
  if (!reader.done) throw new MirrorsanError('NBD_EIO', 'dirty-region answer: trailing bytes');
  return { complete, reason, writers, chunks };
}

class ByteWriter {
  private readonly parts: Buffer[] = [];
  u8(value: number): void {
    this.parts.push(Buffer.from([value]));
  }
  u32(value: number): void {
    const buffer = Buffer.alloc(4);
    buffer.writeUInt32LE(value >>> 0);
    this.parts.push(buffer);
  }
  u64(value: number): void {
    const buffer = Buffer.alloc(8);
    buffer.writeBigUInt64LE(BigInt(value));
    this.parts.push(buffer);
  }
  name(value: string): void {
    const bytes = Buffer.from(value, 'utf8');
    assert(bytes.length <= NAME_BYTES_MAX, `name ${value} too long`);
    this.u8(bytes.length);
    this.parts.push(bytes);
  }
  names(values: readonly string[]): void {
    this.u32(values.length);
    for (const value of values) this.name(value);
  }
  text(value: string): void {
    const bytes = Buffer.from(value.slice(0, 4000), 'utf8');
    this.u32(bytes.length);
    this.parts.push(bytes);
  }
  bytes(value: Uint8Array): void {
    this.parts.push(Buffer.from(value.buffer, value.byteOffset, value.byteLength));
  }
  finish(): Buffer {
    return Buffer.concat(this.parts);
  }
}

class ByteReader {
  private offset = 0;
  private readonly data: Buffer;
  private readonly corrupt: (reason: string) => Error;
  constructor(data: Buffer, corrupt: (reason: string) => Error) {
    this.data = data;
    this.corrupt = corrupt;
  }
  private take(length: number): Buffer {
    if (this.offset + length > this.data.length) throw this.corrupt('truncated');
    const slice = this.data.subarray(this.offset, this.offset + length);
    this.offset += length;
    return slice;
  }
  u8(): number {
    return this.take(1)[0]!;
  }
  u32(): number {
    return this.take(4).readUInt32LE(0);
  }
  u64(): number {
    const value = this.take(8).readBigUInt64LE(0);
    if (value > BigInt(Number.MAX_SAFE_INTEGER)) throw this.corrupt('number out of range');
    return Number(value);
  }
  name(): string {
    return this.take(this.u8()).toString('utf8');
  }
  text(): string {
    const length = this.u32();
    if (length > 16_384) throw this.corrupt(`text of ${length} bytes`);
    return this.take(length).toString('utf8');
  }
  names(): string[] {
    const count = this.u32();
    if (count > 4096) throw this.corrupt(`${count} names`);
    const names: string[] = [];
    for (let index = 0; index < count; index++) names.push(this.name());
    return names;
  }
  bytes(length: number): Buffer {
    return this.take(length);
  }
  get done(): boolean {
    return this.offset === this.data.length;
  }
}
