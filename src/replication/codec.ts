// The replication wire codec (docs/replication.md, "Wire protocol"): typed messages, an
// encoder and an incremental decoder, and nothing else. No sockets, no timers, no logging:
// peer-link.ts is a thin shell around this file, and the tests feed it every split point of
// every frame.
//
// Frame = 16-byte header + body, big-endian:
//   0  u32 magic       0x4d535250 "MSRP"
//   4  u8  version     PROTOCOL_VERSION
//   5  u8  type        MESSAGE_TYPE
//   6  u16 flags       reserved, 0 in version 1 (a frame with flags set is refused)
//   8  u32 bodyLength  at most FRAME_BODY_MAX_BYTES, and at most the type's own maximum
//  12  u32 crc32c      CRC32C of header bytes 0..11, then of the body
//
// Body fields, in this order (name = u8 byteLength + UTF-8, 1..NAME_BYTES_MAX bytes;
// u64 = a number below 2^53, anything larger is refused):
//   HELLO           u16 protocolVersion, nonce[32], name clusterId, name nodeId
//   AUTH            hmac[32]
//   WRITE           u64 epoch, u64 sequence, u64 offset, u64 lengthBytes, u8 entryType,
//                   u8 volumeLength, u8 sourceLength, volume, source, payload
//                   (payload: lengthBytes bytes for entry type WRITE, none for ZERO/TRIM)
//   ACK, SYNC, SYNC_ACK, CHECKPOINT, CHECKPOINT_ACK
//                   u64 epoch, u64 sequence, name volume, name source
//   GRANT_REQUEST, GRANT, REVOKE, RELEASE
//                   u64 epoch, u64 region, u64 generation, name volume
//   PING, PONG      u64 timestampMs
//   ERROR           name code, u16 messageLength, message (UTF-8, at most 4096 bytes)
//
// WRITE puts its two string lengths in the fixed part so that the decoder knows where the
// payload starts from 35 bytes, and can hand the payload on as a view of the chunk it
// arrived in (or as one exact-size copy when it spans chunks) without ever joining a frame.
//
// Checks happen in this order, so that memory stays bounded and corruption is named as such:
// the header (magic, version, type, flags, and bodyLength against the caps) before a single
// body byte is buffered; then the CRC over the whole frame; only then the fields. A frame
// damaged in transit is therefore reported as REPL_CRC_MISMATCH, and REPL_BAD_FRAME means a
// peer sent a well-checksummed frame that breaks the format (a bug or a hostile peer).
import { isUtf8 } from 'node:buffer';
import { MirrorsanError, assert } from '../errors.js';
import { ENTRY_TYPE } from '../journal/entry.js';
import { ChunkQueue } from '../util/chunk-queue.js';
import { crc32c } from '../util/crc32c.js';
import { handOver } from '../util/payload-copy.js';

export const FRAME_MAGIC = 0x4d535250; // "MSRP"
export const PROTOCOL_VERSION = 1;
export const FRAME_HEADER_BYTES = 16;
/** The largest WRITE payload: NBD requests are split at 32 MiB by the volume layer. */
export const WRITE_PAYLOAD_MAX_BYTES = 32 * 1024 * 1024;
/** Room for the largest payload plus any frame's fields. */
export const FRAME_BODY_MAX_BYTES = WRITE_PAYLOAD_MAX_BYTES + 4096;
/** Volume names, node ids, cluster ids and error codes (config allows 64; the wire has room). */
export const NAME_BYTES_MAX = 128;
/** Error messages longer than this are cut (at a character boundary) by the encoder. */
export const ERROR_MESSAGE_BYTES_MAX = 4096;
export const NONCE_BYTES = 32;
export const HMAC_BYTES = 32;

export const MESSAGE_TYPE = {
  HELLO: 0x01,
  AUTH: 0x02,
  WRITE: 0x10,
  ACK: 0x11,
  SYNC: 0x12,
  SYNC_ACK: 0x13,
  CHECKPOINT: 0x14,
  CHECKPOINT_ACK: 0x15,
  GRANT_REQUEST: 0x20,
  GRANT: 0x21,
  REVOKE: 0x22,
  RELEASE: 0x23,
  PING: 0x30,
  PONG: 0x31,
  REGION_REQUEST: 0x40,
  REGION_REPLY: 0x41,
  ERROR: 0x3f,
} as const;
export type MessageType = keyof typeof MESSAGE_TYPE;

const TYPE_BY_ID = new Map<number, MessageType>(
  (Object.entries(MESSAGE_TYPE) as [MessageType, number][]).map(([name, id]) => [id, name]),
);

// ---------------------------------------------------------------------------------------------
// Messages

export interface HelloMessage {
  type: 'HELLO';
  protocolVersion: number;
  clusterId: string;
  nodeId: string;
  /** NONCE_BYTES fresh random bytes. */
  nonce: Buffer;
}

export interface AuthMessage {
  type: 'AUTH';
  /** HMAC_BYTES: see auth.ts. */
  hmac: Buffer;
}

