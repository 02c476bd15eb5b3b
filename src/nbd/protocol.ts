// NBD wire constants (NetworkBlockDevice/nbd doc/proto.md, with extended headers from its
// `extension-ext-header` branch). Everything on the wire is big-endian. Names follow the
// spec without the `NBD_` prefix so a grep for the spec's name finds the constant.

/** Magic numbers that start every frame. */
export const MAGIC = {
  /** [NBD: Newstyle negotiation] 'NBDMAGIC', first 8 bytes of the server greeting. */
  NBDMAGIC: 0x4e42444d41474943n,
  /** [NBD: Newstyle negotiation] 'IHAVEOPT': second greeting word and the start of every option request. */
  IHAVEOPT: 0x49484156454f5054n,
  /** [NBD: Fixed newstyle negotiation] start of every option reply. */
  OPTION_REPLY: 0x0003e889045565a9n,
  /** [NBD: Request message] compact 28-byte request. */
  REQUEST: 0x25609513,
  /** [NBD: Request message] 32-byte request once NBD_OPT_EXTENDED_HEADERS is negotiated. */
  EXTENDED_REQUEST: 0x21e41c71,
  /** [NBD: Simple reply message] 16-byte reply (was NBD_REPLY_MAGIC). */
  SIMPLE_REPLY: 0x67446698,
  /** [NBD: Structured reply chunk message] 20-byte chunk header. */
  STRUCTURED_REPLY: 0x668e33ef,
  /** [NBD: Extended reply chunk message] 32-byte chunk header. */
  EXTENDED_REPLY: 0x6e8a278c,
} as const;

/** [NBD: Handshake flags] 16 bits sent by the server in its greeting. */
export const HANDSHAKE_FLAG = {
  FIXED_NEWSTYLE: 1 << 0,
  /** Server may leave out the 124 zero bytes after NBD_OPT_EXPORT_NAME. */
  NO_ZEROES: 1 << 1,
} as const;

/** [NBD: Client flags] 32 bits sent by the client; any other bit => the server must close. */
export const CLIENT_FLAG = {
  FIXED_NEWSTYLE: 1 << 0,
  NO_ZEROES: 1 << 1,
} as const;
export const CLIENT_FLAGS_KNOWN = CLIENT_FLAG.FIXED_NEWSTYLE | CLIENT_FLAG.NO_ZEROES;

/** [NBD: Option types] */
export const OPT = {
  /** Ends haggling; answered without a reply header; failure => hard close. */
  EXPORT_NAME: 1,
  /** [NBD: NBD_OPT_ABORT] server replies ACK, then both sides close. */
  ABORT: 2,
  /** [NBD: NBD_OPT_LIST] one REP_SERVER per export, then ACK. */
  LIST: 3,
  /** Withdrawn experimental extension; answered with ERR_UNSUP like any unknown option. */
  PEEK_EXPORT: 4,
  /** [NBD: NBD_OPT_STARTTLS] ACK, then TLS; negotiation state is reset. */
  STARTTLS: 5,
  /** [NBD: NBD_OPT_INFO] like GO but stays in haggling. */
  INFO: 6,
  /** [NBD: NBD_OPT_GO] REP_INFO(s) then ACK, then transmission. */
  GO: 7,
  /** [NBD: NBD_OPT_STRUCTURED_REPLY] */
  STRUCTURED_REPLY: 8,
  /** [NBD: NBD_OPT_LIST_META_CONTEXT] */
  LIST_META_CONTEXT: 9,
  /** [NBD: NBD_OPT_SET_META_CONTEXT] */
  SET_META_CONTEXT: 10,
  /** [NBD: NBD_OPT_EXTENDED_HEADERS] 32-byte requests and replies, 64-bit lengths. */
  EXTENDED_HEADERS: 11,
} as const;

/** [NBD: Option reply types] non-error replies. */
export const REP = {
  ACK: 1,
  /** [NBD: NBD_REP_SERVER] name length (4), name, description. */
  SERVER: 2,
  /** [NBD: NBD_REP_INFO] info type (2), payload. */
  INFO: 3,
  /** [NBD: NBD_REP_META_CONTEXT] context id (4), name. */
  META_CONTEXT: 4,
} as const;

/** Bit 31 marks an option reply type as an error. */
export const REP_ERROR_BIT = 0x80000000;

/** [NBD: Option reply types] error replies (2^31 + n); may carry a human-readable message. */
export const REP_ERR = {
  UNSUP: (REP_ERROR_BIT + 1) >>> 0,
  POLICY: (REP_ERROR_BIT + 2) >>> 0,
  INVALID: (REP_ERROR_BIT + 3) >>> 0,
  PLATFORM: (REP_ERROR_BIT + 4) >>> 0,
  TLS_REQD: (REP_ERROR_BIT + 5) >>> 0,
  UNKNOWN: (REP_ERROR_BIT + 6) >>> 0,
  SHUTDOWN: (REP_ERROR_BIT + 7) >>> 0,
  BLOCK_SIZE_REQD: (REP_ERROR_BIT + 8) >>> 0,
  TOO_BIG: (REP_ERROR_BIT + 9) >>> 0,
  EXT_HEADER_REQD: (REP_ERROR_BIT + 10) >>> 0,
} as const;

/** [NBD: NBD_REP_INFO] information types requested by INFO/GO and sent in REP_INFO. */
export const INFO = {
  /** size (8) + transmission flags (2); mandatory before a successful ACK. */
  EXPORT: 0,
  NAME: 1,
  DESCRIPTION: 2,
  /** minimum (4), preferred (4), maximum payload (4). */
  BLOCK_SIZE: 3,
} as const;

