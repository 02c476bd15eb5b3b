// The log entry codec: pure (no I/O), shared by the local write-ahead log and, later, the
// mirror engine's per-source containers and wire frames. An entry is a fixed 52-byte header
// followed by its payload; the header is encoded on its own so that writers hand the payload
// to writev as a separate iovec and never copy it.
//
// Header layout (little-endian):
//   0  u32 magic          "MSWL"
//   4  u8  version        2
//   5  u8  type           WRITE=1, ZERO=2, TRIM=3, DIRECT_WRITE=4
//   6  u16 flags          opaque to the codec (carried for the mirror engine)
//   8  u32 sourceId       the node whose log this entry belongs to
//  12  u32 payloadLength  bytes that follow the header
//  16  u64 sequence       position in the source's log, 1-based, < 2^53
//  24  u64 offset         absolute byte offset in the volume
//  32  u64 lengthBytes    WRITE: payload length; ZERO/TRIM: length of the range
//  40  u32 generation     tag of the container life the entry was written into (see below)
//  44  u32 payloadCrc     CRC32C of the payload (0 for an empty payload)
//  48  u32 headerCrc      CRC32C of bytes 0..48, so it covers generation and payloadCrc too
//
// Why two CRCs instead of one over header+payload: together they protect exactly the same
// bytes, but a header that checks out on its own can be trusted for its length. Recovery
// uses that to tell a torn tail (the last entry is incomplete) from corruption (an invalid
// entry followed by valid ones) without misreading a payload that happens to contain
// bytes shaped like an entry (a guest storing a copy of a mirrorsan log, say).
//
// Why a generation: log files are preallocated and reused (a segment dropped at a
// checkpoint becomes the next spare), so the bytes after the last entry of a container are
// not zeros but whatever an earlier life of the file left there, well-formed old entries
// included. Each life draws a random generation and every entry carries it under its
// header CRC, so an entry of an earlier life never passes as one of this life, even when
// its sequence happens to be the one expected next (sequences are reused after a crash cut
// a tail). Readers pass the generation they expect; 0 means "not in a container" (wire).
import { crc32c } from '../util/crc32c.js';

export const ENTRY_MAGIC = 0x4c57534d; // "MSWL" as bytes on disk
export const ENTRY_VERSION = 2;
export const ENTRY_HEADER_BYTES = 52;
/** Bytes covered by the header CRC: everything before it. */
const HEADER_CRC_AT = 48;
/** Sanity bound on payloadLength: a garbage header never makes a reader allocate more. */
export const ENTRY_PAYLOAD_MAX_BYTES = 64 * 1024 * 1024;

export const ENTRY_TYPE = {
  /** Data: the payload is written at offset. */
  WRITE: 1,
  /** Zeros over [offset, offset+lengthBytes); allocated blocks stay allocated (NBD NO_HOLE). */
  ZERO: 2,
  /** Deallocate [offset, offset+lengthBytes); reads as zeros afterwards. */
  TRIM: 3,
  /**
   * Data written straight to the image, not to the log (large writes: copying them twice
   * would halve throughput). No payload: the entry records where, so replay knows that the
   * image holds the newest bytes of that range and must not overwrite them with older
   * entries. Durable once the image is synced, which FLUSH and FUA do.
   */
  DIRECT_WRITE: 4,
} as const;
export type EntryType = (typeof ENTRY_TYPE)[keyof typeof ENTRY_TYPE];

export function isEntryType(type: number): type is EntryType {
  return type === ENTRY_TYPE.WRITE || type === ENTRY_TYPE.ZERO || type === ENTRY_TYPE.TRIM || type === ENTRY_TYPE.DIRECT_WRITE;
}

export interface LogEntry {
  type: EntryType;
  flags: number;
  sourceId: number;
  sequence: number;
  offset: number;
  lengthBytes: number;
}

const MAGIC_BYTES = Buffer.from([0x4d, 0x53, 0x57, 0x4c]);
const TWO_POW_32 = 0x1_0000_0000;
/** The high word of a u64 below 2^53. */
const SAFE_HIGH_WORD_LIMIT = 0x20_0000;

export function entrySizeBytes(payloadLength: number): number {
  return ENTRY_HEADER_BYTES + payloadLength;
}

function writeU64(buf: Buffer, value: number, at: number): void {
  buf.writeUInt32LE(value % TWO_POW_32, at);
  buf.writeUInt32LE(Math.floor(value / TWO_POW_32), at + 4);
}