/** The log entry types a WRITE frame carries (DIRECT_WRITE is local: its data travels as WRITE). */
export type WireEntryType = typeof ENTRY_TYPE.WRITE | typeof ENTRY_TYPE.ZERO | typeof ENTRY_TYPE.TRIM;

export interface WriteMessage {
  type: 'WRITE';
  volume: string;
  epoch: number;
  /** Node id of the source: the node that ordered this write. */
  source: string;
  sequence: number;
  entryType: WireEntryType;
  offset: number;
  /** WRITE: payload length; ZERO/TRIM: length of the range. At least 1. */
  lengthBytes: number;
  /**
   * The data for entry type WRITE; empty for ZERO and TRIM. May be a view of a received chunk:
   * copy it to keep it long, unless the decoder handed it over (util/payload-copy.ts).
   */
  payload: Buffer;
  /**
   * The first frame after the source moved this destination's stream past a gap it will never
   * send (catch-up: the skipped entries are covered by the catch-up copy). Only a frame so
   * marked may rebase a catching-up destination's stream; any other gap is an error. On the
   * wire: bit 7 of the entry type byte.
   */
  restartsStream?: boolean;
}

/** Bit of the WRITE frame's entry type byte that carries WriteMessage.restartsStream. */
const ENTRY_TYPE_RESTART_BIT = 0x80;

export type SequenceMessageType = 'ACK' | 'SYNC' | 'SYNC_ACK' | 'CHECKPOINT' | 'CHECKPOINT_ACK';
/** ACK is cumulative (every sequence up to it was received); SYNC asks for durability up to it. */
export interface SequenceMessage<T extends SequenceMessageType = SequenceMessageType> {
  type: T;
  volume: string;
  epoch: number;
  source: string;
  sequence: number;
}

export type GrantMessageType = 'GRANT_REQUEST' | 'GRANT' | 'REVOKE' | 'RELEASE';
export interface GrantMessage<T extends GrantMessageType = GrantMessageType> {
  type: T;
  volume: string;
  epoch: number;
  region: number;
  generation: number;
}

export interface PingMessage {
  type: 'PING';
  /** The sender's clock; PONG echoes it so the sender measures the round trip. */
  timestampMs: number;
}

export interface PongMessage {
  type: 'PONG';
  timestampMs: number;
}

/** Largest REGION_REPLY data: one catch-up chunk's bytes, or the digests of many chunks. */
export const REGION_DATA_MAX_BYTES = 4 * 1024 * 1024;

/**
 * Catch-up (docs/replication.md): a replica catching up asks an in-sync peer for the digests of
 * consecutive chunks of a range (`digests`), or for a range's bytes (`read`), on the link it
 * dialled; the answer comes back on the same connection, matched by `requestId`.
 */
export interface RegionRequestMessage {
  type: 'REGION_REQUEST';
  volume: string;
  epoch: number;
  requestId: number;
  kind: 'digests' | 'read' | 'dirty';
  /** dirty: the epoch since which changes are asked for (0: since the asker left the stream). */
  offset: number;
  /** dirty: 0. */
  lengthBytes: number;
  /** digests: the chunk size; read: 0; dirty: the asker's tracking chunk size (answers must use the same). */
  chunkBytes: number;
}

export interface RegionReplyMessage {
  type: 'REGION_REPLY';
  volume: string;
  epoch: number;
  requestId: number;
  /** True: `data` holds the answer (digests: 16 bytes per chunk; read: the bytes). False: `data` is an error text. */
  ok: boolean;
  data: Buffer;
}

const REGION_KIND_DIGESTS = 1;
const REGION_KIND_READ = 2;
const REGION_KIND_DIRTY = 3;
const REGION_KINDS = { digests: REGION_KIND_DIGESTS, read: REGION_KIND_READ, dirty: REGION_KIND_DIRTY } as const;

export interface ErrorMessage {
  type: 'ERROR';
  /** A MirrorsanError code (a peer running a newer version may send one this node does not know). */
  code: string;
  message: string;
}

export type ReplicationMessage =
  | HelloMessage
  | AuthMessage
  | WriteMessage
  | SequenceMessage<'ACK'>
  | SequenceMessage<'SYNC'>
  | SequenceMessage<'SYNC_ACK'>
  | SequenceMessage<'CHECKPOINT'>
  | SequenceMessage<'CHECKPOINT_ACK'>
  | GrantMessage<'GRANT_REQUEST'>
  | GrantMessage<'GRANT'>
  | GrantMessage<'REVOKE'>
  | GrantMessage<'RELEASE'>
  | PingMessage
  | PongMessage
  | RegionRequestMessage
  | RegionReplyMessage
  | ErrorMessage;

/** Messages that name a volume and an epoch: the receiver refuses them when the epoch is stale. */
export type VolumeMessage = WriteMessage | SequenceMessage | GrantMessage | RegionRequestMessage | RegionReplyMessage;

export function isVolumeMessage(message: ReplicationMessage): message is VolumeMessage {
  return 'volume' in message;
}

