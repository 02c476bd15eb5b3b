// A sparse block device held in RAM: the simplest real BlockDevice, used by the NBD tests and
// by the simulator. Allocation is tracked per 4 KiB block, so READ holes and BLOCK_STATUS are
// exact: a block never written (or trimmed) is a hole, a block zeroed with NO_HOLE is
// allocated-but-zero, anything else is data. Writes are visible to every caller at once, so
// FLUSH and FUA are no-ops and multi-conn is safe.
//
// Bytes live in 1 MiB slabs at fixed positions (slab i always holds [i MiB, i+1 MiB)), so a
// 1 GiB device is ~1000 objects for the garbage collector rather than 262144, and a read can
// return views of the slabs instead of copies. A view can only ever show bytes of its own
// range: a write that overlaps a READ still in flight may show through, which NBD leaves
// undefined for concurrent overlapping requests, exactly as on a real disk.
import { MirrorsanError, assert } from '../errors.js';
import type { BlockDevice, DeviceGeometry, Extent, ReadPiece, WriteOptions, ZeroOptions } from './device.js';

/** Allocation granularity: holes and extents are reported in units of this. */
export const MEMORY_BLOCK_BYTES = 4096;
const BLOCKS_PER_SLAB = 256;
const SLAB_BYTES = MEMORY_BLOCK_BYTES * BLOCKS_PER_SLAB;

/** Per-block state. */
const HOLE = 0;
const ZERO = 1;
const DATA = 2;
type BlockState = typeof HOLE | typeof ZERO | typeof DATA;

interface Slab {
  /** Block states; a slab whose blocks are all holes is dropped. */
  state: Uint8Array;
  allocatedBlocks: number;
  /** Zero-filled when created; bytes of blocks that are not DATA are meaningless. */
  bytes: Buffer | undefined;
}

/** BLOCK_STATUS looks at no more than this many blocks per call (1 GiB); callers ask again. */
const STATUS_BLOCKS_PER_CALL_MAX = 1 << 18;

export interface MemoryDeviceOptions {
  name: string;
  description?: string;
  sizeBytes: number;
  /** Request alignment enforced by the NBD server (default 1: any byte). */
  blockSizeMin?: number;
  blockSizePreferred?: number;
  payloadMaxBytes?: number;
  readOnly?: boolean;
  /** Default true: one process, one copy of the data, every connection sees every write. */
  multiConn?: boolean;
  /** Default true (zeroing RAM is fast); false makes FAST_ZERO requests fail with NBD_ENOTSUP. */
  fastZero?: boolean;
}

/** Calls seen by the device, so tests can check what the server passed through. */
export interface MemoryDeviceCounters {
  reads: number;
  writes: number;
  fuaWrites: number;
  zeroes: number;
  trims: number;
  flushes: number;
  caches: number;
}

function isPowerOfTwo(value: number): boolean {
  return Number.isSafeInteger(value) && value > 0 && (value & (value - 1)) === 0;
}

export class MemoryDevice implements BlockDevice {
  readonly name: string;
  readonly description: string;
  readonly counters: MemoryDeviceCounters = { reads: 0, writes: 0, fuaWrites: 0, zeroes: 0, trims: 0, flushes: 0, caches: 0 };
  private readonly geometryValue: DeviceGeometry;
  private readonly fastZero: boolean;
  private readonly slabs = new Map<number, Slab>();

  constructor(options: MemoryDeviceOptions) {
    const geometry: DeviceGeometry = {
      sizeBytes: options.sizeBytes,
      blockSizeMin: options.blockSizeMin ?? 1,
      blockSizePreferred: options.blockSizePreferred ?? MEMORY_BLOCK_BYTES,
      payloadMaxBytes: options.payloadMaxBytes ?? 32 * 1024 * 1024,
      readOnly: options.readOnly ?? false,
      multiConn: options.multiConn ?? true,
    };
    const problem = MemoryDevice.geometryProblem(geometry);
    if (problem !== undefined) throw new MirrorsanError('CONFIG_INVALID', `memory device ${options.name}: ${problem}`);
    this.name = options.name;
    this.description = options.description ?? '';
    this.geometryValue = Object.freeze(geometry);
    this.fastZero = options.fastZero ?? true;
  }

