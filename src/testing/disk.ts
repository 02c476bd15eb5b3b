// A simulated disk for one node: named files as byte arrays, each with a volatile part (the page
// cache: what reads see) and a durable part (what survives a crash). Operations are async and
// complete after a simulated latency, as scheduler events, so an I/O shell written against
// promises (like src/store/file-io.ts) runs unmodified on it.
//
// Semantics, chosen to be as hostile as real disks and kernels are allowed to be:
// - write/writev/truncate complete after a latency and then apply to the cache; concurrent
//   operations may complete in any order (the thread pool reorders them).
// - datasync makes durable exactly the operations that had *completed* when it was called
//   (fdatasync does not wait for writes still in flight), in completion order.
// - crash (power loss or process death): everything in flight never completes (its promise never
//   settles: the code awaiting it is dead too), the cache is dropped, and what survives is the
//   durable part plus, by the profile, a prefix of the unsynced operations (the kernel may have
//   written some back) whose last member may be torn: a sector-aligned prefix of it.
// - Injected faults: lost writes (acknowledged, visible in the cache, never durable), latent
//   sector corruption (a bit flipped in the durable part, found after a crash), EIO on read,
//   write or datasync, and ENOSPC. A datasync that fails drops the writes it covered from
//   durability while the cache still shows them ("fsyncgate"), as Linux does.
// Every injected fault is recorded, so a checker can tell a corruption the code detected from
// one it let through silently. File creation and removal are durable at once (a simplification:
// real file systems need the directory fsynced).
import { assert } from '../errors.js';
import type { Prng } from './prng.js';
import type { ScheduledEvent, Scheduler } from './scheduler.js';

export interface DiskProfile {
  readonly name: string;
  readonly writeMsMin: number;
  readonly writeMsMax: number;
  readonly readMsMin: number;
  readonly readMsMax: number;
  readonly syncMsMin: number;
  readonly syncMsMax: number;
  /** Per call: the call fails with EIO and changes nothing. */
  readonly writeErrorProbability: number;
  readonly readErrorProbability: number;
  /** Per datasync: fails with EIO and the writes it covered never become durable. */
  readonly syncErrorProbability: number;
  /** Per write: acknowledged and cached but never made durable. */
  readonly lostWriteProbability: number;
  /** Per write, on top of running out of capacity. */
  readonly enospcProbability: number;
  /** Per crash and file: some unsynced operations reach the durable part (a random prefix). */
  readonly crashWritebackProbability: number;
  /** Given writeback, the first operation not written back leaves a sector-aligned prefix. */
  readonly tornWriteProbability: number;
  /** Per crash: one bit of one durable sector flips. */
  readonly corruptionProbabilityPerCrash: number;
}

const PERFECT: DiskProfile = {
  name: 'perfect',
  writeMsMin: 0,
  writeMsMax: 1,
  readMsMin: 0,
  readMsMax: 1,
  syncMsMin: 1,
  syncMsMax: 8,
  writeErrorProbability: 0,
  readErrorProbability: 0,
  syncErrorProbability: 0,
  lostWriteProbability: 0,
  enospcProbability: 0,
  crashWritebackProbability: 0,
  tornWriteProbability: 0,
  corruptionProbabilityPerCrash: 0,
};

/** Named fault mixes; randomDiskProfile() picks one per seed. */
export const DISK_PROFILES: readonly DiskProfile[] = [
  PERFECT,
  { ...PERFECT, name: 'torn-writes', crashWritebackProbability: 0.7, tornWriteProbability: 0.5 },
  { ...PERFECT, name: 'slow', writeMsMax: 5, readMsMax: 5, syncMsMin: 5, syncMsMax: 40, crashWritebackProbability: 0.5, tornWriteProbability: 0.3 },
  {
    ...PERFECT,
    name: 'failing',
    writeErrorProbability: 0.01,
    readErrorProbability: 0.01,
    syncErrorProbability: 0.01,
    lostWriteProbability: 0.005,
    enospcProbability: 0.002,
    crashWritebackProbability: 0.5,
    tornWriteProbability: 0.5,
    corruptionProbabilityPerCrash: 0.3,
  },
];