// ---------------------------------------------------------------------------------------------
// Body sizes. Every type has a maximum, so that a header is refused before its body is
// buffered (a peer cannot make us hold 32 MiB by announcing an ACK of that size).

const NAME_MIN_BYTES = 1 + 1;
const NAME_MAX_BYTES = 1 + NAME_BYTES_MAX;
/** epoch, sequence, offset, lengthBytes, entryType, volumeLength, sourceLength. */
export const WRITE_FIXED_BYTES = 8 + 8 + 8 + 8 + 1 + 1 + 1;
/** Where the volume and source name lengths sit in a WRITE body. */
const WRITE_VOLUME_LENGTH_AT = 33;
const WRITE_SOURCE_LENGTH_AT = 34;
const WRITE_META_MAX_BYTES = WRITE_FIXED_BYTES + 2 * NAME_BYTES_MAX;

const BODY_BYTES: Record<MessageType, { min: number; max: number }> = (() => {
  const hello = { min: 2 + NONCE_BYTES + 2 * NAME_MIN_BYTES, max: 2 + NONCE_BYTES + 2 * NAME_MAX_BYTES };
  const auth = { min: HMAC_BYTES, max: HMAC_BYTES };
  const sequence = { min: 16 + 2 * NAME_MIN_BYTES, max: 16 + 2 * NAME_MAX_BYTES };
  const grant = { min: 24 + NAME_MIN_BYTES, max: 24 + NAME_MAX_BYTES };
  const time = { min: 8, max: 8 };
  return {
    HELLO: hello,
    AUTH: auth,
    WRITE: { min: WRITE_FIXED_BYTES + 2, max: WRITE_META_MAX_BYTES + WRITE_PAYLOAD_MAX_BYTES },
    ACK: sequence,
    SYNC: sequence,
    SYNC_ACK: sequence,
    CHECKPOINT: sequence,
    CHECKPOINT_ACK: sequence,
    GRANT_REQUEST: grant,
    GRANT: grant,
    REVOKE: grant,
    RELEASE: grant,
    PING: time,
    PONG: time,
    REGION_REQUEST: { min: 8 + 8 + 1 + 8 + 8 + 4 + NAME_MIN_BYTES, max: 8 + 8 + 1 + 8 + 8 + 4 + NAME_MAX_BYTES },
    REGION_REPLY: { min: 8 + 8 + 1 + 4 + NAME_MIN_BYTES, max: 8 + 8 + 1 + 4 + NAME_MAX_BYTES + REGION_DATA_MAX_BYTES },
    ERROR: { min: NAME_MIN_BYTES + 2, max: NAME_MAX_BYTES + 2 + ERROR_MESSAGE_BYTES_MAX },
  };
})();
assert(BODY_BYTES.WRITE.max <= FRAME_BODY_MAX_BYTES, 'WRITE body maximum exceeds the frame cap');

/** The largest body a frame of `type` may have. */
export function bodyMaxBytesOf(type: MessageType): number {
  return BODY_BYTES[type].max;
}

// ---------------------------------------------------------------------------------------------
// Encoding. Invalid messages are programmer errors: they fail an assertion, never reach the wire.

const TWO_POW_32 = 2 ** 32;
const EMPTY = Buffer.alloc(0);

function isU64(value: number): boolean {
  return Number.isSafeInteger(value) && value >= 0;
}

/**
 * Encoded names, by name: every frame carries the same few (volume, source), and encoding
 * them anew cost two allocations per frame. Bounded: cleared when full. The buffers are only
 * ever copied into frames, never handed out.
 */
const encodedNames = new Map<string, Buffer>();
const ENCODED_NAMES_MAX = 256;

function nameBytes(text: string, what: string): Buffer {
  const known = encodedNames.get(text);
  if (known !== undefined) return known;
  const bytes = Buffer.from(text, 'utf8');
  if (!(bytes.length >= 1 && bytes.length <= NAME_BYTES_MAX)) assert(false, `${what} must be 1..${NAME_BYTES_MAX} bytes of UTF-8`);
  if (encodedNames.size >= ENCODED_NAMES_MAX) encodedNames.clear();
  encodedNames.set(text, bytes);
  return bytes;
}

/** Human-readable text is cut instead of refused, at a UTF-8 character boundary. */
function messageBytes(text: string): Buffer {
  const bytes = Buffer.from(text, 'utf8');
  if (bytes.length <= ERROR_MESSAGE_BYTES_MAX) return bytes;
  let end = ERROR_MESSAGE_BYTES_MAX;
  while (end > 0 && (bytes[end]! & 0xc0) === 0x80) end--; // back off continuation bytes
  return bytes.subarray(0, end);
}

