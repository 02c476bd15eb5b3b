// The NBD wire codec: incremental parsers and encoders for both ends, and nothing else. No
// sockets, no timers, no logging: the server and the client are thin shells around this file,
// and the tests feed it every split point of every frame.
//
// Parsers read from a ChunkQueue that the shell pushes received chunks into, and are pulled
// (`next()`) so that a shell under backpressure can stop taking frames while bytes stay
// buffered. Fixed headers are read in place when they lie in one chunk; payloads become a
// view of the chunk they lie in, or are copied once into an exact-size buffer when they span
// chunks. Every length is checked against its cap before anything is buffered for it.
import { MirrorsanError, assert } from '../errors.js';
import { ChunkQueue } from '../util/chunk-queue.js';
import {
  CMD,
  CMD_FLAG,
  FRAME_BYTES,
  INFO,
  MAGIC,
  REP,
  REPLY_FLAG,
  REPLY_TYPE,
  STRING_BYTES_MAX,
  optionName,
} from './protocol.js';

export { ChunkQueue };

const TWO_POW_32 = 2 ** 32;
const EMPTY = Buffer.alloc(0);

// ---------------------------------------------------------------------------------------------
// 64-bit helpers. Offsets and lengths are JS numbers: exact below 2^53, which covers every
// export (DeviceGeometry.sizeBytes is a number); anything larger is past the end anyway.

export function readUInt64(buffer: Buffer, at: number): number {
  return buffer.readUInt32BE(at) * TWO_POW_32 + buffer.readUInt32BE(at + 4);
}

export function writeUInt64(buffer: Buffer, value: number, at: number): void {
  assert(value >= 0 && Number.isInteger(value) && value < 2 ** 64, `uint64 out of range: ${value}`);
  buffer.writeUInt32BE(Math.floor(value / TWO_POW_32), at);
  buffer.writeUInt32BE(value % TWO_POW_32, at + 4);
}

/** Reads a 64-bit field as a number, plus the exact bigint when the number would round. */
function readUInt64Exact(buffer: Buffer, at: number): { value: number; exact: bigint | undefined } {
  const high = buffer.readUInt32BE(at);
  const value = high * TWO_POW_32 + buffer.readUInt32BE(at + 4);
  // 2^21 * 2^32 = 2^53: from there on a double cannot hold every integer.
  return { value, exact: high >= 0x200000 ? buffer.readBigUInt64BE(at) : undefined };
}

/** [NBD: String restrictions] names are refused past 4096 bytes: they must round-trip exactly. */
function mustBeString(text: string, what: string): Buffer {
  const bytes = Buffer.from(text, 'utf8');
  assert(bytes.length <= STRING_BYTES_MAX, `${what} longer than ${STRING_BYTES_MAX} bytes`);
  return bytes;
}

/** Human-readable text (descriptions, messages) is cut to 4096 bytes instead. */
function displayString(text: string): Buffer {
  const bytes = Buffer.from(text, 'utf8');
  return bytes.length <= STRING_BYTES_MAX ? bytes : bytes.subarray(0, STRING_BYTES_MAX);
}

// ---------------------------------------------------------------------------------------------
// Payload assembly shared by the request parser (server) and the reply parser (client).

class PayloadAssembler {
  private buffer: Buffer | undefined = undefined;
  private filledBytes = 0;
  private expectedBytes = 0;
  private discard = false;

  begin(lengthBytes: number, discard: boolean): void {
    this.expectedBytes = lengthBytes;
    this.filledBytes = 0;
    this.buffer = undefined;
    this.discard = discard;
  }

  /** Bytes allocated for a payload that is still arriving. */
  get heldBytes(): number {
    return this.buffer === undefined ? 0 : this.buffer.length;
  }

  /** The payload once complete (empty when discarded), undefined while more bytes are needed. */
  step(queue: ChunkQueue): Buffer | undefined {
    if (this.discard) {
      const count = Math.min(this.expectedBytes - this.filledBytes, queue.length);
      queue.skip(count);
      this.filledBytes += count;
      return this.filledBytes === this.expectedBytes ? EMPTY : undefined;
    }
    if (this.buffer === undefined) {
      if (queue.contiguous(this.expectedBytes) !== undefined) return queue.take(this.expectedBytes);
      if (queue.length === 0) return undefined;
      // Spans chunks: one exact-size buffer, filled as chunks arrive (never a concat).
      this.buffer = Buffer.allocUnsafe(this.expectedBytes);
    }
    const count = Math.min(this.expectedBytes - this.filledBytes, queue.length);
    queue.copyOut(this.buffer, this.filledBytes, count);
    this.filledBytes += count;
    if (this.filledBytes < this.expectedBytes) return undefined;
    const done = this.buffer;
    this.buffer = undefined;
    return done;
  }
}

/** Reads a fixed-size header: in place when contiguous, else through `scratch`. */
function headerView(queue: ChunkQueue, scratch: Buffer, bytes: number): { buffer: Buffer; at: number } {
  const head = queue.contiguous(bytes);
  if (head !== undefined) return { buffer: head, at: queue.headStart };
  queue.peek(scratch, 0, bytes);
  return { buffer: scratch, at: 0 };
}

// =============================================================================================
// Server side: parsing what clients send.
// =============================================================================================

export type HandshakeFrame =
  | { kind: 'clientFlags'; flags: number }
  | { kind: 'option'; option: number; data: Buffer };

export interface OptionParserOptions {
  /** Option data longer than this is refused with a hard close (NBD_OPTION_TOO_LARGE). */
  optionDataBytesMax: number;
  /** True at the start of a connection (4 bytes of client flags come first); false after STARTTLS. */
  expectClientFlags: boolean;
}

function checkOptionMagic(magic: bigint): void {
  if (magic !== MAGIC.IHAVEOPT) throw new MirrorsanError('NBD_BAD_MAGIC', `option request magic 0x${magic.toString(16)} is not IHAVEOPT`);
}

