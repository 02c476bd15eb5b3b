// A sparse block device held in RAM: the simplest real BlockDevice, used by the NBD tests and
// by the simulator. Allocation is tracked per 4 KiB block, so READ holes and BLOCK_STATUS are
// exact: a block never written (or trimmed) is a hole, a block zeroed with NO_HOLE is
// allocated-but-zero, anything else is data. Writes are visible to every caller at once, so
// FLUSH and FUA are no-ops and multi-conn is safe.
import { MirrorsanError, assert } from '../errors.js';
import type { BlockDevice, DeviceGeometry, Extent, ReadPiece, WriteOptions, ZeroOptions } from './device.js';

/** Allocation granularity: holes and extents are reported in units of this. */
export const MEMORY_BLOCK_BYTES = 4096;

/** Marks a block that is allocated and reads as zeros without holding a buffer. */
const ZERO_BLOCK = Symbol('zero block');
type BlockEntry = Buffer | typeof ZERO_BLOCK;

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
  /** Allocated blocks by index; a missing index is a hole. */
  private readonly blocks = new Map<number, BlockEntry>();

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
      const data = this.blocks.get(Math.floor(position / MEMORY_BLOCK_BYTES)) instanceof Buffer;
      const runEnd = this.runEnd(position, end, (entry) => entry instanceof Buffer === data);
      if (!data) {
        pieces.push({ offset: position, kind: 'zero', length: runEnd - position });
      } else {
        // One buffer per data run, copied out so a later write cannot change bytes in flight.
        const buffer = Buffer.allocUnsafe(runEnd - position);
        this.forEachSegment(position, runEnd - position, (index, within, count, at) => {
          const entry = this.blocks.get(index);
          assert(entry instanceof Buffer, 'data run crosses a block without data');
          entry.copy(buffer, at, within, within + count);
        });
        pieces.push({ offset: position, kind: 'data', data: buffer });
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
    this.forEachSegment(offset, data.length, (index, within, count, at) => {
      let entry = this.blocks.get(index);
      if (!(entry instanceof Buffer)) {
        entry = count === MEMORY_BLOCK_BYTES ? Buffer.allocUnsafe(MEMORY_BLOCK_BYTES) : Buffer.alloc(MEMORY_BLOCK_BYTES);
        this.blocks.set(index, entry);
      }
      data.copy(entry, within, at, at + count);
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
    this.forEachSegment(offset, length, (index, within, count) => {
      const entry = this.blocks.get(index);
      if (count === MEMORY_BLOCK_BYTES || (within === 0 && this.isTailBlock(index, count))) {
        if (options.mayTrim) this.blocks.delete(index);
        else this.blocks.set(index, ZERO_BLOCK);
      } else if (entry instanceof Buffer) {
        entry.fill(0, within, within + count);
      } else if (entry === undefined && !options.mayTrim) {
        // NO_HOLE: the range must end up provisioned; the block reads as zeros either way.
        this.blocks.set(index, ZERO_BLOCK);
      }
    });
  }

  async trim(offset: number, length: number, options: WriteOptions): Promise<void> {
    this.checkWritable();
    this.checkRange(offset, length);
    this.counters.trims++;
    if (options.fua) this.counters.fuaWrites++;
    // [NBD: NBD_CMD_TRIM] the server MAY round inward: only whole blocks are released.
    this.forEachSegment(offset, length, (index, within, count) => {
      if (count === MEMORY_BLOCK_BYTES || (within === 0 && this.isTailBlock(index, count))) this.blocks.delete(index);
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
      const kind = this.kindOf(this.blocks.get(Math.floor(position / MEMORY_BLOCK_BYTES)));
      const runEnd = this.runEnd(position, end, (entry) => this.kindOf(entry) === kind);
      extents.push({ offset: position, length: runEnd - position, hole: kind === 'hole', zero: kind !== 'data' });
      position = runEnd;
    }
    return extents;
  }

  /** The bytes of a range as a client would read them (test helper). */
  contents(offset: number, length: number): Buffer {
    this.checkRange(offset, length);
    const buffer = Buffer.alloc(length);
    this.forEachSegment(offset, length, (index, within, count, at) => {
      const entry = this.blocks.get(index);
      if (entry instanceof Buffer) entry.copy(buffer, at, within, within + count);
    });
    return buffer;
  }

  /** Bytes of storage allocated (blocks that are not holes), a multiple of 4 KiB. */
  allocatedBytes(): number {
    return this.blocks.size * MEMORY_BLOCK_BYTES;
  }

  private kindOf(entry: BlockEntry | undefined): 'hole' | 'zero' | 'data' {
    if (entry === undefined) return 'hole';
    return entry === ZERO_BLOCK ? 'zero' : 'data';
  }

  /** First block boundary (or `end`) from `position` where `same` stops holding. */
  private runEnd(position: number, end: number, same: (entry: BlockEntry | undefined) => boolean): number {
    let index = Math.floor(position / MEMORY_BLOCK_BYTES) + 1;
    while (index * MEMORY_BLOCK_BYTES < end && same(this.blocks.get(index))) index++;
    return Math.min(index * MEMORY_BLOCK_BYTES, end);
  }

  /** True when the block is the device's last and [0, usedBytes) covers all of the device in it. */
  private isTailBlock(index: number, usedBytes: number): boolean {
    return index * MEMORY_BLOCK_BYTES + usedBytes === this.geometryValue.sizeBytes;
  }

  /** Calls `visit(blockIndex, offsetWithinBlock, count, offsetWithinRange)` per block touched. */
  private forEachSegment(offset: number, length: number, visit: (index: number, within: number, count: number, at: number) => void): void {
    let at = 0;
    while (at < length) {
      const position = offset + at;
      const index = Math.floor(position / MEMORY_BLOCK_BYTES);
      const within = position - index * MEMORY_BLOCK_BYTES;
      const count = Math.min(MEMORY_BLOCK_BYTES - within, length - at);
      visit(index, within, count, at);
      at += count;
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
