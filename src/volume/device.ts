// The contract between the NBD front end and whatever stores the bytes: one logical block
// device per export (DESIGN.md §1 A7). The NBD server validates ranges, alignment and flags
// against `geometry` before calling in, so implementations may assert on them.

/** A run of the device as reads and BLOCK_STATUS see it. */
export interface Extent {
  offset: number;
  length: number;
  /** true: reads as zeros and occupies no storage (NBD_STATE_HOLE). */
  hole: boolean;
  /** true: reads as zeros (NBD_STATE_ZERO); always true for holes. */
  zero: boolean;
}

/** One piece of a read: either bytes, or a run known to read as zeros. */
export type ReadPiece =
  | { offset: number; kind: 'data'; data: Buffer }
  | { offset: number; kind: 'zero'; length: number };

export interface DeviceGeometry {
  sizeBytes: number;
  /** Smallest request alignment the device accepts (NBD INFO_BLOCK_SIZE minimum). */
  blockSizeMin: number;
  /** Preferred I/O size (allocation granularity). */
  blockSizePreferred: number;
  /** Largest READ/WRITE payload accepted. */
  payloadMaxBytes: number;
  readOnly: boolean;
  /** True only when every connection to any server sees every acknowledged FLUSH/FUA. */
  multiConn: boolean;
}

export interface WriteOptions {
  /** Force unit access: durable before the promise resolves. */
  fua: boolean;
}

export interface ZeroOptions extends WriteOptions {
  /** NBD_CMD_FLAG_NO_HOLE not set: the range may be deallocated. */
  mayTrim: boolean;
  /** NBD_CMD_FLAG_FAST_ZERO: fail with NBD_ENOTSUP rather than write zeros slowly. */
  fastZero: boolean;
}

export interface BlockDevice {
  readonly name: string;
  readonly description: string;
  geometry(): DeviceGeometry;
  /** Pieces in ascending offset order covering exactly [offset, offset+length). */
  read(offset: number, length: number): Promise<ReadPiece[]>;
  write(offset: number, data: Buffer, options: WriteOptions): Promise<void>;
  writeZeroes(offset: number, length: number, options: ZeroOptions): Promise<void>;
  trim(offset: number, length: number, options: WriteOptions): Promise<void>;
  /** Every write acknowledged before this call is durable when it resolves. */
  flush(): Promise<void>;
  /** Hint: prefetch. May do nothing. */
  cache(offset: number, length: number): Promise<void>;
  /** Extents in ascending order, covering at least [offset, offset+1) and at most `length` bytes. */
  blockStatus(offset: number, length: number): Extent[];
}

/** Resolves a device by export name; undefined means "no such export". */
export interface ExportRegistry {
  list(): BlockDevice[];
  get(name: string): BlockDevice | undefined;
  /** The export served to clients that ask for the empty name. */
  defaultName(): string | undefined;
}