/** The profiles that only lose what was never synced: no lost writes, no corruption, no errors. */
export const HONEST_DISK_PROFILES: readonly DiskProfile[] = DISK_PROFILES.filter(
  (profile) =>
    profile.writeErrorProbability + profile.readErrorProbability + profile.syncErrorProbability + profile.lostWriteProbability +
      profile.enospcProbability + profile.corruptionProbabilityPerCrash ===
    0,
);

export function randomDiskProfile(prng: Prng, from: readonly DiskProfile[] = DISK_PROFILES): DiskProfile {
  return prng.pick(from);
}

export const SECTOR_BYTES_DEFAULT = 512;
/**
 * Unsynced operations a file may hold before the oldest are written back, as the kernel's
 * background writeback would: bounds memory, and reminds code that unsynced data may
 * reach the disk at any time (not only at a crash).
 */
export const DIRTY_OPERATIONS_MAX_DEFAULT = 4096;
/** Fault records kept; a run injecting more is misconfigured (and fails loudly). */
export const FAULT_RECORDS_MAX = 100_000;

export type DiskFaultKind = 'lost-write' | 'torn-write' | 'corruption' | 'write-eio' | 'read-eio' | 'sync-eio' | 'enospc';

export interface DiskFaultRecord {
  readonly kind: DiskFaultKind;
  readonly file: string;
  readonly offset: number;
  readonly lengthBytes: number;
  readonly timeMs: number;
  /** True when the caller was told (an error); false when only the bytes on disk show it. */
  readonly reported: boolean;
}

export interface DiskStats {
  writes: number;
  reads: number;
  syncs: number;
  truncates: number;
  bytesWritten: number;
  crashes: number;
  /** Unsynced operations that a crash let reach the durable part. */
  writtenBackAtCrash: number;
  /** Unsynced operations a crash discarded. */
  lostAtCrash: number;
  /** Unsynced operations made durable because too many were pending (background writeback). */
  writtenBackInBackground: number;
}

/** An fs-style error: callers match on `code`, as with node:fs errors. */
export interface SimIoError extends Error {
  code: 'EIO' | 'ENOSPC' | 'ENOENT' | 'EEXIST' | 'EBADF';
  syscall: string;
}

function ioError(code: SimIoError['code'], syscall: string, file: string): SimIoError {
  return Object.assign(new Error(`${code}: simulated ${syscall} failed on ${file}`), { code, syscall });
}

/** A growable byte array. */
class Bytes {
  private data: Uint8Array;
  length: number;

  constructor(from?: Bytes) {
    this.data = from ? from.data.slice(0, Math.max(from.length, 64)) : new Uint8Array(64);
    this.length = from ? from.length : 0;
  }

  write(offset: number, source: Uint8Array): void {
    const end = offset + source.length;
    this.ensure(end);
    // Bytes between the old end and `offset` are a hole: zeros (ensure() keeps them zero).
    this.data.set(source, offset);
    this.length = Math.max(this.length, end);
  }

  truncate(length: number): void {
    if (length < this.length) this.data.fill(0, length, this.length);
    else this.ensure(length);
    this.length = length;
  }

  /** Copies [offset, offset + target.length) into target; past the end reads zeros. */
  read(offset: number, target: Uint8Array): void {
    const available = Math.max(0, Math.min(target.length, this.length - offset));
    if (available > 0) target.set(this.data.subarray(offset, offset + available));
    target.fill(0, available);
  }

  flipBit(offset: number, bit: number): void {
    assert(offset < this.length, 'flip inside the file');
    this.data[offset] = this.data[offset]! ^ (1 << bit);
  }

  snapshot(): Buffer {
    return Buffer.from(this.data.subarray(0, this.length));
  }

  private ensure(length: number): void {
    if (length <= this.data.length) return;
    let capacity = this.data.length;
    while (capacity < length) capacity *= 2;
    const grown = new Uint8Array(capacity);
    grown.set(this.data.subarray(0, this.length));
    this.data = grown;
  }
}

type CompletedOp =
  | { readonly kind: 'write'; readonly order: number; readonly offset: number; readonly data: Uint8Array; readonly lost: boolean }
  | { readonly kind: 'truncate'; readonly order: number; readonly length: number };

