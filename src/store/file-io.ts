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
export async function writevAll(fd: number, buffers: readonly Buffer[], position: number): Promise<number> {
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
    const written = await writevOnce(fd, pending, at);
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

export function writeAll(fd: number, data: Buffer, position: number): Promise<void> {
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
export function readAll(fd: number, target: Buffer, position: number): Promise<void> {
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