/** A u64 as a number, or -1 when it is 2^53 or more. */
function readU64(buf: Uint8Array, at: number): number {
  const low = (buf[at]! | (buf[at + 1]! << 8) | (buf[at + 2]! << 16)) + buf[at + 3]! * 0x100_0000;
  const high = (buf[at + 4]! | (buf[at + 5]! << 8) | (buf[at + 6]! << 16)) + buf[at + 7]! * 0x100_0000;
  if (high >= SAFE_HIGH_WORD_LIMIT) return -1;
  return high * TWO_POW_32 + low;
}

function readU32(buf: Uint8Array, at: number): number {
  return (buf[at]! | (buf[at + 1]! << 8) | (buf[at + 2]! << 16)) + buf[at + 3]! * 0x100_0000;
}

function isSafeU64(value: number): boolean {
  return Number.isSafeInteger(value) && value >= 0;
}

/** Why an entry cannot be encoded, or undefined when it can. Programmer errors, not input. */
function encodeProblem(entry: LogEntry, payloadLength: number): string | undefined {
  if (!isEntryType(entry.type)) return `unknown type ${String(entry.type)}`;
  if (!Number.isInteger(entry.flags) || entry.flags < 0 || entry.flags > 0xffff) return 'flags is not a u16';
  if (!Number.isInteger(entry.sourceId) || entry.sourceId < 0 || entry.sourceId > 0xffff_ffff) return 'sourceId is not a u32';
  if (!isSafeU64(entry.sequence) || entry.sequence < 1) return 'sequence must be an integer in [1, 2^53)';
  if (!isSafeU64(entry.offset) || !isSafeU64(entry.lengthBytes) || !isSafeU64(entry.offset + entry.lengthBytes)) {
    return 'offset/lengthBytes out of range';
  }
  if (entry.lengthBytes < 1) return 'lengthBytes must be positive';
  if (payloadLength > ENTRY_PAYLOAD_MAX_BYTES) return `payload larger than ${ENTRY_PAYLOAD_MAX_BYTES} bytes`;
  if (entry.type === ENTRY_TYPE.WRITE ? payloadLength !== entry.lengthBytes : payloadLength !== 0) {
    return `payload length ${payloadLength} does not fit type ${entry.type} lengthBytes ${entry.lengthBytes}`;
  }
  return undefined;
}

/**
 * The header of `entry` with both CRCs filled in, tagged with `generation` (the container
 * life it is written into; 0 outside containers). The payload is only read (for its CRC):
 * the caller writes it after the header, as its own iovec.
 */
export function encodeHeader(entry: LogEntry, payload?: Uint8Array, generation = 0): Buffer {
  const payloadLength = payload?.length ?? 0;
  const problem = encodeProblem(entry, payloadLength);
  if (problem !== undefined) throw new Error(`assertion failed: cannot encode log entry: ${problem}`);
  if (!Number.isInteger(generation) || generation < 0 || generation > 0xffff_ffff) {
    throw new Error(`assertion failed: cannot encode log entry: generation ${generation} is not a u32`);
  }
  const header = Buffer.allocUnsafe(ENTRY_HEADER_BYTES);
  header.writeUInt32LE(ENTRY_MAGIC, 0);
  header.writeUInt8(ENTRY_VERSION, 4);
  header.writeUInt8(entry.type, 5);
  header.writeUInt16LE(entry.flags, 6);
  header.writeUInt32LE(entry.sourceId, 8);
  header.writeUInt32LE(payloadLength, 12);
  writeU64(header, entry.sequence, 16);
  writeU64(header, entry.offset, 24);
  writeU64(header, entry.lengthBytes, 32);
  header.writeUInt32LE(generation, 40);
  header.writeUInt32LE(payloadLength === 0 ? 0 : crc32c(payload!), 44);
  header.writeUInt32LE(crc32c(header.subarray(0, HEADER_CRC_AT)), HEADER_CRC_AT);
  return header;
}

/**
 * Re-tags an encoded header with another generation in place (the header CRC is redone;
 * the payload CRC stays valid): for an entry encoded before the writer knew which
 * container it would land in.
 */
export function retagHeader(header: Buffer, generation: number): void {
  if (header.length !== ENTRY_HEADER_BYTES || !Number.isInteger(generation) || generation < 0 || generation > 0xffff_ffff) {
    throw new Error('assertion failed: retagHeader needs an encoded header and a u32 generation');
  }
  header.writeUInt32LE(generation, 40);
  header.writeUInt32LE(crc32c(header.subarray(0, HEADER_CRC_AT)), HEADER_CRC_AT);
}

/** A header that checked out: its fields can be trusted, its payload not yet. */
export interface DecodedHeader {
  entry: LogEntry;
  payloadLength: number;
  payloadCrc: number;
  generation: number;
}