interface FileState {
  readonly name: string;
  readonly cache: Bytes;
  durable: Bytes;
  /** Completed but not yet durable, in completion order. */
  unsynced: CompletedOp[];
}

export class SimDisk {
  readonly name: string;
  readonly profile: DiskProfile;
  readonly sectorBytes: number;
  readonly capacityBytes: number;
  readonly dirtyOperationsMax: number;
  readonly stats: DiskStats = { writes: 0, reads: 0, syncs: 0, truncates: 0, bytesWritten: 0, crashes: 0, writtenBackAtCrash: 0, lostAtCrash: 0, writtenBackInBackground: 0 };
  private readonly scheduler: Scheduler;
  private readonly prng: Prng;
  private readonly files = new Map<string, FileState>();
  private readonly faultLog: DiskFaultRecord[] = [];
  /** Completion events of operations in flight; a crash cancels them all. */
  private readonly inFlight = new Set<ScheduledEvent>();
  /** Bumped by crash(): handles of an older incarnation fail with EBADF. */
  private incarnation = 0;
  private nextOrder = 1;

  constructor(options: {
    name: string;
    scheduler: Scheduler;
    prng: Prng;
    profile?: DiskProfile;
    sectorBytes?: number;
    capacityBytes?: number;
    dirtyOperationsMax?: number;
  }) {
    this.name = options.name;
    this.scheduler = options.scheduler;
    this.prng = options.prng;
    this.profile = options.profile ?? PERFECT;
    this.sectorBytes = options.sectorBytes ?? SECTOR_BYTES_DEFAULT;
    this.capacityBytes = options.capacityBytes ?? 1024 * 1024 * 1024;
    this.dirtyOperationsMax = options.dirtyOperationsMax ?? DIRTY_OPERATIONS_MAX_DEFAULT;
    assert(Number.isInteger(this.dirtyOperationsMax) && this.dirtyOperationsMax > 0, 'dirtyOperationsMax must be a positive integer');
    assert(Number.isInteger(this.sectorBytes) && this.sectorBytes > 0, 'sector size must be a positive integer');
    for (const [key, value] of Object.entries(this.profile)) {
      if (key.endsWith('Probability')) assert(typeof value === 'number' && value >= 0 && value <= 1, `disk profile ${this.profile.name}: ${key} must be in [0, 1]`);
    }
  }

  /** Opens `file`; with `create` a missing file is created empty, with `exclusive` an existing one is EEXIST. */
  open(file: string, options: { create?: boolean; exclusive?: boolean } = {}): Promise<SimFile> {
    return this.operation('open', file, this.prng.int(this.profile.readMsMin, this.profile.readMsMax), () => {
      const existing = this.files.get(file);
      if (existing !== undefined && options.exclusive) throw ioError('EEXIST', 'open', file);
      if (existing === undefined) {
        if (!options.create) throw ioError('ENOENT', 'open', file);
        this.files.set(file, { name: file, cache: new Bytes(), durable: new Bytes(), unsynced: [] });
      }
      return new SimFile(this, file, this.incarnation);
    });
  }

  unlink(file: string): Promise<void> {
    return this.operation('unlink', file, this.prng.int(this.profile.writeMsMin, this.profile.writeMsMax), () => {
      if (!this.files.delete(file)) throw ioError('ENOENT', 'unlink', file);
    });
  }

  exists(file: string): boolean {
    return this.files.has(file);
  }

  /** File names, sorted. */
  list(): string[] {
    return [...this.files.keys()].sort();
  }

  /** Operations submitted and not yet completed. */
  get pendingOperations(): number {
    return this.inFlight.size;
  }

  /** Power loss or process death: see the file comment. The disk is usable again at once. */
  crash(): void {
    this.stats.crashes++;
    this.incarnation++;
    for (const event of this.inFlight) event.cancel();
    this.inFlight.clear();
    this.scheduler.log(`disk ${this.name} crash`);
    for (const state of this.files.values()) this.writeBackAtCrash(state);
    // A latent sector error, found now that reads go to the platter.
    if (this.files.size > 0 && this.prng.chance(this.profile.corruptionProbabilityPerCrash)) {
      const candidates = [...this.files.values()].filter((state) => state.durable.length > 0);
      if (candidates.length > 0) this.flipRandomBit(this.prng.pick(candidates));
    }
    // The page cache is gone: reads now see the platter.
    for (const state of this.files.values()) {
      state.cache.truncate(0);
      state.cache.write(0, state.durable.snapshot());
    }
  }

