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

/** Test-only fault injection; never set by production configuration. */
export interface ImageFaults {
  /** Called before each write to the image; true makes that write fail with EIO. */
  failImageWrites?: () => boolean;
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

  private constructor(options: ImageOpenOptions, fd: number) {
    this.ioPolicy = new InlineIoPolicy({ inlineMaxBytes: options.inlineIoMaxBytes ?? 64 * 1024 });
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
      if (buffers.length === 1) await writeAll(this.fd, buffers[0]!, offset, this.ioPolicy);
      else await writevAll(this.fd, buffers, offset);
    } catch (error) {
      throw this.ioError('write', offset, length, error);
    }
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
    assert(!this.closed, `image ${this.path} used after close`);
    assert(
      Number.isSafeInteger(offset) && Number.isSafeInteger(length) && offset >= 0 && length >= 0 && offset + length <= this.sizeBytes,
      `image range [${offset}, ${offset + length}) outside ${this.sizeBytes} bytes`,
    );
  }

  private injectFault(operation: string, offset: number, length: number): void {
    if (this.faults?.failImageWrites?.()) {
      const cause = Object.assign(new Error('EIO: injected fault'), { code: 'EIO' });
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
