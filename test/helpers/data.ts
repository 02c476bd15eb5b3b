// Test data: checksums of files, random and patterned buffers, sparse images with a known
// layout of data and holes, and temp dirs that tests remove even when they fail.
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream, rmSync } from 'node:fs';
import { mkdtemp, open, rm, stat } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';

export async function sha256File(filePath: string, lengthBytes?: number): Promise<string> {
  const hash = createHash('sha256');
  const stream = createReadStream(filePath, lengthBytes === undefined ? {} : { start: 0, end: lengthBytes - 1 });
  for await (const chunk of stream) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

export function sha256(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

export function randomData(lengthBytes: number): Buffer {
  return randomBytes(lengthBytes);
}

/** Bytes derived from `seed` alone, so a checker can recompute them without storing them. */
export function patternData(lengthBytes: number, seed: number): Buffer {
  const data = Buffer.alloc(lengthBytes);
  // xorshift32: cheap, deterministic, never all-zero for a nonzero state.
  let state = (seed | 0) === 0 ? 0x9e3779b9 : seed | 0;
  for (let offset = 0; offset + 4 <= lengthBytes; offset += 4) {
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    data.writeInt32LE(state, offset);
  }
  return data;
}

export interface ByteRange {
  offset: number;
  length: number;
}

/**
 * Writes a sparse file of `sizeBytes` with random data at `dataRanges` and holes elsewhere
 * (the file is truncated to size first, so untouched ranges stay unallocated).
 */
export async function makeSparseImage(filePath: string, sizeBytes: number, dataRanges: readonly ByteRange[]): Promise<void> {
  const file = await open(filePath, 'w');
  try {
    await file.truncate(sizeBytes);
    for (const range of dataRanges) {
      if (range.offset + range.length > sizeBytes) throw new Error(`range ${range.offset}+${range.length} past ${sizeBytes}`);
      await file.write(randomData(range.length), 0, range.length, range.offset);
    }
    await file.sync();
  } finally {
    await file.close();
  }
}

/** Bytes the file occupies on disk (st_blocks is in 512-byte units whatever the fs block size). */
export async function allocatedBytes(filePath: string): Promise<number> {
  return (await stat(filePath)).blocks * 512;
}

const keepTempDirs = (): boolean => process.env.MIRRORSAN_TEST_KEEP === '1';
/** Temp dirs not yet removed; a test process that dies of an uncaught error removes them at exit. */
const liveTempDirs = new Set<string>();
let exitHookInstalled = false;

/** A fresh directory under the OS temp dir; pair with removeDir in a finally/t.after. */
export async function makeTempDir(prefix: string): Promise<string> {
  const dir = await mkdtemp(path.join(os.tmpdir(), `mirrorsan-${prefix}-`));
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.on('exit', () => {
      if (keepTempDirs()) return;
      for (const live of liveTempDirs) rmSync(live, { recursive: true, force: true });
    });
  }
  liveTempDirs.add(dir);
  return dir;
}

/** Removes a temp dir unless MIRRORSAN_TEST_KEEP=1 (then says where it is, for debugging). */
export async function removeDir(dir: string): Promise<void> {
  liveTempDirs.delete(dir);
  if (keepTempDirs()) {
    process.stderr.write(`keeping ${dir} (MIRRORSAN_TEST_KEEP=1)\n`);
    return;
  }
  await rm(dir, { recursive: true, force: true });
}