/** [NBD: Newstyle negotiation] client flags, then option requests: IHAVEOPT, option, length, data. */
export class OptionParser {
  private readonly queue: ChunkQueue;
  private readonly optionDataBytesMax: number;
  private expectClientFlags: boolean;
  private readonly scratch = Buffer.allocUnsafe(FRAME_BYTES.OPTION_HEADER);
  /** Header of an option whose data is still arriving. */
  private pendingOption = -1;
  private pendingLengthBytes = 0;

  constructor(queue: ChunkQueue, options: OptionParserOptions) {
    this.queue = queue;
    this.optionDataBytesMax = options.optionDataBytesMax;
    this.expectClientFlags = options.expectClientFlags;
  }

  /** True when part of a frame has been received. */
  get midFrame(): boolean {
    return this.pendingOption >= 0 || this.queue.length > 0;
  }

  next(): HandshakeFrame | undefined {
    const queue = this.queue;
    if (this.expectClientFlags) {
      if (queue.length < FRAME_BYTES.CLIENT_FLAGS) return undefined;
      const { buffer, at } = headerView(queue, this.scratch, FRAME_BYTES.CLIENT_FLAGS);
      const flags = buffer.readUInt32BE(at);
      queue.skip(FRAME_BYTES.CLIENT_FLAGS);
      this.expectClientFlags = false;
      return { kind: 'clientFlags', flags };
    }
    if (this.pendingOption < 0) {
      if (queue.length < FRAME_BYTES.OPTION_HEADER) {
        if (queue.length >= 8) {
          queue.peek(this.scratch, 0, 8);
          checkOptionMagic(this.scratch.readBigUInt64BE(0));
        }
        return undefined;
      }
      const { buffer, at } = headerView(queue, this.scratch, FRAME_BYTES.OPTION_HEADER);
      checkOptionMagic(buffer.readBigUInt64BE(at));
      const option = buffer.readUInt32BE(at + 8);
      const lengthBytes = buffer.readUInt32BE(at + 12);
      if (lengthBytes > this.optionDataBytesMax) {
        throw new MirrorsanError(
          'NBD_OPTION_TOO_LARGE',
          `option ${optionName(option)} carries ${lengthBytes} bytes of data, more than the ${this.optionDataBytesMax} accepted`,
        );
      }
      queue.skip(FRAME_BYTES.OPTION_HEADER);
      this.pendingOption = option;
      this.pendingLengthBytes = lengthBytes;
    }
    // Option data is small (capped): wait until all of it is buffered, then take it at once.
    if (queue.length < this.pendingLengthBytes) return undefined;
    const data = this.pendingLengthBytes === 0 ? EMPTY : queue.take(this.pendingLengthBytes);
    const option = this.pendingOption;
    this.pendingOption = -1;
    return { kind: 'option', option, data };
  }
}

/** A transmission request. */
export interface NbdRequest {
  /** Opaque 8 bytes, echoed in every reply. */
  cookie: bigint;
  type: number;
  flags: number;
  /** Exact below 2^53; larger offsets are always past the end. */
  offset: number;
  /** Set only when the offset is 2^53 or more, so extended replies echo it exactly. */
  offsetExact: bigint | undefined;
  /** Effect length, or payload length for a request that carries a payload. */
  length: number;
  /** WRITE (or extended PAYLOAD_LEN) data: a view of a received chunk, or one exact-size copy. */
  payload: Buffer | undefined;
  /** The payload was longer than the maximum: it was read and dropped; answer EINVAL. */
  payloadDiscarded: boolean;
}

export interface RequestParserOptions {
  /** Negotiated NBD_OPT_EXTENDED_HEADERS: 32-byte requests, payload iff PAYLOAD_LEN. */
  extendedHeaders: boolean;
  /** Advertised maximum payload: longer payloads are consumed and dropped (payloadDiscarded). */
  payloadMaxBytes: number;
  /** Payloads longer than this are a denial of service: NBD_PROTOCOL error, hard close. */
  payloadHardMaxBytes: number;
}

/** [NBD: Request message] compact (28-byte) or extended (32-byte) requests. */
export class RequestParser {
  private readonly queue: ChunkQueue;
  private readonly extendedHeaders: boolean;
  private readonly headerBytes: number;
  private readonly payloadMaxBytes: number;
  private readonly payloadHardMaxBytes: number;
  private readonly scratch = Buffer.allocUnsafe(FRAME_BYTES.EXTENDED_REQUEST);
  private readonly assembler = new PayloadAssembler();
  /** A request whose header is parsed and whose payload is still arriving. */
  private pending: NbdRequest | undefined = undefined;

  constructor(queue: ChunkQueue, options: RequestParserOptions) {
    assert(options.payloadHardMaxBytes >= options.payloadMaxBytes, 'hard payload cap below the advertised maximum');
    this.queue = queue;
    this.extendedHeaders = options.extendedHeaders;
    this.headerBytes = options.extendedHeaders ? FRAME_BYTES.EXTENDED_REQUEST : FRAME_BYTES.REQUEST;
    this.payloadMaxBytes = options.payloadMaxBytes;
    this.payloadHardMaxBytes = options.payloadHardMaxBytes;
  }

  /** True when part of a frame has been received (a header fragment or a payload in progress). */
  get midFrame(): boolean {
    return this.pending !== undefined || this.queue.length > 0;
  }

  /** Bytes allocated for a WRITE payload still arriving (at most payloadHardMaxBytes). */
  get heldPayloadBytes(): number {
    return this.assembler.heldBytes;
  }

