// The allocation map of a volume: one bit per block, set when the block holds data written by
// a client, clear when it reads as zeros and may occupy no space. Pure (no I/O). The image
// file's bytes always equal the volume's content on their own, so the map is metadata for
// BLOCK_STATUS and reads (unallocated runs are answered as zeros without touching the disk).
import { MirrorsanError, assert } from '../errors.js';
import { crc32c } from '../util/crc32c.js';

export interface BlockRun {
  firstBlock: number;
  blockCount: number;
  allocated: boolean;
}

/** Serialized form: a 40-byte header, then the bits (block i is bit i%8 of byte i/8). */
const MAP_MAGIC = 0x4d41534d; // "MSAM"
const MAP_VERSION = 1;
export const ALLOC_MAP_HEADER_BYTES = 40;

const POPCOUNT = new Uint8Array(256);
for (let i = 1; i < 256; i++) POPCOUNT[i] = (i & 1) + POPCOUNT[i >> 1]!;

export class AllocationMap {
  readonly blockCount: number;
  readonly blockSizeBytes: number;
  private readonly bits: Uint8Array;
  private allocated = 0;

  constructor(blockCount: number, blockSizeBytes: number, bits?: Uint8Array) {
    assert(Number.isSafeInteger(blockCount) && blockCount >= 0, `block count ${blockCount}`);
    assert(Number.isSafeInteger(blockSizeBytes) && blockSizeBytes > 0, `block size ${blockSizeBytes}`);
    this.blockCount = blockCount;
    this.blockSizeBytes = blockSizeBytes;
    const byteCount = Math.ceil(blockCount / 8);
    if (bits) {
      assert(bits.length === byteCount, `bitmap of ${bits.length} bytes for ${blockCount} blocks`);
      this.bits = bits;
      for (let i = 0; i < byteCount; i++) this.allocated += POPCOUNT[bits[i]!]!;
    } else {
      this.bits = new Uint8Array(byteCount);
    }
  }

  /** A map for a volume of `sizeBytes`, which must be a whole number of blocks. */
  static forSize(sizeBytes: number, blockSizeBytes: number): AllocationMap {
    assert(sizeBytes % blockSizeBytes === 0, `size ${sizeBytes} is not a multiple of the block size ${blockSizeBytes}`);
    return new AllocationMap(sizeBytes / blockSizeBytes, blockSizeBytes);
  }

  get allocatedBlocks(): number {
    return this.allocated;
  }

  clone(): AllocationMap {
    return new AllocationMap(this.blockCount, this.blockSizeBytes, this.bits.slice());
  }

  isAllocated(block: number): boolean {
    return (this.bits[block >>> 3]! & (1 << (block & 7))) !== 0;
  }

  /** Marks [first, first+count) allocated; returns how many blocks were newly allocated. */
  setRange(first: number, count: number): number {
    return this.update(first, count, true);
  }

  /** Marks [first, first+count) unallocated; returns how many blocks were freed. */
  clearRange(first: number, count: number): number {
    return this.update(first, count, false);
  }

  allAllocated(first: number, count: number): boolean {
    this.checkRange(first, count);
    return count === 0 || (this.isAllocated(first) && this.nextChange(first, first + count) === first + count);
  }

  noneAllocated(first: number, count: number): boolean {
    this.checkRange(first, count);
    return count === 0 || (!this.isAllocated(first) && this.nextChange(first, first + count) === first + count);
  }

  /**
   * The first block in (block, limit) whose state differs from `block`'s, or `limit`.
   * Skips whole bytes of equal bits, so a sparse or dense range costs blocks/8 steps.
   */
  nextChange(block: number, limit: number): number {
    const state = this.isAllocated(block);
    const uniform = state ? 0xff : 0x00;
    let at = block + 1;
    while (at < limit && (at & 7) !== 0) {
      if (this.isAllocated(at) !== state) return at;
      at++;
    }
    let byte = at >>> 3;
    const lastByte = limit >>> 3;
    while (byte < lastByte && this.bits[byte] === uniform) byte++;
    at = Math.max(at, byte * 8);
    while (at < limit) {
      if (this.isAllocated(at) !== state) return at;
      at++;
    }
    return limit;
  }

  /** Maximal runs of equal state covering [first, first+count) exactly, in order. */
  runs(first: number, count: number, maxRuns = Number.POSITIVE_INFINITY): BlockRun[] {
    this.checkRange(first, count);
    const out: BlockRun[] = [];
    const limit = first + count;
    let at = first;
    while (at < limit && out.length < maxRuns) {
      const end = this.nextChange(at, limit);
      out.push({ firstBlock: at, blockCount: end - at, allocated: this.isAllocated(at) });
      at = end;
    }
    return out;
  }