/** [NBD: Transmission flags] 16 bits sent with the export size. */
export const TRANSMISSION_FLAG = {
  /** MUST always be set. */
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  /** Also exposes NBD_CMD_FLAG_NO_HOLE. */
  SEND_WRITE_ZEROES: 1 << 6,
  /** MUST be clear unless structured replies or extended headers were negotiated. */
  SEND_DF: 1 << 7,
  /** FLUSH/FUA effects are visible on every connection when answered. */
  CAN_MULTI_CONN: 1 << 8,
  /** RESIZE extension; not implemented. */
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
  /** Extended headers only; not implemented (we do not accept BLOCK_STATUS payloads). */
  BLOCK_STATUS_PAYLOAD: 1 << 12,
} as const;

/** [NBD: Request types] */
export const CMD = {
  READ: 0,
  WRITE: 1,
  /** [NBD: NBD_CMD_DISC] finish outstanding requests, then close; no reply. */
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
  /** RESIZE extension; not implemented (answered EINVAL). */
  RESIZE: 8,
} as const;

/** [NBD: Command flags] */
export const CMD_FLAG = {
  /** Valid on every command once SEND_FUA is advertised. */
  FUA: 1 << 0,
  /** WRITE_ZEROES: do not create a hole. */
  NO_HOLE: 1 << 1,
  /** READ: at most one content chunk. */
  DF: 1 << 2,
  /** BLOCK_STATUS: exactly one extent per context. */
  REQ_ONE: 1 << 3,
  /** WRITE_ZEROES: fail with ENOTSUP unless faster than a WRITE. */
  FAST_ZERO: 1 << 4,
  /** Extended headers: *length* is a payload length and that many bytes follow. */
  PAYLOAD_LEN: 1 << 5,
} as const;

/** [NBD: Structured and extended header reply flags] */
export const REPLY_FLAG = {
  /** Final chunk of a reply. */
  DONE: 1 << 0,
} as const;

/** [NBD: Structured reply types] chunk types; bit 15 marks error chunks. */
export const REPLY_TYPE = {
  /** Empty payload, always with DONE. */
  NONE: 0,
  /** offset (8) + data. */
  OFFSET_DATA: 1,
  /** offset (8) + hole size (4). */
  OFFSET_HOLE: 2,
  /** context id (4) + n x {length (4), flags (4)}; compact headers only. */
  BLOCK_STATUS: 5,
  /** context id (4), count (4), n x {length (8), flags (8)}; extended headers only. */
  BLOCK_STATUS_EXT: 6,
  /** error (4), message length (2), message. */
  ERROR: 0x8001,
  /** error (4), message length (2), message, offset (8). */
  ERROR_OFFSET: 0x8002,
} as const;
export const REPLY_TYPE_ERROR_BIT = 0x8000;

/** [NBD: Error values] errno-like values in replies. */
export const ERRNO = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

/** [NBD: `base:allocation` metadata context] status flags. */
export const STATE = {
  /** Not allocated in the backing store. */
  HOLE: 1 << 0,
  /** Reads as zeroes. */
  ZERO: 1 << 1,
} as const;

/** [NBD: The `base:` metadata namespace] the one context this server offers. */
export const BASE_ALLOCATION = 'base:allocation';

/** Sizes of fixed frames, in bytes. */
export const FRAME_BYTES = {
  GREETING: 18,
  CLIENT_FLAGS: 4,
  OPTION_HEADER: 16,
  OPTION_REPLY_HEADER: 20,
  EXPORT_NAME_ANSWER: 10,
  EXPORT_NAME_ZEROES: 124,
  REQUEST: 28,
  EXTENDED_REQUEST: 32,
  SIMPLE_REPLY: 16,
  STRUCTURED_REPLY: 20,
  EXTENDED_REPLY: 32,
} as const;

/** [NBD: String restrictions] strings (names, descriptions, queries) are at most 4096 bytes. */
export const STRING_BYTES_MAX = 4096;

/**
 * [NBD: Size constraints] a payload of up to 2^25 bytes SHOULD NOT be treated as a denial of
 * service even when larger than the advertised maximum: we consume and refuse it instead.
 */
export const PAYLOAD_PORTABLE_BYTES_MAX = 1 << 25;

/** [NBD: NBD_REPLY_TYPE_BLOCK_STATUS] servers SHOULD NOT send more than 2^20 extents per chunk. */
export const BLOCK_STATUS_EXTENTS_MAX = 1 << 20;

/** [NBD: NBD_INFO_BLOCK_SIZE] block-size fields are 32 bits. */
export const UINT32_MAX = 0xffffffff;

// Reverse maps for log lines: `optionName(7)` => "GO".
function reverse(table: Record<string, number>): Map<number, string> {
  return new Map(Object.entries(table).map(([name, value]) => [value, name]));
}
const OPTION_NAMES = reverse(OPT);
const COMMAND_NAMES = reverse(CMD);
const REP_NAMES = reverse({ ...REP, ...Object.fromEntries(Object.entries(REP_ERR).map(([k, v]) => [`ERR_${k}`, v])) });
const ERRNO_NAMES = reverse(ERRNO);

export function optionName(option: number): string {
  return OPTION_NAMES.get(option) ?? `OPT_${option}`;
}
export function commandName(type: number): string {
  return COMMAND_NAMES.get(type) ?? `CMD_${type}`;
}
export function replyTypeName(type: number): string {
  return REP_NAMES.get(type) ?? `REP_${type >>> 0}`;
}
export function errnoName(error: number): string {
  return ERRNO_NAMES.get(error) ?? `errno ${error}`;
}