  next(): NbdRequest | undefined {
    let request = this.pending;
    if (request === undefined) {
      const queue = this.queue;
      if (queue.length < this.headerBytes) {
        // Refuse a wrong magic as soon as it is visible rather than waiting for a full header
        // that a confused peer (say, one still sending options) may never send.
        if (queue.length >= 4) {
          queue.peek(this.scratch, 0, 4);
          this.checkMagic(this.scratch.readUInt32BE(0));
        }
        return undefined;
      }
      const { buffer, at } = headerView(queue, this.scratch, this.headerBytes);
      this.checkMagic(buffer.readUInt32BE(at));
      const flags = buffer.readUInt16BE(at + 4);
      const type = buffer.readUInt16BE(at + 6);
      const cookie = buffer.readBigUInt64BE(at + 8);
      const { value: offset, exact: offsetExact } = readUInt64Exact(buffer, at + 16);
      const length = this.extendedHeaders ? readUInt64(buffer, at + 24) : buffer.readUInt32BE(at + 24);
      queue.skip(this.headerBytes);
      request = { cookie, type, flags, offset, offsetExact, length, payload: undefined, payloadDiscarded: false };
      // [NBD: Request message] compact: only WRITE carries a payload; extended: iff PAYLOAD_LEN.
      const hasPayload = this.extendedHeaders ? (flags & CMD_FLAG.PAYLOAD_LEN) !== 0 : type === CMD.WRITE;
      if (!hasPayload || length === 0) return request;
      if (length > this.payloadHardMaxBytes) {
        throw new MirrorsanError(
          'NBD_PROTOCOL',
          `request payload of ${length} bytes exceeds the ${this.payloadHardMaxBytes}-byte cap (treated as denial of service)`,
        );
      }
      this.assembler.begin(length, length > this.payloadMaxBytes);
      this.pending = request;
    }
    const payload = this.assembler.step(this.queue);
    if (payload === undefined) return undefined;
    this.pending = undefined;
    if (payload === EMPTY) request.payloadDiscarded = true;
    else request.payload = payload;
    return request;
  }

  private checkMagic(magic: number): void {
    const expected = this.extendedHeaders ? MAGIC.EXTENDED_REQUEST : MAGIC.REQUEST;
    if (magic !== expected) {
      throw new MirrorsanError(
        'NBD_BAD_MAGIC',
        `request magic 0x${magic.toString(16)} is not 0x${expected.toString(16)} (${this.extendedHeaders ? 'extended' : 'compact'} headers)`,
      );
    }
  }
}

/** Parsed INFO/GO option data. */
export interface InfoRequest {
  name: string;
  infoTypes: number[];
}
export type Invalid = { invalid: string };

export function isInvalid(value: object): value is Invalid {
  return 'invalid' in value;
}

/** [NBD: NBD_OPT_INFO and NBD_OPT_GO] name length (4), name, n (2), n x info type (2). */
export function decodeInfoRequestData(data: Buffer): InfoRequest | Invalid {
  if (data.length < 6) return { invalid: `option data of ${data.length} bytes is shorter than 6` };
  const nameBytes = data.readUInt32BE(0);
  if (nameBytes > data.length - 6) return { invalid: `export name length ${nameBytes} overruns the option data` };
  if (nameBytes > STRING_BYTES_MAX) return { invalid: `export name longer than ${STRING_BYTES_MAX} bytes` };
  const count = data.readUInt16BE(4 + nameBytes);
  if (data.length !== 6 + nameBytes + 2 * count) {
    return { invalid: `${count} information requests do not fill ${data.length - 6 - nameBytes} bytes` };
  }
  const infoTypes: number[] = [];
  for (let i = 0; i < count; i++) infoTypes.push(data.readUInt16BE(6 + nameBytes + 2 * i));
  return { name: data.toString('utf8', 4, 4 + nameBytes), infoTypes };
}

/** Parsed LIST_META_CONTEXT / SET_META_CONTEXT option data. */
export interface MetaContextRequest {
  name: string;
  queries: string[];
}

/** [NBD: NBD_OPT_LIST_META_CONTEXT] name length (4), name, n (4), n x (length (4), query). */
export function decodeMetaContextData(data: Buffer): MetaContextRequest | Invalid {
  if (data.length < 8) return { invalid: `option data of ${data.length} bytes is shorter than 8` };
  const nameBytes = data.readUInt32BE(0);
  if (nameBytes > data.length - 8) return { invalid: `export name length ${nameBytes} overruns the option data` };
  if (nameBytes > STRING_BYTES_MAX) return { invalid: `export name longer than ${STRING_BYTES_MAX} bytes` };
  let at = 4 + nameBytes;
  const count = data.readUInt32BE(at);
  at += 4;
  // Each query takes at least 4 bytes, so a count that cannot fit is rejected before looping.
  if (count > (data.length - at) / 4) return { invalid: `${count} queries cannot fit in the option data` };
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (at + 4 > data.length) return { invalid: `query ${i} length overruns the option data` };
    const queryBytes = data.readUInt32BE(at);
    at += 4;
    if (queryBytes > data.length - at) return { invalid: `query ${i} overruns the option data` };
    if (queryBytes > STRING_BYTES_MAX) return { invalid: `query ${i} longer than ${STRING_BYTES_MAX} bytes` };
    queries.push(data.toString('utf8', at, at + queryBytes));
    at += queryBytes;
  }
  if (at !== data.length) return { invalid: `${data.length - at} bytes of trailing option data` };
  return { name: data.toString('utf8', 4, 4 + nameBytes), queries };
}

// =============================================================================================
// Server side: encoding what servers send.
// =============================================================================================

/** [NBD: Newstyle negotiation] NBDMAGIC, IHAVEOPT, handshake flags (2). */
export function encodeGreeting(handshakeFlags: number): Buffer {
  const buffer = Buffer.allocUnsafe(FRAME_BYTES.GREETING);
  buffer.writeBigUInt64BE(MAGIC.NBDMAGIC, 0);
  buffer.writeBigUInt64BE(MAGIC.IHAVEOPT, 8);
  buffer.writeUInt16BE(handshakeFlags, 16);
  return buffer;
}

/** Option reply header with room for `dataBytes` of data after it (the caller fills the data). */
function optionReplyFrame(option: number, replyType: number, dataBytes: number): Buffer {
  const buffer = Buffer.allocUnsafe(FRAME_BYTES.OPTION_REPLY_HEADER + dataBytes);
  buffer.writeBigUInt64BE(MAGIC.OPTION_REPLY, 0);
  buffer.writeUInt32BE(option >>> 0, 8);
  buffer.writeUInt32BE(replyType >>> 0, 12);
  buffer.writeUInt32BE(dataBytes, 16);
  return buffer;
}

/** [NBD: Fixed newstyle negotiation] magic, option, reply type, length, data. */
export function encodeOptionReply(option: number, replyType: number, data: Buffer = EMPTY): Buffer {
  const buffer = optionReplyFrame(option, replyType, data.length);
  data.copy(buffer, FRAME_BYTES.OPTION_REPLY_HEADER);
  return buffer;
}