  /** [NBD: Size constraints] the rules a geometry must follow; undefined when it does. */
  static geometryProblem(geometry: DeviceGeometry): string | undefined {
    const { sizeBytes, blockSizeMin, blockSizePreferred, payloadMaxBytes } = geometry;
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes < 0) return `size ${sizeBytes} is not a byte count`;
    if (!isPowerOfTwo(blockSizeMin) || blockSizeMin > 65536) return `minimum block size ${blockSizeMin} is not a power of 2 up to 64 KiB`;
    if (!isPowerOfTwo(blockSizePreferred) || blockSizePreferred < Math.max(blockSizeMin, 512)) {
      return `preferred block size ${blockSizePreferred} is not a power of 2 of at least max(minimum, 512)`;
    }
    if (!Number.isSafeInteger(payloadMaxBytes) || payloadMaxBytes < blockSizePreferred || payloadMaxBytes > 0xffffffff) {
      return `maximum payload ${payloadMaxBytes} is not between the preferred block size and 2^32-1`;
    }
    if (sizeBytes % blockSizeMin !== 0) return `size ${sizeBytes} is not a multiple of the minimum block size ${blockSizeMin}`;
    return undefined;
  }

  geometry(): DeviceGeometry {
    return this.geometryValue;
  }

  async read(offset: number, length: number): Promise<ReadPiece[]> {
    this.checkRange(offset, length);
    this.counters.reads++;
    const pieces: ReadPiece[] = [];
    const end = offset + length;
    let position = offset;
    while (position < end) {
      const data = this.stateAt(position) === DATA;
      // Data runs stop at slab boundaries: each piece is a view of one slab.
      const runEnd = this.runEnd(position, end, (state) => (state === DATA) === data, data);
      if (data) {
        const slab = this.slabs.get(Math.floor(position / SLAB_BYTES));
        assert(slab?.bytes !== undefined, 'data block without slab bytes');
        const within = position % SLAB_BYTES;
        pieces.push({ offset: position, kind: 'data', data: slab.bytes.subarray(within, within + runEnd - position) });
      } else {
        const last = pieces[pieces.length - 1];
        assert(last === undefined || last.kind === 'data', 'two zero pieces in a row');
        pieces.push({ offset: position, kind: 'zero', length: runEnd - position });
      }
      position = runEnd;
    }
    return pieces;
  }

  async write(offset: number, data: Buffer, options: WriteOptions): Promise<void> {
    this.checkWritable();
    this.checkRange(offset, data.length);
    this.counters.writes++;
    if (options.fua) this.counters.fuaWrites++;
    this.forEachSegment(offset, data.length, (slabIndex, within, count, at) => {
      const slab = this.slab(slabIndex);
      const bytes = (slab.bytes ??= Buffer.alloc(SLAB_BYTES));
      this.forEachBlock(slabIndex, within, count, (block, whole) => {
        if (slab.state[block] !== DATA) {
          // Bytes of a hole or zero block are stale: zero what this write does not cover.
          if (!whole) bytes.fill(0, block * MEMORY_BLOCK_BYTES, (block + 1) * MEMORY_BLOCK_BYTES);
          this.setState(slab, block, DATA);
        }
      });
      data.copy(bytes, within, at, at + count);
    });
  }

  async writeZeroes(offset: number, length: number, options: ZeroOptions): Promise<void> {
    this.checkWritable();
    this.checkRange(offset, length);
    if (options.fastZero && !this.fastZero) {
      throw new MirrorsanError('NBD_ENOTSUP', `${this.name}: fast zeroing is disabled on this device`);
    }
    this.counters.zeroes++;
    if (options.fua) this.counters.fuaWrites++;
    this.forEachSegment(offset, length, (slabIndex, within, count) => {
      const slab = this.slabs.get(slabIndex);
      if (slab === undefined && options.mayTrim) return; // all holes already
      const target = slab ?? this.slab(slabIndex);
      this.forEachBlock(slabIndex, within, count, (block, whole, blockWithin, blockCount) => {
        if (whole) {
          this.setState(target, block, options.mayTrim ? HOLE : ZERO);
        } else if (target.state[block] === DATA) {
          const start = block * MEMORY_BLOCK_BYTES + blockWithin;
          target.bytes?.fill(0, start, start + blockCount);
        } else if (target.state[block] === HOLE && !options.mayTrim) {
          // NO_HOLE: the range must end up provisioned; the block reads as zeros either way.
          this.setState(target, block, ZERO);
        }
      });
      this.dropIfEmpty(slabIndex, target);
    });
  }

  async trim(offset: number, length: number, options: WriteOptions): Promise<void> {
    this.checkWritable();
    this.checkRange(offset, length);
    this.counters.trims++;
    if (options.fua) this.counters.fuaWrites++;
    // [NBD: NBD_CMD_TRIM] the server MAY round inward: only whole blocks are released.
    this.forEachSegment(offset, length, (slabIndex, within, count) => {
      const slab = this.slabs.get(slabIndex);
      if (slab === undefined) return;
      this.forEachBlock(slabIndex, within, count, (block, whole) => {
        if (whole) this.setState(slab, block, HOLE);
      });
      this.dropIfEmpty(slabIndex, slab);
    });
  }

  async flush(): Promise<void> {
    this.counters.flushes++;
  }

  async cache(offset: number, length: number): Promise<void> {
    this.checkRange(offset, length);
    this.counters.caches++;
  }

  blockStatus(offset: number, length: number): Extent[] {
    this.checkRange(offset, length);
    assert(length > 0, 'block status of an empty range');
    const end = Math.min(offset + length, (Math.floor(offset / MEMORY_BLOCK_BYTES) + STATUS_BLOCKS_PER_CALL_MAX) * MEMORY_BLOCK_BYTES);
    const extents: Extent[] = [];
    let position = offset;
    while (position < end) {
      const state = this.stateAt(position);
      const runEnd = this.runEnd(position, end, (other) => other === state, false);
      extents.push({ offset: position, length: runEnd - position, hole: state === HOLE, zero: state !== DATA });
      position = runEnd;
    }
    return extents;
  }

  /** The bytes of a range as a client would read them (test helper). */
  contents(offset: number, length: number): Buffer {
    this.checkRange(offset, length);
    const buffer = Buffer.alloc(length);
    for (let at = 0; at < length; ) {
      const position = offset + at;
      const count = Math.min(MEMORY_BLOCK_BYTES - (position % MEMORY_BLOCK_BYTES), length - at);
      if (this.stateAt(position) === DATA) {
        const slab = this.slabs.get(Math.floor(position / SLAB_BYTES));
        const within = position % SLAB_BYTES;
        slab?.bytes?.copy(buffer, at, within, within + count);
      }
      at += count;
    }
    return buffer;
  }

  /** Bytes of storage allocated (blocks that are not holes), a multiple of 4 KiB. */
  allocatedBytes(): number {
    let blocks = 0;
    for (const slab of this.slabs.values()) blocks += slab.allocatedBlocks;
    return blocks * MEMORY_BLOCK_BYTES;
  }

  private slab(index: number): Slab {
    let slab = this.slabs.get(index);
    if (slab === undefined) {
      slab = { state: new Uint8Array(BLOCKS_PER_SLAB), allocatedBlocks: 0, bytes: undefined };
      this.slabs.set(index, slab);
    }
    return slab;
  }

  private setState(slab: Slab, block: number, state: BlockState): void {
    const before = slab.state[block];
    if (before === state) return;
    if (before === HOLE) slab.allocatedBlocks++;
    if (state === HOLE) slab.allocatedBlocks--;
    slab.state[block] = state;
  }

  private dropIfEmpty(index: number, slab: Slab): void {
    if (slab.allocatedBlocks === 0) this.slabs.delete(index);
  }

  private stateAt(position: number): BlockState {
    const slab = this.slabs.get(Math.floor(position / SLAB_BYTES));
    if (slab === undefined) return HOLE;
    return slab.state[Math.floor((position % SLAB_BYTES) / MEMORY_BLOCK_BYTES)] as BlockState;
  }

  /**
   * The first block boundary after `position` (or `end`) where `same` stops holding; with
   * `slabBound` the run also stops at the next slab boundary.
   */
  private runEnd(position: number, end: number, same: (state: BlockState) => boolean, slabBound: boolean): number {
    const limit = slabBound ? Math.min(end, (Math.floor(position / SLAB_BYTES) + 1) * SLAB_BYTES) : end;
    let next = (Math.floor(position / MEMORY_BLOCK_BYTES) + 1) * MEMORY_BLOCK_BYTES;
    while (next < limit) {
      const slab = this.slabs.get(Math.floor(next / SLAB_BYTES));
      if (slab === undefined) {
        // A whole missing slab is holes: step over it at once.
        if (!same(HOLE)) break;
        next = (Math.floor(next / SLAB_BYTES) + 1) * SLAB_BYTES;
        continue;
      }
      if (!same(slab.state[Math.floor((next % SLAB_BYTES) / MEMORY_BLOCK_BYTES)] as BlockState)) break;
      next += MEMORY_BLOCK_BYTES;
    }
    return Math.min(next, limit);
  }

  /** Calls `visit(slabIndex, offsetWithinSlab, count, offsetWithinRange)` per slab touched. */
  private forEachSegment(offset: number, length: number, visit: (slab: number, within: number, count: number, at: number) => void): void {
    let at = 0;
    while (at < length) {
      const position = offset + at;
      const index = Math.floor(position / SLAB_BYTES);
      const within = position - index * SLAB_BYTES;
      const count = Math.min(SLAB_BYTES - within, length - at);
      visit(index, within, count, at);
      at += count;
    }
  }

  /**
   * Calls `visit(block, whole, offsetWithinBlock, count)` for each block of slab `slabIndex`
   * that [within, within+count) touches; `whole` when the range covers the block (for the
   * device's last, partial block: covers its part inside the device).
   */
  private forEachBlock(
    slabIndex: number,
    within: number,
    count: number,
    visit: (block: number, whole: boolean, blockWithin: number, blockCount: number) => void,
  ): void {
    const deviceEndWithin = this.geometryValue.sizeBytes - slabIndex * SLAB_BYTES;
    const end = within + count;
    for (let start = within; start < end; ) {
      const block = Math.floor(start / MEMORY_BLOCK_BYTES);
      const blockStart = block * MEMORY_BLOCK_BYTES;
      const stop = Math.min(blockStart + MEMORY_BLOCK_BYTES, end);
      const whole = start === blockStart && (stop === blockStart + MEMORY_BLOCK_BYTES || stop === deviceEndWithin);
      visit(block, whole, start - blockStart, stop - start);
      start = stop;
    }
  }

  private checkRange(offset: number, length: number): void {
    // The NBD server validates requests first (device.ts), so a bad range here is a bug.
    assert(
      Number.isSafeInteger(offset) && Number.isSafeInteger(length) && offset >= 0 && length >= 0 && offset + length <= this.geometryValue.sizeBytes,
      `${this.name}: range [${offset}, +${length}) outside the device of ${this.geometryValue.sizeBytes} bytes`,
    );
  }

  private checkWritable(): void {
    if (this.geometryValue.readOnly) throw new MirrorsanError('NBD_EPERM', `${this.name} is read-only`);
  }
}