export type HeaderCheck = { ok: true; header: DecodedHeader } | { ok: false; reason: string };

/** Validates the ENTRY_HEADER_BYTES bytes at `at` (the caller guarantees they are there). */
export function checkHeaderAt(buf: Uint8Array, at: number): HeaderCheck {
  if (readU32(buf, at) !== ENTRY_MAGIC) return { ok: false, reason: 'bad magic' };
  const headerCrc = readU32(buf, at + HEADER_CRC_AT);
  if (crc32c(buf.subarray(at, at + HEADER_CRC_AT)) !== headerCrc) return { ok: false, reason: 'header crc mismatch' };
  // From here on the bytes are what a writer wrote; a failed check below means a writer of
  // another version (or a bug), which is still not something to apply.
  const version = buf[at + 4]!;
  if (version !== ENTRY_VERSION) return { ok: false, reason: `unknown version ${version}` };
  const type = buf[at + 5]!;
  if (!isEntryType(type)) return { ok: false, reason: `unknown type ${type}` };
  const flags = buf[at + 6]! | (buf[at + 7]! << 8);
  const sourceId = readU32(buf, at + 8);
  const payloadLength = readU32(buf, at + 12);
  const sequence = readU64(buf, at + 16);
  const offset = readU64(buf, at + 24);
  const lengthBytes = readU64(buf, at + 32);
  const entry: LogEntry = { type, flags, sourceId, sequence, offset, lengthBytes };
  const problem = sequence < 0 || offset < 0 || lengthBytes < 0 ? 'u64 field >= 2^53' : encodeProblem(entry, payloadLength);
  if (problem !== undefined) return { ok: false, reason: problem };
  return { ok: true, header: { entry, payloadLength, payloadCrc: readU32(buf, at + 44), generation: readU32(buf, at + 40) } };
}

export type DecodeStep =
  /** A whole, verified entry; `payload` is a view into the input (empty for ZERO/TRIM). */
  | { status: 'entry'; entry: LogEntry; payload: Buffer; sizeBytes: number }
  /**
   * The input ends inside the entry. `neededBytes` counts from the entry's start: the
   * header size while the header is incomplete, the whole entry once the header is known.
   */
  | { status: 'incomplete'; neededBytes: number; headerTrusted: boolean }
  /**
   * Not a valid entry. With `headerTrusted` the header checked out (only the payload is
   * bad) and `sizeBytes` is the entry's extent; otherwise nothing about it can be believed.
   */
  | { status: 'invalid'; reason: string; headerTrusted: boolean; sizeBytes: number }
  /**
   * A well-formed header of another generation: left by an earlier life of a reused
   * container. Not part of this log, and not damage either.
   */
  | { status: 'foreign'; generation: number };

export type NonEntryStep = Exclude<DecodeStep, { status: 'entry' }>;

/**
 * Decodes the entry starting at `at` in `buf`, whose end is the end of the known input;
 * only entries tagged with `generation` count as entries.
 */
export function decodeEntryAt(buf: Buffer, at: number, generation = 0): DecodeStep {
  if (buf.length - at < ENTRY_HEADER_BYTES) {
    return { status: 'incomplete', neededBytes: ENTRY_HEADER_BYTES, headerTrusted: false };
  }
  const check = checkHeaderAt(buf, at);
  if (!check.ok) return { status: 'invalid', reason: check.reason, headerTrusted: false, sizeBytes: 0 };
  if (check.header.generation !== generation) return { status: 'foreign', generation: check.header.generation };
  const { entry, payloadLength, payloadCrc } = check.header;
  const sizeBytes = entrySizeBytes(payloadLength);
  if (buf.length - at < sizeBytes) return { status: 'incomplete', neededBytes: sizeBytes, headerTrusted: true };
  const payload = buf.subarray(at + ENTRY_HEADER_BYTES, at + sizeBytes);
  const actualCrc = payloadLength === 0 ? 0 : crc32c(payload);
  if (actualCrc !== payloadCrc) {
    return { status: 'invalid', reason: 'payload crc mismatch', headerTrusted: true, sizeBytes };
  }
  return { status: 'entry', entry, payload, sizeBytes };
}

/** Why a step is not an entry, in words for logs and errors. */
export function stepReason(step: NonEntryStep): string {
  if (step.status === 'incomplete') return step.headerTrusted ? 'incomplete entry' : 'incomplete header';
  if (step.status === 'foreign') return `entry of generation ${step.generation} (an earlier life of the file)`;
  return step.reason;
}