class BodyWriter {
  readonly buffer: Buffer;
  private at: number;
  constructor(buffer: Buffer, at: number) {
    this.buffer = buffer;
    this.at = at;
  }
  u8(value: number): void {
    this.at = this.buffer.writeUInt8(value, this.at);
  }
  u16(value: number): void {
    this.at = this.buffer.writeUInt16BE(value, this.at);
  }
  u32(value: number): void {
    this.at = this.buffer.writeUInt32BE(value, this.at);
  }
  u64(value: number, what: string): void {
    // The message is built only on failure: every frame writes several.
    if (!isU64(value)) assert(false, `${what} must be an integer in [0, 2^53): ${value}`);
    this.buffer.writeUInt32BE(Math.floor(value / TWO_POW_32), this.at);
    this.buffer.writeUInt32BE(value % TWO_POW_32, this.at + 4);
    this.at += 8;
  }
  bytes(bytes: Uint8Array): void {
    this.buffer.set(bytes, this.at);
    this.at += bytes.length;
  }
  name(bytes: Buffer): void {
    this.u8(bytes.length);
    this.bytes(bytes);
  }
  get position(): number {
    return this.at;
  }
}

/** Writes the body fields (everything but a WRITE payload); returns the frame's buffer. */
function encodeFields(message: ReplicationMessage): Buffer {
  let writer: BodyWriter;
  const start = (bodyFieldBytes: number): BodyWriter => {
    writer = new BodyWriter(Buffer.allocUnsafe(FRAME_HEADER_BYTES + bodyFieldBytes), FRAME_HEADER_BYTES);
    return writer;
  };
  switch (message.type) {
    case 'HELLO': {
      assert(Number.isInteger(message.protocolVersion) && message.protocolVersion >= 0 && message.protocolVersion <= 0xffff, 'protocolVersion is a u16');
      assert(message.nonce.length === NONCE_BYTES, `nonce must be ${NONCE_BYTES} bytes`);
      const cluster = nameBytes(message.clusterId, 'clusterId');
      const node = nameBytes(message.nodeId, 'nodeId');
      const w = start(2 + NONCE_BYTES + 2 + cluster.length + node.length);
      w.u16(message.protocolVersion);
      w.bytes(message.nonce);
      w.name(cluster);
      w.name(node);
      break;
    }
    case 'AUTH': {
      assert(message.hmac.length === HMAC_BYTES, `hmac must be ${HMAC_BYTES} bytes`);
      start(HMAC_BYTES).bytes(message.hmac);
      break;
    }
    case 'WRITE': {
      const volume = nameBytes(message.volume, 'volume');
      const source = nameBytes(message.source, 'source');
      const isData = message.entryType === ENTRY_TYPE.WRITE;
      if (!(isData || message.entryType === ENTRY_TYPE.ZERO || message.entryType === ENTRY_TYPE.TRIM)) assert(false, `entryType ${String(message.entryType)} cannot travel in a WRITE frame`);
      assert(message.lengthBytes >= 1 && isU64(message.offset + message.lengthBytes), 'offset/lengthBytes out of range');
      assert(message.payload.length === (isData ? message.lengthBytes : 0), 'payload length must be lengthBytes for WRITE, 0 for ZERO/TRIM');
      assert(message.payload.length <= WRITE_PAYLOAD_MAX_BYTES, 'payload larger than WRITE_PAYLOAD_MAX_BYTES');
      const w = start(WRITE_FIXED_BYTES + volume.length + source.length);
      w.u64(message.epoch, 'epoch');
      w.u64(message.sequence, 'sequence');
      w.u64(message.offset, 'offset');
      w.u64(message.lengthBytes, 'lengthBytes');
      w.u8(message.entryType | (message.restartsStream === true ? ENTRY_TYPE_RESTART_BIT : 0));
      w.u8(volume.length);
      w.u8(source.length);
      w.bytes(volume);
      w.bytes(source);
      break;
    }
    case 'ACK':
    case 'SYNC':
    case 'SYNC_ACK':
    case 'CHECKPOINT':
    case 'CHECKPOINT_ACK': {
      const volume = nameBytes(message.volume, 'volume');
      const source = nameBytes(message.source, 'source');
      const w = start(16 + 2 + volume.length + source.length);
      w.u64(message.epoch, 'epoch');
      w.u64(message.sequence, 'sequence');
      w.name(volume);
      w.name(source);
      break;
    }
    case 'GRANT_REQUEST':
    case 'GRANT':
    case 'REVOKE':
    case 'RELEASE': {
      const volume = nameBytes(message.volume, 'volume');
      const w = start(24 + 1 + volume.length);
      w.u64(message.epoch, 'epoch');
      w.u64(message.region, 'region');
      w.u64(message.generation, 'generation');
      w.name(volume);
      break;
    }
    case 'PING':
    case 'PONG':
      start(8).u64(message.timestampMs, 'timestampMs');
      break;
    case 'REGION_REQUEST': {
      const volume = nameBytes(message.volume, 'volume');
      assert(Number.isSafeInteger(message.chunkBytes) && message.chunkBytes >= 0 && message.chunkBytes < TWO_POW_32, 'chunkBytes must fit 32 bits');
      const w = start(8 + 8 + 1 + 8 + 8 + 4 + 1 + volume.length);
      w.u64(message.epoch, 'epoch');
      w.u64(message.requestId, 'requestId');
      w.u8(REGION_KINDS[message.kind]);
      w.u64(message.offset, 'offset');
      w.u64(message.lengthBytes, 'lengthBytes');
      w.u32(message.chunkBytes);
      w.name(volume);
      break;
    }
    case 'REGION_REPLY': {
      const volume = nameBytes(message.volume, 'volume');
      assert(message.data.length <= REGION_DATA_MAX_BYTES, `REGION_REPLY data over ${REGION_DATA_MAX_BYTES} bytes`);
      const w = start(8 + 8 + 1 + 4 + 1 + volume.length + message.data.length);
      w.u64(message.epoch, 'epoch');
      w.u64(message.requestId, 'requestId');
      w.u8(message.ok ? 1 : 0);
      w.u32(message.data.length);
      w.name(volume);
      w.bytes(message.data);
      break;
    }
    case 'ERROR': {
      const code = nameBytes(message.code, 'code');
      const text = messageBytes(message.message);
      const w = start(1 + code.length + 2 + text.length);
      w.name(code);
      w.u16(text.length);
      w.bytes(text);
      break;
    }
    default: {
      const unknown: never = message;
      throw new Error(`assertion failed: unknown message ${JSON.stringify(unknown)}`);
    }
  }
  assert(writer!.position === writer!.buffer.length, 'encoder wrote a different size than it reserved');
  return writer!.buffer;
}