/** [NBD: Option reply types] error replies MAY carry a message for the user. */
export function encodeOptionError(option: number, errorType: number, message: string): Buffer {
  return encodeOptionReply(option, errorType, errorMessageBytes(message));
}

/** [NBD: NBD_REP_SERVER] name length (4), name, description. */
export function encodeRepServer(option: number, name: string, description: string): Buffer {
  const nameBytes = mustBeString(name, 'export name');
  const descriptionBytes = displayString(description);
  const buffer = optionReplyFrame(option, REP.SERVER, 4 + nameBytes.length + descriptionBytes.length);
  let at: number = FRAME_BYTES.OPTION_REPLY_HEADER;
  at = buffer.writeUInt32BE(nameBytes.length, at);
  at += nameBytes.copy(buffer, at);
  descriptionBytes.copy(buffer, at);
  return buffer;
}

/** [NBD: NBD_INFO_EXPORT] type (2), size (8), transmission flags (2): length 12. */
export function encodeRepInfoExport(option: number, sizeBytes: number, transmissionFlags: number): Buffer {
  const buffer = optionReplyFrame(option, REP.INFO, 12);
  const at = FRAME_BYTES.OPTION_REPLY_HEADER;
  buffer.writeUInt16BE(INFO.EXPORT, at);
  writeUInt64(buffer, sizeBytes, at + 2);
  buffer.writeUInt16BE(transmissionFlags, at + 10);
  return buffer;
}

/** [NBD: NBD_INFO_NAME], [NBD: NBD_INFO_DESCRIPTION] type (2), string. */
export function encodeRepInfoString(option: number, infoType: typeof INFO.NAME | typeof INFO.DESCRIPTION, text: string): Buffer {
  const textBytes = infoType === INFO.NAME ? mustBeString(text, 'export name') : displayString(text);
  const buffer = optionReplyFrame(option, REP.INFO, 2 + textBytes.length);
  buffer.writeUInt16BE(infoType, FRAME_BYTES.OPTION_REPLY_HEADER);
  textBytes.copy(buffer, FRAME_BYTES.OPTION_REPLY_HEADER + 2);
  return buffer;
}

/** [NBD: NBD_INFO_BLOCK_SIZE] type (2), minimum (4), preferred (4), maximum payload (4): length 14. */
export function encodeRepInfoBlockSize(option: number, minimum: number, preferred: number, maximum: number): Buffer {
  const buffer = optionReplyFrame(option, REP.INFO, 14);
  let at: number = FRAME_BYTES.OPTION_REPLY_HEADER;
  at = buffer.writeUInt16BE(INFO.BLOCK_SIZE, at);
  at = buffer.writeUInt32BE(minimum, at);
  at = buffer.writeUInt32BE(preferred, at);
  buffer.writeUInt32BE(maximum, at);
  return buffer;
}

/** [NBD: NBD_REP_META_CONTEXT] context id (4), name. */
export function encodeRepMetaContext(option: number, contextId: number, name: string): Buffer {
  const nameBytes = mustBeString(name, 'meta context name');
  const buffer = optionReplyFrame(option, REP.META_CONTEXT, 4 + nameBytes.length);
  buffer.writeUInt32BE(contextId, FRAME_BYTES.OPTION_REPLY_HEADER);
  nameBytes.copy(buffer, FRAME_BYTES.OPTION_REPLY_HEADER + 4);
  return buffer;
}

/** [NBD: NBD_OPT_EXPORT_NAME] size (8), transmission flags (2), 124 zeroes unless NO_ZEROES. */
export function encodeExportNameAnswer(sizeBytes: number, transmissionFlags: number, noZeroes: boolean): Buffer {
  const total = FRAME_BYTES.EXPORT_NAME_ANSWER + (noZeroes ? 0 : FRAME_BYTES.EXPORT_NAME_ZEROES);
  const buffer = Buffer.alloc(total);
  writeUInt64(buffer, sizeBytes, 0);
  buffer.writeUInt16BE(transmissionFlags, 8);
  return buffer;
}

/** [NBD: Simple reply message] magic, error, cookie; READ data (if any) is written after it. */
export function encodeSimpleReply(cookie: bigint, error: number): Buffer {
  const buffer = Buffer.allocUnsafe(FRAME_BYTES.SIMPLE_REPLY);
  buffer.writeUInt32BE(MAGIC.SIMPLE_REPLY, 0);
  buffer.writeUInt32BE(error, 4);
  buffer.writeBigUInt64BE(cookie, 8);
  return buffer;
}

/** What a reply chunk echoes from its request. */
export interface ChunkTarget {
  readonly cookie: bigint;
  /** Echoed by extended replies. */
  readonly offset: number;
  readonly offsetExact?: bigint | undefined;
}

/**
 * A structured (20-byte) or extended (32-byte) chunk header announcing `payloadBytes`, with
 * `fixedBytes` of room after it for the fixed part of the payload. Returns the buffer and the
 * offset where that room starts.
 */
export function encodeChunkHeader(
  extended: boolean,
  target: ChunkTarget,
  flags: number,
  type: number,
  payloadBytes: number,
  fixedBytes = 0,
): Buffer {
  if (extended) {
    const buffer = Buffer.allocUnsafe(FRAME_BYTES.EXTENDED_REPLY + fixedBytes);
    buffer.writeUInt32BE(MAGIC.EXTENDED_REPLY, 0);
    buffer.writeUInt16BE(flags, 4);
    buffer.writeUInt16BE(type, 6);
    buffer.writeBigUInt64BE(target.cookie, 8);
    // [NBD: Extended reply chunk message] offset MUST match the request's.
    if (target.offsetExact !== undefined) buffer.writeBigUInt64BE(target.offsetExact, 16);
    else writeUInt64(buffer, target.offset, 16);
    writeUInt64(buffer, payloadBytes, 24);
    return buffer;
  }
  assert(payloadBytes <= 0xffffffff, 'structured chunk payload over 32 bits');
  const buffer = Buffer.allocUnsafe(FRAME_BYTES.STRUCTURED_REPLY + fixedBytes);
  buffer.writeUInt32BE(MAGIC.STRUCTURED_REPLY, 0);
  buffer.writeUInt16BE(flags, 4);
  buffer.writeUInt16BE(type, 6);
  buffer.writeBigUInt64BE(target.cookie, 8);
  buffer.writeUInt32BE(payloadBytes, 16);
  return buffer;
}

