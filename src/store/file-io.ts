// Thin promise wrappers over fs calls on raw file descriptors, for the hot path of the image
// and the log: the callback API on an fd costs one libuv request and one promise, and the
// helpers loop over short reads/writes, which the kernel may return at any time.
import * as fs from 'node:fs';
import * as path from 'node:path';

/** Linux IOV_MAX: a writev with more iovecs fails with EINVAL. */
export const IOV_MAX = 1024;

function writevOnce(fd: number, buffers: Buffer[], position: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.writev(fd, buffers, position, (error, bytesWritten) => (error ? reject(error) : resolve(bytesWritten)));
  });
}

/**
 * Writes `buffers` back to back at `position` with as few pwritev calls as IOV_MAX allows,
 * finishing short writes. Returns the number of writev calls made.
 */
export async function writevAll(
  fd: number,
  buffers: readonly Buffer[],
  position: number,
  policy: InlineIoPolicy = POOL_ONLY,
): Promise<number> {
  let total = 0;
  for (const buffer of buffers) total += buffer.length;
  const inline = policy.useInline(total);
  let calls = 0;
  let index = 0;
  let at = position;
  let pending: Buffer[] = [];
  while (index < buffers.length || pending.length > 0) {
    while (pending.length < IOV_MAX && index < buffers.length) {
      const buffer = buffers[index++]!;
      if (buffer.length > 0) pending.push(buffer);
    }
    if (pending.length === 0) break;
    let requested = 0;
    for (const buffer of pending) requested += buffer.length;
    const batch = pending;
    const written = inline ? policy.time(() => fs.writevSync(fd, batch, at)) : await writevOnce(fd, pending, at);
    calls++;
    if (written <= 0) throw Object.assign(new Error(`writev wrote ${written} of ${requested} bytes`), { code: 'EIO' });
    at += written;
    if (written === requested) {
      pending = [];
      continue;
    }
    // Short write: drop what went out, keep the rest (a view, not a copy) for the next call.
    let skip = written;
    while (skip > 0) {
      const head = pending[0]!;
      if (head.length <= skip) {
        skip -= head.length;
        pending.shift();
      } else {
        pending[0] = head.subarray(skip);
        skip = 0;
      }
    }
  }
  return calls;
}

/**
 * Small positional reads and writes that hit the page cache take a few microseconds, while a
 * trip through libuv's thread pool costs several times that in wake-ups and context switches
 * (measured here: 4k random reads at 0.35x nbdkit through the pool, five futex calls per
 * request). So small I/O runs inline on the event loop, until inline calls turn slow: a
 * page-cache miss or writeback throttling. Then, for a cool-down period, all I/O goes
 * through the pool again, so a slow disk never stalls every connection for long. One slow
 * call is not enough (on a busy machine the scheduler preempts us mid-syscall now and then);
 * several within a window, or one very slow call, are.
 */
export class InlineIoPolicy {
  /** Requests up to this size may run inline. 0 disables inline I/O. */
  readonly inlineMaxBytes: number;
  private readonly slowCallNs: bigint;
  private readonly stallCallNs: bigint;
  private readonly cooldownMs: number;
  private poolUntilMs = 0;
  private windowCalls = 0;
  private windowSlowCalls = 0;
  inlineCalls = 0;
  slowInlineCalls = 0;
  fallbacks = 0;

  static readonly WINDOW_CALLS = 1024;
  static readonly WINDOW_SLOW_CALLS_MAX = 8;

  constructor(options: { inlineMaxBytes?: number; slowCallUs?: number; stallCallUs?: number; cooldownMs?: number } = {}) {
    this.inlineMaxBytes = options.inlineMaxBytes ?? 64 * 1024;
    this.slowCallNs = BigInt(Math.round((options.slowCallUs ?? 1000) * 1000));
    this.stallCallNs = BigInt(Math.round((options.stallCallUs ?? 20_000) * 1000));
    this.cooldownMs = options.cooldownMs ?? 2000;
  }

  useInline(lengthBytes: number): boolean {
    if (lengthBytes > this.inlineMaxBytes) return false;
    if (this.poolUntilMs === 0) return true;
    if (performance.now() < this.poolUntilMs) return false;
    this.poolUntilMs = 0;
    return true;
  }