/**
 * The frame for `message` as buffers to write in order (one writev): the header with the
 * body's fields, then a WRITE payload as the caller's own buffer, never copied.
 */
export function encodeFrame(message: ReplicationMessage): Buffer[] {
  const frame = encodeFields(message);
  const payload = message.type === 'WRITE' ? message.payload : EMPTY;
  const bodyLength = frame.length - FRAME_HEADER_BYTES + payload.length;
  if (bodyLength > BODY_BYTES[message.type].max) assert(false, `${message.type} body of ${bodyLength} bytes over its maximum`);
  frame.writeUInt32BE(FRAME_MAGIC, 0);
  frame.writeUInt8(PROTOCOL_VERSION, 4);
  frame.writeUInt8(MESSAGE_TYPE[message.type], 5);
  frame.writeUInt16BE(0, 6);
  frame.writeUInt32BE(bodyLength, 8);
  // The CRC field sits between the header and the body: chain over the two sides of it.
  let crc = crc32c(frame.subarray(0, 12));
  crc = crc32c(frame.subarray(FRAME_HEADER_BYTES), crc);
  if (payload.length > 0) crc = crc32c(payload, crc);
  frame.writeUInt32BE(crc, 12);
  return payload.length > 0 ? [frame, payload] : [frame];
}

/** Total bytes of an encoded frame. */
export function frameLengthBytes(parts: readonly Buffer[]): number {
  let total = 0;
  for (const part of parts) total += part.length;
  return total;
}

// ---------------------------------------------------------------------------------------------
// Decoding

function badFrame(message: string): MirrorsanError {
  return new MirrorsanError('REPL_BAD_FRAME', message);
}

/** Reads a body that passed its CRC; every overrun or leftover byte is a format violation. */
class BodyReader {
  private readonly buffer: Buffer;
  private at = 0;
  private readonly type: MessageType;
  constructor(buffer: Buffer, type: MessageType) {
    this.buffer = buffer;
    this.type = type;
  }
  private need(count: number, what: string): void {
    if (this.at + count > this.buffer.length) throw badFrame(`${this.type} frame ends inside ${what}`);
  }
  u8(what: string): number {
    this.need(1, what);
    return this.buffer[this.at++]!;
  }
  u16(what: string): number {
    this.need(2, what);
    const value = this.buffer.readUInt16BE(this.at);
    this.at += 2;
    return value;
  }
  u32(what: string): number {
    this.need(4, what);
    const value = this.buffer.readUInt32BE(this.at);
    this.at += 4;
    return value;
  }
  u64(what: string): number {
    this.need(8, what);
    const high = this.buffer.readUInt32BE(this.at);
    // 2^21 * 2^32 = 2^53: from there on a number cannot hold every integer.
    if (high >= 0x20_0000) throw badFrame(`${this.type} ${what} is 2^53 or more`);
    const value = high * TWO_POW_32 + this.buffer.readUInt32BE(this.at + 4);
    this.at += 8;
    return value;
  }
  /** A copy: small fixed fields (nonces, HMACs) must not pin the socket chunk they came in. */
  copy(count: number, what: string): Buffer {
    this.need(count, what);
    const bytes = Buffer.from(this.buffer.subarray(this.at, this.at + count));
    this.at += count;
    return bytes;
  }
  text(count: number, what: string, minBytes: number): string {
    this.need(count, what);
    const bytes = this.buffer.subarray(this.at, this.at + count);
    if (count < minBytes) throw badFrame(`${this.type} ${what} is empty`);
    if (!isUtf8(bytes)) throw badFrame(`${this.type} ${what} is not valid UTF-8`);
    this.at += count;
    return bytes.toString('utf8');
  }
  name(what: string): string {
    // Not this.u8(`${what} length`): that would build the string for every name of every frame.
    if (this.at + 1 > this.buffer.length) throw badFrame(`${this.type} frame ends inside ${what} length`);
    const length = this.buffer[this.at++]!;
    if (length > NAME_BYTES_MAX) throw badFrame(`${this.type} ${what} longer than ${NAME_BYTES_MAX} bytes`);
    return this.text(length, what, 1);
  }
  rest(): Buffer {
    const bytes = this.buffer.subarray(this.at);
    this.at = this.buffer.length;
    return bytes;
  }
  end(): void {
    if (this.at !== this.buffer.length) throw badFrame(`${this.type} frame has ${this.buffer.length - this.at} bytes after its fields`);
  }
}