export function chunkHeaderBytes(extended: boolean): number {
  return extended ? FRAME_BYTES.EXTENDED_REPLY : FRAME_BYTES.STRUCTURED_REPLY;
}

/**
 * [NBD: NBD_REPLY_TYPE_OFFSET_DATA] header + offset (8); the `dataBytes` of data are written
 * after it by the caller (never copied here).
 */
export function encodeOffsetDataHeader(extended: boolean, target: ChunkTarget, flags: number, offset: number, dataBytes: number): Buffer {
  assert(dataBytes > 0, 'OFFSET_DATA must carry at least one byte');
  const buffer = encodeChunkHeader(extended, target, flags, REPLY_TYPE.OFFSET_DATA, 8 + dataBytes, 8);
  writeUInt64(buffer, offset, chunkHeaderBytes(extended));
  return buffer;
}

/** [NBD: NBD_REPLY_TYPE_OFFSET_HOLE] offset (8), hole size (4, nonzero). */
export function encodeOffsetHole(extended: boolean, target: ChunkTarget, flags: number, offset: number, holeBytes: number): Buffer {
  assert(holeBytes > 0 && holeBytes <= 0xffffffff, `hole size ${holeBytes} out of range`);
  const buffer = encodeChunkHeader(extended, target, flags, REPLY_TYPE.OFFSET_HOLE, 12, 12);
  const at = chunkHeaderBytes(extended);
  writeUInt64(buffer, offset, at);
  buffer.writeUInt32BE(holeBytes, at + 8);
  return buffer;
}

/** One block-status descriptor. */
export interface StatusExtent {
  lengthBytes: number;
  flags: number;
}

/** [NBD: NBD_REPLY_TYPE_BLOCK_STATUS] context id (4), n x {length (4), flags (4)}; compact headers. */
export function encodeBlockStatus(target: ChunkTarget, flags: number, contextId: number, extents: readonly StatusExtent[]): Buffer {
  assert(extents.length > 0, 'BLOCK_STATUS needs at least one extent');
  const payloadBytes = 4 + 8 * extents.length;
  const buffer = encodeChunkHeader(false, target, flags, REPLY_TYPE.BLOCK_STATUS, payloadBytes, payloadBytes);
  let at = buffer.writeUInt32BE(contextId, FRAME_BYTES.STRUCTURED_REPLY);
  for (const extent of extents) {
    assert(extent.lengthBytes > 0 && extent.lengthBytes <= 0xffffffff, `extent length ${extent.lengthBytes} out of range`);
    at = buffer.writeUInt32BE(extent.lengthBytes, at);
    at = buffer.writeUInt32BE(extent.flags >>> 0, at);
  }
  return buffer;
}

/** [NBD: NBD_REPLY_TYPE_BLOCK_STATUS_EXT] context id (4), count (4), n x {length (8), flags (8)}. */
export function encodeBlockStatusExt(target: ChunkTarget, flags: number, contextId: number, extents: readonly StatusExtent[]): Buffer {
  assert(extents.length > 0, 'BLOCK_STATUS_EXT needs at least one extent');
  const payloadBytes = 8 + 16 * extents.length;
  const buffer = encodeChunkHeader(true, target, flags, REPLY_TYPE.BLOCK_STATUS_EXT, payloadBytes, payloadBytes);
  let at = buffer.writeUInt32BE(contextId, FRAME_BYTES.EXTENDED_REPLY);
  at = buffer.writeUInt32BE(extents.length, at);
  for (const extent of extents) {
    assert(extent.lengthBytes > 0, 'extent length must be nonzero');
    writeUInt64(buffer, extent.lengthBytes, at);
    buffer.writeUInt32BE(0, at + 8); // base:allocation uses 32 bits; the high half MUST be zero
    buffer.writeUInt32BE(extent.flags >>> 0, at + 12);
    at += 16;
  }
  return buffer;
}

function errorMessageBytes(message: string): Buffer {
  // [NBD: NBD_REPLY_TYPE_ERROR] message length MUST NOT exceed 4096 bytes.
  return displayString(message);
}

/** [NBD: NBD_REPLY_TYPE_ERROR] error (4), message length (2), message. */
export function encodeErrorChunk(extended: boolean, target: ChunkTarget, flags: number, error: number, message: string): Buffer {
  assert(error !== 0, 'an error chunk needs a nonzero error');
  const text = errorMessageBytes(message);
  const payloadBytes = 6 + text.length;
  const buffer = encodeChunkHeader(extended, target, flags, REPLY_TYPE.ERROR, payloadBytes, payloadBytes);
  let at = buffer.writeUInt32BE(error, chunkHeaderBytes(extended));
  at = buffer.writeUInt16BE(text.length, at);
  text.copy(buffer, at);
  return buffer;
}

/** [NBD: NBD_REPLY_TYPE_ERROR_OFFSET] error (4), message length (2), message, offset (8). */
export function encodeErrorOffsetChunk(
  extended: boolean,
  target: ChunkTarget,
  flags: number,
  error: number,
  message: string,
  offset: number,
): Buffer {
  assert(error !== 0, 'an error chunk needs a nonzero error');
  const text = errorMessageBytes(message);
  const payloadBytes = 14 + text.length;
  const buffer = encodeChunkHeader(extended, target, flags, REPLY_TYPE.ERROR_OFFSET, payloadBytes, payloadBytes);
  let at = buffer.writeUInt32BE(error, chunkHeaderBytes(extended));
  at = buffer.writeUInt16BE(text.length, at);
  at += text.copy(buffer, at);
  writeUInt64(buffer, offset, at);
  return buffer;
}

/** [NBD: NBD_REPLY_TYPE_NONE] empty payload, always DONE. */
export function encodeNoneChunk(extended: boolean, target: ChunkTarget): Buffer {
  return encodeChunkHeader(extended, target, REPLY_FLAG.DONE, REPLY_TYPE.NONE, 0);
}