  serialize(sequence: number): Buffer {
    assert(Number.isSafeInteger(sequence) && sequence >= 0, `sequence ${sequence}`);
    const out = Buffer.alloc(ALLOC_MAP_HEADER_BYTES + this.bits.length);
    out.writeUInt32LE(MAP_MAGIC, 0);
    out.writeUInt16LE(MAP_VERSION, 4);
    out.writeUInt32LE(this.blockSizeBytes, 8);
    out.writeBigUInt64LE(BigInt(this.blockCount), 16);
    out.writeBigUInt64LE(BigInt(sequence), 24);
    out.set(this.bits, ALLOC_MAP_HEADER_BYTES);
    const crc = crc32c(out.subarray(ALLOC_MAP_HEADER_BYTES), crc32c(out.subarray(0, 32)));
    out.writeUInt32LE(crc, 32);
    return out;
  }

  /** Parses a serialized map; any damage is a STORE_IO error naming what is wrong. */
  static deserialize(data: Buffer, what = 'allocation map'): { map: AllocationMap; sequence: number } {
    const fail = (reason: string): never => {
      throw new MirrorsanError('STORE_IO', `${what} is damaged: ${reason}`);
    };
    if (data.length < ALLOC_MAP_HEADER_BYTES) fail(`only ${data.length} bytes`);
    if (data.readUInt32LE(0) !== MAP_MAGIC) fail('bad magic');
    if (data.readUInt16LE(4) !== MAP_VERSION) fail(`unknown version ${data.readUInt16LE(4)}`);
    const crc = crc32c(data.subarray(ALLOC_MAP_HEADER_BYTES), crc32c(data.subarray(0, 32)));
    if (crc !== data.readUInt32LE(32)) fail('crc mismatch');
    const blockSizeBytes = data.readUInt32LE(8);
    const blockCount = data.readBigUInt64LE(16);
    const sequence = data.readBigUInt64LE(24);
    if (blockSizeBytes === 0 || blockCount > BigInt(Number.MAX_SAFE_INTEGER) || sequence > BigInt(Number.MAX_SAFE_INTEGER)) {
      fail('field out of range');
    }
    const blocks = Number(blockCount);
    const bits = data.subarray(ALLOC_MAP_HEADER_BYTES);
    if (bits.length !== Math.ceil(blocks / 8)) fail(`${bits.length} bitmap bytes for ${blocks} blocks`);
    // Bits past the last block must be clear, or counts would be wrong.
    if (blocks % 8 !== 0 && (bits[bits.length - 1]! >> (blocks % 8)) !== 0) fail('bits set past the last block');
    return { map: new AllocationMap(blocks, blockSizeBytes, Uint8Array.from(bits)), sequence: Number(sequence) };
  }

  private checkRange(first: number, count: number): void {
    assert(
      Number.isInteger(first) && Number.isInteger(count) && first >= 0 && count >= 0 && first + count <= this.blockCount,
      `block range [${first}, ${first + count}) outside a map of ${this.blockCount} blocks`,
    );
  }

  private update(first: number, count: number, allocate: boolean): number {
    this.checkRange(first, count);
    if (count === 0) return 0;
    const end = first + count;
    let changed = 0;
    const apply = (byte: number, mask: number): void => {
      const before = this.bits[byte]!;
      const after = allocate ? before | mask : before & ~mask;
      changed += Math.abs(POPCOUNT[after]! - POPCOUNT[before]!);
      this.bits[byte] = after;
    };
    const firstByte = first >>> 3;
    const lastByte = (end - 1) >>> 3;
    if (firstByte === lastByte) {
      apply(firstByte, ((1 << (end - first)) - 1) << (first & 7));
    } else {
      apply(firstByte, (0xff << (first & 7)) & 0xff);
      for (let byte = firstByte + 1; byte < lastByte; byte++) {
        const before = this.bits[byte]!;
        changed += allocate ? 8 - POPCOUNT[before]! : POPCOUNT[before]!;
      }
      this.bits.fill(allocate ? 0xff : 0x00, firstByte + 1, lastByte);
      apply(lastByte, 0xff >>> (7 - ((end - 1) & 7)));
    }
    this.allocated += allocate ? changed : -changed;
    return changed;
  }
}