function wireEntryType(value: number): WireEntryType {
  if (value === ENTRY_TYPE.WRITE || value === ENTRY_TYPE.ZERO || value === ENTRY_TYPE.TRIM) return value;
  throw badFrame(`WRITE frame with entry type ${value}`);
}

/** The WRITE message from its fields (`meta`) and its payload, both CRC-checked already. */
function decodeWrite(meta: Buffer, payload: Buffer): WriteMessage {
  const r = new BodyReader(meta, 'WRITE');
  const epoch = r.u64('epoch');
  const sequence = r.u64('sequence');
  const offset = r.u64('offset');
  const lengthBytes = r.u64('lengthBytes');
  const typeByte = r.u8('entry type');
  const restartsStream = (typeByte & ENTRY_TYPE_RESTART_BIT) !== 0;
  const entryType = wireEntryType(typeByte & ~ENTRY_TYPE_RESTART_BIT);
  const volumeLength = r.u8('volume length');
  const sourceLength = r.u8('source length');
  if (volumeLength > NAME_BYTES_MAX || sourceLength > NAME_BYTES_MAX) throw badFrame(`WRITE names longer than ${NAME_BYTES_MAX} bytes`);
  const volume = r.text(volumeLength, 'volume', 1);
  const source = r.text(sourceLength, 'source', 1);
  r.end();
  if (lengthBytes < 1 || !isU64(offset + lengthBytes)) throw badFrame(`WRITE range ${offset}+${lengthBytes} is empty or past 2^53`);
  const expectedPayload = entryType === ENTRY_TYPE.WRITE ? lengthBytes : 0;
  if (payload.length !== expectedPayload) {
    throw badFrame(`WRITE entry type ${entryType} lengthBytes ${lengthBytes} carries a ${payload.length}-byte payload`);
  }
  const message: WriteMessage = { type: 'WRITE', volume, epoch, source, sequence, entryType, offset, lengthBytes, payload };
  if (restartsStream) message.restartsStream = true;
  return message;
}

function decodeBody(type: Exclude<MessageType, 'WRITE'>, body: Buffer): ReplicationMessage {
  const r = new BodyReader(body, type);
  let message: ReplicationMessage;
  switch (type) {
    case 'HELLO': {
      const protocolVersion = r.u16('protocolVersion');
      const nonce = r.copy(NONCE_BYTES, 'nonce');
      const clusterId = r.name('clusterId');
      const nodeId = r.name('nodeId');
      message = { type, protocolVersion, clusterId, nodeId, nonce };
      break;
    }
    case 'AUTH':
      message = { type, hmac: r.copy(HMAC_BYTES, 'hmac') };
      break;
    case 'ACK':
    case 'SYNC':
    case 'SYNC_ACK':
    case 'CHECKPOINT':
    case 'CHECKPOINT_ACK': {
      const epoch = r.u64('epoch');
      const sequence = r.u64('sequence');
      const volume = r.name('volume');
      const source = r.name('source');
      message = { type, volume, epoch, source, sequence } as SequenceMessage<typeof type> as ReplicationMessage;
      break;
    }
    case 'GRANT_REQUEST':
    case 'GRANT':
    case 'REVOKE':
    case 'RELEASE': {
      const epoch = r.u64('epoch');
      const region = r.u64('region');
      const generation = r.u64('generation');
      const volume = r.name('volume');
      message = { type, volume, epoch, region, generation } as GrantMessage<typeof type> as ReplicationMessage;
      break;
    }
    case 'PING':
    case 'PONG':
      message = { type, timestampMs: r.u64('timestampMs') };
      break;
    case 'REGION_REQUEST': {
      const epoch = r.u64('epoch');
      const requestId = r.u64('requestId');
      const kindByte = r.u8('kind');
      const kind = kindByte === REGION_KIND_DIGESTS ? 'digests' : kindByte === REGION_KIND_READ ? 'read' : kindByte === REGION_KIND_DIRTY ? 'dirty' : undefined;
      if (kind === undefined) throw badFrame(`REGION_REQUEST of unknown kind ${kindByte}`);
      const offset = r.u64('offset');
      const lengthBytes = r.u64('lengthBytes');
      const chunkBytes = r.u32('chunkBytes');
      const volume = r.name('volume');
      message = { type, volume, epoch, requestId, kind, offset, lengthBytes, chunkBytes };
      break;
    }
    case 'REGION_REPLY': {
      const epoch = r.u64('epoch');
      const requestId = r.u64('requestId');
      const ok = r.u8('status') === 1;
      const length = r.u32('data length');
      if (length > REGION_DATA_MAX_BYTES) throw badFrame(`REGION_REPLY data longer than ${REGION_DATA_MAX_BYTES} bytes`);
      const volume = r.name('volume');
      message = { type, volume, epoch, requestId, ok, data: r.copy(length, 'data') };
      break;
    }
    case 'ERROR': {
      const code = r.name('code');
      const length = r.u16('message length');
      if (length > ERROR_MESSAGE_BYTES_MAX) throw badFrame(`ERROR message longer than ${ERROR_MESSAGE_BYTES_MAX} bytes`);
      message = { type, code, message: r.text(length, 'message', 0) };
      break;
    }
    default: {
      const unknown: never = type;
      throw new Error(`assertion failed: no decoder for ${String(unknown)}`);
    }
  }
  r.end();
  return message;
}