// =============================================================================================
// Client side: encoding what clients send.
// =============================================================================================

export function encodeClientFlags(flags: number): Buffer {
  const buffer = Buffer.allocUnsafe(FRAME_BYTES.CLIENT_FLAGS);
  buffer.writeUInt32BE(flags >>> 0, 0);
  return buffer;
}

/** [NBD: Newstyle negotiation] IHAVEOPT, option (4), length (4), data. */
export function encodeOptionRequest(option: number, data: Buffer = EMPTY): Buffer {
  const buffer = Buffer.allocUnsafe(FRAME_BYTES.OPTION_HEADER + data.length);
  buffer.writeBigUInt64BE(MAGIC.IHAVEOPT, 0);
  buffer.writeUInt32BE(option >>> 0, 8);
  buffer.writeUInt32BE(data.length, 12);
  data.copy(buffer, FRAME_BYTES.OPTION_HEADER);
  return buffer;
}

/** [NBD: NBD_OPT_INFO and NBD_OPT_GO] option data. */
export function encodeInfoRequestData(name: string, infoTypes: readonly number[]): Buffer {
  const nameBytes = mustBeString(name, 'export name');
  const buffer = Buffer.allocUnsafe(6 + nameBytes.length + 2 * infoTypes.length);
  let at = buffer.writeUInt32BE(nameBytes.length, 0);
  at += nameBytes.copy(buffer, at);
  at = buffer.writeUInt16BE(infoTypes.length, at);
  for (const type of infoTypes) at = buffer.writeUInt16BE(type, at);
  return buffer;
}

/** [NBD: NBD_OPT_LIST_META_CONTEXT], [NBD: NBD_OPT_SET_META_CONTEXT] option data. */
export function encodeMetaContextData(name: string, queries: readonly string[]): Buffer {
  const nameBytes = mustBeString(name, 'export name');
  const queryBytes = queries.map((query) => mustBeString(query, 'meta context query'));
  const total = 8 + nameBytes.length + queryBytes.reduce((sum, query) => sum + 4 + query.length, 0);
  const buffer = Buffer.allocUnsafe(total);
  let at = buffer.writeUInt32BE(nameBytes.length, 0);
  at += nameBytes.copy(buffer, at);
  at = buffer.writeUInt32BE(queryBytes.length, at);
  for (const query of queryBytes) {
    at = buffer.writeUInt32BE(query.length, at);
    at += query.copy(buffer, at);
  }
  return buffer;
}

/** The header fields of a request, as a client sends them. */
export interface RequestHeader {
  cookie: bigint;
  type: number;
  flags: number;
  offset: number | bigint;
  length: number | bigint;
}

/** [NBD: Request message] a 28-byte compact or 32-byte extended request header (payload follows). */
export function encodeRequestHeader(header: RequestHeader, extended: boolean): Buffer {
  const buffer = Buffer.allocUnsafe(extended ? FRAME_BYTES.EXTENDED_REQUEST : FRAME_BYTES.REQUEST);
  buffer.writeUInt32BE(extended ? MAGIC.EXTENDED_REQUEST : MAGIC.REQUEST, 0);
  buffer.writeUInt16BE(header.flags, 4);
  buffer.writeUInt16BE(header.type, 6);
  buffer.writeBigUInt64BE(header.cookie, 8);
  if (typeof header.offset === 'bigint') buffer.writeBigUInt64BE(header.offset, 16);
  else writeUInt64(buffer, header.offset, 16);
  if (extended) {
    if (typeof header.length === 'bigint') buffer.writeBigUInt64BE(header.length, 24);
    else writeUInt64(buffer, header.length, 24);
  } else {
    buffer.writeUInt32BE(Number(header.length), 24);
  }
  return buffer;
}

// =============================================================================================
// Client side: parsing what servers send.
// =============================================================================================

export interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

/** Greeting, option replies and the EXPORT_NAME answer, as a client reads them. */
export class ServerHandshakeParser {
  private readonly queue: ChunkQueue;
  private readonly replyDataBytesMax: number;
  private readonly scratch = Buffer.allocUnsafe(FRAME_BYTES.OPTION_REPLY_HEADER);

  constructor(queue: ChunkQueue, options: { replyDataBytesMax: number }) {
    this.queue = queue;
    this.replyDataBytesMax = options.replyDataBytesMax;
  }

  /** [NBD: Newstyle negotiation] NBDMAGIC, IHAVEOPT, handshake flags. */
  greeting(): { handshakeFlags: number } | undefined {
    const queue = this.queue;
    if (queue.length < FRAME_BYTES.GREETING) return undefined;
    const { buffer, at } = headerView(queue, this.scratch, FRAME_BYTES.GREETING);
    const magic = buffer.readBigUInt64BE(at);
    if (magic !== MAGIC.NBDMAGIC) throw new MirrorsanError('NBD_BAD_MAGIC', `greeting magic 0x${magic.toString(16)} is not NBDMAGIC`);
    const style = buffer.readBigUInt64BE(at + 8);
    if (style !== MAGIC.IHAVEOPT) {
      throw new MirrorsanError('NBD_BAD_MAGIC', `greeting 0x${style.toString(16)} is not IHAVEOPT (oldstyle servers are not supported)`);
    }
    const handshakeFlags = buffer.readUInt16BE(at + 16);
    queue.skip(FRAME_BYTES.GREETING);
    return { handshakeFlags };
  }

