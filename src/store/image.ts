// The sparse image file of one volume: positional reads and writes at absolute offsets, and
// freeing space. Invariant kept here and by its callers: the file's bytes always equal the
// volume's logical content (a freed range reads back zeros from the file itself), so two
// replicas' image files can be compared byte for byte.
//
// Node has no fallocate(2), so large aligned ranges are punched by util-linux's `fallocate`
// tool (one process per range, hence only for ranges of at least 1 MiB); smaller ranges, and
// every range when the tool is missing or the file system refuses, are written with zeros.
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import { MirrorsanError, assert } from '../errors.js';
import type { Logger } from '../util/log.js';
import { InlineIoPolicy, closeFd, errorCode, fdatasync, fstatSize, ftruncate, openFd, readAll, writeAll, writevAll } from './file-io.js';

export const PUNCH_HOLE_MIN_BYTES = 1024 * 1024;
/** One shared buffer of zeros, passed many times as an iovec: zero writes allocate nothing. */
const ZERO_CHUNK_BYTES = 1024 * 1024;
const ZERO_CHUNK = Buffer.alloc(ZERO_CHUNK_BYTES);
/** Bytes of zeros per writev call, so a huge zero range does not monopolise a pool thread. */
const ZERO_WRITE_MAX_BYTES = 64 * 1024 * 1024;
/**
 * A good `writePieceBytes` (see ImageOpenOptions) where small random writes follow large ones.
 * The page cache sizes its folios after the write that creates them (Linux 6.x, ext4 with
 * large folios): one 1 MiB pwrite makes a 1 MiB folio, and every later 4 KiB write into it
 * walks all of its 256 block buffers (measured here on a 256 MiB image filled with 1 MiB
 * writes: 7.7 us per 4 KiB pwrite against 3.5 us after 64 KiB writes in a tight loop, and
 * ~25 us against ~6 us inside a loaded node, where those buffers are cold). The price: one
 * thread-pool request and completion per piece, and pieces contending for the file's inode
 * lock. Measured on a 2-way replicated volume: random 4 KiB writes after a sequential fill at
 * 1.7x the rate, 1 MiB writes ~5% slower; on the single-node volume, whose event loop is
 * already the limit for 1 MiB writes, 1 MiB writes fell by a third (so it is not the default).
 */
export const WRITE_PIECE_BYTES = 64 * 1024;

/** The errno an injected fault reports (a failing disk, a full file system). */
export type InjectedErrno = 'EIO' | 'ENOSPC';

/**
 * Test-only fault injection; never set by production configuration (a node builds it only
 * when fault injection is enabled: src/node/faults.ts).
 */
export interface ImageFaults {
  /**
   * Called before each write to the image (data, zeros, punched holes): true (EIO) or an
   * errno name makes that write fail with it, before anything reaches the file.
   */
  failImageWrites?: () => boolean | InjectedErrno;
}

export interface ImageOpenOptions {
  path: string;
  sizeBytes: number;
  /** Allocation granularity: punched ranges must be aligned to it. */
  blockSizeBytes: number;
  /** Create the file (it must not exist) instead of opening an existing one. */
  create: boolean;
  logger: Logger;
  faults?: ImageFaults;
  /** Reads and writes up to this size may run inline on the event loop. Default 64 KiB; 0 never. */
  inlineIoMaxBytes?: number;
  /**
   * Writes of one buffer larger than this go to the file as concurrent positional writes of
   * this size (see WRITE_PIECE_BYTES for why). 0 (the default): one write.
   */
  writePieceBytes?: number;
}

export interface ImageStats {
  datasyncs: number;
  punchedBytes: number;
  zeroWrittenBytes: number;
  /** Small reads/writes done inline on the event loop, how many were slow, and how often that sent I/O back to the pool. */
  inlineCalls: number;
  slowInlineCalls: number;
  inlineFallbacks: number;
}