export interface FrameDecoderOptions {
  /**
   * Frames announcing a larger body are refused from their header, before any of the body is
   * buffered. At most FRAME_BODY_MAX_BYTES (the default).
   */
  bodyMaxBytes?: number;
}

type Stage = 'header' | 'body' | 'writeFields' | 'writeOverlong' | 'writePayload';

/**
 * Turns received chunks into messages. `push` chunks as they arrive, then call `next` until it
 * returns undefined (more bytes needed). Pulling lets a shell stop taking messages (for
 * backpressure, or to change `acceptOnly` after a handshake message) while bytes stay buffered.
 *
 * Memory: after `next` returned undefined, the decoder holds at most one incomplete frame,
 * that is FRAME_HEADER_BYTES plus a body no larger than the caps checked on its header.
 * Errors are MirrorsanErrors (REPL_*); after one, the decoder is dead and rethrows it.
 */
export class FrameDecoder {
  private readonly queue = new ChunkQueue();
  /** Copies of a header or WRITE fixed part that spans chunks. */
  private readonly scratch = Buffer.allocUnsafe(Math.max(FRAME_HEADER_BYTES, WRITE_FIXED_BYTES));
  private readonly bodyMaxBytes: number;
  private accepted: ReadonlySet<MessageType> | undefined = undefined;
  private stage: Stage = 'header';
  private failure: MirrorsanError | undefined = undefined;

  // The frame being decoded.
  private type: MessageType = 'PING';
  private bodyLength = 0;
  private crcExpected = 0;
  /** CRC32C over what was consumed of the frame so far (header bytes 0..11, then the body). */
  private crcRunning = 0;
  private writeFields: Buffer | undefined = undefined;
  private payloadLength = 0;
  private payloadBuffer: Buffer | undefined = undefined;
  private payloadFilled = 0;

  constructor(options: FrameDecoderOptions = {}) {
    this.bodyMaxBytes = options.bodyMaxBytes ?? FRAME_BODY_MAX_BYTES;
    assert(Number.isInteger(this.bodyMaxBytes) && this.bodyMaxBytes >= 0 && this.bodyMaxBytes <= FRAME_BODY_MAX_BYTES, 'bodyMaxBytes out of range');
  }

  push(chunk: Buffer): void {
    if (this.failure !== undefined) throw this.failure;
    this.queue.push(chunk);
  }

  /**
   * Refuses (REPL_BAD_FRAME, from the header) every frame whose type is not in `types`;
   * undefined accepts all. Before authentication this keeps a peer from making us buffer a
   * WRITE-sized body: only the handshake's small frames are read at all.
   */
  acceptOnly(types: readonly MessageType[] | undefined): void {
    this.accepted = types === undefined ? undefined : new Set(types);
  }

  /** Bytes held: buffered chunks plus a partly filled payload buffer. */
  get bufferedBytes(): number {
    return this.queue.length + (this.payloadBuffer?.length ?? 0);
  }

  /** True between frames: no part of a frame is held. */
  get atFrameBoundary(): boolean {
    return this.stage === 'header' && this.queue.length === 0;
  }

  next(): ReplicationMessage | undefined {
    if (this.failure !== undefined) throw this.failure;
    try {
      return this.step();
    } catch (error) {
      if (error instanceof MirrorsanError) {
        this.failure = error;
        // Drop what the bad peer sent: nothing of it will ever be read.
        this.queue.drain();
        this.payloadBuffer = undefined;
        this.writeFields = undefined;
      }
      throw error;
    }
  }