  /** The disk is replaced by an empty one (a failed drive swapped): crash, then every file gone. */
  wipe(): void {
    this.crash();
    this.files.clear();
    this.scheduler.log(`disk ${this.name} wiped`);
  }

  /**
   * Flips one bit of the durable part now, at `offset` if given, else at random. Like a latent
   * sector error, reads see it only once the cache is gone (after a crash).
   */
  corrupt(file: string, offset?: number): void {
    const state = this.fileState(file, 'corrupt');
    assert(state.durable.length > 0, `cannot corrupt the empty durable part of ${file}`);
    this.flipRandomBit(state, offset);
  }

  /** Every fault injected so far, oldest first. */
  faults(): readonly DiskFaultRecord[] {
    return this.faultLog;
  }

  /** Injected faults touching [offset, offset + lengthBytes) of `file`, optionally only of `kinds`. */
  faultsOverlapping(file: string, offset: number, lengthBytes: number, kinds?: readonly DiskFaultKind[]): DiskFaultRecord[] {
    return this.faultLog.filter(
      (fault) =>
        fault.file === file &&
        fault.offset < offset + lengthBytes &&
        offset < fault.offset + fault.lengthBytes &&
        (kinds === undefined || kinds.includes(fault.kind)),
    );
  }

  /** What a crash right now would leave if nothing unsynced were written back (for checkers). */
  durableContent(file: string): Buffer | undefined {
    return this.files.get(file)?.durable.snapshot();
  }

  /** What reads see now (for checkers). */
  cachedContent(file: string): Buffer | undefined {
    return this.files.get(file)?.cache.snapshot();
  }

  /** Bytes used by all files (their cached size). */
  get usedBytes(): number {
    let total = 0;
    for (const state of this.files.values()) total += state.cache.length;
    return total;
  }

  // ---- operations used by SimFile ---------------------------------------------------------

  /** @internal */
  fileWrite(handle: SimFile, buffers: readonly Uint8Array[], position: number): Promise<void> {
    assert(Number.isSafeInteger(position) && position >= 0, `write position ${position} is invalid`);
    // Copy now: the caller may reuse its buffers once the call returns (as with pwrite's iovecs).
    let length = 0;
    for (const buffer of buffers) length += buffer.length;
    const data = new Uint8Array(length);
    let at = 0;
    for (const buffer of buffers) {
      data.set(buffer, at);
      at += buffer.length;
    }
    const file = handle.file;
    return this.handleOperation(handle, 'write', this.prng.int(this.profile.writeMsMin, this.profile.writeMsMax), () => {
      const state = this.fileState(file, 'write');
      if (this.prng.chance(this.profile.writeErrorProbability)) throw this.reportedFault('write-eio', 'EIO', 'write', file, position, length);
      const growthBytes = Math.max(0, position + length - state.cache.length);
      if (this.usedBytes + growthBytes > this.capacityBytes || (length > 0 && this.prng.chance(this.profile.enospcProbability))) {
        throw this.reportedFault('enospc', 'ENOSPC', 'write', file, position, length);
      }
      const lost = this.prng.chance(this.profile.lostWriteProbability);
      if (lost) this.recordFault('lost-write', file, position, length, false);
      state.cache.write(position, data);
      this.addUnsynced(state, { kind: 'write', order: this.nextOrder++, offset: position, data, lost });
      this.stats.writes++;
      this.stats.bytesWritten += length;
    });
  }

  /** @internal */
  fileRead(handle: SimFile, target: Uint8Array, position: number): Promise<void> {
    assert(Number.isSafeInteger(position) && position >= 0, `read position ${position} is invalid`);
    const file = handle.file;
    return this.handleOperation(handle, 'read', this.prng.int(this.profile.readMsMin, this.profile.readMsMax), () => {
      const state = this.fileState(file, 'read');
      if (this.prng.chance(this.profile.readErrorProbability)) throw this.reportedFault('read-eio', 'EIO', 'read', file, position, target.length);
      state.cache.read(position, target);
      this.stats.reads++;
    });
  }