export class ImageFile {
  readonly path: string;
  readonly sizeBytes: number;
  private readonly blockSizeBytes: number;
  private readonly logger: Logger;
  private readonly faults: ImageFaults | undefined;
  private fd: number;
  private closed = false;
  /** Cleared after the first failed punch: from then on every free is a zero write. */
  private punchAvailable = true;
  private readonly counters = { datasyncs: 0, punchedBytes: 0, zeroWrittenBytes: 0 };
  /** Small reads and writes run inline while the page cache answers fast (see InlineIoPolicy). */
  readonly ioPolicy: InlineIoPolicy;
  private readonly writePieceBytes: number;

  private constructor(options: ImageOpenOptions, fd: number) {
    this.ioPolicy = new InlineIoPolicy({ inlineMaxBytes: options.inlineIoMaxBytes ?? 64 * 1024 });
    this.writePieceBytes = options.writePieceBytes ?? 0;
    assert(Number.isSafeInteger(this.writePieceBytes) && this.writePieceBytes >= 0, `image write piece of ${this.writePieceBytes} bytes`);
    this.path = options.path;
    this.sizeBytes = options.sizeBytes;
    this.blockSizeBytes = options.blockSizeBytes;
    this.logger = options.logger;
    this.faults = options.faults;
    this.fd = fd;
  }

  /** Creates a sparse file of `sizeBytes` (ftruncate, never preallocated) or opens one. */
  static async open(options: ImageOpenOptions): Promise<ImageFile> {
    const fd = await openFd(options.path, options.create ? 'wx+' : 'r+').catch((error: unknown) => {
      throw new MirrorsanError('STORE_IO', `cannot open image ${options.path}: ${String(error)}`, { cause: error });
    });
    try {
      if (options.create) {
        await ftruncate(fd, options.sizeBytes);
      } else {
        const actual = await fstatSize(fd);
        if (actual !== options.sizeBytes) {
          throw new MirrorsanError('STORE_IO', `image ${options.path} has ${actual} bytes, the volume has ${options.sizeBytes}`);
        }
      }
    } catch (error) {
      await closeFd(fd).catch(() => undefined);
      throw error;
    }
    return new ImageFile(options, fd);
  }

  get punchHoleAvailable(): boolean {
    return this.punchAvailable;
  }

  stats(): ImageStats {
    return {
      ...this.counters,
      inlineCalls: this.ioPolicy.inlineCalls,
      slowInlineCalls: this.ioPolicy.slowInlineCalls,
      inlineFallbacks: this.ioPolicy.fallbacks,
    };
  }

  /** Reads [offset, offset+target.length) into `target`. */
  async read(offset: number, target: Buffer): Promise<void> {
    this.checkRange(offset, target.length);
    try {
      await readAll(this.fd, target, offset, this.ioPolicy);
    } catch (error) {
      throw this.ioError('read', offset, target.length, error);
    }
  }

  /** Writes `buffers` back to back from `offset`, as one positional vectored write. */
  async write(offset: number, buffers: readonly Buffer[]): Promise<void> {
    let length = 0;
    for (const buffer of buffers) length += buffer.length;
    this.checkRange(offset, length);
    this.injectFault('write', offset, length);
    try {
      if (buffers.length === 1 && this.writePieceBytes > 0 && buffers[0]!.length > this.writePieceBytes) await this.writeInPieces(offset, buffers[0]!);
      else if (buffers.length === 1) await writeAll(this.fd, buffers[0]!, offset, this.ioPolicy);
      else await writevAll(this.fd, buffers, offset);
    } catch (error) {
      throw this.ioError('write', offset, length, error);
    }
  }

  /** `data` at `offset` as concurrent writes of writePieceBytes, all settled before it returns. */
  private async writeInPieces(offset: number, data: Buffer): Promise<void> {
    const pieces: Promise<void>[] = [];
    const piece = this.writePieceBytes;
    for (let at = 0; at < data.length; at += piece) {
      pieces.push(writeAll(this.fd, data.subarray(at, Math.min(data.length, at + piece)), offset + at));
    }
    // Every piece settles before a failure is reported: none may still be writing afterwards.
    const results = await Promise.allSettled(pieces);
    for (const result of results) if (result.status === 'rejected') throw result.reason;
  }