  /** [NBD: Fixed newstyle negotiation] one option reply; nothing is consumed until it is complete. */
  optionReply(): OptionReply | undefined {
    const queue = this.queue;
    if (queue.length < FRAME_BYTES.OPTION_REPLY_HEADER) return undefined;
    const { buffer, at } = headerView(queue, this.scratch, FRAME_BYTES.OPTION_REPLY_HEADER);
    const magic = buffer.readBigUInt64BE(at);
    if (magic !== MAGIC.OPTION_REPLY) throw new MirrorsanError('NBD_BAD_MAGIC', `option reply magic 0x${magic.toString(16)}`);
    const option = buffer.readUInt32BE(at + 8);
    const type = buffer.readUInt32BE(at + 12);
    const dataBytes = buffer.readUInt32BE(at + 16);
    if (dataBytes > this.replyDataBytesMax) {
      throw new MirrorsanError('NBD_PROTOCOL', `option reply carries ${dataBytes} bytes, more than the ${this.replyDataBytesMax} accepted`);
    }
    if (queue.length < FRAME_BYTES.OPTION_REPLY_HEADER + dataBytes) return undefined;
    queue.skip(FRAME_BYTES.OPTION_REPLY_HEADER);
    return { option, type, data: dataBytes === 0 ? EMPTY : queue.take(dataBytes) };
  }

  /** [NBD: NBD_OPT_EXPORT_NAME] size, transmission flags, zeroes unless NO_ZEROES. */
  exportNameAnswer(noZeroes: boolean): { sizeBytes: number; transmissionFlags: number } | undefined {
    const total = FRAME_BYTES.EXPORT_NAME_ANSWER + (noZeroes ? 0 : FRAME_BYTES.EXPORT_NAME_ZEROES);
    if (this.queue.length < total) return undefined;
    const fixed = this.queue.take(FRAME_BYTES.EXPORT_NAME_ANSWER);
    this.queue.skip(total - FRAME_BYTES.EXPORT_NAME_ANSWER);
    return { sizeBytes: readUInt64(fixed, 0), transmissionFlags: fixed.readUInt16BE(8) };
  }
}

/** One reply message (simple) or chunk (structured or extended). */
export interface NbdReply {
  kind: 'simple' | 'chunk';
  cookie: bigint;
  /** Simple replies: the error field. Chunks: 0 (error chunks carry it in the payload). */
  error: number;
  /** Chunk flags; simple replies are always final (DONE). */
  flags: number;
  /** Chunk type; -1 for simple replies. */
  type: number;
  /** Extended replies: the echoed request offset; otherwise -1. */
  offset: number;
  /** READ data of a simple reply, or the chunk payload. */
  payload: Buffer | undefined;
}

export type ReplyMode = 'simple' | 'structured' | 'extended';

export interface ReplyParserOptions {
  mode: ReplyMode;
  /** Chunk payloads (and simple READ data) longer than this are a protocol error. */
  payloadBytesMax: number;
  /** Simple replies carry READ data: how many bytes follow for this cookie (0 if none). */
  readLengthForCookie(cookie: bigint): number;
}

/** [NBD: Transmission] simple replies, structured chunks or extended chunks. */
export class ReplyParser {
  private readonly queue: ChunkQueue;
  private readonly mode: ReplyMode;
  private readonly payloadBytesMax: number;
  private readonly readLengthForCookie: (cookie: bigint) => number;
  private readonly scratch = Buffer.allocUnsafe(FRAME_BYTES.EXTENDED_REPLY);
  private readonly assembler = new PayloadAssembler();
  private pending: NbdReply | undefined = undefined;

  constructor(queue: ChunkQueue, options: ReplyParserOptions) {
    this.queue = queue;
    this.mode = options.mode;
    this.payloadBytesMax = options.payloadBytesMax;
    this.readLengthForCookie = options.readLengthForCookie;
  }

  get midFrame(): boolean {
    return this.pending !== undefined || this.queue.length > 0;
  }

  get heldPayloadBytes(): number {
    return this.assembler.heldBytes;
  }

  next(): NbdReply | undefined {
    let reply = this.pending;
    if (reply === undefined) {
      const queue = this.queue;
      if (queue.length < 4) return undefined;
      const { buffer: magicBuffer, at: magicAt } = headerView(queue, this.scratch, 4);
      const magic = magicBuffer.readUInt32BE(magicAt);
      let headerBytes: number;
      if (magic === MAGIC.SIMPLE_REPLY && this.mode !== 'extended') headerBytes = FRAME_BYTES.SIMPLE_REPLY;
      else if (magic === MAGIC.STRUCTURED_REPLY && this.mode === 'structured') headerBytes = FRAME_BYTES.STRUCTURED_REPLY;
      else if (magic === MAGIC.EXTENDED_REPLY && this.mode === 'extended') headerBytes = FRAME_BYTES.EXTENDED_REPLY;
      else throw new MirrorsanError('NBD_BAD_MAGIC', `reply magic 0x${magic.toString(16)} is not valid with ${this.mode} replies`);
      if (queue.length < headerBytes) return undefined;
      const { buffer, at } = headerView(queue, this.scratch, headerBytes);
      let payloadBytes: number;
      if (headerBytes === FRAME_BYTES.SIMPLE_REPLY) {
        const error = buffer.readUInt32BE(at + 4);
        const cookie = buffer.readBigUInt64BE(at + 8);
        payloadBytes = error === 0 ? this.readLengthForCookie(cookie) : 0;
        reply = { kind: 'simple', cookie, error, flags: REPLY_FLAG.DONE, type: -1, offset: -1, payload: undefined };
      } else {
        const flags = buffer.readUInt16BE(at + 4);
        const type = buffer.readUInt16BE(at + 6);
        const cookie = buffer.readBigUInt64BE(at + 8);
        const extended = headerBytes === FRAME_BYTES.EXTENDED_REPLY;
        const offset = extended ? readUInt64(buffer, at + 16) : -1;
        payloadBytes = extended ? readUInt64(buffer, at + 24) : buffer.readUInt32BE(at + 16);
        reply = { kind: 'chunk', cookie, error: 0, flags, type, offset, payload: undefined };
      }
      if (payloadBytes > this.payloadBytesMax) {
        throw new MirrorsanError('NBD_PROTOCOL', `reply payload of ${payloadBytes} bytes exceeds the ${this.payloadBytesMax}-byte cap`);
      }
      queue.skip(headerBytes);
      if (payloadBytes === 0) {
        if (reply.kind === 'chunk') reply.payload = EMPTY;
        return reply;
      }
      this.assembler.begin(payloadBytes, false);
      this.pending = reply;
    }
    const payload = this.assembler.step(this.queue);
    if (payload === undefined) return undefined;
    this.pending = undefined;
    reply.payload = payload;
    return reply;
  }
}