  /** Runs `call` inline and times it. */
  time<T>(call: () => T): T {
    const started = process.hrtime.bigint();
    try {
      return call();
    } finally {
      const elapsed = process.hrtime.bigint() - started;
      this.inlineCalls++;
      if (++this.windowCalls >= InlineIoPolicy.WINDOW_CALLS) this.windowCalls = this.windowSlowCalls = 0;
      if (elapsed > this.slowCallNs) {
        this.slowInlineCalls++;
        if (elapsed > this.stallCallNs || ++this.windowSlowCalls > InlineIoPolicy.WINDOW_SLOW_CALLS_MAX) {
          this.fallbacks++;
          this.windowCalls = this.windowSlowCalls = 0;
          this.poolUntilMs = performance.now() + this.cooldownMs;
        }
      }
    }
  }
}

/** Policy for callers that pass none: everything through the thread pool. */
const POOL_ONLY = new InlineIoPolicy({ inlineMaxBytes: 0 });

function writeAllInline(fd: number, data: Buffer, position: number): void {
  let done = 0;
  while (done < data.length) {
    const written = fs.writeSync(fd, data, done, data.length - done, position + done);
    if (written <= 0) throw Object.assign(new Error('write returned 0 bytes'), { code: 'EIO' });
    done += written;
  }
}

function readAllInline(fd: number, target: Buffer, position: number): void {
  let done = 0;
  while (done < target.length) {
    const read = fs.readSync(fd, target, done, target.length - done, position + done);
    if (read === 0) {
      target.fill(0, done);
      return;
    }
    done += read;
  }
}

export function writeAll(fd: number, data: Buffer, position: number, policy: InlineIoPolicy = POOL_ONLY): Promise<void> {
  if (policy.useInline(data.length)) {
    try {
      policy.time(() => writeAllInline(fd, data, position));
      return Promise.resolve();
    } catch (error) {
      return Promise.reject(error);
    }
  }
  return new Promise((resolve, reject) => {
    const step = (done: number): void => {
      fs.write(fd, data, done, data.length - done, position + done, (error, written) => {
        if (error) return reject(error);
        if (written <= 0) return reject(Object.assign(new Error('write returned 0 bytes'), { code: 'EIO' }));
        if (done + written === data.length) return resolve();
        step(done + written);
      });
    };
    if (data.length === 0) resolve();
    else step(0);
  });
}

/** Fills `target` from `position`; bytes past the end of the file read as zeros. */
export function readAll(fd: number, target: Buffer, position: number, policy: InlineIoPolicy = POOL_ONLY): Promise<void> {
  if (policy.useInline(target.length)) {
    try {
      policy.time(() => readAllInline(fd, target, position));
      return Promise.resolve();
    } catch (error) {
      return Promise.reject(error);
    }
  }
  return new Promise((resolve, reject) => {
    const step = (done: number): void => {
      fs.read(fd, target, done, target.length - done, position + done, (error, read) => {
        if (error) return reject(error);
        if (read === 0) {
          target.fill(0, done);
          return resolve();
        }
        if (done + read === target.length) return resolve();
        step(done + read);
      });
    };
    if (target.length === 0) resolve();
    else step(0);
  });
}

export function fdatasync(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.fdatasync(fd, (error) => (error ? reject(error) : resolve())));
}

export function ftruncate(fd: number, length: number): Promise<void> {
  return new Promise((resolve, reject) => fs.ftruncate(fd, length, (error) => (error ? reject(error) : resolve())));
}

export function openFd(file: string, flags: string | number, mode = 0o644): Promise<number> {
  return new Promise((resolve, reject) => fs.open(file, flags, mode, (error, fd) => (error ? reject(error) : resolve(fd))));
}

export function closeFd(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.close(fd, (error) => (error ? reject(error) : resolve())));
}

export function fstatSize(fd: number): Promise<number> {
  return new Promise((resolve, reject) => fs.fstat(fd, (error, stats) => (error ? reject(error) : resolve(stats.size))));
}

/** Makes a directory's entries (created, renamed, removed files) durable. */
export async function fsyncDir(dir: string): Promise<void> {
  const handle = await fs.promises.open(dir, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/**
 * Replaces `file` with `data` so that a crash leaves either the old or the new content:
 * write a temporary file, fsync it, rename over the target, fsync the directory.
 */
export async function writeFileDurable(file: string, data: Uint8Array): Promise<void> {
  const temporary = `${file}.tmp`;
  const handle = await fs.promises.open(temporary, 'w', 0o644);
  try {
    await handle.writeFile(data);
    await handle.sync();
  } finally {
    await handle.close();
  }
  await fs.promises.rename(temporary, file);
  await fsyncDir(path.dirname(file));
}

export function errorCode(error: unknown): string | undefined {
  return typeof error === 'object' && error !== null && 'code' in error && typeof error.code === 'string' ? error.code : undefined;
}