  private step(): ReplicationMessage | undefined {
    for (;;) {
      switch (this.stage) {
        case 'header':
          if (this.queue.length < FRAME_HEADER_BYTES) return undefined;
          this.readHeader();
          continue;
        case 'body': {
          if (this.queue.length < this.bodyLength) return undefined;
          // Non-WRITE bodies are at most a few KiB: a view, or one small copy across chunks.
          const body = this.queue.take(this.bodyLength);
          this.checkCrc(crc32c(body, this.crcRunning));
          this.stage = 'header';
          return decodeBody(this.type as Exclude<MessageType, 'WRITE'>, body);
        }
        case 'writeFields': {
          if (this.queue.length < WRITE_FIXED_BYTES) return undefined;
          const { buffer, at } = this.view(WRITE_FIXED_BYTES);
          const fieldsLength = WRITE_FIXED_BYTES + buffer[at + WRITE_VOLUME_LENGTH_AT]! + buffer[at + WRITE_SOURCE_LENGTH_AT]!;
          if (fieldsLength > this.bodyLength) {
            // The name lengths point past the body: read the body whole (it passed the caps)
            // so that the CRC tells corruption from a malformed frame.
            this.stage = 'writeOverlong';
            continue;
          }
          if (this.queue.length < fieldsLength) return undefined;
          this.writeFields = this.queue.take(fieldsLength);
          this.crcRunning = crc32c(this.writeFields, this.crcRunning);
          this.payloadLength = this.bodyLength - fieldsLength;
          this.payloadFilled = 0;
          this.stage = 'writePayload';
          continue;
        }
        case 'writeOverlong': {
          if (this.queue.length < this.bodyLength) return undefined;
          this.checkCrc(crc32c(this.queue.take(this.bodyLength), this.crcRunning));
          throw badFrame('WRITE names run past the end of its body');
        }
        case 'writePayload': {
          const payload = this.takePayload();
          if (payload === undefined) return undefined;
          this.checkCrc(crc32c(payload, this.crcRunning));
          const fields = this.writeFields;
          assert(fields !== undefined, 'WRITE payload without its fields');
          this.writeFields = undefined;
          this.stage = 'header';
          return decodeWrite(fields, payload);
        }
      }
    }
  }

  private readHeader(): void {
    const { buffer, at } = this.view(FRAME_HEADER_BYTES);
    const magic = buffer.readUInt32BE(at);
    if (magic !== FRAME_MAGIC) throw badFrame(`bad frame magic 0x${magic.toString(16).padStart(8, '0')}`);
    const version = buffer[at + 4]!;
    if (version !== PROTOCOL_VERSION) {
      throw new MirrorsanError('REPL_VERSION_MISMATCH', `peer speaks replication protocol version ${version}, this node ${PROTOCOL_VERSION}`);
    }
    const typeId = buffer[at + 5]!;
    const type = TYPE_BY_ID.get(typeId);
    if (type === undefined) throw badFrame(`unknown frame type 0x${typeId.toString(16)}`);
    if (this.accepted !== undefined && !this.accepted.has(type)) throw badFrame(`${type} frame not accepted at this point`);
    const flags = buffer.readUInt16BE(at + 6);
    if (flags !== 0) throw badFrame(`${type} frame with reserved flags 0x${flags.toString(16)}`);
    const bodyLength = buffer.readUInt32BE(at + 8);
    const limits = BODY_BYTES[type];
    const maxBytes = Math.min(limits.max, this.bodyMaxBytes);
    if (bodyLength > maxBytes) {
      throw new MirrorsanError('REPL_FRAME_TOO_LARGE', `${type} frame announces a ${bodyLength}-byte body, limit ${maxBytes}`);
    }
    if (bodyLength < limits.min) throw badFrame(`${type} frame body of ${bodyLength} bytes is shorter than its fields`);
    this.type = type;
    this.bodyLength = bodyLength;
    this.crcExpected = buffer.readUInt32BE(at + 12);
    this.crcRunning = crc32c(buffer.subarray(at, at + 12));
    this.queue.skip(FRAME_HEADER_BYTES);
    this.stage = type === 'WRITE' ? 'writeFields' : 'body';
  }

  /** The payload once complete: a view when it lies in one chunk, else one exact-size copy. */
  private takePayload(): Buffer | undefined {
    const length = this.payloadLength;
    if (length === 0) return EMPTY;
    if (this.payloadBuffer === undefined) {
      if (this.queue.contiguous(length) !== undefined) return this.queue.take(length);
      if (this.queue.length === 0) return undefined;
      this.payloadBuffer = Buffer.allocUnsafe(length);
    }
    const count = Math.min(length - this.payloadFilled, this.queue.length);
    this.queue.copyOut(this.payloadBuffer, this.payloadFilled, count);
    this.payloadFilled += count;
    if (this.payloadFilled < length) return undefined;
    const payload = this.payloadBuffer;
    this.payloadBuffer = undefined;
    // Allocated for this payload alone and never touched again: a holder need not copy it.
    return handOver(payload);
  }

  private checkCrc(computed: number): void {
    if (computed !== this.crcExpected) {
      throw new MirrorsanError(
        'REPL_CRC_MISMATCH',
        `${this.type} frame fails its CRC32C (carried 0x${this.crcExpected.toString(16)}, computed 0x${computed.toString(16)})`,
      );
    }
  }

  /** `bytes` at the head of the queue, in place when contiguous, else copied to scratch. */
  private view(bytes: number): { buffer: Buffer; at: number } {
    const head = this.queue.contiguous(bytes);
    if (head !== undefined) return { buffer: head, at: this.queue.headStart };
    this.queue.peek(this.scratch, 0, bytes);
    return { buffer: this.scratch, at: 0 };
  }
}