  async writeZeros(offset: number, length: number): Promise<void> {
    this.checkRange(offset, length);
    this.injectFault('zero write', offset, length);
    let at = offset;
    const end = offset + length;
    try {
      while (at < end) {
        const stepBytes = Math.min(end - at, ZERO_WRITE_MAX_BYTES);
        const iovecs: Buffer[] = [];
        for (let done = 0; done < stepBytes; done += ZERO_CHUNK_BYTES) {
          iovecs.push(ZERO_CHUNK.subarray(0, Math.min(ZERO_CHUNK_BYTES, stepBytes - done)));
        }
        await writevAll(this.fd, iovecs, at);
        at += stepBytes;
      }
    } catch (error) {
      throw this.ioError('zero write', offset, length, error);
    }
    this.counters.zeroWrittenBytes += length;
  }

  /** True when deallocate(offset, length) would punch rather than write zeros. */
  wouldPunch(offset: number, length: number): boolean {
    return (
      this.punchAvailable &&
      length >= PUNCH_HOLE_MIN_BYTES &&
      offset % this.blockSizeBytes === 0 &&
      length % this.blockSizeBytes === 0
    );
  }

  /**
   * Frees [offset, offset+length) so that it reads back zeros: a punched hole for large
   * aligned ranges, zeros written otherwise (and whenever punching fails).
   */
  async deallocate(offset: number, length: number): Promise<'punched' | 'zeroed'> {
    this.checkRange(offset, length);
    if (this.wouldPunch(offset, length)) {
      this.injectFault('punch', offset, length);
      try {
        await punchHole(this.path, offset, length);
        this.counters.punchedBytes += length;
        return 'punched';
      } catch (error) {
        // Punching is an optimisation; zeros give the same content. Say so once.
        this.punchAvailable = false;
        this.logger.warn('image: cannot punch holes, writing zeros instead', {
          image: this.path,
          reason: error instanceof Error ? error.message.split('\n')[0] : String(error),
        });
      }
    }
    await this.writeZeros(offset, length);
    return 'zeroed';
  }

  async datasync(): Promise<void> {
    try {
      await fdatasync(this.fd);
    } catch (error) {
      throw this.ioError('fdatasync', 0, this.sizeBytes, error);
    }
    this.counters.datasyncs++;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await closeFd(this.fd);
    this.fd = -1;
  }

  private checkRange(offset: number, length: number): void {
    // Messages are built only on failure: this runs for every read and write.
    if (this.closed) assert(false, `image ${this.path} used after close`);
    if (!(Number.isSafeInteger(offset) && Number.isSafeInteger(length) && offset >= 0 && length >= 0 && offset + length <= this.sizeBytes)) {
      assert(false, `image range [${offset}, ${offset + length}) outside ${this.sizeBytes} bytes`);
    }
  }

  private injectFault(operation: string, offset: number, length: number): void {
    const fault = this.faults?.failImageWrites?.();
    if (fault) {
      const code: InjectedErrno = fault === true ? 'EIO' : fault;
      const cause = Object.assign(new Error(`${code}: injected fault`), { code });
      throw this.ioError(operation, offset, length, cause);
    }
  }

  private ioError(operation: string, offset: number, length: number, error: unknown): MirrorsanError {
    return new MirrorsanError(
      'STORE_IO',
      `image ${operation} failed at offset ${offset} length ${length} (${errorCode(error) ?? String(error)}): ${this.path}`,
      { cause: error },
    );
  }
}

function punchHole(file: string, offset: number, length: number): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile(
      'fallocate',
      ['--punch-hole', '--keep-size', '-o', String(offset), '-l', String(length), file],
      { timeout: 60_000 },
      (error, _stdout, stderr) => (error ? reject(new Error(`${error.message} ${stderr}`.trim())) : resolve()),
    );
  });
}

/** True when `file` exists (used to tell a new volume directory from an existing one). */
export async function fileExists(file: string): Promise<boolean> {
  try {
    await fs.promises.access(file);
    return true;
  } catch {
    return false;
  }
}