function protocolError(message: string): MirrorsanError {
  return new MirrorsanError('NBD_PROTOCOL', message);
}

/** [NBD: NBD_REP_SERVER] */
export function decodeRepServer(data: Buffer): { name: string; description: string } {
  if (data.length < 4) throw protocolError('REP_SERVER shorter than 4 bytes');
  const nameBytes = data.readUInt32BE(0);
  if (nameBytes > data.length - 4) throw protocolError('REP_SERVER name overruns the reply');
  return { name: data.toString('utf8', 4, 4 + nameBytes), description: data.toString('utf8', 4 + nameBytes) };
}

export type InfoReply =
  | { type: typeof INFO.EXPORT; sizeBytes: number; transmissionFlags: number }
  | { type: typeof INFO.NAME; name: string }
  | { type: typeof INFO.DESCRIPTION; description: string }
  | { type: typeof INFO.BLOCK_SIZE; minimum: number; preferred: number; maximum: number }
  | { type: 'unknown'; infoType: number };

/** [NBD: NBD_REP_INFO] */
export function decodeRepInfo(data: Buffer): InfoReply {
  if (data.length < 2) throw protocolError('REP_INFO shorter than 2 bytes');
  const infoType = data.readUInt16BE(0);
  switch (infoType) {
    case INFO.EXPORT:
      if (data.length !== 12) throw protocolError(`INFO_EXPORT of ${data.length} bytes, not 12`);
      return { type: INFO.EXPORT, sizeBytes: readUInt64(data, 2), transmissionFlags: data.readUInt16BE(10) };
    case INFO.NAME:
      return { type: INFO.NAME, name: data.toString('utf8', 2) };
    case INFO.DESCRIPTION:
      return { type: INFO.DESCRIPTION, description: data.toString('utf8', 2) };
    case INFO.BLOCK_SIZE:
      if (data.length !== 14) throw protocolError(`INFO_BLOCK_SIZE of ${data.length} bytes, not 14`);
      return { type: INFO.BLOCK_SIZE, minimum: data.readUInt32BE(2), preferred: data.readUInt32BE(6), maximum: data.readUInt32BE(10) };
    default:
      // [NBD: NBD_REP_INFO] the client MUST ignore information types it does not recognise.
      return { type: 'unknown', infoType };
  }
}

/** [NBD: NBD_REP_META_CONTEXT] */
export function decodeRepMetaContext(data: Buffer): { contextId: number; name: string } {
  if (data.length < 4) throw protocolError('REP_META_CONTEXT shorter than 4 bytes');
  return { contextId: data.readUInt32BE(0), name: data.toString('utf8', 4) };
}

/** [NBD: NBD_REPLY_TYPE_OFFSET_DATA] the data offset; the data starts 8 bytes into the payload. */
export function decodeOffsetData(payload: Buffer): { offset: number; data: Buffer } {
  if (payload.length < 9) throw protocolError(`OFFSET_DATA payload of ${payload.length} bytes`);
  return { offset: readUInt64(payload, 0), data: payload.subarray(8) };
}

/** [NBD: NBD_REPLY_TYPE_OFFSET_HOLE] */
export function decodeOffsetHole(payload: Buffer): { offset: number; lengthBytes: number } {
  if (payload.length !== 12) throw protocolError(`OFFSET_HOLE payload of ${payload.length} bytes, not 12`);
  const lengthBytes = payload.readUInt32BE(8);
  if (lengthBytes === 0) throw protocolError('OFFSET_HOLE of zero bytes');
  return { offset: readUInt64(payload, 0), lengthBytes };
}

/** [NBD: NBD_REPLY_TYPE_BLOCK_STATUS], [NBD: NBD_REPLY_TYPE_BLOCK_STATUS_EXT] */
export function decodeBlockStatus(type: number, payload: Buffer): { contextId: number; extents: StatusExtent[] } {
  const extents: StatusExtent[] = [];
  if (type === REPLY_TYPE.BLOCK_STATUS) {
    if (payload.length < 12 || (payload.length - 4) % 8 !== 0) throw protocolError(`BLOCK_STATUS payload of ${payload.length} bytes`);
    for (let at = 4; at < payload.length; at += 8) {
      extents.push({ lengthBytes: payload.readUInt32BE(at), flags: payload.readUInt32BE(at + 4) });
    }
  } else if (type === REPLY_TYPE.BLOCK_STATUS_EXT) {
    if (payload.length < 24 || (payload.length - 8) % 16 !== 0) throw protocolError(`BLOCK_STATUS_EXT payload of ${payload.length} bytes`);
    const count = payload.readUInt32BE(4);
    if (count * 16 + 8 !== payload.length) throw protocolError(`BLOCK_STATUS_EXT count ${count} does not match its length`);
    for (let at = 8; at < payload.length; at += 16) {
      extents.push({ lengthBytes: readUInt64(payload, at), flags: readUInt64(payload, at + 8) });
    }
  } else {
    throw protocolError(`chunk type ${type} is not a block status`);
  }
  if (extents.some((extent) => extent.lengthBytes === 0)) throw protocolError('block status extent of zero bytes');
  return { contextId: payload.readUInt32BE(0), extents };
}

/** [NBD: NBD_REPLY_TYPE_ERROR], [NBD: NBD_REPLY_TYPE_ERROR_OFFSET] */
export function decodeErrorChunk(type: number, payload: Buffer): { error: number; message: string; offset: number | undefined } {
  if (payload.length < 6) throw protocolError(`error chunk payload of ${payload.length} bytes`);
  const error = payload.readUInt32BE(0);
  const messageBytes = payload.readUInt16BE(4);
  if (6 + messageBytes > payload.length) throw protocolError('error chunk message overruns the chunk');
  const message = payload.toString('utf8', 6, 6 + messageBytes);
  let offset: number | undefined;
  if (type === REPLY_TYPE.ERROR_OFFSET) {
    if (payload.length !== 14 + messageBytes) throw protocolError('ERROR_OFFSET payload length mismatch');
    offset = readUInt64(payload, 6 + messageBytes);
  }
  return { error, message, offset };
}