  /** @internal */
  fileTruncate(handle: SimFile, length: number): Promise<void> {
    assert(Number.isSafeInteger(length) && length >= 0, `truncate length ${length} is invalid`);
    const file = handle.file;
    return this.handleOperation(handle, 'ftruncate', this.prng.int(this.profile.writeMsMin, this.profile.writeMsMax), () => {
      const state = this.fileState(file, 'ftruncate');
      state.cache.truncate(length);
      this.addUnsynced(state, { kind: 'truncate', order: this.nextOrder++, length });
      this.stats.truncates++;
    });
  }

  /** @internal */
  fileSync(handle: SimFile): Promise<void> {
    const file = handle.file;
    // fdatasync covers what completed before it was called, not what completes while it runs.
    const coveredOrder = this.nextOrder - 1;
    return this.handleOperation(handle, 'fdatasync', this.prng.int(this.profile.syncMsMin, this.profile.syncMsMax), () => {
      const state = this.fileState(file, 'fdatasync');
      const covered = state.unsynced.filter((op) => op.order <= coveredOrder);
      state.unsynced = state.unsynced.filter((op) => op.order > coveredOrder);
      this.stats.syncs++;
      if (this.prng.chance(this.profile.syncErrorProbability)) {
        // The kernel marks the pages clean anyway: the cache keeps showing data the disk lacks.
        for (const op of covered) if (op.kind === 'write') this.recordFault('sync-eio', file, op.offset, op.data.length, true);
        throw ioError('EIO', 'fdatasync', file);
      }
      for (const op of covered) this.applyDurable(state, op);
    });
  }

  /** @internal */
  fileSize(handle: SimFile): Promise<number> {
    const file = handle.file;
    return this.handleOperation(handle, 'fstat', 0, () => this.fileState(file, 'fstat').cache.length);
  }

  /** @internal */
  isCurrent(handle: SimFile): boolean {
    return handle.incarnation === this.incarnation;
  }

  // ---- internals -------------------------------------------------------------------------

  private handleOperation<T>(handle: SimFile, syscall: string, latencyMs: number, complete: () => T): Promise<T> {
    if (handle.closed || !this.isCurrent(handle)) return Promise.reject(ioError('EBADF', syscall, handle.file));
    return this.operation(syscall, handle.file, latencyMs, complete);
  }