/**
 * The index of the first header at or after `from` that checks out, carries `generation`
 * and has a sequence above `sequenceAbove`, considering only headers that lie wholly inside
 * `buf`; -1 if none. Recovery uses it to decide whether anything valid follows a bad entry.
 */
export function findValidHeader(buf: Buffer, from: number, sequenceAbove: number, generation = 0): number {
  let at = from;
  while (at + ENTRY_HEADER_BYTES <= buf.length) {
    const candidate = buf.indexOf(MAGIC_BYTES, at);
    if (candidate < 0 || candidate + ENTRY_HEADER_BYTES > buf.length) return -1;
    const check = checkHeaderAt(buf, candidate);
    if (check.ok && check.header.generation === generation && check.header.entry.sequence > sequenceAbove) return candidate;
    at = candidate + 1;
  }
  return -1;
}

/** Where the search for valid entries after a bad one starts: a trusted header vouches for its own extent. */
export function scanStartAfter(step: NonEntryStep, badAt: number): number {
  return step.status === 'invalid' && step.headerTrusted ? badAt + step.sizeBytes : badAt + 1;
}

const ZERO_CHUNK = Buffer.alloc(64 * 1024);

/** Whether `buf[start, end)` holds only zero bytes. */
export function isZeroRange(buf: Uint8Array, start: number, end: number): boolean {
  for (let at = start; at < end; at += ZERO_CHUNK.length) {
    const stop = Math.min(end, at + ZERO_CHUNK.length);
    if (Buffer.compare(buf.subarray(at, stop), ZERO_CHUNK.subarray(0, stop - at)) !== 0) return false;
  }
  return true;
}

/**
 * What a log's end means, given the step where its entries stop (and after ruling out
 * corruption: no valid entry follows). Two kinds of container:
 * - a fresh one (`staleTail` false: a new file, or one preallocated with zeros) holds only
 *   zeros past what this life wrote, so any non-zero byte at or after the end was written
 *   by this life and is a torn entry;
 * - a reused one (`staleTail` true) holds an earlier life's bytes past the end, so only a
 *   header of this generation (whose payload is incomplete or wrong) proves a torn entry;
 *   anything else there is stale. A torn header is then indistinguishable from stale bytes,
 *   and as harmless: neither is ever applied.
 * `nonZeroAfter`: some byte at or after the end is not zero.
 */
export function judgeLogEnd(
  step: NonEntryStep,
  tail: { staleTail: boolean; nonZeroAfter: boolean },
): { kind: 'clean' | 'torn'; reason: string } {
  const trusted = step.status !== 'foreign' && step.headerTrusted;
  if (trusted) return { kind: 'torn', reason: stepReason(step) };
  if (!tail.nonZeroAfter) return { kind: 'clean', reason: 'unwritten space (zeros)' };
  if (!tail.staleTail) return { kind: 'torn', reason: stepReason(step) };
  return { kind: 'clean', reason: step.status === 'foreign' ? stepReason(step) : 'stale bytes of an earlier life of the file' };
}

export interface DecodedEntry {
  entry: LogEntry;
  payload: Buffer;
  /** Byte offset of the entry in the input. */
  at: number;
}

export type LogEnd =
  /** Entries end at `at` and nothing of this log follows: the input ends, or unwritten or stale space does. */
  | { kind: 'clean'; at: number; reason: string }
  /** The log ends with an incomplete or invalid entry at `at` and nothing valid after it. */
  | { kind: 'torn'; at: number; reason: string }
  /** An invalid or out-of-sequence entry at `at` with valid data after it: never applied. */
  | { kind: 'corrupt'; at: number; reason: string };

export interface DecodeLogOptions {
  /** The sequence the first entry must carry; default: whatever the first entry says. */
  firstSequence?: number;
  /** The generation every entry must carry. Default 0. */
  generation?: number;
  /** The input may hold an earlier life's bytes after the log (a reused container): see judgeLogEnd. */
  staleTail?: boolean;
}

/**
 * Decodes a whole log image (e.g. a segment's entries read into memory): the prefix of
 * valid, consecutive entries and how the log ends. Sequences must increase by exactly one
 * from the first entry (or from `firstSequence` when given); a gap or duplicate of this
 * generation is corruption.
 */
