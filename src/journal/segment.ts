// The segment header codec: pure (no I/O). A log file (a write-ahead log segment, later a
// mirror container) starts with this fixed 32-byte header, then holds entries (entry.ts)
// back to back, then unused space up to its preallocated capacity.
//
// Header layout (little-endian):
//   0  u32 magic          "MSWS"
//   4  u8  version        1
//   5  u8  flags          bit 0 ZERO_TAIL: the file held only zeros after this header when
//                         this life began, so any non-zero byte past the last entry was
//                         written by this life (a torn entry), not left by an earlier one
//   6  u16 reserved       0
//   8  u64 firstSequence  sequence of the first entry; equals the number in the file name
//  16  u64 capacityBytes  file size reserved for the segment; 0 = it grows with its entries
//  24  u32 generation     random, never 0: every entry of this life carries it (entry.ts)
//  28  u32 headerCrc      CRC32C of bytes 0..28
//
// The header is what makes a reused file safe: it is written when the file starts a new
// life (a rotation) with a fresh random generation, and a spare file never holds a valid
// header on disk (recycling zeroes it durably), so after a crash a file either shows this
// life's header or none, never an old one that would vouch for old entries.
import { crc32c } from '../util/crc32c.js';

export const SEGMENT_MAGIC = 0x53_57_53_4d; // "MSWS" as bytes on disk
export const SEGMENT_VERSION = 1;
export const SEGMENT_HEADER_BYTES = 32;
const FLAG_ZERO_TAIL = 0x01;
const KNOWN_FLAGS = FLAG_ZERO_TAIL;
const TWO_POW_32 = 0x1_0000_0000;
/** The high word of a u64 below 2^53. */
const SAFE_HIGH_WORD_LIMIT = 0x20_0000;

export interface SegmentHeader {
  firstSequence: number;
  /** File size reserved for the segment; 0 when it grows with its entries. */
  capacityBytes: number;
  /** Tag of this life of the file, in [1, 2^32). */
  generation: number;
  /** The file held only zeros past this header when this life began. */
  zeroTail: boolean;
}

function headerProblem(header: SegmentHeader): string | undefined {
  if (!Number.isSafeInteger(header.firstSequence) || header.firstSequence < 1) return 'firstSequence must be an integer in [1, 2^53)';
  if (!Number.isSafeInteger(header.capacityBytes) || header.capacityBytes < 0) return 'capacityBytes must be a non-negative integer';
  if (header.capacityBytes !== 0 && header.capacityBytes < SEGMENT_HEADER_BYTES) return 'capacityBytes smaller than the header';
  if (!Number.isInteger(header.generation) || header.generation < 1 || header.generation > 0xffff_ffff) {
    return 'generation must be an integer in [1, 2^32)';
  }
  return undefined;
}

export function encodeSegmentHeader(header: SegmentHeader): Buffer {
  const problem = headerProblem(header);
  if (problem !== undefined) throw new Error(`assertion failed: cannot encode segment header: ${problem}`);
  const buf = Buffer.alloc(SEGMENT_HEADER_BYTES);
  buf.writeUInt32LE(SEGMENT_MAGIC, 0);
  buf.writeUInt8(SEGMENT_VERSION, 4);
  buf.writeUInt8(header.zeroTail ? FLAG_ZERO_TAIL : 0, 5);
  buf.writeUInt32LE(header.firstSequence % TWO_POW_32, 8);
  buf.writeUInt32LE(Math.floor(header.firstSequence / TWO_POW_32), 12);
  buf.writeUInt32LE(header.capacityBytes % TWO_POW_32, 16);
  buf.writeUInt32LE(Math.floor(header.capacityBytes / TWO_POW_32), 20);
  buf.writeUInt32LE(header.generation, 24);
  buf.writeUInt32LE(crc32c(buf.subarray(0, 28)), 28);
  return buf;
}

function readU64(buf: Buffer, at: number): number {
  const high = buf.readUInt32LE(at + 4);
  if (high >= SAFE_HIGH_WORD_LIMIT) return -1;
  return high * TWO_POW_32 + buf.readUInt32LE(at);
}

export type SegmentHeaderCheck = { ok: true; header: SegmentHeader } | { ok: false; reason: string };

/** Validates the SEGMENT_HEADER_BYTES bytes at `at` (fewer means "no header"). */
export function decodeSegmentHeader(buf: Buffer, at = 0): SegmentHeaderCheck {
  if (buf.length - at < SEGMENT_HEADER_BYTES) return { ok: false, reason: 'shorter than a segment header' };
  if (buf.readUInt32LE(at) !== SEGMENT_MAGIC) return { ok: false, reason: 'no segment header (bad magic)' };
  if (crc32c(buf.subarray(at, at + 28)) !== buf.readUInt32LE(at + 28)) return { ok: false, reason: 'segment header crc mismatch' };
  const version = buf.readUInt8(at + 4);
  if (version !== SEGMENT_VERSION) return { ok: false, reason: `unknown segment header version ${version}` };
  const flags = buf.readUInt8(at + 5);
  if ((flags & ~KNOWN_FLAGS) !== 0 || buf.readUInt16LE(at + 6) !== 0) return { ok: false, reason: `unknown segment header flags ${flags}` };
  const header: SegmentHeader = {
    firstSequence: readU64(buf, at + 8),
    capacityBytes: readU64(buf, at + 16),
    generation: buf.readUInt32LE(at + 24),
    zeroTail: (flags & FLAG_ZERO_TAIL) !== 0,
  };
  const problem = headerProblem(header);
  if (problem !== undefined) return { ok: false, reason: `segment header: ${problem}` };
  return { ok: true, header };
}