  /** Runs `complete` after `latencyMs` as a scheduler event; a crash first means it never settles. */
  private operation<T>(syscall: string, file: string, latencyMs: number, complete: () => T): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const event = this.scheduler.after(
        latencyMs,
        () => {
          this.inFlight.delete(event);
          try {
            resolve(complete());
          } catch (error) {
            this.scheduler.log(`disk ${this.name} ${syscall} ${file}: ${(error as Error).message}`);
            reject(error);
          }
        },
        `disk ${syscall}`,
      );
      this.inFlight.add(event);
    });
  }

  private fileState(file: string, syscall: string): FileState {
    const state = this.files.get(file);
    if (state === undefined) throw ioError('ENOENT', syscall, file);
    return state;
  }

  private addUnsynced(state: FileState, op: CompletedOp): void {
    state.unsynced.push(op);
    if (state.unsynced.length <= this.dirtyOperationsMax) return;
    // Background writeback of the oldest half: order is kept, so a crash still leaves a prefix.
    const writtenBack = state.unsynced.splice(0, Math.ceil(this.dirtyOperationsMax / 2));
    for (const op of writtenBack) this.applyDurable(state, op);
    this.stats.writtenBackInBackground += writtenBack.length;
  }

  private applyDurable(state: FileState, op: CompletedOp): void {
    if (op.kind === 'truncate') state.durable.truncate(op.length);
    else if (!op.lost) state.durable.write(op.offset, op.data);
  }

  private writeBackAtCrash(state: FileState): void {
    const unsynced = state.unsynced;
    let survivors = 0;
    if (unsynced.length > 0 && this.prng.chance(this.profile.crashWritebackProbability)) {
      survivors = this.prng.int(0, unsynced.length);
      for (const op of unsynced.slice(0, survivors)) this.applyDurable(state, op);
      const torn = unsynced[survivors];
      if (torn !== undefined && torn.kind === 'write' && !torn.lost && this.prng.chance(this.profile.tornWriteProbability)) {
        this.tearWrite(state, torn);
      }
    }
    this.stats.writtenBackAtCrash += survivors;
    this.stats.lostAtCrash += unsynced.length - survivors;
    state.unsynced = [];
  }

  /** A sector-aligned prefix of `op` reaches the platter; sectors are written whole or not at all. */
  private tearWrite(state: FileState, op: Extract<CompletedOp, { kind: 'write' }>): void {
    const start = op.offset;
    const end = op.offset + op.data.length;
    const firstBoundary = Math.floor(start / this.sectorBytes) * this.sectorBytes + this.sectorBytes;
    if (firstBoundary >= end) return; // inside one sector: atomic
    const boundaries = Math.ceil((end - firstBoundary) / this.sectorBytes);
    const cut = Math.min(end, firstBoundary + this.sectorBytes * this.prng.int(0, boundaries - 1));
    state.durable.write(start, op.data.subarray(0, cut - start));
    // The whole range is suspect: new bytes before the cut, old ones after it.
    this.recordFault('torn-write', state.name, start, end - start, false);
    this.scheduler.log(`disk ${this.name} torn write ${state.name} [${start}, ${end}) kept [${start}, ${cut})`);
  }

  private flipRandomBit(state: FileState, offset?: number): void {
    const at = offset ?? this.prng.int(0, state.durable.length - 1);
    assert(at >= 0 && at < state.durable.length, `corruption offset ${at} outside ${state.name}`);
    state.durable.flipBit(at, this.prng.int(0, 7));
    const sectorStart = Math.floor(at / this.sectorBytes) * this.sectorBytes;
    this.recordFault('corruption', state.name, sectorStart, this.sectorBytes, false);
    this.scheduler.log(`disk ${this.name} corruption ${state.name} at ${at}`);
  }

  private reportedFault(kind: DiskFaultKind, code: SimIoError['code'], syscall: string, file: string, offset: number, lengthBytes: number): SimIoError {
    this.recordFault(kind, file, offset, lengthBytes, true);
    return ioError(code, syscall, file);
  }

  private recordFault(kind: DiskFaultKind, file: string, offset: number, lengthBytes: number, reported: boolean): void {
    assert(this.faultLog.length < FAULT_RECORDS_MAX, `disk ${this.name}: more than ${FAULT_RECORDS_MAX} injected faults; lower the profile's rates`);
    this.faultLog.push({ kind, file, offset, lengthBytes, timeMs: this.scheduler.nowMs(), reported });
  }
}

/** An open file: the subset of fs.promises.FileHandle / src/store/file-io.ts a store shell needs. */
export class SimFile {
  readonly file: string;
  /** @internal */ readonly incarnation: number;
  private readonly disk: SimDisk;
  private isClosed = false;

  constructor(disk: SimDisk, file: string, incarnation: number) {
    this.disk = disk;
    this.file = file;
    this.incarnation = incarnation;
  }

  get closed(): boolean {
    return this.isClosed;
  }

  /** pwrite of all of `data` at `position` (into the cache; durable after datasync). */
  write(data: Uint8Array, position: number): Promise<void> {
    return this.disk.fileWrite(this, [data], position);
  }

  /** One pwritev: the buffers back to back at `position`, as one operation. */
  writev(buffers: readonly Uint8Array[], position: number): Promise<void> {
    return this.disk.fileWrite(this, buffers, position);
  }

  /** Fills `target` from `position`; bytes past the end read as zeros (like readAll). */
  read(target: Uint8Array, position: number): Promise<void> {
    return this.disk.fileRead(this, target, position);
  }

  truncate(length: number): Promise<void> {
    return this.disk.fileTruncate(this, length);
  }

  datasync(): Promise<void> {
    return this.disk.fileSync(this);
  }

  size(): Promise<number> {
    return this.disk.fileSize(this);
  }

  close(): Promise<void> {
    this.isClosed = true;
    return Promise.resolve();
  }
}