export function decodeLog(buf: Buffer, options: DecodeLogOptions = {}): { entries: DecodedEntry[]; end: LogEnd } {
  const generation = options.generation ?? 0;
  const entries: DecodedEntry[] = [];
  let expected = options.firstSequence;
  let at = 0;
  while (at < buf.length) {
    const step = decodeEntryAt(buf, at, generation);
    if (step.status === 'entry') {
      if (expected !== undefined && step.entry.sequence !== expected) {
        return {
          entries,
          end: { kind: 'corrupt', at, reason: `sequence ${step.entry.sequence} where ${expected} was expected` },
        };
      }
      entries.push({ entry: step.entry, payload: step.payload, at });
      expected = step.entry.sequence + 1;
      at += step.sizeBytes;
      continue;
    }
    // An incomplete entry runs to the end of the input: nothing complete can follow it.
    if (step.status !== 'incomplete') {
      const validAt = findValidHeader(buf, scanStartAfter(step, at), expected === undefined ? 0 : expected - 1, generation);
      if (validAt >= 0) {
        return { entries, end: { kind: 'corrupt', at, reason: `${stepReason(step)}; a valid entry follows at offset ${validAt}` } };
      }
    }
    const verdict = judgeLogEnd(step, { staleTail: options.staleTail ?? false, nonZeroAfter: !isZeroRange(buf, at, buf.length) });
    return { entries, end: { kind: verdict.kind, at, reason: verdict.reason } };
  }
  return { entries, end: { kind: 'clean', at, reason: 'end of input' } };
}

export type StreamStep =
  | { status: 'entry'; entry: LogEntry; payload: Buffer; sizeBytes: number }
  | { status: 'need-more'; neededBytes: number }
  | { status: 'invalid'; reason: string };

/**
 * Incremental decoding over a list of chunks (a socket or a file read piece by piece).
 * Payloads are views into the pushed chunks when an entry lies in one chunk; only an entry
 * that straddles chunks is copied, once. The caller bounds memory: `next()` says how many
 * bytes the current entry needs (at most ENTRY_HEADER_BYTES + ENTRY_PAYLOAD_MAX_BYTES).
 * Only entries of `generation` (default 0) are accepted.
 */
export class EntryStreamDecoder {
  private readonly generation: number;
  private chunks: Buffer[] = [];
  /** Read position inside chunks[0]. */
  private headOffset = 0;
  private buffered = 0;
  private failed: string | undefined;

  constructor(options: { generation?: number } = {}) {
    this.generation = options.generation ?? 0;
  }

  get bufferedBytes(): number {
    return this.buffered;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.buffered += chunk.length;
  }

  next(): StreamStep {
    if (this.failed !== undefined) return { status: 'invalid', reason: this.failed };
    if (this.buffered < ENTRY_HEADER_BYTES) return { status: 'need-more', neededBytes: ENTRY_HEADER_BYTES };
    const headerBytes = this.peek(ENTRY_HEADER_BYTES);
    const check = checkHeaderAt(headerBytes, 0);
    if (!check.ok) {
      this.failed = check.reason;
      return { status: 'invalid', reason: check.reason };
    }
    if (check.header.generation !== this.generation) {
      this.failed = `entry of generation ${check.header.generation} where ${this.generation} was expected`;
      return { status: 'invalid', reason: this.failed };
    }
    const { entry, payloadLength, payloadCrc } = check.header;
    const sizeBytes = entrySizeBytes(payloadLength);
    if (this.buffered < sizeBytes) return { status: 'need-more', neededBytes: sizeBytes };
    const whole = this.peek(sizeBytes);
    const payload = whole.subarray(ENTRY_HEADER_BYTES);
    if ((payloadLength === 0 ? 0 : crc32c(payload)) !== payloadCrc) {
      this.failed = 'payload crc mismatch';
      return { status: 'invalid', reason: this.failed };
    }
    this.consume(sizeBytes);
    return { status: 'entry', entry, payload, sizeBytes };
  }

  /** A view of the next `length` buffered bytes: zero-copy inside one chunk, else one copy. */
  private peek(length: number): Buffer {
    const first = this.chunks[0]!;
    if (first.length - this.headOffset >= length) return first.subarray(this.headOffset, this.headOffset + length);
    const out = Buffer.allocUnsafe(length);
    let copied = 0;
    let index = 0;
    let from = this.headOffset;
    while (copied < length) {
      const chunk = this.chunks[index]!;
      copied += chunk.copy(out, copied, from, Math.min(chunk.length, from + (length - copied)));
      index++;
      from = 0;
    }
    return out;
  }

  private consume(length: number): void {
    let left = length;
    this.buffered -= length;
    while (left > 0) {
      const first = this.chunks[0]!;
      const available = first.length - this.headOffset;
      if (available > left) {
        this.headOffset += left;
        return;
      }
      left -= available;
      this.chunks.shift();
      this.headOffset = 0;
    }
  }
}
